"""Shard tasks as Ray tasks: ``prep … --executor ray [--ray-address ADDR]`` (the executor contract of prep.executors).

``run_tasks(tasks, fn, *, workers, progress)`` runs ``fn(task, tick)`` (``prep.run.run_task``) as one Ray task per
shard, one CPU each, on the cluster at ``address``: ``host:port`` or ``auto`` (the cluster ``ray start`` made on this
machine), else ``$RAY_ADDRESS``, else a local Ray instance with ``workers`` CPUs started here and stopped at the end. A
process already connected to Ray (``ray.init`` done) keeps its connection. The local instance listens on 127.0.0.1
only (``init_local``): nothing on the network can reach it; joining a cluster is left to the cluster's settings.

Failures: a task whose worker dies (segfault, OOM kill, lost node) is retried ``max_retries`` times by Ray; a task that
raises a transient network error (``transient_errors``) is retried as well; any other exception is final at once (retrying a
full disk or a bug only wastes the cluster). Retrying is safe because a shard task is idempotent: the writer writes
temporary names, renames, and writes the stats file last, so a rerun of a half-written shard gives the same bytes.
After every task ran, ``TasksFailed`` names the failed shards, as the local executor does.

Determinism: each shard runs in a child process of the Ray worker (a ``prep.tasks.Worker``, as the local executor's
workers are: forked from a clean single-threaded server) and kept for that worker's next shards. Ray worker processes run threads that call the C
library's ``rand()``, and selective search draws from that same process-wide generator after ``srand(seed)``
(prep.proposals): run in the Ray worker itself, 2 of 36 repeated calls on one image gave other boxes (Ray 2.60). A child
that dies (segfault, OOM kill) raises ``ShardProcessDied``, which is retried like a dead Ray worker.

Progress: each task reports its image count to a small actor (at most every ``REPORT_EVERY`` s); the driver polls it
and moves the same tqdm bar as the local executor. Ray itself is imported only when this executor is chosen.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import pickle
import time
from collections.abc import Callable, Sequence
from typing import Any

from prep.tasks import Progress, Task, TaskFn, Tick, Worker, context, load_exception, raise_failures

_settings: dict[str, Any] = {"address": None, "max_retries": 3}
REPORT_EVERY = 0.25  # s between progress reports of one task: cheap (an actor call), still a smooth bar
POLL = 0.25  # s between polls of the progress actor by the driver
LOOPBACK = "127.0.0.1"  # the only address a local instance started here listens on


def configure(*, address: str | None = None, max_retries: int = 3) -> None:
    """Process-wide settings from the command line (``--ray-address``); ``configure()`` restores the defaults."""
    _settings.update(address=address or None, max_retries=int(max_retries))


class ShardProcessDied(RuntimeError):
    """The child process writing a shard died (segfault in native code, OOM kill): worth a retry, like a dead worker."""


class RemoteTraceback(Exception):
    """The traceback of an exception raised in the shard's child process (chained as the cause of the re-raise)."""

    def __str__(self) -> str:
        return "\n" + self.args[0]


def transient_errors() -> tuple:
    """Exceptions worth retrying a shard task for: network and connection failures, a dead child; nothing else."""
    errors: list = [ConnectionError, TimeoutError, ShardProcessDied]
    try:
        import botocore.exceptions as bex

        errors += [bex.ConnectionError, bex.HTTPClientError]
    except ImportError:  # no S3 support installed: no S3 errors to retry
        pass
    return tuple(errors)


def _package_root() -> str:
    import prep

    return os.path.dirname(os.path.dirname(os.path.abspath(prep.__file__)))


def _installed() -> bool:
    try:
        importlib.metadata.distribution("univip-shards")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def code_env(local: bool) -> dict:
    """``runtime_env`` entries that make ``prep`` importable on the workers; empty when they can import it already.

    Installed (``pip install``): the nodes are expected to have the same install (docs/cluster.md), nothing is sent.
    A local instance started here: its workers inherit this process's environment, and Ray puts the current
    directory on their ``sys.path``. Anything else (a checkout, no install, an existing cluster): the ``prep`` and
    ``shards`` packages are uploaded with the job (``py_modules``)."""
    if _installed():
        return {}
    root = _package_root()
    on_path = [os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if local and (root == os.path.abspath(os.getcwd()) or root in on_path):
        return {}
    return {"py_modules": [os.path.join(root, "prep"), os.path.join(root, "shards")]}


def _storage_env() -> dict:
    """Settings of shards.storage the workers need: an S3 endpoint given on this command line (``--s3-endpoint``-like
    flags call ``storage.configure``, which other processes do not see). Credentials are never sent this way: every
    node takes them from its own AWS environment or profile."""
    from shards import storage

    endpoint = storage.endpoint_url()
    return {"env_vars": {"S3_ENDPOINT_URL": endpoint}} if endpoint else {}


def _connect(address: str | None, workers: int) -> bool:
    """Connect this process to Ray (unless it is already); True when this call connected it.

    The job's ``runtime_env`` (code upload, S3 endpoint) is set here: Ray takes uploads only per job. A process that
    connected itself keeps its own settings."""
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    local = address is None
    env = {**code_env(local), **_storage_env()}
    quiet: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}  # output would tear the bar
    if local:
        init_local(num_cpus=max(1, workers), include_dashboard=False, runtime_env=env or None, **quiet)
        return True
    try:
        ray.init(address=address, runtime_env=env or None, **quiet)
    except (ConnectionError, ValueError, RuntimeError) as e:
        raise ConnectionError(f"cannot connect to the Ray cluster at {address!r}: {e}") from None
    return True


def init_local(**kwargs: Any) -> Any:
    """``ray.init`` of a new Ray instance on this machine (``address="local"``: never a cluster ``ray start`` left
    running here) whose processes all listen on 127.0.0.1 only; ``kwargs`` go to ``ray.init``, its result is returned.

    Ray binds its servers (GCS, raylet, workers, agents) to the node's address, and ``ray.init(_node_ip_address=
    "127.0.0.1")`` does not help: Ray replaces a loopback address by the routable one. Only its single-machine mode
    (``ray_constants.ENABLE_RAY_CLUSTER`` false, the default on macOS and Windows) keeps 127.0.0.1, and the node's
    address is chosen once, in ``ray.init``: so that mode is on for this call only. Raises RuntimeError (and stops the
    instance) if Ray still picked another address (a Ray release that changed this)."""
    import ray
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        context = ray.init(address="local", **kwargs)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved
    ip = ray.util.get_node_ip_address()
    if ip != LOOPBACK:
        ray.shutdown()
        raise RuntimeError(
            f"the local Ray instance took the address {ip}, not {LOOPBACK} (Ray {ray.__version__}): "
            "refusing to run it where the network can reach it"
        )
    return context


def run_tasks(
    tasks: Sequence,
    fn: Callable[[Any, Callable[[int], None]], Any],
    *,
    workers: int = 1,
    progress: bool = True,
    address: str | None = None,
    max_retries: int | None = None,
) -> list[Any]:
    """Run ``fn(task, tick)`` over ``tasks`` as Ray tasks; results in task order; ``TasksFailed`` after all ran.

    ``workers``: CPUs of the local instance started when there is no address (an existing cluster runs as many
    tasks at once as it has free CPUs). ``address``/``max_retries`` default to ``configure``'s."""
    import ray

    tasks = list(tasks)
    if not tasks:
        return []
    address = address if address is not None else _settings["address"]
    max_retries = _settings["max_retries"] if max_retries is None else max_retries
    started = _connect(address, workers)
    try:
        with Progress(tasks, progress) as bar:
            return _run(ray, tasks, fn, bar, max_retries)
    finally:
        if started:
            ray.shutdown()  # stops the local instance started here; for a cluster, only disconnects


class _ImageCounts:
    """Images done per task index (the highest count any attempt reported: a retry restarts at 0)."""

    def __init__(self):
        self.done: dict[int, int] = {}

    def report(self, index: int, n: int) -> None:
        self.done[index] = max(n, self.done.get(index, 0))

    def counts(self) -> dict[int, int]:
        return self.done


def _task(fn: Callable, task, index: int, tracker) -> Any:
    """Runs on a Ray worker: ``fn(task, tick)`` in a child process, ticks batched into reports to the progress actor."""
    done = 0
    last = time.monotonic()

    def tick(n: int = 1) -> None:
        nonlocal done, last
        done += n
        now = time.monotonic()
        if tracker is not None and now - last >= REPORT_EVERY:
            tracker.report.remote(index, done)  # fire and forget: progress never slows or fails a shard
            last = now

    return run_in_child(fn, task, tick)


def _dumps(payload: Any) -> bytes:
    try:
        return pickle.dumps(payload)
    except (pickle.PicklingError, AttributeError, TypeError):
        # a function Ray shipped by value (defined in a driver script or a test): only cloudpickle can send it on
        from ray import cloudpickle

        return cloudpickle.dumps(payload)


# In a Ray worker: its shard process, kept for the next task, so OpenCV's one-off set-up (~0.25 s) and the imports are
# paid once per worker, as in the local executor's workers, not once per shard.
_shard_process: dict[str, Worker] = {}


def _stop_shard_process() -> None:
    worker = _shard_process.pop("worker", None)
    if worker is not None:
        worker.kill()


def run_in_child(fn: TaskFn, task: Task, tick: Tick) -> Any:
    """``fn(task, tick)`` in this process's shard process (a ``prep.tasks.Worker``, started on first use from a clean
    forkserver); its exception re-raised here with the child's traceback as the cause; ``ShardProcessDied`` if it
    dies."""
    worker = _shard_process.get("worker")
    if worker is None or not worker.proc.is_alive():
        _stop_shard_process()
        worker = _shard_process["worker"] = Worker(context(), "prep-shard")
    try:
        worker.send(0, fn, task, dumps=_dumps)  # one task at a time: its index says nothing here
        while True:
            try:
                msg = worker.conn.recv()
            except (EOFError, OSError):
                worker.proc.join()
                code = worker.proc.exitcode
                _stop_shard_process()
                raise ShardProcessDied(
                    f"process {worker.proc.pid} writing shard {task.name} died (exit code {code})"
                ) from None
            if msg[0] == "tick":
                tick(msg[1])
            elif msg[0] == "done":
                return msg[2]
            else:
                _, _, text, pickled = msg
                # the exception itself when it pickles, so that Ray can tell a transient one
                raise load_exception(pickled, text) from RemoteTraceback(text)
    except (KeyboardInterrupt, SystemExit):
        # cancelled while the child works: stop it (its shard leaves only temporary files), a later task starts anew
        _stop_shard_process()
        raise


def _describe(ray, e: BaseException, name: str, max_retries: int) -> str:
    if isinstance(e, ray.exceptions.RayTaskError):
        return str(e)  # the remote traceback, ending with the exception line
    died = (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError, ray.exceptions.OutOfMemoryError)
    if isinstance(e, died):
        return f"Ray worker died while writing {name} ({1 + max_retries} attempts): {type(e).__name__}: {e}"
    return f"{type(e).__name__}: {e}"


def _run(ray: Any, tasks: list[Task], fn: TaskFn, bar: Progress, max_retries: int) -> list[Any]:
    remote = ray.remote(_task).options(num_cpus=1, max_retries=max_retries, retry_exceptions=list(transient_errors()))
    tracker = None if not bar.enabled else ray.remote(_ImageCounts).options(num_cpus=0).remote()
    fn_ref = ray.put(fn)  # once, not once per task
    # a bounded number of tasks in flight: each carries its records, and a plan can have thousands of shards
    limit = max(2, 2 * int(ray.cluster_resources().get("CPU", 1)))
    results: list[Any] = [None] * len(tasks)
    failures: dict[int, str] = {}
    shown = [0] * len(tasks)
    inflight: dict = {}  # ObjectRef -> task index
    counts = None  # the pending question to the progress actor
    nxt = 0

    def show(index: int, n: int) -> None:
        if n > shown[index]:
            bar.images(n - shown[index])
            shown[index] = n

    try:
        while nxt < len(tasks) or inflight:
            while nxt < len(tasks) and len(inflight) < limit:
                inflight[remote.remote(fn_ref, tasks[nxt], nxt, tracker)] = nxt
                nxt += 1
            ready, _ = ray.wait(list(inflight), num_returns=len(inflight), timeout=POLL)
            for ref in ready:
                i = inflight.pop(ref)
                try:
                    results[i] = ray.get(ref)
                except Exception as e:
                    failures[i] = _describe(ray, e, tasks[i].name, max_retries)
                    bar.failed(tasks[i].name, failures[i])
                else:
                    show(i, len(tasks[i]))
                    bar.done()
            if tracker is not None and inflight:
                # never wait for the actor (it may still be starting): read the last answer once it is there
                if counts is None:
                    counts = tracker.counts.remote()
                elif ray.wait([counts], timeout=0)[0]:
                    try:
                        for i, n in ray.get(counts).items():
                            show(i, min(n, len(tasks[i])))
                    except Exception:  # the progress actor died: the shards matter, the bar does not
                        tracker = None
                    counts = None
    except BaseException:
        # interrupted (Ctrl-C) or a bug here: stop the running tasks; their shards leave only temporary files
        for ref in inflight:
            ray.cancel(ref, force=True)
        raise
    raise_failures(tasks, failures, results)
    return results
