"""Learning benchmark: does pre-training here learn object features, and does UniVIP beat plain BYOL?

A non-iconic data set the project makes itself (``bench/scenes.py``: cluttered scenes of 3-6 objects of four shape
classes on textures cut from the bundled photos; colour and texture say nothing about the class) goes through the
real tools, as a user's data would:
1. data: training scenes -> ``prep coco`` (selective-search proposals) -> shards; object crops of OTHER scenes (never
   seen in training), one folder per shape class -> ``prep imagenet`` -> labelled probe shards, a train and a val set;
2. train: ``python -m train`` at equal steps, batch, schedule and seed for each method: BYOL (plain: its own views,
   scene loss only), UniVIP, and UniVIP without the optimal-transport term (``--w-instance 0``), all seeds at once;
3. evaluate: ``python -m train.eval`` on the final online encoder of each run and on a random-init encoder (the floor)
   with the same seed: kNN (k 20, T 0.07) and a linear probe on the object crops. The probe labels are used for the
   table only (and, with ``--eval-every``, for the kNN curve in each run's log): no setting was chosen on them.

Modes (``--mode``): ``quick`` runs the whole pipeline on CPU in a few minutes (checks the pipeline, not the
accuracies: too short to learn); ``gpu`` is one prepared command for a GPU machine: the data is prepared beforehand with ``--prepare-only`` (selective search needs
opencv-contrib, which the GPU image lacks) and carried; training steps are calibrated so that the whole run fits
``--budget-s``.

    python bench/learn.py --quick                                    # CPU pipeline check, a few minutes
    python bench/learn.py --mode gpu --prepare-only --work learn_data  # here: data for the GPU run (~30 MB)
    python bench/learn.py --mode gpu --work learn_data --seeds 0 1     # there (bench/gpu_learn.sh)

Writes ``WORK/results.json`` (every run's settings, steps, time, accuracies, final loss and z_std) and prints a
markdown table; ``--json PATH`` copies the JSON elsewhere (default ``$OUT/learn.json`` when ``$OUT`` is set).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import scenes  # noqa: E402  (bench/scenes.py)

# (name, extra train flags): the methods compared, at equal everything else
METHODS = [
    ("byol", ["--method", "byol"]),
    ("univip", ["--method", "univip"]),
    ("univip-no-ot", ["--method", "univip", "--w-instance", "0"]),
]

# Settings per mode. Scene and object sizes are ~1/4 of COCO's (640 px images, objects of 32-200 px), so the paper's
# 224 px views / 96 px instances / 96-64 px proposal tiers scale to 96 / 48 / 24-16 here (gpu); quick is smaller still.
MODES = {
    "quick": dict(
        scenes=48,
        size=128,
        probe_train=24,
        probe_val=16,
        crop=48,
        image=64,
        instance=32,
        batch=16,
        steps=12,
        arch="resnet18",
        proj=(512, 128, 512),
        min_side=16,
        fallback_min_side=12,
        ss_max_side=128,
        device="cpu",
        workers=1,
        eval_every=6,
        gpu_aug=False,
        calibration_steps=6,
    ),
    "gpu": dict(
        scenes=3000,
        size=160,
        probe_train=500,
        probe_val=400,
        crop=64,
        image=96,
        instance=48,
        batch=256,
        steps=0,
        arch="resnet18",
        proj=(4096, 256, 4096),
        min_side=24,
        fallback_min_side=16,
        ss_max_side=160,
        device="cuda",
        workers=0,
        eval_every=250,
        gpu_aug=True,
        calibration_steps=60,
    ),
}
# Optimiser: the small-scale recipe of the literature for ResNet-18 with the -cos loss used here (lightly's BYOL /
# SimSiam benchmarks on CIFAR-10 and STL-10: SGD momentum 0.9, lr 0.06 per 256 images, weight decay 5e-4, EMA 0.99 -> 1),
# not ORL's ResNet-50 / COCO numbers, and chosen before any run: no setting here was tuned on the probe's labels.
OPTIM = ["--optimizer", "sgd", "--lr", "0.06", "--lr-batch", "256", "--weight-decay", "5e-4", "--ema-base", "0.99"]
WARMUP_FRACTION = 0.05  # of the run's steps
EVAL_RESERVE_S = 75  # gpu: the final evaluations (all at once) and writing the results


def run(cmd: list[str], log: str | None = None, **kw) -> subprocess.CompletedProcess:
    """A command of the pipeline; its output goes to ``log`` (or is captured) and a failure stops the benchmark
    with that output."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1")
    if log:
        with open(log, "w") as f:
            r = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, text=True, **kw)
        with open(log) as f:
            out = f.read()
    else:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, **kw)
        out = r.stdout + r.stderr
    if r.returncode != 0:
        raise RuntimeError(f"failed ({r.returncode}): {' '.join(cmd)}\n{out[-4000:]}")
    return r


def prepare(work: str, m: dict, workers: int) -> None:
    """Scenes -> prep coco shards; object crops of other scenes -> prep imagenet probe shards (train, val)."""
    prep = [sys.executable, "-m", "prep"]
    common = [
        "--workers",
        str(workers),
        "--no-progress",
        "--jpeg-quality",
        "85",
        "--ss-max-side",
        str(m["ss_max_side"]),
    ]
    raw = os.path.join(work, "raw")
    t0 = time.perf_counter()
    ann = scenes.make_scenes(os.path.join(raw, "scenes"), m["scenes"], size=m["size"], seed=0, workers=workers)
    # train and val probe crops come from two more scene sets (seeds 1, 2): no object is seen twice
    for name, n, seed in (("probe_train", m["probe_train"], 1), ("probe_val", m["probe_val"], 2)):
        scenes.make_crops(os.path.join(raw, name), n, size=m["size"], crop_size=m["crop"], seed=seed, workers=workers)
    run(
        prep
        + [
            "coco",
            os.path.join(raw, "scenes", "images"),
            "--annotations",
            ann,
            "--out",
            os.path.join(work, "scenes"),
            "--shard-size",
            str(max(8, m["scenes"] // 16)),
            *_tiers(m["min_side"], m["fallback_min_side"]),
            *common,
        ]
    )
    for name in ("probe_train", "probe_val"):  # whole crops are the probe's items; their few boxes go unused
        run(
            prep
            + [
                "imagenet",
                os.path.join(raw, name),
                "--out",
                os.path.join(work, name),
                "--shard-size",
                "500",
                "--max-boxes",
                "4",
                *_tiers(8, 8),
                *common,
            ]
        )
    shutil.rmtree(raw)
    print(f"data prepared in {time.perf_counter() - t0:.0f} s: {work}", flush=True)


def _tiers(min_side: int, fallback: int) -> list[str]:
    """Proposal size tiers: boxes >= min_side, filled up to K with boxes >= fallback where fewer survive."""
    return ["--min-side", str(min_side), "--fallback-min-side", str(fallback)]


def train_cmd(
    work: str, m: dict, method_flags: list[str], seed: int, steps: int, out: str, workers: int, eval_every: int
) -> list[str]:
    n = _samples(os.path.join(work, "scenes"))
    steps_per_epoch = n // m["batch"]
    epochs = max(1, math.ceil(steps / steps_per_epoch))  # the cosine schedule ends at (about) the last step
    hidden, dim, pred = m["proj"]
    cmd = [
        sys.executable,
        "-m",
        "train",
        "--preset",
        "coco",
        "--data",
        os.path.join(work, "scenes"),
        "--out",
        out,
        "--arch",
        m["arch"],
        "--image-size",
        str(m["image"]),
        "--instance-size",
        str(m["instance"]),
        "--proj-hidden",
        str(hidden),
        "--proj-dim",
        str(dim),
        "--pred-hidden",
        str(pred),
        "--batch-size",
        str(m["batch"]),
        "--epochs",
        str(epochs),
        "--max-steps",
        str(steps),
        "--warmup-epochs",
        f"{WARMUP_FRACTION * steps / steps_per_epoch:.4f}",
        "--seed",
        str(seed),
        "--workers",
        str(workers),
        "--shuffle-buffer",
        "1000",
        "--device",
        m["device"],
        "--log-every",
        "10",
        "--ckpt-every",
        "0",
        "--keep-ckpts",
        "1",
        *OPTIM,
        *method_flags,
    ]
    if m["gpu_aug"]:
        cmd.append("--gpu-aug")
    if eval_every:
        cmd += [
            "--eval-data",
            os.path.join(work, "probe_train"),
            "--eval-val-data",
            os.path.join(work, "probe_val"),
            "--eval-every",
            str(eval_every),
            "--eval-size",
            str(m["crop"]),
        ]
    return cmd


def _samples(spec: str) -> int:
    with open(os.path.join(spec, "manifest.json")) as f:
        return sum(s["samples"] for s in json.load(f)["shards"])


def train_all(
    work: str, m: dict, seeds: list[int], steps: int, out: str, eval_every: int, tag: str = ""
) -> dict[tuple[str, int], str]:
    """All methods x seeds as concurrent processes (one GPU or the CPU); returns each run's output directory."""
    runs = [(name, flags, seed) for seed in seeds for name, flags in METHODS]
    cores = os.cpu_count() or 2
    # CPU runs share the cores anyway: one at a time; GPU runs overlap (small models leave the GPU mostly idle)
    parallel = len(runs) if m["device"] == "cuda" else 1
    workers = m["workers"] or max(2, (cores - parallel) // parallel)
    dirs = {}
    pending = []
    for name, flags, seed in runs:
        d = os.path.join(out, f"{name}-s{seed}{tag}")
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        dirs[(name, seed)] = d
        pending.append((train_cmd(work, m, flags, seed, steps, d, workers, eval_every), d))
    active: list[tuple[subprocess.Popen, str, list[str]]] = []
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1")
    while pending or active:
        while pending and len(active) < parallel:
            cmd, d = pending.pop(0)
            with open(os.path.join(d, "train.out"), "w") as log:  # the child writes through its own descriptor
                active.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT), d, cmd))
        for proc, d, cmd in list(active):
            if proc.poll() is not None:
                active.remove((proc, d, cmd))
                if proc.returncode != 0:
                    for p, _, _ in active:
                        p.kill()
                    with open(os.path.join(d, "train.out")) as f:
                        tail = f.read()[-4000:]
                    raise RuntimeError(f"training failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")
        time.sleep(0.5)
    return dirs


def read_log(d: str) -> list[dict]:
    with open(os.path.join(d, "log.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def calibrate(work: str, m: dict, seeds: list[int], out: str) -> dict:
    """Training speed when every method and seed runs at once: a short run of each, the slowest run's steady rate
    (log rows after the first, which holds start-up) and the start-up time it had on top."""
    probe_steps = m["calibration_steps"]
    t0 = time.perf_counter()
    dirs = train_all(work, m, seeds, probe_steps, out, eval_every=0, tag="-calibration")
    wall = time.perf_counter() - t0
    rates = {}
    for key, d in dirs.items():
        rows = read_log(d)
        rows = rows[1:] or rows  # the first row holds the start-up (cuDNN autotuning, first batches)
        rates[f"{key[0]}-s{key[1]}"] = sum(r["images_per_s"] for r in rows) / len(rows) / m["batch"]
        shutil.rmtree(d)
    slowest = min(rates.values())
    return {
        "steps_per_s": rates,
        "slowest": slowest,
        "startup_s": max(0.0, wall - probe_steps / slowest),
        "calibration_wall_s": wall,
    }


def evaluate(work: str, m: dict, target: list[str], out_json: str) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "train.eval",
        *target,
        "--train-data",
        os.path.join(work, "probe_train"),
        "--val-data",
        os.path.join(work, "probe_val"),
        "--size",
        str(m["crop"]),
        "--device",
        "cuda" if m["device"] == "cuda" else "cpu",
        "--json",
        out_json,
    ]
    run(cmd)
    with open(out_json) as f:
        return json.load(f)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--mode", choices=sorted(MODES), default="quick")
    p.add_argument("--quick", action="store_const", const="quick", dest="mode", help="same as --mode quick")
    p.add_argument("--work", default=None, help="data and runs (default: /tmp/univip-learn-MODE)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    names = [n for n, _ in METHODS]
    p.add_argument(
        "--methods",
        nargs="+",
        choices=names,
        default=names,
        help="methods to train (default: all); random-init is always evaluated",
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="training steps (default: the mode's; gpu: calibrated to --budget-s; 0 calibrates in any mode)",
    )
    p.add_argument("--budget-s", type=float, default=480, help="gpu: the whole command's time budget")
    p.add_argument("--prepare-only", action="store_true", help="make the data and stop")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes for data preparation")
    p.add_argument("--json", default=None, help="also write the results here (default: $OUT/learn.json if $OUT)")
    a = p.parse_args(argv)
    t_start = time.perf_counter()
    m = dict(MODES[a.mode])
    METHODS[:] = [(n, f) for n, f in METHODS if n in a.methods]
    work = a.work or f"/tmp/univip-learn-{a.mode}"
    os.makedirs(work, exist_ok=True)
    if not os.path.exists(os.path.join(work, "probe_val", "manifest.json")):
        prepare(work, m, a.workers)
    if a.prepare_only:
        return 0
    runs_dir = os.path.join(work, "runs")
    os.makedirs(runs_dir, exist_ok=True)
    info: dict = {
        "mode": a.mode,
        "settings": m,
        "optim": OPTIM,
        "seeds": a.seeds,
        "samples": {k: _samples(os.path.join(work, k)) for k in ("scenes", "probe_train", "probe_val")},
    }
    steps = m["steps"] if a.steps is None else a.steps
    if not steps:  # gpu: the steps that fit the budget, after the evaluations' share and some slack
        cal = info["calibration"] = calibrate(work, m, a.seeds, runs_dir)
        left = a.budget_s - (time.perf_counter() - t_start) - EVAL_RESERVE_S - cal["startup_s"]
        steps = int(max(50, 0.85 * left * cal["slowest"]) // 50 * 50)
        print(f"calibrated: {steps} steps ({cal})", flush=True)
    info["steps"] = steps
    t0 = time.perf_counter()
    eval_every = m["eval_every"] if m["eval_every"] and steps >= 2 * m["eval_every"] else 0
    dirs = train_all(work, m, a.seeds, steps, runs_dir, eval_every)
    info["train_wall_s"] = time.perf_counter() - t0
    # every evaluation at once on a GPU (each is a few seconds of device work after start-up), one by one on a CPU
    jobs = []
    for seed in a.seeds:
        jobs.append(
            (
                "random-init",
                seed,
                ["--random-init", "--arch", m["arch"], "--seed", str(seed)],
                os.path.join(runs_dir, f"random-init-s{seed}.json"),
            )
        )
        for name, _ in METHODS:
            d = dirs[(name, seed)]
            ckpt = sorted(f for f in os.listdir(d) if f.startswith("ckpt-"))[-1]
            jobs.append((name, seed, [os.path.join(d, ckpt)], os.path.join(d, "eval.json")))

    def one(job) -> dict:
        try:
            return evaluate(work, m, job[2], job[3])
        except RuntimeError as e:  # one failed evaluation must not lose the others
            print(f"evaluation of {job[0]} seed {job[1]} failed: {e}", file=sys.stderr, flush=True)
            return {"error": str(e)[-2000:]}

    with ThreadPoolExecutor(len(jobs) if m["device"] == "cuda" else 1) as pool:
        evals = list(pool.map(one, jobs))
    results = []
    for (name, seed, _, _), ev in zip(jobs, evals, strict=True):
        row = {"method": name, "seed": seed, **_acc(ev)}
        if name != "random-init":
            log = read_log(dirs[(name, seed)])
            row.update(
                loss=log[-1]["loss"],
                z_std=log[-1]["z_std"],
                images_per_s=log[-1]["images_per_s"],
                knn_curve=[(r["step"], r["knn_top1"]) for r in log if "knn_top1" in r],
            )
        results.append(row)
    info["results"] = results
    info["wall_s"] = time.perf_counter() - t_start
    table = markdown(results, a.seeds)
    info["table"] = table
    print(table)
    for path in filter(
        None,
        (
            os.path.join(work, "results.json"),
            a.json or (os.path.join(os.environ["OUT"], "learn.json") if os.environ.get("OUT") else None),
        ),
    ):
        with open(path, "w") as f:
            json.dump(info, f, indent=1)
    print(
        f"learn: {a.mode} mode, {steps} steps x batch {m['batch']}, {len(a.seeds)} seed(s), "
        f"{info['wall_s']:.0f} s in all",
        flush=True,
    )
    return 0


def _acc(ev: dict) -> dict:
    return {
        "knn_top1": ev.get("knn_top1"),
        "linear_top1": ev.get("linear_top1"),
        **({"error": ev["error"]} if "error" in ev else {}),
    }


def markdown(results: list[dict], seeds: list[int]) -> str:
    """Per method: each seed's kNN / linear top-1 and their mean; the spread is max - min over seeds."""
    lines = [
        "| method | "
        + " | ".join(f"kNN s{s}" for s in seeds)
        + " | kNN mean | "
        + " | ".join(f"linear s{s}" for s in seeds)
        + " | linear mean | final loss | z_std |",
        "|---" * (5 + 2 * len(seeds)) + "|",
    ]
    for name in ("random-init", *(n for n, _ in METHODS)):
        rows = [r for r in results if r["method"] == name]
        knn = [r["knn_top1"] for r in rows if r["knn_top1"] is not None]
        lin = [r["linear_top1"] for r in rows if r["linear_top1"] is not None]

        def cell(vals):
            return (
                f"{100 * statistics.mean(vals):.1f}"
                + (f" (±{50 * (max(vals) - min(vals)):.1f})" if len(vals) > 1 else "")
                if vals
                else "–"
            )

        loss = statistics.mean(r["loss"] for r in rows) if "loss" in rows[0] else None
        zs = statistics.mean(r["z_std"] for r in rows) if "z_std" in rows[0] else None
        lines.append(
            f"| {name} | "
            + " | ".join(f"{100 * v:.1f}" for v in knn)
            + f" | {cell(knn)} | "
            + " | ".join(f"{100 * v:.1f}" for v in lin)
            + f" | {cell(lin)} | "
            + (f"{loss:.3f}" if loss is not None else "–")
            + " | "
            + (f"{zs:.4f}" if zs is not None else "–")
            + " |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
