"""Image sources -> a sorted list of ``Record``s with unique, WebDataset-safe keys.

Every check that can fail (root, annotation file, empty source) runs here, before any image is read, so a typo in a
path costs seconds, not a night of selective search.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

from prep.config import SOURCE_KINDS
from shards import schema

# Pillow reads all of these; matched on the lower-cased extension.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif"})


@dataclass(frozen=True)
class Record:
    key: str  # unique within the source, schema.is_valid_key
    path: str  # absolute path to read
    relpath: str  # posix path relative to the source root, stored as `path` in KEY.json and the parquet
    label: int | None = None  # ImageNet class index
    image_id: int | None = None  # COCO image id


@dataclass
class Source:
    kind: str
    root: str  # absolute
    records: list[Record]
    classes: list[str] | None  # ImageNet wnids, sorted; label i is classes[i]


class SourceError(ValueError):
    """A source that cannot be used; raised before any work, the message names the path and the reason."""


def load_source(kind: str, root: str, annotations: str | None = None) -> Source:
    """Records of ``kind`` ("coco", "imagenet", "folder") under ``root``, in a deterministic order.

    coco with ``annotations``: the images listed in the JSON, sorted by id, key ``f"{id:012d}"``; a listed file absent
    on disk still becomes a Record (a ``missing`` row later). coco without, and folder: every image file under root.
    imagenet: ``root/<wnid>/**``, label = index of the wnid among the sorted class folders.
    """
    if kind not in SOURCE_KINDS:
        raise SourceError(f"unknown source kind {kind!r}; expected one of {', '.join(SOURCE_KINDS)}")
    if annotations is not None and kind != "coco":
        raise SourceError(f"--annotations is only used with coco, not {kind} (got {annotations})")
    root_abs = os.path.abspath(root)
    if not os.path.exists(root_abs):
        raise SourceError(f"{root}: source root does not exist")
    if not os.path.isdir(root_abs):
        raise SourceError(f"{root}: source root is not a directory")

    classes = None
    if kind == "coco" and annotations is not None:
        records = _coco_records(root_abs, annotations)
    elif kind == "imagenet":
        classes, records = _imagenet_records(root_abs)
    else:
        records = _folder_records(root_abs)
    if not records:
        raise SourceError(f"{root}: no image files found ({kind}; extensions {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return Source(kind=kind, root=root_abs, records=records, classes=classes)


# --- COCO instances JSON -----------------------------------------------------------------------------------------
def _coco_records(root: str, annotations: str) -> list[Record]:
    if not os.path.isfile(annotations):
        why = "is not a file" if os.path.exists(annotations) else "does not exist"
        raise SourceError(f"{annotations}: annotation file {why}")
    try:
        with open(annotations, "rb") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise SourceError(f"{annotations}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SourceError(f"{annotations}: cannot read annotation file: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise SourceError(f"{annotations}: not a COCO annotation file (no 'images' list at the top level)")

    by_id: dict[int, str] = {}
    for i, entry in enumerate(data["images"]):
        image_id, file_name = _coco_entry(entry)
        if image_id is None:
            raise SourceError(f"{annotations}: images[{i}] needs an integer 'id' >= 0 and a relative 'file_name'")
        if image_id in by_id:
            raise SourceError(f"{annotations}: image id {image_id} is listed twice (images[{i}])")
        by_id[image_id] = file_name

    records = [
        Record(key=f"{image_id:012d}", path=os.path.join(root, *rel.split("/")), relpath=rel, image_id=image_id)
        for image_id, rel in sorted(by_id.items())
    ]
    # One absent file becomes a `missing` row; all of them absent means ROOT is not the image directory.
    if records and not any(os.path.exists(r.path) for r in records):
        raise SourceError(
            f"{root}: none of the {len(records)} images listed in {annotations} exist here "
            f"(first: {records[0].path}); ROOT must be the directory the 'file_name' entries are relative to"
        )
    return records


def _coco_entry(entry: Any) -> tuple[int | None, str]:
    if not isinstance(entry, dict):
        return None, ""
    image_id, file_name = entry.get("id"), entry.get("file_name")
    if not isinstance(image_id, int) or isinstance(image_id, bool) or image_id < 0:
        return None, ""
    if not isinstance(file_name, str) or not file_name:
        return None, ""
    rel = file_name.replace("\\", "/")
    parts = rel.split("/")
    if rel.startswith("/") or ".." in parts or "" in parts:  # stay inside ROOT
        return None, ""
    return image_id, rel


# --- folders -----------------------------------------------------------------------------------------------------
def _folder_records(root: str) -> list[Record]:
    rels = _walk_images(root, "")
    return [
        Record(key=k, path=os.path.join(root, *r.split("/")), relpath=r)
        for k, r in zip(unique_keys(rels), rels, strict=True)
    ]


def _imagenet_records(root: str) -> tuple[list[str], list[Record]]:
    # Every class folder counts, empty or not, so labels keep the standard sorted-wnid indices.
    classes = sorted(n for n in _listdir(root) if not n.startswith(".") and os.path.isdir(os.path.join(root, n)))
    if not classes:
        raise SourceError(f"{root}: no class folders (expected ROOT/<wnid>/<images>)")
    rels: list[str] = []
    labels: list[int] = []
    for label, wnid in enumerate(classes):
        found = _walk_images(os.path.join(root, wnid), wnid + "/")
        rels += found
        labels += [label] * len(found)
    keys = unique_keys(rels)
    records = [
        Record(key=k, path=os.path.join(root, *r.split("/")), relpath=r, label=lab)
        for k, r, lab in zip(keys, rels, labels, strict=True)
    ]
    return classes, records


def _walk_images(top: str, prefix: str) -> list[str]:
    """Posix paths (``prefix`` + relative to ``top``) of the image files under ``top``, sorted; hidden ones skipped."""

    def fail(err: OSError) -> None:
        raise SourceError(f"{err.filename}: cannot list directory: {err.strerror}")

    found = []
    # Symlinked directories are not followed (no loops); symlinked files are read like files.
    for dirpath, dirnames, filenames in os.walk(top, onerror=fail):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel_dir = os.path.relpath(dirpath, top)
        rel_dir = "" if rel_dir == "." else rel_dir.replace(os.sep, "/") + "/"
        for name in filenames:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                rel = prefix + rel_dir + name
                try:  # the path is stored as UTF-8 text in KEY.json and the parquet
                    rel.encode("utf-8")
                except UnicodeEncodeError:
                    raise SourceError(
                        f"{os.path.join(dirpath, name)!r}: file name is not valid UTF-8; rename it"
                    ) from None
                found.append(rel)
    found.sort()
    return found


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError as e:
        raise SourceError(f"{path}: cannot list directory: {e.strerror}") from None


# --- keys --------------------------------------------------------------------------------------------------------
def unique_keys(relpaths: list[str]) -> list[str]:
    """``schema.sanitize_key`` of each path, made unique: every path whose key collides gets ``-<sha1(path)[:8]>``.

    Collisions are found case-insensitively so a tar unpacked on a case-insensitive filesystem loses no file. The
    result depends only on the set of paths, so it is the same in every run and on every machine."""
    base = [schema.sanitize_key(r) for r in relpaths]
    count: dict[str, int] = {}
    for k in base:
        count[k.lower()] = count.get(k.lower(), 0) + 1
    keys = []
    for k, rel in zip(base, relpaths, strict=True):
        if count[k.lower()] > 1:
            k = _with_digest(k, rel, 8)
        keys.append(k)
    # A suffixed key can (in theory) equal another path's plain key: widen the digest of the colliding ones.
    seen: dict[str, int] = {}
    for i, k in enumerate(keys):
        seen.setdefault(k.lower(), i)
    if len(seen) != len(keys):
        taken: set[str] = set()
        for i, (k, rel) in enumerate(zip(keys, relpaths, strict=True)):
            if k.lower() in taken:
                k = keys[i] = _with_digest(base[i], rel, 20)
            if k.lower() in taken:
                raise SourceError(f"{rel}: cannot make a unique sample key (collides with another path)")
            taken.add(k.lower())
    return keys


def _with_digest(key: str, relpath: str, n: int) -> str:
    digest = hashlib.sha1(relpath.encode()).hexdigest()[:n]
    return key[-(schema.KEY_MAX_LEN - n - 1) :] + "-" + digest
