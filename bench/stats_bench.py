"""`prep stats` on an ImageNet-sized output: wall time and peak memory, against the previous implementation.

    python bench/stats_bench.py                            # 1,281 shards x 1,000 rows (~68 M boxes), ~5 min
    python bench/stats_bench.py --shards 40 --rows 200     # smoke test, seconds
    python bench/stats_bench.py --baseline-reps 0          # new implementation only

The output is metadata only (Parquet, stats files, run config, manifest; no tars: `prep stats` never opens them),
synthesised from a small real output that `prep` makes of the bundled sample photos: every synthetic row copies a
real row's image and boxes scaled to ImageNet-like sizes (x1.25 for 90% of rows, about 500 px; x2.5 for 9%; x10,
about 4,000 px, for 1%), its boxes cycled to the drawn box count and each corner moved by up to 3 px (so values and
compression stay realistic), with the box count drawn around ``--boxes-per-image`` and about 1 failure per 1,000
inputs. Files are cached under ``--work`` and reused when the settings match.

Each timed run is ``python -m prep stats OUT --json`` in a fresh subprocess (imports included): wall seconds and
peak RSS of that process (``os.wait4``, so one child's figure never leaks into another's). The baseline is the same
command on the code of ``--baseline-rev`` (``git archive`` of ``prep/`` and ``shards/``), run on the same files in
the same session; the JSON of both is compared number by number.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from shards import schema  # noqa: E402
from shards import writer as shard_writer  # noqa: E402

# The commit before `prep stats` streamed its input: the baseline.
BASELINE_REV = "bec8b5b"
# Synthetic rows scale a sample photo (<= 400 px) by one of these, with these shares.
SCALES = (1.25, 2.5, 10.0)
SCALE_SHARES = (0.9, 0.09, 0.01)


def real_output(work: str) -> str:
    """A small real prep output of the 15 sample photos (default prep settings but --ss-max-side 320, ~10 s)."""
    out = os.path.join(work, "real")
    if os.path.exists(os.path.join(out, schema.MANIFEST_NAME)):
        return out
    cmd = [
        sys.executable,
        "-m",
        "prep",
        "folder",
        os.path.join(REPO, "data", "sample"),
        "--out",
        out,
        "--ss-max-side",
        "320",
        "--shard-size",
        "100",
        "--workers",
        "1",
        "--no-progress",
    ]
    subprocess.run(cmd, cwd=REPO, check=True, env=_env(REPO))
    return out


def synthesise(real: str, out: str, shards: int, rows: int, boxes_per_image: float, seed: int = 0) -> None:
    """``shards`` Parquet files of ``rows`` rows (+ stats files, run config, manifest) drawn from the rows of ``real``."""
    done = os.path.join(out, schema.MANIFEST_NAME)
    want = {
        "shards": shards,
        "rows": rows,
        "boxes_per_image": boxes_per_image,
        "seed": seed,
        "scales": list(SCALES),
        "shares": list(SCALE_SHARES),
    }
    tag = os.path.join(out, "synth.json")
    if os.path.exists(done) and os.path.exists(tag) and json.loads(Path(tag).read_text()) == want:
        return
    os.makedirs(out, exist_ok=True)
    for n in os.listdir(out):
        os.remove(os.path.join(out, n))
    src = _real_rows(real)
    widths, heights = np.array(src["width"]), np.array(src["height"])
    real_boxes = src["boxes"]
    rng = np.random.default_rng(seed)
    run_cfg = json.loads(Path(real, schema.RUN_CONFIG_NAME).read_text())
    stats = []
    for s in range(shards):
        name = schema.shard_name("imagenet", s)
        pick = rng.integers(0, len(real_boxes), rows)
        k = np.clip(np.round(rng.normal(boxes_per_image, 0.35 * boxes_per_image, rows)), 0, 100).astype(np.int64)
        failed = rng.random(rows) < 0.001
        k[failed] = 0
        flat = []
        for i in range(rows):  # per row: cycle the real image's boxes to k of them (a few thousand arrays per shard)
            b = real_boxes[pick[i]]
            if k[i]:
                flat.append(b[np.arange(k[i]) % len(b)])
        boxes = np.concatenate(flat) if flat else np.zeros((0, 4), np.int64)
        # image sizes as in ImageNet: most near 500 px, a few percent large, a few up to ~4,000 px
        scale = rng.choice(SCALES, rows, p=SCALE_SHARES)
        width, height = (
            np.round(widths[pick] * scale).astype(np.int64),
            np.round(heights[pick] * scale).astype(np.int64),
        )
        boxes = np.round(boxes * np.repeat(scale, k)[:, None]).astype(np.int64)
        w = np.repeat(width, k)
        h = np.repeat(height, k)
        boxes = boxes + rng.integers(-3, 4, boxes.shape)
        x0 = np.clip(boxes[:, 0], 0, w - 2)
        y0 = np.clip(boxes[:, 1], 0, h - 2)
        x1 = np.clip(boxes[:, 2], x0 + 1, w)
        y1 = np.clip(boxes[:, 3], y0 + 1, h)
        boxes = np.stack([x0, y0, x1, y1], 1).astype(np.int32)
        inner = pa.ListArray.from_arrays(
            pa.array(np.arange(0, 4 * len(boxes) + 1, 4, dtype=np.int32)), pa.array(boxes.reshape(-1))
        )
        offsets = np.concatenate([[0], np.cumsum(k)]).astype(np.int32)
        outer = pa.ListArray.from_arrays(pa.array(offsets), inner, mask=pa.array(failed))
        status = np.where(failed, np.where(rng.random(rows) < 0.5, "corrupt", "too_small"), schema.STATUS_OK)
        keys = [f"n{s:05d}_{i:05d}" for i in range(rows)]
        ok = ~failed
        ss = np.where(ok, rng.gamma(4.0, 0.4, rows), np.nan)
        image_bytes = np.where(ok, rng.integers(20_000, 200_000, rows), 0)
        cols = {
            "key": keys,
            "path": [f"{k_}.JPEG" for k_ in keys],
            "status": status.tolist(),
            "error": pa.array([None if o else "synthetic failure" for o in ok], pa.string()),
            "width": pa.array(width, pa.int32(), mask=failed),
            "height": pa.array(height, pa.int32(), mask=failed),
            "orig_width": pa.array(width, pa.int32(), mask=failed),
            "orig_height": pa.array(height, pa.int32(), mask=failed),
            "label": pa.array(np.full(rows, s % 1000), pa.int32()),
            "image_id": pa.nulls(rows, pa.int64()),
            "raw_boxes": pa.array(k * 6 + 40, pa.int32(), mask=failed),
            "kept_boxes": pa.array(k, pa.int32(), mask=failed),
            "boxes": outer.cast(pa.list_(pa.list_(pa.int32()))),
            "ss_seconds": pa.array(ss, pa.float64(), mask=failed),
            "image_bytes": pa.array(image_bytes, pa.int64(), mask=failed),
            "sha256": pa.array([f"{x:064x}" for x in rng.integers(0, 2**62, rows)], pa.string()),
            # the columns format version 2 added, as nulls (no draws: the generator's stream stays as it was)
            "fallback_boxes": pa.nulls(rows, pa.int32()),
            "image_sha256": pa.nulls(rows, pa.string()),
        }
        table = pa.table(cols, schema=schema.PARQUET_SCHEMA)
        path = os.path.join(out, name + schema.PARQUET_SUFFIX)
        pq.write_table(
            table,
            path,
            compression=shard_writer.PARQUET_COMPRESSION,
            compression_level=shard_writer.PARQUET_COMPRESSION_LEVEL,
        )
        light = [
            {"status": st, "kept_boxes": int(kk), "ss_seconds": None if f else float(t)}
            for st, kk, f, t in zip(status.tolist(), k, failed, ss, strict=True)
        ]
        st = schema.make_stats(
            shard=name,
            config_fingerprint=run_cfg["fingerprint"],
            rows=light,
            tar_bytes=int(image_bytes.sum()) + 2048 * rows,
            parquet_bytes=os.path.getsize(path),
            seconds=float(np.nansum(ss)),
            min_boxes=run_cfg["config"]["min_boxes"],
        )
        st["config"] = run_cfg["config"]
        with open(os.path.join(out, name + schema.STATS_SUFFIX), "wb") as f:
            f.write(schema.dumps(st))
        stats.append(st)
    run_cfg = dict(
        run_cfg,
        shards=[s["shard"] for s in stats],
        source={"kind": "imagenet", "inputs": shards * rows, "digest": "synthetic"},
    )
    with open(os.path.join(out, schema.RUN_CONFIG_NAME), "wb") as f:
        f.write(schema.dumps(run_cfg))
    manifest = schema.make_manifest(config=run_cfg["config"], versions=run_cfg["versions"], classes=None, stats=stats)
    with open(done, "wb") as f:
        f.write(schema.dumps(manifest))
    with open(tag, "w") as f:
        json.dump(want, f)


def _real_rows(real: str) -> dict:
    names = sorted(n for n in os.listdir(real) if n.endswith(schema.PARQUET_SUFFIX))
    t = pa.concat_tables(pq.read_table(os.path.join(real, n)) for n in names)
    t = t.filter(pa.compute.greater(t["kept_boxes"], 0))
    boxes = [np.asarray(b, np.int64).reshape(-1, 4) for b in t["boxes"].to_pylist()]
    return {"width": t["width"].to_pylist(), "height": t["height"].to_pylist(), "boxes": boxes}


def _env(code_root: str) -> dict:
    env = dict(os.environ, PYTHONPATH=code_root)
    env.pop("PYTHONSTARTUP", None)
    return env


def time_stats(
    code_root: str, out: str, extra: list[str] | None = None, text: bool = False
) -> tuple[float, float, bytes]:
    """(wall s, peak RSS MiB, stdout) of ``python -m prep stats OUT --json`` (or without ``--json``: ``text``) run
    with the code under ``code_root``."""
    import tempfile

    with tempfile.TemporaryFile() as fout, tempfile.TemporaryFile() as ferr:
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "prep", "stats", out, *([] if text else ["--json"]), *(extra or [])]
        p = subprocess.Popen(cmd, cwd=code_root, env=_env(code_root), stdout=fout, stderr=ferr)
        # wait4 on this pid: the peak RSS of this child alone (RUSAGE_CHILDREN would keep the largest child so far)
        _, status, usage = os.wait4(p.pid, 0)
        wall = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        fout.seek(0)
        ferr.seek(0)
        if p.returncode:
            raise SystemExit(f"prep stats failed under {code_root}:\n{ferr.read().decode()[-2000:]}")
        return wall, usage.ru_maxrss / 1024, fout.read()


def baseline_tree(work: str, rev: str) -> str | None:
    """``prep/`` and ``shards/`` of commit ``rev``, unpacked under ``work`` (None outside a git checkout)."""
    dest = os.path.join(work, f"baseline-{rev}")
    if os.path.isdir(os.path.join(dest, "prep")):
        return dest
    os.makedirs(dest, exist_ok=True)
    archive = subprocess.run(["git", "-C", REPO, "archive", rev, "prep", "shards"], capture_output=True)
    if archive.returncode:
        print(f"no baseline: git archive {rev} failed: {archive.stderr.decode().strip()}")
        return None
    subprocess.run(["tar", "-x", "-C", dest], input=archive.stdout, check=True)
    return dest


def differences(old: dict, new: dict, path: str = "") -> list[str]:
    """Where two summaries disagree (keys only the new one has are not differences: it says more, not otherwise)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in old:
            out += differences(old[k], new[k], f"{path}/{k}") if k in new else [f"{path}/{k}: missing"]
        return out
    return [] if old == new else [f"{path}: {str(old)[:80]} != {str(new)[:80]}"]


def spread(values: list[float]) -> dict:
    return {
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
        "runs": [round(v, 3) for v in values],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "stats_bench"))
    ap.add_argument("--shards", type=int, default=1281)
    ap.add_argument("--rows", type=int, default=1000, help="rows (inputs) per shard")
    ap.add_argument("--boxes-per-image", type=float, default=53.1, help="mean kept boxes (68 M / 1.28 M images)")
    ap.add_argument("--reps", type=int, default=3, help="timed runs of each variant of the new implementation")
    ap.add_argument(
        "--baseline-reps",
        type=int,
        default=1,
        help="timed runs of the baseline (each ~1 min and ~11 GB on the full size; 0: none)",
    )
    ap.add_argument("--baseline-rev", default=BASELINE_REV)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    os.makedirs(args.work, exist_ok=True)
    out = os.path.join(args.work, f"out-{args.shards}x{args.rows}")
    t0 = time.perf_counter()
    synthesise(real_output(args.work), out, args.shards, args.rows, args.boxes_per_image)
    totals = json.loads(Path(out, schema.MANIFEST_NAME).read_text())["totals"]
    print(
        f"output: {out}: {totals['shards']} shards, {totals['inputs']} inputs, {totals['boxes']} boxes "
        f"(ready in {time.perf_counter() - t0:.0f} s)"
    )

    results = {
        "shards": totals["shards"],
        "inputs": totals["inputs"],
        "boxes": totals["boxes"],
        "cpus": os.cpu_count(),
        "variants": {},
    }
    variants = {"--json": [], "text": ["--no-json"], "--json --plot": ["--plot", os.path.join(args.work, "stats.png")]}
    outputs = {}
    for name, extra in variants.items():
        walls, rss, loads = [], [], []
        for _ in range(args.reps):
            loads.append(round(os.getloadavg()[0], 2))
            wall, peak, stdout = time_stats(
                REPO, out, [e for e in extra if e != "--no-json"], text="--no-json" in extra
            )
            walls.append(wall)
            rss.append(peak)
            outputs[name] = stdout
        results["variants"][name] = {"seconds": spread(walls), "peak_rss_mib": spread(rss), "load_before": loads}
        print(
            f"new {name:>13}: {statistics.median(walls):6.2f} s (min {min(walls):.2f}, max {max(walls):.2f}), "
            f"peak RSS {max(rss):6.0f} MiB, load average before each run {loads}"
        )

    base = baseline_tree(args.work, args.baseline_rev) if args.baseline_reps else None
    if base:
        walls, rss, loads = [], [], []
        for _ in range(args.baseline_reps):
            loads.append(round(os.getloadavg()[0], 2))
            wall, peak, stdout = time_stats(base, out)
            walls.append(wall)
            rss.append(peak)
        results["baseline"] = {
            "rev": args.baseline_rev,
            "seconds": spread(walls),
            "peak_rss_mib": spread(rss),
            "load_before": loads,
        }
        diff = differences(json.loads(stdout), json.loads(outputs["--json"]))
        results["same_numbers_as_baseline"] = not diff
        print(
            f"baseline {args.baseline_rev} --json: {statistics.median(walls):6.2f} s "
            f"(min {min(walls):.2f}, max {max(walls):.2f}), peak RSS {max(rss):6.0f} MiB, load average {loads}"
        )
        print(f"same numbers as the baseline: {not diff}" + "".join(f"\n  {d}" for d in diff[:20]))
        new = results["variants"]["--json"]["seconds"]["median"]
        print(
            f"baseline ÷ new: {statistics.median(walls) / new:.1f}× faster, "
            f"{max(rss) / max(results['variants']['--json']['peak_rss_mib']['runs']):.1f}× less memory"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
