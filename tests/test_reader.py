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


def test_resolve_gives_urls_and_sizes(out):
    expected = {str(out / n): i + 1 for i, n in enumerate(SHARDS)}
    assert reader.resolve(str(out / "manifest.json")).sizes == expected
    os.remove(out / "c-000001.stats.json")
    assert reader.resolve(str(out)).sizes == expected  # from the manifest inside the directory
    os.remove(out / "manifest.json")
    assert reader.expand_spec(str(out)) == list(expected)  # the listing
    assert reader.resolve(str(out)).sizes is None  # a shard without its stats file
    assert reader.resolve(str(out), sizes=False).sizes is None
    os.remove(out / "c-000001.tar")
    shards = reader.resolve(str(out))
    assert shards.urls == (str(out / SHARDS[0]), str(out / SHARDS[2]))
    assert shards.sizes == {str(out / SHARDS[0]): 1, str(out / SHARDS[2]): 3}  # the stats files
    (out / "c-000002.stats.json").write_text('{"samples": "three"}')
    with pytest.warns(RuntimeWarning, match="c-000002.stats.json: not a valid stats file"):
        assert reader.resolve(str(out)).sizes is None  # counted by reading instead


def test_resolve_reads_the_manifest_once_and_lists_once(out, monkeypatch):
    calls = []
    for name in ("read_bytes", "list_names"):
        real = getattr(storage, name)
        monkeypatch.setattr(storage, name, lambda url, _real=real, _name=name: calls.append(_name) or _real(url))
    shards = reader.resolve(str(out))
    assert calls == ["list_names", "read_bytes"] and len(shards.urls) == 3 and shards.sizes is not None


def test_resolve_refuses_brace_patterns_naming_no_file_and_pipes(tmp_path, monkeypatch):
    monkeypatch.delenv(storage.ALLOW_PIPE_ENV, raising=False)
    with pytest.raises(reader.SpecError, match="none of the 3 paths it names exists"):
        reader.resolve(f"{tmp_path}/x-{{0..2}}.tar")
    with pytest.raises(reader.SpecError, match="pipe: URLs run a shell command"):
        reader.resolve("pipe:cat x.tar")
    assert reader.resolve("pipe:cat x.tar", allow_pipe=True).urls == ("pipe:cat x.tar",)


@pytest.mark.parametrize(
    "entry",
    [
        "/etc/shards/c-000000.tar",
        "../c-000000.tar",
        "sub/../../c-000000.tar",
        "s3://other/c-000000.tar",
        "https://elsewhere.example/c-000000.tar",
        "pipe:cat /etc/passwd",
        "file:///etc/passwd",
        "./c-000000.tar",
        "",
    ],
)
def test_a_manifest_cannot_send_a_reader_elsewhere(out, entry):
    m = json.loads((out / "manifest.json").read_bytes())
    m["shards"][0]["tar"] = entry
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(
        reader.SpecError, match=r"manifest.json: shard entry .* is not a name inside the manifest's own"
    ) as e:
        reader.resolve(str(out))
    assert "--allow-manifest-outside" in str(e.value)
    if entry in ("/etc/shards/c-000000.tar", "../c-000000.tar"):  # the user's explicit choice: followed
        urls = reader.resolve(str(out), allow_manifest_outside=True).urls
        assert len(urls) == 3 and any(u.endswith(entry) for u in urls)


def test_a_manifest_below_its_directory_is_inside(out):
    (out / "sub").mkdir()
    os.rename(out / "c-000000.tar", out / "sub" / "c-000000.tar")
    m = json.loads((out / "manifest.json").read_bytes())
    m["shards"][0]["tar"] = "sub/c-000000.tar"
    (out / "manifest.json").write_text(json.dumps(m))
    assert str(out / "sub" / "c-000000.tar") in reader.resolve(str(out)).urls


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
    sizes = {u: i + 1 for i, u in enumerate(expected)}
    assert reader.resolve(base).sizes == reader.resolve(base + "/").sizes == sizes
    assert reader.expand_spec(base + "/*.tar") == expected
    assert reader.expand_spec(base + "/manifest.json") == expected
    assert reader.expand_spec(base + "/c-{000000..000002}.tar") == expected
    assert reader.resolve(base + "/").sizes == sizes
    with pytest.raises(reader.SpecError, match="no shards matched 's3://.*/nothing/'"):
        reader.expand_spec(s3_server.url("nothing/"))
    s3_server.client().delete_object(Bucket=s3_server.bucket, Key="run/manifest.json")
    assert reader.expand_spec(base) == reader.expand_spec(base + "/") == expected  # its listing
    assert reader.resolve(base).sizes == sizes  # its stats files


def test_expand_spec_http_manifest(out, http_server):
    server = http_server(out)
    expected = [server.url_for(n) for n in SHARDS]
    assert reader.expand_spec(server.url_for("manifest.json")) == expected
    assert reader.resolve(server.url_for("manifest.json")).sizes == dict(zip(expected, [1, 2, 3], strict=True))
    assert reader.resolve(server.url_for("c-{000000..000002}.tar")).sizes == dict(zip(expected, [1, 2, 3], strict=True))


# --- stages on plain lists -------------------------------------------------------------------------------------------
def members(*pairs):
    return [reader.Member(name, data, 512 * i) for i, (name, data) in enumerate(pairs)]


def meta_of(key: str, jpg: bytes = b"1", **change) -> bytes:
    meta = json.loads(
        schema.encode_meta(
            key=key, path=f"{key}.jpg", width=8, height=8, boxes=[[0, 0, 4, 4]], image_sha256=schema.image_sha256(jpg)
        )
    )
    return json.dumps({**meta, **change}).encode()


def outcome(items):
    """Delivered keys and (key, reason) of rejections, in order."""
    return [i["__key__"] if isinstance(i, dict) else (i.key, i.reason) for i in items]


def test_group_by_key_on_lists():
    ms = members(("a.jpg", b"1"), ("a.json", b"2"), ("dir/b.c.jpg", b"3"), ("dir/b.c.json", b"4"), ("README", b""))
    assert list(reader.group_by_key(ms[:2], "u")) == [{"__key__": "a", "__url__": "u", "jpg": b"1", "json": b"2"}]
    # the key ends at the first dot of the file name, as in WebDataset; a folder or no extension is no valid name
    assert outcome(reader.group_by_key(ms, "u")) == ["a", ("dir/b", "bad_name"), ("README", "bad_name")]
    assert reader.split_name("dir/b.c.jpg") == ("dir/b", "c.jpg")
    assert reader.split_name("x.JPG") == ("x", "jpg")


@pytest.mark.parametrize(
    "names, expected, detail",
    [
        (["a.jpg", "b.jpg", "b.json"], [("a", "missing_member"), "b"], "has no a.json"),
        (["a.json", "b.jpg", "b.json"], [("a", "missing_member"), "b"], "has no a.jpg"),
        (["b.jpg", "b.json", "a.jpg", "a.jpg", "a.json"], ["b", ("a", "duplicate_member")], "has 2 a.jpg members"),
        (["a.jpg", "a.json", "a.txt", "b.jpg", "b.json"], [("a", "unexpected_member"), "b"], "a member a.txt"),
        (["a.jpg", "b.jpg", "a.json", "b.json"], [("a", "missing_member"), ("b", "missing_member")], "has no a.json"),
        (["a.jpg", "a.json", "b.jpg", "b.json", "a.jpg", "a.json"], ["a", "b", ("a", "duplicate_member")], "again"),
        (["../a.jpg", "../a.json", "b.jpg", "b.json"], [("../a", "bad_name"), "b"], "'../a.jpg' is not KEY.jpg"),
        (["/abs/a.jpg", "b.jpg", "b.json"], [("/abs/a", "bad_name"), "b"], "is not KEY.jpg"),
        (["a.b.jpg", "a.b.json", "b.jpg", "b.json"], [("a", "unexpected_member"), "b"], "a member a.b.jpg"),
    ],
)
def test_a_bad_sample_costs_only_itself(names, expected, detail):
    ms = members(*[(n, meta_of(reader.split_name(n)[0]) if n.endswith(".json") else b"1") for n in names])
    items = list(reader.validate(reader.group_by_key(ms, "shard-url")))
    assert outcome(items) == expected
    first = next(i for i in items if isinstance(i, reader.Rejected))
    assert first.message.startswith(f"shard-url: sample {first.key!r}: ") and detail in first.message


def test_members_that_are_not_regular_files_or_too_large_cost_their_sample():
    ms = [
        reader.Member("a.jpg", None, 0, "a symbolic link, not a regular file"),
        reader.Member("a.json", meta_of("a"), 512),
        reader.Member(None, None, 1024, "1024 bytes at byte 1024 hold no valid tar header (skipped)"),
        reader.Member("b.jpg", b"1", 2048),
        reader.Member("b.json", meta_of("b"), 2560),
    ]
    items = list(reader.group_by_key(ms, "u"))
    assert outcome(items) == [(None, "damaged_tar"), ("a", "bad_member"), "b"]
    assert items[0].message == "u: tar: 1024 bytes at byte 1024 hold no valid tar header (skipped)"
    assert items[1].message == "u: sample 'a': 'a.jpg' is a symbolic link, not a regular file"


def test_group_by_key_yields_the_complete_sample_before_an_error():
    def cut_after_b():
        yield from members(("a.jpg", b"1"), ("a.json", b"2"), ("b.jpg", b"3"), ("b.json", b"4"), ("c.jpg", b"5"))
        raise tarfile.ReadError("cut")

    got = []
    with pytest.raises(tarfile.ReadError):
        for item in reader.group_by_key(cut_after_b(), "u"):
            got.append(item["__key__"])
    assert got == ["a", "b"]  # b is whole; c is not delivered


def test_validate_checks_the_rule_and_the_image_hash():
    samples = [
        {"__key__": "a", "__url__": "u", "jpg": b"1", "json": meta_of("a")},
        {"__key__": "b", "__url__": "u", "jpg": b"1", "json": meta_of("b", boxes=[[0, 0, 9, 4]])},
        {"__key__": "c", "__url__": "u", "jpg": b"other", "json": meta_of("c")},
        {"__key__": "d", "__url__": "u", "jpg": b"1", "json": meta_of("x")},
    ]
    assert outcome(reader.validate(samples)) == ["a", ("b", "bad_boxes"), "c", ("d", "bad_meta")]
    items = list(reader.validate(samples, verify_images=True))
    assert outcome(items) == ["a", ("b", "bad_boxes"), ("c", "image_sha256"), ("d", "bad_meta")]
    assert items[0]["meta"]["boxes"].dtype == np.int32 and items[0]["meta"]["boxes"].shape == (1, 4)
    assert items[2].message == "u: sample 'c': c.jpg does not have the SHA-256 recorded in c.json (damaged in storage)"
    with pytest.raises(reader.ShardError, match="u: sample 'b': box 0"):
        list(reader.accepted(reader.validate(samples), None))  # without a callback: the first one raised


def _tar(*entries) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data, kind in entries:
            info = tarfile.TarInfo(name)
            info.type, info.size, info.mtime = kind, len(data), 1.5  # a float mtime: a PAX header per member
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    return buf.getvalue()


def test_tar_members_reads_pax_and_gnu_names_and_flags_other_types():
    data = _tar(
        ("d", b"", tarfile.DIRTYPE), ("k" * 120 + ".json", b"{}", tarfile.REGTYPE), ("l.jpg", b"", tarfile.SYMTYPE)
    )
    got = [(m.name, m.data, m.problem) for m in reader.tar_members(io.BytesIO(data))]
    assert got == [
        ("d", None, "a directory, not a regular file"),
        ("k" * 120 + ".json", b"{}", None),
        ("l.jpg", None, "a symbolic link, not a regular file"),
    ]
    gnu = io.BytesIO()
    with tarfile.open(fileobj=gnu, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo("g" * 150 + ".jpg")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    assert [(m.name, m.data) for m in reader.tar_members(io.BytesIO(gnu.getvalue()))] == [("g" * 150 + ".jpg", b"abc")]


def test_tar_members_resynchronises_after_a_damaged_header():
    data = bytearray(_tar(*[(f"{k}.{e}", b"x" * 700, tarfile.REGTYPE) for k in "abc" for e in ("jpg", "json")]))
    offsets = [m.offset for m in reader.tar_members(io.BytesIO(bytes(data)))]
    data[offsets[2] + 3] ^= 1  # b.jpg's own header (its PAX header before it is intact): its checksum fails
    got = [(m.name, m.problem) for m in reader.tar_members(io.BytesIO(bytes(data)))]
    assert [n for n, _ in got] == ["a.jpg", "a.json", None, "b.json", "c.jpg", "c.json"]
    assert "hold no valid tar header (skipped)" in got[2][1]


def test_tar_members_skips_a_member_over_its_limit_without_reading_it_into_memory():
    data = _tar(("a.json", b"x" * 3000, tarfile.REGTYPE), ("a.jpg", b"y" * 100, tarfile.REGTYPE))
    got = [(m.name, m.data, m.problem) for m in reader.tar_members(io.BytesIO(data), limit=lambda name: 1000)]
    assert got == [("a.json", None, "3000 bytes, over the limit of 1000"), ("a.jpg", b"y" * 100, None)]


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


# --- whole shards from every place -----------------------------------------------------------------------------------
def comparable(samples):
    return [(s["__key__"], s["jpg"], s["json"], s["meta"]["boxes"].tolist()) for s in samples]


def test_read_shard_local_http_s3_identical(out, http_server, s3_server):
    shard = "c-000002.tar"
    written = write_tiny_shard(out / shard, n=5)
    local = list(reader.read_shard(str(out / shard)))
    assert [(s["__key__"], s["jpg"], s["json"]) for s in local] == written
    assert local[0]["__url__"] == str(out / shard)
    server = http_server(out)
    server.drop_after(700, times=2)  # and resume mid-shard
    over_http = list(reader.read_shard(server.url_for(shard), backoff=0.01))
    over_s3 = list(reader.read_shard(upload(out, s3_server) + "/" + shard))
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
    assert reader.expand_spec(url, allow_pipe=True) == [url]
    with pytest.raises(reader.SpecError, match="pipe: URLs run a shell command"):
        reader.expand_spec(url)
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
