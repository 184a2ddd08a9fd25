"""Summaries of an output read from its Parquet files only: counts by status, box and size distributions, timing.

``summarize`` returns plain JSON-able data (``prep stats --json``); ``format_summary`` and ``plot_summary`` render it.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from shards import schema, storage

PERCENTILES = (5, 25, 50, 75, 95)
HIST_BINS = 20
# Used for the few-box count when no stats files say otherwise; the same K=4 as PrepConfig.min_boxes.
DEFAULT_MIN_BOXES = 4


def read_table(out: str) -> pa.Table:
    """Every ``NAME.parquet`` of output ``out``, concatenated in shard order, with a ``shard`` column (NAME) added."""
    names = [n for n in storage.list_names(out) if n.endswith(schema.PARQUET_SUFFIX) and not n.startswith(".")]
    if not names:
        raise FileNotFoundError(f"{out}: no shard parquet files (*{schema.PARQUET_SUFFIX}) found")
    tables = []
    # one filesystem for the whole output (for S3: one client and one credential lookup, not one per file)
    fs, base = storage.arrow_filesystem(out)
    for n in names:
        url = storage.join(out, n)
        path = f"{base.rstrip('/')}/{n}" if storage.is_remote(out) else os.path.join(base, n)
        try:
            t = pq.read_table(path, filesystem=fs)
        except (OSError, pa.ArrowException) as e:
            raise ValueError(f"{url}: cannot read parquet: {e}") from None
        t = schema.conform_table(t, url)  # a version 1 file gets null columns for what version 2 added
        shard = n[: -len(schema.PARQUET_SUFFIX)]
        tables.append(t.append_column("shard", pa.array([shard] * t.num_rows, pa.string())))
    return pa.concat_tables(tables)


def summarize(
    table: pa.Table, stats: Iterable[Mapping[str, Any]] | None = None, *, min_boxes: int | None = None
) -> dict[str, Any]:
    """A JSON-able summary of ``table`` (``read_table`` output; without a ``shard`` column it counts as one shard).

    ``stats``: optional per-shard ``NAME.stats.json`` dicts; their counts are checked against the table and their
    ``min_boxes`` used for the few-box count (else ``min_boxes``, else ``DEFAULT_MIN_BOXES``)."""
    stats = list(stats) if stats is not None else None
    if min_boxes is None:
        found = {s["min_boxes"] for s in stats or []}
        min_boxes = found.pop() if len(found) == 1 else DEFAULT_MIN_BOXES
    shard = table["shard"].to_pylist() if "shard" in table.column_names else [""] * table.num_rows
    status = table["status"].to_pylist()
    is_ok = np.array([s == schema.STATUS_OK for s in status], dtype=bool)

    failed: dict[str, int] = {}
    for s in status:
        if s != schema.STATUS_OK:
            failed[s] = failed.get(s, 0) + 1
    n_ok = int(is_ok.sum())
    problems = _count_problems(table, shard, status, is_ok, stats)

    kept = _int_column(table, "kept_boxes")[is_ok]
    raw = _int_column(table, "raw_boxes")[is_ok]
    ok_table = table.filter(pa.array(is_ok))
    boxes = _flat_boxes(ok_table["boxes"])
    w = (boxes[:, 2] - boxes[:, 0]).astype(np.float64)
    h = (boxes[:, 3] - boxes[:, 1]).astype(np.float64)
    side = np.sqrt(w * h)
    with np.errstate(divide="ignore", invalid="ignore"):
        aspect = np.where(h > 0, w / np.where(h > 0, h, 1), np.nan)
    aspect = aspect[np.isfinite(aspect) & (aspect > 0)]

    bytes_by_shard: dict[str, int] = {}
    image_bytes = table["image_bytes"].to_pylist()
    for sh, b in zip(shard, image_bytes):
        bytes_by_shard[sh] = bytes_by_shard.get(sh, 0) + (b or 0)
    ss = table["ss_seconds"].to_numpy(zero_copy_only=False).astype(np.float64)
    ss = ss[np.isfinite(ss)]

    return {
        "format_version": schema.FORMAT_VERSION,
        "shards": len(set(shard)),
        "images": {
            "inputs": table.num_rows,
            "ok": n_ok,
            "failed": dict(sorted(failed.items())),
            "failed_total": table.num_rows - n_ok,
            "few_boxes": int((kept < min_boxes).sum()),
            "min_boxes": min_boxes,
        },
        "counts_add_up": not problems,
        "count_problems": problems,
        "boxes_per_image": {**_distribution(kept, _int_edges(kept)), "total": int(kept.sum()), "raw_mean": _mean(raw)},
        "box_size": _distribution(side, _linear_edges(side)),
        "box_aspect": _distribution(aspect, _log_edges(aspect)),
        "bytes_per_shard": {
            "by_shard": dict(sorted(bytes_by_shard.items())),
            "total": int(sum(bytes_by_shard.values())),
            "mean_per_image": round(sum(bytes_by_shard.values()) / n_ok, 1) if n_ok else None,
        },
        "seconds_per_image": {
            "count": int(ss.size),
            "total": round(float(ss.sum()), 3),
            "mean": _round(ss.mean()) if ss.size else None,
            "p50": _round(np.percentile(ss, 50)) if ss.size else None,
            "p95": _round(np.percentile(ss, 95)) if ss.size else None,
        },
    }


def _count_problems(table, shard, status, is_ok, stats) -> list[str]:
    """Why the counts do not add up: every input must be ok or a known failure, ok rows must carry their boxes,
    and (when stats files are given) each shard's stats must match its parquet rows."""
    problems = []
    unknown = sorted({s for s in status if s != schema.STATUS_OK and s not in schema.FAILURE_REASONS})
    if unknown:
        problems.append(f"unknown statuses {unknown}")
    kept = table["kept_boxes"].to_pylist()
    n_boxes = pc.list_value_length(table["boxes"]).to_pylist()
    bad = [k for k, ok, a, b in zip(table["key"].to_pylist(), is_ok, kept, n_boxes) if ok and (a is None or a != b)]
    if bad:
        problems.append(f"{len(bad)} ok rows whose kept_boxes differs from their boxes (first: {bad[0]})")
    if stats is None:
        return problems
    per_shard: dict[str, dict[str, Any]] = {}
    for sh, st, ok in zip(shard, status, is_ok):
        c = per_shard.setdefault(sh, {"inputs": 0, "samples": 0, "failed": {}})
        c["inputs"] += 1
        if ok:
            c["samples"] += 1
        else:
            c["failed"][st] = c["failed"].get(st, 0) + 1
    seen = set()
    for s in stats:
        name = s["shard"]
        seen.add(name)
        c = per_shard.get(name)
        if c is None:
            problems.append(f"{name}: has a stats file but no parquet rows")
            continue
        for field in ("inputs", "samples"):
            if s[field] != c[field]:
                problems.append(f"{name}: stats say {field}={s[field]}, parquet has {c[field]}")
        if dict(s["failed"]) != c["failed"]:
            problems.append(f"{name}: stats say failed={dict(s['failed'])}, parquet has {c['failed']}")
    for name in sorted(set(per_shard) - seen):
        problems.append(f"{name}: parquet rows but no stats file (shard not done)")
    return problems


def _int_column(table: pa.Table, name: str) -> np.ndarray:
    return table[name].fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)


def _flat_boxes(column: pa.ChunkedArray) -> np.ndarray:
    """list<list<int32>> of N images -> int64 [B, 4] of all their boxes, without a Python loop over boxes."""
    if len(column) == 0:
        return np.zeros((0, 4), np.int64)
    flat = pc.list_flatten(pc.list_flatten(column))
    return flat.to_numpy(zero_copy_only=False).astype(np.int64).reshape(-1, 4)


def _distribution(x: np.ndarray, edges: np.ndarray) -> dict[str, Any]:
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0:
        return {"count": 0, "mean": None, "min": None, "max": None, **{f"p{p}": None for p in PERCENTILES},
                "histogram": {"edges": [], "counts": []}}
    counts, _ = np.histogram(x, bins=edges)
    return {
        "count": int(x.size),
        "mean": _round(x.mean()),
        "min": _round(x.min()),
        "max": _round(x.max()),
        **{f"p{p}": _round(v) for p, v in zip(PERCENTILES, np.percentile(x, PERCENTILES))},
        "histogram": {"edges": [_round(e) for e in edges], "counts": counts.tolist()},
    }


def _int_edges(x: np.ndarray) -> np.ndarray:
    """Integer-aligned bins covering 0..max (box counts): width 1 up to HIST_BINS values, wider beyond."""
    top = int(x.max()) + 1 if x.size else 1
    width = max(1, -(-top // HIST_BINS))
    return np.arange(0, top + width, width, dtype=np.float64)


def _linear_edges(x: np.ndarray) -> np.ndarray:
    if x.size == 0:
        return np.array([0.0, 1.0])
    lo, hi = float(x.min()), float(x.max())
    return np.linspace(lo, hi if hi > lo else lo + 1, HIST_BINS + 1)


def _log_edges(x: np.ndarray) -> np.ndarray:
    """Aspect ratios w/h: bins even in log scale, symmetric around 1 (a 1:3 and a 3:1 box land equally far out)."""
    if x.size == 0:
        return np.array([0.5, 2.0])
    r = max(float(np.abs(np.log2(x)).max()), 0.5)
    return np.exp2(np.linspace(-r, r, HIST_BINS + 1))


def _mean(x: np.ndarray) -> float | None:
    return _round(x.mean()) if x.size else None


def _round(v: float) -> float:
    return round(float(v), 4)


# --- rendering ---------------------------------------------------------------------------------------------------
def format_summary(summary: Mapping[str, Any]) -> str:
    """Human-readable text of a ``summarize`` result."""
    im = summary["images"]
    lines = [f"shards: {summary['shards']}"]
    verdict = "counts add up" if summary["counts_add_up"] else "COUNTS DO NOT ADD UP"
    lines.append(f"images: {im['inputs']} inputs = {im['ok']} ok + {im['failed_total']} failed  ({verdict})")
    for p in summary["count_problems"]:
        lines.append(f"  problem: {p}")
    for reason, n in im["failed"].items():
        lines.append(f"  failed {reason}: {n}  ({schema.FAILURE_REASONS.get(reason, 'unknown reason')})")
    lines.append(f"few boxes (< {im['min_boxes']} kept): {im['few_boxes']} images")
    b = summary["boxes_per_image"]
    lines.append(f"boxes per image: total {b['total']}, raw mean {_fmt(b['raw_mean'])}, kept {_fmt_dist(b)}")
    lines += _text_hist(b["histogram"], integer=True)
    lines.append(f"box size (sqrt area, px): {_fmt_dist(summary['box_size'])}")
    lines += _text_hist(summary["box_size"]["histogram"])
    lines.append(f"box aspect (width / height): {_fmt_dist(summary['box_aspect'])}")
    lines += _text_hist(summary["box_aspect"]["histogram"])
    by = summary["bytes_per_shard"]
    sizes = list(by["by_shard"].values())
    if sizes:
        lines.append(
            f"bytes per shard (images): total {_mb(by['total'])}, min {_mb(min(sizes))}, mean {_mb(sum(sizes) / len(sizes))}, "
            f"max {_mb(max(sizes))}; {_fmt(by['mean_per_image'], 0)} B per ok image"
        )
        if len(sizes) <= 20:
            lines += [f"  {name}: {_mb(n)}" for name, n in by["by_shard"].items()]
    s = summary["seconds_per_image"]
    lines.append(
        f"seconds per image (selective search): mean {_fmt(s['mean'], 3)}, p50 {_fmt(s['p50'], 3)}, "
        f"p95 {_fmt(s['p95'], 3)}, total {_fmt(s['total'], 1)} s over {s['count']} images"
    )
    return "\n".join(lines)


def _fmt(v: float | None, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _fmt_dist(d: Mapping[str, Any]) -> str:
    if not d["count"]:
        return "none"
    ps = " ".join(f"p{p} {_fmt(d[f'p{p}'])}" for p in PERCENTILES)
    return f"mean {_fmt(d['mean'])}, {ps} (n={d['count']})"


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB"


def _text_hist(h: Mapping[str, list], integer: bool = False, width: int = 40) -> list[str]:
    counts, edges = h["counts"], h["edges"]
    if not counts or max(counts) == 0:
        return []
    top = max(counts)
    # empty bins at either end say nothing (counts of boxes start at 0 but rarely go below K)
    first = next(i for i, c in enumerate(counts) if c)
    last = max(i for i, c in enumerate(counts) if c) + 1
    out = []
    for c, lo, hi in zip(counts[first:last], edges[first:last], edges[first + 1 : last + 1]):
        label = f"{int(lo):>5}-{int(hi) - 1:<5}" if integer else f"{lo:>8.2f}-{hi:<8.2f}"
        out.append(f"  {label} {'#' * round(width * c / top):<{width}} {c}")
    return out


def plot_summary(summary: Mapping[str, Any] | pa.Table, path: str) -> None:
    """A PNG at ``path`` with the histograms of a ``summarize`` result (or of a table, summarized first)."""
    # The Agg canvas directly, not pyplot: no global backend switch, no GUI, safe in worker processes.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if isinstance(summary, pa.Table):
        summary = summarize(summary)
    fig = Figure(figsize=(11, 8), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    panels = [
        (axes[0, 0], summary["boxes_per_image"]["histogram"], "kept boxes per image", "images", False),
        (axes[0, 1], summary["box_size"]["histogram"], "box size: sqrt(area) in px", "boxes", False),
        (axes[1, 0], summary["box_aspect"]["histogram"], "box aspect: width / height", "boxes", True),
    ]
    for ax, h, xlabel, ylabel, log in panels:
        if h["counts"]:
            edges = np.asarray(h["edges"])
            ax.stairs(h["counts"], edges, fill=True)
            if log:
                ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
    ax = axes[1, 1]
    by = summary["bytes_per_shard"]["by_shard"]
    ax.bar(range(len(by)), [v / 1e6 for v in by.values()])
    ax.set_xlabel("shard")
    ax.set_ylabel("image MB")
    if len(by) <= 12:
        ax.set_xticks(range(len(by)), list(by), rotation=45, ha="right", fontsize=7)
    im = summary["images"]
    fig.suptitle(
        f"{im['inputs']} inputs: {im['ok']} ok, {im['failed_total']} failed, {im['few_boxes']} with < {im['min_boxes']} boxes"
    )
    fig.tight_layout()
    fig.savefig(path, format="png")
