"""``prep export``: the kept proposals of an output in a format other tools read, streamed shard by shard from the
Parquet (never the tars, never the whole output in memory).

``coco-results``: a COCO results file, the JSON list ``COCO.loadRes`` of pycocotools reads (and FiftyOne and CVAT
import): one ``{"image_id", "category_id": 1, "bbox": [x, y, w, h], "score"}`` per kept box. ``bbox`` is in the
*source* image's pixels (the shards store boxes in the stored image's, which ``--max-side`` may have shrunk): each
coordinate times ``orig_width / width`` (x) or ``orig_height / height`` (y), rounded to 0.01 px, whole numbers when the
image was stored at its size. ``score`` is ``1 / (1 + rank)``, so sorting by score gives selective-search rank order
(what a results file's consumers sort by) and the first K boxes are the K highest scores.

Beside it, an images list (a COCO dataset file with ``images``, one ``categories`` entry, no annotations): every ok
sample's id, ``file_name`` (its path relative to the source root), source ``width`` / ``height`` and ``key``. Ids are
the COCO ``image_id`` the output records (``prep coco --annotations``); for an output without them (ImageNet, folder)
they are 1, 2, 3, … over the ok samples in shard and row order, and the list is how an id finds its path.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from shards import layout, schema, storage
from shards import summary as summaries

FORMATS = ("coco-results",)
CATEGORY = {"id": 1, "name": "proposal", "supercategory": "proposal"}
COLUMNS = ["key", "path", "status", "width", "height", "orig_width", "orig_height", "image_id", "boxes"]


def images_path(output: str) -> str:
    """The images list written beside ``output``: ``proposals.json`` -> ``proposals.images.json``."""
    stem = output[: -len(".json")] if output.endswith(".json") else output
    return stem + ".images.json"


def scores(n: int) -> list[str]:
    """The JSON text of the score of ranks 0 .. n-1: ``1 / (1 + rank)`` to 6 significant digits (distinct and
    decreasing for any rank a shard holds)."""
    return [f"{1 / (1 + r):.6g}" for r in range(n)]


def export_coco_results(out: str, output: str, images: str | None = None) -> dict[str, Any]:
    """Write the COCO results file ``output`` and the images list ``images`` (default ``images_path(output)``), both
    atomically; returns counts (images, boxes, whether ids were assigned, the images list's path)."""
    images = images or images_path(output)
    names = layout.shard_names(layout.listing(out), schema.PARQUET_SUFFIX)
    if not names:
        raise FileNotFoundError(f"{storage.redact(out)}: no shard parquet files (*{schema.PARQUET_SUFFIX}) found")
    urls = [layout.shard_file(out, name, schema.PARQUET_SUFFIX) for name in names]
    assign = not _all_have_ids(urls)
    counts = {"images": 0, "boxes": 0}
    rank_scores: list[str] = []
    with contextlib.ExitStack() as stack:
        results = stack.enter_context(storage.atomic_file(output))
        image_list = stack.enter_context(storage.atomic_file(images))
        _write(results, "[")
        _write(image_list, '{"categories": [' + json.dumps(CATEGORY) + '], "annotations": [], "images": [')
        for table in _ok_tables(urls):
            ids = (
                np.arange(counts["images"] + 1, counts["images"] + 1 + table.num_rows)
                if assign
                else table["image_id"].to_numpy()
            )
            for i, row in enumerate(_image_entries(table, ids)):
                _write(image_list, ("," if counts["images"] + i else "") + "\n" + json.dumps(row))
            lines, kept = _result_lines(table, ids, rank_scores)
            if lines:
                _write(results, ("," if counts["boxes"] else "") + "\n" + ",\n".join(lines))
            counts["images"] += table.num_rows
            counts["boxes"] += kept
        _write(results, "\n]\n")
        _write(image_list, "\n]}\n")
    return {**counts, "assigned_ids": assign, "images_list": images}


def _write(f: IO[bytes], text: str) -> None:
    f.write(text.encode())


def _all_have_ids(urls: list[str]) -> bool:
    """Whether every ok row of the output has a COCO image id (a cheap first pass over two columns)."""
    for url in urls:
        t = summaries.read_parquet(url, ["status", "image_id"])
        ok = t.filter(pc.equal(t["status"], schema.STATUS_OK))
        if ok["image_id"].null_count:
            return False
    return True


def _ok_tables(urls: list[str]) -> Iterator[pa.Table]:
    """Each shard's ok rows, the columns an export needs, one shard at a time (read ahead in threads)."""
    threads = summaries.REMOTE_THREADS if storage.is_remote(urls[0]) else summaries.LOCAL_THREADS

    def read(url: str) -> pa.Table:
        t = summaries.read_parquet(url, COLUMNS)
        return t.filter(pc.equal(t["status"], schema.STATUS_OK))

    yield from summaries.ordered_map(read, urls, threads)


def _image_entries(table: pa.Table, ids: np.ndarray) -> Iterator[dict[str, Any]]:
    for image_id, key, path, w, h in zip(
        ids.tolist(),
        table["key"].to_pylist(),
        table["path"].to_pylist(),
        table["orig_width"].to_pylist(),
        table["orig_height"].to_pylist(),
        strict=True,
    ):
        yield {"id": image_id, "file_name": path, "width": w, "height": h, "key": key}


def _result_lines(table: pa.Table, ids: np.ndarray, rank_scores: list[str]) -> tuple[list[str], int]:
    """One JSON object per kept box of ``table``'s rows (ok rows), in row then rank order; and the box count.
    ``rank_scores`` is the cache of ``scores``, grown as needed."""
    per_row = pc.list_value_length(table["boxes"]).fill_null(0).to_numpy().astype(np.int64)
    total = int(per_row.sum())
    if not total:
        return [], 0
    flat = pc.list_flatten(pc.list_flatten(table["boxes"])).to_numpy(zero_copy_only=False)
    xyxy = flat.reshape(-1, 4).astype(np.float64)
    stored = np.stack([table["width"].to_numpy(), table["height"].to_numpy()], 1).astype(np.float64)
    orig = np.stack([table["orig_width"].to_numpy(), table["orig_height"].to_numpy()], 1).astype(np.float64)
    scale = np.repeat(orig / stored, per_row, axis=0)  # [boxes, (sx, sy)]
    xywh = np.concatenate([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], 1) * np.concatenate([scale, scale], 1)
    unscaled = bool((scale == 1).all())
    values = xywh.astype(np.int64).tolist() if unscaled else np.round(xywh, 2).tolist()
    ranks = np.arange(total) - np.repeat(np.cumsum(per_row) - per_row, per_row)
    if int(per_row.max()) > len(rank_scores):
        rank_scores[:] = scores(int(per_row.max()))
    box_ids = np.repeat(ids, per_row).tolist()
    lines = [
        f'{{"image_id": {i}, "category_id": 1, "bbox": [{x}, {y}, {w}, {h}], "score": {rank_scores[r]}}}'
        for i, (x, y, w, h), r in zip(box_ids, values, ranks.tolist(), strict=True)
    ]
    return lines, total
