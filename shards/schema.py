"""The shard format: the one definition every writer, reader, stats tool and test imports.

A shard named ``{prefix}-{index:06d}`` is three files (or objects) side by side:

- ``NAME.tar``        WebDataset tar: ``KEY.jpg`` (RGB JPEG) and ``KEY.json`` (sample metadata) per sample,
                      members in input order, each pair jpg-then-json, mtime 0, owner 0, mode 0644 (byte-reproducible).
- ``NAME.parquet``    one row per *input* assigned to the shard, failures included (``PARQUET_SCHEMA``).
- ``NAME.stats.json`` written last: its presence marks the shard done (``make_stats``).

``manifest.json`` sits beside the shards once every shard is done (``make_manifest``).
Boxes are integer ``[x0, y0, x1, y1]`` in the stored image's pixels, end-exclusive
(``0 <= x0 < x1 <= width``), in selective-search rank order. ``docs/format.md`` is the prose version of this file.

Version 2 added the SHA-256 of the stored ``KEY.jpg`` bytes (``image_sha256`` in ``KEY.json`` and in the Parquet) and
the count of boxes from the fallback tier (``fallback_boxes`` in the Parquet, ``fallback_images`` in stats and
manifest). Readers read versions 1 and 2 (``READABLE_VERSIONS``); a version 1 Parquet file is read with nulls in the
columns it lacks (``conform_table``).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeGuard

import numpy as np
import pyarrow as pa

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)

# --- names -------------------------------------------------------------------------------------------------------
IMAGE_EXT = "jpg"
META_EXT = "json"
TAR_SUFFIX = ".tar"
PARQUET_SUFFIX = ".parquet"
STATS_SUFFIX = ".stats.json"
MANIFEST_NAME = "manifest.json"
# Written when a run starts; a later run into the same output must have the same fingerprint (or --overwrite).
RUN_CONFIG_NAME = "prep_config.json"
SHARD_DIGITS = 6

_SHARD_RE = re.compile(rf"^(?P<prefix>.+)-(?P<index>\d{{{SHARD_DIGITS}}})$")


def shard_name(prefix: str, index: int) -> str:
    """``coco``, 3 -> ``coco-000003`` (the stem shared by a shard's tar, parquet and stats)."""
    if not 0 <= index < 10**SHARD_DIGITS:
        raise ValueError(f"shard index {index} out of range")
    return f"{prefix}-{index:0{SHARD_DIGITS}d}"


def parse_shard_name(name: str) -> tuple[str, int]:
    """Inverse of ``shard_name``; accepts the stem or any of the three file names."""
    for suffix in (TAR_SUFFIX, PARQUET_SUFFIX, STATS_SUFFIX):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    m = _SHARD_RE.match(name)
    if not m:
        raise ValueError(f"not a shard name: {name!r}")
    return m.group("prefix"), int(m.group("index"))


# --- keys --------------------------------------------------------------------------------------------------------
# WebDataset splits a member name into key and extension at the *first* dot, so a key must not hold one; slashes
# would make directories inside the tar. USTAR names are limited to 100 bytes, so keys stay short and ASCII.
KEY_MAX_LEN = 80
_KEY_RE = re.compile(rf"^[A-Za-z0-9_\-]{{1,{KEY_MAX_LEN}}}$")
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-]+")


def is_valid_key(key: str) -> bool:
    return bool(_KEY_RE.match(key))


def sanitize_key(text: str) -> str:
    """A readable, WebDataset-safe key from a relative path: ``a b/ç.d.jpg`` -> ``a_b__d``
    (unsafe characters become ``_``, stripped at the ends of each path part).

    Not injective (callers that need unique keys resolve collisions, see ``prep.sources``)."""
    stem = text.rsplit(".", 1)[0] if "." in text.rsplit("/", 1)[-1] else text
    parts = [_UNSAFE.sub("_", p).strip("_") or "_" for p in stem.split("/")]
    key = "__".join(parts)
    if len(key) > KEY_MAX_LEN:
        # keep the (most specific) end of the path and make the cut unique with a digest of the whole path
        digest = hashlib.sha1(text.encode()).hexdigest()[:10]
        key = key[-(KEY_MAX_LEN - 11) :] + "-" + digest
    return key


# --- per-sample metadata (KEY.json) ------------------------------------------------------------------------------
def image_sha256(data: bytes) -> str:
    """Hex SHA-256 of the stored ``KEY.jpg`` bytes (the bytes in the tar, not the source file's)."""
    return hashlib.sha256(data).hexdigest()


_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def encode_meta(
    *,
    key: str,
    path: str,
    width: int,
    height: int,
    boxes: np.ndarray,
    image_sha256: str,
    label: int | None = None,
    image_id: int | None = None,
) -> bytes:
    """Canonical bytes of ``KEY.json`` (sorted keys, no spaces: identical inputs give identical bytes).
    ``image_sha256``: ``image_sha256(jpeg)`` of the ``KEY.jpg`` stored beside it."""
    if not isinstance(image_sha256, str) or not _SHA256_RE.match(image_sha256):
        raise ValueError(f"{key}: image_sha256 must be 64 lowercase hex digits, got {image_sha256!r}")
    boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
    meta = {
        "format_version": FORMAT_VERSION,
        "key": key,
        "path": path,
        "width": int(width),
        "height": int(height),
        "boxes": boxes.tolist(),
        "image_sha256": image_sha256,
        "label": None if label is None else int(label),
        "image_id": None if image_id is None else int(image_id),
    }
    return json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


# --- what a reader accepts (docs/format.md, "What a reader accepts") ---------------------------------------------
# Every reader (train's stream, train.eval, prep show / verify / report) applies this one rule to each sample and skips
# a sample that breaks it alone, counted under one of ``INVALID_REASONS``; prep never writes one (the writer checks).
META_MAX_BYTES = 1 << 20  # KEY.json: MAX_BOXES boxes of 5-digit numbers take ~0.3 MB
IMAGE_MAX_BYTES = 512 << 20  # KEY.jpg: above the largest JPEG prep makes within its default pixel limit
MAX_BOXES = 10_000
MAX_SIDE = 65_535  # the largest side a JPEG can have
SAMPLE_MEMBERS = (IMAGE_EXT, META_EXT)  # a sample is exactly these two members, consecutive, in any order

INVALID_REASONS = {
    "missing_member": "KEY.jpg or KEY.json is missing (or its tar header is damaged)",
    "duplicate_member": "a member, or the whole sample, appears twice in the shard",
    "unexpected_member": "a member other than KEY.jpg and KEY.json",
    "bad_member": "a member that is not a regular file (link, device, directory) or is over its size limit",
    "bad_name": "a member name that is not KEY.jpg / KEY.json with a valid key (absolute, ../, dots, no extension)",
    "bad_meta": "KEY.json is not a JSON object of a readable format version within the size limit",
    "bad_boxes": "boxes not [N][4] integers with 0 <= x0 < x1 <= width, 0 <= y0 < y1 <= height, N <= MAX_BOXES",
    "bad_image": "KEY.jpg does not decode, or its size is not width x height (checked where it is decoded)",
    "image_sha256": "KEY.jpg does not have the SHA-256 that KEY.json records (checked on request)",
    "damaged_tar": "bytes of the tar that hold no valid header, skipped up to the next valid one",
}


class InvalidSample(ValueError):
    """A sample that breaks the rule of ``docs/format.md`` ("What a reader accepts"); ``reason`` is a key of
    ``INVALID_REASONS``, the message says what is wrong (the reader adds the shard URL and the key)."""

    def __init__(self, reason: str, message: str):
        assert reason in INVALID_REASONS, reason
        super().__init__(message)
        self.reason = reason


def _no_repeated_names(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # json.loads keeps the last of two equal names: which "boxes" a tool reads would depend on the tool
    out = dict(pairs)
    if len(out) != len(pairs):
        seen = [k for i, (k, _) in enumerate(pairs) if k in dict(pairs[:i])]
        raise InvalidSample("bad_meta", f"KEY.json repeats the name {seen[0]!r}")
    return out


def _is_int(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def decode_meta(data: bytes, key: str | None = None) -> dict[str, Any]:
    """``KEY.json`` bytes -> dict with ``boxes`` as an int32 ``[N, 4]`` array and ``image_sha256`` (None in version 1,
    which has no hash), when the metadata follows the rule of ``docs/format.md``: at most ``META_MAX_BYTES``, a JSON
    object without repeated names, ``format_version`` in ``READABLE_VERSIONS``, ``key`` a string (equal to ``key``
    when given: the member's), ``path`` a string, ``width`` and ``height`` integers in [1, ``MAX_SIDE``], ``boxes``
    a list of at most ``MAX_BOXES`` lists of 4 integers with ``0 <= x0 < x1 <= width`` and ``0 <= y0 < y1 <=
    height``, ``image_sha256`` 64 lowercase hex digits (version 2), ``label`` and ``image_id`` integers or null.
    Other names are allowed (and kept). Raises ``InvalidSample`` (a ValueError) with reason ``bad_meta`` or
    ``bad_boxes``; never anything else, whatever the bytes."""
    if len(data) > META_MAX_BYTES:
        raise InvalidSample("bad_meta", f"KEY.json is {len(data)} bytes, more than the limit of {META_MAX_BYTES}")
    try:
        meta = json.loads(data, object_pairs_hook=_no_repeated_names)
    except InvalidSample:
        raise
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError; deep nesting recurses
        raise InvalidSample("bad_meta", f"KEY.json is not JSON: {type(e).__name__}: {str(e)[:200]}") from None
    if not isinstance(meta, dict):
        raise InvalidSample("bad_meta", f"KEY.json is a JSON {type(meta).__name__}, not an object")
    if "boxes" not in meta:
        raise InvalidSample("bad_meta", "sample metadata has no 'boxes'")
    version = meta.get("format_version")
    if not _is_int(version) or version not in READABLE_VERSIONS:
        raise InvalidSample(
            "bad_meta", f"sample metadata has format_version {version!r:.40}, this reader knows {READABLE_VERSIONS}"
        )
    sha = meta.setdefault("image_sha256", None)
    if (version >= 2 or sha is not None) and not (isinstance(sha, str) and _SHA256_RE.match(sha)):
        raise InvalidSample(
            "bad_meta", f"sample metadata of format_version {version} has no image_sha256 of 64 lowercase hex digits"
        )
    if not isinstance(meta.get("key"), str) or (key is not None and meta["key"] != key):
        raise InvalidSample("bad_meta", f"KEY.json has key {meta.get('key')!r:.100}, the member's key is {key!r}")
    if not isinstance(meta.get("path"), str):
        raise InvalidSample("bad_meta", f"KEY.json has path {meta.get('path')!r:.100}, not a string")
    for name in ("label", "image_id"):
        if meta.setdefault(name, None) is not None and not _is_int(meta[name]):
            raise InvalidSample("bad_meta", f"KEY.json has {name} {meta[name]!r:.40}, not an integer or null")
    width, height = meta.get("width"), meta.get("height")
    if not (_is_int(width) and _is_int(height) and 1 <= width <= MAX_SIDE and 1 <= height <= MAX_SIDE):
        raise InvalidSample(
            "bad_meta", f"KEY.json has width {width!r:.40}, height {height!r:.40}: not integers in [1, {MAX_SIDE}]"
        )
    meta["boxes"] = _boxes(meta["boxes"], width, height)
    return meta


def _boxes(boxes: Any, width: int, height: int) -> np.ndarray:
    """``boxes`` of KEY.json checked against the rule -> int32 ``[N, 4]``; InvalidSample naming the first bad box."""
    if not isinstance(boxes, list):
        raise InvalidSample("bad_boxes", f"boxes is a JSON {type(boxes).__name__}, not a list")
    if len(boxes) > MAX_BOXES:
        raise InvalidSample("bad_boxes", f"{len(boxes)} boxes, more than the limit of {MAX_BOXES}")
    for i, box in enumerate(boxes):
        if not (isinstance(box, list) and len(box) == 4 and all(map(_is_int, box))):
            raise InvalidSample("bad_boxes", f"box {i} is {box!r:.80}, not 4 integers [x0, y0, x1, y1]")
        x0, y0, x1, y1 = box
        if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
            raise InvalidSample(
                "bad_boxes",
                f"box {i} {box!r:.80} is not inside the {width}x{height} image with positive area "
                "(0 <= x0 < x1 <= width, 0 <= y0 < y1 <= height)",
            )
    return np.array(boxes, dtype=np.int32).reshape(-1, 4)


def check_image_size(meta: Mapping[str, Any], size: tuple[int, int]) -> None:
    """The stored JPEG, decoded (or its header read), must be ``width`` x ``height`` of its KEY.json: the boxes are in
    its pixels. ``size``: (width, height) as the decoder found it. InvalidSample ``bad_image`` otherwise."""
    if tuple(size) != (meta["width"], meta["height"]):
        raise InvalidSample(
            "bad_image", f"JPEG is {size[0]}x{size[1]} but its metadata says {meta['width']}x{meta['height']}"
        )


# --- parquet rows ------------------------------------------------------------------------------------------------
STATUS_OK = "ok"
# Failure reasons: the value of ``status`` for an input that produced no sample. ``error`` holds the message.
FAILURE_REASONS = {
    "missing": "file missing or unreadable",
    "empty": "zero-byte file",
    "not_image": "not a recognised image format",
    "corrupt": "image data truncated or corrupt",
    "too_large": "more pixels than the decompression-bomb limit",
    "too_small": "image smaller than the minimum size",
    "proposal_failed": "selective search raised an error",
}

PARQUET_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("path", pa.string(), nullable=False),  # source path relative to the source root
        pa.field("status", pa.string(), nullable=False),  # STATUS_OK or a FAILURE_REASONS key
        pa.field("error", pa.string()),  # message for a failure, null when ok
        pa.field("width", pa.int32()),  # stored image (after EXIF transpose and --max-side)
        pa.field("height", pa.int32()),
        pa.field("orig_width", pa.int32()),  # decoded source image (after EXIF transpose)
        pa.field("orig_height", pa.int32()),
        pa.field("label", pa.int32()),  # ImageNet class index
        pa.field("image_id", pa.int64()),  # COCO image id
        pa.field("raw_boxes", pa.int32()),  # selective search output count, before filters
        pa.field("kept_boxes", pa.int32()),
        pa.field("fallback_boxes", pa.int32()),  # of kept_boxes, from the fallback tier; null: that tier did not run
        pa.field("boxes", pa.list_(pa.list_(pa.int32()))),  # kept boxes, xyxy, as in KEY.json
        pa.field("ss_seconds", pa.float64()),  # selective search time (not reproducible across runs)
        pa.field("image_bytes", pa.int64()),  # size of KEY.jpg in the tar
        pa.field("image_sha256", pa.string()),  # of KEY.jpg in the tar, as in KEY.json
        pa.field("sha256", pa.string()),  # of the source file's bytes
    ]
)
# Columns each version added; a file of an older version lacks them.
ADDED_COLUMNS = {2: ("fallback_boxes", "image_sha256")}
# Columns whose values depend on timing, excluded when comparing two runs for reproducibility.
NONDETERMINISTIC_COLUMNS = ("ss_seconds",)


def failure_counts(counts: Iterable[tuple[str, int]]) -> dict[str, int]:
    """``(status, n)`` pairs summed by failure reason, ok rows left out, in reason order: the ``failed`` of the stats
    file, the manifest and every summary. ``(row["status"], 1) for row in rows`` counts rows; the items of several
    ``failed`` dicts add them up."""
    totals: dict[str, int] = {}
    for status, n in counts:
        if status != STATUS_OK:
            totals[status] = totals.get(status, 0) + n
    return dict(sorted(totals.items()))


def make_row(key: str, path: str, status: str = STATUS_OK, **fields: Any) -> dict[str, Any]:
    """A parquet row with every column present (missing ones None); rejects unknown columns and statuses."""
    if status != STATUS_OK and status not in FAILURE_REASONS:
        raise ValueError(f"unknown status {status!r}")
    unknown = set(fields) - set(PARQUET_SCHEMA.names)
    if unknown:
        raise ValueError(f"unknown parquet columns {sorted(unknown)}")
    row: dict[str, Any] = dict.fromkeys(PARQUET_SCHEMA.names)
    row.update(fields, key=key, path=path, status=status)
    if row["boxes"] is not None:
        row["boxes"] = np.asarray(row["boxes"], dtype=np.int64).reshape(-1, 4).tolist()
    return row


def rows_to_table(rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(list(rows), schema=PARQUET_SCHEMA)


def parquet_version(table_schema: pa.Schema) -> int | None:
    """The format version whose Parquet columns ``table_schema`` has (any subset of columns is not enough), or None."""
    for version in sorted(READABLE_VERSIONS, reverse=True):
        later = {c for v, cols in ADDED_COLUMNS.items() if v > version for c in cols}
        want = pa.schema([f for f in PARQUET_SCHEMA if f.name not in later])
        if table_schema.equals(want, check_metadata=False):
            return version
    return None


def conform_table(table: pa.Table, where: str) -> pa.Table:
    """A shard's Parquet table of any readable version with this version's columns (nulls where an older version had
    none). ValueError naming ``where`` for columns of no known version."""
    if parquet_version(table.schema) is None:
        raise ValueError(f"{where}: columns differ from the shard schema of every format version {READABLE_VERSIONS}")
    columns = [
        table[f.name] if f.name in table.column_names else pa.nulls(table.num_rows, f.type) for f in PARQUET_SCHEMA
    ]
    return pa.Table.from_arrays(columns, schema=PARQUET_SCHEMA)


# --- stats (done marker) and manifest ----------------------------------------------------------------------------
def fingerprint(config: Mapping[str, Any]) -> str:
    """Stable digest of the settings that decide a shard's content (runs with equal fingerprints may share an output)."""
    canon = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canon.encode()).hexdigest()[:16]


def make_stats(
    *,
    shard: str,
    config_fingerprint: str,
    rows: Sequence[Mapping[str, Any]],
    tar_bytes: int,
    parquet_bytes: int,
    seconds: float,
    min_boxes: int,
) -> dict[str, Any]:
    """The ``NAME.stats.json`` content for a shard from its parquet rows."""
    ok = few = boxes = fallback = 0
    ss = 0.0
    for r in rows:
        ss += r.get("ss_seconds") or 0.0
        if r["status"] == STATUS_OK:
            ok += 1
            boxes += r["kept_boxes"] or 0
            few += (r["kept_boxes"] or 0) < min_boxes
            fallback += r.get("fallback_boxes") is not None
    return {
        "format_version": FORMAT_VERSION,
        "shard": shard,
        "fingerprint": config_fingerprint,
        "inputs": len(rows),
        "samples": ok,
        "failed": failure_counts((r["status"], 1) for r in rows),
        "few_boxes": few,
        "min_boxes": min_boxes,
        "fallback_images": fallback,  # ok images whose first tier had fewer than min_boxes boxes (fallback tier ran)
        "boxes": boxes,
        "tar_bytes": tar_bytes,
        "parquet_bytes": parquet_bytes,
        "seconds": round(seconds, 3),
        "ss_seconds": round(ss, 3),
    }


def make_manifest(
    *,
    config: Mapping[str, Any],
    versions: Mapping[str, str],
    classes: list[str] | None,
    stats: Sequence[Mapping[str, Any]],
) -> dict[str, Any]:
    """``manifest.json``: config, versions, class list, every shard with its sample count, totals.

    ``fallback_images`` is in the totals when every shard's stats have it (version 2 stats)."""
    stats = sorted(stats, key=lambda s: s["shard"])
    fallback = (
        {"fallback_images": sum(s["fallback_images"] for s in stats)}
        if all("fallback_images" in s for s in stats)
        else {}
    )
    return {
        "format_version": FORMAT_VERSION,
        "fingerprint": fingerprint(config),
        "config": dict(config),
        "versions": dict(versions),
        "classes": classes,
        "shards": [
            {"name": s["shard"], "tar": s["shard"] + TAR_SUFFIX, "samples": s["samples"], "inputs": s["inputs"]}
            for s in stats
        ],
        "totals": {
            "shards": len(stats),
            "inputs": sum(s["inputs"] for s in stats),
            "samples": sum(s["samples"] for s in stats),
            "failed": failure_counts(item for s in stats for item in s["failed"].items()),
            "few_boxes": sum(s["few_boxes"] for s in stats),
            **fallback,
            "boxes": sum(s["boxes"] for s in stats),
            "tar_bytes": sum(s["tar_bytes"] for s in stats),
        },
    }


_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def tar_entry_inside(tar: Any) -> bool:
    """Whether a manifest's ``tar`` entry names a file in the manifest's own directory or prefix (or below it): a
    relative path of non-empty parts, none of them ``.`` or ``..``, without a scheme (``s3:``, ``https:``, ``pipe:``
    ...). Readers refuse other entries unless the user allows them: a manifest must not send a reader elsewhere."""
    if not isinstance(tar, str) or not tar or "\\" in tar or "\0" in tar or _SCHEME_RE.match(tar):
        return False
    return all(part not in ("", ".", "..") for part in tar.split("/"))


def dumps(obj: Mapping[str, Any]) -> bytes:
    """JSON for stats, manifest and run config files: indented for people, key order fixed for diffs."""
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()
