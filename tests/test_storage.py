"""shards.storage against the real things: local files, moto's S3 server, an HTTP server with injected faults."""

import os
import subprocess
import sys
import threading
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shards import storage

FAST = {"retries": 5, "backoff": 0.05, "timeout": 5}


@pytest.fixture(params=["local", "s3"])
def base(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "out")
    return request.getfixturevalue("s3_server").url("out")


def test_round_trip(base, tmp_path):
    storage.makedirs(base)
    assert storage.list_names(base) == []
    url = storage.join(base, "a.json")
    assert not storage.exists(url)
    storage.write_bytes(url, b"one")
    storage.write_bytes(url, b"two")  # replaces whole
    assert storage.read_bytes(url) == b"two" and storage.exists(url)

    os.makedirs(storage.staging_dir(base), exist_ok=True)
    staged = os.path.join(storage.staging_dir(base), ".b.bin.tmp")
    with open(staged, "wb") as f:
        f.write(b"x" * 100_000)
    storage.put_file(staged, storage.join(base, "b.bin"))
    assert not os.path.exists(staged)  # consumed
    assert storage.read_bytes(storage.join(base, "b.bin")) == b"x" * 100_000

    # names directly under the prefix only; no temporary files left behind by atomic writes
    storage.makedirs(storage.join(base, "sub"))
    storage.write_bytes(storage.join(base, "sub", "c"), b"")
    assert storage.list_names(base) == ["a.json", "b.bin"]
    assert storage.list_names(base + "/") == ["a.json", "b.bin"]

    storage.remove(url)
    storage.remove(url)  # absent: no error
    assert storage.list_names(base) == ["b.bin"]
    with pytest.raises(FileNotFoundError, match="a.json"):
        storage.read_bytes(url)


def test_arrow_filesystem_reads_parquet(base, tmp_path):
    storage.makedirs(base)
    table = pa.table({"key": ["a", "b"], "n": [1, 2]})
    pq.write_table(table, tmp_path / "t.parquet")
    url = storage.join(base, "t.parquet")
    storage.put_file(str(tmp_path / "t.parquet"), url)
    fs, path = storage.arrow_filesystem(url)
    assert pq.read_table(path, filesystem=fs).equals(table)


def test_endpoint_from_configure_overrides_env(s3_server, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    storage.configure(endpoint_url=str(s3_server))
    assert storage.list_names(s3_server.url()) == []


def test_s3_missing_fails_fast(s3_server):
    url = s3_server.url("nope.tar")
    t = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="s3://.*/nope.tar"):
        storage.open_stream(url)
    assert time.perf_counter() - t < 2
    assert not storage.exists(url)
    with pytest.raises(FileNotFoundError, match="bucket does not exist"):
        storage.list_names("s3://no-such-bucket/x")


def test_wrong_credentials_clear_error_without_secret(s3_server, monkeypatch):
    url = s3_server.url("a.bin")
    s3_server.client().put_object(Bucket=s3_server.bucket, Key="a.bin", Body=b"data")
    with s3_server.require_auth() as (key_id, secret):
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
        assert storage.read_bytes(url) == b"data"
        wrong = "WRONGsecretWRONGsecretWRONGsecret0123456"
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
        for call in (storage.read_bytes, storage.exists, storage.list_names, lambda u: storage.write_bytes(u, b"")):
            with pytest.raises(PermissionError) as info:
                call(url)
            msg = str(info.value)
            assert "a.bin" in msg and "credentials" in msg and wrong not in msg and secret not in msg
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAUNKNOWNKEY000000")
        with pytest.raises(PermissionError, match="access denied"):
            storage.open_stream(url)


def test_http_read_only(http_server, tmp_path):
    (tmp_path / "f.bin").write_bytes(b"hello")
    server = http_server(tmp_path)
    url = server.url_for("f.bin")
    assert storage.read_bytes(url) == b"hello"
    assert storage.exists(url) and not storage.exists(server.url_for("nope"))
    with pytest.raises(NotImplementedError, match="no listing"):
        storage.list_names(server.url + "/")
    with pytest.raises(NotImplementedError, match="read-only"):
        storage.write_bytes(url, b"x")


@pytest.fixture
def big_file(tmp_path):
    data = os.urandom(3_000_000)
    (tmp_path / "big.bin").write_bytes(data)
    return data


def test_http_resumes_after_connection_drops(http_server, tmp_path, big_file):
    server = http_server(tmp_path)
    server.drop_after(700_000, times=3)
    with storage.open_stream(server.url_for("big.bin"), **FAST) as f:
        assert f.read() == big_file
    ranges = [r for _, _, r in server.log]
    assert ranges[0] is None and len(ranges) == 4
    # each retry asks for the rest, from where the previous connection broke
    offsets = [int(r[len("bytes=") : -1]) for r in ranges[1:]]
    assert offsets == sorted(offsets) and 0 < offsets[0] <= 700_000 and offsets[-1] <= 3 * 700_000


def test_http_retries_5xx_then_gives_up_naming_url(http_server, tmp_path, big_file):
    server = http_server(tmp_path)
    url = server.url_for("big.bin")
    server.fail(2, status=503)
    assert storage.open_stream(url, **FAST).read() == big_file
    server.fail(100)
    with pytest.raises(storage.StreamError, match=r"big\.bin: giving up after 3 tries.*HTTP 500"):
        storage.open_stream(url, retries=2, backoff=0.01)


def test_http_gives_up_mid_stream(http_server, tmp_path, big_file):
    server = http_server(tmp_path)
    server.drop_after(100_000)
    with storage.open_stream(server.url_for("big.bin"), retries=2, backoff=0.5) as f:
        server.fail(100)  # before the readahead thread's first retry, 0.5 s after the drop
        with pytest.raises(storage.StreamError, match=r"big\.bin: giving up after 3 tries at byte [1-9]"):
            f.read()


def test_http_404_fails_fast(http_server, tmp_path):
    server = http_server(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope.tar"):
        storage.open_stream(server.url_for("nope.tar"), retries=5, backoff=10)
    assert server.requests == 1


def test_http_survives_server_restart_mid_stream(http_server, tmp_path):
    data = os.urandom(12_000_000)  # more than loopback socket buffers hold, so the stop hits mid-body
    (tmp_path / "big.bin").write_bytes(data)
    server = http_server(tmp_path)
    # no readahead: the stop must hit while this test holds the stream, not after a thread has read it all
    with storage.open_stream(server.url_for("big.bin"), retries=6, backoff=0.1, timeout=5, readahead=0) as f:
        head = f.read(1000)
        server.stop()
        threading.Timer(0.3, server.start).start()
        assert head + f.read() == data
    assert server.log[-1][2] is not None  # the last request resumed with a Range


def test_http_object_changed_while_reading(http_server, tmp_path, big_file):
    server = http_server(tmp_path)
    server.drop_after(200_000)
    with storage.open_stream(server.url_for("big.bin"), **FAST, readahead=0) as f:
        f.read(10)
        (tmp_path / "big.bin").write_bytes(big_file[:-1000])
        with pytest.raises(storage.StreamError, match="changed while being read"):
            f.read()


def test_s3_resumes_after_connection_drops(s3_server, tcp_proxy, big_file):
    s3_server.client().put_object(Bucket=s3_server.bucket, Key="big.bin", Body=big_file)
    proxy = tcp_proxy(int(s3_server.rsplit(":", 1)[1]))
    storage.configure(endpoint_url=proxy.url)
    proxy.cut_after(500_000, times=2)
    with storage.open_stream(s3_server.url("big.bin"), **FAST) as f:
        assert f.read() == big_file
    assert proxy.connections == 3


def test_s3_retries_while_server_is_down(s3_server, moto_server, big_file):
    url = s3_server.url("big.bin")
    storage.write_bytes(url, big_file)
    moto_server.stop()
    with pytest.raises(storage.StreamError, match=r"s3://.*big\.bin: giving up after 2 tries"):
        storage.open_stream(url, retries=1, backoff=0.01, timeout=2)
    threading.Timer(0.5, moto_server.start).start()
    with storage.open_stream(url, retries=6, backoff=0.1, timeout=5) as f:
        assert f.read() == big_file


def test_redact_hides_userinfo_and_query():
    assert storage.redact("https://me:pw@host/x.tar?X-Amz-Signature=abc") == "https://host/x.tar?…"
    assert storage.redact("s3://b/k") == "s3://b/k" and storage.redact("/a/b") == "/a/b"


def test_pipe_needs_opt_in(tmp_path, monkeypatch):
    (tmp_path / "f").write_bytes(b"piped")
    url = f"pipe:cat {tmp_path / 'f'}"
    monkeypatch.delenv(storage.ALLOW_PIPE_ENV, raising=False)
    with pytest.raises(PermissionError, match="shell command.*allow"):
        storage.open_stream(url)
    with storage.open_stream(url, allow_pipe=True) as f:
        assert f.read() == b"piped"
    monkeypatch.setenv(storage.ALLOW_PIPE_ENV, "1")
    assert storage.read_bytes(url) == b"piped"
    with pytest.raises(OSError, match="exited with status 3"):
        storage.read_bytes("pipe:exit 3")


def test_no_torch_import():
    code = "import sys, shards.storage, shards.reader; sys.exit('torch' in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))


def test_atomic_file_keeps_the_old_content_on_error_and_follows_the_umask(tmp_path, umask):
    umask(0o027)
    path = str(tmp_path / "f.json")
    storage.write_bytes(path, b"old")
    with pytest.raises(RuntimeError), storage.atomic_file(path) as f:
        f.write(b"half")
        raise RuntimeError("killed mid-write")
    assert (tmp_path / "f.json").read_bytes() == b"old" and os.listdir(tmp_path) == ["f.json"]
    with storage.atomic_file(path) as f:
        f.write(b"new")
    assert (tmp_path / "f.json").read_bytes() == b"new" and os.stat(path).st_mode & 0o777 == 0o640


def test_put_file_across_filesystems_copies_atomically(tmp_path, umask, monkeypatch):
    # a staging directory on another filesystem than the output: rename fails with EXDEV, the copy must still
    # appear whole under the final name with the umask's permissions, and leave no temporary file
    import errno

    umask(0o027)
    stage, out = tmp_path / "stage", tmp_path / "out"
    stage.mkdir()
    out.mkdir()
    (stage / "a.tar").write_bytes(b"x" * 100_000)
    replace = os.replace

    def cross_device(src, dst):
        if os.path.dirname(src) == str(stage):
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        replace(src, dst)

    monkeypatch.setattr(os, "replace", cross_device)
    storage.put_file(str(stage / "a.tar"), str(out / "a.tar"))
    assert os.listdir(stage) == [] and os.listdir(out) == ["a.tar"]
    assert (out / "a.tar").read_bytes() == b"x" * 100_000 and os.stat(out / "a.tar").st_mode & 0o777 == 0o640


def test_staging_dir_is_one_per_output():
    # the shard writer builds files there and a rerun removes what a killed run left: same directory every call
    url = "s3://bucket/run"
    assert storage.staging_dir(url) == storage.staging_dir(url + "/") != storage.staging_dir("s3://bucket/other")
    assert storage.staging_dir("/data/out") == "/data/out"  # local: beside the final files, so moving is a rename
