"""prep.images: every bad-input kind, the kept-bytes rule, max_side, determinism and the PIL globals."""

from __future__ import annotations

import hashlib
import io
import os
import warnings

import imagegen  # pytest (prepend import mode) puts tests/ on sys.path; the other test modules import it so too
import numpy as np
import pytest
from PIL import Image, ImageFile

from prep.config import PrepConfig
from prep.images import ImageError, LoadedImage, load_image
from prep.proposals import propose
from shards import schema


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    return str(d), imagegen.write_bad_inputs(str(d))


def decode(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def assert_consistent(li: LoadedImage) -> None:
    """The invariants every ok sample must satisfy."""
    assert li.rgb.dtype == np.uint8 and li.rgb.ndim == 3 and li.rgb.shape[2] == 3
    im = decode(li.jpeg)
    assert im.format == "JPEG" and im.mode == "RGB"
    assert im.size == (li.width, li.height)
    # rgb is exactly what a reader gets from the stored bytes
    np.testing.assert_array_equal(np.asarray(im), li.rgb)
    if li.reencoded:
        exif = im.getexif()
        assert exif.get(0x0112) is None, "re-encoded JPEG must not carry an EXIF orientation"


def test_every_bad_input_kind(bad_dir):
    d, expected = bad_dir
    assert set(expected.values()) >= {"ok", "corrupt", "empty", "not_image", "too_small", "too_large"}
    for name, status in expected.items():
        path = os.path.join(d, name)
        if status == "ok":
            li = load_image(path)
            assert_consistent(li)
            with open(path, "rb") as f:
                assert li.sha256 == hashlib.sha256(f.read()).hexdigest()
        else:
            with pytest.raises(ImageError) as e:
                load_image(path)
            assert e.value.reason == status, (name, str(e.value))
            assert e.value.reason in schema.FAILURE_REASONS
            assert path in str(e.value) and str(e.value) == e.value.message


def test_missing_file_and_directory(tmp_path):
    for path, reason in [(str(tmp_path / "nope.jpg"), "missing"), (str(tmp_path), "missing")]:
        with pytest.raises(ImageError) as e:
            load_image(path)
        assert e.value.reason == reason and path in str(e.value)


def test_exif_rotated_is_upright_and_boxes_fit(bad_dir):
    d, _ = bad_dir
    li = load_image(os.path.join(d, imagegen.EXIF_FILE))
    assert (li.width, li.height) == imagegen.EXIF_UPRIGHT_SIZE
    assert (li.orig_width, li.orig_height) == imagegen.EXIF_UPRIGHT_SIZE
    assert li.reencoded
    # orientation 6 = rotate the stored pixels 90 degrees clockwise: the red top-left quadrant goes to the top right
    want = np.rot90(imagegen.exif_stored_pixels(), k=-1)
    assert np.abs(li.rgb.astype(int) - want).mean() < 6
    cfg = PrepConfig(kind="folder", root=d, ss_max_side=128, min_side=8)
    boxes = propose(li.rgb, "exif", cfg).boxes
    assert len(boxes) > 0
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= li.width).all() and (boxes[:, 3] <= li.height).all()


def test_cmyk_converted(bad_dir):
    d, _ = bad_dir
    li = load_image(os.path.join(d, "cmyk.jpg"))
    assert li.reencoded and "CMYK" in li.note
    assert np.abs(li.rgb.astype(int) - imagegen.textured_image(96, 72, seed=1)).mean() < 8


def test_16bit_scaled_not_clipped(bad_dir, tmp_path):
    d, _ = bad_dir
    g = load_image(os.path.join(d, "gray16.png")).rgb.astype(int)
    ramp = np.linspace(0, 65535, 80 * 60).reshape(60, 80) / 257.0
    # lossy JPEG of a smooth ramp: small error; clipping would make ~99 % of the pixels 255
    assert np.abs(g[..., 0] - ramp).mean() < 2
    assert (g[..., 0] == g[..., 1]).all() and (g[..., 1] == g[..., 2]).all()
    assert (g < 250).mean() > 0.9
    # 16-bit RGB holding base * 257 must give exactly base: the same JPEG bytes as an 8-bit PNG of base
    c = load_image(os.path.join(d, "rgb16.png"))
    png8 = str(tmp_path / "rgb8_reference.png")
    Image.fromarray(imagegen.textured_image(96, 72, seed=1)).save(png8)
    assert c.jpeg == load_image(png8).jpeg


def test_alpha_composited_on_white(bad_dir):
    d, _ = bad_dir
    base = imagegen.textured_image(96, 72, seed=1).astype(int)
    li = load_image(os.path.join(d, "rgba.png"))
    assert "white" in li.note
    rgb = li.rgb.astype(int)
    assert rgb[:, :28].min() > 240  # fully transparent black -> white (margin for JPEG ringing at the border)
    half = (base[:, 34:62] + 255) / 2  # alpha 128 over white
    assert np.abs(rgb[:, 34:62] - half).mean() < 6
    assert np.abs(rgb[:, 66:] - base[:, 66:]).mean() < 6
    pal = load_image(os.path.join(d, "palette.png"))
    assert pal.rgb[:16, :16].min() > 240  # transparent palette index (black) -> white


def test_grayscale_to_rgb(bad_dir):
    d, _ = bad_dir
    li = load_image(os.path.join(d, "gray.jpg"))
    with open(os.path.join(d, "gray.jpg"), "rb") as f:
        assert li.jpeg != f.read()  # the stored JPEG must be RGB
    assert (li.rgb[..., 0] == li.rgb[..., 1]).all()


def test_bomb_refused_from_header_without_decoding(tmp_path):
    # The image data stops after 4 rows: decoding would raise ("corrupt"); "too_large" proves it was never decoded.
    # 30000 x 30000 is also above 2x PIL's own limit, where PIL itself would raise DecompressionBombError.
    path = tmp_path / "bomb_header_only.png"
    path.write_bytes(imagegen.huge_png_bytes(30_000, 30_000, complete=False))
    assert path.stat().st_size < 2000
    before = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's DecompressionBombWarning must not escape either
        with pytest.raises(ImageError) as e:
            load_image(str(path))
    assert e.value.reason == "too_large" and "900000000" in str(e.value)
    assert before == (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)  # globals restored
    # the limit is ours: a small image over a small limit is refused too, and passes under a larger one
    photo = imagegen.photo_path("coffee.jpg")
    with pytest.raises(ImageError, match="too_large|exceeds"):
        load_image(photo, max_pixels=1000)
    assert load_image(photo, max_pixels=320 * 213).width == 320


def test_a_side_no_jpeg_can_hold_is_refused_from_the_header(tmp_path):
    # 70,000 x 8 px: few pixels, but a JPEG (and so a reader) cannot take a side over 65,535
    path = tmp_path / "wide.png"
    path.write_bytes(imagegen.huge_png_bytes(70_000, 8, complete=False))
    with pytest.raises(ImageError, match="side over 65535") as e:
        load_image(str(path))
    assert e.value.reason == "too_large"


def test_truncated_images_raise_even_if_pil_global_set(tmp_path):
    data = imagegen.jpeg_bytes(imagegen.textured_image(120, 90, seed=5))
    path = tmp_path / "cut.jpg"
    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = True  # some other library in the process may have set it
    try:
        for cut in (len(data) // 3, len(data) - 1):
            path.write_bytes(data[:cut])
            with pytest.raises(ImageError) as e:
                load_image(str(path))
            assert e.value.reason == "corrupt"
        assert ImageFile.LOAD_TRUNCATED_IMAGES is True
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved


def test_kept_bytes_rule(tmp_path):
    rgb = imagegen.textured_image(120, 90, seed=6)
    cases = {
        "baseline.jpg": (imagegen.jpeg_bytes(rgb), True),
        "progressive.jpg": (imagegen.jpeg_bytes(rgb, progressive=True), True),
        "orient1.jpg": (imagegen.jpeg_bytes(rgb, exif=_exif(1)), True),
        "orient8.jpg": (imagegen.jpeg_bytes(rgb, exif=_exif(8)), False),
        "rgb.png": (imagegen.png_bytes(Image.fromarray(rgb)), False),
    }
    for name, (data, kept) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        li = load_image(str(path))
        assert_consistent(li)
        assert (li.jpeg == data) is kept, name
        assert li.reencoded is not kept
        # downscaling always re-encodes
        small = load_image(str(path), max_side=60)
        assert small.reencoded and small.jpeg != data
    # the photo fixtures are plain RGB JPEGs: kept as they are
    li = load_image(imagegen.photo_path("chelsea.jpg"))
    assert not li.reencoded


def test_reencode_is_deterministic(bad_dir):
    d, _ = bad_dir
    for name in ("cmyk.jpg", "rgba.png", imagegen.EXIF_FILE):
        a = load_image(os.path.join(d, name))
        b = load_image(os.path.join(d, name))
        assert a.jpeg == b.jpeg
    p = imagegen.photo_path("astronaut.jpg")
    assert load_image(p, max_side=100).jpeg == load_image(p, max_side=100).jpeg


def test_max_side_keeps_aspect_and_never_upscales():
    p = imagegen.photo_path("coffee.jpg")  # 320 x 213
    li = load_image(p, max_side=160)
    assert (li.width, li.height) == (160, 106)  # 213 * 0.5 = 106.5 -> 106 (round half to even)
    assert (li.orig_width, li.orig_height) == (320, 213)
    assert "Lanczos" in li.note
    big = load_image(p, max_side=1000)
    assert (big.width, big.height) == (320, 213) and not big.reencoded
    # quality applies to re-encoded images
    assert len(load_image(p, max_side=160, quality=50).jpeg) < len(li.jpeg)


def test_min_size_applies_to_the_stored_image(tmp_path):
    path = tmp_path / "strip.png"
    path.write_bytes(imagegen.png_bytes(Image.fromarray(imagegen.textured_image(400, 12, seed=7))))
    assert load_image(str(path)).height == 12
    with pytest.raises(ImageError) as e:
        load_image(str(path), max_side=100)  # 400x12 -> 100x3
    assert e.value.reason == "too_small" and "100x3" in str(e.value)


def test_image_error_rejects_unknown_reason():
    with pytest.raises(ValueError):
        ImageError("nonsense", "x")


def _exif(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def test_pil_global_limit_does_not_interfere():
    # Another library lowered PIL's own limit: our max_pixels decides, no PIL warning/error, and the global is kept.
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = 1000
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            li = load_image(imagegen.photo_path("astronaut.jpg"), max_side=200)  # decode, resize, encode, decode
        assert (li.width, li.height) == (200, 200)
        assert Image.MAX_IMAGE_PIXELS == 1000
    finally:
        Image.MAX_IMAGE_PIXELS = saved
