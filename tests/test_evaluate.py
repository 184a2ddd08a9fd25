"""prep.evaluate: IoU and best overlaps against a loop, recall / MABO on hand-made boxes whose answers are known,
ground truth scaled to downscaled stored images, and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from imagegen import jpeg_bytes, textured_image

from prep import evaluate
from prep import run as prep_run
from prep.cli import prep
from prep.config import PrepConfig
from shards import schema


def test_iou_by_hand():
    a = np.array([[0, 0, 2, 2], [0, 0, 2, 2], [0, 0, 2, 2], [0, 0, 4, 4]])
    b = np.array([[0, 0, 2, 2], [1, 0, 3, 2], [2, 2, 4, 4], [1, 1, 3, 3]])
    assert evaluate.iou(a, b).tolist() == [1.0, 2 / 6, 0.0, 4 / 16]
    assert evaluate.iou(a[:, None], b[None]).shape == (4, 4)


def test_best_overlaps_equal_a_loop():
    rng = np.random.default_rng(0)
    images = 7
    per_image = rng.integers(0, 30, images)
    per_image[3] = 0  # an image without proposals
    prop_start = np.concatenate([[0], np.cumsum(per_image)])
    xy = rng.integers(0, 80, (prop_start[-1], 2))
    props = np.concatenate([xy, xy + rng.integers(1, 40, xy.shape)], 1).astype(np.float64)
    gt_image = rng.integers(0, images, 25)
    gxy = rng.random((25, 2)) * 80
    gt = np.concatenate([gxy, gxy + 1 + rng.random((25, 2)) * 40], 1)
    got = evaluate.best_overlaps(gt, gt_image, props, prop_start, tops=(1, 4, None))
    for g in range(25):
        mine = props[prop_start[gt_image[g]] : prop_start[gt_image[g] + 1]]
        for i, k in enumerate((1, 4, None)):
            want = max([float(evaluate.iou(gt[g], p)) for p in mine[:k]], default=0.0)
            assert got[i, g] == pytest.approx(want, abs=1e-12)


def hand_output(tmp_path):
    """An output and annotations whose recall is known (see the comments), stored images half the source size."""
    images = [
        {"id": 1, "file_name": "a.jpg", "width": 200, "height": 100},
        {"id": 2, "file_name": "b.jpg", "width": 100, "height": 100},
        {"id": 3, "file_name": "c.jpg", "width": 300, "height": 300},
        {"id": 4, "file_name": "d.jpg", "width": 100, "height": 100},
        {"id": 5, "file_name": "e.jpg", "width": 100, "height": 100},
    ]
    anns = [
        {"image_id": 1, "bbox": [0, 0, 100, 50], "area": 5000, "category_id": 1, "iscrowd": 0},  # A medium
        {"image_id": 1, "bbox": [100, 50, 20, 20], "area": 400, "category_id": 2, "iscrowd": 0},  # B small
        {"image_id": 1, "bbox": [0, 0, 200, 100], "area": 20000, "category_id": 1, "iscrowd": 1},  # crowd: ignored
        {"image_id": 2, "bbox": [10, 10, 50, 50], "area": 2500, "category_id": 1, "iscrowd": 0},  # D: row failed
        {"image_id": 3, "bbox": [0, 0, 150, 300], "area": 45000, "category_id": 3, "iscrowd": 0},  # E large
        {"image_id": 4, "bbox": [0, 0, 10, 10], "area": 100, "category_id": 3, "iscrowd": 0},  # F: other size
        {"image_id": 5, "bbox": [0, 0, 10, 10], "area": 100, "category_id": 3, "iscrowd": 0},  # G: not in output
    ]
    path = tmp_path / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": []}))
    filler = [[0, 0, 10, 10]] * 4
    rows = [
        # a.jpg stored at half size: A (scaled [0, 0, 50, 25]) is the first box, B ([50, 25, 60, 35]) the sixth
        schema.make_row(
            "a",
            "a.jpg",
            width=100,
            height=50,
            orig_width=200,
            orig_height=100,
            image_id=1,
            kept_boxes=6,
            boxes=[[0, 0, 50, 25], *filler, [50, 25, 60, 35]],
            ss_seconds=2.0,
        ),
        schema.make_row("b", "b.jpg", "corrupt", error="truncated", image_id=2),
        # c.jpg: no image id (a folder run), matched by path; E covered by half: IoU 0.5
        schema.make_row(
            "c",
            "c.jpg",
            width=300,
            height=300,
            orig_width=300,
            orig_height=300,
            kept_boxes=1,
            boxes=[[0, 0, 150, 150]],
            ss_seconds=4.0,
        ),
        schema.make_row(
            "d",
            "d.jpg",
            width=50,
            height=50,
            orig_width=50,
            orig_height=50,
            image_id=4,
            kept_boxes=1,
            boxes=[[0, 0, 5, 5]],
            ss_seconds=1.0,
        ),  # decoded at 50x50, annotated at 100x100
        schema.make_row(
            "x",
            "x.jpg",
            width=50,
            height=50,
            orig_width=50,
            orig_height=50,
            image_id=99,
            kept_boxes=1,
            boxes=[[0, 0, 5, 5]],
            ss_seconds=1.0,
        ),  # not annotated
    ]
    out = tmp_path / "out"
    out.mkdir()
    pq.write_table(schema.rows_to_table(rows[:2]), out / "coco-000000.parquet")
    pq.write_table(schema.rows_to_table(rows[2:]), out / "coco-000001.parquet")
    return str(out), str(path)


def test_recall_and_mabo_on_hand_made_boxes(tmp_path):
    out, ann = hand_output(tmp_path)
    r = evaluate.evaluate(out, evaluate.load_annotations(ann))
    assert r["images"] == {
        "rows": 5,
        "evaluated": 2,
        "failed_annotated": 1,
        "not_annotated": 1,
        "size_mismatch": 1,
        "annotated_absent": 1,
    }
    assert r["annotations"] == {
        "objects": 4,
        "crowd_ignored": 1,
        "objects_small": 1,
        "objects_medium": 2,
        "objects_large": 1,
    }
    # objects A (medium), B (small), D (medium, its row failed), E (large, best IoU 0.5)
    assert r["recall"]["0.5"] == {
        "4": {"all": 0.5, "small": 0.0, "medium": 0.5, "large": 1.0},
        "20": {"all": 0.75, "small": 1.0, "medium": 0.5, "large": 1.0},
        "all": {"all": 0.75, "small": 1.0, "medium": 0.5, "large": 1.0},
    }
    assert r["recall"]["0.7"]["4"] == {"all": 0.25, "small": 0.0, "medium": 0.5, "large": 0.0}
    assert r["recall"]["0.7"]["all"]["all"] == 0.5
    assert r["abo"]["4"]["all"] == 0.375 and r["abo"]["all"]["all"] == 0.625
    # MABO: categories 1 (A 1, D 0), 2 (B), 3 (E 0.5)
    assert r["mabo"]["4"]["all"] == round((0.5 + 0.0 + 0.5) / 3, 4)
    assert r["mabo"]["all"]["all"] == round((0.5 + 1.0 + 0.5) / 3, 4)
    assert r["seconds_per_image"] == {"count": 2, "mean": 3.0, "p50": 3.0, "total": 6.0}
    assert r["kept_boxes_per_image"] == 3.5

    res = CliRunner().invoke(prep, ["eval-proposals", out, "--annotations", ann, "--json"])
    assert res.exit_code == 0 and json.loads(res.output) == r, res.output
    res = CliRunner().invoke(prep, ["eval-proposals", out, "--annotations", ann])
    assert res.exit_code == 0 and "recall@0.5" in res.output and "first 20" in res.output, res.output
    assert "objects: 4 (small 1, medium 2, large 1); 1 crowd annotations ignored" in res.output


def test_bad_annotation_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(evaluate.AnnotationError, match="bad.json: not JSON"):
        evaluate.load_annotations(str(bad))
    bad.write_text(
        json.dumps(
            {"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 7, "bbox": [0, 0, 1, 1]}]}
        )
    )
    with pytest.raises(evaluate.AnnotationError, match="1 annotations refer to images not listed"):
        evaluate.load_annotations(str(bad))
    out, ann = hand_output(tmp_path)
    res = CliRunner().invoke(prep, ["eval-proposals", out, "--annotations", str(bad)])
    assert res.exit_code == 1 and "bad.json" in res.output


def test_ground_truth_follows_a_downscaled_stored_image(tmp_path):
    """One whole-image object per image, prep run with and without --max-side: the best overlaps are those of the
    stored proposals with the whole *stored* image (unscaled ground truth would overlap a 64 px copy by < 0.5)."""
    root = tmp_path / "images"
    root.mkdir()
    images, anns = [], []
    for i in range(3):
        w, h = 120 + 16 * i, 96
        (root / f"{i}.jpg").write_bytes(jpeg_bytes(textured_image(w, h, seed=i)))
        images.append({"id": i + 1, "file_name": f"{i}.jpg", "width": w, "height": h})
        anns.append({"image_id": i + 1, "bbox": [0, 0, w, h], "area": w * h, "category_id": 1, "iscrowd": 0})
    ann = tmp_path / "instances.json"
    ann.write_text(json.dumps({"images": images, "annotations": anns}))
    gt = evaluate.load_annotations(str(ann))
    for max_side in (None, 64):
        out = str(tmp_path / f"out{max_side}")
        cfg = PrepConfig(
            kind="coco", root=str(root), annotations=str(ann), ss_max_side=64, min_side=8, max_side=max_side
        )
        prep_run.run(cfg, out, workers=1, progress=False)
        r = evaluate.evaluate(out, gt)
        rows = pq.read_table(f"{out}/coco-000000.parquet").to_pylist()
        assert [row["width"] <= 64 for row in rows] == [max_side is not None] * 3
        best = [max(float(evaluate.iou(b, [0, 0, row["width"], row["height"]])) for b in row["boxes"]) for row in rows]
        assert r["images"]["evaluated"] == 3 and r["abo"]["all"]["all"] == round(float(np.mean(best)), 4)
        assert r["recall"]["0.5"]["all"]["all"] == 1.0, r
