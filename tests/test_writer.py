import io
import json
import os
import shutil
import subprocess
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from shards import schema
from shards.layout import is_done
from shards.writer import ShardWriter

NAME = "coco-000000"
CONFIG = {"kind": "coco", "mode": "fast", "seed": 0}


def tiny_jpeg(seed: int, size=(24, 16)) -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def samples(n=5, fail_every=3):
    """[(row, jpeg, meta)]: ok samples with boxes, every ``fail_every``-th input a failure row."""
    out = []
    for i in range(n):
        key, path = f"img_{i:03d}", f"dir/img {i}.v2.jpg"
        if i % fail_every == fail_every - 1:
            out.append((schema.make_row(key, path, "corrupt", error="truncated"), None, None))
            continue
        jpeg = tiny_jpeg(i)
        boxes = np.array([[0, 0, 24, 16], [2, 3, 10, 12], [5, 1, 20, 15]][: 1 + i % 3], dtype=np.int32)
        meta = schema.encode_meta(
            key=key, path=path, width=24, height=16, boxes=boxes, image_id=i, image_sha256=schema.image_sha256(jpeg)
        )
        row = schema.make_row(
            key,
            path,
            width=24,
            height=16,
            orig_width=24,
            orig_height=16,
            image_id=i,
            raw_boxes=10 + i,
            kept_boxes=len(boxes),
            boxes=boxes,
            ss_seconds=0.25,
            sha256="0" * 64,
        )
        out.append((row, jpeg, meta))
    return out


def write_shard(out, items, name=NAME, min_boxes=2):
    with ShardWriter(str(out), name, config=CONFIG, fingerprint="abc123", min_boxes=min_boxes) as w:
        for row, jpeg, meta in items:
            w.write(row, jpeg, meta)
    return w.stats


def test_round_trip_tarfile_and_stats(tmp_path):
    items = samples(7)
    stats = write_shard(tmp_path, items)
    assert sorted(os.listdir(tmp_path)) == [NAME + s for s in (".parquet", ".stats.json", ".tar")]
    assert is_done(str(tmp_path), NAME)

    ok = [(r, j, m) for r, j, m in items if j is not None]
    with tarfile.open(tmp_path / (NAME + ".tar")) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == [f"{r['key']}.{e}" for r, _, _ in ok for e in ("jpg", "json")]
        for m in members:
            assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode, m.isreg()) == (0, 0, 0, "", "", 0o644, True)
        for row, jpeg, meta in ok:
            assert tar.extractfile(row["key"] + ".jpg").read() == jpeg
            assert tar.extractfile(row["key"] + ".json").read() == meta  # stored as given: canonical bytes
            decoded = schema.decode_meta(meta)
            assert decoded["path"] == row["path"] and decoded["boxes"].tolist() == row["boxes"]

    on_disk = json.loads((tmp_path / (NAME + ".stats.json")).read_text())
    assert on_disk == stats
    assert stats["inputs"] == 7 and stats["samples"] == 5 and stats["failed"] == {"corrupt": 2}
    assert stats["few_boxes"] == sum(r["kept_boxes"] < 2 for r, j, _ in ok)
    assert stats["config"] == CONFIG and stats["fingerprint"] == "abc123" and stats["shard"] == NAME
    assert stats["tar_bytes"] == os.path.getsize(tmp_path / (NAME + ".tar"))
    assert stats["parquet_bytes"] == os.path.getsize(tmp_path / (NAME + ".parquet"))


def test_parquet_readable_by_pyarrow_duckdb_pandas(tmp_path):
    items = samples(6)
    write_shard(tmp_path, items)
    path = str(tmp_path / (NAME + ".parquet"))

    t = pq.read_table(path)
    assert t.schema.equals(schema.PARQUET_SCHEMA, check_metadata=False)
    assert t["key"].to_pylist() == [r["key"] for r, _, _ in items]  # failures included, input order
    expect_bytes = [len(j) if j else None for _, j, _ in items]
    assert t["image_bytes"].to_pylist() == expect_bytes  # filled in by the writer from the jpeg
    assert t["image_sha256"].to_pylist() == [schema.image_sha256(j) if j else None for _, j, _ in items]
    assert pq.ParquetFile(path).metadata.row_group(0).column(0).compression == "ZSTD"

    duckdb = pytest.importorskip("duckdb")
    con = duckdb.connect()
    rows = con.execute(
        f"SELECT status, count(*) FROM read_parquet('{path}') GROUP BY status ORDER BY status"
    ).fetchall()
    assert rows == [("corrupt", 2), ("ok", 4)]
    top = con.execute(f"SELECT boxes[1] FROM read_parquet('{path}') WHERE key = 'img_000'").fetchone()[0]
    assert top == [0, 0, 24, 16]

    pd = pytest.importorskip("pandas")
    df = pd.read_parquet(path)
    assert list(df["key"]) == [r["key"] for r, _, _ in items]
    assert df.loc[df.status == "corrupt", "error"].tolist() == ["truncated", "truncated"]


def test_webdataset_reads_the_tar(tmp_path):
    wds = pytest.importorskip("webdataset")
    items = samples(5)
    write_shard(tmp_path, items)
    got = list(wds.WebDataset(str(tmp_path / (NAME + ".tar")), shardshuffle=False))
    ok = [(r, j, m) for r, j, m in items if j is not None]
    assert [s["__key__"] for s in got] == [r["key"] for r, _, _ in ok]
    for s, (_, jpeg, meta) in zip(got, ok, strict=True):
        assert s["jpg"] == jpeg and s["json"] == meta
        assert set(s) - {"__key__", "__url__", "__local_path__"} == {"jpg", "json"}


@pytest.mark.skipif(shutil.which("tar") is None, reason="no tar binary")
def test_gnu_tar_lists_and_extracts(tmp_path):
    items = samples(4)
    write_shard(tmp_path / "out", items)
    tar_path = str(tmp_path / "out" / (NAME + ".tar"))
    listing = subprocess.run(["tar", "-tvf", tar_path], capture_output=True, text=True, check=True).stdout.splitlines()
    ok = [(r, j, m) for r, j, m in items if j is not None]
    assert [line.split()[-1] for line in listing] == [f"{r['key']}.{e}" for r, _, _ in ok for e in ("jpg", "json")]
    assert all(line.startswith("-rw-r--r--") for line in listing)
    dest = tmp_path / "x"
    dest.mkdir()
    subprocess.run(["tar", "-xf", tar_path, "-C", str(dest)], check=True)
    for row, jpeg, meta in ok:
        assert (dest / (row["key"] + ".jpg")).read_bytes() == jpeg
        assert (dest / (row["key"] + ".json")).read_bytes() == meta


def test_two_writers_byte_identical(tmp_path):
    items = samples(8)
    write_shard(tmp_path / "a", items)
    write_shard(tmp_path / "b", samples(8))
    for suffix in (".tar", ".parquet"):  # parquet too, here, because ss_seconds are equal
        assert (tmp_path / "a" / (NAME + suffix)).read_bytes() == (tmp_path / "b" / (NAME + suffix)).read_bytes()


def test_exception_inside_context_leaves_nothing(tmp_path):
    items = samples(4)
    with (
        pytest.raises(RuntimeError, match="boom"),
        ShardWriter(str(tmp_path), NAME, config=CONFIG, fingerprint="f", min_boxes=4) as w,
    ):
        for row, jpeg, meta in items[:2]:
            w.write(row, jpeg, meta)
        raise RuntimeError("boom")
    assert os.listdir(tmp_path) == []  # no temporary files, no tar, no parquet, no stats
    assert not is_done(str(tmp_path), NAME)


def test_exception_keeps_an_existing_done_shard(tmp_path):
    write_shard(tmp_path, samples(3))
    before = {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)}
    with (
        pytest.raises(ValueError, match="duplicate sample key"),
        ShardWriter(str(tmp_path), NAME, config=CONFIG, fingerprint="f", min_boxes=4) as w,
    ):
        row, jpeg, meta = samples(1)[0]
        w.write(row, jpeg, meta)
        w.write(row, jpeg, meta)
    assert {n: (tmp_path / n).read_bytes() for n in os.listdir(tmp_path)} == before


def test_rewrite_replaces_shard(tmp_path):
    write_shard(tmp_path, samples(3))
    stats = write_shard(tmp_path, samples(6))
    assert stats["inputs"] == 6 and sorted(os.listdir(tmp_path)) == [
        NAME + s for s in (".parquet", ".stats.json", ".tar")
    ]
    assert pq.read_table(tmp_path / (NAME + ".parquet")).num_rows == 6


def test_unserialisable_config_fails_before_anything_moves(tmp_path):
    with (
        pytest.raises(TypeError),
        ShardWriter(str(tmp_path), NAME, config={"bad": object()}, fingerprint="f", min_boxes=4) as w,
    ):
        w.write(*samples(1)[0])
    assert os.listdir(tmp_path) == []


def _meta(key: str, boxes=((0, 0, 4, 4),), jpeg: bytes = b"j") -> bytes:
    return schema.encode_meta(
        key=key, path=f"{key}.jpg", width=8, height=8, boxes=np.array(boxes), image_sha256=schema.image_sha256(jpeg)
    )


@pytest.mark.parametrize(
    "row, jpeg, meta, match",
    [
        (schema.make_row("a.b", "a.b.jpg"), b"j", b"m", "invalid sample key"),
        (schema.make_row("a/b", "a/b.jpg"), b"j", b"m", "invalid sample key"),
        (schema.make_row("ok", "x.jpg"), None, None, "needs both jpeg and meta"),
        (schema.make_row("ok", "x.jpg"), b"j", None, "needs both jpeg and meta"),
        (schema.make_row("bad", "x.jpg", "missing"), b"j", b"m", "must not carry"),
        (schema.make_row("ok", "x.jpg", image_bytes=3), b"j", b"m", "image_bytes=3"),
        (schema.make_row("ok", "x.jpg", image_sha256=schema.image_sha256(b"k")), b"j", b"m", "not the jpeg's"),
        ({"key": "k", "path": "p", "status": "ok"}, b"j", b"m", "not a schema.make_row dict"),
        # never a sample every reader would skip: KEY.json follows the rule of docs/format.md
        (schema.make_row("ok", "x.jpg"), b"j", b"m", "ok.json breaks the format's rule: KEY.json is not JSON"),
        (schema.make_row("ok", "x.jpg"), b"j", _meta("ok", boxes=[[0, 0, 9, 4]]), "box 0 .* is not inside the 8x8"),
        (schema.make_row("ok", "x.jpg"), b"j", _meta("other"), "key 'other', the member's key is 'ok'"),
        (schema.make_row("ok", "x.jpg"), b"j", _meta("ok", jpeg=b"k"), "records an image_sha256 that is not the jp"),
    ],
)
def test_write_validates(tmp_path, row, jpeg, meta, match):
    with (
        pytest.raises(ValueError, match=match),
        ShardWriter(str(tmp_path), NAME, config=CONFIG, fingerprint="f", min_boxes=4) as w,
    ):
        w.write(row, jpeg, meta)
    assert os.listdir(tmp_path) == []


def test_bad_shard_name_and_is_done(tmp_path):
    with pytest.raises(ValueError, match="not a shard name"):
        ShardWriter(str(tmp_path), "coco.000", config=CONFIG, fingerprint="f", min_boxes=4)
    assert not is_done(str(tmp_path), NAME)
    write_shard(tmp_path, samples(2))
    assert is_done(str(tmp_path), NAME)
    os.unlink(tmp_path / (NAME + ".tar"))  # stats without its tar is not done
    assert not is_done(str(tmp_path), NAME)


def test_empty_shard(tmp_path):
    stats = write_shard(tmp_path, [])
    assert stats["inputs"] == 0 and stats["samples"] == 0
    with tarfile.open(tmp_path / (NAME + ".tar")) as tar:
        assert tar.getmembers() == []
    assert pq.read_table(tmp_path / (NAME + ".parquet")).num_rows == 0
