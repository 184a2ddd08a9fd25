"""Check an output: ``summarize`` (``prep stats``: Parquet and stats files only), ``show`` (boxes drawn on samples),
``verify`` (tar vs Parquet vs stats files).

Names: a *stats file* is one shard's ``NAME.stats.json`` (its done marker); a *summary* is what ``prep stats`` reports
of a whole output (``shards.summary``).

``verify`` is the check a consumer can run before a training job: every claim the Parquet rows, the stats files and the
manifest make about the tars is checked against the tar bytes themselves, down to the SHA-256 of every stored image
(format version 2; ``quick`` skips the hashing).

``out`` is a local directory or a URL ``shards.storage`` can list (``s3://bucket/prefix``): Parquet is read through
pyarrow's filesystem layer, tars are streamed, and the output is listed once per command, not probed per file.
"""

from __future__ import annotations

import colorsys
import importlib
import io
import json
import math
import os
import random
import threading
from collections.abc import Callable, Iterator

import numpy as np

from shards import layout, reader, schema, storage

# verify stops listing a shard's problems after this many (one broken shard should not bury the others)
MAX_PROBLEMS_PER_SHARD = 20


class CheckError(RuntimeError):
    """The output cannot be looked at (no shards, unreadable Parquet); the message names the path."""


def _read_json(url: str) -> dict:
    return json.loads(storage.read_bytes(url))


def _read_parquet(url: str, columns: list[str] | None = None):
    """The shard Parquet at ``url``; all columns in this format version's schema (older versions conformed), or the
    ``columns`` named."""
    import pyarrow.parquet as pq

    fs, path = storage.arrow_filesystem(url)
    table = pq.read_table(path, filesystem=fs, columns=columns)
    return table if columns is not None else schema.conform_table(table, url)


def _run_config(out: str) -> dict | None:
    url = storage.join(out, schema.RUN_CONFIG_NAME)
    return _read_json(url) if storage.exists(url) else None


# --- stats -----------------------------------------------------------------------------------------------------------
def summarize(out: str, plot: str | None = None) -> dict:
    """``shards.summary.summarize_output`` of ``out`` (Parquet and stats files, streamed; never the tars), plus
    ``accounting``: planned inputs (run config) against Parquet rows = ok + failed, so a reader sees that every
    input ended up somewhere."""
    from shards import summary as summaries

    if plot:  # matplotlib takes ~0.7 s to import: load it while the shards are read (decoding runs without the GIL)
        loader = threading.Thread(
            target=importlib.import_module, args=("matplotlib.backends.backend_agg",), daemon=True
        )
        loader.start()
    try:
        summary = summaries.summarize_output(out, layout.listing(out))
    except (OSError, ValueError) as e:
        raise CheckError(str(e)) from None
    im = summary["images"]
    run_cfg = _run_config(out)
    planned = run_cfg["source"]["inputs"] if run_cfg and "source" in run_cfg else None
    summary["accounting"] = {
        "planned_inputs": planned,
        "rows": im["inputs"],
        "ok": im["ok"],
        "failed": im["failed_total"],
        "adds_up": planned == im["inputs"] if planned is not None else None,
    }
    if plot:
        loader.join()
        summaries.plot_summary(summary, plot)
    return summary


def format_summary(summary: dict) -> str:
    """``summarize``'s result as text: ``shards.summary.format_summary`` and the accounting line."""
    from shards import summary as summaries

    return summaries.format_summary(summary).rstrip() + "\n" + accounting_line(summary)


def accounting_line(summary: dict) -> str:
    """Whether every planned input of ``summarize``'s result ended up ok or failed, in one line."""
    a = summary["accounting"]
    if a["planned_inputs"] is None:
        line = f"inputs: {a['rows']} rows = {a['ok']} ok + {a['failed']} failed (no run config: plan unknown)"
    elif a["adds_up"]:
        line = (
            f"inputs: {a['planned_inputs']} planned = {a['ok']} ok + {a['failed']} failed (every input accounted for)"
        )
    else:
        line = (
            f"inputs: {a['planned_inputs']} planned but {a['rows']} rows ({a['ok']} ok + {a['failed']} failed): "
            "the run is not finished (rerun it) or shards are missing"
        )
    return line


# --- show ------------------------------------------------------------------------------------------------------------
def rank_colour(rank: int, count: int) -> tuple[int, int, int]:
    """Red for the first box, through yellow and green, to blue for the last drawn."""
    hue = 0.66 * rank / max(count - 1, 1)
    r, g, b = colorsys.hsv_to_rgb(hue, 1.0, 1.0)
    return int(r * 255), int(g * 255), int(b * 255)


def _ok_keys(out: str, name: str) -> list[str]:
    t = _read_parquet(layout.shard_file(out, name, schema.PARQUET_SUFFIX), columns=["key", "status"])
    return [
        k
        for k, s in zip(t.column("key").to_pylist(), t.column("status").to_pylist(), strict=True)
        if s == schema.STATUS_OK
    ]


def _samples(url: str, on_reject: Callable[[reader.Rejected], None]) -> Iterator[dict]:
    """The valid samples of a shard (``shards.reader``), invalid ones to ``on_reject``; a shard that cannot be read
    as a tar is a CheckError naming it."""
    try:
        yield from reader.read_shard(url, on_reject=on_reject)
    except reader.ShardError as e:
        raise CheckError(str(e)) from None


def show(
    out: str,
    output: str,
    *,
    n: int = 16,
    seed: int = 0,
    max_boxes: int = 20,
    cell: int = 256,
    on_reject: Callable[[reader.Rejected], None] | None = None,
) -> list[str]:
    """Draw the first ``max_boxes`` boxes of ``n`` random ok samples (chosen with ``seed``) on a grid PNG; returns
    the keys drawn, in grid order. A chosen sample that breaks the format's rule (``shards.reader``; or its JPEG does
    not decode to its recorded size) is left out and goes to ``on_reject`` (default: ignored)."""
    from PIL import Image, ImageDraw, ImageFont

    listing = set(storage.list_names(out))
    names = layout.shard_names(listing, schema.TAR_SUFFIX)
    pool = [(name, key) for name in names for key in _ok_keys(out, name)]
    if not pool:
        raise CheckError(f"{out}: no samples to show (no shards with ok rows)")
    chosen = sorted(random.Random(seed).sample(pool, min(n, len(pool))))
    wanted: dict[str, set[str]] = {}
    for name, key in chosen:
        wanted.setdefault(name, set()).add(key)

    caption_h = 14
    cols = math.ceil(math.sqrt(len(chosen)))
    rows = math.ceil(len(chosen) / cols)
    grid = Image.new("RGB", (cols * cell, rows * (cell + caption_h)), (32, 32, 32))
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default()
    drawn: list[str] = []

    def rejected(item: reader.Rejected) -> None:
        if on_reject is not None and item.key in wanted.get(name, ()):
            on_reject(item)

    for name in sorted(wanted):
        for sample in _samples(layout.shard_file(out, name, schema.TAR_SUFFIX), rejected):
            key = sample["__key__"]
            if key not in wanted[name]:
                continue
            meta = sample["meta"]
            try:
                img = _decoded(sample)
            except schema.InvalidSample as e:
                rejected(reader.Rejected(sample["__url__"], key, e.reason, str(e)))
                continue
            scale = min(cell / img.width, cell / img.height)
            thumb = img.resize(
                (max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.BILINEAR
            )
            i = len(drawn)
            x0, y0 = (i % cols) * cell, (i // cols) * (cell + caption_h)
            ox, oy = x0 + (cell - thumb.width) // 2, y0 + (cell - thumb.height) // 2
            grid.paste(thumb, (ox, oy))
            boxes = meta["boxes"][:max_boxes]
            for rank in reversed(range(len(boxes))):  # first-ranked drawn last, on top
                bx0, by0, bx1, by1 = (boxes[rank] * scale).tolist()
                draw.rectangle(
                    [ox + bx0, oy + by0, ox + bx1 - 1, oy + by1 - 1],
                    outline=rank_colour(rank, len(boxes)),
                    width=2 if rank < 5 else 1,
                )
            draw.text(
                (x0 + 2, y0 + cell + 1), f"{key} ({len(meta['boxes'])})"[: cell // 6], fill=(230, 230, 230), font=font
            )
            drawn.append(key)
    grid.save(output)
    return drawn


def _decoded(sample: dict):
    """The sample's JPEG decoded as an RGB PIL image; ``schema.InvalidSample`` (``bad_image``) when it does not decode
    or its size is not the one its KEY.json records."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(sample[schema.IMAGE_EXT])) as im:
            rgb = im.convert("RGB")  # decodes every byte: a truncated or corrupt JPEG raises here
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError … for damaged data
        raise schema.InvalidSample("bad_image", f"{sample['__key__']}.{schema.IMAGE_EXT} does not decode: {e}") from e
    schema.check_image_size(sample["meta"], rgb.size)
    return rgb


# --- verify ----------------------------------------------------------------------------------------------------------
def _decode_size(jpeg: bytes) -> tuple[tuple[int, int], str, str]:
    from PIL import Image

    with Image.open(io.BytesIO(jpeg)) as im:
        im.load()  # decodes every byte: a truncated or corrupt JPEG raises here
        return im.size, im.format, im.mode


def verify_shard(
    out: str,
    name: str,
    fingerprint: str | None = None,
    listing: set[str] | None = None,
    *,
    quick: bool = False,
    skipped: dict[str, int] | None = None,
) -> tuple[list[str], dict | None]:
    """Problems of one shard (each line starts with the shard name) and its stats (None if unreadable).
    ``listing``: the set of ``storage.list_names(out)`` when the caller has it already. ``quick``: do not hash the
    stored images (their SHA-256 is checked against ``KEY.json`` otherwise, in format version 2). ``skipped``: gets
    the samples readers would skip, counted by reason (``schema.INVALID_REASONS``)."""
    problems: list[str] = []

    def problem(msg: str) -> None:
        problems.append(f"{name}: {msg}")

    def file(suffix: str) -> str:
        return layout.shard_file(out, name, suffix)

    present = set(storage.list_names(out)) if listing is None else listing
    missing = [s for s in layout.SHARD_SUFFIXES if name + s not in present]
    if missing:
        problem(
            f"missing {', '.join(name + s for s in missing)}"
            + (" (not done: rerun prep to redo it)" if schema.STATS_SUFFIX in missing else "")
        )
        return problems, None
    try:
        st = _read_json(file(schema.STATS_SUFFIX))
    except ValueError as e:
        problem(f"stats file is not JSON: {e}")
        return problems, None
    try:
        rows = _read_parquet(file(schema.PARQUET_SUFFIX)).to_pylist()
    except Exception as e:  # pyarrow raises several types for a damaged file
        problem(f"parquet unreadable: {e}")
        return problems, st

    # stats vs parquet vs file sizes
    ok_rows = [r for r in rows if r["status"] == schema.STATUS_OK]
    for r in rows:
        if r["status"] != schema.STATUS_OK and r["status"] not in schema.FAILURE_REASONS:
            problem(f"row {r['key']}: unknown status {r['status']!r}")
    expect = {
        "shard": name,
        "inputs": len(rows),
        "samples": len(ok_rows),
        "failed": schema.failure_counts((r["status"], 1) for r in rows),
        "boxes": sum(r["kept_boxes"] or 0 for r in ok_rows),
    }
    if st.get("format_version", 1) >= 2:
        expect["fallback_images"] = sum(r["fallback_boxes"] is not None for r in ok_rows)
    for field, suffix in (("tar_bytes", schema.TAR_SUFFIX), ("parquet_bytes", schema.PARQUET_SUFFIX)):
        size = _size(file(suffix))
        if size is not None:  # unknown for http(s) URLs
            expect[field] = size
    if fingerprint is not None:
        expect["fingerprint"] = fingerprint
    for k, v in expect.items():
        if st.get(k) != v:
            problem(f"stats {k} = {st.get(k)!r}, but the shard has {v!r}")

    # tar vs parquet ok rows: the samples as every reader finds them (``shards.reader``: the format's rule, the
    # image hashes unless ``quick``, the end-of-archive marker); a sample a reader would skip is a problem naming why
    order = {r["key"]: i for i, r in enumerate(ok_rows)}
    found: set[str] = set()
    last = -1

    def reject(item: reader.Rejected) -> None:
        problem(f"{item.key or 'tar'}: {item.detail} (readers skip it: {item.reason})")
        if skipped is not None:
            skipped[item.reason] = skipped.get(item.reason, 0) + 1
        if item.key is not None:
            found.add(item.key)

    try:
        for sample in reader.read_shard(file(schema.TAR_SUFFIX), on_reject=reject, verify_images=not quick):
            key = sample["__key__"]
            found.add(key)
            if key not in order:
                problem(f"tar sample {key!r} has no parquet ok row")
                continue
            if order[key] < last:
                problem(f"tar sample {key!r} comes before parquet ok rows listed ahead of it (order differs)")
            last = max(last, order[key])
            _check_sample(key, sample, ok_rows[order[key]], problem)
            if len(problems) > MAX_PROBLEMS_PER_SHARD:
                break
    except (reader.ShardError, OSError) as e:
        problem(f"tar unreadable after {len(found)} samples: {e}")
    rest = [r["key"] for r in ok_rows if r["key"] not in found]
    if rest and len(problems) <= MAX_PROBLEMS_PER_SHARD:
        problem(f"{len(rest)} parquet ok rows have no tar sample (first: {rest[0]!r})")
    if len(problems) > MAX_PROBLEMS_PER_SHARD:
        problems[MAX_PROBLEMS_PER_SHARD:] = [f"{name}: … (more problems not listed)"]
    return problems, st


def _check_sample(key: str, sample: dict, row: dict, problem: Callable[[str], None]) -> None:
    """A valid sample (``shards.reader``: the format's rule holds) against its Parquet row, and its JPEG decoded."""
    meta = sample["meta"]
    for field, value in (
        ("path", row["path"]),
        ("width", row["width"]),
        ("height", row["height"]),
        ("label", row["label"]),
        ("image_id", row["image_id"]),
        ("image_sha256", row["image_sha256"]),
    ):
        if meta.get(field) != value:
            problem(f"{key}.{schema.META_EXT}: {field} = {meta.get(field)!r}, parquet has {value!r}")
    boxes = meta["boxes"]
    if row["boxes"] is None or not np.array_equal(boxes, np.asarray(row["boxes"], dtype=np.int32).reshape(-1, 4)):
        problem(f"{key}: boxes in {key}.{schema.META_EXT} differ from the parquet row")
    if len(boxes) != row["kept_boxes"]:
        problem(f"{key}: {len(boxes)} boxes, parquet kept_boxes = {row['kept_boxes']}")
    jpeg = sample[schema.IMAGE_EXT]
    if len(jpeg) != row["image_bytes"]:
        problem(f"{key}.{schema.IMAGE_EXT}: {len(jpeg)} bytes, parquet image_bytes = {row['image_bytes']}")
    try:
        size, fmt, mode = _decode_size(jpeg)
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError … for damaged data
        problem(f"{key}.{schema.IMAGE_EXT}: does not decode: {e} (readers skip it: bad_image)")
        return
    try:
        schema.check_image_size(meta, size)
    except schema.InvalidSample as e:
        problem(f"{key}.{schema.IMAGE_EXT}: {e} (readers skip it: {e.reason})")
    if fmt != "JPEG" or mode != "RGB":
        problem(f"{key}.{schema.IMAGE_EXT}: is {fmt} {mode}, expected an RGB JPEG")


def _size(url: str) -> int | None:
    """Bytes of a file or S3 object (pyarrow's filesystem layer, as for the Parquet); None where it cannot tell."""
    if not storage.is_remote(url):
        return os.path.getsize(storage.local_path(url))
    try:
        fs, path = storage.arrow_filesystem(url)
        return fs.get_file_info(path).size
    except (NotImplementedError, OSError):
        return None


def verify(out: str, echo: Callable[[str], None] = print, *, quick: bool = False) -> tuple[list[str], dict]:
    """Check every shard of ``out`` (``verify_shard``; ``quick``: without hashing the images), keys unique across
    shards, the plan of the run config and the manifest totals. ``echo`` gets each problem line as found. Returns
    (problems, totals); ``totals["samples_skipped"]``: the samples readers would skip, by reason."""
    problems: list[str] = []

    def report(lines: list[str]) -> None:
        for line in lines:
            echo(line)
        problems.extend(lines)

    run_cfg = _run_config(out)
    listing = set(storage.list_names(out))
    names = layout.shard_names(listing)
    if run_cfg is not None:
        planned = run_cfg.get("shards", [])
        report([f"{n}: planned in {schema.RUN_CONFIG_NAME} but absent" for n in planned if n not in names])
        report([f"{n}: not in the plan of {schema.RUN_CONFIG_NAME}" for n in names if n not in planned])
    if not names:
        report([f"{out}: no shards"])
    fingerprint = run_cfg.get("fingerprint") if run_cfg else None
    shard_stats = []
    owner: dict[str, str] = {}
    skipped: dict[str, int] = {}
    for name in names:
        shard_problems, st = verify_shard(out, name, fingerprint, listing, quick=quick, skipped=skipped)
        report(shard_problems)
        if st is not None:
            shard_stats.append(st)
        try:
            keys = _read_parquet(layout.shard_file(out, name, schema.PARQUET_SUFFIX), columns=["key"]).column("key")
        except Exception:
            continue  # already reported by verify_shard
        dup = [f"{name}: key {k!r} also in {owner[k]}" for k in keys.to_pylist() if k in owner]
        report(dup[:MAX_PROBLEMS_PER_SHARD])
        owner.update((k, name) for k in keys.to_pylist())

    manifest_url = storage.join(out, schema.MANIFEST_NAME)
    if schema.MANIFEST_NAME in listing:
        report(_check_manifest(_read_json(manifest_url), shard_stats, run_cfg))
    totals = {
        "shards": len(names),
        "samples": sum(s.get("samples", 0) for s in shard_stats),
        "inputs": sum(s.get("inputs", 0) for s in shard_stats),
        "samples_skipped": dict(sorted(skipped.items())),
    }
    return problems, totals


def _check_manifest(manifest: dict, shard_stats: list[dict], run_cfg: dict | None) -> list[str]:
    lines = []
    recomputed = schema.make_manifest(config={}, versions={}, classes=None, stats=shard_stats)
    if [s["name"] for s in manifest.get("shards", [])] != [s["name"] for s in recomputed["shards"]]:
        lines.append(f"{schema.MANIFEST_NAME}: shard list differs from the shards present")
    else:
        for m, r in zip(manifest["shards"], recomputed["shards"], strict=True):
            if (m.get("samples"), m.get("inputs")) != (r["samples"], r["inputs"]):
                lines.append(
                    f"{schema.MANIFEST_NAME}: {m['name']} samples/inputs {m.get('samples')}/{m.get('inputs')}"
                    f", stats say {r['samples']}/{r['inputs']}"
                )
    for k, v in recomputed["totals"].items():
        if manifest.get("totals", {}).get(k) != v:
            lines.append(
                f"{schema.MANIFEST_NAME}: totals {k} = {manifest.get('totals', {}).get(k)!r}, "
                f"the shards' stats add up to {v!r}"
            )
    if run_cfg is not None and manifest.get("fingerprint") != run_cfg.get("fingerprint"):
        lines.append(
            f"{schema.MANIFEST_NAME}: fingerprint {manifest.get('fingerprint')} differs from "
            f"{schema.RUN_CONFIG_NAME} ({run_cfg.get('fingerprint')})"
        )
    return lines
