"""The Ray executor on a real local Ray cluster: output byte-identical to the local executor's (in process and through
`prep … --executor ray --ray-address` as a second driver), retries of dead workers and transient errors, final
failures named, Ray never imported unless chosen, and every process of a local instance (this module's, and the
one prep starts for itself) listening on 127.0.0.1 only.

One cluster for the module (Ray takes ~10 s to start on 2 busy cores), owned by this process: ``ray.shutdown()``
stops every process it started, and the teardown checks that none is left.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import socket
import subprocess
import sys

import pytest
from click.testing import CliRunner
from test_run import assert_same_output, parquet_rows, shard_files, small_cfg, write_images

from prep import ray_executor
from prep import run as prep_run
from prep.cli import prep
from prep.tasks import TasksFailed
from shards import schema

pytestmark = pytest.mark.slow  # the cluster start alone takes ~10 s

ray = pytest.importorskip("ray")
psutil = pytest.importorskip("psutil")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def cluster():
    """A local Ray instance with 2 CPUs; yields its address. Token auth (Ray's default for a new cluster) with a token
    of this session only, in the environment, so a second driver started by a test can join it and nobody else can.
    RAY_AUTH_MODE is left unset: Ray reads it once per process, and sets it to token itself for a new cluster."""
    # every Ray process inherits this environment: a fake AWS identity for moto (as each node of a real cluster has its
    # own credentials), but no S3 endpoint (that must reach the workers from `--s3-endpoint`)
    fake_aws = dict(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_CONFIG_FILE=os.devnull,
        AWS_SHARED_CREDENTIALS_FILE=os.devnull,
        AWS_EC2_METADATA_DISABLED="true",
    )
    unset = ("RAY_ADDRESS", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "S3_ENDPOINT_URL")
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", *unset, *fake_aws)}
    os.environ.update(RAY_AUTH_TOKEN=secrets.token_hex(32), **fake_aws)
    for k in unset:
        os.environ.pop(k, None)
    # the way prep starts its own instance: every process listens on 127.0.0.1 only
    ctx = ray_executor.init_local(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    pids = ray_pids()
    # the test module's functions go to the workers by value: tests/ is not on their sys.path
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        yield ctx.address_info["gcs_address"]
    finally:
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
        # Ray's processes and what they started (workers, their forkservers and shard processes)
        procs = {
            p
            for pid in pids
            if psutil.pid_exists(pid)
            for p in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
        }
        ray.shutdown()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _, alive = psutil.wait_procs(list(procs), timeout=20)
        for p in alive:  # only the processes of this cluster, by pid
            p.kill()
        assert not alive, f"Ray processes still running after shutdown: {[p.pid for p in alive]}"


def ray_pids() -> list[int]:
    """Processes of the Ray instance this process is connected to (GCS, raylet, agents, monitor …)."""
    return [p.process.pid for procs in ray._private.worker._global_node.all_processes.values() for p in procs]


def listening(pids) -> list[tuple[str, str, int]]:
    """(process name, address, port) of every listening TCP/UDP socket of ``pids`` and of all their descendants."""
    procs = {
        p
        for pid in pids
        if psutil.pid_exists(pid)
        for p in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    }
    found = []
    for p in procs:
        try:
            found += [
                (p.name(), c.laddr.ip, c.laddr.port)
                for c in p.net_connections(kind="inet")
                if c.status == psutil.CONN_LISTEN or (c.type == socket.SOCK_DGRAM and not c.raddr)
            ]
        except psutil.NoSuchProcess:  # a worker that exited meanwhile listens on nothing
            pass
    return sorted(found)


def assert_loopback(found) -> None:
    names = " ".join(name for name, _, _ in found)
    assert "gcs_server" in names and "raylet" in names and "ray::" in names, found  # the check saw Ray's servers
    outside = [f for f in found if not ipaddress.ip_address(f[1].removeprefix("::ffff:")).is_loopback]
    assert not outside, f"Ray processes listening beyond the loopback interface: {outside}"


# prep's own local instance (run_tasks without an address), inspected from inside its last moment: ray.shutdown
LOCAL_INSTANCE = """
import json, sys
import ray
from prep import ray_executor
from prep.run import ShardTask
sys.path.insert(0, "tests")
from test_ray import listening, ray_pids
seen = []
shutdown = ray.shutdown
def inspect_then_shutdown(*args, **kwargs):
    import os
    seen.extend(listening([*ray_pids(), os.getpid()]))
    shutdown(*args, **kwargs)
ray.shutdown = inspect_then_shutdown
tasks = [ShardTask(i, f"t-{i:06d}", ()) for i in range(4)]
assert ray_executor.run_tasks(tasks, lambda task, tick: task.name, workers=2, progress=False) == [t.name for t in tasks]
print(json.dumps(seen))
"""


def test_local_instances_listen_on_loopback_only(cluster):
    # this module's instance, started as prep starts its own (and this driver's own servers)
    assert_loopback(listening([*ray_pids(), os.getpid()]))
    # prep's own instance, in a driver that was given no address (RAY_ADDRESS is unset for this module)
    r = subprocess.run(
        [sys.executable, "-c", LOCAL_INSTANCE],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=REPO),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert_loopback([tuple(f) for f in json.loads(r.stdout.strip().splitlines()[-1])])


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> str:
    return write_images(str(tmp_path_factory.mktemp("images")), 10)


@pytest.fixture(scope="module")
def reference(images, tmp_path_factory) -> str:
    """The local executor's output (4 shards of 3, 3, 3, 1 images). Worker processes, not in process: this process
    is a Ray driver, and Ray's threads call the C library's rand() that selective search draws from."""
    out = str(tmp_path_factory.mktemp("ref") / "out")
    prep_run.run(small_cfg(images), out, workers=2, progress=False)
    return out


def test_ray_output_is_byte_identical_to_local(cluster, images, reference, tmp_path):
    out = str(tmp_path / "ray")
    result = prep_run.run(small_cfg(images), out, workers=2, executor="ray", progress=True)
    assert len(result.written) == 4 and result.manifest is not None
    assert_same_output(reference, out)


def flaky(out, cfg, marks, fault, target, task, tick):
    """``run_task``, except that the first ``fault[1]`` attempts at shard ``target`` fail as ``fault[0]`` says.
    Attempts are counted in files: every attempt runs in a fresh or reused worker process."""
    path = os.path.join(marks, task.name)
    with open(path, "a") as f:
        f.write("x")
    attempt = os.path.getsize(path)
    kind, times = fault
    if task.name == target and attempt <= times:
        if kind == "die":
            os._exit(9)  # what a segfault or an OOM kill of the shard's process looks like
        if kind == "kill-ray-worker":
            # the Ray worker above this process (its forkserver's parent) dies, as on a lost node
            worker = next(p for p in psutil.Process().parents() if p.name().startswith("ray::"))
            worker.kill()
            os._exit(9)
        if kind == "connection":
            raise ConnectionResetError(f"upload of {task.name} reset by peer")
        raise ValueError(f"bad record in {task.name}")
    return prep_run.run_task(out, cfg, task, tick)


def attempts(marks, name: str) -> int:
    return os.path.getsize(os.path.join(marks, name))


@pytest.mark.parametrize("fault", [("die", 1), ("connection", 2), ("kill-ray-worker", 1)])
def test_dead_workers_and_transient_errors_are_retried(cluster, images, reference, tmp_path, fault):
    out, marks = str(tmp_path / "out"), tmp_path / "marks"
    marks.mkdir()
    cfg = small_cfg(images)
    tasks = prep_run.plan(prep_run.load_source_for(cfg).records, cfg)
    prep_run.run(cfg, out, part=(1, 2), workers=2, progress=False)  # run config; shards 1, 3 by the local executor

    todo = prep_run.select_part(tasks, (0, 2))
    results = ray_executor.run_tasks(
        todo, lambda t, tick: flaky(out, cfg, str(marks), fault, "folder-000002", t, tick), progress=False
    )
    assert [r["shard"] for r in results] == ["folder-000000", "folder-000002"]
    assert attempts(marks, "folder-000002") == fault[1] + 1 and attempts(marks, "folder-000000") == 1
    prep_run.finalize(out)
    assert_same_output(reference, out)


def test_final_failures_are_named_and_the_other_shards_written(cluster, images, tmp_path):
    out, marks = str(tmp_path / "out"), tmp_path / "marks"
    marks.mkdir()
    cfg = small_cfg(images)
    tasks = prep_run.plan(prep_run.load_source_for(cfg).records, cfg)

    # a deterministic error is not retried: one attempt, reported with the remote traceback
    with pytest.raises(TasksFailed) as e:
        ray_executor.run_tasks(
            tasks,
            lambda t, tick: flaky(out, cfg, str(marks), ("value", 99), "folder-000001", t, tick),
            progress=False,
        )
    assert [n for n, _ in e.value.failures] == ["folder-000001"]
    assert "ValueError: bad record in folder-000001" in e.value.failures[0][1]
    assert attempts(marks, "folder-000001") == 1
    assert [r and r["shard"] for r in e.value.results] == ["folder-000000", None, "folder-000002", "folder-000003"]

    # a process that dies on every attempt: max_retries retries, then a failure naming the shard
    with pytest.raises(TasksFailed) as e:
        ray_executor.run_tasks(
            tasks[3:],
            lambda t, tick: flaky(out, cfg, str(marks), ("die", 99), "folder-000003", t, tick),
            progress=False,
            max_retries=1,
        )
    assert [n for n, _ in e.value.failures] == ["folder-000003"]
    assert "ShardProcessDied: process" in e.value.failures[0][1]
    assert "writing shard folder-000003 died (exit code 9)" in e.value.failures[0][1]
    assert attempts(marks, "folder-000003") == 1 + 2


# `prep` as a second driver, from a checkout that is not installed (as on a cluster that does not have prep): the
# prep and shards packages must travel with the job
NOT_INSTALLED = (
    "import sys; from prep import ray_executor; ray_executor._installed = lambda: False; "
    "from prep.cli import main; main(sys.argv[1:])"
)


def test_cli_joins_the_cluster_at_ray_address(cluster, images, reference, tmp_path, monkeypatch):
    monkeypatch.setattr(ray_executor, "_installed", lambda: False)
    assert [os.path.basename(p) for p in ray_executor.code_env(local=False)["py_modules"]] == ["prep", "shards"]
    monkeypatch.chdir(REPO)
    assert ray_executor.code_env(local=True) == {}  # Ray puts the driver's directory on its local workers' path

    out = tmp_path / "cli"
    # A second driver on this machine joins the loopback-only instance in Ray's single-machine mode; otherwise Ray
    # takes the machine's routable address for itself and for 127.0.0.1, where nothing of the instance listens.
    env = dict(os.environ, PYTHONPATH=REPO, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    args = [
        "folder",
        images,
        "--out",
        "cli",
        "--executor",
        "ray",
        "--ray-address",
        cluster,
        "--ss-max-side",
        "96",
        "--min-side",
        "8",
        "--shard-size",
        "3",
    ]  # a relative --out: workers run elsewhere
    r = subprocess.run(
        [sys.executable, "-c", NOT_INSTALLED, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    assert "4 shards written" in r.stderr and "manifest written: 10 inputs" in r.stderr
    assert "10/10" in r.stderr and "shards 4/4" in r.stderr  # the same progress bar, counting images
    assert_same_output(reference, str(out))
    session = ray._private.worker._global_node.get_session_dir_path()
    uploaded = os.listdir(os.path.join(session, "runtime_resources", "py_modules_files"))
    assert uploaded, "the packages were not uploaded with the job"

    r = subprocess.run(
        [sys.executable, "-m", "prep", *args[:4], "--ray-address", cluster],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2 and "--ray-address needs --executor ray" in r.stderr


def test_s3_output_with_the_endpoint_only_on_the_command_line(
    cluster, s3_server, images, reference, tmp_path, monkeypatch
):
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # the Ray workers never had it: only --s3-endpoint can tell them
    url = s3_server.url("ray")
    r = CliRunner().invoke(
        prep,
        [
            "folder",
            images,
            "--out",
            url,
            "--executor",
            "ray",
            "--s3-endpoint",
            s3_server,
            "--ss-max-side",
            "96",
            "--min-side",
            "8",
            "--shard-size",
            "3",
            "--no-progress",
        ],
    )
    assert r.exit_code == 0, r.output
    client = s3_server.client()
    for key in [o["Key"] for o in client.list_objects_v2(Bucket=s3_server.bucket, Prefix="ray/")["Contents"]]:
        (tmp_path / key).parent.mkdir(exist_ok=True)
        (tmp_path / key).write_bytes(client.get_object(Bucket=s3_server.bucket, Key=key)["Body"].read())
    got = str(tmp_path / "ray")
    assert shard_files(got, schema.TAR_SUFFIX) == shard_files(reference, schema.TAR_SUFFIX)
    assert parquet_rows(got) == parquet_rows(reference)
    assert os.path.exists(os.path.join(got, schema.MANIFEST_NAME))


def test_prep_does_not_import_ray_unless_chosen():
    code = "import sys, prep.cli, prep.run, prep.executors, shards.writer; print('ray' in sys.modules)"
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=REPO)
    )
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stderr
