"""Summaries of an output (what ``prep stats`` reports) read from its Parquet and stats files only: counts by status,
box and size distributions, timing. A *stats file* here is one shard's ``NAME.stats.json``, whose counts are checked
against that shard's rows.

``summarize_output`` streams an output shard by shard (local path, ``s3://`` or ``http(s)://``; Parquet and stats
files, never the tars) and returns plain JSON-able data (``prep stats --json``); ``summarize`` does the same for a
table in memory. ``format_summary`` and ``plot_summary`` render either.

Why streaming: an ImageNet-sized output is 1.28 M rows and ~68 M boxes. Held as one table plus per-box float arrays
that took ~11 GB and a minute; per shard, each file's boxes are reduced at once to counts of (width, height) pairs,
from which every box statistic follows exactly (percentiles included: numpy's linear interpolation over the values
each pair stands for), in a few hundred MB.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import itertools
import json
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from shards import layout, schema, storage

PERCENTILES = (5, 25, 50, 75, 95)
HIST_BINS = 20
# Used for the few-box count when no stats files say otherwise; the same K=4 as PrepConfig.min_boxes.
DEFAULT_MIN_BOXES = 4
# How the percentiles are computed, stated in the summary so a reader of the JSON need not guess.
PERCENTILE_METHOD = "exact: numpy.percentile (linear interpolation) over every value"
# The columns a summary needs (not key, path, sha256: the strings cost most of the decoding and say nothing here).
SUMMARY_COLUMNS = ["status", "raw_boxes", "kept_boxes", "boxes", "ss_seconds", "image_bytes"]
# Shards read ahead in threads: Parquet decoding releases the GIL, and remote reads wait on the network.
LOCAL_THREADS = min(8, os.cpu_count() or 1)
# Box (width, height) pairs below this on both sides are counted in a dense grid (PairCounts).
PAIR_GRID_SIDE = 1024
REMOTE_THREADS = 16


def read_parquet(url: str, columns: list[str] | None = None) -> pa.Table:
    """One Parquet file of an output (local, ``s3://`` or ``http(s)://``); ValueError naming it if unreadable or
    not of the shard schema."""
    scheme = storage.scheme(url)
    try:
        with contextlib.ExitStack() as stack:
            if scheme in ("http", "https"):
                # no filesystem layer for plain HTTP: the whole file in one GET (a shard's Parquet is a few MB)
                source = pa.BufferReader(storage.read_bytes(url))
            else:
                fs, path = storage.arrow_filesystem(url)
                source = path if scheme == "file" else stack.enter_context(fs.open_input_file(path))
            # ParquetFile.read, not pq.read_table: the dataset layer behind read_table costs ~1 ms a file; one
            # thread per file, as the caller reads several files at once
            f = stack.enter_context(pq.ParquetFile(source))
            if schema.parquet_version(f.schema_arrow) is None:
                raise ValueError(
                    f"{storage.redact(url)}: columns differ from the shard schema of every format "
                    f"version {schema.READABLE_VERSIONS}"
                )
            present = set(f.schema_arrow.names)
            t = f.read(columns=None if columns is None else [c for c in columns if c in present], use_threads=False)
    except FileNotFoundError:
        raise
    except (OSError, pa.ArrowException) as e:
        raise ValueError(f"{storage.redact(url)}: cannot read parquet: {e}") from None
    if columns is None:
        return schema.conform_table(t, storage.redact(url))  # an older version: nulls for the columns it lacked
    for c in columns:  # a column an older version lacked: nulls
        if c not in present:
            field = schema.PARQUET_SCHEMA.field(c)
            t = t.append_column(field, pa.nulls(t.num_rows, field.type))
    return t.select(columns)


def read_table(out: str) -> pa.Table:
    """Every ``NAME.parquet`` of output ``out``, concatenated in shard order, with a ``shard`` column (NAME) added.
    Holds the whole output in memory: for summaries use ``summarize_output``, which streams."""
    shards = layout.shard_names(storage.list_names(out), schema.PARQUET_SUFFIX)
    if not shards:
        raise FileNotFoundError(f"{out}: no shard parquet files (*{schema.PARQUET_SUFFIX}) found")
    tables = []
    for shard in shards:
        t = read_parquet(layout.shard_file(out, shard, schema.PARQUET_SUFFIX))
        tables.append(t.append_column("shard", pa.array([shard] * t.num_rows, pa.string())))
    return pa.concat_tables(tables)


def ordered_map(fn: Callable[[Any], Any], items: Iterable[Any], threads: int) -> Iterator[Any]:
    """``map(fn, items)`` run ahead in ``threads`` threads, results in order, at most ``2 * threads`` held at once
    (so memory stays that of a few shards, whatever the output's size)."""
    if threads <= 1:  # nothing to overlap
        yield from map(fn, items)
        return
    items = iter(items)
    with ThreadPoolExecutor(threads) as pool:
        window = collections.deque(pool.submit(fn, x) for x in itertools.islice(items, 2 * threads))
        while window:
            result = window.popleft().result()
            for x in itertools.islice(items, 1):
                window.append(pool.submit(fn, x))
            yield result


def summarize_output(
    out: str,
    listing: Iterable[str] | None = None,
    *,
    min_boxes: int | None = None,
    threads: int | None = None,
) -> dict[str, Any]:
    """The ``summarize`` result for output ``out``, read shard by shard: every ``NAME.parquet`` (only the columns a
    summary needs) and the ``NAME.stats.json`` beside it, which are cross-checked against the rows.

    ``listing``: the output's file names when the caller has them (required for ``http(s)://``, which cannot be
    listed). ``threads``: files read and reduced at once (default: cores, or ``REMOTE_THREADS`` for URLs). Raises
    FileNotFoundError when there is no Parquet file, ValueError naming a file that cannot be read."""
    listing = set(storage.list_names(out) if listing is None else listing)
    shards = layout.shard_names(listing, schema.PARQUET_SUFFIX)
    if not shards:
        raise FileNotFoundError(f"{storage.redact(out)}: no shard parquet files (*{schema.PARQUET_SUFFIX}) found")
    if threads is None:
        threads = REMOTE_THREADS if storage.is_remote(out) else LOCAL_THREADS
    # the stats file of every done shard (a parquet without one is reported by the check)
    stems = layout.shard_names(listing, schema.STATS_SUFFIX)
    shard_stats = list(
        ordered_map(lambda n: read_shard_stats(layout.shard_file(out, n, schema.STATS_SUFFIX)), stems, threads)
    )
    return _summarize_shards(out, shards, threads).result(shard_stats, min_boxes)


def _summarize_shards(out: str, shards: list[str], threads: int) -> _Summary:
    """The running totals of ``shards`` of ``out``, read in ``threads`` threads."""
    acc = _Summary()
    # one box counter per reading thread: the counting runs in those threads, merged once at the end (the counts
    # are integers, so the result does not depend on which thread counted what)
    local, counters = threading.local(), []

    def reduce(shard: str) -> _ShardPart:
        if not hasattr(local, "pairs"):
            local.pairs = PairCounts(PAIR_GRID_SIDE)
            counters.append(local.pairs)
        table = read_parquet(layout.shard_file(out, shard, schema.PARQUET_SUFFIX), SUMMARY_COLUMNS)
        return _reduce_shard(shard, table, local.pairs)

    for part in ordered_map(reduce, shards, threads):
        url = layout.shard_file(out, part.shard, schema.PARQUET_SUFFIX)
        acc.add(part, keys=functools.partial(_key_column, url))
    for counter in counters:
        acc.pairs.merge(counter)
    return acc


def _key_column(url: str) -> pa.ChunkedArray:
    """The ``key`` column of a shard's Parquet (read only to name an inconsistent row)."""
    return read_parquet(url, ["key"])["key"]


def read_shard_stats(url: str) -> dict[str, Any]:
    """One shard's ``NAME.stats.json``; ValueError naming it when it is not JSON."""
    try:
        return json.loads(storage.read_bytes(url))
    except ValueError as e:
        raise ValueError(f"{storage.redact(url)}: stats file is not JSON: {e}") from None


def summarize(
    table: pa.Table, shard_stats: Iterable[Mapping[str, Any]] | None = None, *, min_boxes: int | None = None
) -> dict[str, Any]:
    """A JSON-able summary of ``table`` (``read_table`` output; without a ``shard`` column it counts as one shard).

    ``shard_stats``: optional per-shard ``NAME.stats.json`` dicts; their counts are checked against the table and their
    ``min_boxes`` used for the few-box count (else ``min_boxes``, else ``DEFAULT_MIN_BOXES``)."""
    acc = _Summary()
    if "shard" in table.column_names:
        shard = table["shard"]
        for name in pc.unique(shard).to_pylist():
            rows = table.filter(pc.equal(shard, name))
            acc.add(_reduce_shard(name, rows, acc.pairs), keys=functools.partial(rows.column, "key"))
    else:
        acc.add(_reduce_shard("", table, acc.pairs), keys=functools.partial(table.column, "key"))
    return acc.result(None if shard_stats is None else list(shard_stats), min_boxes)


@dataclass
class _ShardPart:
    """What one shard contributes to a summary (``_reduce_shard``, run in the reading threads)."""

    shard: str
    inputs: int
    samples: int
    failed: dict[str, int]
    image_bytes: int
    seconds: np.ndarray  # finite ss_seconds of every row
    kept: np.ndarray  # kept_boxes of the ok rows (null as 0)
    raw: np.ndarray
    bad_rows: int  # ok rows whose kept_boxes differs from their box count
    first_bad: int | None  # row index of the first
    box_problem: str | None


def _reduce_shard(shard: str, table: pa.Table, pairs: PairCounts) -> _ShardPart:
    """``table``'s rows (columns ``SUMMARY_COLUMNS`` at least) reduced to counts and small arrays, vectorised; the
    (width, height) of its valid boxes go to ``pairs``."""
    status = table["status"]
    counts = {d["values"]: d["counts"] for d in pc.value_counts(status).to_pylist()}
    samples = counts.get(schema.STATUS_OK, 0)
    seconds = table["ss_seconds"].to_numpy().astype(np.float64)  # nulls become NaN
    # most shards hold only ok rows: then no mask, no filter and fewer calls (each costs more than its arithmetic)
    all_ok = samples == table.num_rows
    ok = np.ones(table.num_rows, bool) if all_ok else pc.equal(status, schema.STATUS_OK).to_numpy(zero_copy_only=False)
    kept, boxes = table["kept_boxes"], table["boxes"]

    # an ok row must hold as many boxes as kept_boxes says (a null on either side never matches)
    n_boxes = pc.list_value_length(boxes)
    if kept.null_count or n_boxes.null_count:
        differs = (
            kept.is_null().to_numpy(zero_copy_only=False)
            | n_boxes.is_null().to_numpy(zero_copy_only=False)
            | (kept.fill_null(-1).to_numpy() != n_boxes.fill_null(-1).to_numpy())
        )
    else:
        differs = kept.to_numpy() != n_boxes.to_numpy()
    bad = np.flatnonzero(ok & differs)

    if not all_ok and n_boxes.fill_null(0).to_numpy()[~ok].any():  # failures hold no boxes (usually)
        boxes = boxes.filter(pa.array(ok))
    problem = None
    per_box = pc.list_flatten(boxes)  # list<int32>, one per box
    if len(per_box):
        lengths = pc.min_max(pc.list_value_length(per_box)).as_py()
        values = pc.list_flatten(per_box)
        if per_box.null_count or values.null_count or lengths["min"] != 4 or lengths["max"] != 4:
            problem = f"{shard}: boxes that are not 4 integers (its boxes are left out)"
        else:
            xyxy = values.to_numpy().reshape(-1, 4)
            w, h = xyxy[:, 2] - xyxy[:, 0], xyxy[:, 3] - xyxy[:, 1]
            if min(w.min(), h.min()) <= 0:  # two reductions, the mask only when needed
                valid = (w > 0) & (h > 0)
                problem = (
                    f"{shard}: {int(valid.size - valid.sum())} boxes with x1 <= x0 or y1 <= y0 "
                    "(left out of box size and aspect)"
                )
                w, h = w[valid], h[valid]
            pairs.add(w, h)
    return _ShardPart(
        shard=shard,
        inputs=table.num_rows,
        samples=samples,
        failed=schema.failure_counts(counts.items()),
        image_bytes=int(pc.sum(table["image_bytes"]).as_py() or 0),
        seconds=seconds[np.isfinite(seconds)],
        kept=_int32(kept)[ok],
        raw=_int32(table["raw_boxes"])[ok],
        bad_rows=len(bad),
        first_bad=int(bad[0]) if len(bad) else None,
        box_problem=problem,
    )


def _int32(column: pa.ChunkedArray) -> np.ndarray:
    """An integer column as int32, nulls as 0."""
    return (column.fill_null(0) if column.null_count else column).to_numpy().astype(np.int32, copy=False)


class _Summary:
    """Running totals of shards added one at a time; ``result`` turns them into the summary dict."""

    def __init__(self) -> None:
        self.per_shard: dict[str, dict[str, Any]] = {}  # name -> inputs, samples, failed, image bytes
        self.kept: list[np.ndarray] = []  # per ok row: small enough to keep whole (4 B a row)
        self.raw: list[np.ndarray] = []
        self.seconds: list[np.ndarray] = []
        self.pairs = PairCounts(PAIR_GRID_SIDE)
        self.unknown: set[str] = set()
        self.bad_rows, self.first_bad = 0, None
        self.box_problems: list[str] = []

    def add(self, part: _ShardPart, keys: Callable[[], pa.ChunkedArray]) -> None:
        """Fold in one shard's part; ``keys()`` gives that shard's ``key`` column, asked for only to name the first
        inconsistent row."""
        c = self.per_shard.setdefault(part.shard, {"inputs": 0, "samples": 0, "failed": {}, "bytes": 0})
        c["inputs"] += part.inputs
        c["samples"] += part.samples
        c["failed"] = schema.failure_counts([*c["failed"].items(), *part.failed.items()])
        c["bytes"] += part.image_bytes
        self.unknown.update(r for r in part.failed if r not in schema.FAILURE_REASONS)
        self.seconds.append(part.seconds)
        self.kept.append(part.kept)
        self.raw.append(part.raw)
        if part.bad_rows:
            if self.first_bad is None:
                self.first_bad = keys()[part.first_bad].as_py()
            self.bad_rows += part.bad_rows
        if part.box_problem:
            self.box_problems.append(part.box_problem)

    def result(self, shard_stats: list[Mapping[str, Any]] | None, min_boxes: int | None) -> dict[str, Any]:
        if min_boxes is None:
            found = {s["min_boxes"] for s in shard_stats or []}
            min_boxes = found.pop() if len(found) == 1 else DEFAULT_MIN_BOXES
        kept = np.concatenate(self.kept) if self.kept else np.zeros(0, np.int32)
        raw = np.concatenate(self.raw) if self.raw else np.zeros(0, np.int32)
        ss = np.concatenate(self.seconds) if self.seconds else np.zeros(0)
        failed = schema.failure_counts(item for c in self.per_shard.values() for item in c["failed"].items())
        inputs = sum(c["inputs"] for c in self.per_shard.values())
        n_ok = sum(c["samples"] for c in self.per_shard.values())
        problems = self._count_problems(shard_stats)

        # every box statistic from the (w, h) pair counts: values in ascending order, each with its count
        w, h, n = self.pairs.items()
        wf, hf = w.astype(np.float64), h.astype(np.float64)
        side, aspect = np.sqrt(wf * hf), wf / hf
        by_side, by_aspect = np.argsort(side, kind="stable"), np.argsort(aspect, kind="stable")
        side, side_n = side[by_side], n[by_side]
        aspect, aspect_n = aspect[by_aspect], n[by_aspect]

        # one partition of 1.28 M values, not two
        p50, p95 = (_round(p) for p in np.percentile(ss, [50, 95])) if ss.size else (None, None)
        bytes_by_shard = {name: c["bytes"] for name, c in sorted(self.per_shard.items())}
        total_bytes = sum(bytes_by_shard.values())
        return {
            "format_version": schema.FORMAT_VERSION,
            "shards": len(self.per_shard),
            "percentiles": PERCENTILE_METHOD,
            "images": {
                "inputs": inputs,
                "ok": n_ok,
                "failed": failed,
                "failed_total": inputs - n_ok,
                "few_boxes": int((kept < min_boxes).sum()),
                "min_boxes": min_boxes,
            },
            "counts_add_up": not problems,
            "count_problems": problems,
            "box_problems": self.box_problems,
            "boxes_per_image": {
                **_distribution(kept, _int_edges(kept)),
                "total": int(kept.sum(dtype=np.int64)),
                "raw_mean": _mean(raw),
            },
            "box_size": _distribution(side, _linear_edges(side), side_n),
            "box_aspect": _distribution(aspect, _log_edges(aspect), aspect_n),
            "bytes_per_shard": {
                "by_shard": bytes_by_shard,
                "total": int(total_bytes),
                "mean_per_image": round(total_bytes / n_ok, 1) if n_ok else None,
            },
            "seconds_per_image": {
                "count": int(ss.size),
                "total": round(float(ss.sum()), 3),
                "mean": _round(ss.mean()) if ss.size else None,
                "p50": p50,
                "p95": p95,
            },
        }

    def _count_problems(self, shard_stats: list[Mapping[str, Any]] | None) -> list[str]:
        """Why the counts do not add up: every input must be ok or a known failure, ok rows must carry their boxes,
        and (when stats files are given) each shard's stats must match its parquet rows."""
        problems = []
        if self.unknown:
            problems.append(f"unknown statuses {sorted(self.unknown)}")
        if self.bad_rows:
            problems.append(
                f"{self.bad_rows} ok rows whose kept_boxes differs from their boxes (first: {self.first_bad})"
            )
        if shard_stats is None:
            return problems
        seen = set()
        for s in shard_stats:
            name = s["shard"]
            seen.add(name)
            c = self.per_shard.get(name)
            if c is None:
                problems.append(f"{name}: has a stats file but no parquet rows")
                continue
            for field in ("inputs", "samples"):
                if s[field] != c[field]:
                    problems.append(f"{name}: stats say {field}={s[field]}, parquet has {c[field]}")
            if dict(s["failed"]) != c["failed"]:
                problems.append(f"{name}: stats say failed={dict(s['failed'])}, parquet has {c['failed']}")
        for name in sorted(set(self.per_shard) - seen):
            problems.append(f"{name}: parquet rows but no stats file (shard not done)")
        return problems


class PairCounts:
    """Exact counts of integer (w, h) pairs, w, h >= 1, added in batches of any size.

    Pairs below ``dense_side`` on both sides (nearly every box) are counted in a fixed [side, side] grid; the rare
    larger ones (boxes of images over ``dense_side`` px) as sorted unique codes ``w << 32 | h`` with counts, so one
    huge image does not make every count sweep a huge grid. Batches are pooled up to ``flush`` pairs before they
    are counted: the grid is swept a few times per million boxes, not once per shard. ``encode`` is separate so the
    reading threads can do that part."""

    def __init__(self, dense_side: int = 1024, flush: int = 1 << 22):
        self.side, self.flush = dense_side, flush
        self.grid = np.zeros((dense_side, dense_side), np.int64)
        self.codes, self.code_counts = np.zeros(0, np.int64), np.zeros(0, np.int64)
        self._pending: list[np.ndarray] = []  # grid codes not counted yet
        self._pending_n = 0
        self._outside: list[np.ndarray] = []  # codes of pairs outside the grid, merged with the grid's sweeps

    @staticmethod
    def encode(w: np.ndarray, h: np.ndarray, side: int = 1024) -> tuple[np.ndarray, np.ndarray]:
        """(grid codes ``w * side + h``, codes ``w << 32 | h`` of the pairs outside the grid). A pair outside the
        grid has grid code 0, the cell of (0, 0), which no box has: ``add_codes`` clears it."""
        grid = w.astype(np.int64)
        grid *= side
        grid += h
        if max(w.max(), h.max()) < side:  # two reductions, the mask only when needed
            return grid, np.zeros(0, np.int64)
        outside = (w >= side) | (h >= side)
        grid[outside] = 0
        return grid, (w[outside].astype(np.int64) << 32) | h[outside]

    def add(self, w: np.ndarray, h: np.ndarray) -> None:
        self.add_codes(*self.encode(w, h, self.side))

    def add_codes(self, grid: np.ndarray, outside: np.ndarray) -> None:
        """Count pairs given as ``encode`` returns them (made with this counter's ``side``)."""
        if len(outside):
            self._outside.append(outside)
        if len(grid):
            self._pending.append(grid)
            self._pending_n += len(grid)
            if self._pending_n >= self.flush:
                self._count()

    def merge(self, other: PairCounts) -> None:
        """Add the counts of ``other`` (same ``dense_side``) to these."""
        other._count()
        self.grid += other.grid
        self._count()
        self._merge(other.codes, other.code_counts)

    def items(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(w, h, count) of every pair seen, as int64 arrays, in no particular order."""
        self._count()
        w, h = np.nonzero(self.grid)
        return (
            np.concatenate([w, self.codes >> 32]),
            np.concatenate([h, self.codes & 0xFFFFFFFF]),
            np.concatenate([self.grid[w, h], self.code_counts]),
        )

    def _count(self) -> None:
        if self._pending:
            self.grid += np.bincount(np.concatenate(self._pending), minlength=self.side**2).reshape(self.grid.shape)
            self.grid[0, 0] = 0  # where encode put the pairs outside the grid
            self._pending, self._pending_n = [], 0
        if self._outside:
            self._merge(*np.unique(np.concatenate(self._outside), return_counts=True))
            self._outside = []

    def _merge(self, codes: np.ndarray, counts: np.ndarray) -> None:
        """Fold (unique codes, counts) into the sorted codes."""
        if not len(codes):
            return
        codes = np.concatenate([self.codes, codes])
        counts = np.concatenate([self.code_counts, counts])
        order = np.argsort(codes, kind="stable")
        codes, counts = codes[order], counts[order]
        first = np.flatnonzero(np.concatenate([[True], codes[1:] != codes[:-1]]))
        self.codes, self.code_counts = codes[first], np.add.reduceat(counts, first)


def _distribution(x: np.ndarray, edges: np.ndarray, counts: np.ndarray | None = None) -> dict[str, Any]:
    """count, mean, min, max, percentiles and histogram of ``x``; with ``counts``, of ``x[i]`` repeated ``counts[i]``
    times (``x`` ascending), the same numbers without building the repeated array."""
    x = np.asarray(x, dtype=np.float64)
    if counts is not None:
        keep = counts > 0
        x, counts = x[keep], np.asarray(counts, np.int64)[keep]
    if x.size == 0:
        return {
            "count": 0,
            "mean": None,
            "min": None,
            "max": None,
            **{f"p{p}": None for p in PERCENTILES},
            "histogram": {"edges": [], "counts": []},
        }
    if counts is None:
        n, mean, lo, hi = x.size, x.mean(), x.min(), x.max()
        ps = np.percentile(x, PERCENTILES)
        hist, _ = np.histogram(x, bins=edges)
    else:
        n = int(counts.sum())
        mean, lo, hi = float(np.dot(x, counts)) / n, x[0], x[-1]
        ps = _percentiles(x, counts, PERCENTILES)
        hist = np.histogram(x, bins=edges, weights=counts)[0].round().astype(np.int64)
    return {
        "count": int(n),
        "mean": _round(mean),
        "min": _round(lo),
        "max": _round(hi),
        **{f"p{p}": _round(v) for p, v in zip(PERCENTILES, ps, strict=True)},
        "histogram": {"edges": [_round(e) for e in edges], "counts": hist.tolist()},
    }


def _percentiles(x: np.ndarray, counts: np.ndarray, ps: Iterable[float]) -> np.ndarray:
    """``np.percentile(np.repeat(x, counts), ps)`` for ascending ``x``, with numpy's own index and interpolation
    arithmetic (``linear`` method), so the results are the same floats."""
    n = int(counts.sum())
    ends = np.cumsum(counts)  # order statistics ends[i-1] .. ends[i]-1 are x[i]
    virtual = (n - 1) * np.true_divide(np.asarray(ps, np.float64), 100)
    below = np.floor(virtual)
    above = np.minimum(below + 1, n - 1)
    below = np.minimum(below, n - 1)
    a = x[np.searchsorted(ends, below.astype(np.int64), side="right")]
    b = x[np.searchsorted(ends, above.astype(np.int64), side="right")]
    t = virtual - below
    diff = b - a
    # numpy's _lerp: from the lower value below the midpoint, from the upper one above it
    return np.where(t >= 0.5, b - diff * (1 - t), a + diff * t)


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
    for p in summary["count_problems"] + summary.get("box_problems", []):
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
    for c, lo, hi in zip(counts[first:last], edges[first:last], edges[first + 1 : last + 1], strict=True):
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
    mb = [v / 1e6 for v in by.values()]
    if len(by) <= 100:
        ax.bar(range(len(by)), mb)
    else:  # one artist, not one rectangle per shard (1,281 bars take seconds to lay out)
        ax.stairs(mb, np.arange(len(by) + 1) - 0.5, fill=True)
    ax.set_xlabel("shard")
    ax.set_ylabel("image MB")
    if len(by) <= 12:
        ax.set_xticks(range(len(by)), list(by), rotation=45, ha="right", fontsize=7)
    im = summary["images"]
    fig.suptitle(
        f"{im['inputs']} inputs: {im['ok']} ok, {im['failed_total']} failed, {im['few_boxes']} with < {im['min_boxes']} boxes"
    )
    # fixed margins: tight_layout measures every tick label first, which costs more than the drawing itself
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.07, top=0.93, wspace=0.25, hspace=0.28)
    fig.savefig(path, format="png")
