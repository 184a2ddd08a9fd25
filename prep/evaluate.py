"""Proposal quality against COCO ground truth: recall at IoU 0.5 and 0.7 of the first 4 / 20 / all kept boxes, mean
best overlap, per object size, and selective-search seconds per image; read from an output's Parquet files only.

Samples are matched to annotated images by ``image_id`` (``prep coco --annotations`` records it), else by ``path``
against the image's ``file_name``. Ground-truth boxes are in the source image's pixels and proposals in the stored
image's (``--max-side`` may have shrunk it), so each ground-truth box is scaled by stored ÷ source size first. An
object's size class is COCO's, from its ``area`` in source pixels (small < 32², medium < 96², else large), so a
downscaled copy does not move objects between classes. ``iscrowd`` annotations are left out.

The best overlap of an object is the largest IoU between its box and any of the image's first K proposals (0 when
there is none); recall at t is the share of objects whose best overlap is at least t; ABO is the mean best overlap
over objects and MABO the mean over categories of each category's ABO (Uijlings et al., selective search). The
objects of annotated images whose row failed count as missed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from shards import layout, schema, storage
from shards import summary as summaries

IOUS = (0.5, 0.7)
TOPS = (4, 20, None)  # first K kept boxes; None: all of them
SIZES = (("small", 32**2), ("medium", 96**2), ("large", math.inf))  # COCO: area < 32², < 96², the rest
COLUMNS = [
    "key",
    "path",
    "status",
    "width",
    "height",
    "orig_width",
    "orig_height",
    "image_id",
    "kept_boxes",
    "boxes",
    "ss_seconds",
]


class AnnotationError(ValueError):
    """An annotation file that cannot be used; the message names it and the reason."""


@dataclass
class GroundTruth:
    """The non-crowd boxes of a COCO annotation file, grouped by image (CSR: image i owns rows start[i]:start[i+1])."""

    ids: np.ndarray  # int64 [I] image ids, ascending
    names: dict[str, int]  # file_name -> image index
    frame: np.ndarray  # float64 [I, 2] width, height of the annotated image (source pixels; 0 if not given)
    start: np.ndarray  # int64 [I + 1]
    boxes: np.ndarray  # float64 [G, 4] x0, y0, x1, y1 in source pixels
    size: np.ndarray  # int8 [G] index into SIZES
    category: np.ndarray  # int64 [G]
    crowd: int  # iscrowd annotations left out


def load_annotations(path: str) -> GroundTruth:
    """Read a COCO ``instances`` JSON (``images``, ``annotations`` with ``bbox`` [x, y, w, h])."""
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except OSError as e:
        raise AnnotationError(f"{path}: cannot read annotation file: {e}") from None
    except ValueError as e:
        raise AnnotationError(f"{path}: not JSON: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise AnnotationError(f"{path}: not a COCO annotation file (no 'images' list at the top level)")
    try:
        images = sorted(data["images"], key=lambda im: im["id"])
        ids = np.array([im["id"] for im in images], np.int64)
        frame = np.array([[im.get("width") or 0, im.get("height") or 0] for im in images], np.float64).reshape(-1, 2)
        names = {im["file_name"].replace("\\", "/"): i for i, im in enumerate(images)}
        anns = [a for a in data.get("annotations", []) if not a.get("iscrowd")]
        crowd = len(data.get("annotations", [])) - len(anns)
        image = np.searchsorted(ids, np.array([a["image_id"] for a in anns], np.int64)).astype(np.int64)
        bbox = np.array([a["bbox"] for a in anns], np.float64).reshape(-1, 4)
        area = np.array([a.get("area", w * h) for a, (_, _, w, h) in zip(anns, bbox, strict=True)], np.float64)
        category = np.array([a.get("category_id", 0) for a in anns], np.int64)
    except (KeyError, TypeError, ValueError) as e:
        raise AnnotationError(f"{path}: malformed image or annotation entry ({type(e).__name__}: {e})") from None
    if len(np.unique(ids)) != len(ids):
        raise AnnotationError(f"{path}: an image id is listed twice")
    wanted = np.array([a["image_id"] for a in anns], np.int64)
    known = (image < len(ids)) & (ids[np.minimum(image, len(ids) - 1)] == wanted) if len(ids) else wanted < 0
    if not known.all():
        first = anns[int(np.flatnonzero(~known)[0])]["image_id"]
        raise AnnotationError(f"{path}: {int((~known).sum())} annotations refer to images not listed (first: {first})")
    order = np.argsort(image, kind="stable")
    image, bbox, area, category = image[order], bbox[order], area[order], category[order]
    boxes = np.concatenate([bbox[:, :2], bbox[:, :2] + bbox[:, 2:]], axis=1)
    size = np.searchsorted([limit for _, limit in SIZES], area, side="right").astype(np.int8)
    start = np.searchsorted(image, np.arange(len(ids) + 1))
    return GroundTruth(
        ids=ids, names=names, frame=frame, start=start, boxes=boxes, size=size, category=category, crowd=crowd
    )


def iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Elementwise IoU of boxes ``a`` and ``b`` ([..., 4] x0, y0, x1, y1 with x1 > x0, broadcast): float64 [...].

    Coordinates are edges (an end-exclusive integer box [0, 0, 2, 2] covers 2 × 2 pixels), as in the shards."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = iw * ih
    union = (
        (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1]) + (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1]) - inter
    )
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def best_overlaps(
    gt: np.ndarray,
    gt_image: np.ndarray,
    props: np.ndarray,
    prop_start: np.ndarray,
    tops: Iterable[int | None] = TOPS,
) -> np.ndarray:
    """Best IoU of each ground-truth box with the first K proposals of its image, for each K in ``tops``.

    gt: [G, 4]; gt_image: [G] image slot of each; props: [P, 4], the proposals of all images in rank order, image j's
    at ``prop_start[j]:prop_start[j + 1]``. Returns float64 [len(tops), G] (0 for an image without proposals).
    Every (object, proposal of its image) pair at once: no loop over images."""
    tops = list(tops)
    counts = prop_start[gt_image + 1] - prop_start[gt_image]  # proposals of each object's image
    first = np.cumsum(counts) - counts  # where each object's pairs begin
    obj = np.repeat(np.arange(len(gt)), counts)
    rank = np.arange(int(counts.sum())) - np.repeat(first, counts)
    overlap = iou(gt[obj], props[np.repeat(prop_start[gt_image], counts) + rank])
    best = np.zeros((len(tops), len(gt)))
    has = counts > 0
    for i, k in enumerate(tops):
        o = overlap if k is None else np.where(rank < k, overlap, 0.0)
        if len(o):
            best[i, has] = np.maximum.reduceat(o, first[has])
    return best


def evaluate(
    out: str, gt: GroundTruth, listing: Iterable[str] | None = None, threads: int | None = None
) -> dict[str, Any]:
    """Recall, ABO / MABO and seconds per image of the proposals in output ``out`` (local, ``s3://``, or
    ``http(s)://`` with ``listing``) against ``gt``; a JSON-able dict (``format_evaluation`` renders it)."""
    listing = set(storage.list_names(out) if listing is None else listing)
    shards = layout.shard_names(listing, schema.PARQUET_SUFFIX)
    if not shards:
        raise FileNotFoundError(f"{storage.redact(out)}: no shard parquet files (*{schema.PARQUET_SUFFIX}) found")
    if threads is None:
        threads = summaries.REMOTE_THREADS if storage.is_remote(out) else summaries.LOCAL_THREADS
    parts = list(
        summaries.ordered_map(
            lambda n: _shard_overlaps(
                summaries.read_parquet(layout.shard_file(out, n, schema.PARQUET_SUFFIX), COLUMNS), gt
            ),
            shards,
            threads,
        )
    )
    counts = {k: sum(p.counts[k] for p in parts) for k in parts[0].counts}
    counts["annotated_absent"] = len(gt.ids) - len(np.unique(np.concatenate([p.images for p in parts])))
    best = np.concatenate([p.best for p in parts], axis=1)
    size = np.concatenate([p.size for p in parts])
    category = np.concatenate([p.category for p in parts])
    seconds = np.concatenate([p.seconds for p in parts])
    kept = np.concatenate([p.kept for p in parts])

    groups = [("all", np.ones(len(size), bool))] + [(name, size == i) for i, (name, _) in enumerate(SIZES)]
    top_names = ["all" if k is None else str(k) for k in TOPS]
    return {
        "annotations": {
            "objects": len(size),
            "crowd_ignored": gt.crowd,
            **{f"objects_{name}": int(m.sum()) for name, m in groups[1:]},
        },
        "images": counts,
        "recall": {
            f"{t:.1f}": {top: {name: _mean((best[i] >= t)[m]) for name, m in groups} for i, top in enumerate(top_names)}
            for t in IOUS
        },
        "abo": {top: {name: _mean(best[i][m]) for name, m in groups} for i, top in enumerate(top_names)},
        "mabo": {top: {name: _mabo(best[i][m], category[m]) for name, m in groups} for i, top in enumerate(top_names)},
        "kept_boxes_per_image": _mean(kept),
        "seconds_per_image": {
            "count": int(seconds.size),
            "mean": _mean(seconds),
            "p50": round(float(np.median(seconds)), 4) if seconds.size else None,
            "total": round(float(seconds.sum()), 3),
        },
    }


class _ShardOverlaps(NamedTuple):
    counts: dict[str, int]  # rows, evaluated, failed_annotated, not_annotated, size_mismatch
    images: np.ndarray  # annotated image indices the rows matched
    best: np.ndarray  # [len(TOPS), G'] best overlaps of the objects of the evaluated and failed images
    size: np.ndarray  # [G'] their size classes
    category: np.ndarray  # [G']
    seconds: np.ndarray  # selective-search seconds of the evaluated images
    kept: np.ndarray  # kept boxes of the evaluated images


def _shard_overlaps(table, gt: GroundTruth) -> _ShardOverlaps:
    """One shard's rows against the ground truth."""
    n = table.num_rows
    ok = pc.equal(table["status"], schema.STATUS_OK).to_numpy(zero_copy_only=False)
    # annotated image of each row: by image_id, else by path
    image = np.full(n, -1, np.int64)
    ids = table["image_id"]
    has_id = ~ids.is_null().to_numpy(zero_copy_only=False)
    if has_id.any() and len(gt.ids):
        wanted = ids.fill_null(0).to_numpy()
        slot = np.minimum(np.searchsorted(gt.ids, wanted), len(gt.ids) - 1)
        image = np.where(has_id & (gt.ids[slot] == wanted), slot, -1)
    by_path = image < 0
    if by_path.any():  # e.g. a folder run: no image ids; a dict lookup for these rows only
        paths = table["path"].to_numpy(zero_copy_only=False)[by_path]
        image[by_path] = [gt.names.get(p, -1) for p in paths]
    matched = image >= 0

    orig = np.stack([table["orig_width"].fill_null(0).to_numpy(), table["orig_height"].fill_null(0).to_numpy()], 1)
    stored = np.stack([table["width"].fill_null(0).to_numpy(), table["height"].fill_null(0).to_numpy()], 1)
    frame = gt.frame[np.maximum(image, 0)] if len(gt.ids) else np.zeros((n, 2))
    frame = np.where(frame > 0, frame, orig)  # an image entry without width/height: trust the decoded size
    # boxes map onto the stored image only when the source decoded at the annotated size (not e.g. EXIF-rotated)
    size_ok = (orig == frame).all(axis=1) & (frame > 0).all(axis=1)
    use = matched & ok & size_ok
    miss = matched & ~ok  # failed rows: their objects are counted as missed

    rows = np.flatnonzero(use | miss)
    img = image[rows]
    n_obj = gt.start[img + 1] - gt.start[img]
    obj = np.repeat(gt.start[img], n_obj) + (np.arange(int(n_obj.sum())) - np.repeat(np.cumsum(n_obj) - n_obj, n_obj))
    slot = np.repeat(np.arange(len(rows)), n_obj)  # row slot of each object
    scale = (stored[rows] / np.where(frame[rows] > 0, frame[rows], 1))[slot]
    gt_boxes = gt.boxes[obj] * np.concatenate([scale, scale], axis=1)

    # proposals of the used rows, flat in rank order; failed rows get none
    boxes = table["boxes"].take(rows)
    per_row = pc.list_value_length(boxes).fill_null(0).to_numpy() * use[rows]
    flat = pc.list_flatten(pc.list_flatten(boxes.filter(pa.array(use[rows])))).to_numpy(zero_copy_only=False)
    props = flat.reshape(-1, 4).astype(np.float64)
    prop_start = np.concatenate([[0], np.cumsum(per_row)])
    best = best_overlaps(gt_boxes, slot, props, prop_start)

    seconds = table["ss_seconds"].to_numpy(zero_copy_only=False).astype(np.float64)[use]
    counts = {
        "rows": n,
        "evaluated": int(use.sum()),
        "failed_annotated": int(miss.sum()),
        "not_annotated": int((~matched).sum()),
        "size_mismatch": int((matched & ok & ~size_ok).sum()),
    }
    kept = table["kept_boxes"].fill_null(0).to_numpy()[use]
    return _ShardOverlaps(
        counts, image[matched], best, gt.size[obj], gt.category[obj], seconds[np.isfinite(seconds)], kept
    )


def _mean(x: np.ndarray) -> float | None:
    return round(float(np.mean(x)), 4) if len(x) else None


def _mabo(best: np.ndarray, category: np.ndarray) -> float | None:
    if not len(best):
        return None
    cats, inverse = np.unique(category, return_inverse=True)
    per_cat = np.bincount(inverse, weights=best) / np.bincount(inverse)
    return round(float(per_cat.mean()), 4)


def format_evaluation(r: dict[str, Any]) -> str:
    """Human-readable text of an ``evaluate`` result."""
    lines = describe_evaluation(r)
    groups = ["all"] + [name for name, _ in SIZES]
    labels = [f"recall@{t}" for t in r["recall"]] + ["MABO"]
    width = 8 * len(groups)
    lines.append(f"{'':10}" + "".join(f"  {label:^{width}}" for label in labels))
    lines.append(f"{'boxes':10}" + ("  " + "".join(f"{g:>8}" for g in groups)) * len(labels))
    for top in r["abo"]:
        cells = [r["recall"][t][top] for t in r["recall"]] + [r["mabo"][top]]
        label = "all" if top == "all" else f"first {top}"
        lines.append(f"{label:10}" + "".join("  " + "".join(f"{_f(c[g], 3):>8}" for g in groups) for c in cells))
    return "\n".join(lines)


def describe_evaluation(r: dict[str, Any]) -> list[str]:
    """The lines of ``format_evaluation`` above its table: what was evaluated, the objects, selective-search time."""
    im, a, s = r["images"], r["annotations"], r["seconds_per_image"]
    return [
        f"images: {im['evaluated']} evaluated of {im['rows']} rows ({im['failed_annotated']} failed, their objects "
        f"missed; {im['not_annotated']} not in the annotations; {im['size_mismatch']} decoded at another size, "
        f"skipped); {im['annotated_absent']} annotated images not in the output",
        f"objects: {a['objects']} (small {a['objects_small']}, medium {a['objects_medium']}, large "
        f"{a['objects_large']}); {a['crowd_ignored']} crowd annotations ignored",
        f"selective search: {_f(s['mean'], 3)} s per image (p50 {_f(s['p50'], 3)}, total {_f(s['total'], 1)} "
        f"s); {_f(r['kept_boxes_per_image'], 1)} kept boxes per image",
    ]


def _f(v: float | None, digits: int) -> str:
    return "-" if v is None else f"{v:.{digits}f}"
