"""shards.reader: spec expansion in every form, the generator stages on plain lists, shards read from disk, HTTP, S3."""

import hashlib
import io
import json
import os
import tarfile

import numpy as np
import pytest

from shards import reader, schema, storage
from tests.servers import write_tiny_shard
from tests.wait import wait_until


def test_expand_braces():
    assert reader.expand_braces("out/c-{000000..000002}.tar") == [f"out/c-00000{i}.tar" for i in range(3)]
    assert reader.expand_braces("{8..10}") == ["8", "9", "10"]
    assert reader.expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    assert reader.expand_braces("x{y}z") == ["x{y}z"]


@pytest.fixture
def out(tmp_path):
    """A finished output: 3 shards with stats files, a manifest, and litter that is not a shard."""
    stats = []
    for i in range(3):
        name = schema.shard_name("c", i)
        write_tiny_shard(tmp_path / f"{name}.tar", n=i + 1, prefix=f"s{i}_")
        stats.append(
            {"shard": name, "samples": i + 1, "inputs": i + 1, "failed": {}, "few_boxes": 0, "boxes": 0, "tar_bytes": 0}
        )
        (tmp_path / f"{name}.stats.json").write_bytes(schema.dumps(stats[-1]))
    manifest = schema.make_manifest(config={}, versions={}, classes=None, stats=stats)
    (tmp_path / "manifest.json").write_bytes(schema.dumps(manifest))
    (tmp_path / ".c-000003.tar.tmp.tar").write_bytes(b"partial")  # a writer's temporary file
    (tmp_path / "c-000000.parquet").write_bytes(b"")
    return tmp_path


def names(urls):
    return [storage.basename(u) for u in urls]


SHARDS = ["c-000000.tar", "c-000001.tar", "c-000002.tar"]


def test_expand_spec_local_forms(out):
    assert reader.expand_spec(str(out)) == [str(out / n) for n in SHARDS]
    assert names(reader.expand_spec(f"{out}/c-{{000000..000002}}.tar")) == SHARDS
    assert names(reader.expand_spec(f"{out}/c-{{000002,000000}}.tar")) == [SHARDS[0], SHARDS[2]]
    assert names(reader.expand_spec(f"{out}/*.tar")) == SHARDS
    assert reader.expand_spec(str(out / "manifest.json")) == [str(out / n) for n in SHARDS]
    assert reader.expand_spec(str(out / "c-000001.tar")) == [str(out / "c-000001.tar")]


def test_expand_spec_relative_manifest(out, monkeypatch):
    monkeypatch.chdir(out)
    urls = reader.expand_spec("manifest.json")
    assert urls == reader.expand_spec(".")
    assert [os.path.isfile(u) for u in urls] == [True] * 3


@pytest.mark.parametrize("spec", ["{dir}/empty", "{dir}/x-*.tar", "{dir}/nope.tar"])
def test_expand_spec_nothing_matched(tmp_path, spec):
    (tmp_path / "empty").mkdir()
    spec = spec.format(dir=tmp_path)
    with pytest.raises(reader.SpecError, match="no shards matched") as info:
        reader.expand_spec(spec)
    assert spec in str(info.value)


def test_expand_spec_rejects_other_files(out):
    with pytest.raises(reader.SpecError, match="not a shard spec"):
        reader.expand_spec(str(out / "c-000000.parquet"))


def test_shard_sizes(out):
    expected = {str(out / n): i + 1 for i, n in enumerate(SHARDS)}
    assert reader.shard_sizes(str(out / "manifest.json")) == expected
    os.remove(out / "c-000001.stats.json")
    assert reader.shard_sizes(str(out)) == expected  # from the manifest inside the directory
    os.remove(out / "manifest.json")
    assert reader.expand_spec(str(out)) == list(expected)  # the listing
    assert reader.shard_sizes(str(out)) is None  # a shard without its stats file
    os.remove(out / "c-000001.tar")
    assert reader.shard_sizes(str(out)) == {str(out / SHARDS[0]): 1, str(out / SHARDS[2]): 3}  # the stats files


def test_a_manifest_inside_the_output_is_used(out):
    # a tar beside the manifest that the manifest does not list (another run's, a copy) is not read
    (out / "c-000009.tar").write_bytes((out / "c-000000.tar").read_bytes())
    for spec in (str(out), str(out) + "/"):
        assert names(reader.expand_spec(spec)) == SHARDS
    assert names(reader.expand_spec(f"{out}/*.tar")) == [*SHARDS, "c-000009.tar"]  # a glob still lists


def upload(out, s3_server):
    client = s3_server.client()
    for name in os.listdir(out):
        client.upload_file(str(out / name), s3_server.bucket, f"run/{name}")
    return s3_server.url("run")


def test_expand_spec_s3_forms(out, s3_server):
    base = upload(out, s3_server)
    expected = [f"{base}/{n}" for n in SHARDS]
    # the prefix as `prep --out` takes it, with or without the slash: its manifest
    assert reader.expand_spec(base) == reader.expand_spec(base + "/") == expected
    assert reader.shard_sizes(base) == reader.shard_sizes(base + "/") == {u: i + 1 for i, u in enumerate(expected)}
    assert reader.expand_spec(base + "/*.tar") == expected
    assert reader.expand_spec(base + "/manifest.json") == expected
    assert reader.expand_spec(base + "/c-{000000..000002}.tar") == expected
    assert reader.shard_sizes(base + "/") == {u: i + 1 for i, u in enumerate(expected)}
    with pytest.raises(reader.SpecError, match="no shards matched 's3://.*/nothing/'"):
        reader.expand_spec(s3_server.url("nothing/"))
    s3_server.client().delete_object(Bucket=s3_server.bucket, Key="run/manifest.json")
    assert reader.expand_spec(base) == reader.expand_spec(base + "/") == expected  # its listing
    assert reader.shard_sizes(base) == {u: i + 1 for i, u in enumerate(expected)}  # its stats files


def test_expand_spec_http_manifest(out, http_server):
    server = http_server(out)
    expected = [server.url_for(n) for n in SHARDS]
    assert reader.expand_spec(server.url_for("manifest.json")) == expected
    assert reader.shard_sizes(server.url_for("manifest.json")) == dict(zip(expected, [1, 2, 3], strict=True))
    assert reader.shard_sizes(server.url_for("c-{000000..000002}.tar")) == dict(zip(expected, [1, 2, 3], strict=True))


# --- stages on plain lists -------------------------------------------------------------------------------------------
def test_group_by_key_on_lists():
    members = [("a.jpg", b"1"), ("a.json", b"2"), ("dir/b.c.jpg", b"3"), ("dir/b.c.json", b"4"), ("README", b"")]
    # members without an extension are skipped; the key ends at the first dot of the file name, as in WebDataset
    assert list(reader.group_by_key(members[:2], "u")) == [{"__key__": "a", "__url__": "u", "jpg": b"1", "json": b"2"}]
    with pytest.raises(ValueError, match="u: sample 'dir/b' has no dir/b.jpg and no dir/b.json"):
        list(reader.group_by_key(members, "u"))
    assert list(reader.group_by_key([("x.jpg", b""), ("x.json", b""), ("README", b"")], "u"))[0]["__key__"] == "x"
    assert reader.split_name("dir/b.c.jpg") == ("dir/b", "c.jpg")
    assert reader.split_name("x.JPG") == ("x", "jpg")


@pytest.mark.parametrize(
    "members, message",
    [
        ([("a.jpg", b""), ("b.jpg", b""), ("b.json", b"")], "'a' has no a.json"),
        ([("a.json", b"")], "'a' has no a.jpg"),
        ([("a.jpg", b""), ("a.jpg", b""), ("a.json", b"")], "two 'jpg' members"),
    ],
)
def test_group_by_key_incomplete_sample(members, message):
    with pytest.raises(ValueError, match="shard-url.*" + message):
        list(reader.group_by_key(members, "shard-url"))


def test_tar_members_skips_non_files():
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.addfile(_dir("d"))
        info = tarfile.TarInfo("d/k.json")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
    buf.seek(0)
    assert list(reader.tar_members(buf)) == [("d/k.json", b"{}")]


def _dir(name):
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info


def test_metadata_of_both_format_versions():
    boxes = np.array([[0, 0, 4, 4]])
    v2 = json.loads(
        schema.encode_meta(
            key="k", path="k.jpg", width=8, height=8, boxes=boxes, image_sha256=schema.image_sha256(b"jpeg")
        )
    )
    assert v2["format_version"] == 2 and v2["image_sha256"] == hashlib.sha256(b"jpeg").hexdigest()
    v1 = {k: v for k, v in v2.items() if k != "image_sha256"} | {"format_version": 1}
    assert schema.decode_meta(json.dumps(v1).encode())["image_sha256"] is None  # version 1 has no hash
    assert schema.decode_meta(json.dumps(v2).encode())["image_sha256"] == v2["image_sha256"]
    for bad, match in (({**v2, "format_version": 3}, "format_version 3"), (v1 | {"format_version": 2}, "no image_sha")):
        with pytest.raises(ValueError, match=match):
            schema.decode_meta(json.dumps(bad).encode())
    with pytest.raises(ValueError, match="64 lowercase hex"):
        schema.encode_meta(key="k", path="k.jpg", width=8, height=8, boxes=boxes, image_sha256=b"jpeg")


def test_decode_adds_meta():
    meta = schema.encode_meta(
        key="k", path="k.jpg", width=8, height=8, boxes=np.array([[0, 0, 4, 4]]), image_sha256=schema.image_sha256(b"")
    )
    sample = reader.decode({"__key__": "k", "__url__": "u", "jpg": b"", "json": meta})
    assert sample["meta"]["boxes"].dtype == np.int32 and sample["meta"]["boxes"].shape == (1, 4)
    with pytest.raises(reader.ShardError, match="u: sample 'k': bad metadata"):
        reader.decode({"__key__": "k", "__url__": "u", "jpg": b"", "json": b"{}"})


# --- whole shards from every place -----------------------------------------------------------------------------------
def comparable(samples):
    return [(s["__key__"], s["jpg"], s["json"], s["meta"]["boxes"].tolist()) for s in samples]


def test_read_shard_local_http_s3_identical(out, http_server, s3_server):
    shard = "c-000002.tar"
    written = write_tiny_shard(out / shard, n=5)
    local = list(map(reader.decode, reader.read_shard(str(out / shard))))
    assert [(s["__key__"], s["jpg"], s["json"]) for s in local] == written
    assert local[0]["__url__"] == str(out / shard)
    server = http_server(out)
    server.drop_after(700, times=2)  # and resume mid-shard
    over_http = list(map(reader.decode, reader.read_shard(server.url_for(shard), backoff=0.01)))
    over_s3 = list(map(reader.decode, reader.read_shard(upload(out, s3_server) + "/" + shard)))
    assert comparable(over_http) == comparable(local) == comparable(over_s3)


def test_read_shard_errors_name_the_url(out):
    bad = out / "bad.tar"
    bad.write_bytes(b"not a tar" * 100)
    with pytest.raises(reader.ShardError, match="bad.tar: not a readable tar"):
        list(reader.read_shard(str(bad)))
    data = (out / "c-000002.tar").read_bytes()
    (out / "cut.tar").write_bytes(data[: len(data) // 2])
    with pytest.raises(reader.ShardError, match="cut.tar"):
        list(reader.read_shard(str(out / "cut.tar")))
    write_tiny_shard(out / "five.tar", n=5)  # 20480 bytes: two 10240-byte tar records
    (out / "cut.tar").write_bytes((out / "five.tar").read_bytes()[:10240])  # cut between members
    with pytest.raises(reader.ShardError, match="cut.tar: .*no end-of-archive marker"):
        list(reader.read_shard(str(out / "cut.tar")))
    with pytest.raises(FileNotFoundError, match="missing.tar"):
        list(reader.read_shard(str(out / "missing.tar")))


def write_large_shard(path, n: int, nbytes: int) -> list[str]:
    """A shard of ``n`` samples whose ``jpg`` member is ``nbytes`` of noise (the reader does not decode images)."""
    rng = np.random.default_rng(0)
    keys = [f"big{i:04d}" for i in range(n)]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for key in keys:
            jpg = rng.bytes(nbytes)
            meta = schema.encode_meta(
                key=key,
                path=f"{key}.jpg",
                width=8,
                height=8,
                boxes=np.array([[0, 0, 4, 4]]),
                image_sha256=schema.image_sha256(jpg),
            )
            for name, data in ((f"{key}.jpg", jpg), (f"{key}.json", meta)):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return keys


@pytest.mark.timeout(10)  # a hang fails here, in seconds, not at the suite's 600 s limit
def test_read_shard_closes_stream_when_stopped_early(tmp_path, http_server):
    # 30 MiB: far more than the read-ahead window (4 chunks of 1 MiB) and the socket buffers, so when the consumer
    # stops, the read-ahead thread is blocked on its full queue and most of the body is still unsent
    keys = write_large_shard(tmp_path / "big.tar", n=6, nbytes=5 << 20)
    server = http_server(tmp_path)
    samples = reader.read_shard(server.url_for("big.tar"))
    assert next(samples)["__key__"] == keys[0]
    samples.close()
    with pytest.raises(StopIteration):
        next(samples)
    # the read-ahead thread stopped and closed the half-read response rather than leaving it open (or parking it in
    # the connection pool): the server sees its one connection go
    wait_until(lambda: not server._connections, 5, "the server's connection to close after the reader stopped")
    assert server.requests == 1
    # the same URL again, through the same session's pool, reads whole
    assert [s["__key__"] for s in reader.read_shard(server.url_for("big.tar"))] == keys


def test_pipe_shard_needs_opt_in(out, monkeypatch):
    monkeypatch.delenv(storage.ALLOW_PIPE_ENV, raising=False)
    url = f"pipe:cat {out}/c-000001.tar"
    assert reader.expand_spec(url) == [url]
    with pytest.raises(PermissionError, match="pipe"):
        list(reader.read_shard(url))
    assert len(list(reader.read_shard(url, allow_pipe=True))) == 2


def test_manifest_format_version_checked(out):
    m = json.loads((out / "manifest.json").read_bytes())
    (out / "manifest.json").write_text(json.dumps({**m, "format_version": 1}))
    assert len(reader.expand_spec(str(out / "manifest.json"))) == len(m["shards"])  # version 1 is still read
    m["format_version"] = 99
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(reader.ShardError, match="manifest.json: not a valid manifest: format_version 99"):
        reader.expand_spec(str(out / "manifest.json"))


def test_read_shards_in_order_with_errors_handed_over(out, http_server):
    server = http_server(out)
    urls = [server.url_for(n) for n in SHARDS]
    one_by_one = [s["__key__"] for u in urls for s in reader.read_shard(u)]
    assert [s["__key__"] for s in reader.read_shards(urls, prefetch=2)] == one_by_one
    (out / "bad.tar").write_bytes(b"junk" * 1000)
    mixed = [urls[0], server.url_for("missing.tar"), server.url_for("bad.tar"), urls[2]]
    errors = []
    keys = [s["__key__"] for s in reader.read_shards(mixed, on_error=lambda u, e: errors.append((u, type(e))))]
    assert keys == [k for k in one_by_one if k.startswith(("s0_", "s2_"))]
    assert errors == [(mixed[1], FileNotFoundError), (mixed[2], reader.ShardError)]
    with pytest.raises(FileNotFoundError, match="missing.tar"):
        list(reader.read_shards(mixed))


def test_read_shards_stopped_early(out):
    samples = reader.read_shards(reader.expand_spec(str(out)), prefetch=2)
    assert next(samples)["__key__"] == "s0_0000"
    samples.close()
