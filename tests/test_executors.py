"""prep.executors (the local executor) and prep.tasks (what both executors share): results in task order, failures
named by shard and reported at once, dead workers blamed on their shard, progress counting every image, and the
worker protocol on its own."""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys

import pytest

from prep import executors, tasks
from prep.tasks import TasksFailed


class Job:
    def __init__(self, name: str, n: int, action: str = "ok"):
        self.name, self.n, self.action = name, n, action

    def __len__(self) -> int:
        return self.n


class NeedsTwoArguments(Exception):
    """Pickles, but does not unpickle (its __init__ wants two arguments, pickle passes one)."""

    def __init__(self, a, b):
        super().__init__(a)


class HoldsALambda(Exception):
    """Does not pickle at all."""

    def __init__(self, message):
        super().__init__(message)
        self.callback = lambda: None


def job_fn(job: Job, tick) -> dict:
    for _ in range(job.n):
        tick(1)
    if job.action == "raise":
        raise ValueError(f"bad input in {job.name}")
    if job.action == "raise_unloadable":
        raise NeedsTwoArguments(f"odd exception in {job.name}", 0)
    if job.action == "raise_unpicklable":
        raise HoldsALambda(f"unpicklable exception in {job.name}")
    if job.action == "die":
        os._exit(7)  # what a segfault in native code or an OOM kill looks like from outside
    return {"name": job.name, "pid": os.getpid()}


ACTIONS = ["ok", "raise", "ok", "die", "ok", "ok"]


def test_local_executor_keeps_order_reports_failures_and_dead_workers():
    jobs = [Job(f"s{i}", 2, a) for i, a in enumerate(ACTIONS)]
    for workers in (1, 2):
        run_jobs = jobs if workers == 2 else [j for j in jobs if j.action != "die"]
        with pytest.raises(TasksFailed) as e:
            executors.run_local(run_jobs, job_fn, workers=workers, progress=False)
        names = [n for n, _ in e.value.failures]
        assert names == (["s1", "s3"] if workers == 2 else ["s1"])
        assert "ValueError: bad input in s1" in e.value.failures[0][1]
        if workers == 2:
            assert "died (exit code 7) while writing s3" in e.value.failures[1][1]
        ok = [r["name"] for r in e.value.results if r is not None]
        assert ok == [j.name for j in run_jobs if j.action == "ok"]
    results = executors.run_local([Job(f"s{i}", 1) for i in range(5)], job_fn, workers=2, progress=False)
    assert [r["name"] for r in results] == ["s0", "s1", "s2", "s3", "s4"]
    assert len({r["pid"] for r in results}) == 2 and os.getpid() not in {r["pid"] for r in results}
    assert executors.run_local([Job("a", 1)], job_fn, workers=1, progress=False)[0]["pid"] == os.getpid()
    assert executors.run_local([], job_fn, workers=2) == []


@pytest.mark.parametrize("workers", [1, 2])
def test_failures_are_printed_at_once_naming_the_shard(workers, capsys):
    jobs = [Job("s0", 1), Job("s1", 1, "raise"), Job("s2", 1)]
    with pytest.raises(TasksFailed, match="1 task\\(s\\) failed: s1"):
        executors.run_local(jobs, job_fn, workers=workers, progress=False)
    err = capsys.readouterr().err
    assert err.count("shard s1 failed:") == 1 and "ValueError: bad input in s1" in err
    assert "s0" not in err and "s2" not in err


class RecordingProgress(tasks.Progress):
    made: list[RecordingProgress] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.made.append(self)


@pytest.mark.parametrize("workers", [1, 2])
def test_progress_counts_every_image_and_every_shard(workers, monkeypatch, capsys):
    # the bar's count is what a user watches: ticks from worker processes (also from one that died after them)
    # must all arrive, and every task, failed or not, counts as a finished shard
    monkeypatch.setattr(executors, "Progress", RecordingProgress)
    RecordingProgress.made.clear()
    actions = ACTIONS if workers == 2 else [a for a in ACTIONS if a != "die"]
    jobs = [Job(f"s{i}", 3 + i, a) for i, a in enumerate(actions)]
    with pytest.raises(TasksFailed):
        executors.run_local(jobs, job_fn, workers=workers, progress=True)
    (bar,) = RecordingProgress.made
    assert bar.bar.total == bar.bar.n == sum(len(j) for j in jobs)
    assert bar.finished == bar.total == len(jobs)
    assert f"shards {len(jobs)}/{len(jobs)}" in capsys.readouterr().err


def test_progress_without_a_bar_still_counts_shards(capsys):
    with tasks.Progress([Job("a", 2), Job("b", 3)], enabled=False) as bar:
        assert not bar.enabled and bar.bar.total == 5
        bar.images(2)
        bar.done()
        bar.failed("b", "Traceback …\nOSError: disk full\n")
    assert bar.finished == 2
    assert capsys.readouterr().err == "shard b failed:\nTraceback …\nOSError: disk full\n"


def test_raise_failures_in_task_order():
    jobs = [Job(f"s{i}", 1) for i in range(4)]
    tasks.raise_failures(jobs, {}, [1, 2, 3, 4])
    with pytest.raises(TasksFailed) as e:
        tasks.raise_failures(jobs, {3: "late", 1: "early"}, [0, None, 2, None])
    assert e.value.failures == [("s1", "early"), ("s3", "late")] and e.value.results == [0, None, 2, None]


def test_worker_protocol():
    worker = tasks.Worker(tasks.context(), "test-worker")
    try:
        messages = []
        for index, action in enumerate(["ok", "raise", "raise_unloadable", "raise_unpicklable"]):
            worker.send(index, job_fn, Job(f"s{index}", 2, action))
            messages.append(worker.conn.recv())
            while messages[-1][0] == "tick":
                messages.append(worker.conn.recv())
        assert [m[0] for m in messages] == ["tick", "tick", "done"] + ["tick", "tick", "error"] * 3
        done, errors = messages[2], [m for m in messages if m[0] == "error"]
        assert done[:2] == ("done", 0) and done[2]["pid"] == worker.proc.pid
        assert [m[1] for m in errors] == [1, 2, 3]
        assert all(m[2].startswith("Traceback") for m in errors)
        raised = [tasks.load_exception(m[3], m[2]) for m in errors]
        assert type(raised[0]) is ValueError and str(raised[0]) == "bad input in s1"  # Ray retries by its type
        assert [type(e) for e in raised[1:]] == [RuntimeError, RuntimeError]
        assert str(raised[1]).endswith("NeedsTwoArguments: odd exception in s2")
        assert errors[2][3] is None and str(raised[2]).endswith("HoldsALambda: unpicklable exception in s3")
        worker.stop()
        worker.proc.join(60)
        assert worker.proc.exitcode == 0
    finally:
        worker.kill()


def test_worker_exits_quietly_when_the_main_process_is_gone(capfd):
    # kill -9 or an OOM kill of the main process: its workers find the pipe closed and must just stop (their shard
    # writer has removed its temporary files), not print two tracebacks each over the user's terminal
    worker = tasks.Worker(mp.get_context("spawn"), "test-worker")  # spawn: inherits this test's captured stderr
    worker.send(0, job_fn, Job("s0", 200))
    worker.conn.close()  # gone before reading a single tick
    worker.proc.join(60)
    assert worker.proc.exitcode == 0
    assert "Traceback" not in capfd.readouterr().err


def test_forkserver_workers_start_with_the_prep_modules_loaded():
    if tasks.START_METHOD != "forkserver":
        pytest.skip("no forkserver on this platform")
    # a process of its own: the forkserver is started once per process, and a test before this one may have
    # started it without the preload
    code = (
        "import sys; sys.path.insert(0, 'tests'); from prep import tasks; from test_executors import Job, loaded; "
        "w = tasks.Worker(tasks.context(), 'test-worker'); w.send(0, loaded, Job('s0', 0)); "
        "print(sorted(set(tasks.PRELOAD) - set(w.conn.recv()[2]))); w.kill()"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


def loaded(job, tick) -> list[str]:
    """The modules a worker holds before it imports anything for a task."""
    return sorted(sys.modules)


def test_unknown_executor_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown executor 'nope'; known: local"):
        executors.get("nope")
