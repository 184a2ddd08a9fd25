"""Synthetic images and bad input files for tests (imported by several test modules; no test functions here).

``write_bad_inputs(dir)`` writes one small file per kind of bad or unusual input of issue #2 item 7 and returns what
``prep.images.load_image`` (default settings) must make of each: "ok" or a ``schema.FAILURE_REASONS`` key.
``textured_image(w, h, seed)`` draws rectangles and ellipses on a gradient so selective search finds many regions.
``damage_jpeg_in_tar(path)`` damages a stored image so that it still decodes (only its SHA-256 tells).
"""

from __future__ import annotations

import io
import os
import struct
import zlib

import numpy as np
from PIL import Image

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
# Real photos (see fixtures/README.md), each <= 320 px on the longer side.
PHOTOS = ("astronaut.jpg", "coffee.jpg", "chelsea.jpg")

# The EXIF-rotated file: pixels stored landscape, orientation 6 ("rotate 90 degrees clockwise to view"),
# so the upright image is portrait.
EXIF_FILE = "exif_rot6.jpg"
EXIF_STORED_SIZE = (96, 64)  # (width, height) of the pixels in the file
EXIF_UPRIGHT_SIZE = (64, 96)  # what load_image must return
BOMB_FILE = "bomb.png"
BOMB_SIZE = (10_000, 10_000)  # 1e8 pixels > PIL's and PrepConfig's default limit of 89,478,485


def photo_path(name: str) -> str:
    return os.path.join(FIXTURES, name)


def textured_image(w: int, h: int, seed: int) -> np.ndarray:
    """uint8 [h, w, 3]: a colour gradient with 6-14 filled rectangles and ellipses of distinct colours and mild noise.

    Deterministic in (w, h, seed). Many separate regions of different colours give selective search many boxes.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.empty((h, w, 3), np.float64)
    img[..., 0] = 40 + 60 * xx / max(w - 1, 1)
    img[..., 1] = 60 + 40 * yy / max(h - 1, 1)
    img[..., 2] = 90.0
    for _ in range(int(rng.integers(6, 15))):
        colour = rng.integers(0, 256, 3)
        bw, bh = rng.integers(max(2, w // 8), max(3, w // 2)), rng.integers(max(2, h // 8), max(3, h // 2))
        x0, y0 = rng.integers(0, max(1, w - bw)), rng.integers(0, max(1, h - bh))
        if rng.random() < 0.5:
            mask = (xx >= x0) & (xx < x0 + bw) & (yy >= y0) & (yy < y0 + bh)
        else:
            cx, cy = x0 + bw / 2, y0 + bh / 2
            mask = ((xx - cx) / (bw / 2)) ** 2 + ((yy - cy) / (bh / 2)) ** 2 <= 1.0
        img[mask] = colour
    img += rng.normal(0, 4, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def jpeg_bytes(rgb: np.ndarray, quality: int = 90, **save_args) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", quality=quality, **save_args)
    return buf.getvalue()


def png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def huge_png_bytes(width: int, height: int, *, complete: bool = True) -> bytes:
    """A valid 1-bit black PNG of ``width`` x ``height`` without holding it in memory (zlib fed row by row).

    With ``complete=False`` the image data stops after a few rows (header and size intact): decoding it would fail,
    so a loader that reports it as too large did not decode it.
    """

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    z = zlib.compressobj(9)
    rows = height if complete else 4
    idat = b"".join(z.compress(row) for _ in range(rows)) + (z.flush() if complete else z.flush(zlib.Z_SYNC_FLUSH))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def write_bad_inputs(directory: str) -> dict[str, str]:
    """Write one file per bad/unusual input kind into ``directory``; return {file name: expected status}."""
    os.makedirs(directory, exist_ok=True)
    files: dict[str, bytes] = {}
    expected: dict[str, str] = {}

    def add(name: str, data: bytes, status: str) -> None:
        files[name] = data
        expected[name] = status

    base = textured_image(96, 72, seed=1)
    good = jpeg_bytes(base)
    add("truncated.jpg", good[: len(good) // 2], "corrupt")
    add("empty.jpg", b"", "empty")
    add("text.jpg", b"this is a text file, not a JPEG\n" * 4, "not_image")
    cmyk = io.BytesIO()
    Image.fromarray(base).convert("CMYK").save(cmyk, "JPEG", quality=90)
    add("cmyk.jpg", cmyk.getvalue(), "ok")
    # 16-bit greyscale: a full-range ramp, so clipping to 8 bits (instead of scaling) would show as a white image.
    ramp = (np.linspace(0, 65535, 80 * 60).reshape(60, 80)).astype(np.uint16)
    add("gray16.png", png_bytes(Image.fromarray(ramp)), "ok")
    add("rgb16.png", _rgb16_png(base.astype(np.uint16) * 257), "ok")
    rgba = np.dstack([base, np.full(base.shape[:2], 255, np.uint8)])
    rgba[:, :32] = 0  # left third fully transparent, its hidden colour black
    rgba[:, 32:64, 3] = 128  # middle third half transparent
    add("rgba.png", png_bytes(Image.fromarray(rgba)), "ok")
    # Palette image with a tRNS entry: index 15 (black) is transparent and fills the top-left corner.
    pal = Image.fromarray(base).quantize(colors=15, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    pal.putpalette(pal.getpalette()[: 15 * 3] + [0, 0, 0])
    pal.paste(15, (0, 0, 20, 20))
    buf = io.BytesIO()
    pal.save(buf, "PNG", transparency=15)
    add("palette.png", buf.getvalue(), "ok")
    gray = io.BytesIO()
    Image.fromarray(base).convert("L").save(gray, "JPEG", quality=90)
    add("gray.jpg", gray.getvalue(), "ok")
    add(EXIF_FILE, exif_rotated_jpeg(orientation=6), "ok")
    add("one_pixel.png", png_bytes(Image.new("RGB", (1, 1), (200, 10, 10))), "too_small")
    add(BOMB_FILE, huge_png_bytes(*BOMB_SIZE), "too_large")
    add("name.with.many.dots.jpg", jpeg_bytes(textured_image(80, 64, seed=2)), "ok")
    add("name with spaces.jpg", jpeg_bytes(textured_image(64, 80, seed=3)), "ok")
    add("näme_ñon_ascii_名前.jpg", jpeg_bytes(textured_image(72, 72, seed=4)), "ok")

    for name, data in files.items():
        with open(os.path.join(directory, name), "wb") as f:
            f.write(data)
    return expected


def exif_rotated_jpeg(orientation: int = 6) -> bytes:
    """A JPEG whose stored pixels are ``EXIF_STORED_SIZE`` with the given EXIF orientation, content from
    ``exif_stored_pixels()``."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    return jpeg_bytes(exif_stored_pixels(), quality=95, exif=exif.tobytes())


def exif_stored_pixels() -> np.ndarray:
    """uint8 [64, 96, 3] with one red quadrant (top-left) so the rotation direction can be checked."""
    w, h = EXIF_STORED_SIZE
    px = np.full((h, w, 3), 40, np.uint8)
    px[: h // 2, : w // 2] = (230, 20, 20)
    px[h // 2 :, w // 2 :] = (20, 20, 230)
    return px


def _rgb16_png(rgb16: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG (Pillow cannot write one; OpenCV can, from BGR)."""
    import cv2

    ok, buf = cv2.imencode(".png", np.ascontiguousarray(rgb16[:, :, ::-1]))
    assert ok
    return buf.tobytes()


def damage_jpeg_in_tar(tar_path: str, member: str | None = None) -> str:
    """Change one byte of the entropy-coded data of a ``KEY.jpg`` inside a tar, in place (the first jpg member, or
    ``member``): the tar stays valid and the same size, the JPEG still decodes to the same size, only its pixels (and
    its SHA-256) differ. Returns the member's name."""
    import tarfile

    with tarfile.open(tar_path) as tar:
        info = next(m for m in tar if (m.name == member if member else m.name.endswith(".jpg")))
        jpeg = tar.extractfile(info).read()
    sos = jpeg.index(b"\xff\xda")  # start of scan: the segment header, then entropy-coded data up to the EOI marker
    i = sos + 2 + int.from_bytes(jpeg[sos + 2 : sos + 4], "big") + (len(jpeg) - sos) // 2
    # a byte that is no marker, follows none, and becomes none (0xFF starts a marker in the scan data)
    while jpeg[i] == 0xFF or jpeg[i - 1] == 0xFF or jpeg[i] ^ 0x10 == 0xFF:
        i += 1
    bad = jpeg[:i] + bytes([jpeg[i] ^ 0x10]) + jpeg[i + 1 :]
    with Image.open(io.BytesIO(bad)) as im:
        im.load()
        assert im.size == Image.open(io.BytesIO(jpeg)).size, "the damaged JPEG must still decode to its size"
    with open(tar_path, "r+b") as f:
        f.seek(info.offset_data)
        f.write(bad)
    return info.name
