"""Ray executor benchmark: prep images/s with ``--executor ray`` ÷ the local executor, 2 CPUs each, same run.

    python bench/ray_bench.py                                  # default: about 2 minutes on 2 idle cores
    python bench/ray_bench.py --images 16 --long-side 320     # quick check, under a minute
    python bench/ray_bench.py --json results.json

Images: the bundled sample photos resized to ``--long-side`` and repeated under distinct names (as bench/prep_bench.py
makes them). Both executors run ``prep.run.run`` on the same images and settings, ``--shard-size`` images per shard,
2 CPUs: the local executor with 2 worker processes, Ray on a local instance with ``num_cpus=2`` (one CPU per task),
started as prep starts its own (``ray_executor.init_local``: it listens on 127.0.0.1 only).
Progress bars are on (the Ray executor's progress actor is part of its cost) and written to nowhere.

Timed: whole runs (run config, shards, manifest), alternating local, Ray, local, Ray, … so a slow phase of a shared
machine hits both; the ratio is total images/s of the Ray runs ÷ of the local runs. Not timed, reported apart: starting
the Ray instance, and one small warm-up run per executor (it starts the worker processes, their forkservers and
imports, which a long run pays once). Target >= 0.9. The tars of every run are compared: they must be identical.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from prep_bench import make_images  # noqa: E402  (bench/ is this script's directory)

from prep import ray_executor  # noqa: E402
from prep import run as prep_run  # noqa: E402
from prep.config import PrepConfig  # noqa: E402
from prep.sources import load_source  # noqa: E402


def prep_once(executor: str, source, cfg: PrepConfig, out: str) -> float:
    """Wall seconds of one whole run into a fresh ``out``, progress bar on (to nowhere)."""
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):
        prep_run.run(cfg, out, workers=2, executor=executor, progress=True, source=source)
    return time.perf_counter() - t0


def tars(out: str) -> dict[str, bytes]:
    return {n: open(os.path.join(out, n), "rb").read() for n in sorted(os.listdir(out)) if n.endswith(".tar")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--shard-size", type=int, default=8, help="images per shard (tasks = images / shard size)")
    ap.add_argument("--long-side", type=int, default=640, help="longer side of the benchmark images (px)")
    ap.add_argument("--mode", default="fast")
    ap.add_argument("--ss-max-side", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per executor (alternating)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    import ray

    work = tempfile.mkdtemp(prefix="ray-bench-")
    try:
        results = bench(args, work, ray)
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    print(render(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


def bench(args, work: str, ray) -> dict:
    make_images(os.path.join(work, "images"), args.images, args.long_side)
    cfg = PrepConfig(
        kind="folder",
        root=os.path.join(work, "images"),
        mode=args.mode,
        ss_max_side=args.ss_max_side,
        shard_size=args.shard_size,
    )
    source = load_source("folder", cfg.root)
    n = len(source.records)

    t0 = time.perf_counter()
    # as prep starts its own instance: listening on 127.0.0.1 only
    ray_executor.init_local(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    ray_start = time.perf_counter() - t0

    # warm-up: 2 one-image shards per executor, so both workers of each start their processes and imports
    warm_cfg = PrepConfig(kind="folder", root=cfg.root, mode=args.mode, ss_max_side=args.ss_max_side, shard_size=1)
    warm_src = type(source)(kind=source.kind, root=source.root, records=source.records[:2], classes=source.classes)
    warm = {e: prep_once(e, warm_src, warm_cfg, os.path.join(work, f"warm-{e}")) for e in ("local", "ray")}

    times: dict[str, list[float]] = {"local": [], "ray": []}
    identical = True
    for r in range(args.repeats):
        for executor in ("local", "ray"):
            times[executor].append(prep_once(executor, source, cfg, os.path.join(work, f"{executor}-{r}")))
        identical &= tars(os.path.join(work, f"local-{r}")) == tars(os.path.join(work, f"ray-{r}"))
    rate = {e: n * len(t) / sum(t) for e, t in times.items()}
    return {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "ray": ray.__version__},
        "setup": {
            "images": n,
            "shards": len(prep_run.plan(source.records, cfg)),
            "shard_size": args.shard_size,
            "long_side": args.long_side,
            "mode": args.mode,
            "ss_max_side": args.ss_max_side,
            "repeats": args.repeats,
        },
        "local_s": times["local"],
        "ray_s": times["ray"],
        "img_per_s": rate,
        "ratio": rate["ray"] / rate["local"],
        "target": ">= 0.9",
        "ray_start_s": ray_start,
        "warm_up_s": warm,
        "tars_identical": identical,
    }


def render(r: dict) -> str:
    s = r["setup"]
    ok = lambda good: "yes" if good else "NO"  # noqa: E731
    fmt = lambda xs: ", ".join(f"{x:.2f}" for x in xs)  # noqa: E731
    return "\n".join(
        [
            f"{s['images']} images (sample photos at {s['long_side']} px), {s['shards']} shards of {s['shard_size']}, "
            f"mode {s['mode']}, ss_max_side {s['ss_max_side']}, {s['repeats']} timed runs per executor; "
            f"{r['machine']['cpus']} CPUs, Python {r['machine']['python']}, Ray {r['machine']['ray']}",
            "",
            "| measure | value | target | met |",
            "|---|---|---|---|",
            f"| images/s Ray ÷ local, 2 CPUs | {r['img_per_s']['ray']:.2f} ÷ {r['img_per_s']['local']:.2f} = "
            f"**{r['ratio']:.3f}** | ≥ 0.9 | {ok(r['ratio'] >= 0.9)} |",
            f"| run wall times local / Ray (s) | {fmt(r['local_s'])} / {fmt(r['ray_s'])} | | |",
            f"| Ray instance start (not timed) | {r['ray_start_s']:.2f} s | | |",
            f"| warm-up run local / Ray (not timed) | {r['warm_up_s']['local']:.2f} s / "
            f"{r['warm_up_s']['ray']:.2f} s | | |",
            f"| tars identical, local vs Ray | {r['tars_identical']} | True | {ok(r['tars_identical'])} |",
        ]
    )


if __name__ == "__main__":
    main()
