"""python -m train streaming its shards from object storage, end to end with real components: S3 = moto in server
mode, HTTP = a real http.server on 127.0.0.1 (tests.servers), DDP = two `python -m train` processes on gloo started
with torchrun's environment.

Sample identity. With the same shards, seed and streams, the data order does not depend on where the shards live (the
plan permutes the sorted URL list; augmentations are seeded by position, not URL), and CPU training is deterministic.
So a remote run whose per-step losses equal those of an undisturbed run was trained on exactly the same samples in
the same order: none was lost or read twice. The fault tests use this as their check.

"Deleted mid-run": a thread deletes the shard object as soon as rank 0 has logged step 1, i.e. after the manifest was
read and training started; the shard is one rank 0 opens only at step 3 (picked with train.data's own plan), so the
deletion hits a shard the run still needs in the current epoch, as a real mid-run deletion would. The test checks that
the deletion happened at step 1 (else the run would not have exercised the fault)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from test_train import TINY, make_train_shards

from shards import schema, storage
from tests.servers import FaultyHTTPServer
from tests.wait import wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_SHARDS, PER_SHARD = 6, 8  # 48 samples, global batch 8: 6 steps per epoch on one rank
STEPS = 4  # step k has read 8k + 8 samples (8-sample shuffle buffer): shards 3-5 are still unread after step 1
FAST = [*TINY, "--batch-size", "8", "--ckpt-every", "0"]
SECRET = "wR0ngS3cretDoNotPrintMe/xyz"


def _env(**changes) -> dict:
    """The test process's environment now (fixtures set the AWS variables), one intra-op thread; None deletes."""
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    for name, value in changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def _train_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "train", *args]


def _run(*args, env=None, timeout=180) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        _train_cmd(*args), cwd=ROOT, env=env or _env(), capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"python -m train failed ({proc.returncode}):\n{proc.stderr[-3000:]}"
    return proc


def _log(out) -> list[dict]:
    path = os.path.join(out, "log.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def _losses(rows) -> list[float]:
    return [r["loss"] for r in rows]


def _main(capsys, *argv) -> tuple[int, str]:
    """train.__main__.main in this process (no torch start-up): for runs that stop early or train a step or two."""
    import torch

    from train.__main__ import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the subprocess runs: the test machine's cores are shared
    try:
        code = main(list(argv))
    finally:
        torch.set_num_threads(threads)
    return code, capsys.readouterr().err


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    """6 prep-like shards of 8 samples (tar + stats, ~40 KB each) and a manifest.json, on local disk."""
    root = make_train_shards(str(tmp_path_factory.mktemp("shards")), [PER_SHARD] * N_SHARDS)
    stats = []
    for j in range(N_SHARDS):
        with open(os.path.join(root, schema.shard_name("t", j) + schema.STATS_SUFFIX)) as f:
            stats.append(json.load(f))
    manifest = schema.make_manifest(config={}, versions={}, classes=None, stats=stats)
    with open(os.path.join(root, schema.MANIFEST_NAME), "wb") as f:
        f.write(schema.dumps(manifest))
    return root


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory) -> list[dict]:
    """STEPS undisturbed steps from manifest.json over HTTP: the log every fault run must reproduce."""
    server = FaultyHTTPServer(shards)
    try:
        out = str(tmp_path_factory.mktemp("ref"))
        _run(*FAST, "--data", server.url_for(schema.MANIFEST_NAME), "--out", out, "--max-steps", str(STEPS))
    finally:
        server.stop()
    return _log(out)


def _upload(s3, root: str, prefix: str) -> None:
    client = s3.client()
    for name in sorted(os.listdir(root)):
        if name.endswith((schema.TAR_SUFFIX, schema.STATS_SUFFIX)) or name == schema.MANIFEST_NAME:
            client.upload_file(os.path.join(root, name), s3.bucket, f"{prefix}/{name}")


# --- where the data lives ------------------------------------------------------------------------------------------
def test_http_manifest_trains(reference):
    assert [r["step"] for r in reference] == list(range(1, STEPS + 1))
    assert all(np.isfinite(r["loss"]) and r["shards_skipped"] == 0 == r["samples_skipped"] for r in reference)


def test_http_brace_pattern(shards, http_server, tmp_path, capsys):
    server = http_server(shards)
    spec = server.url_for(f"t-{{000000..{N_SHARDS - 1:06d}}}.tar")
    code, err = _main(capsys, *FAST, "--data", spec, "--out", str(tmp_path / "o"), "--max-steps", "2")
    assert code == 0, err
    assert [r["step"] for r in _log(tmp_path / "o")] == [1, 2]
    # the sample counts came from the stats files: no shard was read in full just to count it
    paths = [p for method, p, _ in server.log if method == "GET"]
    assert sum(p.endswith(schema.STATS_SUFFIX) for p in paths) == N_SHARDS
    # HTTP has no listing: a clear error, not a traceback
    code, err = _main(capsys, *FAST, "--data", server.url + "/", "--out", str(tmp_path / "o2"))
    assert code == 1 and f"{server.url}/: http has no listing; give a manifest.json" in err, err


def test_s3_manifest_with_endpoint_flag_and_a_worker(s3_server, shards, reference, tmp_path):
    """--s3-endpoint alone (no endpoint in the environment) reaches the DataLoader worker process too."""
    _upload(s3_server, shards, "coco")
    out = str(tmp_path / "o")
    env = _env(AWS_ENDPOINT_URL=None, S3_ENDPOINT_URL=None)
    _run(
        *FAST,
        "--workers",
        "1",
        "--data",
        s3_server.url("coco", schema.MANIFEST_NAME),
        "--s3-endpoint",
        str(s3_server),
        "--out",
        out,
        "--max-steps",
        "3",
        env=env,
    )
    rows = _log(out)
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[-1]["shards_skipped"] == 0
    # one worker, one stream: the same samples in the same order as the reference (workers=0, one stream)
    assert _losses(rows) == pytest.approx(_losses(reference[:3]), abs=1e-5)


@pytest.mark.parametrize("slash, manifest", [("", True), ("/", False), ("", False)])
def test_s3_prefix_as_prep_out_took_it_endpoint_from_env(
    s3_server, shards, reference, tmp_path, monkeypatch, capsys, slash, manifest
):
    """--data s3://bucket/prefix, with or without the slash, as `prep --out` wrote there: its manifest when it has
    one, else its listing and stats files."""
    _upload(s3_server, shards, "coco")
    if not manifest:
        s3_server.client().delete_object(Bucket=s3_server.bucket, Key=f"coco/{schema.MANIFEST_NAME}")
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    monkeypatch.setenv("S3_ENDPOINT_URL", str(s3_server))
    code, err = _main(
        capsys, *FAST, "--data", s3_server.url("coco") + slash, "--out", str(tmp_path / "o"), "--max-steps", "2"
    )
    assert code == 0, err
    rows = _log(tmp_path / "o")
    assert [r["step"] for r in rows] == [1, 2]
    assert _losses(rows) == pytest.approx(_losses(reference[:2]), abs=1e-5)  # the same samples as from the manifest


def test_spawned_workers_get_the_configured_endpoint(s3_server, shards, monkeypatch):
    """storage.configure (what --s3-endpoint sets) is module state: a worker that does not fork (spawn, forkserver:
    macOS, Python >= 3.14) must still get it. Without the endpoint, the worker would ask AWS itself."""
    from train import data

    _upload(s3_server, shards, "coco")
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    storage.configure(endpoint_url=str(s3_server))  # the fixture restores the defaults
    loader, steps = data.make_loader(
        s3_server.url("coco", schema.MANIFEST_NAME),
        batch_size=8,
        workers=1,
        shuffle_buffer=1,
        on_bad_shard="fail",
        open_kwargs={"retries": 0},
    )
    loader.multiprocessing_context = "spawn"
    batch = next(iter(loader))
    assert steps == N_SHARDS and len(batch["__key__"]) == 8
    assert all(u.startswith(f"s3://{s3_server.bucket}/coco/") for u in batch["__url__"])


def test_pipe_urls_need_allow_pipe(shards, tmp_path, capsys):
    spec = f"pipe:cat {shards}/t-{{000000..{N_SHARDS - 1:06d}}}.tar"
    code, err = _main(capsys, *FAST, "--data", spec, "--out", str(tmp_path / "o1"))
    assert code == 1 and "pipe: URLs run a shell command" in err and "--allow-pipe" in err, err
    assert _log(tmp_path / "o1") == []
    code, err = _main(capsys, *FAST, "--data", spec, "--out", str(tmp_path / "o2"), "--allow-pipe", "--max-steps", "1")
    assert code == 0, err
    assert [r["step"] for r in _log(tmp_path / "o2")] == [1]


# --- faults --------------------------------------------------------------------------------------------------------
def _wait_for_rows(out, n: int, proc: subprocess.Popen, timeout: float = 120) -> int:
    def rows() -> int:
        logged = len(_log(out))
        if logged >= n:
            return logged
        assert proc.poll() is None, f"python -m train exited ({proc.returncode}) before step {n} in {out}/log.jsonl"
        return 0

    return wait_until(rows, timeout, f"step {n} in {out}/log.jsonl", interval=0.02)


@pytest.mark.slow
def test_http_server_stopped_and_restarted_mid_epoch(shards, reference, http_server, tmp_path):
    server = http_server(shards)
    out = str(tmp_path / "o")
    proc = subprocess.Popen(
        _train_cmd(*FAST, "--data", server.url_for(schema.MANIFEST_NAME), "--out", out, "--max-steps", str(STEPS)),
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        rows_at_stop = _wait_for_rows(out, 1, proc)  # step 1 trained: shards 1-2 read, 4 still to come
        server.stop()
        requests_at_stop = server.requests
        # the outage under test, so a fixed length: 2 s down, which the default retry budget (0.5 + 1 + 2 + 4 + 8 s
        # of backoff) outlasts
        time.sleep(2.0)
        server.start()  # same port
        _, stderr = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr[-3000:]
    assert rows_at_stop < STEPS and server.requests > requests_at_stop  # the run needed the server after the outage
    rows = _log(out)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)) and rows[-1]["shards_skipped"] == 0
    assert _losses(rows) == pytest.approx(_losses(reference), abs=1e-5)


def test_http_connection_cut_mid_shard(shards, reference, http_server, tmp_path):
    server = http_server(shards)
    server.drop_after(12_000, times=5)  # the manifest GET (< 12 KB) and the next four tar GETs (40 KB each)
    out = str(tmp_path / "o")
    _run(*FAST, "--data", server.url_for(schema.MANIFEST_NAME), "--out", out, "--max-steps", str(STEPS))
    ranges = [r for method, _, r in server.log if method == "GET" and r]
    # every cut was resumed where it broke, with a Range request
    assert ranges and set(ranges) <= {"bytes=12000-", "bytes=24000-", "bytes=36000-"}, server.log
    rows = _log(out)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1)) and rows[-1]["shards_skipped"] == 0
    assert _losses(rows) == pytest.approx(_losses(reference), abs=1e-5)  # no sample lost or repeated


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _late_shard(shards) -> str:
    """A shard rank 0 of 2 opens only during step 3 of epoch 0 (the plan of train.data, with this file's layout:
    4 samples per rank and step, 3 whole shards per rank and epoch, read in plan order; with an 8-sample shuffle
    buffer, step k has read 4k + 8 samples, so the third shard is opened at step 3)."""
    from train import data

    urls = [os.path.join(shards, schema.shard_name("t", j) + schema.TAR_SUFFIX) for j in range(N_SHARDS)]
    stream = data.ShardStream(urls, dict.fromkeys(urls, PER_SHARD), batch_size=4, world_size=2, rank=0)
    ranges = stream.plan(0)[0]
    assert [(a, b) for _, a, b in ranges] == [(0, PER_SHARD)] * 3
    return os.path.basename(ranges[2][0])


def _two_ranks_deleting(s3, shards, tmp_path, policy: str, timeout: float = 150):
    """Two gloo ranks train 4 steps (of a 6-step epoch) from an S3 manifest; a thread deletes a shard rank 0 has
    not opened yet as soon as step 1 is logged. Returns (exit codes, stderr per rank, log rows, the shard's URL)."""
    _upload(s3, shards, "coco")
    victim = "coco/" + _late_shard(shards)
    out = str(tmp_path / f"out-{policy}")
    port = _free_port()
    argv = [
        *FAST,
        "--data",
        s3.url("coco", schema.MANIFEST_NAME),
        "--out",
        out,
        "--max-steps",
        "4",
        "--on-bad-shard",
        policy,
    ]
    procs = []
    for rank in range(2):  # what torchrun sets
        env = _env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        with open(tmp_path / f"stderr-{policy}-{rank}.txt", "w") as err:
            procs.append(subprocess.Popen(_train_cmd(*argv), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err))
    deleted_at: list[int] = []

    def delete_after_step_1() -> None:
        # the log's rows once there are some, or True when a rank ended first (nothing deleted: the check below fails)
        logged = wait_until(
            lambda: _log(out) or any(p.poll() is not None for p in procs), timeout, "step 1 logged", interval=0.02
        )
        if isinstance(logged, list):
            s3.client().delete_object(Bucket=s3.bucket, Key=victim)
            deleted_at.append(len(logged))

    thread = threading.Thread(target=delete_after_step_1, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    hung = []
    for rank, p in enumerate(procs):
        try:
            p.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            hung.append(rank)
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    thread.join(5)
    assert not hung, f"ranks {hung} still running after {timeout} s"
    assert deleted_at == [1], deleted_at  # deleted mid-epoch, before rank 0 reached the shard (step 3)
    errors = [(tmp_path / f"stderr-{policy}-{r}.txt").read_text() for r in range(2)]
    return [p.returncode for p in procs], errors, _log(out), s3.url(victim)


@pytest.mark.slow
def test_shard_deleted_mid_run_two_ranks_skip(s3_server, shards, tmp_path):
    codes, errors, rows, url = _two_ranks_deleting(s3_server, shards, tmp_path, "skip")
    assert codes == [0, 0], errors
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # summed over ranks; counted with the first sample after the skip, in step 3's batch
    assert [r["shards_skipped"] for r in rows] == [0, 0, 1, 1]
    assert "skipping shard" in errors[0] and url in errors[0] and "no such object" in errors[0]
    assert "skipping shard" not in errors[1]


@pytest.mark.slow
def test_shard_deleted_mid_run_two_ranks_fail(s3_server, shards, tmp_path):
    t0 = time.monotonic()
    codes, errors, rows, url = _two_ranks_deleting(s3_server, shards, tmp_path, "fail")
    assert codes == [1, 1], errors
    assert time.monotonic() - t0 < 120
    assert len(rows) == 2  # steps 1 and 2; step 3 needed the deleted shard
    assert f"error: rank 0: cannot read shard: FileNotFoundError: {url}: no such object" in errors[0], errors[0]
    assert "error: rank 1: stopping because rank(s) [0] failed to read data" in errors[1], errors[1]
    assert not any("Traceback" in e for e in errors), errors


def test_wrong_credentials_fail_fast_naming_the_url(s3_server, shards, tmp_path, monkeypatch, capsys):
    _upload(s3_server, shards, "coco")
    with s3_server.require_auth() as (key_id, _secret):
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
        for spec in (s3_server.url("coco", schema.MANIFEST_NAME), s3_server.url("coco") + "/"):
            t0 = time.monotonic()
            code, err = _main(capsys, *FAST, "--data", spec, "--out", str(tmp_path / "o"))
            out = capsys.readouterr().out
            assert code == 1, err
            assert time.monotonic() - t0 < 30  # refused access is not retried
            assert f"s3://{s3_server.bucket}/coco" in err and "access denied" in err, err
            assert SECRET not in err + out and "Traceback" not in err
    assert _log(tmp_path / "o") == []
