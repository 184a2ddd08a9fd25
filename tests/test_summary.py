import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from shards import schema
from shards import summary as summaries
from shards.summary import format_summary, ordered_map, plot_summary, read_table, summarize, summarize_output


def hand_table(shard_names=("s-000000",)):
    """21 ok images with 0..20 boxes (box i of image n: a (i+1) x 2(i+1) box), 2 corrupt, 1 missing."""
    rows = []
    for n in range(21):
        boxes = [[0, 0, i + 1, 2 * (i + 1)] for i in range(n)]
        rows.append(
            schema.make_row(
                f"k{n:02d}",
                f"{n}.jpg",
                width=50,
                height=50,
                raw_boxes=n + 10,
                kept_boxes=n,
                boxes=boxes,
                ss_seconds=float(n),
                image_bytes=1000 + n,
            )
        )
    rows.append(schema.make_row("bad1", "bad1.jpg", "corrupt", error="truncated"))
    rows.append(schema.make_row("bad2", "bad2.jpg", "corrupt", error="truncated"))
    rows.append(schema.make_row("gone", "gone.jpg", "missing", error="no such file"))
    t = schema.rows_to_table(rows)
    shard = [shard_names[i % len(shard_names)] for i in range(t.num_rows)]
    return t.append_column("shard", pa.array(shard, pa.string())), rows


def test_counts_and_percentiles():
    t, rows = hand_table()
    s = summarize(t, min_boxes=4)
    im = s["images"]
    assert im == {
        "inputs": 24,
        "ok": 21,
        "failed": {"corrupt": 2, "missing": 1},
        "failed_total": 3,
        "few_boxes": 4,
        "min_boxes": 4,
    }
    assert s["counts_add_up"] and s["count_problems"] == []
    b = s["boxes_per_image"]
    # 0..20 boxes: mean 10, linear-interpolated percentiles p5=1, p25=5, p50=10, p75=15, p95=19
    assert (b["mean"], b["p5"], b["p25"], b["p50"], b["p75"], b["p95"]) == (10, 1, 5, 10, 15, 19)
    assert b["total"] == 210 and b["raw_mean"] == 20 and b["min"] == 0 and b["max"] == 20
    assert sum(b["histogram"]["counts"]) == 21 and b["histogram"]["edges"][0] == 0
    # box sizes: image n holds boxes of side (i+1) x 2(i+1) for i < n -> sqrt(area) = sqrt(2) (i+1)
    sides = np.concatenate([np.sqrt(2) * (np.arange(n) + 1) for n in range(21)])
    assert s["box_size"]["count"] == 210
    assert s["box_size"]["p50"] == pytest.approx(np.percentile(sides, 50), abs=1e-3)
    assert s["box_size"]["mean"] == pytest.approx(sides.mean(), abs=1e-3)
    assert s["box_aspect"]["p5"] == s["box_aspect"]["p95"] == 0.5  # every box is twice as tall as wide
    assert sum(s["box_aspect"]["histogram"]["counts"]) == 210
    assert s["bytes_per_shard"] == {
        "by_shard": {"s-000000": sum(1000 + n for n in range(21))},
        "total": sum(1000 + n for n in range(21)),
        "mean_per_image": round(sum(1000 + n for n in range(21)) / 21, 1),
    }
    sec = s["seconds_per_image"]
    assert (sec["count"], sec["total"], sec["mean"], sec["p50"], sec["p95"]) == (21, 210, 10, 10, 19)
    json.dumps(s)  # JSON-able for `prep stats --json`


def test_stats_files_cross_checked():
    t, rows = hand_table(("s-000000", "s-000001"))
    by_shard = {"s-000000": [], "s-000001": []}
    for r, sh in zip(rows, t["shard"].to_pylist(), strict=True):
        by_shard[sh].append(r)
    stats = [
        schema.make_stats(
            shard=sh, config_fingerprint="f", rows=rs, tar_bytes=0, parquet_bytes=0, seconds=0, min_boxes=3
        )
        for sh, rs in by_shard.items()
    ]
    s = summarize(t, stats)
    assert s["counts_add_up"] and s["images"]["min_boxes"] == 3 and s["images"]["few_boxes"] == 3
    assert s["shards"] == 2 and sum(s["bytes_per_shard"]["by_shard"].values()) == s["bytes_per_shard"]["total"]

    stats[1] = dict(stats[1], inputs=stats[1]["inputs"] + 1)
    s = summarize(t, stats[:1] + stats[1:] + [dict(stats[0], shard="s-000009")])
    assert not s["counts_add_up"]
    text = "\n".join(s["count_problems"])
    assert "s-000001: stats say inputs=" in text and "s-000009: has a stats file but no parquet rows" in text
    assert "COUNTS DO NOT ADD UP" in format_summary(s)


def test_failure_counts_agree_in_stats_files_manifest_and_summary():
    statuses = ["corrupt", "ok", "missing", "corrupt", "ok", "too_small", "missing", "corrupt"]
    rows = [
        schema.make_row(f"k{i}", f"k{i}.jpg", s, **({"kept_boxes": 1, "boxes": [[0, 0, 2, 3]]} if s == "ok" else {}))
        for i, s in enumerate(statuses)
    ]
    counts = schema.failure_counts((s, 1) for s in statuses)
    assert counts == {"corrupt": 3, "missing": 2, "too_small": 1} and list(counts) == sorted(counts)
    assert schema.failure_counts([("missing", 2), ("ok", 5), ("corrupt", 1), ("missing", 3)]) == {
        "corrupt": 1,
        "missing": 5,
    }
    halves = {"s-000000": rows[:5], "s-000001": rows[5:]}
    stats = [
        schema.make_stats(shard=n, config_fingerprint="f", rows=r, tar_bytes=0, parquet_bytes=0, seconds=0, min_boxes=4)
        for n, r in halves.items()
    ]
    assert [s["failed"] for s in stats] == [{"corrupt": 2, "missing": 1}, {"corrupt": 1, "missing": 1, "too_small": 1}]
    manifest = schema.make_manifest(config={}, versions={}, classes=None, stats=stats)
    t = schema.rows_to_table(rows).append_column("shard", pa.array(["s-000000"] * 5 + ["s-000001"] * 3))
    summary = summarize(t, stats)
    assert manifest["totals"]["failed"] == summary["images"]["failed"] == counts and summary["counts_add_up"]


def test_inconsistent_rows_flagged():
    t, rows = hand_table()
    rows[5]["kept_boxes"] = 99
    t = schema.rows_to_table(rows)  # no shard column: one shard
    s = summarize(t)
    assert s["shards"] == 1 and not s["counts_add_up"] and "k05" in s["count_problems"][0]


def test_empty_and_all_failed():
    t = schema.rows_to_table([schema.make_row("a", "a.jpg", "empty", error="zero bytes")])
    s = summarize(t)
    assert s["images"]["ok"] == 0 and s["images"]["failed"] == {"empty": 1} and s["counts_add_up"]
    assert s["boxes_per_image"]["count"] == 0 and s["seconds_per_image"]["mean"] is None
    assert "1 inputs = 0 ok + 1 failed" in format_summary(s)
    summarize(schema.rows_to_table([]))


def test_read_table_and_render(tmp_path):
    t, rows = hand_table()
    for i, chunk in enumerate((rows[:10], rows[10:])):
        pq.write_table(schema.rows_to_table(chunk), tmp_path / (schema.shard_name("coco", i) + schema.PARQUET_SUFFIX))
    (tmp_path / ".coco-000002.parquet.123.tmp").write_bytes(b"partial")  # a writer's temporary file: ignored
    (tmp_path / "coco-000000.stats.json").write_text("{}")
    table = read_table(str(tmp_path))
    assert table.num_rows == 24 and table.column_names == schema.PARQUET_SCHEMA.names + ["shard"]
    assert table["shard"].to_pylist() == ["coco-000000"] * 10 + ["coco-000001"] * 14
    s = summarize(table)
    assert s["shards"] == 2 and s["images"]["inputs"] == 24
    text = format_summary(s)
    assert "24 inputs = 21 ok + 3 failed  (counts add up)" in text and "failed corrupt: 2" in text
    assert "coco-000001:" in text and "seconds per image" in text
    png = tmp_path / "stats.png"
    plot_summary(s, str(png))
    plot_summary(table, str(tmp_path / "from_table.png"))
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 200


def test_read_table_conforms_format_version_1(tmp_path):
    t, rows = hand_table()
    v1 = t.drop_columns(["shard", *schema.ADDED_COLUMNS[2]])
    assert schema.parquet_version(v1.schema) == 1 and schema.parquet_version(t.drop_columns(["shard"]).schema) == 2
    pq.write_table(v1, tmp_path / "coco-000000.parquet")
    got = read_table(str(tmp_path))
    assert got.drop_columns(["shard"]).schema.equals(schema.PARQUET_SCHEMA)
    assert got["image_sha256"].null_count == got["fallback_boxes"].null_count == got.num_rows
    assert got["boxes"].to_pylist() == t["boxes"].to_pylist()


def test_read_table_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no shard parquet"):
        read_table(str(tmp_path))
    pq.write_table(pa.table({"x": [1]}), tmp_path / "coco-000000.parquet")
    with pytest.raises(ValueError, match="coco-000000.parquet: columns differ"):
        read_table(str(tmp_path))


# --- streaming: the same numbers from pair counts and per-shard parts -------------------------------------------------
def random_rows(rng, n, prefix, *, max_side=400):
    """``n`` rows: mostly ok with 0..30 random valid boxes in a random image size, some failures."""
    rows = []
    for i in range(n):
        key = f"{prefix}{i:04d}"
        if rng.random() < 0.1:
            rows.append(schema.make_row(key, key + ".jpg", "corrupt", error="truncated"))
            continue
        w, h = (int(v) for v in rng.integers(8, max_side, 2))
        k = int(rng.integers(0, 31))
        x0, y0 = rng.integers(0, w - 1, k), rng.integers(0, h - 1, k)
        x1, y1 = x0 + 1 + rng.integers(0, w - x0 - 1 + 1, k), y0 + 1 + rng.integers(0, h - y0 - 1 + 1, k)
        boxes = np.stack([x0, y0, np.minimum(x1, w), np.minimum(y1, h)], 1)
        rows.append(
            schema.make_row(
                key,
                key + ".jpg",
                width=w,
                height=h,
                raw_boxes=k + 5,
                kept_boxes=k,
                boxes=boxes,
                ss_seconds=float(rng.random()),
                image_bytes=int(rng.integers(1, 99)),
            )
        )
    return rows


def naive_box_stats(rows):
    """The box size and aspect distributions as computed before streaming: one float per box, numpy throughout."""
    boxes = np.concatenate([np.asarray(r["boxes"]).reshape(-1, 4) for r in rows if r["status"] == "ok"])
    w = (boxes[:, 2] - boxes[:, 0]).astype(np.float64)
    h = (boxes[:, 3] - boxes[:, 1]).astype(np.float64)
    side, aspect = np.sqrt(w * h), w / h
    return (
        summaries._distribution(side, summaries._linear_edges(side)),
        summaries._distribution(aspect, summaries._log_edges(aspect)),
    )


def test_percentiles_from_counts_are_numpys_floats():
    rng = np.random.default_rng(1)
    cases = [
        rng.integers(1, 50, 1000).astype(np.float64),
        np.sqrt(rng.integers(1, 10**6, 5000).astype(np.float64)),
        np.array([3.0]),
        np.array([2.0, 2.0, 7.0]),
        rng.random(17),
    ]
    for x in cases:
        values, counts = np.unique(x, return_counts=True)
        assert np.array_equal(
            summaries._percentiles(values, counts, summaries.PERCENTILES), np.percentile(x, summaries.PERCENTILES)
        )
        edges = summaries._linear_edges(x)
        assert summaries._distribution(values, edges, counts) == summaries._distribution(x, edges)


def test_pair_counts_grid_and_codes_agree():
    rng = np.random.default_rng(2)
    batches = [
        (rng.integers(1, 300, n).astype(np.int32), rng.integers(1, 200, n).astype(np.int32))
        for n in rng.integers(0, 500, 40)
    ]
    batches.append((np.array([70_000, 3], np.int32), np.array([5, 2**31 - 1], np.int32)))  # huge boxes
    w = np.concatenate([b[0] for b in batches]).astype(np.int64)
    h = np.concatenate([b[1] for b in batches]).astype(np.int64)
    want = dict(zip(*np.unique(w << 32 | h, return_counts=True), strict=True))
    # the default grid (nearly all in it), a tiny one (most pairs as codes), and counts made in one sweep or many
    for counter in (
        summaries.PairCounts(),
        summaries.PairCounts(dense_side=64, flush=700),
        summaries.PairCounts(dense_side=256, flush=10**9),
    ):
        for bw, bh in batches:
            counter.add(bw, bh)
        got_w, got_h, got_n = counter.items()
        assert dict(zip((got_w << 32 | got_h).tolist(), got_n.tolist(), strict=True)) == want
        assert counter.codes.size > 0
    halves = summaries.PairCounts(flush=900), summaries.PairCounts(flush=900)  # as two reading threads count
    for i, (bw, bh) in enumerate(batches):
        halves[i % 2].add(bw, bh)
    halves[0].merge(halves[1])
    got_w, got_h, got_n = halves[0].items()
    assert dict(zip((got_w << 32 | got_h).tolist(), got_n.tolist(), strict=True)) == want


def write_output(directory, shards):
    """Shard parquet + stats files under ``directory`` from {name: rows}."""
    for name, rows in shards.items():
        pq.write_table(schema.rows_to_table(rows), directory / (name + schema.PARQUET_SUFFIX))
        st = schema.make_stats(
            shard=name, config_fingerprint="f", rows=rows, tar_bytes=0, parquet_bytes=0, seconds=0, min_boxes=4
        )
        (directory / (name + schema.STATS_SUFFIX)).write_bytes(schema.dumps(st))


def test_summarize_output_equals_the_whole_table_and_the_naive_numbers(tmp_path):
    rng = np.random.default_rng(3)
    shards = {
        schema.shard_name("coco", i): random_rows(rng, int(n), f"s{i}", max_side=side)
        for i, (n, side) in enumerate([(40, 400), (1, 400), (25, 3000), (60, 400)])
    }  # some boxes over 1,024 px
    write_output(tmp_path, shards)
    (tmp_path / "coco-000001.tar").write_bytes(b"never read")
    streamed = summarize_output(str(tmp_path), threads=3)
    stats = [json.loads((tmp_path / (n + schema.STATS_SUFFIX)).read_text()) for n in shards]
    whole = summarize(read_table(str(tmp_path)), stats)
    assert streamed == whole
    assert streamed["counts_add_up"] and streamed["shards"] == 4 and streamed["percentiles"].startswith("exact")
    rows = [r for rs in shards.values() for r in rs]
    size, aspect = naive_box_stats(rows)
    assert streamed["box_size"] == size and streamed["box_aspect"] == aspect
    assert streamed["boxes_per_image"]["total"] == sum(r["kept_boxes"] or 0 for r in rows if r["status"] == "ok")
    assert streamed["images"]["failed"] == {"corrupt": sum(r["status"] == "corrupt" for r in rows)}


def test_ordered_map_keeps_order_and_every_item():
    import time

    def slow(x):
        # uneven durations are the point: later items finish before earlier ones, and the output must keep input order
        time.sleep(0.002 * (x % 3))
        return x * x

    for threads in (1, 2, 5):
        assert list(ordered_map(slow, iter(range(23)), threads)) == [x * x for x in range(23)]
    assert list(ordered_map(slow, [], 2)) == []


def test_invalid_boxes_and_rows_are_reported():
    rows = [
        schema.make_row(
            f"k{i}", f"{i}.jpg", width=50, height=50, raw_boxes=3, kept_boxes=2, boxes=[[0, 0, 10, 10], [5, 5, 20, 40]]
        )
        for i in range(4)
    ]
    rows[1]["boxes"] = [[0, 0, 10, 10], [30, 5, 30, 40]]  # zero width
    rows[2]["kept_boxes"] = 5
    s = summarize(schema.rows_to_table(rows))
    assert s["box_problems"] == [": 1 boxes with x1 <= x0 or y1 <= y0 (left out of box size and aspect)"]
    assert s["box_size"]["count"] == 7 and s["box_aspect"]["count"] == 7
    assert s["count_problems"] == ["1 ok rows whose kept_boxes differs from their boxes (first: k2)"]
    assert "problem: : 1 boxes with x1 <= x0" in format_summary(s)

    t = schema.rows_to_table(rows[:1])
    three = pa.array([[[0, 0, 10]]], pa.list_(pa.list_(pa.int32())))
    t = t.set_column(t.schema.get_field_index("boxes"), "boxes", three)
    s = summarize(t.set_column(t.schema.get_field_index("kept_boxes"), "kept_boxes", pa.array([1], pa.int32())))
    assert s["box_problems"] == [": boxes that are not 4 integers (its boxes are left out)"]
    assert s["box_size"]["count"] == 0
