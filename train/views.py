"""Views and instances: Algorithm 1 (two overlapping random resized crops holding K boxes) and the CPU view transform.

Coordinates. Boxes and crops are ``[x0, y0, x1, y1]`` on the continuous pixel-edge grid: pixel ``i`` covers
``[i, i + 1)``, so a stored box (int, end-exclusive, ``shards.schema``) is used as is, and a box in view pixels is a
float box on the same grid (``torchvision.ops.roi_align(..., aligned=True)`` reads it that way).

Pipeline of ``UniVIPTransform`` for one sample (all randomness from one ``np.random.Generator``), on uint8 HWC RGB
arrays with OpenCV, one thread, no float copies:
1. Algorithm 1 on the metadata only (``overlapping_crops``): crops and K instance boxes in image pixels.
2. One JPEG decode straight into an array (``decode_array``: OpenCV's libjpeg-turbo, the same pixels as PIL's), at a
   reduced DCT scale (1/2, 1/4, 1/8; libjpeg's scaled IDCT, cheaper than a full decode and a downscale) when every
   crop still has at least ``size`` source pixels per view pixel at that scale, so the views are the same as from a
   full decode up to resampling noise.
3. Per view: crop (a slice) + resize (``resize_crop``: bilinear below a shrink factor 2, antialiased bilinear from
   2 on), horizontal flip (into the view's ``PixelStack``, which also holds its K instances), and (``gpu_aug=False``)
   BYOL's colour ops (``apply_colour``): look-up tables, saturating affine maps, a 3x3 colour matrix, HSV for the hue,
   a separable float blur; the per-pixel ones once over the view and its instances together.
4. Boxes go through crop, resize and flip with the same numbers as the pixels, so box m is the same object in
   both views. The outputs are views of the stack's buffer with channels-last strides, which ``train.data.collate``
   stacks with plain copies into channels-last batches.
Where this differs from torchvision's uint8 ops by a level or two, and the resize below factor 2, is stated in
``docs/method.md`` (Augmentation). ``StageTimes`` times each step (``bench/train_bench.py --profile``).

With ``gpu_decode=True`` the transform stops after step 1 and the flips: it returns the JPEG bytes, the two crops and
flips, and the view boxes (the same numbers as a full-size decode: no reduced-scale rounding), and
``train.gpu_decode.decode_views`` does steps 2-3 on the batch on the device. The CPU then only reads the JPEG header
(size check) and runs Algorithm 1.
"""

from __future__ import annotations

import io
import math
import time
import warnings
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from PIL import Image

from shards import schema

VIEWS = ("overlap", "byol")


class StageTimes:
    """CPU seconds per stage of the transform calls it is passed to (``bench/train_bench.py --profile``): each call
    ``laps(stage)`` charges the time since the previous one to ``stage``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._t = 0.0

    def start(self) -> None:
        self._t = time.process_time()

    def __call__(self, stage: str) -> None:
        now = time.process_time()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + now - self._t
        self._t = now


def _untimed(stage: str) -> None:
    """The lap of an unprofiled call: nothing (a call costs ~50 ns, against ~3 ms a sample)."""


@dataclass(frozen=True)
class ViewConfig:
    """Settings of the two views. Pairs ``(a, b)`` named ``*_p`` are per view index (BYOL's asymmetric augmentation)."""

    size: int = 224  # view side in pixels
    scale: tuple[float, float] = (0.08, 1.0)  # random-resized-crop area range (BYOL / torchvision)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # random-resized-crop aspect range
    k: int = 4  # instances per view
    iters: int = 20  # crop pairs tried by Algorithm 1 before the fallback
    # A pair counts as overlapping when its overlap area is > 0 (METHOD) and >= min_overlap * the smaller crop's area.
    min_overlap: float = 0.0
    # Fallback boxes: each side a uniform fraction in this range of the overlap's side (paper: "K random boxes").
    fallback_scale: tuple[float, float] = (0.25, 1.0)
    instance_size: int = 96  # side of the instance crops
    # "overlap": Algorithm 1 (two crops whose overlap holds K boxes; UniVIP). "byol": two independent random resized
    # crops, no overlap constraint and no boxes (plain BYOL's views, the honest baseline).
    views: str = "overlap"
    # True: the transform also cuts the K instance boxes out of the decoded source image at its own resolution,
    # resized to instance_size, with the flip and colour augmentation of the view each set belongs to (the paper's
    # instances; docs/method.md). False: the model cuts them from the views (instance_source "view", or RoIAlign).
    instance_crops: bool = False
    flip: float = 0.5
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_p: tuple[float, float] = (1.0, 0.1)
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel: int = 23  # torchvision BYOL kernel for 224 px; the CPU path cuts it at 3 sigma (<0.3 % of the mass)
    solarize_p: tuple[float, float] = (0.0, 0.2)
    solarize_threshold: int = 128  # uint8 level; pixels >= it are inverted (torchvision RandomSolarize)
    gpu_aug: bool = False  # True: the CPU only decodes, crops and flips; colour ops run in train.augment
    # True: the CPU does not decode either (Algorithm 1 and flips only); train.gpu_decode decodes, crops, resizes and
    # flips the batch on the device. Implies gpu_aug (no colour op ever runs on the CPU then).
    gpu_decode: bool = False
    draft: bool = True  # allow reduced-scale JPEG decoding when it loses no resolution

    def __post_init__(self) -> None:
        if self.size < 1 or self.k < 1 or self.iters < 1:
            raise ValueError(f"size, k and iters must be positive, got {self.size}, {self.k}, {self.iters}")
        if not 0 < self.scale[0] <= self.scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < lo <= hi <= 1, got {self.scale}")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < lo <= hi, got {self.ratio}")
        if not 0 < self.fallback_scale[0] <= self.fallback_scale[1] <= 1:
            raise ValueError(f"fallback_scale must satisfy 0 < lo <= hi <= 1, got {self.fallback_scale}")
        if not 0 <= self.min_overlap <= 1:
            raise ValueError(f"min_overlap must be in [0, 1], got {self.min_overlap}")
        if self.views not in VIEWS:
            raise ValueError(f"views must be one of {VIEWS}, got {self.views!r}")
        if self.instance_crops and self.views != "overlap":
            raise ValueError("instance_crops needs views='overlap': independent BYOL views share no instances")
        if self.blur_kernel < 1 or self.blur_kernel % 2 == 0:
            raise ValueError(f"blur_kernel must be odd and positive, got {self.blur_kernel}")


# --- Algorithm 1 -------------------------------------------------------------------------------------------------
_RRC_ATTEMPTS = 10  # torchvision RandomResizedCrop.get_params


def random_resized_crops(width: int, height: int, n: int, rng: np.random.Generator, scale, ratio) -> np.ndarray:
    """``n`` independent crops by torchvision's ``RandomResizedCrop.get_params`` rule -> int64 ``[n, 4]`` xyxy.

    Per crop: up to 10 attempts of (area ~ U(scale) * W*H, log-aspect ~ U(log ratio), w, h rounded); the first that
    fits gets a uniform integer position; if none fits, the central crop with the aspect clamped into ``ratio``.
    Vectorised over crops and attempts (all draws made up front), so the cost does not grow with retries."""
    area = float(width * height)
    target = area * rng.uniform(scale[0], scale[1], size=(n, _RRC_ATTEMPTS))
    aspect = np.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]), size=(n, _RRC_ATTEMPTS)))
    w = np.round(np.sqrt(target * aspect)).astype(np.int64)
    h = np.round(np.sqrt(target / aspect)).astype(np.int64)
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.argmax(axis=1)
    rows = np.arange(n)
    cw, ch = w[rows, first], h[rows, first]
    found = fits[rows, first]
    # central fallback crop (torchvision: aspect clamped into ratio)
    in_ratio = width / height
    if in_ratio < ratio[0]:
        fw, fh = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        fw, fh = int(round(height * ratio[1])), height
    else:
        fw, fh = width, height
    cw = np.where(found, cw, fw)
    ch = np.where(found, ch, fh)
    x0 = np.where(found, rng.integers(0, width - cw + 1), (width - fw) // 2)
    y0 = np.where(found, rng.integers(0, height - ch + 1), (height - fh) // 2)
    return np.stack([x0, y0, x0 + cw, y0 + ch], axis=1)


def _intersect(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise intersection of xyxy boxes ``[n, 4]`` (may be empty: x1 <= x0 or y1 <= y0)."""
    return np.concatenate([np.maximum(a[:, :2], b[:, :2]), np.minimum(a[:, 2:], b[:, 2:])], axis=1)


def _area(b: np.ndarray) -> np.ndarray:
    # np.maximum, not np.clip: the same numbers, without np.clip's ~6 us of Python overhead a call (per sample here)
    return np.maximum(b[:, 2] - b[:, 0], 0) * np.maximum(b[:, 3] - b[:, 1], 0)


def boxes_inside(boxes: np.ndarray, regions: np.ndarray) -> np.ndarray:
    """``[R, N]`` bool: box n lies fully inside region r, in image coordinates (x with x, y with y; the box in the
    region, not the other way round: the two slips of the paper's pseudo-code line 7)."""
    b, r = boxes[None, :, :], regions[:, None, :]
    return (b[..., 0] >= r[..., 0]) & (b[..., 1] >= r[..., 1]) & (b[..., 2] <= r[..., 2]) & (b[..., 3] <= r[..., 3])


def _force_overlap(crop1: np.ndarray, crop2: np.ndarray, width: int, height: int) -> np.ndarray:
    """crop2 moved (same size) so its centre is crop1's centre, then shifted back into the image. The moved crop
    still contains crop1's centre, which lies strictly inside crop1, so the overlap has positive area."""
    w, h = crop2[2] - crop2[0], crop2[3] - crop2[1]
    cx, cy = (crop1[0] + crop1[2]) // 2, (crop1[1] + crop1[3]) // 2
    x0 = min(max(cx - w // 2, 0), width - w)
    y0 = min(max(cy - h // 2, 0), height - h)
    return np.array([x0, y0, x0 + w, y0 + h], dtype=crop2.dtype)


def _random_boxes(region: np.ndarray, k: int, rng: np.random.Generator, frac) -> np.ndarray:
    """``k`` integer boxes inside ``region``, each side a uniform fraction ``frac`` of the region's (>= 1 px)."""
    rw, rh = int(region[2] - region[0]), int(region[3] - region[1])
    w = np.clip(np.round(rng.uniform(frac[0], frac[1], k) * rw), 1, rw).astype(np.int64)
    h = np.clip(np.round(rng.uniform(frac[0], frac[1], k) * rh), 1, rh).astype(np.int64)
    x0 = region[0] + rng.integers(0, rw - w + 1)
    y0 = region[1] + rng.integers(0, rh - h + 1)
    return np.stack([x0, y0, x0 + w, y0 + h], axis=1)


def overlapping_crops(
    width: int, height: int, boxes: np.ndarray, rng: np.random.Generator, cfg: ViewConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """Algorithm 1: two random resized crops whose overlap T holds >= K boxes, and K of those boxes.

    boxes: ``[N, 4]`` int xyxy end-exclusive in image pixels. Returns ``(crop1 [4], crop2 [4], inst [K, 4],
    fallback)``, float32, image pixels. Tries ``cfg.iters`` pairs (a pair whose overlap is empty, or below
    ``min_overlap``, is a failed try); the first pair with >= K boxes fully inside T wins and K of those boxes are
    picked at random without replacement. If none wins: ``fallback=True``, the tried pair with the largest overlap is
    kept and K random boxes are generated inside its T (sides ``fallback_scale`` of T's); if no pair overlapped at
    all, the first pair's second crop is moved onto the first crop (``_force_overlap``)."""
    boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    crops = random_resized_crops(width, height, 2 * cfg.iters, rng, cfg.scale, cfg.ratio)
    c1, c2 = crops[0::2], crops[1::2]
    overlap = _intersect(c1, c2)
    area = _area(overlap)
    ok = area > 0
    if cfg.min_overlap > 0:
        ok &= area >= cfg.min_overlap * np.minimum(_area(c1), _area(c2))
    if len(boxes) >= cfg.k:
        inside = boxes_inside(boxes, overlap) & ok[:, None]
        winners = np.flatnonzero(inside.sum(axis=1) >= cfg.k)
        if len(winners):
            p = winners[0]
            pick = rng.choice(np.flatnonzero(inside[p]), size=cfg.k, replace=False)
            return c1[p].astype(np.float32), c2[p].astype(np.float32), boxes[pick].astype(np.float32), False
    if area.max() > 0:
        p = int(np.argmax(np.where(ok, area, area - area.max() - 1)))  # prefer pairs that passed min_overlap
        a, b = c1[p], c2[p]
    else:
        a, b = c1[0], _force_overlap(c1[0], c2[0], width, height)
    region = _intersect(a[None], b[None])[0]
    inst = _random_boxes(region, cfg.k, rng, cfg.fallback_scale)
    return a.astype(np.float32), b.astype(np.float32), inst.astype(np.float32), True


def boxes_to_view(boxes: np.ndarray, crop: np.ndarray, size: int, flip: bool) -> np.ndarray:
    """Image-pixel boxes ``[K, 4]`` -> view-pixel boxes after cropping ``crop``, resizing to ``size`` and an optional
    horizontal flip (x -> size - x, so x0 and x1 swap). float32 ``[K, 4]``."""
    sx = size / float(crop[2] - crop[0])
    sy = size / float(crop[3] - crop[1])
    out = np.empty((len(boxes), 4), dtype=np.float32)
    out[:, 0] = (boxes[:, 0] - crop[0]) * sx
    out[:, 1] = (boxes[:, 1] - crop[1]) * sy
    out[:, 2] = (boxes[:, 2] - crop[0]) * sx
    out[:, 3] = (boxes[:, 3] - crop[1]) * sy
    if flip:
        out[:, [0, 2]] = size - out[:, [2, 0]]
    return out


# --- decoding and the per-view pixels ----------------------------------------------------------------------------
def draft_factor(width: int, height: int, targets: list[tuple[np.ndarray, int]]) -> int:
    """Largest JPEG DCT reduction d in (8, 4, 2, 1) such that every ``(box, size)`` target keeps >= ``size`` source
    pixels per side at 1/d scale (so it is resampled down or 1:1, never up, exactly as from the full-size image)."""
    d = 8
    for box, size in targets:
        shortest = min(float(box[2] - box[0]), float(box[3] - box[1]))
        while d > 1 and shortest / d < size:
            d //= 2
    while d > 1 and (width < d or height < d):
        d //= 2
    return d


def open_image(jpeg: bytes, width: int, height: int, name: str = "sample") -> Image.Image:
    """PIL's lazy open (header only, nothing decoded yet). Raises ``schema.InvalidSample`` (``bad_image``, a
    ValueError) naming ``name`` when the bytes are not an image or the image's size differs from the metadata's (the
    crops would then be wrong): a sample every reader skips."""
    try:
        img = Image.open(io.BytesIO(jpeg))
    except Exception as e:  # PIL raises several types for bad data
        raise schema.InvalidSample("bad_image", f"{name}: cannot open the JPEG ({e})") from e
    try:
        schema.check_image_size({"width": width, "height": height}, img.size)
    except schema.InvalidSample as e:
        raise schema.InvalidSample(e.reason, f"{name}: {e}") from None
    return img


def decode_for_crops(
    jpeg: bytes,
    width: int,
    height: int,
    targets: list[tuple[np.ndarray, int]],
    draft: bool = True,
    name: str = "sample",
) -> tuple[Image.Image, int]:
    """Decode ``jpeg`` with PIL as RGB, at 1/d scale when ``draft_factor`` allows it for every ``(box, output
    side)`` target -> ``(image, d)``; image-pixel coordinates divide by d. Raises ``schema.InvalidSample`` naming
    ``name`` when the JPEG's size differs from the metadata's or its data is corrupt. (``train.eval``'s decoder, and
    ``decode_array``'s for what OpenCV is not given.)"""
    img = open_image(jpeg, width, height, name)
    d = draft_factor(width, height, targets) if draft else 1
    if d > 1 and img.format == "JPEG":
        # PIL picks the largest s in (8, 4, 2, 1) <= min(W // w, H // h); with w = W // d, W // w lies in [d, 2d)
        res = img.draft("RGB", (width // d, height // d))
        d = int(round(width / res[1][2])) if res else 1
    else:
        d = 1
    try:
        img.load()
    except Exception as e:
        raise schema.InvalidSample("bad_image", f"{name}: JPEG data is corrupt ({e})") from e
    if img.mode != "RGB":
        img = img.convert("RGB")
    return img, d


# OpenCV's imdecode flags: RGB order, no EXIF rotation (PIL's header check and the boxes are in stored pixels), and
# libjpeg's scaled IDCT at 1/2, 1/4, 1/8 (the REDUCED_GRAYSCALE_n flags are the bare scale bits)
_IMREAD_RGB = cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION
_IMREAD_SCALE = {
    1: 0,
    2: cv2.IMREAD_REDUCED_GRAYSCALE_2,
    4: cv2.IMREAD_REDUCED_GRAYSCALE_4,
    8: cv2.IMREAD_REDUCED_GRAYSCALE_8,
}
_JPEG_EOI = b"\xff\xd9"
_DEVICE_MODES = ("RGB", "L")  # JPEG colour spaces OpenCV and every decoder of decode_jpeg(mode=RGB) read alike


def decode_array(
    jpeg: bytes,
    width: int,
    height: int,
    targets: list[tuple[np.ndarray, int]],
    draft: bool = True,
    name: str = "sample",
) -> tuple[np.ndarray, int]:
    """Decode ``jpeg`` as a uint8 ``[H / d, W / d, 3]`` RGB array (rounded up), at the 1/d scale ``draft_factor``
    allows -> ``(array, d)``. Errors as ``decode_for_crops``.

    OpenCV's ``imdecode`` (libjpeg-turbo, the same pixels as PIL's decoder, full or reduced scale) writes the array
    directly, where PIL decodes to RGBX and an array costs a packing copy. Only for what it is sure to read as PIL
    would: a 3- or 1-component JPEG whose data ends with the end-of-image marker (a truncated JPEG makes libjpeg warn
    and pad where PIL raises); everything else goes through ``decode_for_crops``."""
    img = open_image(jpeg, width, height, name)
    d = draft_factor(width, height, targets) if draft else 1
    if img.format == "JPEG" and img.mode in _DEVICE_MODES and jpeg.endswith(_JPEG_EOI):
        arr = cv2.imdecode(np.frombuffer(jpeg, np.uint8), _IMREAD_RGB | _IMREAD_SCALE[d])
        if arr is None or arr.shape != (-(-height // d), -(-width // d), 3):
            raise schema.InvalidSample(
                "bad_image", f"{name}: JPEG data is corrupt (OpenCV could not decode it at 1/{d} scale)"
            )
        return arr, d
    pil, d = decode_for_crops(jpeg, width, height, targets, draft, name)
    return np.array(pil), d  # a writable copy: torch's resize wraps it without a read-only warning


def image_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 ``[1, C, H, W]`` over its pixels, channels-last strides, C = 4 or 3 (``train.eval``).

    PIL keeps RGB as RGBX (4 bytes a pixel). Its Arrow export shares that memory (no copy; ~0.02 ms vs ~0.3 ms for
    ``np.asarray``, which packs to RGB through ``tobytes``), and torch's uint8 resize is fastest on 4 channels, so
    the X channel rides along and is dropped after resizing. Images PIL stores in several blocks (over 16 MiB) cannot
    be exported that way and take the ``np.asarray`` copy (C = 3). The buffer is read-only; nothing writes to it."""
    try:
        arr = pa.array(img).flatten().to_numpy(zero_copy_only=True).reshape(img.height, img.width, 4)
    except (ValueError, TypeError, pa.ArrowException):
        arr = np.asarray(img)
    with warnings.catch_warnings():  # torch warns about the read-only buffer once per process
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0)


def source_crop(crop: np.ndarray, d: int, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """A crop in image pixels -> ``(rows/cols to slice in the 1/d decoded image [4] int, the image-pixel crop that
    slice covers [4] float)``. At d = 1 both are the crop; at d > 1 the crop is rounded to the reduced grid (the
    covered crop moves by < d/2 image px, < 1/2 view px since the crop is >= d * size there)."""
    if d == 1:
        return crop.astype(np.int64), crop.astype(np.float32)
    h, w = shape
    r = np.round(crop / d).astype(np.int64)
    r[[0, 2]] = np.clip(r[[0, 2]], 0, w)
    r[[1, 3]] = np.clip(r[[1, 3]], 0, h)
    r[2:] = np.maximum(r[2:], r[:2] + 1)
    return r, (r * d).astype(np.float32)


def crop_view(src: torch.Tensor, box: np.ndarray, size: int) -> torch.Tensor:
    """Cut ``box`` (int xyxy in ``src`` pixels) from ``src`` uint8 ``[1, C, H, W]`` and resize it to ``size``:
    bilinear with antialiasing when shrinking, PIL's ``resize`` filter (torch's uint8 AVX2 kernel, about twice as
    fast as PIL here) -> uint8 ``[3, size, size]`` (channels-last strides). (``train.eval``'s resize.)"""
    x0, y0, x1, y1 = (int(v) for v in box)
    patch = src[:, :, y0:y1, x0:x1]
    return F.interpolate(patch, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0, :3]


def resize_crop(src: np.ndarray, box: np.ndarray, size: int) -> np.ndarray:
    """Cut ``box`` (int xyxy in ``src`` pixels) from a uint8 ``[H, W, 3]`` array and resize it to a contiguous
    ``[size, size, 3]``. Both kernels sample at pixel centres (``align_corners=False``), so the box's edges map to
    the output's edges exactly:
    - neither side shrinks by 2 or more (about half of BYOL's crops of a COCO image): OpenCV's bilinear, ~0.2 ms for
      224 px, a 2-tap interpolation with no antialiasing filter (below a factor 2 that aliases only detail finer
      than ~2 source pixels, by a level on average on photos);
    - else antialiased bilinear (PIL's filter, whose support grows with the factor), torch's uint8 kernel on a
      channels-last copy of the crop (~0.55 ms; on a strided slice it takes a generic path twice as slow).
    The plain bilinear resize aliases badly from a factor 2 on (period-3 stripes stay at full contrast where the
    antialiased filter leaves 1 %), and halving steps or OpenCV's area resize were slower or aliased as well."""
    x0, y0, x1, y1 = (int(v) for v in box)
    if x1 - x0 < 2 * size and y1 - y0 < 2 * size:
        return cv2.resize(src[y0:y1, x0:x1], (size, size), interpolation=cv2.INTER_LINEAR)
    patch = torch.from_numpy(np.ascontiguousarray(src[y0:y1, x0:x1])).permute(2, 0, 1)[None]
    out = F.interpolate(patch, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]
    if out.is_contiguous():  # planes [3, S, S]: interleave them (OpenCV's merge is ~30x faster than a strided copy)
        planes = out.numpy()
        return cv2.merge([planes[0], planes[1], planes[2]])
    return np.ascontiguousarray(out.permute(1, 2, 0).numpy())


class PixelStack:
    """Square uint8 RGB images of a few sizes (a view and its K instances) in one buffer ``[1, N, 3]``.

    The per-pixel colour ops (brightness, saturation, hue, grayscale, solarize) then run once over all of them
    instead of K + 1 times, on a one-row image (OpenCV's cost is per row: the row layout matters, ``[N, 1, 3]`` is
    ~25x slower); contrast (each image's own mean) and blur run image by image. ``image(i)`` is a ``[s, s, 3]`` view
    into the buffer; ops that cannot run in place (blur, flips) write into a new buffer."""

    def __init__(self, sides: list[int]):
        self.sides = list(sides)
        self.offsets = np.cumsum([0] + [s * s for s in self.sides]).tolist()
        self.buf = np.empty((1, self.offsets[-1], 3), np.uint8)

    def __len__(self) -> int:
        return len(self.sides)

    def image(self, i: int, buf: np.ndarray | None = None) -> np.ndarray:
        s = self.sides[i]
        return (self.buf if buf is None else buf)[0, self.offsets[i] : self.offsets[i + 1]].reshape(s, s, 3)

    def tail(self, start: int) -> np.ndarray:
        """Images ``start``, ``start + 1``, ... (all of one side) as one ``[n, s, s, 3]`` view."""
        s = self.sides[start]
        return self.buf[0, self.offsets[start] :].reshape(-1, s, s, 3)

    def put(self, i: int, pixels: np.ndarray, flip: bool) -> None:
        """Image ``i`` := ``pixels`` ``[s, s, 3]``, flipped horizontally if asked."""
        if flip:
            cv2.flip(pixels, 1, dst=self.image(i))
        else:
            np.copyto(self.image(i), pixels)


# --- CPU colour ops on uint8 RGB arrays (an image [H, W, 3] or a PixelStack buffer [1, N, 3]) ----------------------
# ``out`` may be ``x`` itself (in place) unless said otherwise. Each matches torchvision's op on uint8 tensors to a
# level or two (tests/test_views.py): they round where torchvision truncates, and contrast's mean is the mean of the
# unrounded grey.
_GRAY = (0.299, 0.587, 0.114)  # ITU-R 601 luma, OpenCV's RGB2GRAY weights (torchvision: 0.2989, 0.587, 0.114)


def gray_mean(x: np.ndarray) -> float:
    """Mean grey level of an image: the luma weights over the channel means (one pass, no grey image)."""
    m = cv2.mean(x)
    return _GRAY[0] * m[0] + _GRAY[1] * m[1] + _GRAY[2] * m[2]


def adjust_brightness(x: np.ndarray, f: float, out: np.ndarray | None = None) -> np.ndarray:
    """x * f, rounded and saturated (f >= 0, so OpenCV's absolute value changes nothing)."""
    return cv2.convertScaleAbs(x, dst=out, alpha=f)


def adjust_contrast(x: np.ndarray, f: float, out: np.ndarray | None = None, mean: float | None = None) -> np.ndarray:
    """x * f + (1 - f) * mean grey (``mean``: the image's own by default), rounded and saturated."""
    mean = gray_mean(x) if mean is None else mean
    return cv2.addWeighted(x, f, x, 0.0, (1.0 - f) * mean, dst=out)


def adjust_saturation(x: np.ndarray, f: float, out: np.ndarray | None = None) -> np.ndarray:
    """x * f + (1 - f) * grey(x) per pixel: one 3x3 colour matrix, rounded and saturated."""
    m = np.full((3, 3), _GRAY, np.float32) * np.float32(1.0 - f) + np.eye(3, dtype=np.float32) * np.float32(f)
    return cv2.transform(x, m, dst=out)


def adjust_hue(x: np.ndarray, f: float, out: np.ndarray | None = None) -> np.ndarray:
    """Hue shift by ``f`` turns (in [-0.5, 0.5]); hue quantised to 1/256 turn as torchvision does for PIL images."""
    hsv = cv2.cvtColor(x, cv2.COLOR_RGB2HSV_FULL)
    hue = hsv[..., 0]
    np.add(hue, np.uint8(int(round(f * 256)) % 256), out=hue)  # uint8 addition wraps: the hue circle
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL, dst=out)


def grayscale(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    return cv2.cvtColor(cv2.cvtColor(x, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB, dst=out)


def gaussian_blur(x: np.ndarray, sigma: float, max_kernel: int = 23, out: np.ndarray | None = None) -> np.ndarray:
    """Separable Gaussian, reflect border (torchvision's), kernel 2*ceil(3 sigma)+1 capped at ``max_kernel``, on an
    image ``[H, W, 3]``; ``out`` must not be ``x``. Float taps (``sepFilter2D``): about twice as fast here as
    ``GaussianBlur``'s fixed-point path for 8-bit images, and rounded once at the end."""
    k = min(max_kernel, 2 * math.ceil(3 * sigma) + 1)
    taps = cv2.getGaussianKernel(k, sigma, ktype=cv2.CV_32F)
    return cv2.sepFilter2D(x, -1, taps, taps, dst=out, borderType=cv2.BORDER_REFLECT_101)


def solarize(x: np.ndarray, threshold: int = 128, out: np.ndarray | None = None) -> np.ndarray:
    lut = np.arange(256, dtype=np.uint8)
    lut[threshold:] = 255 - lut[threshold:]
    return cv2.LUT(x, lut, dst=out)


def _contrast_each(stack: PixelStack, f: float) -> None:
    for i in range(len(stack)):  # each image its own mean grey, as torchvision computes it per image
        img = stack.image(i)
        adjust_contrast(img, f, out=img)


_JITTER_STAGES = ("colour: brightness", "colour: contrast", "colour: saturation", "colour: hue")


def colour_params(view: int, rng: np.random.Generator, cfg: ViewConfig) -> dict[str, Any]:
    """BYOL's random colour choices for view ``view`` (0 or 1): which ops run, their factors, the jitter order and
    the blur sigma. Every draw is made whether or not the op runs, so the generator advances the same way for every
    sample. Drawn once per view and applied to the view and to its instances alike (``apply_colour``)."""
    u = rng.random(4)
    bj, cj, sj, hj = cfg.jitter
    factors = (
        rng.uniform(max(0.0, 1 - bj), 1 + bj),
        rng.uniform(max(0.0, 1 - cj), 1 + cj),
        rng.uniform(max(0.0, 1 - sj), 1 + sj),
        rng.uniform(-hj, hj),
    )
    order = rng.permutation(4)
    sigma = rng.uniform(*cfg.blur_sigma)
    return {
        "jitter": u[0] < cfg.jitter_p,
        "gray": u[1] < cfg.gray_p,
        "blur": u[2] < cfg.blur_p[view],
        "solarize": u[3] < cfg.solarize_p[view],
        "factors": factors,
        "order": order,
        "sigma": sigma,
    }


def apply_colour(stack: PixelStack, p: dict[str, Any], cfg: ViewConfig, lap=_untimed) -> None:
    """The colour ops chosen by ``colour_params`` on every image of ``stack``, in place. Image statistics (contrast's
    mean grey) are each image's own, as torchvision computes them per image."""
    buf = stack.buf
    if p["jitter"]:
        for i in p["order"]:
            f = p["factors"][i]
            if i == 0:
                adjust_brightness(buf, f, out=buf)
            elif i == 1:
                _contrast_each(stack, f)
            elif i == 2:
                adjust_saturation(buf, f, out=buf)
            else:
                adjust_hue(buf, f, out=buf)
            lap(_JITTER_STAGES[i])
    if p["gray"]:
        grayscale(buf, out=buf)
        lap("colour: grayscale")
    if p["blur"]:
        blurred = np.empty_like(buf)
        for i in range(len(stack)):
            gaussian_blur(stack.image(i), p["sigma"], cfg.blur_kernel, out=stack.image(i, blurred))
        stack.buf = buf = blurred
        lap("colour: blur")
    if p["solarize"]:
        solarize(buf, cfg.solarize_threshold, out=buf)
        lap("colour: solarize")


def cpu_colour(x: np.ndarray, view: int, rng: np.random.Generator, cfg: ViewConfig) -> np.ndarray:
    """BYOL's colour augmentation of view ``view`` (0 or 1) on a uint8 ``[H, W, 3]`` RGB array (square: a
    ``PixelStack`` of one) -> a new array of the same shape.

    Colour jitter (p ``jitter_p``; factors b, c, s ~ U(1 -/+ strength), hue ~ U(-/+ strength); the four ops in a
    random order, clipped after each), grayscale (p ``gray_p``), Gaussian blur (p ``blur_p[view]``, sigma ~
    U(``blur_sigma``)), solarize (p ``solarize_p[view]``)."""
    if x.ndim != 3 or x.shape[0] != x.shape[1] or x.shape[2] != 3:
        raise ValueError(f"cpu_colour takes a square [S, S, 3] image, got shape {x.shape}")
    stack = PixelStack([x.shape[0]])
    stack.put(0, x, False)
    apply_colour(stack, colour_params(view, rng, cfg), cfg)
    return stack.image(0)


def to_tensor(x: np.ndarray) -> torch.Tensor:
    """uint8 ``[..., H, W, 3]`` -> uint8 ``[..., 3, H, W]`` sharing memory (channels-last strides, no copy)."""
    return torch.from_numpy(x).movedim(-1, -3)


# --- the undecoded sample (gpu_decode) ---------------------------------------------------------------------------


def device_jpeg(jpeg: bytes, width: int, height: int, name: str = "sample") -> torch.Tensor:
    """The bytes of a 3- or 1-component JPEG as uint8 ``[nbytes]`` (a copy: the sample's bytes are read-only), after
    a header check (size against the metadata, as the CPU path does).

    Anything else, which prep never writes (it re-encodes all but RGB JPEGs), is decoded here with PIL, converted to
    RGB as the CPU path does, and re-encoded (quality 95): CMYK/YCCK JPEGs, which nvjpeg's batched decoder refuses
    for the whole batch, or another format under the ``.jpg`` name. Rare, so its cost does not matter."""
    img = open_image(jpeg, width, height, name)
    if img.format != "JPEG" or img.mode not in _DEVICE_MODES:
        try:
            rgb = img.convert("RGB")
        except Exception as e:
            raise schema.InvalidSample("bad_image", f"{name}: image data is corrupt ({e})") from e
        buf = io.BytesIO()
        rgb.save(buf, "JPEG", quality=95)
        jpeg = buf.getvalue()
    return torch.frombuffer(bytearray(jpeg), dtype=torch.uint8)


# --- the transform -----------------------------------------------------------------------------------------------
class UniVIPTransform:
    """Sample -> two views and their K instance boxes.

    ``__call__(sample, rng=None)``: sample has ``jpg`` (bytes) and ``meta`` (``schema.decode_meta`` dict: ``boxes``
    int ``[N, 4]``, ``width``, ``height``; ``json`` bytes are decoded when ``meta`` is absent). ``rng`` drives every
    random choice (a per-sample generator makes the output a pure function of sample and seed); default: the
    transform's own generator from ``seed``. Returns ``view1``, ``view2`` uint8 ``[3, S, S]``; ``boxes1``,
    ``boxes2`` float32 ``[K, 4]`` in each view's pixels (row m is the same proposal in both); ``fallback`` bool.
    Views are colour-augmented unless ``cfg.gpu_aug`` (then ``train.augment.gpu_colour`` does it on the batch).

    ``cfg.gpu_decode``: no decoding and no pixels. Returns ``jpeg`` uint8 ``[nbytes]`` (``device_jpeg``),
    ``crop1``, ``crop2`` float32 ``[4]`` (xyxy, image pixels), ``flip1``, ``flip2`` bool, ``boxes1``, ``boxes2`` and
    ``fallback`` as above; ``train.gpu_decode.decode_views`` makes the views from them. The random draws are those of
    the ``gpu_aug`` path, so both give the same crops, flips and boxes for the same generator."""

    def __init__(self, cfg: ViewConfig | None = None, seed: int | None = None):
        self.cfg = cfg or ViewConfig()
        self.rng = np.random.default_rng(seed)

    def __call__(
        self, sample: dict[str, Any], rng: np.random.Generator | None = None, laps: StageTimes | None = None
    ) -> dict[str, Any]:
        cfg = self.cfg
        rng = self.rng if rng is None else rng
        lap = _untimed if laps is None else laps
        if laps is not None:
            laps.start()
        meta = sample.get("meta")
        if meta is None:
            meta = schema.decode_meta(sample["json"])
        name = f"sample {meta.get('key') or sample.get('__key__') or '?'}"
        width, height = int(meta["width"]), int(meta["height"])
        if cfg.views == "byol":  # BYOL: two independent crops, boxes unused
            crop1, crop2 = random_resized_crops(width, height, 2, rng, cfg.scale, cfg.ratio).astype(np.float32)
            inst, fallback = np.zeros((0, 4), np.float32), False
        else:
            crop1, crop2, inst, fallback = overlapping_crops(width, height, meta["boxes"], rng, cfg)
        flips = rng.random(2) < cfg.flip
        lap("Algorithm 1 (crops, boxes, flips)")
        if cfg.gpu_decode:
            out: dict[str, Any] = {"jpeg": device_jpeg(sample["jpg"], width, height, name), "fallback": bool(fallback)}
            lap("JPEG header, bytes to tensor")
            if cfg.instance_crops:
                out["inst_boxes"] = torch.from_numpy(inst)  # image pixels: cut on the device
            for v, (crop, flip) in enumerate(((crop1, bool(flips[0])), (crop2, bool(flips[1]))), start=1):
                out[f"crop{v}"] = torch.from_numpy(crop)
                out[f"flip{v}"] = flip
                out[f"boxes{v}"] = torch.from_numpy(boxes_to_view(inst, crop, cfg.size, flip))
            lap("boxes to view pixels")
            return out
        targets = [(c, cfg.size) for c in (crop1, crop2)]
        if cfg.instance_crops:  # the instances keep their own resolution too: no reduced-scale decode below it
            targets += [(b, cfg.instance_size) for b in inst]
        src, d = decode_array(sample["jpg"], width, height, targets, cfg.draft, name)
        lap(f"JPEG decode at 1/{d}")
        shape = src.shape[:2]
        # the K instances cut once from the source image; each view's set is then flipped and coloured like the view
        inst_px = (
            [resize_crop(src, source_crop(b, d, shape)[0], cfg.instance_size) for b in inst]
            if cfg.instance_crops
            else []
        )
        lap("instances: crop + resize")
        out = {"fallback": bool(fallback)}
        for v, (crop, flip) in enumerate(((crop1, bool(flips[0])), (crop2, bool(flips[1])))):
            box, covered = source_crop(crop, d, shape)
            stack = PixelStack([cfg.size] + [cfg.instance_size] * len(inst_px))  # the view, then its instances
            stack.put(0, resize_crop(src, box, cfg.size), flip)
            lap("views: crop + resize")
            for m, px in enumerate(inst_px, start=1):
                stack.put(m, px, flip)
            lap("flip, layout")
            if not cfg.gpu_aug:
                apply_colour(stack, colour_params(v, rng, cfg), cfg, lap)
            out[f"view{v + 1}"] = to_tensor(stack.image(0))  # [3, S, S], channels-last strides
            if cfg.instance_crops:
                out[f"inst{v + 1}"] = to_tensor(stack.tail(1))  # [K, 3, s, s]
            boxes = boxes_to_view(inst, covered, cfg.size, flip)
            if d > 1:  # the rounded crop may cut a box by < 1/2 view px
                np.clip(boxes, 0, cfg.size, out=boxes)
            out[f"boxes{v + 1}"] = torch.from_numpy(boxes)
            lap("outputs, boxes")
        return out
