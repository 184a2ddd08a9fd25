"""Executors run shard tasks and show one progress bar that counts images (images/s, ETA).

Every executor has the signature ``run_tasks(tasks, fn, *, workers, progress) -> list[result]``: ``fn(task, tick)``
processes one task and calls ``tick(n)`` after n images; results come back in task order. A task that raises (or whose
worker process dies) is reported at once with its name and does not stop the others; after all tasks ran,
``TasksFailed`` lists the failures. Each shard is written by exactly one task, so completion order never changes the
output. Tasks need ``.name`` and ``len(task)`` (images in it). ``EXECUTORS`` names them: ``local`` and ``ray``.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from multiprocessing.connection import wait
from typing import Any

from tqdm import tqdm

# forkserver: workers start from a clean single-threaded server (fork of a process that already ran OpenCV or tqdm's
# monitor thread can deadlock) and, with the preload, skip re-importing cv2/numpy/pyarrow that spawn pays per worker.
START_METHOD = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
_PRELOAD = ["prep.run", "prep.images", "prep.proposals", "shards.writer"]


class TasksFailed(RuntimeError):
    """Some tasks failed. ``failures``: [(task name, message with traceback)]; ``results``: None where failed."""

    def __init__(self, failures: list[tuple[str, str]], results: list[Any]):
        self.failures = failures
        self.results = results
        super().__init__(f"{len(failures)} task(s) failed: " + ", ".join(n for n, _ in failures))


def _format(e: BaseException) -> str:
    return "".join(traceback.format_exception(type(e), e, e.__traceback__))


def _bar(tasks: Sequence, progress: bool) -> tqdm:
    return tqdm(
        total=sum(len(t) for t in tasks),
        unit="img",
        disable=not progress,
        dynamic_ncols=True,
        smoothing=0.05,  # selective-search time varies a lot per image; a long average gives a steadier ETA
        # in a batch log (SLURM, nohup) each redraw is a line of the file: one a minute is plenty there
        mininterval=0.1 if sys.stderr.isatty() else 60.0,
    )


def _report(name: str, message: str) -> None:
    # at once, above the bar: a long run should not hide a failure until its end
    tqdm.write(f"shard {name} failed:\n{message.rstrip()}", file=sys.stderr)


def run_local(
    tasks: Sequence,
    fn: Callable[[Any, Callable[[int], None]], Any],
    *,
    workers: int = 1,
    progress: bool = True,
    start_method: str | None = None,
) -> list[Any]:
    """Run ``fn`` over ``tasks`` on ``workers`` processes (``workers <= 1``: in this process, no pool)."""
    tasks = list(tasks)
    if not tasks:
        return []
    with _bar(tasks, progress) as bar:
        if workers <= 1:
            return _run_inline(tasks, fn, bar)
        return _run_pool(tasks, fn, min(workers, len(tasks)), bar, start_method or START_METHOD)


def _run_inline(tasks: list, fn: Callable, bar: tqdm) -> list[Any]:
    results: list[Any] = [None] * len(tasks)
    failures = []
    for i, task in enumerate(tasks):
        try:
            results[i] = fn(task, bar.update)
        except Exception as e:
            failures.append((task.name, _format(e)))
            _report(task.name, failures[-1][1])
        bar.set_postfix_str(f"shards {i + 1}/{len(tasks)}", refresh=False)
    if failures:
        raise TasksFailed(failures, results)
    return results


# --- worker processes ------------------------------------------------------------------------------------------------
# Protocol on one duplex pipe per worker. main -> worker: (index, task) or None (stop).
# worker -> main: ("tick", n) | ("done", index, result) | ("error", index, traceback text).
# The main process always knows which task each worker holds, so a worker that dies (segfault in native code,
# OOM kill) is blamed on exactly that shard, a replacement worker takes the remaining tasks, and no task is lost.


def _worker(fn: Callable, conn) -> None:
    # Ctrl-C reaches the whole process group; the main process decides (it terminates workers on interrupt).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    tick = lambda n=1: conn.send(("tick", n))  # noqa: E731
    try:
        while True:
            item = conn.recv()
            if item is None:
                return
            index, task = item
            try:
                result = fn(task, tick)
            except Exception as e:  # also a tick that found the pipe closed: the writer has cleaned up by now
                conn.send(("error", index, _format(e)))
            else:
                conn.send(("done", index, result))
    except (EOFError, BrokenPipeError, ConnectionResetError):
        # The main process is gone (kill -9, OOM killer): nobody to report to. Stop quietly; its rerun redoes the shard.
        return


class _Worker:
    def __init__(self, ctx, fn: Callable):
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(target=_worker, args=(fn, child), daemon=True, name="prep-worker")
        self.proc.start()
        child.close()
        self.task: int | None = None


def _run_pool(tasks: list, fn: Callable, workers: int, bar: tqdm, start_method: str) -> list[Any]:
    ctx = mp.get_context(start_method)
    if start_method == "forkserver":
        ctx.set_forkserver_preload(_PRELOAD)
    results: list[Any] = [None] * len(tasks)
    failures: dict[int, str] = {}
    pending = deque(range(len(tasks)))
    finished = 0

    def assign(w: _Worker) -> None:
        w.task = pending.popleft() if pending else None
        try:
            w.conn.send(None if w.task is None else (w.task, tasks[w.task]))
        except OSError:  # the worker is gone before it got the task: the task goes back, the sentinel reports it
            if w.task is not None:
                pending.appendleft(w.task)
            w.task = None

    def fail(index: int, message: str) -> None:
        nonlocal finished
        failures[index] = message
        finished += 1
        _report(tasks[index].name, message)

    def handle(w: _Worker, msg) -> None:
        nonlocal finished
        if msg[0] == "tick":
            bar.update(msg[1])
            return
        _, index, payload = msg
        if msg[0] == "done":
            results[index] = payload
            finished += 1
        else:
            fail(index, payload)
        bar.set_postfix_str(f"shards {finished}/{len(tasks)}", refresh=False)
        assign(w)

    live = [_Worker(ctx, fn) for _ in range(workers)]
    try:
        for w in live:
            assign(w)
        while live:
            ready = set(wait([w.conn for w in live] + [w.proc.sentinel for w in live]))
            for w in list(live):
                dead = w.proc.sentinel in ready
                if w.conn in ready or dead:
                    try:
                        # everything the worker sent, also after it exited (its last messages are still in the pipe)
                        while w.conn.poll():
                            handle(w, w.conn.recv())
                    except (EOFError, OSError):
                        dead = True
                if not dead:
                    continue
                w.proc.join()
                live.remove(w)
                w.conn.close()
                if w.task is not None:
                    fail(
                        w.task,
                        f"worker process {w.proc.pid} died (exit code {w.proc.exitcode}) "
                        f"while writing {tasks[w.task].name}",
                    )
                if pending:
                    replacement = _Worker(ctx, fn)
                    live.append(replacement)
                    assign(replacement)
    except BaseException:
        # interrupted (Ctrl-C) or a bug here: stop our workers; their unfinished shards leave only temp files
        for w in live:
            if w.proc.is_alive():
                w.proc.terminate()
        for w in live:
            w.proc.join()
        raise
    if failures:
        raise TasksFailed([(tasks[i].name, failures[i]) for i in sorted(failures)], results)
    return results


def run_ray(tasks: Sequence, fn: Callable, **kwargs) -> list[Any]:
    """Shard tasks as Ray tasks on a cluster (prep.ray_executor); Ray is imported only when this runs."""
    from prep import ray_executor

    return ray_executor.run_tasks(tasks, fn, **kwargs)


EXECUTORS: dict[str, Callable[..., list[Any]]] = {"local": run_local, "ray": run_ray}


def get(name: str) -> Callable[..., list[Any]]:
    try:
        return EXECUTORS[name]
    except KeyError:
        raise ValueError(f"unknown executor {name!r}; known: {', '.join(sorted(EXECUTORS))}") from None


def default_workers() -> int:
    """Cores this process may run on (a SLURM or taskset allotment, not the whole machine), else ``os.cpu_count()``."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1
