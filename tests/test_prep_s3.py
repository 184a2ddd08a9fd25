"""`prep` with an s3:// output against a real S3 API (moto in server mode on 127.0.0.1): shards equal to a local run's,
stats/show/verify/finalize on the URL, resume of partial shards without rewriting done ones (bucket versioning counts
the PUTs), --overwrite limited to the run's objects, and a clear error for wrong credentials."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from imagegen import jpeg_bytes, textured_image

from prep.cli import prep
from shards import schema, storage

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--ss-max-side", "96", "--min-side", "8", "--shard-size", "2", "--no-progress"]
SHARDS = ["folder-000000", "folder-000001", "folder-000002"]
SECRET = "wr0ng-s3cr3t-never-print-me"


def invoke(*args):
    return CliRunner().invoke(prep, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("imgs")
    for i in range(5):
        (root / f"img_{i}.jpg").write_bytes(jpeg_bytes(textured_image(64, 48, seed=i)))
    return str(root)


@pytest.fixture(scope="module")
def local_run(images, tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("local") / "out"
    r = invoke("folder", images, "--out", out, "--workers", "1", *FAST)
    assert r.exit_code == 0, r.output
    return str(out)


def local_bytes(out: str, name: str) -> bytes:
    with open(os.path.join(out, name), "rb") as f:
        return f.read()


def get(s3, key: str) -> bytes:
    return s3.client().get_object(Bucket=s3.bucket, Key=key)["Body"].read()


def rows(data: bytes) -> list[dict]:
    return pq.read_table(io.BytesIO(data)).drop_columns(list(schema.NONDETERMINISTIC_COLUMNS)).to_pylist()


def keys(s3, prefix: str, **credentials) -> set[str]:
    resp = s3.client(**credentials).list_objects_v2(Bucket=s3.bucket, Prefix=prefix + "/")
    return {o["Key"][len(prefix) + 1 :] for o in resp.get("Contents", [])}


def assert_same_shards(s3, prefix: str, local: str) -> None:
    for name in SHARDS:
        assert get(s3, f"{prefix}/{name}.tar") == local_bytes(local, name + ".tar"), name
        assert rows(get(s3, f"{prefix}/{name}.parquet")) == rows(local_bytes(local, name + ".parquet")), name


def test_s3_output_equals_local_and_inspect_commands_read_it(s3_server, images, local_run, tmp_path, monkeypatch):
    url = s3_server.url("run")
    # the endpoint only on the command line: the forkserver workers of `--workers 2` must get it from the driver
    env = {k: v for k, v in os.environ.items() if k != "AWS_ENDPOINT_URL"}
    env["PYTHONPATH"] = REPO
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "prep",
            "folder",
            images,
            "--out",
            url,
            "--workers",
            "2",
            *FAST,
            "--s3-endpoint",
            s3_server,
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "3 shards written, 0 already done" in r.stderr and "manifest written: 5 inputs" in r.stderr

    assert keys(s3_server, "run") == {schema.RUN_CONFIG_NAME, schema.MANIFEST_NAME} | {
        n + s for n in SHARDS for s in (schema.TAR_SUFFIX, schema.PARQUET_SUFFIX, schema.STATS_SUFFIX)
    }
    assert_same_shards(s3_server, "run", local_run)
    assert get(s3_server, f"run/{schema.MANIFEST_NAME}") == local_bytes(local_run, schema.MANIFEST_NAME)
    stage = storage.staging_dir(url)
    assert not os.path.isdir(stage) or os.listdir(stage) == []  # everything staged was uploaded and removed

    monkeypatch.delenv("AWS_ENDPOINT_URL")
    endpoint = ["--s3-endpoint", s3_server]
    r = invoke("stats", url, *endpoint)
    assert r.exit_code == 0 and "counts add up" in r.output and "every input accounted for" in r.output, r.output
    r = invoke("show", url, "-n", "4", "-o", tmp_path / "grid.png", *endpoint)
    assert r.exit_code == 0 and "4 samples" in r.output and (tmp_path / "grid.png").stat().st_size > 1000
    r = invoke("verify", url, *endpoint)
    assert r.exit_code == 0 and "ok: 3 shards, 5 samples, 5 inputs" in r.output, r.output

    manifest = get(s3_server, f"run/{schema.MANIFEST_NAME}")
    s3_server.client().delete_object(Bucket=s3_server.bucket, Key=f"run/{schema.MANIFEST_NAME}")
    r = invoke("finalize", url, *endpoint)
    assert r.exit_code == 0 and f"{url}/{schema.MANIFEST_NAME}: 3 shards, 5 samples" in r.output, r.output
    assert get(s3_server, f"run/{schema.MANIFEST_NAME}") == manifest

    # damage one object: verify reports that shard and fails
    tar = get(s3_server, "run/folder-000001.tar")
    s3_server.client().put_object(Bucket=s3_server.bucket, Key="run/folder-000001.tar", Body=tar[: len(tar) // 2])
    r = invoke("verify", url, *endpoint)
    assert r.exit_code == 1 and "folder-000001: stats tar_bytes" in r.output and "1 problem" not in r.output, r.output
    assert "folder-000000" not in r.output and "folder-000002" not in r.output


def test_the_same_url_with_or_without_the_slash(s3_server, images, local_run):
    """What `prep --out` took, `prep stats/show/verify` and the reader (`python -m train --data`) take too."""
    from shards import reader

    url = s3_server.url("run")
    r = invoke("folder", images, "--out", url + "/", "--workers", "1", *FAST)
    assert r.exit_code == 0, r.output
    assert keys(s3_server, "run") == {schema.RUN_CONFIG_NAME, schema.MANIFEST_NAME} | {
        n + s for n in SHARDS for s in (schema.TAR_SUFFIX, schema.PARQUET_SUFFIX, schema.STATS_SUFFIX)
    }
    assert_same_shards(s3_server, "run", local_run)
    r = invoke("folder", images, "--out", url, "--workers", "1", *FAST)  # the same output: nothing to do
    assert r.exit_code == 0 and "0 shards written, 3 already done" in r.output, r.output
    tars = [f"{url}/{n}{schema.TAR_SUFFIX}" for n in SHARDS]
    for spec in (url, url + "/", local_run, local_run + "/"):
        r = invoke("stats", spec)
        assert r.exit_code == 0 and "every input accounted for" in r.output, (spec, r.output)
        r = invoke("verify", spec)
        assert r.exit_code == 0 and "ok: 3 shards, 5 samples" in r.output, (spec, r.output)
        r = invoke("show", spec, "-n", "2", "-o", os.path.join(local_run, "..", "grid.png"))
        assert r.exit_code == 0 and "2 samples" in r.output, (spec, r.output)
        if spec.startswith("s3://"):
            shards = reader.resolve(spec)
            assert list(shards.urls) == tars and shards.sizes == dict(zip(tars, [2, 2, 1], strict=True))


def test_resume_redoes_partial_shards_and_leaves_done_ones(s3_server, images, local_run):
    client, bucket = s3_server.client(), s3_server.bucket
    client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})  # counts every PUT
    url = s3_server.url("run")
    r = invoke("folder", images, "--out", url, "--workers", "1", *FAST)
    assert r.exit_code == 0, r.output

    # shard 0: its stats object lost (killed between the parquet and the stats upload);
    # shard 2: a truncated tar and no stats; both without a manifest, plus a temp file a killed writer left
    client.delete_object(Bucket=bucket, Key="run/folder-000000.stats.json")
    client.delete_object(Bucket=bucket, Key="run/folder-000002.stats.json")
    client.put_object(Bucket=bucket, Key="run/folder-000002.tar", Body=get(s3_server, "run/folder-000002.tar")[:700])
    client.delete_object(Bucket=bucket, Key=f"run/{schema.MANIFEST_NAME}")
    os.makedirs(storage.staging_dir(url), exist_ok=True)
    leftover = os.path.join(storage.staging_dir(url), ".folder-000002.tar.killed.tmp")
    with open(leftover, "wb") as f:
        f.write(b"partial")

    r = invoke("finalize", url)
    assert r.exit_code == 1 and "2 of 3 planned shards are not done: folder-000000, folder-000002" in r.output
    r = invoke("folder", images, "--out", url, "--workers", "1", *FAST)
    assert r.exit_code == 0, r.output
    assert "2 shards written, 1 already done" in r.output and "manifest written" in r.output
    assert not os.path.exists(leftover)

    versions = {}
    for v in client.list_object_versions(Bucket=bucket, Prefix="run/")["Versions"]:
        versions[v["Key"][len("run/") :]] = versions.get(v["Key"][len("run/") :], 0) + 1
    for suffix in (schema.TAR_SUFFIX, schema.PARQUET_SUFFIX, schema.STATS_SUFFIX):
        assert versions["folder-000001" + suffix] == 1  # the done shard was not written again
        assert versions["folder-000000" + suffix] == 2  # first run + redo
    assert versions["folder-000002.tar"] == 3  # first run, truncated, redo
    assert_same_shards(s3_server, "run", local_run)
    assert invoke("verify", url).exit_code == 0


def test_overwrite_deletes_only_the_runs_objects(s3_server, images):
    client, bucket = s3_server.client(), s3_server.bucket
    foreign = ["run/notes.txt", "run/other-000000.tar", "run/sub/folder-000000.tar"]
    for key in foreign:
        client.put_object(Bucket=bucket, Key=key, Body=b"not prep's")
    url = s3_server.url("run")
    assert invoke("folder", images, "--out", url, "--workers", "1", *FAST).exit_code == 0
    r = invoke("folder", images, "--out", url, "--workers", "1", *FAST, "--shard-size", "3")
    assert r.exit_code == 1 and "shard_size: 2 in the output, 3 now" in r.output and "--overwrite" in r.output

    r = invoke("folder", images, "--out", url, "--workers", "1", *FAST, "--shard-size", "3", "--overwrite")
    assert r.exit_code == 0 and "2 shards written, 0 already done" in r.output, r.output
    assert "folder-000002.tar" not in keys(s3_server, "run")  # the old plan's third shard is gone
    for key in foreign:
        assert get(s3_server, key) == b"not prep's"
    assert json.loads(get(s3_server, f"run/{schema.MANIFEST_NAME}"))["totals"]["shards"] == 2


def test_wrong_credentials_and_bad_outputs_fail_before_any_work(s3_server, images, monkeypatch):
    url = s3_server.url("run")
    with s3_server.require_auth() as (key_id, secret):
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG0")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
        for args in (["folder", images, "--out", url, "--workers", "1", *FAST], ["verify", url], ["stats", url]):
            r = invoke(*args)
            assert r.exit_code == 1, r.output
            assert f"s3://{s3_server.bucket}/run" in r.output and "access denied" in r.output, r.output
            assert SECRET not in r.output and "Traceback" not in r.output

        # the right credentials reach both layers (boto3 for objects, pyarrow for Parquet)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
        # (boto3's default session keeps the credentials it resolved first: name them)
        assert keys(s3_server, "run", aws_access_key_id=key_id, aws_secret_access_key=secret) == set()
        assert invoke("folder", images, "--out", url, "--workers", "1", *FAST).exit_code == 0
        r = invoke("stats", url)
        assert r.exit_code == 0 and "every input accounted for" in r.output, r.output
        assert secret not in r.output

    r = invoke("folder", images, "--out", "s3://no-such-bucket-here/x", "--workers", "1", *FAST)
    assert r.exit_code == 1 and "s3://no-such-bucket-here/x: bucket does not exist" in r.output
    r = invoke("folder", images, "--out", "https://example.com/x", "--workers", "1", *FAST)
    assert r.exit_code == 2 and "cannot write to https:// URLs" in r.output
    r = invoke("verify", "s3://no-such-bucket-here/x")
    assert r.exit_code == 1 and "bucket does not exist" in r.output
    r = invoke("stats", url, "--s3-endpoint", "127.0.0.1:9")
    assert r.exit_code == 2 and "http(s)://host[:port]" in r.output


def test_stats_reads_parquet_and_stats_objects_only(s3_server, local_run):
    # the output without its tars: stats needs none of them
    for name in os.listdir(local_run):
        if not name.endswith(schema.TAR_SUFFIX):
            s3_server.client().put_object(
                Bucket=s3_server.bucket, Key=f"meta/{name}", Body=local_bytes(local_run, name)
            )
    r = invoke("stats", s3_server.url("meta"), "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output) == json.loads(invoke("stats", local_run, "--json").output)
