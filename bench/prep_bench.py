"""Prep benchmark: pipeline overhead over bare selective search, worker scaling, memory, modes × sizes.

    python bench/prep_bench.py                 # default: ~5 minutes on 2 idle cores
    python bench/prep_bench.py --images 4 --table-images 2 --long-side 200   # smoke test, seconds
    python bench/prep_bench.py --json results.json

Images: the bundled sample photos (data/sample, 15 files), resized so the longer side is ``--long-side`` (640 by
default, COCO-like, so ``--ss-max-side 500`` really downsizes) and repeated under distinct names until there are
``--images`` of them. All figures come from this one process, on the same images and settings, (a) and (b) as the
best of ``--rounds`` alternating rounds (one-off imports and OpenCV set-up paid before timing):

(a) ``prep`` wall time with 1 worker (in process) ÷ bare time: read + decode with PIL + ``proposals.selective_search``
    per image, nothing else. Target <= 1.03.
(b) images/s with 2 workers ÷ 1 worker (the same 1-worker run as (a)), shards of ``--shard-size``. Target >= 1.9.
    The forkserver is started (and its modules imported) before the timed run; that one-off start is reported apart.
(c) peak RSS of each worker process (sampled every 50 ms with psutil) and of this process (ru_maxrss).
(d) modes fast / quality / single × ss_max_side 250 / 500: selective-search seconds per image, raw and kept boxes.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from prep import executors, proposals, tasks  # noqa: E402
from prep import run as prep_run  # noqa: E402
from prep.config import PrepConfig  # noqa: E402
from prep.sources import load_source  # noqa: E402
from shards import summary as summaries  # noqa: E402


def make_images(directory: str, n: int, long_side: int) -> list[str]:
    """``n`` JPEGs (quality 95) from the sample photos, longer side ``long_side``; copies get distinct names."""
    photos = sorted(glob.glob(os.path.join(REPO, "data", "sample", "**", "*.jpg"), recursive=True))
    if not photos:
        raise SystemExit(f"no sample photos under {os.path.join(REPO, 'data', 'sample')}")
    os.makedirs(directory, exist_ok=True)
    paths = []
    for i in range(n):
        im = Image.open(photos[i % len(photos)]).convert("RGB")
        scale = long_side / max(im.size)
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.Resampling.LANCZOS)
        path = os.path.join(directory, f"img_{i:04d}.jpg")
        im.save(path, "JPEG", quality=95)
        paths.append(path)
    return paths


def bare(source, cfg: PrepConfig) -> float:
    """Seconds for read + PIL decode + selective search of every record (the work prep cannot avoid)."""
    t0 = time.perf_counter()
    for rec in source.records:
        with Image.open(rec.path) as im:
            rgb = np.asarray(im.convert("RGB"))
        proposals.selective_search(
            rgb, mode=cfg.mode, ss_max_side=cfg.ss_max_side, seed=proposals.image_seed(cfg.seed, rec.key)
        )
    return time.perf_counter() - t0


class RssSampler:
    """Peak RSS of each descendant process (the workers sit under the forkserver), sampled every ``interval`` s."""

    def __init__(self, interval: float = 0.05):
        import threading

        import psutil

        self.peak: dict[int, float] = {}
        self._stop = threading.Event()
        self._me = psutil.Process()
        self._thread = threading.Thread(target=self._loop, args=(interval,), daemon=True)

    def _loop(self, interval: float) -> None:
        import psutil

        while not self._stop.wait(interval):
            try:
                # forkserver workers are children of the server (and share its command line); spawn workers are ours
                workers = []
                for child in self._me.children():
                    cmd = " ".join(child.cmdline())
                    if "forkserver" in cmd:
                        workers += child.children()
                    elif "spawn_main" in cmd:
                        workers.append(child)
                for p in workers:
                    self.peak[p.pid] = max(self.peak.get(p.pid, 0.0), p.memory_info().rss / 2**20)
            except psutil.Error:  # a process exited between listing and reading
                pass

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def prep_once(source, cfg: PrepConfig, out: str, workers: int) -> float:
    """Wall seconds of a whole ``prep.run.run`` (run config, shards, manifest) on an already loaded source."""
    t0 = time.perf_counter()
    prep_run.run(cfg, out, workers=workers, progress=False, source=source)
    return time.perf_counter() - t0


def _noop(task, tick):
    return os.getpid()


class _Warm:
    name = "warm-up"

    def __len__(self):
        return 1


def modes_table(source, sides: list[int], modes: list[str], n: int, base: PrepConfig) -> list[dict]:
    rows = []
    records = source.records[:n]
    rgbs = [np.asarray(Image.open(r.path).convert("RGB")) for r in records]
    for mode in modes:
        for side in sides:
            secs, raw, kept = [], [], []
            for rec, rgb in zip(records, rgbs, strict=True):
                t0 = time.perf_counter()
                boxes = proposals.selective_search(
                    rgb, mode=mode, ss_max_side=side, seed=proposals.image_seed(base.seed, rec.key)
                )
                secs.append(time.perf_counter() - t0)
                raw.append(len(boxes))
                kept.append(len(proposals.filter_with(boxes, base)[0]))
            rows.append(
                {
                    "mode": mode,
                    "ss_max_side": side,
                    "images": len(records),
                    "seconds_per_image": float(np.mean(secs)),
                    "raw_boxes": float(np.mean(raw)),
                    "kept_boxes": float(np.mean(kept)),
                    "few_boxes": int(sum(k < base.min_boxes for k in kept)),
                }
            )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=32, help="images for (a), (b), (c)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of (a), (b); the best of each counts")
    ap.add_argument(
        "--shard-size",
        type=int,
        default=1,
        help="images per shard in (a), (b); small so 2 workers share the work evenly (the last shard "
        "of a run leaves one worker idle: with few images that tail, not prep, would set (b))",
    )
    ap.add_argument("--long-side", type=int, default=640, help="longer side of the benchmark images (px)")
    ap.add_argument("--mode", default="fast")
    ap.add_argument("--ss-max-side", type=int, default=500)
    ap.add_argument("--table-images", type=int, default=6, help="images per cell of the modes table (d)")
    ap.add_argument("--table-modes", default="fast,quality,single")
    ap.add_argument("--table-sides", default="250,500")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="prep-bench-")
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
    shards = len(prep_run.plan(source.records, cfg))

    t0 = time.perf_counter()  # (b) start the forkserver and import its modules once, outside the timed runs
    executors.run_local([_Warm(), _Warm()], _noop, workers=2, progress=False)
    startup = time.perf_counter() - t0

    # OpenCV's first selective search in a process pays a one-off ~0.25 s set-up: pay it before the timed runs
    proposals.selective_search(np.zeros((16, 16, 3), np.uint8), mode=cfg.mode, ss_max_side=16, seed=0)

    # The first prep run in a process imports pyarrow's writer and friends (~0.3 s, once per process, not per image):
    # pay it on one image outside the timed runs, as the selective-search set-up above.
    first = dataclasses.replace(source, records=source.records[:1])
    prep_once(first, cfg, os.path.join(work, "warm"), workers=1)

    # (a), (b) in alternating rounds (bare, prep 1 worker, prep 2 workers), best of each: the same selective search on
    # the same image varies by several % between runs on this machine, more than the overhead being measured; the
    # best of alternating rounds is the estimate least bent by that noise and by slow phases of a shared machine.
    t_bare, t_one, t_two, rss_peak = [], [], [], {}
    for r in range(args.rounds):
        t_bare.append(bare(source, cfg))
        t_one.append(prep_once(source, cfg, os.path.join(work, f"w1-{r}"), workers=1))
        with RssSampler() as rss:
            t_two.append(prep_once(source, cfg, os.path.join(work, f"w2-{r}"), workers=2))
        rss_peak.update(rss.peak)
    rounds = {"bare_s": t_bare, "prep_1_worker_s": t_one, "prep_2_workers_s": t_two}
    # (a') the same overhead without the run-to-run noise: the best 1-worker run ÷ the selective-search seconds that
    # run itself recorded (Parquet ss_seconds). Stricter than (a): decoding counts as overhead here.
    best = min(range(args.rounds), key=lambda r: t_one[r])
    ss_in_run = sum(summaries.read_table(os.path.join(work, f"w1-{best}")).column("ss_seconds").to_pylist())
    t_bare, t_one, t_two = min(t_bare), min(t_one), min(t_two)
    same = all(
        Path(work, "w1-0", f).read_bytes() == Path(work, f"w{w}-{r}", f).read_bytes()
        for w in (1, 2)
        for r in range(args.rounds)
        for f in os.listdir(os.path.join(work, "w1-0"))
        if f.endswith(".tar")
    )
    table = modes_table(
        source, [int(s) for s in args.table_sides.split(",")], args.table_modes.split(","), args.table_images, cfg
    )

    results = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "opencv": prep_run.versions()["opencv"],
            "start_method": tasks.START_METHOD,
        },
        "setup": {
            "images": n,
            "shards": shards,
            "shard_size": args.shard_size,
            "long_side": args.long_side,
            "mode": args.mode,
            "ss_max_side": args.ss_max_side,
        },
        "overhead": {
            "bare_s": t_bare,
            "prep_1_worker_s": t_one,
            "ratio": t_one / t_bare,
            "target": "<= 1.03",
            "ss_in_run_s": ss_in_run,
            "ratio_in_run": t_one / ss_in_run,
        },
        "scaling": {
            "img_per_s_1": n / t_one,
            "img_per_s_2": n / t_two,
            "ratio": t_one / t_two,
            "target": ">= 1.9",
            "pool_startup_s": startup,
            "tars_identical": same,
        },
        "rounds": rounds,
        "memory": {
            "worker_peak_rss_mb": sorted(rss_peak.values()),
            "main_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        },
        "modes": table,
    }
    print(render(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


def render(r: dict) -> str:
    s, o, sc, m = r["setup"], r["overhead"], r["scaling"], r["memory"]
    ok = lambda good: "yes" if good else "NO"  # noqa: E731
    lines = [
        f"{s['images']} images (sample photos at {s['long_side']} px), {s['shards']} shards of {s['shard_size']}, "
        f"best of {len(r['rounds']['bare_s'])} alternating rounds, "
        f"mode {s['mode']}, ss_max_side {s['ss_max_side']}; {r['machine']['cpus']} CPUs, OpenCV "
        f"{r['machine']['opencv']}, Python {r['machine']['python']}, start method {r['machine']['start_method']}",
        "",
        "| measure | value | target | met |",
        "|---|---|---|---|",
        f"| (a) prep 1 worker ÷ bare selective search | {o['prep_1_worker_s']:.2f} s ÷ {o['bare_s']:.2f} s = "
        f"**{o['ratio']:.3f}** | ≤ 1.03 | {ok(o['ratio'] <= 1.03)} |",
        f"| (a') the same prep run ÷ the selective-search seconds it recorded | {o['prep_1_worker_s']:.2f} s ÷ "
        f"{o['ss_in_run_s']:.2f} s = **{o['ratio_in_run']:.3f}** | ≤ 1.03 | {ok(o['ratio_in_run'] <= 1.03)} |",
        f"| (b) images/s 2 workers ÷ 1 worker | {sc['img_per_s_2']:.2f} ÷ {sc['img_per_s_1']:.2f} = "
        f"**{sc['ratio']:.2f}** | ≥ 1.9 | {ok(sc['ratio'] >= 1.9)} |",
        f"| (b) worker pool start (once per run, not in (b)) | {sc['pool_startup_s']:.2f} s | | |",
        f"| (b) tars identical, 1 vs 2 workers, every round | {sc['tars_identical']} | True | {ok(sc['tars_identical'])} |",
        f"| (c) peak RSS per worker | {', '.join(f'{x:.0f}' for x in m['worker_peak_rss_mb'])} MB | | |",
        f"| (c) peak RSS main process (1-worker run in process) | {m['main_peak_rss_mb']:.0f} MB | | |",
        "",
        "| mode | ss_max_side | s / image | raw boxes | kept boxes | images with < 4 kept |",
        "|---|---|---|---|---|---|",
    ]
    for t in r["modes"]:
        lines.append(
            f"| {t['mode']} | {t['ss_max_side']} | {t['seconds_per_image']:.3f} | {t['raw_boxes']:.0f} | "
            f"{t['kept_boxes']:.1f} | {t['few_boxes']}/{t['images']} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
