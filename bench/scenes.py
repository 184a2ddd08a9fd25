"""Cluttered scenes of shape objects on real photo textures: a labelled, non-iconic data set the project makes itself.

Each scene is a photo texture (a random crop of one of the bundled sample photos, ``data/sample``) with 3-6 objects of
four shape classes (``CLASSES``) pasted on it. An object is a rotated shape filled with a crop of another photo,
recoloured at random and outlined, so that neither colour nor texture tells the class: only the silhouette does.
Objects barely overlap (a new one is refused when it would cover more than ``MAX_COVER`` of an earlier one's box),
so every annotated object is visible.

Two products, both deterministic in (seed, index), whatever the number of processes:
- ``scenes OUT``: ``OUT/images/*.jpg`` and ``OUT/annotations/instances.json`` in COCO's layout (images, annotations
  with ``bbox`` [x, y, w, h], ``area`` = the object's pixel count, ``category_id``, ``iscrowd`` 0; categories), for
  ``prep coco OUT/images --annotations OUT/annotations/instances.json`` and proposal-recall evaluation;
- ``crops OUT``: the objects of other scenes cut out with some context and resized to a square, as an ImageNet-style
  tree ``OUT/<class>/<name>.jpg`` for ``prep imagenet`` (labelled data for ``python -m train.eval``).

    python bench/scenes.py scenes /tmp/scenes --n 1000 --size 160 --seed 0
    python bench/scenes.py crops /tmp/probe --n 400 --size 160 --crop-size 64 --seed 1
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ("disc", "square", "triangle", "cross")
MAX_COVER = 0.1  # a new object may cover at most this fraction of an earlier object's box (and vice versa)
OBJECTS = (3, 6)  # objects per scene, inclusive
SIZE_RANGE = (0.2, 0.42)  # object side as a fraction of the scene side
JPEG_QUALITY = 90


def photo_paths() -> list[str]:
    """The bundled sample photos (real photos from scikit-image / scikit-learn, see data/sample/README.md)."""
    paths = sorted(glob.glob(os.path.join(ROOT, "data", "sample", "**", "*.jpg"), recursive=True))
    if not paths:
        raise FileNotFoundError(f"no sample photos under {os.path.join(ROOT, 'data', 'sample')}")
    return paths


_PHOTOS: list[np.ndarray] = []


def _photos() -> list[np.ndarray]:
    if not _PHOTOS:  # once per process
        _PHOTOS.extend(np.asarray(Image.open(p).convert("RGB")) for p in photo_paths())
    return _PHOTOS


def texture(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """A random crop of a random photo resized to ``w`` x ``h``, with its colours scrambled (channel permutation,
    per-channel gain) so that a texture's colour says nothing about what it is used for. uint8 ``[h, w, 3]``."""
    photo = _photos()[rng.integers(len(_photos()))]
    ph, pw = photo.shape[:2]
    side = int(rng.uniform(0.25, 0.8) * min(ph, pw))
    x0, y0 = rng.integers(0, pw - side + 1), rng.integers(0, ph - side + 1)
    patch = cv2.resize(photo[y0 : y0 + side, x0 : x0 + side], (w, h), interpolation=cv2.INTER_AREA)
    patch = patch[:, :, rng.permutation(3)].astype(np.float32) * rng.uniform(0.6, 1.4, 3)
    return np.clip(patch, 0, 255).astype(np.uint8)


def shape_mask(cls: str, side: int, angle: float) -> np.ndarray:
    """bool ``[side, side]``: the shape of class ``cls`` rotated by ``angle`` radians, centred, filling most of it."""
    r = side / 2.0
    c = np.array([r, r])
    if cls == "disc":
        mask = np.zeros((side, side), np.uint8)
        cv2.circle(
            mask,
            (int(round(r * 16)), int(round(r * 16))),
            int(round(0.48 * side * 16)),
            1,
            -1,
            lineType=cv2.LINE_8,
            shift=4,
        )
        return mask.astype(bool)
    if cls == "square":
        corners = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float64) * 0.34 * side
    elif cls == "triangle":
        corners = np.array([[math.cos(a), math.sin(a)] for a in np.deg2rad([-90, 30, 150])]) * 0.48 * side
    elif cls == "cross":
        a, b = 0.48 * side, 0.16 * side
        corners = np.array(
            [
                [-b, -a],
                [b, -a],
                [b, -b],
                [a, -b],
                [a, b],
                [b, b],
                [b, a],
                [-b, a],
                [-b, b],
                [-a, b],
                [-a, -b],
                [-b, -b],
            ],
            np.float64,
        )
    else:
        raise ValueError(f"unknown shape class {cls!r}; expected one of {CLASSES}")
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    pts = (corners @ rot.T + c) * 16
    mask = np.zeros((side, side), np.uint8)
    cv2.fillPoly(mask, [np.round(pts).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
    return mask.astype(bool)


@dataclass
class SceneObject:
    cls: int  # index into CLASSES
    box: tuple[int, int, int, int]  # tight xyxy, end-exclusive, scene pixels
    area: int  # pixels of the shape


def _cover(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    """Largest fraction of either box covered by their intersection."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    return max(inter / ((a[2] - a[0]) * (a[3] - a[1])), inter / ((b[2] - b[0]) * (b[3] - b[1])))


def scene(seed: int, index: int, size: int) -> tuple[np.ndarray, list[SceneObject]]:
    """Scene ``index`` of the set ``seed``: uint8 ``[size, size, 3]`` and its objects (a pure function of the args)."""
    rng = np.random.default_rng((seed, index))
    img = texture(rng, size, size)
    objects: list[SceneObject] = []
    want = int(rng.integers(OBJECTS[0], OBJECTS[1] + 1))
    for _ in range(want * 10):  # placement tries
        if len(objects) == want:
            break
        side = int(rng.uniform(*SIZE_RANGE) * size)
        cls = int(rng.integers(len(CLASSES)))
        mask = shape_mask(CLASSES[cls], side, float(rng.uniform(0, 2 * math.pi)))
        x0, y0 = int(rng.integers(0, size - side + 1)), int(rng.integers(0, size - side + 1))
        ys, xs = np.nonzero(mask)
        box = (x0 + int(xs.min()), y0 + int(ys.min()), x0 + int(xs.max()) + 1, y0 + int(ys.max()) + 1)
        if any(_cover(box, o.box) > MAX_COVER for o in objects):
            continue
        fill = texture(rng, side, side)
        # an outline of random colour and width: objects have edges, as real ones do
        width = int(rng.integers(1, max(2, side // 16) + 1))
        edge = mask & ~cv2.erode(mask.astype(np.uint8), np.ones((2 * width + 1,) * 2, np.uint8)).astype(bool)
        fill[edge] = rng.integers(0, 256, 3)
        region = img[y0 : y0 + side, x0 : x0 + side]
        region[mask] = fill[mask]
        objects.append(SceneObject(cls, box, int(mask.sum())))
    return img, objects


def _jpeg(path: str, rgb: np.ndarray) -> None:
    Image.fromarray(rgb).save(path, "JPEG", quality=JPEG_QUALITY)


def _scene_job(args: tuple[str, int, int, int]) -> list[dict]:
    out, seed, index, size = args
    img, objects = scene(seed, index, size)
    _jpeg(os.path.join(out, "images", f"{index:08d}.jpg"), img)
    return [{"cls": o.cls, "box": o.box, "area": o.area} for o in objects]


def _crop_job(args: tuple[str, int, int, int, int, float]) -> list[tuple[int, str]]:
    out, seed, index, size, crop_size, margin = args
    img, objects = scene(seed, index, size)
    written = []
    for j, o in enumerate(objects):
        x0, y0, x1, y1 = o.box
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        half = max(x1 - x0, y1 - y0) * (0.5 + margin)  # a square with context around the object
        a0, b0 = max(0, int(round(cx - half))), max(0, int(round(cy - half)))
        a1, b1 = min(size, int(round(cx + half))), min(size, int(round(cy + half)))
        crop = cv2.resize(img[b0:b1, a0:a1], (crop_size, crop_size), interpolation=cv2.INTER_AREA)
        name = f"{index:08d}_{j}.jpg"
        _jpeg(os.path.join(out, CLASSES[o.cls], name), crop)
        written.append((o.cls, name))
    return written


def _map(fn, jobs: list, workers: int) -> list:
    if workers <= 1:
        return [fn(j) for j in jobs]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(fn, jobs, chunksize=max(1, len(jobs) // (8 * workers))))


def make_scenes(out: str, n: int, *, size: int = 160, seed: int = 0, workers: int = 1) -> str:
    """Write ``n`` scenes as a COCO-style set under ``out``; returns the annotation JSON's path."""
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    os.makedirs(os.path.join(out, "annotations"), exist_ok=True)
    per_scene = _map(_scene_job, [(out, seed, i, size) for i in range(n)], workers)
    images, annotations = [], []
    for i, objects in enumerate(per_scene):
        images.append({"id": i + 1, "file_name": f"{i:08d}.jpg", "width": size, "height": size})
        for o in objects:
            x0, y0, x1, y1 = o["box"]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i + 1,
                    "category_id": o["cls"] + 1,
                    "bbox": [x0, y0, x1 - x0, y1 - y0],
                    "area": o["area"],
                    "iscrowd": 0,
                }
            )
    doc = {
        "info": {"description": f"bench/scenes.py scenes: n={n} size={size} seed={seed}"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": c + 1, "name": name} for c, name in enumerate(CLASSES)],
    }
    path = os.path.join(out, "annotations", "instances.json")
    with open(path, "w") as f:
        json.dump(doc, f)
    return path


def make_crops(
    out: str, n: int, *, size: int = 160, crop_size: int = 64, margin: float = 0.15, seed: int = 1, workers: int = 1
) -> dict[str, int]:
    """Write the objects of ``n`` scenes as ``out/<class>/*.jpg``; returns the count per class."""
    for name in CLASSES:
        os.makedirs(os.path.join(out, name), exist_ok=True)
    written = _map(_crop_job, [(out, seed, i, size, crop_size, margin) for i in range(n)], workers)
    counts = dict.fromkeys(CLASSES, 0)
    for items in written:
        for cls, _ in items:
            counts[CLASSES[cls]] += 1
    return counts


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("what", choices=("scenes", "crops"), help="scenes: COCO-style set; crops: labelled object crops")
    p.add_argument("out", help="output directory")
    p.add_argument("--n", type=int, default=1000, help="number of scenes (crops: scenes the objects come from)")
    p.add_argument("--size", type=int, default=160, help="scene side in pixels")
    p.add_argument("--crop-size", type=int, default=64, help="crops: side of each object crop")
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="set seed (default: 0 for scenes, 1 for crops, so the crops never come from the training scenes)",
    )
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    a = p.parse_args(argv)
    if a.what == "scenes":
        path = make_scenes(a.out, a.n, size=a.size, seed=0 if a.seed is None else a.seed, workers=a.workers)
        print(f"{a.n} scenes: {path}")
    else:
        counts = make_crops(
            a.out, a.n, size=a.size, crop_size=a.crop_size, seed=1 if a.seed is None else a.seed, workers=a.workers
        )
        print(f"{sum(counts.values())} object crops in {a.out}: {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
