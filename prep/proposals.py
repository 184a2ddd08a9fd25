"""Reproducible OpenCV selective search and the ORL/UniVIP box filters.

Why seeding is needed: OpenCV's ximgproc selective search ranks every region of its hierarchy by
``rand() * level`` (the C library's generator) and sorts by that rank, so the order of the boxes, and with it
"the first 100", changes from call to call. Seeding the C library's generator with ``srand`` right before
``process()`` makes the same image and seed give the same boxes in the same order in any process
(tests/test_proposals.py checks both the problem and the fix, across processes too).
"""

from __future__ import annotations

import ctypes
import hashlib
import time
from dataclasses import dataclass

import cv2
import numpy as np

from prep.config import SS_MODES, PrepConfig

# The process's own C library, where OpenCV's rand() resolves (CDLL(None) = the global symbol namespace on Linux and
# macOS). Windows' CRT keeps rand() state per thread and per CRT, so seeding there is untested.
_libc = ctypes.CDLL(None)
_libc.srand.argtypes = [ctypes.c_uint]
_libc.srand.restype = None


def opencv_version() -> str:
    """OpenCV version string for the manifest (selective search output can change between OpenCV releases)."""
    return cv2.__version__


def image_seed(seed: int, key: str) -> int:
    """Per-image C ``srand`` seed from the run seed and the sample key: a 32-bit slice of SHA-256, so the same on every
    process, platform and Python (unlike ``hash()``, which is salted per process)."""
    digest = hashlib.sha256(f"{int(seed)}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def selective_search(rgb: np.ndarray, *, mode: str, ss_max_side: int, seed: int) -> np.ndarray:
    """Selective search on ``rgb`` (uint8 [H, W, 3]) resized so its longer side is at most ``ss_max_side`` (never up).

    Returns int32 [N, 4] boxes ``x0, y0, x1, y1``, end-exclusive, in ``rgb``'s pixels, clipped to the image, in
    selective-search rank order. ``seed`` (see ``image_seed``) seeds the C library's ``rand()`` right before
    ``process()``. Raises cv2.error if OpenCV fails.
    """
    if mode not in SS_MODES:
        raise ValueError(f"mode must be one of {SS_MODES}, got {mode!r}")
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"rgb must be uint8 [H, W, 3], got {rgb.dtype} {rgb.shape}")
    h, w = rgb.shape[:2]
    s = min(1.0, ss_max_side / max(h, w))
    sw, sh = max(1, round(w * s)), max(1, round(h * s))
    small = rgb if (sw, sh) == (w, h) else cv2.resize(rgb, (sw, sh), interpolation=cv2.INTER_AREA)
    bgr = np.ascontiguousarray(small[:, :, ::-1])  # OpenCV's colour strategies assume BGR

    # One thread: prep runs one process per core (more threads would oversubscribe them), and no OpenCV worker
    # thread can interleave rand() calls with ours. A process-wide setting, cheap to repeat, so set it per call.
    cv2.setNumThreads(1)
    ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    ss.setBaseImage(bgr)
    if mode == "fast":
        ss.switchToSelectiveSearchFast()
    elif mode == "quality":
        ss.switchToSelectiveSearchQuality()
    else:
        ss.switchToSingleStrategy()
    _libc.srand(seed & 0xFFFFFFFF)
    rects = ss.process()  # int32 [N, 4] x, y, w, h in the resized image
    if rects is None or len(rects) == 0:
        return np.zeros((0, 4), np.int32)

    # Back to rgb pixels with exact integer arithmetic: floor the start and ceil the end, so each box covers the whole
    # region it came from.
    r = np.asarray(rects, dtype=np.int64).reshape(-1, 4)
    x0 = r[:, 0] * w // sw
    y0 = r[:, 1] * h // sh
    x1 = -(-(r[:, 0] + r[:, 2]) * w // sw)
    y1 = -(-(r[:, 1] + r[:, 3]) * h // sh)
    boxes = np.stack([np.clip(x0, 0, w), np.clip(y0, 0, h), np.clip(x1, 0, w), np.clip(y1, 0, h)], axis=1)
    return boxes.astype(np.int32)


def filter_boxes(
    boxes: np.ndarray,
    *,
    min_side: int,
    max_aspect: float,
    iou: float,
    max_boxes: int,
    kept: np.ndarray | None = None,
) -> np.ndarray:
    """ORL/UniVIP filters in the given order: int [N, 4] xyxy end-exclusive boxes -> int32 [M, 4], M <= max_boxes.

    A box is kept when both sides are >= ``min_side``, ``max(w/h, h/w) <= max_aspect``, and its IoU with every box
    kept before it is <= ``iou`` (greedy suppression in the given order, not by score); the first ``max_boxes`` kept.
    ``kept``: int [K, 4] boxes kept earlier (another tier): candidates are suppressed against them too, they count
    towards ``max_boxes``, and only the newly kept boxes are returned.
    """
    prior = np.zeros((0, 4), np.int64) if kept is None else np.asarray(kept).reshape(-1, 4).astype(np.int64)
    max_boxes -= len(prior)
    b = np.asarray(boxes).reshape(-1, 4).astype(np.int64)
    bw = b[:, 2] - b[:, 0]
    bh = b[:, 3] - b[:, 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        aspect = np.maximum(bw / bh, bh / bw)  # inf or nan for a degenerate box: fails the test below
    ok = (bw >= min_side) & (bh >= min_side) & (bw > 0) & (bh > 0) & (aspect <= max_aspect)
    b = b[ok]
    n = len(b)
    if n == 0 or max_boxes <= 0:
        return np.zeros((0, 4), np.int32)

    area = _area(b)
    suppressed = np.zeros(n, bool)
    for p in prior:  # a few boxes (fewer than K): one vector op each
        suppressed |= _iou_with(b, area, p) > iou
    keep: list[int] = []
    nxt = np.flatnonzero(~suppressed)
    i = int(nxt[0]) if len(nxt) else n
    # Python iterates over kept boxes only (at most max_boxes); each one suppresses the later boxes in one vector op.
    while i < n and len(keep) < max_boxes:
        keep.append(i)
        rest = slice(i + 1, n)
        suppressed[rest] |= _iou_with(b[rest], area[rest], b[i]) > iou
        nxt = np.flatnonzero(~suppressed[rest])
        if len(nxt) == 0:
            break
        i = i + 1 + int(nxt[0])
    return b[keep].astype(np.int32)


def _area(b: np.ndarray) -> np.ndarray:
    return ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).astype(np.float64)


def _iou_with(b: np.ndarray, area: np.ndarray, one: np.ndarray) -> np.ndarray:
    """IoU of every box of ``b`` (int64 [N, 4], areas ``area``) with the box ``one``."""
    iw = np.minimum(b[:, 2], one[2]) - np.maximum(b[:, 0], one[0])
    ih = np.minimum(b[:, 3], one[3]) - np.maximum(b[:, 1], one[1])
    inter = (np.maximum(iw, 0) * np.maximum(ih, 0)).astype(np.float64)
    return inter / (area + _area(one[None])[0] - inter)


def tiered_filter(
    boxes: np.ndarray,
    *,
    min_side: int,
    fallback_min_side: int | None,
    min_boxes: int,
    max_aspect: float,
    iou: float,
    max_boxes: int,
) -> tuple[np.ndarray, int | None]:
    """The two tiers of UniVIP: ``filter_boxes`` with ``min_side``; only when fewer than ``min_boxes`` (K) survive and
    ``fallback_min_side`` is set, the boxes with a shorter side in ``[fallback_min_side, min_side)`` are filtered by
    the same rules, in the given order, suppressed against the first tier's boxes too, until ``max_boxes`` in all.

    Returns (int32 [M, 4]: the first tier's boxes then the fallback's, each in the given order; the number of boxes
    the fallback added, or None when it did not run). Boxes of ``min_side`` and more are not offered twice: one the
    first tier did not keep failed the aspect test, or overlaps a kept box, or found the list full, all still true."""
    first = filter_boxes(boxes, min_side=min_side, max_aspect=max_aspect, iou=iou, max_boxes=max_boxes)
    if fallback_min_side is None or fallback_min_side >= min_side or len(first) >= min_boxes:
        return first, None
    b = np.asarray(boxes).reshape(-1, 4)
    small = b[np.minimum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]) < min_side]
    extra = filter_boxes(
        small, min_side=fallback_min_side, max_aspect=max_aspect, iou=iou, max_boxes=max_boxes, kept=first
    )
    return np.concatenate([first, extra]), len(extra)


@dataclass
class Proposals:
    """raw: box count from selective search before filters; boxes: int32 [M, 4] kept, xyxy in the stored image's
    pixels, rank order (first tier, then fallback); seconds: selective-search time (wall clock, not reproducible);
    fallback: boxes the second tier added, None when it did not run (``tiered_filter``)."""

    raw: int
    boxes: np.ndarray
    seconds: float
    fallback: int | None = None


def propose(rgb: np.ndarray, key: str, cfg: PrepConfig) -> Proposals:
    """Seeded selective search on the stored image ``rgb`` (uint8 [H, W, 3]) then the filter tiers, all settings from
    cfg."""
    t0 = time.perf_counter()
    raw = selective_search(rgb, mode=cfg.mode, ss_max_side=cfg.ss_max_side, seed=image_seed(cfg.seed, key))
    seconds = time.perf_counter() - t0
    boxes, fallback = filter_with(raw, cfg)
    return Proposals(raw=len(raw), boxes=boxes, seconds=seconds, fallback=fallback)


def filter_with(raw: np.ndarray, cfg: PrepConfig) -> tuple[np.ndarray, int | None]:
    """``tiered_filter`` with the settings of ``cfg``."""
    return tiered_filter(
        raw,
        min_side=cfg.min_side,
        fallback_min_side=cfg.fallback_min_side,
        min_boxes=cfg.min_boxes,
        max_aspect=cfg.max_aspect,
        iou=cfg.iou,
        max_boxes=cfg.max_boxes,
    )
