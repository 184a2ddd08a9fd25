"""``prep report``: one self-contained HTML file that holds a whole output together: the summary of ``prep stats``,
inputs by status with the failed paths, a sortable table of shards, a gallery of samples with their proposals, and
optionally the recall table of ``prep eval-proposals``. ``prep.report_page`` renders and writes it; this module
gathers it.

What is read, so a report of a large or remote output stays cheap: the Parquet and stats files (through
``check.summarize``, the one source of ``prep stats --json``), the manifest or run config, and a bounded head of a
few tars. Each gallery sample is one of the first ``head`` samples of its shard (``choose_samples``), so at most
``n`` tars are opened and each is read only up to the last sample it gives, never the whole output.
"""

from __future__ import annotations

import base64
import io
import json
import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow.compute as pc

from prep import check
from shards import layout, reader, schema, storage
from shards import summary as summaries

GALLERY_SAMPLES = 48
# A gallery sample is one of the first HEAD (or more, see choose_samples) samples of its shard: a tar is read only
# that far, which bounds the bytes read per shard whatever the shard size.
HEAD = 8
# Thumbnails: longer side in px and JPEG quality. 256 px at quality 75 is ~10-15 KB a photo, so 48 of them stay
# under 1 MB in the page (base64 included) and still show 20-px boxes clearly.
THUMB_SIDE = 256
THUMB_QUALITY = 75
# The failed-paths table lists at most this many rows (the counts by reason always cover every failure).
MAX_FAILED_ROWS = 1000
# Gallery cards per page in the browser.
PAGE_SIZE = 24


class ReportError(RuntimeError):
    """A report cannot be made (the output cannot be read, an eval file of another shape); names the file."""


@dataclass
class ShardRow:
    """One shard of the shard table: its stats file (None when the shard is not done) and its image bytes."""

    name: str
    stats: dict[str, Any] | None
    image_bytes: int | None


@dataclass
class Sample:
    """One gallery sample: where it is, its stored size, its boxes (rank order) and how many of the last ones came
    from the fallback tier, and a JPEG thumbnail."""

    shard: str
    key: str
    path: str
    width: int
    height: int
    boxes: np.ndarray  # int32 [N, 4] xyxy in stored-image px
    fallback: int
    thumbnail: bytes


@dataclass
class Report:
    """Everything the page shows (``report_page.render``)."""

    out: str
    summary: dict[str, Any]
    shards: list[ShardRow]
    failures: list[dict[str, Any]]  # key, path, status, error, shard; at most MAX_FAILED_ROWS
    samples: list[Sample]
    config: dict[str, Any] | None  # the run's settings (manifest, else run config, else a stats file)
    versions: dict[str, Any] | None
    fingerprint: str | None
    evaluation: dict[str, Any] | None = None
    seed: int = 0
    page_size: int = PAGE_SIZE
    tar_reads: dict[str, int] = field(default_factory=dict)  # shard -> samples read from its tar
    # chosen samples left out of the gallery: they break the format's rule (shards.reader), each with its reason
    rejected: list[reader.Rejected] = field(default_factory=list)

    @property
    def min_boxes(self) -> int:
        return int(self.summary["images"]["min_boxes"])


def choose_samples(counts: Mapping[str, int], n: int, seed: int) -> dict[str, list[int]]:
    """``min(n, total)`` samples, as shard -> sorted ordinals of ok samples (their order in the tar), chosen with
    ``seed`` among the first ``head`` samples of every shard, ``head`` the smallest of HEAD, 2·HEAD, 4·HEAD, … that
    offers enough. Depends only on the counts, the order of the shard names and the seed."""
    total = sum(counts.values())
    want = min(n, total)
    head = HEAD
    while sum(min(c, head) for c in counts.values()) < want:
        head *= 2
    pool = [(name, i) for name in sorted(counts) for i in range(min(counts[name], head))]
    chosen: dict[str, list[int]] = {}
    for name, i in sorted(random.Random(seed).sample(pool, want)):
        chosen.setdefault(name, []).append(i)
    return chosen


def read_evaluation(path: str) -> dict[str, Any]:
    """The JSON ``prep eval-proposals --json`` printed, checked for the fields the report shows."""
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except OSError as e:
        raise ReportError(f"{path}: cannot read: {e.strerror or e}") from None
    except ValueError as e:
        raise ReportError(f"{path}: not JSON: {e}") from None
    needed = ("recall", "mabo", "abo", "images", "annotations", "seconds_per_image", "kept_boxes_per_image")
    missing = [k for k in needed if not isinstance(data, dict) or k not in data]
    if missing:
        raise ReportError(
            f"{path}: not the output of `prep eval-proposals --json` (no {', '.join(repr(k) for k in missing)})"
        )
    return data


def make_report(
    out: str,
    *,
    n: int = GALLERY_SAMPLES,
    seed: int = 0,
    evaluation: dict[str, Any] | None = None,
    progress: bool = False,
    page_size: int = PAGE_SIZE,
) -> Report:
    """Gather the report of output ``out`` (local, ``s3://`` or ``http(s)://`` with a manifest). ``n``: gallery
    samples (0: none, no tar is opened). ``progress``: a bar on stderr for the tar reads."""
    try:
        summary = check.summarize(out)
        listing = layout.listing(out)
        names = layout.shard_names(listing, schema.PARQUET_SUFFIX)
        stats = _shard_stats(out, layout.shard_names(listing, schema.STATS_SUFFIX))
        failures = _failures(out, names, stats)
    except (OSError, ValueError) as e:
        raise ReportError(str(e)) from None
    by_shard = summary["bytes_per_shard"]["by_shard"]
    shards = [ShardRow(name, stats.get(name), by_shard.get(name)) for name in sorted(set(names) | set(stats))]
    config, versions, fingerprint = _run_settings(out, stats)
    report = Report(
        out=storage.redact(out),
        summary=summary,
        shards=shards,
        failures=failures,
        samples=[],
        config=config,
        versions=versions,
        fingerprint=fingerprint,
        evaluation=evaluation,
        seed=seed,
        page_size=page_size,
    )
    if n:
        # only done shards: a shard without its stats file may have a partial tar
        counts = {name: int(s["samples"]) for name, s in stats.items() if s.get("samples")}
        report.samples, report.tar_reads, report.rejected = _read_samples(
            out, choose_samples(counts, n, seed), progress
        )
    return report


# --- reading ---------------------------------------------------------------------------------------------------------
def _shard_stats(out: str, names: list[str]) -> dict[str, dict[str, Any]]:
    threads = summaries.REMOTE_THREADS if storage.is_remote(out) else summaries.LOCAL_THREADS
    urls = [layout.shard_file(out, name, schema.STATS_SUFFIX) for name in names]
    return dict(zip(names, summaries.ordered_map(summaries.read_shard_stats, urls, threads), strict=True))


def _failures(out: str, names: list[str], stats: Mapping[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The failed rows (key, path, status, error, shard), at most MAX_FAILED_ROWS, from the Parquet of only the shards
    whose stats file counts failures (or that have none)."""
    rows: list[dict[str, Any]] = []
    for name in names:
        if len(rows) >= MAX_FAILED_ROWS:
            break
        st = stats.get(name)
        if st is not None and not sum(st.get("failed", {}).values()):
            continue
        t = summaries.read_parquet(
            layout.shard_file(out, name, schema.PARQUET_SUFFIX), ["key", "path", "status", "error"]
        )
        failed = t.filter(pc.not_equal(t["status"], schema.STATUS_OK))
        rows += [{**r, "shard": name} for r in failed.slice(0, MAX_FAILED_ROWS - len(rows)).to_pylist()]
    return rows


def _run_settings(out: str, stats: Mapping[str, dict[str, Any]]) -> tuple[dict | None, dict | None, str | None]:
    """(config, versions, fingerprint) of the run: from the manifest, else the run config, else a stats file."""
    for name in (schema.MANIFEST_NAME, schema.RUN_CONFIG_NAME):
        url = storage.join(out, name)
        if storage.exists(url):
            d = json.loads(storage.read_bytes(url))
            return d.get("config"), d.get("versions"), d.get("fingerprint")
    first = next(iter(stats.values()), None)
    if first is None:
        return None, None, None
    return first.get("config"), None, first.get("fingerprint")


def _ok_rows(out: str, name: str) -> list[dict[str, Any]]:
    """The ok Parquet rows of a shard, in order (the order of its tar): what the gallery needs beside the tar."""
    t = summaries.read_parquet(
        layout.shard_file(out, name, schema.PARQUET_SUFFIX), ["key", "path", "status", "kept_boxes", "fallback_boxes"]
    )
    return t.filter(pc.equal(t["status"], schema.STATUS_OK)).to_pylist()


def _read_samples(
    out: str, chosen: Mapping[str, list[int]], progress: bool
) -> tuple[list[Sample], dict[str, int], list[reader.Rejected]]:
    """The chosen samples (ordinals of the Parquet's ok rows, which follow the tar's order), each shard's tar read
    until all its chosen ones were met; (samples, shard -> samples read, chosen samples left out because they break
    the format's rule). Tar samples are matched to rows by key, so a bad sample elsewhere shifts nothing."""
    from tqdm import tqdm

    total = sum(max(ordinals) + 1 for ordinals in chosen.values())
    samples: list[Sample] = []
    rejected: list[reader.Rejected] = []
    reads: dict[str, int] = {}
    with tqdm(total=total, unit="sample", desc="reading tars", disable=not progress, leave=False) as bar:
        for name, ordinals in sorted(chosen.items()):
            rows = _ok_rows(out, name)
            ordinal = {row["key"]: i for i, row in enumerate(rows)}
            url = layout.shard_file(out, name, schema.TAR_SUFFIX)
            wanted = set(ordinals)
            reads[name] = 0
            try:
                with storage.open_stream(url) as stream:
                    items = reader.shard_items(stream, url)
                    try:
                        for item in items:
                            key = item.key if isinstance(item, reader.Rejected) else item["__key__"]
                            if key is None:  # a damaged stretch of the tar: no row of its own
                                continue
                            bar.update(1)
                            reads[name] += 1
                            i = ordinal.get(key)
                            if i not in wanted:
                                continue
                            wanted.discard(i)
                            got = item if isinstance(item, reader.Rejected) else _sample(name, item, rows[i], url)
                            if isinstance(got, reader.Rejected):
                                rejected.append(got)
                            else:
                                samples.append(got)
                            if not wanted:
                                break
                    finally:
                        items.close()  # stops the read: the rest of the tar is never fetched
            except reader.ShardError as e:
                raise ReportError(str(e)) from None
            if wanted:
                raise ReportError(
                    f"{storage.redact(url)}: {reads[name]} samples, but its stats file counts more (run `prep verify`)"
                )
    return samples, reads, rejected


def _sample(shard: str, sample: dict[str, Any], row: dict[str, Any], url: str) -> Sample | reader.Rejected:
    """A valid sample (``shards.reader``) for the gallery; a Rejected when its JPEG is not what KEY.json says."""
    meta = sample["meta"]
    key = sample["__key__"]
    try:
        thumb = thumbnail(sample[schema.IMAGE_EXT], size=(meta["width"], meta["height"]))
    except schema.InvalidSample as e:
        return reader.Rejected(url, key, e.reason, str(e))
    return Sample(
        shard=shard,
        key=key,
        path=meta["path"],
        width=int(meta["width"]),
        height=int(meta["height"]),
        boxes=meta["boxes"],
        fallback=int(row["fallback_boxes"] or 0),
        thumbnail=thumb,
    )


def thumbnail(
    jpeg: bytes, side: int = THUMB_SIDE, quality: int = THUMB_QUALITY, size: tuple[int, int] | None = None
) -> bytes:
    """A JPEG of ``jpeg`` with its longer side at most ``side`` px. ``size``: the (width, height) its KEY.json
    records; ``schema.InvalidSample`` (``bad_image``) when the JPEG is not that size or does not decode."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(jpeg)) as im:
            if size is not None:
                schema.check_image_size({"width": size[0], "height": size[1]}, im.size)
            im.draft("RGB", (side, side))  # JPEG decodes at 1/2, 1/4, 1/8 scale when that is still large enough
            rgb = im.convert("RGB")
    except schema.InvalidSample:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError … for damaged data
        raise schema.InvalidSample("bad_image", f"the JPEG does not decode: {e}") from e
    scale = min(1.0, side / max(rgb.size))
    size = (max(1, math.floor(rgb.width * scale + 0.5)), max(1, math.floor(rgb.height * scale + 0.5)))
    if size != rgb.size:
        rgb = rgb.resize(size, Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    rgb.save(buf, "JPEG", quality=quality, optimize=True)
    return buf.getvalue()


def data_uri(jpeg: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")
