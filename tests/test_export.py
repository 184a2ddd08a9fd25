"""prep export --format coco-results: pycocotools loads the file against the output's COCO annotations, with every
kept box of the shards scaled back to the source image's pixels and ranked by score; an ImageNet output (no COCO ids)
gets ids 1.. and an images list that maps them to paths and loads as the ground truth; an s3:// output exports the
same, and so does an http(s) one; clear errors."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from pycocotools.coco import COCO

from prep import export as exports
from prep import run as prep_run
from prep.cli import prep
from prep.config import PrepConfig
from shards import schema

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def invoke(*args):
    return CliRunner().invoke(prep, [str(a) for a in args], catch_exceptions=False)


def ok_rows(out) -> list[dict]:
    return [
        r
        for n in sorted(os.listdir(out))
        if n.endswith(schema.PARQUET_SUFFIX)
        for r in pq.read_table(os.path.join(out, n)).to_pylist()
        if r["status"] == schema.STATUS_OK
    ]


def in_source_pixels(row: dict) -> list[list[float]]:
    sx, sy = row["orig_width"] / row["width"], row["orig_height"] / row["height"]
    return [[x0 * sx, y0 * sy, (x1 - x0) * sx, (y1 - y0) * sy] for x0, y0, x1, y1 in row["boxes"]]


def loaded_boxes(results: COCO, image_id: int) -> list[list[float]]:
    anns = results.loadAnns(results.getAnnIds(imgIds=[image_id]))
    return [a["bbox"] for a in sorted(anns, key=lambda a: -a["score"])]


def test_coco_results_load_in_pycocotools_with_the_shards_boxes(sample_output, tmp_path):
    out_json = tmp_path / "proposals.json"
    r = invoke("export", sample_output, "--format", "coco-results", "-o", out_json)
    assert r.exit_code == 0, r.output
    rows = ok_rows(sample_output)
    total = sum(len(row["boxes"]) for row in rows)
    assert f"{total} boxes of 8 images (COCO image ids" in r.stdout

    gt = COCO(sample_output.annotations)
    results = gt.loadRes(str(out_json))
    assert len(results.getAnnIds()) == total
    for row in rows:
        assert row["width"] < row["orig_width"]  # stored at 240 px: the scaling is exercised
        got = loaded_boxes(results, row["image_id"])
        want = in_source_pixels(row)
        assert np.abs(np.array(got) - np.array(want)).max() <= 0.005 + 1e-9, row["key"]  # rounded to 0.01 px
    detections = json.loads(out_json.read_text())
    assert {d["category_id"] for d in detections} == {1}
    first = [d for d in detections if d["image_id"] == rows[0]["image_id"]]
    assert [d["score"] for d in first] == sorted((d["score"] for d in first), reverse=True)
    assert first[0]["score"] == 1 and len({d["score"] for d in first}) == len(first)

    images = json.loads((tmp_path / "proposals.images.json").read_text())
    assert [(im["id"], im["file_name"]) for im in images["images"]] == [(row["image_id"], row["path"]) for row in rows]


@pytest.fixture(scope="module")
def imagenet_output(tmp_path_factory) -> str:
    """The bundled ImageNet sample (7 photos, 3 classes) with fast settings: no COCO image ids."""
    out = str(tmp_path_factory.mktemp("in") / "out")
    cfg = PrepConfig(
        kind="imagenet",
        root=os.path.join(REPO, "data", "sample", "imagenet"),
        ss_max_side=96,
        min_side=24,
        shard_size=3,
    )
    prep_run.run(cfg, out, workers=1, progress=False)
    return out


def test_an_output_without_ids_gets_an_images_list_that_maps_them_to_paths(imagenet_output, tmp_path):
    out_json = tmp_path / "in.json"
    r = invoke("export", imagenet_output, "-o", out_json, "--images", tmp_path / "ids.json")
    assert r.exit_code == 0 and "ids assigned" in r.stdout, r.output
    rows = ok_rows(imagenet_output)
    images = json.loads((tmp_path / "ids.json").read_text())
    assert [im["id"] for im in images["images"]] == list(range(1, len(rows) + 1))
    assert [(im["file_name"], im["key"], im["width"]) for im in images["images"]] == [
        (row["path"], row["key"], row["orig_width"]) for row in rows
    ]
    # the images list is a COCO dataset file: it loads as the ground truth the results refer to
    results = COCO(str(tmp_path / "ids.json")).loadRes(str(out_json))
    for image_id, row in enumerate(rows, 1):
        assert loaded_boxes(results, image_id) == in_source_pixels(row)  # stored at source size: exact integers


def test_remote_outputs_export_the_same(s3_server, http_server, sample_output, tmp_path):
    client = s3_server.client()
    for name in os.listdir(sample_output):
        if not name.endswith(schema.TAR_SUFFIX):  # an export reads no tar
            client.upload_file(os.path.join(sample_output, name), s3_server.bucket, f"out/{name}")
    assert invoke("export", sample_output, "-o", tmp_path / "local.json").exit_code == 0
    for name, url in (("s3", s3_server.url("out")), ("http", http_server(sample_output).url)):
        assert invoke("export", url, "-o", tmp_path / f"{name}.json").exit_code == 0
        assert (tmp_path / f"{name}.json").read_bytes() == (tmp_path / "local.json").read_bytes()
        assert (tmp_path / f"{name}.images.json").read_bytes() == (tmp_path / "local.images.json").read_bytes()


def test_paths_and_errors(tmp_path):
    assert exports.images_path("a/proposals.json") == "a/proposals.images.json"
    assert exports.images_path("results") == "results.images.json"
    assert exports.scores(4) == ["1", "0.5", "0.333333", "0.25"]
    (tmp_path / "empty").mkdir()
    r = invoke("export", tmp_path / "empty", "-o", tmp_path / "p.json")
    assert r.exit_code == 1 and "no shard parquet files" in r.output and not (tmp_path / "p.json").exists()
    r = invoke("export", tmp_path / "empty", "-o", tmp_path / "p.json", "--images", tmp_path / "no" / "i.json")
    assert r.exit_code == 2 and f"directory {tmp_path / 'no'} does not exist" in r.output
    r = invoke("export", tmp_path / "empty", "--format", "voc", "-o", tmp_path / "p.json")
    assert r.exit_code == 2 and "'voc' is not 'coco-results'" in r.output
