"""Executors run shard tasks and show one progress bar that counts images (images/s, ETA).

Every executor has the signature ``run_tasks(tasks, fn, *, workers, progress) -> list[result]``: ``fn(task, tick)``
processes one task and calls ``tick(n)`` after n images; results come back in task order. A task that raises (or whose
worker process dies) is reported at once with its name and does not stop the others; after all tasks ran,
``TasksFailed`` lists the failures. Each shard is written by exactly one task, so completion order never changes the
output. Tasks need ``.name`` and ``len(task)`` (images in it). ``EXECUTORS`` names them: ``local`` (here) and ``ray``
(``prep.ray_executor``); what they share is in ``prep.tasks``.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Sequence
from multiprocessing.connection import wait
from typing import Any

from prep.tasks import Progress, Task, TaskFn, Worker, context, format_exception, raise_failures


def run_local(
    tasks: Sequence[Task],
    fn: TaskFn,
    *,
    workers: int = 1,
    progress: bool = True,
    start_method: str | None = None,
) -> list[Any]:
    """Run ``fn`` over ``tasks`` on ``workers`` processes (``workers <= 1``: in this process, no pool).
    ``start_method``: of the worker processes, ``prep.tasks.START_METHOD`` (with its preload) by default."""
    tasks = list(tasks)
    if not tasks:
        return []
    with Progress(tasks, progress) as bar:
        if workers <= 1:
            return _run_inline(tasks, fn, bar)
        return _run_pool(tasks, fn, min(workers, len(tasks)), bar, context(start_method))


def _run_inline(tasks: list[Task], fn: TaskFn, bar: Progress) -> list[Any]:
    results: list[Any] = [None] * len(tasks)
    failures: dict[int, str] = {}
    for i, task in enumerate(tasks):
        try:
            results[i] = fn(task, bar.images)
        except Exception as e:
            failures[i] = format_exception(e)
            bar.failed(task.name, failures[i])
        else:
            bar.done()
    raise_failures(tasks, failures, results)
    return results


# The main process always knows which task each worker holds (prep.tasks.Worker), so a worker that dies (segfault in
# native code, OOM kill) is blamed on exactly that shard, a replacement worker takes the remaining tasks, and no task
# is lost.
def _run_pool(tasks: list[Task], fn: TaskFn, workers: int, bar: Progress, ctx: Any) -> list[Any]:
    results: list[Any] = [None] * len(tasks)
    failures: dict[int, str] = {}
    pending = deque(range(len(tasks)))

    def assign(w: Worker) -> None:
        w.task = pending.popleft() if pending else None
        try:
            if w.task is None:
                w.stop()
            else:
                w.send(w.task, fn, tasks[w.task])
        except OSError:  # the worker is gone before it got the task: the task goes back, the sentinel reports it
            if w.task is not None:
                pending.appendleft(w.task)
            w.task = None

    def fail(index: int, message: str) -> None:
        failures[index] = message
        bar.failed(tasks[index].name, message)

    def handle(w: Worker, msg: tuple) -> None:
        if msg[0] == "tick":
            bar.images(msg[1])
            return
        index = msg[1]
        if msg[0] == "done":
            results[index] = msg[2]
            bar.done()
        else:
            fail(index, msg[2])
        assign(w)

    live = [Worker(ctx, "prep-worker") for _ in range(workers)]
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
                    replacement = Worker(ctx, "prep-worker")
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
    raise_failures(tasks, failures, results)
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
