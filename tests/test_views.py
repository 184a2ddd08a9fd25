"""train.views: Algorithm 1 properties, boxes following crop/resize/flip, decoding, CPU colour ops, determinism."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from shards import schema
from train import views
from train.views import UniVIPTransform, ViewConfig, overlapping_crops

NO_COLOUR = dict(jitter_p=0.0, gray_p=0.0, blur_p=(0.0, 0.0), solarize_p=(0.0, 0.0))


def jpeg(arr: np.ndarray, quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def make_sample(arr: np.ndarray, boxes, key: str = "img") -> dict:
    h, w = arr.shape[:2]
    return {
        "jpg": jpeg(arr),
        "meta": {"key": key, "width": w, "height": h, "boxes": np.asarray(boxes, dtype=np.int32).reshape(-1, 4)},
    }


def random_boxes(w: int, h: int, n: int, rng: np.random.Generator, max_frac: float = 0.6) -> np.ndarray:
    bw = rng.integers(1, max(2, int(w * max_frac)) + 1, n)
    bh = rng.integers(1, max(2, int(h * max_frac)) + 1, n)
    bw, bh = np.minimum(bw, w), np.minimum(bh, h)
    x0, y0 = rng.integers(0, w - bw + 1), rng.integers(0, h - bh + 1)
    return np.stack([x0, y0, x0 + bw, y0 + bh], axis=1).astype(np.int32)


def inside(box, region) -> bool:
    return box[0] >= region[0] and box[1] >= region[1] and box[2] <= region[2] and box[3] <= region[3]


def intersect(a, b):
    return np.array([max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])])


# --- random resized crops ----------------------------------------------------------------------------------------
def test_random_resized_crops_follow_torchvision_rule():
    rng = np.random.default_rng(0)
    w, h = 640, 480
    crops = views.random_resized_crops(w, h, 2000, rng, (0.08, 1.0), (3 / 4, 4 / 3))
    cw, ch = crops[:, 2] - crops[:, 0], crops[:, 3] - crops[:, 1]
    assert (crops[:, :2] >= 0).all() and (crops[:, 2] <= w).all() and (crops[:, 3] <= h).all()
    assert (cw > 0).all() and (ch > 0).all()
    frac = cw * ch / (w * h)
    assert frac.min() >= 0.08 - 0.01 and frac.max() <= 1.0
    aspect = cw / ch
    assert aspect.min() >= 3 / 4 - 0.02 and aspect.max() <= 4 / 3 + 0.02
    # same distribution as torchvision's sampler (mean area fraction and mean aspect)
    from torchvision.transforms import RandomResizedCrop

    torch.manual_seed(0)
    img = torch.zeros(3, h, w)
    ref = np.array([RandomResizedCrop.get_params(img, [0.08, 1.0], [3 / 4, 4 / 3]) for _ in range(1000)])
    ref_frac = ref[:, 2] * ref[:, 3] / (w * h)
    assert abs(frac.mean() - ref_frac.mean()) < 0.03
    assert abs(aspect.mean() - (ref[:, 3] / ref[:, 2]).mean()) < 0.03


def test_random_resized_crops_central_fallback_on_extreme_aspect():
    # 1000x10: no 3/4..4/3 crop of >= 8 % area fits in 10 rows, so the central crop with clamped aspect is used
    crops = views.random_resized_crops(1000, 10, 5, np.random.default_rng(0), (0.08, 1.0), (3 / 4, 4 / 3))
    assert (crops == np.array([493, 0, 506, 10])).all()  # w = round(10 * 4/3)


# --- Algorithm 1 -------------------------------------------------------------------------------------------------
def test_boxes_inside_is_box_in_region_in_image_coordinates():
    region = np.array([[10, 20, 110, 60]])  # wide and short: swapping x/y bounds would accept other boxes
    boxes = np.array(
        [
            [10, 20, 110, 60],  # equal: inside
            [9, 20, 110, 60],
            [10, 19, 110, 60],
            [10, 20, 111, 60],
            [10, 20, 110, 61],  # 1 px out on each side
            [0, 0, 200, 200],  # the region lies inside the box (the paper's inverted test would accept it)
            [20, 10, 60, 110],  # inside only if x and y were swapped
            [50, 30, 60, 40],  # strictly inside
        ]
    )
    got = views.boxes_inside(boxes, region)[0].tolist()
    assert got == [True, False, False, False, False, False, False, True]


@settings(max_examples=150, deadline=None)
@given(
    w=st.integers(8, 1200),
    h=st.integers(8, 1200),
    n=st.integers(0, 40),
    k=st.integers(1, 6),
    seed=st.integers(0, 2**32 - 1),
    max_frac=st.sampled_from([0.1, 0.3, 0.6, 1.0]),
)
def test_algorithm1_properties(w, h, n, k, seed, max_frac):
    rng = np.random.default_rng(seed)
    boxes = random_boxes(w, h, n, rng, max_frac)
    cfg = ViewConfig(k=k)
    c1, c2, inst, fallback = overlapping_crops(w, h, boxes, rng, cfg)
    assert c1.dtype == np.float32 and inst.dtype == np.float32 and inst.shape == (k, 4)
    for c in (c1, c2):
        assert c[0] >= 0 and c[1] >= 0 and c[2] <= w and c[3] <= h and c[2] > c[0] and c[3] > c[1]
    t = intersect(c1, c2)
    assert t[2] > t[0] and t[3] > t[1], "the overlap must be non-empty"
    for b in inst:
        assert b[2] > b[0] and b[3] > b[1]
        assert inside(b, t) and inside(b, c1) and inside(b, c2)
    if n < k:
        assert fallback
    if not fallback:
        # the K boxes are distinct proposals, and the pair really holds >= K of them
        idx = [int(np.flatnonzero((boxes == b.astype(np.int32)).all(axis=1))[0]) for b in inst]
        assert len(set(map(tuple, boxes[idx].tolist()))) == len(set(map(tuple, inst.tolist())))
        assert sum(inside(b, t) for b in boxes) >= k


def test_fallback_when_boxes_are_too_large_for_any_overlap():
    # every proposal covers 90 % of the image; crops of at most half the area can never contain one
    w, h = 400, 300
    boxes = np.array([[0, 0, 360, 270], [40, 30, 400, 300], [20, 15, 380, 285], [0, 30, 360, 300]] * 3)
    cfg = ViewConfig(scale=(0.08, 0.5))
    for seed in range(30):
        c1, c2, inst, fallback = overlapping_crops(w, h, boxes, np.random.default_rng(seed), cfg)
        assert fallback
        t = intersect(c1, c2)
        tw, th = t[2] - t[0], t[3] - t[1]
        fw = inst[:, 2] - inst[:, 0]
        fh = inst[:, 3] - inst[:, 1]
        assert all(inside(b, t) for b in inst)
        # fallback boxes: sides between 1/4 of T's (rounded, >= 1 px) and T's
        assert (fw >= np.floor(0.25 * tw) - 1).all() and (fw <= tw).all()
        assert (fh >= np.floor(0.25 * th) - 1).all() and (fh <= th).all()


def test_large_boxes_are_never_selected_but_small_ones_are():
    """The paper's line 7 (swapped w/h, inverted containment) would pick boxes larger than the overlap."""
    w, h = 600, 200  # far from square, so swapping x and y bounds changes the answer
    rng = np.random.default_rng(1)
    large = np.array([[0, 0, 600, 200], [0, 0, 200, 600 // 3], [100, 0, 600, 150]])
    small = random_boxes(w, h, 40, rng, max_frac=0.1)
    boxes = np.concatenate([large, small])
    picked_small = 0
    for seed in range(50):
        c1, c2, inst, fallback = overlapping_crops(w, h, boxes, np.random.default_rng(seed), ViewConfig())
        t = intersect(c1, c2)
        for b in inst:
            assert inside(b, t)
            assert b[2] - b[0] <= t[2] - t[0] and b[3] - b[1] <= t[3] - t[1]  # never larger than the overlap
        if not fallback:
            picked_small += 1
            assert all(any((b.astype(int) == sb).all() for sb in small) for b in inst)
    assert picked_small > 0


def test_too_few_boxes_is_a_fallback_and_force_overlap():
    c1, c2, inst, fallback = overlapping_crops(100, 80, np.zeros((0, 4)), np.random.default_rng(0), ViewConfig())
    assert fallback and inst.shape == (4, 4)
    # _force_overlap: two disjoint crops become overlapping
    a = np.array([0, 0, 10, 10])
    b = views._force_overlap(a, np.array([80, 60, 100, 80]), 100, 80)
    t = intersect(a, b)
    assert t[2] > t[0] and t[3] > t[1] and b[2] - b[0] == 20 and b[3] - b[1] == 20


def test_algorithm1_deterministic_per_seed():
    boxes = random_boxes(500, 400, 30, np.random.default_rng(3))
    r1 = overlapping_crops(500, 400, boxes, np.random.default_rng(7), ViewConfig())
    r2 = overlapping_crops(500, 400, boxes, np.random.default_rng(7), ViewConfig())
    for a, b in zip(r1, r2, strict=True):
        assert np.array_equal(a, b)


def test_boxes_to_view_resize_and_flip():
    crop = np.array([100, 50, 300, 150], dtype=np.float32)  # 200x100 -> 50x50: x / 4, y / 2
    box = np.array([[100, 50, 140, 70]], dtype=np.float32)
    assert views.boxes_to_view(box, crop, 50, False).tolist() == [[0, 0, 10, 10]]
    assert views.boxes_to_view(box, crop, 50, True).tolist() == [[40, 0, 50, 10]]


# --- boxes follow the pixels -------------------------------------------------------------------------------------
COLOURS = np.array([[230, 20, 20], [20, 200, 20], [20, 20, 230], [230, 230, 20], [230, 20, 230], [20, 230, 230]])


def rectangles_image(scale: int = 1):
    """Mid-gray 320x240 image (times ``scale``) with six separated coloured rectangles; their boxes."""
    w, h = 320 * scale, 240 * scale
    arr = np.full((h, w, 3), 128, np.uint8)
    boxes = []
    for i, colour in enumerate(COLOURS):
        x0, y0 = (20 + (i % 3) * 100) * scale, (20 + (i // 3) * 110) * scale
        x1, y1 = x0 + 80 * scale, y0 + 90 * scale
        arr[y0:y1, x0:x1] = colour
        boxes.append([x0, y0, x1, y1])
    return arr, np.array(boxes)


def colour_under(view: torch.Tensor, box, shrink: float) -> np.ndarray:
    """Pixels ``[M, 3]`` of ``view`` ``[3, S, S]`` inside ``box`` shrunk by ``shrink`` px on each side."""
    x0, y0, x1, y1 = box.tolist()
    xs, xe = int(np.ceil(x0 + shrink)), int(np.floor(x1 - shrink))
    ys, ye = int(np.ceil(y0 + shrink)), int(np.floor(y1 - shrink))
    return view[:, ys:ye, xs:xe].reshape(3, -1).T.numpy().astype(int)


def coverage(view: torch.Tensor, colour: np.ndarray) -> np.ndarray:
    """``[S, S]`` fraction of each pixel covered by a rectangle of ``colour`` on the gray background (a projection
    onto background -> colour, clipped to [0, 1]). Antialiased resampling keeps coverage, so its sums measure
    positions to a fraction of a pixel."""
    d = view.permute(1, 2, 0).numpy().astype(float) - 128.0
    c = colour.astype(float) - 128.0
    return np.clip(d @ c / (c @ c), 0, 1)


def check_box_position(view: torch.Tensor, box, colour, size: int, tol: float = 0.25) -> None:
    """The rectangle of ``colour`` under ``box`` has the box's centre and extent, to ``tol`` view px, along the
    middle rows and columns of the box."""
    cov = coverage(view, colour)
    x0, y0, x1, y1 = box.tolist()
    lo_x, hi_x = max(0, int(x0) - 3), min(size, int(np.ceil(x1)) + 3)
    lo_y, hi_y = max(0, int(y0) - 3), min(size, int(np.ceil(y1)) + 3)
    rows = cov[int(np.ceil(y0)) + 1 : int(y1) - 1, lo_x:hi_x].mean(axis=0)
    cols = cov[lo_y:hi_y, int(np.ceil(x0)) + 1 : int(x1) - 1].mean(axis=1)
    for prof, lo, a, b in ((rows, lo_x, x0, x1), (cols, lo_y, y0, y1)):
        centres = lo + np.arange(len(prof)) + 0.5
        assert abs(prof.sum() - (b - a)) < 2 * tol, (prof.sum(), b - a)
        assert abs((prof * centres).sum() / prof.sum() - (a + b) / 2) < tol, ((prof * centres).sum() / prof.sum(), a, b)


def check_views_follow_boxes(sample, cfg, seeds) -> int:
    t = UniVIPTransform(cfg)
    checked = 0
    for seed in seeds:
        out = t(sample, np.random.default_rng(seed))
        if out["fallback"]:
            continue
        for m in range(cfg.k):
            ids = []
            for v in (1, 2):
                view, box = out[f"view{v}"], out[f"boxes{v}"][m]
                assert 0 <= box[0] < box[2] <= cfg.size and 0 <= box[1] < box[3] <= cfg.size
                px = colour_under(view, box, 1.0)
                dist = np.abs(px[:, None, :] - COLOURS[None]).max(axis=2)  # [M, 6]
                ids.append(np.bincount(dist.argmin(axis=1), minlength=6).argmax())
                # nearly all interior pixels are that rectangle's colour, and the rectangle sits where the box says
                assert (dist[:, ids[-1]] < 40).mean() > 0.95
                check_box_position(view, box, COLOURS[ids[-1]], cfg.size)
            assert ids[0] == ids[1], "box m must show the same object in both views"
            checked += 1
    return checked


@pytest.mark.parametrize("flip", [0.0, 1.0])
def test_coloured_rectangles_stay_under_their_boxes(flip):
    arr, boxes = rectangles_image()
    cfg = ViewConfig(size=96, scale=(0.5, 1.0), flip=flip, **NO_COLOUR)
    assert check_views_follow_boxes(make_sample(arr, boxes), cfg, range(25)) > 60


def test_coloured_rectangles_with_reduced_scale_decode():
    arr, boxes = rectangles_image(scale=5)  # 1600x1200: crops >= 90 % area are >= 8 * 96 px, so 1/8 decoding
    sample = make_sample(arr, boxes)
    cfg = ViewConfig(size=96, scale=(0.9, 1.0), flip=0.5, **NO_COLOUR)
    c1, c2, _, _ = overlapping_crops(1600, 1200, boxes, np.random.default_rng(0), cfg)
    img, d = views.decode_array(sample["jpg"], 1600, 1200, [(c1, cfg.size), (c2, cfg.size)])
    assert d == 8 and img.shape == (150, 200, 3)
    assert check_views_follow_boxes(sample, cfg, range(10)) >= 30


def test_decode_array_gives_pils_pixels_at_every_scale(photo_sample):
    """OpenCV's decode (the CPU path's) and PIL's (train.eval's, and the fallback) are the same libjpeg: equal pixels
    at full and reduced scales; what OpenCV is not given (CMYK) comes from PIL; a truncated JPEG is an error."""
    jpg, w, h = photo_sample["jpg"], photo_sample["meta"]["width"], photo_sample["meta"]["height"]
    whole = np.array([0, 0, w, h])
    for want_d, side in ((1, w), (2, w // 2), (4, w // 4)):
        arr, d = views.decode_array(jpg, w, h, [(whole, side)])
        pil, pil_d = views.decode_for_crops(jpg, w, h, [(whole, side)])
        assert d == pil_d == want_d and arr.dtype == np.uint8 and arr.flags.c_contiguous
        assert np.array_equal(arr, np.asarray(pil))
    rgb = np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB"))
    for mode in ("L", "CMYK"):
        buf = io.BytesIO()
        Image.fromarray(rgb).convert(mode).save(buf, "JPEG", quality=95)
        arr, _ = views.decode_array(buf.getvalue(), w, h, [], draft=False)
        want = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
        assert arr.shape == (h, w, 3) and np.array_equal(arr, want)
    with pytest.raises(ValueError, match="truncated: JPEG data is corrupt"):
        views.decode_array(jpg[: len(jpg) // 2], w, h, [], name="truncated")
    with pytest.raises(ValueError, match="astro: JPEG data is corrupt"):
        UniVIPTransform()(dict(photo_sample, jpg=jpg[: len(jpg) // 2]), np.random.default_rng(0))


@pytest.mark.parametrize("shrink", [1.0, 1.5, 3.0, 5.5])
def test_resize_crop_maps_box_edges_exactly_with_both_kernels(shrink):
    """Bilinear below a shrink factor 2, antialiased from 2 on: either way a rectangle lands where its box maps to
    (coverage centroid and extent within 0.25 output px), and the result is close to the float antialiased
    reference (the antialiased kernel to rounding)."""
    arr, boxes = rectangles_image(scale=4)  # 1280x960
    size = 64
    side = int(round(size * shrink))
    for i, box in enumerate(boxes[:3]):
        cx, cy = (box[0] + box[2]) // 2, (box[1] + box[3]) // 2
        crop = np.array([cx - side // 2, cy - side // 2, cx - side // 2 + side, cy - side // 2 + side])
        out = views.resize_crop(arr, crop, size)
        assert out.shape == (size, size, 3) and out.dtype == np.uint8 and out.flags.c_contiguous
        view = views.to_tensor(out)
        inside = views.boxes_to_view(box[None].astype(np.float32), crop.astype(np.float32), size, False)[0]
        inside = np.clip(inside, 0, size)
        check_box_position(view, torch.from_numpy(inside), COLOURS[i], size)
        ref = _expected_instance(arr, crop, size)  # float antialiased bilinear, rounded
        diff = np.abs(view.numpy().astype(int) - ref.astype(int))
        if shrink >= 2:
            assert diff.max() <= 1
        else:
            assert diff.mean() < 1.5


# --- the transform -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def photo_sample():
    from tests.imagegen import photo_path

    img = Image.open(photo_path("astronaut.jpg")).convert("RGB")
    arr = np.asarray(img)
    return make_sample(arr, random_boxes(img.width, img.height, 30, np.random.default_rng(0), 0.4), key="astro")


@pytest.mark.parametrize("gpu_aug", [False, True])
def test_transform_output_types_and_determinism(photo_sample, gpu_aug):
    cfg = ViewConfig(size=64, gpu_aug=gpu_aug)
    t = UniVIPTransform(cfg)
    out = t(photo_sample, np.random.default_rng(5))
    assert set(out) == {"view1", "view2", "boxes1", "boxes2", "fallback"}
    for v in ("view1", "view2"):
        assert out[v].dtype == torch.uint8 and out[v].shape == (3, 64, 64)
    for b in ("boxes1", "boxes2"):
        assert out[b].dtype == torch.float32 and out[b].shape == (4, 4)
        assert (out[b][:, 0] < out[b][:, 2]).all() and (out[b][:, 1] < out[b][:, 3]).all()
        assert (out[b] >= 0).all() and (out[b] <= 64).all()
    assert isinstance(out["fallback"], bool)
    again = t(photo_sample, np.random.default_rng(5))
    for key in ("view1", "view2", "boxes1", "boxes2"):
        assert torch.equal(out[key], again[key])
    other = t(photo_sample, np.random.default_rng(6))
    assert not torch.equal(out["view1"], other["view1"])


def test_transform_seeded_instance_generator_and_json_meta(photo_sample):
    meta = photo_sample["meta"]
    raw = schema.encode_meta(
        key="astro",
        path="a.jpg",
        width=meta["width"],
        height=meta["height"],
        boxes=meta["boxes"],
        image_sha256=schema.image_sha256(photo_sample["jpg"]),
    )
    sample = {"jpg": photo_sample["jpg"], "json": raw}
    a = UniVIPTransform(ViewConfig(size=32), seed=3)(sample)
    b = UniVIPTransform(ViewConfig(size=32), seed=3)(photo_sample)
    assert torch.equal(a["view1"], b["view1"]) and torch.equal(a["boxes2"], b["boxes2"])


def test_gpu_aug_views_are_the_uncoloured_cpu_views(photo_sample):
    # same rng draws for geometry; colour ops off on the CPU path -> identical pixels
    plain = UniVIPTransform(ViewConfig(size=48, **NO_COLOUR))(photo_sample, np.random.default_rng(2))
    geo = UniVIPTransform(ViewConfig(size=48, gpu_aug=True))(photo_sample, np.random.default_rng(2))
    assert torch.equal(plain["view1"], geo["view1"]) and torch.equal(plain["boxes1"], geo["boxes1"])


def test_transform_errors_name_the_sample(photo_sample):
    bad = {"jpg": photo_sample["jpg"], "meta": dict(photo_sample["meta"], width=999)}
    with pytest.raises(ValueError, match="astro.*metadata says 999x"):
        UniVIPTransform()(bad, np.random.default_rng(0))
    broken = {"jpg": b"not a jpeg", "meta": photo_sample["meta"]}
    with pytest.raises(ValueError, match="astro: cannot open"):
        UniVIPTransform()(broken, np.random.default_rng(0))


def test_grayscale_jpeg_gives_rgb_views():
    arr = np.tile(np.arange(128, dtype=np.uint8), (100, 1))
    buf = io.BytesIO()
    Image.fromarray(arr, "L").save(buf, "JPEG")
    sample = {"jpg": buf.getvalue(), "meta": {"key": "g", "width": 128, "height": 100, "boxes": np.zeros((0, 4))}}
    out = UniVIPTransform(ViewConfig(size=32))(sample, np.random.default_rng(0))
    assert out["view1"].shape == (3, 32, 32) and out["fallback"]


def test_view_config_validation():
    with pytest.raises(ValueError, match="scale"):
        ViewConfig(scale=(0.5, 0.2))
    with pytest.raises(ValueError, match="blur_kernel"):
        ViewConfig(blur_kernel=4)


# --- CPU colour ops ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def view_array():
    from tests.imagegen import photo_path

    return np.array(Image.open(photo_path("coffee.jpg")).convert("RGB").resize((64, 64)))  # writable: torch wraps it


def test_cpu_colour_keeps_shape_dtype_and_respects_probabilities(view_array):
    all_on = ViewConfig(jitter_p=1.0, gray_p=1.0, blur_p=(1.0, 1.0), solarize_p=(1.0, 1.0))
    out = views.cpu_colour(view_array.copy(), 0, np.random.default_rng(0), all_on)
    assert out.shape == view_array.shape and out.dtype == np.uint8
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()  # grayscale
    off = ViewConfig(**NO_COLOUR)
    assert np.array_equal(views.cpu_colour(view_array.copy(), 1, np.random.default_rng(0), off), view_array)


def test_cpu_ops_match_torchvision(view_array):
    from torchvision.transforms.v2 import functional as TF

    t = torch.from_numpy(view_array).permute(2, 0, 1).contiguous()

    def close(ours, ref, tol):
        diff = np.abs(ours.astype(int) - ref.permute(1, 2, 0).numpy().astype(int))
        assert diff.max() <= tol, diff.max()

    close(views.adjust_brightness(view_array, 1.3), TF.adjust_brightness(t, 1.3), 1)
    close(views.adjust_contrast(view_array, 0.7), TF.adjust_contrast(t, 0.7), 2)
    close(views.adjust_saturation(view_array, 1.2), TF.adjust_saturation(t, 1.2), 2)
    close(views.solarize(view_array, 128), TF.solarize(t, 128), 0)
    close(views.grayscale(view_array), TF.rgb_to_grayscale(t, num_output_channels=3), 1)
    pil_hue = TF.adjust_hue(Image.fromarray(view_array), 0.1)
    close(views.adjust_hue(view_array, 0.1), torch.from_numpy(np.asarray(pil_hue).copy()).permute(2, 0, 1), 12)
    close(views.gaussian_blur(view_array, 1.5), TF.gaussian_blur(t, [23, 23], [1.5, 1.5]), 2)


def test_colour_on_a_stack_equals_colour_on_each_image_alone(photo_sample):
    """The per-pixel ops run once over a view and its instances; contrast's mean and the blur stay each image's own:
    the stack's images equal those coloured one by one with the same parameters, for every op."""
    rgb = np.asarray(Image.open(io.BytesIO(photo_sample["jpg"])).convert("RGB"))
    images = [np.ascontiguousarray(rgb[:48, :48]), np.ascontiguousarray(rgb[100:132, 60:92])]
    images.append(np.full((32, 32, 3), (200, 30, 90), np.uint8))  # flat: contrast pulls it to its own grey only
    for gray in (0.0, 1.0):
        cfg = ViewConfig(jitter_p=1.0, gray_p=gray, blur_p=(1.0, 1.0), solarize_p=(1.0, 1.0))
        for seed in range(4):
            params = views.colour_params(0, np.random.default_rng(seed), cfg)
            stack = views.PixelStack([48, 32, 32])
            for i, img in enumerate(images):
                stack.put(i, img, flip=False)
            views.apply_colour(stack, params, cfg)
            for i, img in enumerate(images):
                alone = views.PixelStack([img.shape[0]])
                alone.put(0, img, flip=False)
                views.apply_colour(alone, params, cfg)
                assert np.array_equal(stack.image(i), alone.image(0)), (gray, seed, i)


def test_cpu_blur_and_solarize_limits():
    flat = np.full((32, 32, 3), 77, np.uint8)
    assert np.array_equal(views.gaussian_blur(flat, 2.0), flat)
    ramp = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=2)
    sol = views.solarize(ramp, 128)[0, :, 0].astype(int)
    assert (sol[:128] == np.arange(128)).all() and (sol[128:] == 255 - np.arange(128, 256)).all()


# --- BYOL's views and the paper's instances ----------------------------------------------------------------------
def test_byol_views_ignore_boxes(photo_sample):
    """Plain BYOL: two independent random resized crops; the sample's boxes change nothing."""
    cfg = ViewConfig(size=48, views="byol")
    no_boxes = {"jpg": photo_sample["jpg"], "meta": dict(photo_sample["meta"], boxes=np.zeros((0, 4), np.int32))}
    for seed in range(5):
        a = UniVIPTransform(cfg)(photo_sample, np.random.default_rng(seed))
        b = UniVIPTransform(cfg)(no_boxes, np.random.default_rng(seed))
        assert torch.equal(a["view1"], b["view1"]) and torch.equal(a["view2"], b["view2"])
        assert not a["fallback"] and a["boxes1"].shape == (0, 4)


def test_byol_views_are_torchvision_crops_without_overlap_constraint(photo_sample):
    """The crops are two draws of the random-resized-crop rule, and small ones often do not overlap at all
    (Algorithm 1 never returns such a pair)."""
    meta = photo_sample["meta"]
    cfg = ViewConfig(size=32, views="byol", scale=(0.08, 0.1), gpu_decode=True)  # gpu_decode: crops in the output
    disjoint = 0
    for seed in range(100):
        out = UniVIPTransform(cfg)(photo_sample, np.random.default_rng(seed))
        want = views.random_resized_crops(
            meta["width"], meta["height"], 2, np.random.default_rng(seed), cfg.scale, cfg.ratio
        )
        assert np.array_equal(out["crop1"].numpy(), want[0]) and np.array_equal(out["crop2"].numpy(), want[1])
        disjoint += views._area(views._intersect(want[:1], want[1:]))[0] == 0
    assert disjoint > 30
    with pytest.raises(ValueError, match="instance_crops"):
        ViewConfig(views="byol", instance_crops=True)


def _expected_instance(src: np.ndarray, box, size: int) -> np.ndarray:
    """The instance a reader of the paper expects: the box cut from the full-resolution image, resized to size."""
    x0, y0, x1, y1 = (int(v) for v in box)
    t = torch.from_numpy(np.ascontiguousarray(src[y0:y1, x0:x1])).permute(2, 0, 1)[None].float()
    out = torch.nn.functional.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out[0].round().clamp(0, 255).to(torch.uint8).numpy()


def test_instances_are_cut_from_the_source_image():
    """inst1/inst2: box m cut out of the source image at its own resolution, resized to instance_size, flipped like
    its view (full-size decode here; test_draft_factor_keeps_every_target_resolution covers reduced-scale ones).
    The stripes every 7 rows would be blurred away in a 64 px view: an instance cut from it could not match."""
    arr, boxes = rectangles_image(scale=4)  # 1280x960 image of coloured rectangles (80x90 px * 4)
    arr = arr.copy()
    arr[::7] = 255 - arr[::7]  # stripes: detail a reduced-scale decode would blur
    sample = make_sample(arr, boxes)
    cfg = ViewConfig(size=64, instance_size=96, k=2, scale=(0.5, 1.0), instance_crops=True, draft=False, **NO_COLOUR)
    checked = 0
    for seed in range(6):
        out = UniVIPTransform(cfg)(sample, np.random.default_rng(seed))
        rng = np.random.default_rng(seed)
        c1, c2, inst, fallback = overlapping_crops(arr.shape[1], arr.shape[0], boxes, rng, cfg)
        flips = rng.random(2) < cfg.flip
        decoded = np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"))
        for v in (1, 2):
            got = out[f"inst{v}"]
            assert got.shape == (2, 3, 96, 96) and got.dtype == torch.uint8
            for m, box in enumerate(inst):
                want = _expected_instance(decoded, box, 96)
                if flips[v - 1]:
                    want = want[:, :, ::-1]
                assert np.abs(got[m].numpy().astype(int) - want.astype(int)).mean() < 1.0
                checked += 1
    assert checked >= 12


def test_instances_get_the_colour_of_their_view(photo_sample):
    """Colour parameters are drawn once per view and applied to the view and its K instances: grey view, grey
    instances; the view's own pixels are those of the path without instances (same random draws)."""
    grey = ViewConfig(size=48, instance_size=32, instance_crops=True, gray_p=1.0, blur_p=(0.0, 0.0))
    out = UniVIPTransform(grey)(photo_sample, np.random.default_rng(1))
    for v in (1, 2):
        inst = out[f"inst{v}"]
        assert torch.equal(inst[:, 0], inst[:, 1]) and torch.equal(inst[:, 1], inst[:, 2])
    # (full-size decodes: the instances' resolution may lower the reduced-scale factor, and with it the views' pixels)
    plain = UniVIPTransform(ViewConfig(size=48, instance_size=32, draft=False))(photo_sample, np.random.default_rng(1))
    with_inst = UniVIPTransform(ViewConfig(size=48, instance_size=32, instance_crops=True, draft=False))(
        photo_sample, np.random.default_rng(1)
    )
    for key in ("view1", "view2", "boxes1", "boxes2"):
        assert torch.equal(plain[key], with_inst[key])
    # the two views' instances differ only by their augmentation: with colour off, equal up to the flips
    off = UniVIPTransform(ViewConfig(size=48, instance_size=32, instance_crops=True, flip=0.0, **NO_COLOUR))(
        photo_sample, np.random.default_rng(1)
    )
    assert torch.equal(off["inst1"], off["inst2"])


def test_draft_factor_keeps_every_target_resolution():
    big = np.array([0, 0, 1600, 1600])
    assert views.draft_factor(1600, 1600, [(big, 96)]) == 8
    assert views.draft_factor(1600, 1600, [(big, 96), (np.array([0, 0, 200, 150]), 96)]) == 1
    assert views.draft_factor(1600, 1600, [(big, 96), (np.array([0, 0, 400, 400]), 96)]) == 4
    assert views.draft_factor(6, 6, [(np.array([0, 0, 6, 6]), 1)]) == 4
