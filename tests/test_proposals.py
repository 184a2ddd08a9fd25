"""prep.proposals: seeded selective search (determinism within and across processes), box mapping, filters."""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import subprocess
import sys

import cv2
import imagegen  # pytest (prepend import mode) puts tests/ on sys.path; the other test modules import it so too
import numpy as np
import pytest

from prep.config import PrepConfig
from prep.images import load_image
from prep.proposals import (
    Proposals,
    filter_boxes,
    image_seed,
    opencv_version,
    propose,
    selective_search,
    tiered_filter,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SS_SIDE = 128  # small, so selective search takes tens of milliseconds


@pytest.fixture(scope="module")
def photo():
    return load_image(imagegen.photo_path("coffee.jpg")).rgb  # 213 x 320


def digest(boxes: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(boxes, dtype=np.int32).tobytes()).hexdigest()


# --- seeds ---------------------------------------------------------------------------------------------------------
def test_image_seed_is_stable_and_32_bit():
    # fixed values: a change here changes every box order of every output ever made
    assert image_seed(0, "000000000139") == 380953431
    assert image_seed(1, "000000000139") == 1717129120
    assert image_seed(0, "a") == 3365935711
    seeds = {image_seed(0, f"k{i}") for i in range(1000)}
    assert len(seeds) == 1000 and all(0 <= s < 2**32 for s in seeds)


# --- why seeding, and that it works -------------------------------------------------------------------------------
def _raw_opencv(rgb: np.ndarray, srand: int | None) -> np.ndarray:
    cv2.setNumThreads(1)
    ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    ss.setBaseImage(np.ascontiguousarray(rgb[:, :, ::-1]))
    ss.switchToSelectiveSearchFast()
    if srand is not None:
        ctypes.CDLL(None).srand(ctypes.c_uint(srand))
    return ss.process()


def test_unseeded_opencv_order_changes_between_calls(photo):
    """The problem: OpenCV ranks regions with rand(), so two calls on the same image disagree on the order."""
    small = cv2.resize(photo, (SS_SIDE, 85), interpolation=cv2.INTER_AREA)
    a, b = _raw_opencv(small, None), _raw_opencv(small, None)
    assert not np.array_equal(a, b)
    c, d = _raw_opencv(small, 123), _raw_opencv(small, 123)
    np.testing.assert_array_equal(c, d)


def test_seeded_selective_search_repeats_within_process(photo):
    a = selective_search(photo, mode="fast", ss_max_side=SS_SIDE, seed=7)
    _raw_opencv(photo[:64, :64], None)  # move the C generator on in between
    b = selective_search(photo, mode="fast", ss_max_side=SS_SIDE, seed=7)
    np.testing.assert_array_equal(a, b)
    c = selective_search(photo, mode="fast", ss_max_side=SS_SIDE, seed=8)
    assert not np.array_equal(a, c)  # a different seed gives a different order


_CHILD = f"""
import hashlib, json, sys
import numpy as np
from prep.config import PrepConfig
from prep.images import load_image
from prep.proposals import propose, selective_search
out = {{}}
rgb = load_image(sys.argv[1]).rgb
for mode in ("fast", "single"):
    b = selective_search(rgb, mode=mode, ss_max_side={SS_SIDE}, seed=7)
    out[mode] = hashlib.sha256(np.ascontiguousarray(b, dtype=np.int32).tobytes()).hexdigest()
cfg = PrepConfig(kind="folder", root=".", ss_max_side={SS_SIDE}, min_side=16)
out["propose"] = propose(rgb, "coffee", cfg).boxes.tolist()
print(json.dumps(out))
"""


def test_seeded_selective_search_repeats_across_processes(photo):
    cfg = PrepConfig(kind="folder", root=".", ss_max_side=SS_SIDE, min_side=16)
    want = {
        "fast": digest(selective_search(photo, mode="fast", ss_max_side=SS_SIDE, seed=7)),
        "single": digest(selective_search(photo, mode="single", ss_max_side=SS_SIDE, seed=7)),
        "propose": propose(photo, "coffee", cfg).boxes.tolist(),
    }
    assert len(want["propose"]) >= 4
    for hash_seed in ("1", "2"):  # a different str-hash salt per child: image_seed must not depend on hash()
        env = dict(os.environ, PYTHONPATH=ROOT, PYTHONHASHSEED=hash_seed)
        res = subprocess.run(
            [sys.executable, "-c", _CHILD, imagegen.photo_path("coffee.jpg")],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout) == want


# --- output layout --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["fast", "quality", "single"])
def test_boxes_inside_image_in_rgb_pixels(mode):
    rgb = imagegen.textured_image(200, 150, seed=11)
    boxes = selective_search(rgb, mode=mode, ss_max_side=SS_SIDE, seed=1)
    assert boxes.dtype == np.int32 and boxes.ndim == 2 and boxes.shape[1] == 4
    assert len(boxes) > 20, "textured_image should give selective search many regions"
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= 200).all() and (boxes[:, 3] <= 150).all()
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    # a region spanning the whole resized image maps back onto the whole image
    assert ((boxes == [0, 0, 200, 150]).all(axis=1)).any()


def test_mapping_back_from_the_resized_image():
    rgb = imagegen.textured_image(200, 150, seed=12)
    seed = 5
    # what OpenCV sees: the image resized to SS_SIDE on the longer side, in BGR
    sw, sh = SS_SIDE, round(150 * SS_SIDE / 200)
    small = cv2.resize(rgb, (sw, sh), interpolation=cv2.INTER_AREA)
    raw = _raw_opencv(small, seed).astype(np.float64)  # x, y, w, h
    want = np.stack(
        [
            np.floor(raw[:, 0] * 200 / sw),
            np.floor(raw[:, 1] * 150 / sh),
            np.ceil((raw[:, 0] + raw[:, 2]) * 200 / sw),
            np.ceil((raw[:, 1] + raw[:, 3]) * 150 / sh),
        ],
        axis=1,
    )
    got = selective_search(rgb, mode="fast", ss_max_side=SS_SIDE, seed=seed)
    np.testing.assert_array_equal(got, np.minimum(want, [200, 150, 200, 150]))
    # no resize when the image is already small enough (never upscaled): boxes are OpenCV's, as xyxy
    small_raw = _raw_opencv(small, seed)
    got_small = selective_search(small, mode="fast", ss_max_side=SS_SIDE, seed=seed)
    xyxy = np.concatenate([small_raw[:, :2], small_raw[:, :2] + small_raw[:, 2:]], axis=1)
    np.testing.assert_array_equal(got_small, xyxy)


def test_tiny_and_flat_images_do_not_crash():
    for shape in ((8, 8, 3), (8, 200, 3), (150, 9, 3)):
        boxes = selective_search(np.full(shape, 100, np.uint8), mode="quality", ss_max_side=SS_SIDE, seed=0)
        assert boxes.shape[1] == 4
        assert (boxes[:, 2] <= shape[1]).all() and (boxes[:, 3] <= shape[0]).all()


def test_bad_arguments():
    with pytest.raises(ValueError):
        selective_search(np.zeros((20, 20, 3), np.uint8), mode="slow", ss_max_side=64, seed=0)
    with pytest.raises(ValueError):
        selective_search(np.zeros((20, 20), np.uint8), mode="fast", ss_max_side=64, seed=0)


# --- filters ----------------------------------------------------------------------------------------------------------
def _iou(a, b) -> float:
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def naive_filter(boxes, *, min_side, max_aspect, iou, max_boxes):
    """The definition, one box at a time."""
    kept = []
    for b in np.asarray(boxes).tolist():
        w, h = b[2] - b[0], b[3] - b[1]
        if w <= 0 or h <= 0 or w < min_side or h < min_side:
            continue
        if max(w / h, h / w) > max_aspect:
            continue
        if any(_iou(b, k) > iou for k in kept):
            continue
        kept.append(b)
        if len(kept) == max_boxes:
            break
    return np.asarray(kept, dtype=np.int32).reshape(-1, 4)


def test_filters_hand_made():
    boxes = np.array(
        [
            [0, 0, 64, 64],  # kept (min side exactly 64)
            [0, 0, 63, 100],  # too narrow
            [100, 0, 292, 64],  # aspect exactly 3: kept
            [100, 100, 293, 164],  # aspect 193/64 > 3: dropped
            [0, 0, 64, 32],  # too short
            [0, 0, 64, 128],  # IoU with the first = 0.5: kept (suppressed only above)
            [0, 0, 64, 120],  # IoU 0.53 with the first: dropped
            [300, 300, 400, 400],  # kept
            [310, 300, 410, 400],  # IoU 0.82 with the previous: dropped
            [500, 500, 600, 600],  # kept, but beyond max_boxes=4
            [10, 10, 10, 80],  # degenerate
        ]
    )
    got = filter_boxes(boxes, min_side=64, max_aspect=3.0, iou=0.5, max_boxes=4)
    np.testing.assert_array_equal(got, boxes[[0, 2, 5, 7]])
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, naive_filter(boxes, min_side=64, max_aspect=3.0, iou=0.5, max_boxes=4))


def test_filter_order_is_given_order_not_size():
    # a small box first suppresses a big one after it (greedy in selective-search order)
    boxes = np.array([[0, 0, 80, 80], [0, 0, 100, 100], [0, 0, 100, 100]])
    np.testing.assert_array_equal(filter_boxes(boxes, min_side=1, max_aspect=3, iou=0.5, max_boxes=10), boxes[:1])
    np.testing.assert_array_equal(
        filter_boxes(boxes[::-1], min_side=1, max_aspect=3, iou=0.5, max_boxes=10), boxes[1:2]
    )


def test_filters_match_naive_loop_on_random_boxes():
    rng = np.random.default_rng(0)
    for trial in range(60):
        n = int(rng.integers(0, 300))
        centres = rng.integers(0, 300, (n, 2))
        sizes = rng.integers(0, 160, (n, 2))  # zero-size boxes included
        boxes = np.concatenate([centres, centres + sizes], axis=1)
        params = dict(
            min_side=int(rng.choice([0, 1, 16, 64])),
            max_aspect=float(rng.choice([1.0, 1.5, 3.0, 10.0])),
            iou=float(rng.choice([0.1, 0.3, 0.5, 0.7, 1.0])),
            max_boxes=int(rng.choice([1, 5, 100, 1000])),
        )
        got = filter_boxes(boxes, **params)
        np.testing.assert_array_equal(got, naive_filter(boxes, **params), err_msg=f"trial {trial} {params}")


def naive_tiers(boxes, *, min_side, fallback_min_side, min_boxes, max_aspect, iou, max_boxes):
    """The definition of the two tiers, one box at a time: the first tier; then, only below K boxes, every box not yet
    kept with both sides >= the fallback side, against everything kept so far, until max_boxes."""
    first = naive_filter(boxes, min_side=min_side, max_aspect=max_aspect, iou=iou, max_boxes=max_boxes).tolist()
    if fallback_min_side is None or len(first) >= min_boxes:
        return np.asarray(first, dtype=np.int32).reshape(-1, 4), None
    kept, used = list(first), set()
    for b in first:  # the first tier's own boxes (by position: equal boxes may repeat) are not offered again
        used.add(next(i for i, c in enumerate(np.asarray(boxes).tolist()) if c == b and i not in used))
    added = 0
    for i, b in enumerate(np.asarray(boxes).tolist()):
        if i in used or len(kept) >= max_boxes:
            continue
        w, h = b[2] - b[0], b[3] - b[1]
        if w <= 0 or h <= 0 or w < fallback_min_side or h < fallback_min_side or max(w / h, h / w) > max_aspect:
            continue
        if any(_iou(b, k) > iou for k in kept):
            continue
        kept.append(b)
        added += 1
    return np.asarray(kept, dtype=np.int32).reshape(-1, 4), added


def test_tiers_hand_made():
    boxes = np.array(
        [
            [0, 0, 100, 100],  # tier 1
            [200, 0, 264, 64],  # 64 px: tier 2, after the tier-1 boxes
            [10, 10, 90, 90],  # 80 px, inside the first (IoU 0.64): suppressed by a tier-1 box that ranks before it
            [300, 300, 400, 400],  # tier 1
            [0, 300, 70, 370],  # tier 2
            [500, 500, 550, 550],  # 50 px: below both tiers
            [205, 0, 269, 64],  # tier 2 size, IoU 0.855 with the tier-2 box before it: suppressed
            [400, 0, 470, 70],  # tier 2, but max_boxes = 4 is reached
        ]
    )
    params = dict(min_side=96, fallback_min_side=64, max_aspect=3.0, iou=0.5, max_boxes=4)
    got, added = tiered_filter(boxes, min_boxes=4, **params)
    np.testing.assert_array_equal(got, boxes[[0, 3, 1, 4]])
    assert added == 2 and got.dtype == np.int32
    # enough first-tier boxes (K = 2): the second tier does not run
    got, added = tiered_filter(boxes, min_boxes=2, **params)
    np.testing.assert_array_equal(got, boxes[[0, 3]])
    assert added is None
    # no fallback side: one tier
    got, added = tiered_filter(boxes, min_boxes=4, **{**params, "fallback_min_side": None})
    np.testing.assert_array_equal(got, boxes[[0, 3]])
    assert added is None
    # the second tier ran and found nothing: 0, not None (the image needed it)
    got, added = tiered_filter(boxes[[0, 2, 5]], min_boxes=4, **params)
    np.testing.assert_array_equal(got, boxes[[0]])
    assert added == 0


def test_tiers_match_naive_loop_on_random_boxes():
    rng = np.random.default_rng(1)
    ran = 0
    for trial in range(80):
        n = int(rng.integers(0, 200))
        corners = rng.integers(0, 300, (n, 2))
        sizes = rng.integers(0, 160, (n, 2))
        boxes = np.concatenate([corners, corners + sizes], axis=1)
        if n and trial % 4 == 0:
            boxes = np.concatenate([boxes, boxes[: n // 3]])  # exact repeats, which iou = 1 does not suppress
        min_side = int(rng.choice([32, 64, 96, 128]))
        params = dict(
            min_side=min_side,
            fallback_min_side=int(rng.choice([1, 16, min_side // 2, min_side - 1])),
            min_boxes=int(rng.choice([0, 2, 4, 8, 30])),
            max_aspect=float(rng.choice([1.5, 3.0, 10.0])),
            iou=float(rng.choice([0.1, 0.3, 0.5, 0.7, 1.0])),
            max_boxes=int(rng.choice([1, 3, 10, 100])),
        )
        got, added = tiered_filter(boxes, **params)
        want, want_added = naive_tiers(boxes, **params)
        np.testing.assert_array_equal(got, want, err_msg=f"trial {trial} {params}")
        assert added == want_added, f"trial {trial} {params}"
        ran += added is not None and added > 0
    assert ran >= 10, "too few trials reached the second tier to test it"


def test_filter_empty_input():
    assert filter_boxes(np.zeros((0, 4), np.int32), min_side=1, max_aspect=3, iou=0.5, max_boxes=5).shape == (0, 4)


# --- propose ----------------------------------------------------------------------------------------------------------
def test_propose(photo):
    cfg = PrepConfig(kind="folder", root=".", ss_max_side=SS_SIDE, min_side=32, max_boxes=20)
    p = propose(photo, "coffee", cfg)
    assert isinstance(p, Proposals) and p.seconds > 0
    raw = selective_search(photo, mode="fast", ss_max_side=SS_SIDE, seed=image_seed(0, "coffee"))
    assert p.raw == len(raw)
    np.testing.assert_array_equal(p.boxes, filter_boxes(raw, min_side=32, max_aspect=3.0, iou=0.5, max_boxes=20))
    assert 4 <= len(p.boxes) <= 20
    other = propose(photo, "coffee2", cfg)  # the key is part of the seed
    assert other.raw == p.raw and not np.array_equal(other.boxes, p.boxes)


def test_propose_fills_from_the_fallback_tier(photo):
    # 150 px on a 213 x 320 photo leaves few first-tier boxes: the second tier fills up
    cfg = PrepConfig(kind="folder", root=".", ss_max_side=SS_SIDE, min_side=150, fallback_min_side=40, min_boxes=6)
    p = propose(photo, "coffee", cfg)
    raw = selective_search(photo, mode="fast", ss_max_side=SS_SIDE, seed=image_seed(0, "coffee"))
    first = filter_boxes(raw, min_side=150, max_aspect=3.0, iou=0.5, max_boxes=100)
    assert len(first) < 6 and p.fallback is not None and p.fallback > 0
    np.testing.assert_array_equal(p.boxes[: len(first)], first)
    assert len(p.boxes) == len(first) + p.fallback
    assert (np.minimum(p.boxes[:, 2] - p.boxes[:, 0], p.boxes[:, 3] - p.boxes[:, 1])[len(first) :] < 150).all()
    one_tier = PrepConfig(kind="folder", root=".", ss_max_side=SS_SIDE, min_side=150, fallback_min_side=None)
    q = propose(photo, "coffee", one_tier)
    assert q.fallback is None
    np.testing.assert_array_equal(q.boxes, first)


def test_config_tiers():
    d = PrepConfig(kind="folder", root=".")
    assert (d.min_side, d.fallback_min_side, d.min_boxes) == (96, 64, 4)  # the papers'
    # a fallback that cannot add a box is no fallback: one spelling, one fingerprint
    assert PrepConfig(kind="folder", root=".", min_side=64).fallback_min_side is None
    assert (
        PrepConfig(kind="folder", root=".", min_side=64).fingerprint()
        == PrepConfig(kind="folder", root=".", min_side=64, fallback_min_side=None).fingerprint()
    )
    assert d.fingerprint() != PrepConfig(kind="folder", root=".", fallback_min_side=None).fingerprint()
    assert d.fingerprint() != PrepConfig(kind="folder", root=".", fallback_min_side=48).fingerprint()
    assert d.to_dict()["fallback_min_side"] == 64
    # a config recorded before the second tier existed had none
    old = {k: v for k, v in d.to_dict().items() if k != "fallback_min_side"}
    assert PrepConfig.from_dict(old).fallback_min_side is None
    assert PrepConfig.from_dict(d.to_dict()) == d
    with pytest.raises(ValueError, match="fallback_min_side"):
        PrepConfig(kind="folder", root=".", fallback_min_side=0)


def test_opencv_version():
    assert opencv_version() == cv2.__version__ and opencv_version()[0].isdigit()


def test_import_loads_no_torch():
    code = (
        "import sys, prep.images, prep.proposals; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision')))"
    )
    res = subprocess.run(
        [sys.executable, "-c", code],
        env=dict(os.environ, PYTHONPATH=ROOT),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
