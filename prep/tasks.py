"""What both executors share: the failure type, the progress bar, and the worker processes that run shard tasks.

An executor (``prep.executors.run_local``, ``prep.ray_executor.run_tasks``) runs ``fn(task, tick)`` over shard tasks,
where ``tick(n)`` counts n images done; a task needs ``.name`` and ``len(task)`` (its images). A failed task is reported
at once (``Progress.failed``) and does not stop the others; ``raise_failures`` ends the run with ``TasksFailed``.

Worker processes start from a clean forkserver (``context``) and speak one protocol on a duplex pipe (``Worker``):

- main -> worker: ``(index, fn, task)`` pickled into one message (``Worker.send``), or an empty message: stop;
- worker -> main: ``("tick", n)`` | ``("done", index, result)`` | ``("error", index, traceback text, exception)``, the
  exception pickled on its own (None if it does not pickle; ``load_exception`` turns it back).

The local executor keeps one worker per slot and knows which task each holds, so a worker that dies is blamed on
exactly that shard; a Ray worker keeps one for its shards (``prep.ray_executor``).
"""

from __future__ import annotations

import multiprocessing as mp
import pickle
import signal
import sys
import traceback
from collections.abc import Callable, Mapping, Sequence
from multiprocessing.connection import Connection
from typing import Any, Protocol

from tqdm import tqdm

# forkserver: workers start from a clean single-threaded server (fork of a process that already ran OpenCV or tqdm's
# monitor thread can deadlock) and, with the preload, skip re-importing cv2/numpy/pyarrow that spawn pays per worker.
START_METHOD = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
PRELOAD = ["prep.run", "prep.images", "prep.proposals", "shards.writer"]

Tick = Callable[[int], None]
TaskFn = Callable[[Any, Tick], Any]


class Task(Protocol):
    """What an executor needs of a task (``prep.run.ShardTask`` is one)."""

    @property
    def name(self) -> str: ...

    def __len__(self) -> int: ...


class TasksFailed(RuntimeError):
    """Some tasks failed. ``failures``: [(task name, message with traceback)]; ``results``: None where failed."""

    def __init__(self, failures: list[tuple[str, str]], results: list[Any]):
        self.failures = failures
        self.results = results
        super().__init__(f"{len(failures)} task(s) failed: " + ", ".join(n for n, _ in failures))


def raise_failures(tasks: Sequence[Task], failures: Mapping[int, str], results: list[Any]) -> None:
    """``TasksFailed`` for the failed tasks (by index), in task order, when there is any."""
    if failures:
        raise TasksFailed([(tasks[i].name, failures[i]) for i in sorted(failures)], results)


def format_exception(e: BaseException) -> str:
    return "".join(traceback.format_exception(type(e), e, e.__traceback__))


class Progress:
    """The one progress bar of a run: images done (images/s, ETA) and shards finished; failures printed above it at
    once, since a long run should not hide a failure until its end. A context manager (closes the bar)."""

    def __init__(self, tasks: Sequence[Task], enabled: bool):
        self.total, self.finished = len(tasks), 0
        self.bar = tqdm(
            total=sum(len(t) for t in tasks),
            unit="img",
            disable=not enabled,
            dynamic_ncols=True,
            smoothing=0.05,  # selective-search time varies a lot per image; a long average gives a steadier ETA
            # in a batch log (SLURM, nohup) each redraw is a line of the file: one a minute is plenty there
            mininterval=0.1 if sys.stderr.isatty() else 60.0,
        )

    @property
    def enabled(self) -> bool:
        return not self.bar.disable

    def images(self, n: int = 1) -> None:
        self.bar.update(n)

    def done(self) -> None:
        """One more task finished."""
        self.finished += 1
        self.bar.set_postfix_str(f"shards {self.finished}/{self.total}", refresh=False)

    def failed(self, name: str, message: str) -> None:
        """Task ``name`` failed (it counts as finished): ``message`` printed now."""
        tqdm.write(f"shard {name} failed:\n{message.rstrip()}", file=sys.stderr)
        self.done()

    def close(self) -> None:
        self.bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- worker processes ------------------------------------------------------------------------------------------------
def context(start_method: str | None = None) -> Any:
    """The multiprocessing context workers start from: ``start_method`` (default ``START_METHOD``), with ``PRELOAD``
    for a forkserver."""
    method = start_method or START_METHOD
    ctx = mp.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(PRELOAD)
    return ctx


def worker_loop(conn: Connection) -> None:
    """The body of a worker process: runs the tasks it is sent, one after the other, until it is told to stop or its
    pipe closes."""
    # Ctrl-C reaches the whole process group; the main process (or the Ray worker) decides, and terminates workers
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    def tick(n: int = 1) -> None:
        conn.send(("tick", n))

    try:
        while True:
            message = conn.recv_bytes()
            if not message:
                return
            index, fn, task = pickle.loads(message)
            try:
                result = fn(task, tick)
            except Exception as e:  # also a tick that found the pipe closed: the writer has cleaned up by now
                conn.send(("error", index, format_exception(e), _pickled(e)))
            else:
                conn.send(("done", index, result))
    except (EOFError, BrokenPipeError, ConnectionResetError):
        # The main process is gone (kill -9, OOM killer): nobody to report to. Stop quietly; its rerun redoes the shard.
        return


def _pickled(e: BaseException) -> bytes | None:
    try:
        return pickle.dumps(e)
    except Exception:  # an exception that does not pickle: the traceback text still tells what happened
        return None


def load_exception(pickled: bytes | None, text: str) -> BaseException:
    """The exception a worker reported (``("error", …)``), or a RuntimeError with the last line of its traceback when it
    did not pickle or does not unpickle here."""
    if pickled is not None:
        try:
            e = pickle.loads(pickled)
        except Exception:
            pass
        else:
            if isinstance(e, BaseException):
                return e
    return RuntimeError(text.strip().splitlines()[-1] if text.strip() else text)


class Worker:
    """A worker process running ``worker_loop``, the main side of its pipe, and the index of the task it holds."""

    def __init__(self, ctx: Any, name: str):
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=worker_loop, args=(child,), daemon=True, name=name)
        self.proc.start()
        child.close()
        self.task: int | None = None

    def send(self, index: int, fn: TaskFn, task: Any, dumps: Callable[[Any], bytes] = pickle.dumps) -> None:
        """Hand task ``index`` to the worker; ``dumps`` pickles ``(index, fn, task)``."""
        self.conn.send_bytes(dumps((index, fn, task)))

    def stop(self) -> None:
        """Ask the worker to exit once its current task is done."""
        self.conn.send_bytes(b"")

    def kill(self) -> None:
        """End the worker now (its shard leaves only temporary files) and close the pipe."""
        self.conn.close()
        if self.proc.is_alive():
            self.proc.terminate()
        self.proc.join()
