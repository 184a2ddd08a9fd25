"""Cluttered scenes of shape objects on real photo textures: labelled, non-iconic data sets the project makes itself.

Each scene is a background texture (a random crop of a photo) with 3-6 objects of four classes (``CLASSES``) pasted
on it. An object is a rotated shape filled with a crop of a photo or texture and outlined. Objects barely overlap (a
new one is refused when it would cover more than ``MAX_COVER`` of an earlier one's box), so every annotated object is
visible. Two sets (``SETS``), which differ in what the class decides:
- ``shape``: the class decides the silhouette only. Fills and backgrounds are crops of the same 8 sample photos
  (``data/sample``) with their colours scrambled (channel permutation, per-channel gain), so neither colour nor
  texture says anything about the class. Adversarial for instance discrimination on purpose: the texture, which
  both views share, identifies an object without telling its class;
- ``category``: the class decides the silhouette AND the appearance family, as an object category of COCO does:
  each class fills from its own pool of two textures (``CATEGORY_FILLS``, ``data/textures`` and one sample photo),
  instances varying in crop position, scale, rotation and colour (scrambled as in ``shape``: an object category's
  instances come in every colour); backgrounds come from a pool of their own (the other sample photos).

Every scene records which source its background and each object's fill came from, for the probes that ask what a
representation encodes (``bench/probes.py``).

Products, all deterministic in (set, seed, index), whatever the number of processes:
- ``scenes OUT``: ``OUT/images/*.jpg`` and ``OUT/annotations/instances.json`` in COCO's layout (images, annotations
  with ``bbox`` [x, y, w, h], ``area`` = the object's pixel count, ``category_id``, ``iscrowd`` 0; categories; and
  the sources: ``background`` per image, ``fill`` per annotation), for ``prep coco OUT/images --annotations
  OUT/annotations/instances.json`` and proposal-recall evaluation;
- ``crops OUT``: the objects of other scenes cut out with some context and resized to a square, as an ImageNet-style
  tree ``OUT/<label>/<name>.jpg`` for ``prep imagenet`` (labelled data for ``python -m train.eval``); the label is the
  object's class (default) or the source of its fill (``--label fill``);
- ``backgrounds OUT``: whole scenes resized to a square, labelled by the source of their background.

    python bench/scenes.py scenes /tmp/scenes --n 1000 --size 160 --seed 0 --set category
    python bench/scenes.py crops /tmp/probe --n 400 --size 160 --crop-size 64 --seed 1 --set category
    python bench/scenes.py crops /tmp/probe-fill --n 400 --size 160 --crop-size 64 --seed 1 --label fill
"""

from __future__ import annotations

import argparse
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


# Sources of every texture, by name: the 8 distinct photos of data/sample (its ImageNet folder holds crops of three
# of them) and 6 textures of scikit-image's data folder (data/textures/README.md).
SOURCES = {
    "astronaut": "data/sample/coco/images/000000000001.jpg",
    "coffee": "data/sample/coco/images/000000000002.jpg",
    "chelsea": "data/sample/coco/images/000000000003.jpg",
    "rocket": "data/sample/coco/images/000000000004.jpg",
    "hubble": "data/sample/coco/images/000000000005.jpg",
    "ihc": "data/sample/coco/images/000000000006.jpg",
    "china": "data/sample/coco/images/000000000007.jpg",
    "flower": "data/sample/coco/images/000000000008.jpg",
    "brick": "data/textures/brick.jpg",
    "camera": "data/textures/camera.jpg",
    "cell": "data/textures/cell.jpg",
    "coins": "data/textures/coins.jpg",
    "grass": "data/textures/grass.jpg",
    "gravel": "data/textures/gravel.jpg",
    "retina": "data/textures/retina.jpg",
}
SHAPE_SOURCES = ("astronaut", "coffee", "chelsea", "rocket", "hubble", "ihc", "china", "flower")
# category set: each class fills from its own pool; backgrounds from sources no class uses
CATEGORY_FILLS = {
    "disc": ("brick", "coins"),
    "square": ("grass", "cell"),
    "triangle": ("gravel", "ihc"),
    "cross": ("camera", "retina"),
}
CATEGORY_BACKGROUNDS = ("astronaut", "coffee", "chelsea", "rocket", "hubble", "china", "flower")
SETS = ("shape", "category")


def photo_paths() -> list[str]:
    """Every source file, in ``SOURCES`` order (real photos and textures from scikit-image / scikit-learn)."""
    paths = [os.path.join(ROOT, rel) for rel in SOURCES.values()]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"texture sources missing: {missing}")
    return paths


_PHOTOS: dict[str, np.ndarray] = {}


def _photo(name: str) -> np.ndarray:
    if not _PHOTOS:  # once per process
        for key, path in zip(SOURCES, photo_paths(), strict=True):
            _PHOTOS[key] = np.asarray(Image.open(path).convert("RGB"))
    return _PHOTOS[name]


def texture(rng: np.random.Generator, w: int, h: int, source: str, *, angle: float = 0.0) -> np.ndarray:
    """A random square crop of photo ``source`` (a quarter to 80 % of its shorter side), rotated by ``angle``
    degrees, resized to ``w`` x ``h``, its colours scrambled (channel permutation, per-channel gain 0.6-1.4: a grey
    texture gets a random tint) so that colour says nothing about what it is used for, in either set: an object
    category's instances come in every colour, its texture family and shape are what it shares. uint8 ``[h, w, 3]``."""
    photo = _photo(source)
    ph, pw = photo.shape[:2]
    side = int(rng.uniform(0.25, 0.8) * min(ph, pw))
    x0, y0 = rng.integers(0, pw - side + 1), rng.integers(0, ph - side + 1)
    patch = photo[y0 : y0 + side, x0 : x0 + side]
    if angle:  # rotate about the centre; reflected borders keep the corners textured
        m = cv2.getRotationMatrix2D((side / 2, side / 2), angle, 1.0)
        patch = cv2.warpAffine(patch, m, (side, side), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
    patch = cv2.resize(patch, (w, h), interpolation=cv2.INTER_AREA)
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
    fill: str  # the SOURCES name its fill was cut from


def _cover(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    """Largest fraction of either box covered by their intersection."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    return max(inter / ((a[2] - a[0]) * (a[3] - a[1])), inter / ((b[2] - b[0]) * (b[3] - b[1])))


def scene(seed: int, index: int, size: int, kind: str = "shape") -> tuple[np.ndarray, list[SceneObject], str]:
    """Scene ``index`` of the set (``kind``, ``seed``): uint8 ``[size, size, 3]``, its objects and the source of its
    background (a pure function of the arguments)."""
    if kind not in SETS:
        raise ValueError(f"unknown scene set {kind!r}; expected one of {SETS}")
    rng = np.random.default_rng((seed, index) if kind == "shape" else (seed, index, SETS.index(kind)))
    backgrounds = SHAPE_SOURCES if kind == "shape" else CATEGORY_BACKGROUNDS
    background = backgrounds[rng.integers(len(backgrounds))]
    img = texture(rng, size, size, background)
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
        if kind == "shape":
            source = SHAPE_SOURCES[rng.integers(len(SHAPE_SOURCES))]
            fill = texture(rng, side, side, source)
        else:
            pool = CATEGORY_FILLS[CLASSES[cls]]
            source = pool[rng.integers(len(pool))]
            fill = texture(rng, side, side, source, angle=float(rng.uniform(0, 360)))
        # an outline of random colour and width: objects have edges, as real ones do
        width = int(rng.integers(1, max(2, side // 16) + 1))
        edge = mask & ~cv2.erode(mask.astype(np.uint8), np.ones((2 * width + 1,) * 2, np.uint8)).astype(bool)
        fill[edge] = rng.integers(0, 256, 3)
        region = img[y0 : y0 + side, x0 : x0 + side]
        region[mask] = fill[mask]
        objects.append(SceneObject(cls, box, int(mask.sum()), source))
    return img, objects, background


def _jpeg(path: str, rgb: np.ndarray) -> None:
    Image.fromarray(rgb).save(path, "JPEG", quality=JPEG_QUALITY)


def _scene_job(args: tuple[str, str, int, int, int]) -> tuple[str, list[dict]]:
    out, kind, seed, index, size = args
    img, objects, background = scene(seed, index, size, kind)
    _jpeg(os.path.join(out, "images", f"{index:08d}.jpg"), img)
    return background, [{"cls": o.cls, "box": o.box, "area": o.area, "fill": o.fill} for o in objects]


LABELS = ("class", "fill")  # what a crop's folder names: its object's class, or the source of its fill


def _crop_job(args: tuple[str, str, int, int, int, int, float, str]) -> list[str]:
    out, kind, seed, index, size, crop_size, margin, label = args
    img, objects, _ = scene(seed, index, size, kind)
    written = []
    for j, o in enumerate(objects):
        x0, y0, x1, y1 = o.box
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        half = max(x1 - x0, y1 - y0) * (0.5 + margin)  # a square with context around the object
        a0, b0 = max(0, int(round(cx - half))), max(0, int(round(cy - half)))
        a1, b1 = min(size, int(round(cx + half))), min(size, int(round(cy + half)))
        crop = cv2.resize(img[b0:b1, a0:a1], (crop_size, crop_size), interpolation=cv2.INTER_AREA)
        folder = CLASSES[o.cls] if label == "class" else o.fill
        os.makedirs(os.path.join(out, folder), exist_ok=True)
        _jpeg(os.path.join(out, folder, f"{index:08d}_{j}.jpg"), crop)
        written.append(folder)
    return written


def _background_job(args: tuple[str, str, int, int, int, int]) -> str:
    out, kind, seed, index, size, crop_size = args
    img, _, background = scene(seed, index, size, kind)
    os.makedirs(os.path.join(out, background), exist_ok=True)
    small = cv2.resize(img, (crop_size, crop_size), interpolation=cv2.INTER_AREA)
    _jpeg(os.path.join(out, background, f"{index:08d}.jpg"), small)
    return background


def _map(fn, jobs: list, workers: int) -> list:
    if workers <= 1:
        return [fn(j) for j in jobs]
    with ProcessPoolExecutor(workers) as pool:
        return list(pool.map(fn, jobs, chunksize=max(1, len(jobs) // (8 * workers))))


def make_scenes(out: str, n: int, *, size: int = 160, seed: int = 0, workers: int = 1, kind: str = "shape") -> str:
    """Write ``n`` scenes of set ``kind`` as a COCO-style set under ``out``; returns the annotation JSON's path."""
    os.makedirs(os.path.join(out, "images"), exist_ok=True)
    os.makedirs(os.path.join(out, "annotations"), exist_ok=True)
    per_scene = _map(_scene_job, [(out, kind, seed, i, size) for i in range(n)], workers)
    images, annotations = [], []
    for i, (background, objects) in enumerate(per_scene):
        images.append(
            {"id": i + 1, "file_name": f"{i:08d}.jpg", "width": size, "height": size, "background": background}
        )
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
                    "fill": o["fill"],
                }
            )
    doc = {
        "info": {"description": f"bench/scenes.py scenes: set={kind} n={n} size={size} seed={seed}"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": c + 1, "name": name} for c, name in enumerate(CLASSES)],
    }
    path = os.path.join(out, "annotations", "instances.json")
    with open(path, "w") as f:
        json.dump(doc, f)
    return path


def make_crops(
    out: str,
    n: int,
    *,
    size: int = 160,
    crop_size: int = 64,
    margin: float = 0.15,
    seed: int = 1,
    workers: int = 1,
    kind: str = "shape",
    label: str = "class",
) -> dict[str, int]:
    """Write the objects of ``n`` scenes of set ``kind`` as ``out/<label>/*.jpg``, ``label`` the object's class or
    its fill's source; returns the count per folder."""
    if label not in LABELS:
        raise ValueError(f"unknown crop label {label!r}; expected one of {LABELS}")
    jobs = [(out, kind, seed, i, size, crop_size, margin, label) for i in range(n)]
    counts: dict[str, int] = {}
    for folders in _map(_crop_job, jobs, workers):
        for folder in folders:
            counts[folder] = counts.get(folder, 0) + 1
    return dict(sorted(counts.items()))


def make_backgrounds(
    out: str, n: int, *, size: int = 160, crop_size: int = 64, seed: int = 1, workers: int = 1, kind: str = "shape"
) -> dict[str, int]:
    """Write ``n`` whole scenes of set ``kind``, resized to ``crop_size``, as ``out/<background source>/*.jpg``;
    returns the count per folder."""
    jobs = [(out, kind, seed, i, size, crop_size) for i in range(n)]
    counts: dict[str, int] = {}
    for folder in _map(_background_job, jobs, workers):
        counts[folder] = counts.get(folder, 0) + 1
    return dict(sorted(counts.items()))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "what",
        choices=("scenes", "crops", "backgrounds"),
        help="scenes: COCO-style set; crops: labelled object crops; backgrounds: scenes labelled by background",
    )
    p.add_argument("out", help="output directory")
    p.add_argument("--set", dest="kind", choices=SETS, default="shape", help="which scene set (default: shape)")
    p.add_argument("--n", type=int, default=1000, help="number of scenes (crops: scenes the objects come from)")
    p.add_argument("--size", type=int, default=160, help="scene side in pixels")
    p.add_argument("--crop-size", type=int, default=64, help="crops, backgrounds: side of each image")
    p.add_argument("--label", choices=LABELS, default="class", help="crops: folder by class or by fill source")
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="set seed (default: 0 for scenes, 1 otherwise, so the probes never come from the training scenes)",
    )
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    a = p.parse_args(argv)
    seed = (0 if a.what == "scenes" else 1) if a.seed is None else a.seed
    if a.what == "scenes":
        path = make_scenes(a.out, a.n, size=a.size, seed=seed, workers=a.workers, kind=a.kind)
        print(f"{a.n} scenes: {path}")
    elif a.what == "crops":
        counts = make_crops(
            a.out, a.n, size=a.size, crop_size=a.crop_size, seed=seed, workers=a.workers, kind=a.kind, label=a.label
        )
        print(f"{sum(counts.values())} object crops in {a.out}: {counts}")
    else:
        counts = make_backgrounds(
            a.out, a.n, size=a.size, crop_size=a.crop_size, seed=seed, workers=a.workers, kind=a.kind
        )
        print(f"{sum(counts.values())} scenes by background in {a.out}: {counts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
