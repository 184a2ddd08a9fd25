import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from shards import schema
from shards.stats import format_summary, plot_summary, read_table, summarize


def hand_table(shard_names=("s-000000",)):
    """21 ok images with 0..20 boxes (box i of image n: a (i+1) x 2(i+1) box), 2 corrupt, 1 missing."""
    rows = []
    for n in range(21):
        boxes = [[0, 0, i + 1, 2 * (i + 1)] for i in range(n)]
        rows.append(schema.make_row(f"k{n:02d}", f"{n}.jpg", width=50, height=50, raw_boxes=n + 10, kept_boxes=n,
                                    boxes=boxes, ss_seconds=float(n), image_bytes=1000 + n))
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
    assert im == {"inputs": 24, "ok": 21, "failed": {"corrupt": 2, "missing": 1}, "failed_total": 3,
                  "few_boxes": 4, "min_boxes": 4}
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
    assert s["bytes_per_shard"] == {"by_shard": {"s-000000": sum(1000 + n for n in range(21))},
                                    "total": sum(1000 + n for n in range(21)),
                                    "mean_per_image": round(sum(1000 + n for n in range(21)) / 21, 1)}
    sec = s["seconds_per_image"]
    assert (sec["count"], sec["total"], sec["mean"], sec["p50"], sec["p95"]) == (21, 210, 10, 10, 19)
    json.dumps(s)  # JSON-able for `prep stats --json`


def test_stats_files_cross_checked():
    t, rows = hand_table(("s-000000", "s-000001"))
    by_shard = {"s-000000": [], "s-000001": []}
    for r, sh in zip(rows, t["shard"].to_pylist()):
        by_shard[sh].append(r)
    stats = [schema.make_stats(shard=sh, config_fingerprint="f", rows=rs, tar_bytes=0, parquet_bytes=0, seconds=0,
                               min_boxes=3) for sh, rs in by_shard.items()]
    s = summarize(t, stats)
    assert s["counts_add_up"] and s["images"]["min_boxes"] == 3 and s["images"]["few_boxes"] == 3
    assert s["shards"] == 2 and sum(s["bytes_per_shard"]["by_shard"].values()) == s["bytes_per_shard"]["total"]

    stats[1] = dict(stats[1], inputs=stats[1]["inputs"] + 1)
    s = summarize(t, stats[:1] + stats[1:] + [dict(stats[0], shard="s-000009")])
    assert not s["counts_add_up"]
    text = "\n".join(s["count_problems"])
    assert "s-000001: stats say inputs=" in text and "s-000009: has a stats file but no parquet rows" in text
    assert "COUNTS DO NOT ADD UP" in format_summary(s)


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
