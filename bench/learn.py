"""Learning benchmark: does pre-training here learn object features, and does UniVIP beat plain BYOL?

Labelled, non-iconic scene sets the project makes itself (``bench/scenes.py``: cluttered scenes of 3-6 objects of four
classes on photo textures) go through the real tools, as a user's data would:
1. data: training scenes -> ``prep coco`` (selective-search proposals) -> shards; from OTHER scenes (never seen in
   training): object crops labelled by class (the measure) and by the source of their fill, whole scenes labelled by
   the source of their background -> ``prep imagenet`` -> labelled probe shards, each a train and a val set;
2. train at equal steps, batch, schedule and seed: ``reference`` (BYOL written with lightly,
   ``bench/reference_byol.py``: the yardstick for ours), ``byol`` (``python -m train --method byol``: its own views,
   scene loss only), ``univip``, and ``univip-no-ot`` (``--w-instance 0``); each logs the kNN top-1 of its online
   encoder every ``eval_every`` steps (the kNN curve);
3. probe (``bench/probes.py``, ``train.eval``'s code for every encoder): kNN (k 20, T 0.07) and the linear probe on
   the class, fill and background sets, and view-to-view retrieval on held-out scenes, with the encoders' own
   BatchNorm statistics and with them re-estimated on each probe's images; random-init encoders of the same seeds
   are the floor.
The probe labels are used for the tables only: no setting was chosen on them (docs/benchmarks.md says where each
came from).

Sets (``--set``): ``category`` (default: a class decides an object's shape AND its texture family, as a COCO category
does), ``shape`` (the class decides the silhouette only; texture and colour say nothing: adversarial for instance
discrimination on purpose). Modes (``--mode``):
- ``quick``: the whole pipeline at toy sizes on the CPU in a few minutes (checks the pipeline, not the accuracies);
- ``cpu``: the table on a 2-core CPU in at most 90 minutes (32 px views of 96 px scenes, ResNet-18, batch 64, about
  1,000 steps; one run after the other): ``--seeds 0 1`` with the default methods (reference, byol, univip); the
  shape set and univip-no-ot as a second command with one seed;
- ``gpu``: one prepared command for a GPU machine (``bench/gpu_learn.sh``); the data is prepared beforehand with
  ``--prepare-only`` (selective search needs opencv-contrib, which the GPU image lacks) and carried; the steps are
  calibrated so that the whole run fits ``--budget-s``.

    python bench/learn.py --quick                                          # CPU pipeline check, a few minutes
    python bench/learn.py --mode cpu --seeds 0 1 --work learn_cpu          # the CPU table (~65 min, 2 cores)
    python bench/learn.py --mode cpu --set shape --seeds 0 --methods reference byol univip univip-no-ot \\
        --work learn_cpu_shape                                              # the second command (~46 min)
    python bench/learn.py --mode gpu --prepare-only --work learn_data      # here: data for the GPU run
    bash bench/gpu_learn.sh learn_data                                     # there

Writes ``WORK/results.json`` (settings, steps, every run's accuracies, probes, kNN curve, loss, z_std, time),
``WORK/knn_curves.png`` (``python -m train.plot`` of every run's log, random-init as lines) and prints the tables;
``--json PATH`` copies the JSON (default ``$OUT/learn.json`` when ``$OUT`` is set).
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import scenes  # noqa: E402  (bench/scenes.py)

# (name, extra flags of python -m train, or None for bench/reference_byol.py): at equal everything else
METHODS = {
    "reference": None,
    "byol": ["--method", "byol"],
    "univip": ["--method", "univip"],
    "univip-no-ot": ["--method", "univip", "--w-instance", "0"],
}
DEFAULT_METHODS = ("reference", "byol", "univip")

# Settings per mode. gpu: scenes and objects ~1/4 of COCO's (640 px images, objects of 32-200 px), so the paper's 224
# px views / 96 px instances / 96-64 px proposal tiers scale to 96 / 48 / 24-16. cpu: what a 2-core CPU trains in
# the budget (docs/benchmarks.md, "Learning"): 96 px scenes (objects of 19-40 px), 32 px views, 16 px instances
# (the paper's 96/224), tiers 16-12 px, probes at 32 px; no blur at 32 px (the small-image literature's setting:
# SimCLR's CIFAR-10 runs, lightly's and solo-learn's CIFAR recipes); the projector of lightly's CIFAR-10 BYOL
# (1024 -> 256). quick: the cpu settings at toy sizes.
CPU = dict(
    scenes=2000,
    size=96,
    probe_train=400,
    probe_val=300,
    crop=32,
    image=32,
    instance=16,
    batch=64,
    steps=1000,
    arch="resnet18",
    proj=(1024, 256, 1024),
    min_side=16,
    fallback_min_side=12,
    ss_max_side=96,
    device="cpu",
    workers=1,
    eval_every=250,
    gpu_aug=False,
    blur=False,
    retrieval=500,
    calibration_steps=0,
)
MODES = {
    "quick": dict(
        CPU,
        scenes=48,
        probe_train=24,
        probe_val=16,
        batch=16,
        steps=6,
        proj=(256, 64, 256),
        eval_every=3,
        retrieval=16,
        calibration_steps=3,
    ),
    "cpu": CPU,
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
        blur=True,
        retrieval=500,
        calibration_steps=60,
    ),
}
# Optimiser: the small-scale recipe of the literature for ResNet-18 with the -cos loss summed over both directions
# (lightly's BYOL / SimSiam benchmarks on CIFAR-10 and STL-10: SGD momentum 0.9, lr 0.06 per 256 images, weight decay
# 5e-4, EMA 0.99 -> 1), not ORL's ResNet-50 / COCO numbers, chosen before any run: no setting here was tuned on the
# probes' labels. The reference gets the same numbers (bench/reference_byol.py takes the same flag names).
OPTIM = {"lr": 0.06, "lr_batch": 256, "weight_decay": 5e-4, "ema_base": 0.99}
WARMUP_FRACTION = 0.05  # of the run's steps
EVAL_RESERVE_S = 90  # gpu: the probes and writing the results
SEEDS_OF_PROBES = {"probe": (1, 2), "fill": (1, 2), "bg": (4, 5)}  # scene set seeds of each probe's train / val


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), PYTHONUNBUFFERED="1")


def run(cmd: list[str], log: str | None = None) -> str:
    """A command of the pipeline; its output goes to ``log`` (or is captured); a failure stops the benchmark with
    the end of that output."""
    if log:
        with open(log, "w") as f:
            r = subprocess.run(cmd, env=_env(), stdout=f, stderr=subprocess.STDOUT, text=True)
        with open(log) as f:
            out = f.read()
    else:
        r = subprocess.run(cmd, env=_env(), capture_output=True, text=True)
        out = r.stdout + r.stderr
    if r.returncode != 0:
        raise RuntimeError(f"failed ({r.returncode}): {' '.join(cmd)}\n{out[-4000:]}")
    return out


def prepare(work: str, m: dict, kind: str, workers: int) -> None:
    """Training scenes -> prep coco shards; probe images of other scenes -> prep imagenet shards (train, val each)."""
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
    ann = scenes.make_scenes(
        os.path.join(raw, "scenes"), m["scenes"], size=m["size"], seed=0, workers=workers, kind=kind
    )
    size, crop = m["size"], m["crop"]
    for split, n in (("train", m["probe_train"]), ("val", m["probe_val"])):
        i = 0 if split == "train" else 1
        kw = dict(size=size, crop_size=crop, workers=workers, kind=kind)
        scenes.make_crops(os.path.join(raw, f"probe_{split}"), n, seed=SEEDS_OF_PROBES["probe"][i], **kw)
        scenes.make_crops(os.path.join(raw, f"fill_{split}"), n, seed=SEEDS_OF_PROBES["fill"][i], label="fill", **kw)
        scenes.make_backgrounds(os.path.join(raw, f"bg_{split}"), n, seed=SEEDS_OF_PROBES["bg"][i], **kw)
    shard = str(max(8, m["scenes"] // 16))
    tiers = ["--min-side", str(m["min_side"]), "--fallback-min-side", str(m["fallback_min_side"])]
    run(prep + ["coco", os.path.join(raw, "scenes", "images"), "--annotations", ann, "--out", os.path.join(work, "scenes"), "--shard-size", shard, *tiers, *common])  # fmt: skip
    for name in ("probe_train", "probe_val", "fill_train", "fill_val", "bg_train", "bg_val"):
        # whole images are the probes' items; their few boxes go unused
        args = ["--shard-size", "500", "--max-boxes", "4", "--min-side", "8", "--fallback-min-side", "8", *common]
        run(prep + ["imagenet", os.path.join(raw, name), "--out", os.path.join(work, name), *args])
    shutil.rmtree(raw)
    with open(os.path.join(work, "data.json"), "w") as f:
        json.dump({"set": kind, "settings": m}, f, indent=1)
    print(f"data prepared in {time.perf_counter() - t0:.0f} s: {work} ({kind} set)", flush=True)


def _samples(spec: str) -> int:
    with open(os.path.join(spec, "manifest.json")) as f:
        return sum(s["samples"] for s in json.load(f)["shards"])


def whole_epochs(work: str, m: dict, steps: int) -> tuple[int, int]:
    """(steps rounded up to whole epochs, epochs): both trainers' schedules then end exactly at the last step."""
    per_epoch = _samples(os.path.join(work, "scenes")) // m["batch"]
    epochs = max(1, math.ceil(steps / per_epoch))
    return epochs * per_epoch, epochs


def train_cmd(
    work: str, m: dict, method: str, seed: int, steps: int, out: str, workers: int, eval_every: int
) -> list[str]:
    """The command of one training run: ``python -m train`` or the lightly reference, the same settings for both."""
    steps, epochs = whole_epochs(work, m, steps)
    hidden, dim, pred = m["proj"]
    warmup = round(WARMUP_FRACTION * steps)
    shared = [
        "--data", os.path.join(work, "scenes"), "--out", out, "--arch", m["arch"], "--image-size", str(m["image"]),
        "--proj-hidden", str(hidden), "--proj-dim", str(dim), "--pred-hidden", str(pred),
        "--batch-size", str(m["batch"]), "--seed", str(seed), "--workers", str(workers), "--log-every", "10",
        "--lr", str(OPTIM["lr"]), "--lr-batch", str(OPTIM["lr_batch"]), "--weight-decay", str(OPTIM["weight_decay"]),
        "--ema-base", str(OPTIM["ema_base"]), "--blur" if m["blur"] else "--no-blur",
    ]  # fmt: skip
    if eval_every:
        shared += ["--eval-data", os.path.join(work, "probe_train"), "--eval-val-data", os.path.join(work, "probe_val")]
        shared += ["--eval-every", str(eval_every), "--eval-size", str(m["crop"])]
    if METHODS[method] is None:
        ref = [sys.executable, os.path.join(ROOT, "bench", "reference_byol.py"), *shared]
        return ref + ["--steps", str(steps), "--warmup-steps", str(warmup), "--device", m["device"]]
    cmd = [sys.executable, "-m", "train", "--preset", "coco", *shared, "--optimizer", "sgd"]
    cmd += ["--instance-size", str(m["instance"]), "--epochs", str(epochs), "--max-steps", str(steps)]
    cmd += ["--warmup-epochs", f"{warmup / (steps / epochs):.6f}", "--shuffle-buffer", "1000"]
    cmd += ["--device", m["device"], "--ckpt-every", "0", "--keep-ckpts", "1", *METHODS[method]]
    return cmd + (["--gpu-aug"] if m["gpu_aug"] else [])


def train_all(
    work: str, m: dict, runs: list[tuple[str, int]], steps: int, out: str, eval_every: int, tag: str = ""
) -> dict[tuple[str, int], str]:
    """Each (method, seed) run: concurrent processes on a GPU (small models leave it mostly idle), one after the
    other on a CPU (they share its cores anyway). Returns each run's output directory."""
    cores = len(os.sched_getaffinity(0))
    parallel = len(runs) if m["device"] == "cuda" else 1
    workers = m["workers"] or max(2, (cores - parallel) // parallel)
    dirs, pending = {}, []
    for method, seed in runs:
        d = os.path.join(out, f"{method}-s{seed}{tag}")
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        dirs[(method, seed)] = d
        pending.append((train_cmd(work, m, method, seed, steps, d, workers, eval_every), d, method, seed))
    active: list[tuple[subprocess.Popen, str, list[str], float]] = []
    while pending or active:
        while pending and len(active) < parallel:
            cmd, d, method, seed = pending.pop(0)
            print(f"train: {method} seed {seed} ({steps} steps)", flush=True)
            with open(os.path.join(d, "train.out"), "w") as log:  # the child writes through its own descriptor
                proc = subprocess.Popen(cmd, env=_env(), stdout=log, stderr=subprocess.STDOUT)
            active.append((proc, d, cmd, time.perf_counter()))
        for proc, d, cmd, t0 in list(active):
            if proc.poll() is None:
                continue
            active.remove((proc, d, cmd, t0))
            if proc.returncode != 0:
                for p, *_ in active:
                    p.kill()
                with open(os.path.join(d, "train.out")) as f:
                    tail = f.read()[-4000:]
                raise RuntimeError(f"training failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")
            with open(os.path.join(d, "wall_s"), "w") as f:
                f.write(f"{time.perf_counter() - t0:.1f}\n")
        time.sleep(0.5)
    return dirs


def read_log(d: str) -> list[dict]:
    with open(os.path.join(d, "log.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def calibrate(work: str, m: dict, runs: list[tuple[str, int]], out: str) -> dict:
    """gpu: training speed when every run trains at once: a short run of each, the slowest run's steady rate (log
    rows after the first, which holds start-up) and the start-up time it had on top."""
    probe_steps = m["calibration_steps"]
    t0 = time.perf_counter()
    dirs = train_all(work, m, runs, probe_steps, out, eval_every=0, tag="-calibration")
    wall = time.perf_counter() - t0
    rates = {}
    for (method, seed), d in dirs.items():
        rows = read_log(d)
        rows = rows[1:] or rows  # the first row holds the start-up (cuDNN autotuning, first batches)
        rates[f"{method}-s{seed}"] = sum(r["images_per_s"] for r in rows) / len(rows) / m["batch"]
        shutil.rmtree(d)
    slowest = min(rates.values())
    return {"steps_per_s": rates, "slowest": slowest, "startup_s": max(0.0, wall - probe_steps / slowest)}


def encoder_source(method: str, d: str) -> str:
    """What bench/probes.py loads: the reference's export, else the run's last checkpoint."""
    if METHODS[method] is None:
        return os.path.join(d, "backbone.pth")
    return os.path.join(d, sorted(f for f in os.listdir(d) if f.startswith("ckpt-"))[-1])


def probe_all(work: str, m: dict, kind: str, seeds: list[int], dirs: dict[tuple[str, int], str], out: str) -> dict:
    """Every encoder through bench/probes.py in one process (each probe's data loaded once)."""
    encoders = [f"random-init-s{s}=random:{m['arch']}:{s}" for s in seeds]
    encoders += [f"{method}-s{seed}={encoder_source(method, d)}" for (method, seed), d in dirs.items()]
    cmd = [sys.executable, os.path.join(ROOT, "bench", "probes.py"), "--work", work, "--size", str(m["crop"])]
    cmd += ["--set", kind, "--scene-size", str(m["size"]), "--view-size", str(m["image"])]
    cmd += ["--retrieval-n", str(m["retrieval"]), "--json", out, *("--no-blur",) * (not m["blur"])]
    cmd += ["--device", m["device"], *(x for e in encoders for x in ("--encoder", e))]
    run(cmd, log=out + ".log")
    with open(out) as f:
        return json.load(f)


def curves_png(dirs: dict[tuple[str, int], str], probes: dict, path: str) -> None:
    """Every run's kNN curve in one picture (python -m train.plot), random-init of each seed as a line."""
    logs = [os.path.join(d, "log.jsonl") for d in dirs.values()]
    labels = [f"{method} s{seed}" for method, seed in dirs]
    floors = [f"{name}={r['stored']['class']['knn_top1']}" for name, r in probes.items() if name.startswith("random")]
    cmd = [sys.executable, "-m", "train.plot", *logs, "--labels", *labels, "--baseline", *floors, "-o", path]
    run(cmd + ["--title", "learning benchmark: loss, z_std, kNN top-1 of the online encoder on the class probe"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--mode", choices=sorted(MODES), default="quick")
    p.add_argument("--quick", action="store_const", const="quick", dest="mode", help="same as --mode quick")
    p.add_argument("--set", dest="kind", choices=scenes.SETS, default="category", help="scene set (default: category)")
    p.add_argument("--work", default=None, help="data and runs (default: /tmp/univip-learn-MODE-SET)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument(
        "--methods",
        nargs="+",
        choices=list(METHODS),
        default=list(DEFAULT_METHODS),
        help=f"methods to train (default: {' '.join(DEFAULT_METHODS)}); random-init is always probed",
    )
    p.add_argument(
        "--steps", type=int, default=None, help="training steps (default: the mode's; gpu: calibrated to --budget-s)"
    )
    p.add_argument("--budget-s", type=float, default=480, help="gpu: the whole command's time budget")
    p.add_argument("--prepare-only", action="store_true", help="make the data and stop")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)), help="processes for data preparation")
    p.add_argument("--json", default=None, help="also write the results here (default: $OUT/learn.json if $OUT)")
    p.add_argument(
        "--combine",
        nargs="+",
        metavar="RESULTS",
        help="print the tables of several results.json files together (seeds or methods run by separate commands on "
        "the same data; a (method, seed) in a later file replaces an earlier one) and train nothing",
    )
    a = p.parse_args(argv)
    if a.combine:
        print(combined(a.combine))
        return 0
    t_start = time.perf_counter()
    m = dict(MODES[a.mode])
    work = a.work or f"/tmp/univip-learn-{a.mode}-{a.kind}"
    os.makedirs(work, exist_ok=True)
    data_json = os.path.join(work, "data.json")
    if os.path.exists(data_json):
        with open(data_json) as f:
            made = json.load(f)
        if made != {"set": a.kind, "settings": json.loads(json.dumps(m))}:
            raise SystemExit(f"{work} holds data made for other settings ({made.get('set')} set): use another --work")
    else:
        prepare(work, m, a.kind, a.workers)
    if a.prepare_only:
        return 0
    runs_dir = os.path.join(work, "runs")
    os.makedirs(runs_dir, exist_ok=True)
    runs = [(method, seed) for seed in a.seeds for method in a.methods]
    info: dict = {
        "mode": a.mode,
        "set": a.kind,
        "settings": m,
        "optim": OPTIM,
        "seeds": a.seeds,
        "methods": a.methods,
        "samples": {k: _samples(os.path.join(work, k)) for k in ("scenes", "probe_train", "probe_val")},
    }
    steps = m["steps"] if a.steps is None else a.steps
    if not steps:  # gpu: the steps that fit the budget, after the probes' share and some slack
        cal = info["calibration"] = calibrate(work, m, runs, runs_dir)
        left = a.budget_s - (time.perf_counter() - t_start) - EVAL_RESERVE_S - cal["startup_s"]
        steps = int(max(50, 0.85 * left * cal["slowest"]) // 50 * 50)
        print(f"calibrated: {steps} steps ({cal})", flush=True)
    steps = info["steps"] = whole_epochs(work, m, steps)[0]
    t0 = time.perf_counter()
    eval_every = m["eval_every"] if m["eval_every"] and steps >= 2 * m["eval_every"] else 0
    dirs = train_all(work, m, runs, steps, runs_dir, eval_every)
    info["train_wall_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    probes = info["probes"] = probe_all(work, m, a.kind, a.seeds, dirs, os.path.join(runs_dir, "probes.json"))
    info["probe_wall_s"] = time.perf_counter() - t0
    results = []
    for seed in a.seeds:
        results.append({"method": "random-init", "seed": seed, **_acc(probes[f"random-init-s{seed}"])})
    for (method, seed), d in dirs.items():
        log = read_log(d)
        with open(os.path.join(d, "wall_s")) as f:
            wall = float(f.read())
        results.append(
            {
                "method": method,
                "seed": seed,
                **_acc(probes[f"{method}-s{seed}"]),
                "loss": log[-1]["loss"],
                "z_std": log[-1].get("z_std"),
                "images_per_s": log[-1]["images_per_s"],
                "wall_s": wall,
                "knn_curve": [(r["step"], r["knn_top1"]) for r in log if "knn_top1" in r],
            }
        )
    info["results"] = results
    methods = ["random-init", *a.methods]
    info["table"] = markdown(results, a.seeds, methods)
    info["probe_table"] = probe_markdown(probes, a.seeds, methods)
    info["curve_table"] = curve_markdown(results, methods)
    info["targets"] = targets(results, a.methods)
    if eval_every:
        curves_png(dirs, probes, os.path.join(work, "knn_curves.png"))
    info["wall_s"] = time.perf_counter() - t_start
    print(f"## {a.kind} set, {a.mode} mode\n\n{info['table']}\n\n{info['probe_table']}\n\n{info['curve_table']}\n")
    print("\n".join(f"- {line}" for line in info["targets"]))
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
        f"learn: {a.kind} set, {a.mode} mode, {steps} steps x batch {m['batch']}, {len(a.seeds)} seed(s), "
        f"{info['wall_s']:.0f} s in all",
        flush=True,
    )
    return 0


def combined(paths: list[str]) -> str:
    """The tables and targets of several results files together (all of one set and mode)."""
    infos = []
    for path in paths:
        with open(path) as f:
            infos.append(json.load(f))
    kinds = {(i["set"], i["mode"], i["steps"]) for i in infos}
    if len(kinds) != 1:
        raise SystemExit(f"--combine: the files hold different sets, modes or steps: {sorted(kinds)}")
    rows: dict[tuple[str, int], dict] = {}
    probes: dict[str, dict] = {}
    for info in infos:
        rows.update({(r["method"], r["seed"]): r for r in info["results"]})
        probes.update(info["probes"])
    results = list(rows.values())
    seeds = sorted({seed for _, seed in rows})
    methods = ["random-init", *dict.fromkeys(m for i in infos for m in i["methods"])]
    kind, mode, steps = kinds.pop()
    head = f"## {kind} set, {mode} mode, {steps} steps, seeds {' '.join(map(str, seeds))} ({', '.join(paths)})"
    parts = [head, markdown(results, seeds, methods), probe_markdown(probes, seeds, methods)]
    parts += [curve_markdown(results, methods), "\n".join(f"- {line}" for line in targets(results, methods))]
    return "\n\n".join(parts)


def _acc(probe: dict) -> dict:
    """The measure: kNN and linear top-1 on the class probe, the encoder's own BatchNorm statistics."""
    return {"knn_top1": probe["stored"]["class"]["knn_top1"], "linear_top1": probe["stored"]["class"]["linear_top1"]}


def _cell(vals: list[float]) -> str:
    """Mean in %, with ± half the range over seeds when there are several."""
    if not vals:
        return "–"
    spread = f" (±{50 * (max(vals) - min(vals)):.1f})" if len(vals) > 1 else ""
    return f"{100 * statistics.mean(vals):.1f}{spread}"


def markdown(results: list[dict], seeds: list[int], methods: list[str]) -> str:
    """Per method: each seed's kNN / linear top-1 on the class probe and their mean (± half the range)."""
    lines = [
        "| method | "
        + " | ".join(f"kNN s{s}" for s in seeds)
        + " | kNN mean | "
        + " | ".join(f"linear s{s}" for s in seeds)
        + " | linear mean | final loss | z_std | s / run |",
        "|---" * (6 + 2 * len(seeds)) + "|",
    ]
    for name in methods:
        rows = sorted((r for r in results if r["method"] == name), key=lambda r: r["seed"])
        knn, lin = [r["knn_top1"] for r in rows], [r["linear_top1"] for r in rows]
        by_seed = {r["seed"]: r for r in rows}  # a seed a method did not run shows as "–"
        extra = [
            f"{statistics.mean(r[key] for r in rows):.{digits}f}" if rows and rows[0].get(key) is not None else "–"
            for key, digits in (("loss", 3), ("z_std", 4), ("wall_s", 0))
        ]
        knn_cells, lin_cells = (
            [f"{100 * by_seed[s][key]:.1f}" if s in by_seed else "–" for s in seeds]
            for key in ("knn_top1", "linear_top1")
        )
        cells = [name, *knn_cells, _cell(knn), *lin_cells, _cell(lin)]
        lines.append("| " + " | ".join(cells + extra) + " |")
    return "\n".join(lines)


def probe_markdown(probes: dict, seeds: list[int], methods: list[str]) -> str:
    """Per method (mean ± half range over seeds): kNN / linear of each labelled probe and retrieval top-1, with the
    encoder's BatchNorm statistics, then re-estimated on the probe's images."""
    names = ["class", "fill", "background"]
    head = [f"{n} kNN / linear" for n in names] + ["retrieval top-1"]
    lines = ["| method | BatchNorm statistics | " + " | ".join(head) + " |", "|---" * (2 + len(head)) + "|"]
    for method in methods:
        for mode in ("stored", "probe"):
            per_seed = [probes[f"{method}-s{s}"][mode] for s in seeds if f"{method}-s{s}" in probes]
            if not per_seed:
                continue
            cells = []
            for n in names:
                if n not in per_seed[0]:
                    cells.append("–")
                    continue
                knn = _cell([r[n]["knn_top1"] for r in per_seed])
                cells.append(f"{knn} / {_cell([r[n]['linear_top1'] for r in per_seed])}")
            cells.append(_cell([r["retrieval"]["top1"] for r in per_seed]) if "retrieval" in per_seed[0] else "–")
            label = "own" if mode == "stored" else "re-estimated on the probe"
            lines.append(f"| {method} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def curve_markdown(results: list[dict], methods: list[str]) -> str:
    """kNN top-1 (%) during training, per method and step: mean over seeds (± half range)."""
    steps = sorted({s for r in results for s, _ in r.get("knn_curve", [])})
    if not steps:
        return ""
    lines = ["| method | " + " | ".join(f"step {s}" for s in steps) + " |", "|---" * (1 + len(steps)) + "|"]
    for method in methods:
        rows = [r for r in results if r["method"] == method and r.get("knn_curve")]
        if rows:
            cells = [_cell([dict(r["knn_curve"]).get(s) for r in rows if s in dict(r["knn_curve"])]) for s in steps]
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(results: list[dict], methods: list[str]) -> list[str]:
    """The issue's targets, measured: BYOL vs random-init, ours vs the reference, UniVIP vs BYOL (kNN and linear, and
    ours vs the reference at each point of the kNN curve), each with the seed spread (half the range over seeds, the
    larger of the two sides compared)."""

    def vals(method: str, key: str) -> list[float]:
        return [r[key] for r in results if r["method"] == method]

    out = []
    for key in ("knn_top1", "linear_top1"):
        label = key.split("_")[0]
        floor, byol, ref = vals("random-init", key), vals("byol", key), vals("reference", key)
        if floor and byol:
            gap = 100 * (statistics.mean(byol) - statistics.mean(floor))
            goal = "target >= +5" if key == "knn_top1" else "the target is on kNN"
            out.append(f"BYOL - random-init, {label}: {gap:+.1f} points ({goal})")
        if ref and byol:
            out.append(_versus(f"ours (byol) - reference, {label}", byol, ref, same=True))
        for method in ("univip", "univip-no-ot"):
            if vals(method, key) and byol:
                out.append(_versus(f"{method} - BYOL, {label}", vals(method, key), byol, same=False))
    steps = sorted({s for r in results if r["method"] in ("byol", "reference") for s, _ in r.get("knn_curve", [])})
    for step in steps:
        ours, ref = (
            [dict(r["knn_curve"])[step] for r in results if r["method"] == m and step in dict(r["knn_curve"])]
            for m in ("byol", "reference")
        )
        if ours and ref:
            out.append(_versus(f"ours (byol) - reference, kNN at step {step}", ours, ref, same=True))
    return out


def _versus(label: str, a: list[float], b: list[float], *, same: bool) -> str:
    """mean(a) - mean(b) in points against the larger seed spread: ``same``: is the gap within it, else: is a ahead
    by more. With one seed on each side there is no spread, and no verdict."""
    gap = 100 * (statistics.mean(a) - statistics.mean(b))
    spread = 50 * max(max(a) - min(a), max(b) - min(b))
    if len(a) < 2 and len(b) < 2:
        verdict = "one seed each: no spread to judge by"
    elif same:
        verdict = "within" if abs(gap) <= spread else "OUTSIDE"
    else:
        verdict = "ahead by more than the spread" if gap > spread else "not ahead by more than the spread"
    return f"{label}: {gap:+.1f} points, seed spread ±{spread:.1f}: {verdict}"


if __name__ == "__main__":
    sys.exit(main())
