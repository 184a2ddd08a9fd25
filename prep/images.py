"""Read one source image safely and turn it into the stored RGB image and the JPEG bytes that go in the tar.

Order of checks, cheapest first, so a bad file costs almost nothing and a bomb is never decoded:
read the bytes once (sha256) -> empty? -> PIL header (not_image) -> pixel count from the header (too_large) ->
size after EXIF transpose and ``max_side`` (too_small) -> decode (corrupt) -> EXIF transpose -> RGB -> downscale
-> JPEG.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps

from prep.config import PrepConfig
from shards import schema

# Formats we let PIL open. Others (EPS calls Ghostscript, fonts, icons, ...) are refused as not_image whatever the
# file is named: a data set is photos, and a rarely used plugin is not worth its attack surface. (Multi-picture JPEGs
# open through "JPEG" with format "MPO"; their first picture is used and re-encoded.)
ALLOWED_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP", "PPM")
# The decompression-bomb limit when none is given: PrepConfig's default, PIL's own (about 89.5 M pixels).
DEFAULT_MAX_PIXELS = PrepConfig.max_pixels
_EXIF_ORIENTATION = 0x0112
_SWAPS_SIDES = (5, 6, 7, 8)  # EXIF orientations that rotate by 90 degrees (width and height swap)
# 4:2:0 chroma subsampling, spelled out so a Pillow default change cannot change the bytes we write.
_SUBSAMPLING_420 = 2


class ImageError(Exception):
    """A source file that yields no sample. ``reason`` is a key of ``schema.FAILURE_REASONS``; str() is the message."""

    def __init__(self, reason: str, message: str):
        if reason not in schema.FAILURE_REASONS:
            raise ValueError(f"unknown failure reason {reason!r}")
        super().__init__(message)
        self.reason = reason
        self.message = message

    def __str__(self) -> str:
        return self.message


@dataclass
class LoadedImage:
    """One usable image.

    rgb: uint8 [H, W, 3], the stored image (upright, RGB, downscaled); boxes are in its pixels. It is exactly what
        decoding ``jpeg`` with PIL gives, so proposals are computed on the pixels readers will see.
    jpeg: the KEY.jpg bytes: the source bytes when the source is an RGB JPEG needing no rotation and no downscale,
        else ``rgb`` encoded at ``quality`` (no EXIF, no ICC profile: the pixels are already upright).
    orig_width, orig_height: the decoded source after EXIF transpose, before ``max_side``.
    sha256: hex digest of the source file's bytes.
    """

    rgb: np.ndarray
    jpeg: bytes
    orig_width: int
    orig_height: int
    sha256: str
    reencoded: bool = False  # True when ``jpeg`` is not the source bytes
    note: str = ""  # what was done to the pixels (e.g. "CMYK->RGB; alpha composited on white"), for logs and tests

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])


@contextlib.contextmanager
def _pil_guards_for_us() -> Iterator[None]:
    """Turn PIL's own bomb check off (we check ``max_pixels`` from the header ourselves, with our reason and message,
    instead of a warning at 1x PIL's limit and an exception at 2x) and make sure truncated data raises instead of
    being padded with grey. Both are module globals: set only for the duration of one load and restored after, so
    other code in the process keeps its settings. Prep runs one image at a time per process, so no thread races."""
    saved = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
    Image.MAX_IMAGE_PIXELS = None
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = saved


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise ImageError("missing", f"{path}: file not found") from None
    except OSError as e:  # a directory, no permission, an I/O error: the file cannot be read
        raise ImageError("missing", f"{path}: cannot read ({e.strerror or e})") from None


def _orientation(im: Image.Image) -> int | None:
    """EXIF orientation 1..8 (1 when absent); None when the EXIF block cannot be parsed (then we re-encode)."""
    try:
        value = im.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # malformed EXIF raises anything from struct.error to SyntaxError inside PIL
        return None
    return value if value in range(1, 9) else 1


def _scaled_size(width: int, height: int, max_side: int | None) -> tuple[int, int]:
    """(w, h) with the longer side at most ``max_side``, aspect kept, never upscaled."""
    if max_side is None or max(width, height) <= max_side:
        return width, height
    s = max_side / max(width, height)
    return max(1, round(width * s)), max(1, round(height * s))


def _to_rgb(im: Image.Image) -> tuple[Image.Image, str]:
    """Any decoded PIL image -> 8-bit RGB, and a note saying what was done."""
    mode = im.mode
    if mode == "RGB":  # also 16-bit RGB PNGs: PIL keeps the high byte of each sample while decoding
        return im, ""
    if mode.startswith("I"):
        # 16-bit PNG/TIFF greyscale arrives as I;16* (or I in older Pillow; a 32-bit integer TIFF is rare enough to
        # be read the same way, clipped). convert("RGB") would clip every value
        # above 255 to white; scale the 16-bit range onto 8 bits with rounding instead (65535 -> 255).
        a = np.asarray(im).astype(np.float64)
        a8 = np.clip(np.rint(a * (255.0 / 65535.0)), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(a8[:, :, None], 3, axis=2), "RGB"), f"{mode} scaled to 8-bit RGB"
    if im.has_transparency_data:
        # RGBA, LA, PA, or P/L/RGB with a tRNS colour. Dropping alpha exposes whatever colour the transparent pixels
        # happen to store (often black), which makes hard artificial edges that selective search boxes. Composite on
        # white instead: transparent images (logos, cut-out products) are made to be shown on a white page.
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB"), f"{mode} with transparency composited on white"
    # CMYK (PIL undoes Adobe's inverted CMYK while decoding; the conversion is PIL's naive one, no ICC), L, 1, P, ...
    return im.convert("RGB"), f"{mode}->RGB"


def _encode(im: Image.Image, quality: int) -> bytes:
    # Baseline, no optimize pass, fixed subsampling, no EXIF/ICC: the same pixels always give the same bytes.
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality, optimize=False, progressive=False, subsampling=_SUBSAMPLING_420)
    return buf.getvalue()


def _decode_rgb(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        return np.array(im.convert("RGB"), dtype=np.uint8)


def load_image(
    path: str,
    *,
    max_side: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    quality: int = 95,
    min_size: int = 8,
) -> LoadedImage:
    """Load ``path`` for proposal extraction and storage.

    Raises ImageError with reason missing | empty | not_image | corrupt | too_large | too_small; the message names
    ``path``. ``max_pixels`` is checked on the header's width*height before any pixel is decoded. ``min_size`` applies
    to the shorter side of the stored image (after ``max_side``).
    """
    data = _read(path)
    sha = hashlib.sha256(data).hexdigest()
    if not data:
        raise ImageError("empty", f"{path}: zero-byte file")

    with _pil_guards_for_us():
        try:
            # the base class: the transposed, converted and resized images replace it below
            im: Image.Image = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
        except Image.UnidentifiedImageError:
            raise ImageError("not_image", f"{path}: not a recognised image ({', '.join(ALLOWED_FORMATS)})") from None
        except Exception as e:  # a recognised format with a broken header
            raise ImageError("corrupt", f"{path}: unreadable image header ({type(e).__name__}: {e})") from None

        width, height = im.size  # from the header; nothing decoded yet
        plain_rgb_jpeg = im.format == "JPEG" and im.mode == "RGB"  # not MPO, CMYK or greyscale
        if width * height > max_pixels:
            raise ImageError(
                "too_large",
                f"{path}: {width}x{height} = {width * height} pixels exceeds the limit of {max_pixels} (not decoded)",
            )
        orientation = _orientation(im)
        if orientation in _SWAPS_SIDES:
            width, height = height, width
        stored_w, stored_h = _scaled_size(width, height, max_side)
        if max(stored_w, stored_h) > schema.MAX_SIDE:  # no JPEG can hold it; readers refuse the size
            raise ImageError(
                "too_large", f"{path}: {stored_w}x{stored_h} has a side over {schema.MAX_SIDE} px, a JPEG's limit"
            )
        if min(stored_w, stored_h) < min_size:
            size = f"{width}x{height}"
            if (stored_w, stored_h) != (width, height):
                size += f" (stored as {stored_w}x{stored_h} with max_side {max_side})"
            raise ImageError("too_small", f"{path}: {size} is below the minimum side of {min_size} px")

        try:
            im.load()
            notes = []
            if orientation is None:
                # Unparseable EXIF: take the stored pixels as they are; the re-encode below drops the EXIF so no
                # reader rotates them later either.
                notes.append("unreadable EXIF ignored")
            elif orientation != 1:
                im = ImageOps.exif_transpose(im)
                notes.append(f"EXIF orientation {orientation} applied")
            im, note = _to_rgb(im)
        except Exception as e:  # truncated or corrupt pixel data: PIL raises OSError, SyntaxError, ValueError, ...
            raise ImageError("corrupt", f"{path}: cannot decode ({type(e).__name__}: {e})") from None

        if note:
            notes.append(note)
        if (im.width, im.height) != (width, height):  # guards the header-based checks above
            raise ImageError("corrupt", f"{path}: decoded size {im.size} differs from header size {(width, height)}")

        keep = plain_rgb_jpeg and orientation == 1 and (stored_w, stored_h) == (width, height)
        if (stored_w, stored_h) != (width, height):
            # PIL's Lanczos widens its kernel by the reduction factor, so it low-passes before sampling (no aliasing,
            # unlike cv2's fixed 8x8 INTER_LANCZOS4) and keeps edges sharper than area averaging; selective search
            # groups regions by colour and texture, so both aliasing and blur would change its segments.
            im = im.resize((stored_w, stored_h), Image.Resampling.LANCZOS)
            notes.append(f"downscaled {width}x{height} -> {stored_w}x{stored_h} (Lanczos)")

        if keep:
            jpeg = data
            rgb = np.array(im, dtype=np.uint8)  # decoded from these very bytes: what a reader gets
        else:
            jpeg = _encode(im, quality)
            # Decode what we wrote, so `rgb` is always exactly the stored pixels: boxes are computed on what readers
            # see. Still inside the guards: our own output must not trip PIL's bomb check when max_pixels is raised.
            rgb = _decode_rgb(jpeg)
    if len(jpeg) > schema.IMAGE_MAX_BYTES:  # readers skip a KEY.jpg over the limit: never write one
        raise ImageError("too_large", f"{path}: {len(jpeg)} bytes stored, over the limit of {schema.IMAGE_MAX_BYTES}")
    return LoadedImage(
        rgb=rgb,
        jpeg=jpeg,
        orig_width=width,
        orig_height=height,
        sha256=sha,
        reencoded=not keep,
        note="; ".join(notes),
    )
