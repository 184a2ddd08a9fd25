"""Input-pipeline benchmark (issue #3 item 7, first bullet): CPU cost per sample of the UniVIP view pipeline against a
naive torchvision BYOL pipeline on the same images, in the same process, one thread.

Pipelines, each producing the two 224 px views of one sample from its JPEG bytes:
- ``naive``: PIL decode, then per view torchvision.transforms.v2 RandomResizedCrop(224), RandomHorizontalFlip,
  ColorJitter(0.4, 0.4, 0.2, 0.1) p 0.8, RandomGrayscale 0.2, GaussianBlur(23, (0.1, 2.0)) p 1.0 / 0.1,
  RandomSolarize(128) p 0 / 0.2, ToImage + ToDtype + Normalize (the usual BYOL recipe; no boxes).
- ``univip-cpu``: ``train.views.UniVIPTransform`` (metadata, Algorithm 1, K boxes, decode, crops, CPU colour ops).
- ``univip-cpu + instances``: the same with the paper's instances (``instance_crops=True``, the training default of
  ``--method univip``): K = 4 boxes cut from the source image at 96 px, flipped and coloured like their view.
- ``univip-gpu_aug``: the same with ``gpu_aug=True``: the CPU decodes, crops and flips; colour ops are left to
  ``train.augment.gpu_colour`` (its CPU time per batch is reported for the record, not counted).
- ``univip-gpu_aug + instances``: the same with the paper's instances cut on the CPU (colour on the device): the
  loader's work per sample in a ``python -m train --gpu-aug`` UniVIP run, what the data-wait target depends on.
- ``univip-gpu_decode``: ``gpu_decode=True``: the CPU reads the JPEG header and runs Algorithm 1 and the flips, and
  hands over the bytes as a tensor; ``train.gpu_decode.decode_views`` decodes, crops and resizes on the GPU (its GPU
  time per batch is reported when CUDA is available, not counted).
- ``decode only``: PIL's full decode (the naive pipeline's), and OpenCV's (the UniVIP CPU path's): the floor every
  pipeline that decodes on the CPU pays.
Pipelines run interleaved item by item so that load from other processes hits them alike; the figure is CPU time
(``time.process_time``) of this single-threaded process, best of ``--rounds`` per item (the same random draws each
round), so samples/s per core = 1000 / (ms per sample). The whole comparison is repeated ``--repeats`` times (3 at
least; the pipelines' order rotates from one repeat to the next) and each repeat is printed, then the median and the
min-max spread of every pipeline's ms and of every ratio. Ratios are taken within a repeat (same conditions for both
pipelines). On a shared machine the naive pipeline's large convolution slows down more than the rest under load (its
CPU time here varied from 26 ms per sample idle to 75 ms under load), so the 1-min load average is printed with the
result and a loud warning is printed when it was above half the cores at the start, or rose above that (this
process's own thread aside) during the run: publish figures only from a run without the warning.

Images: COCO-sized photos (the photos bundled with scikit-image when it is installed, else ``tests/fixtures/*.jpg`` and
``data/sample/coco``, resized to 640 px on the long side, JPEG quality 90, written to a temporary directory) so
decode cost is realistic: the targets are read from this table; and ``data/sample/**/*.jpg`` (small photos,
<= 400 px) as stored in a second table when present. Boxes come from a simple generator (proposal-like sizes), as
the pipeline's cost hardly depends on them.

    python bench/train_bench.py            # full run (about two minutes on an idle machine)
    python bench/train_bench.py --quick    # smoke run (3 short repeats)
"""

from __future__ import annotations

import argparse
import glob
import io
import os
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from train.augment import IMAGENET_MEAN, IMAGENET_STD, gpu_colour  # noqa: E402
from train.views import StageTimes, UniVIPTransform, ViewConfig  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAIVE = "naive torchvision BYOL"
CPU = "univip-cpu"
CPU_INST = "univip-cpu + instances"
GPU_AUG = "univip-gpu_aug (CPU part)"
GPU_AUG_INST = "univip-gpu_aug + instances (CPU part)"
GPU_DECODE = "univip-gpu_decode (CPU part)"
DECODE = "decode only (PIL, full size)"
DECODE_CV = "decode only (OpenCV, full size)"
ORDER = (NAIVE, CPU, CPU_INST, GPU_AUG, GPU_AUG_INST, GPU_DECODE, DECODE, DECODE_CV)
SHORT = {
    CPU: "cpu",
    CPU_INST: "cpu+inst",
    GPU_AUG: "gpu_aug",
    GPU_AUG_INST: "gpu_aug+inst",
    GPU_DECODE: "gpu_decode",
    DECODE: "decode PIL",
    DECODE_CV: "decode OpenCV",
}
SKIMAGE_PHOTOS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "cat",
    "colorwheel",
)


def coco_sized_images(tmp: str, long_side: int = 640) -> list[str]:
    """Real photos resized to ``long_side`` on their long side, saved as JPEG q90 in ``tmp``."""
    paths = []
    try:
        import skimage.data as data
    except ImportError:
        data = None
    sources = []
    if data is not None:
        for name in SKIMAGE_PHOTOS:
            try:
                sources.append((name, getattr(data, name)()))
            except Exception:  # an image that needs a download, or a missing name in another version
                continue
    if not sources:  # three 320 px fixtures alone would make a small, smooth set: add the sample COCO photos
        photos = sorted(glob.glob(os.path.join(ROOT, "tests", "fixtures", "*.jpg")))
        photos += sorted(glob.glob(os.path.join(ROOT, "data", "sample", "coco", "images", "*.jpg")))
        for p in photos:
            sources.append((os.path.basename(p)[:-4], np.asarray(Image.open(p).convert("RGB"))))
    for name, arr in sources:
        img = Image.fromarray(arr).convert("RGB")
        s = long_side / max(img.size)
        img = img.resize((max(1, round(img.width * s)), max(1, round(img.height * s))), Image.LANCZOS)
        path = os.path.join(tmp, f"{name}.jpg")
        img.save(path, "JPEG", quality=90)
        paths.append(path)
    return paths


def proposal_like_boxes(width: int, height: int, rng: np.random.Generator, n: int = 60) -> np.ndarray:
    """``n`` boxes with sides from 32 px to 90 % of the image side, int32 xyxy end-exclusive."""
    w = rng.integers(min(32, width), max(min(32, width) + 1, int(0.9 * width)), n)
    h = rng.integers(min(32, height), max(min(32, height) + 1, int(0.9 * height)), n)
    x0 = rng.integers(0, width - w + 1)
    y0 = rng.integers(0, height - h + 1)
    return np.stack([x0, y0, x0 + w, y0 + h], axis=1).astype(np.int32)


def load_samples(paths: list[str], seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    samples = []
    for i, p in enumerate(paths):
        with open(p, "rb") as f:
            jpg = f.read()
        img = Image.open(io.BytesIO(jpg))
        if img.format != "JPEG":
            continue
        w, h = img.size
        meta = {"key": f"s{i}", "width": w, "height": h, "boxes": proposal_like_boxes(w, h, rng)}
        samples.append({"jpg": jpg, "meta": meta, "path": p})
    return samples


def naive_pipeline():
    """Two torchvision BYOL view transforms (asymmetric blur/solarize) -> fn(jpeg bytes) -> (view1, view2)."""
    from torchvision.transforms import v2

    def view(blur_p: float, sol_p: float):
        return v2.Compose(
            [
                v2.RandomResizedCrop(224),
                v2.RandomHorizontalFlip(),
                v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                v2.RandomGrayscale(p=0.2),
                v2.RandomApply([v2.GaussianBlur(23, sigma=(0.1, 2.0))], p=blur_p),
                v2.RandomSolarize(128, p=sol_p),
                v2.ToImage(),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )

    t1, t2 = view(1.0, 0.0), view(0.1, 0.2)

    def run(jpg: bytes):
        img = Image.open(io.BytesIO(jpg)).convert("RGB")
        return t1(img), t2(img)

    return run


class LoadWatch:
    """The 1-min load average at the start and after each repeat. Busy: above half the cores at the start, or during
    the run once this process's own thread is discounted (a single-threaded benchmark adds about 1 to the load by
    itself), or risen during the run by more than that own 1 plus a quarter of the cores."""

    OWN = 1.0

    def __init__(self) -> None:
        self.cores = os.cpu_count() or 1
        self.limit = 0.5 * self.cores
        self.start = os.getloadavg()[0]
        self.seen = [self.start]

    def sample(self) -> float:
        load = os.getloadavg()[0]
        self.seen.append(load)
        return load

    def problems(self) -> list[str]:
        out = []
        if self.start > self.limit:
            out.append(
                f"1-min load {self.start:.2f} at the start, above half the {self.cores} cores ({self.limit:.1f})"
            )
        peak = max(self.seen[1:], default=self.start)
        if peak - self.OWN > self.limit:
            out.append(
                f"1-min load up to {peak:.2f} during the run ({peak - self.OWN:.2f} without this process), above "
                f"{self.limit:.1f}"
            )
        if peak - self.start > self.OWN + 0.25 * self.cores:
            out.append(f"1-min load rose from {self.start:.2f} to {peak:.2f} during the run")
        return out

    def line(self) -> str:
        return (
            f"1-min load average: {self.start:.2f} at the start, {min(self.seen):.2f}-{max(self.seen):.2f} over the "
            f"run ({self.cores} cores)"
        )


def pipelines() -> dict[str, Callable[[dict, np.random.Generator], Any]]:
    naive = naive_pipeline()
    cpu = UniVIPTransform(ViewConfig())
    inst = UniVIPTransform(ViewConfig(instance_crops=True))
    gpu = UniVIPTransform(ViewConfig(gpu_aug=True))
    gpu_inst = UniVIPTransform(ViewConfig(gpu_aug=True, instance_crops=True))
    gdec = UniVIPTransform(ViewConfig(gpu_decode=True))
    return {
        NAIVE: lambda s, r: naive(s["jpg"]),
        CPU: cpu,
        CPU_INST: inst,
        GPU_AUG: gpu,
        GPU_AUG_INST: gpu_inst,
        GPU_DECODE: gdec,
        DECODE: lambda s, r: Image.open(io.BytesIO(s["jpg"])).convert("RGB"),
        DECODE_CV: lambda s, r: cv2.imdecode(np.frombuffer(s["jpg"], np.uint8), cv2.IMREAD_COLOR_RGB),
    }


def measure_once(samples: list[dict], variants: int, rounds: int, seed: int, rotate: int) -> dict[str, float]:
    """One whole comparison: CPU ms per sample of each pipeline. Every (image, variant) item is one fixed piece of
    work (its random draws are seeded by item), run ``rounds`` times with the pipelines interleaved item by item (their
    order rotated by ``rotate``); an item's cost is its fastest round (robust to other processes' load), averaged over
    items."""
    pipes = list(pipelines().items())
    pipes = pipes[rotate % len(pipes) :] + pipes[: rotate % len(pipes)]
    items = [(i, j) for i in range(len(samples)) for j in range(variants)]
    best = {name: np.full(len(items), np.inf) for name, _ in pipes}
    fallbacks = 0
    for _, fn in pipes:  # warm-up (imports, first-call allocations)
        fn(samples[0], np.random.default_rng(0))
    for r in range(rounds):
        for n, (i, j) in enumerate(items):
            for name, fn in pipes:
                rng = np.random.default_rng([seed, i, j])
                torch.manual_seed(seed * 1_000_003 + i * 1009 + j)  # torchvision's draws
                t0 = time.process_time()
                out = fn(samples[i], rng)
                best[name][n] = min(best[name][n], time.process_time() - t0)
                if name == CPU and r == 0:
                    fallbacks += out["fallback"]
    res = {name: float(v.mean()) * 1e3 for name, v in best.items()}
    res["_fallback_rate"] = fallbacks / len(items)
    res["_n"] = len(items)
    return res


def measure(
    title: str, samples: list[dict], variants: int, rounds: int, repeats: int, seed: int, load: LoadWatch
) -> list[dict[str, float]]:
    """``repeats`` whole comparisons, each printed as it ends (with the load average then)."""
    sizes = np.array([[s["meta"]["width"], s["meta"]["height"]] for s in samples])
    kib = np.mean([len(s["jpg"]) for s in samples]) / 1024
    print(
        f"\n### {title}: {len(samples)} images, mean {sizes[:, 0].mean():.0f}x{sizes[:, 1].mean():.0f} px, {kib:.0f} "
        f"KiB; {len(samples) * variants} items (image x random draw), best of {rounds} per item, {repeats} repeats\n"
    )
    runs = []
    for k in range(repeats):
        res = measure_once(samples, variants, rounds, seed, rotate=k)
        runs.append(res)
        naive = res[NAIVE]
        cells = ", ".join(f"{SHORT[name]} {res[name]:.2f} ms ({naive / res[name]:.1f}x)" for name in ORDER[1:])
        print(f"repeat {k + 1}: naive {naive:.2f} ms; {cells}; load {load.sample():.2f}", flush=True)
    return runs


def spread(values: list[float], fmt: str) -> str:
    """median (min-max)"""
    return f"{fmt.format(float(np.median(values)))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def print_table(runs: list[dict[str, float]]) -> dict[str, float]:
    """Median (min-max) over the repeats; returns the median ratio naive / pipeline."""
    print(f"\nfallback rate (Algorithm 1): {runs[0]['_fallback_rate']:.2f}\n")
    print("| pipeline (2 views of 224 px) | CPU ms / sample: median (min-max) | samples/s per core | naive / this |")
    print("|---|---:|---:|---:|")
    ratios = {}
    for name in ORDER:
        ms = [r[name] for r in runs]
        ratio = [r[NAIVE] / r[name] for r in runs]
        ratios[name] = float(np.median(ratio))
        print(f"| {name} | {spread(ms, '{:.2f}')} | {1000 / np.median(ms):.0f} | {spread(ratio, '{:.1f}')}x |")
    return ratios


PROFILED = {
    CPU: ViewConfig(),
    CPU_INST: ViewConfig(instance_crops=True),
    GPU_AUG: ViewConfig(gpu_aug=True),
    GPU_DECODE: ViewConfig(gpu_decode=True),
}


def profile(samples: list[dict], variants: int, rounds: int, seed: int, batch: int) -> None:
    """Per-stage CPU ms per sample of each UniVIP pipeline (``train.views.StageTimes``), median over ``rounds`` of
    the mean over items; collate's share of a batch of ``batch``. Stages a sample skips (an op that does not run,
    instances without ``instance_crops``) count 0 for it, so the rows add up to the cost per sample."""
    from train.data import collate

    items = [(i, j) for i in range(len(samples)) for j in range(variants)]
    table: dict[str, dict[str, float]] = {}
    totals: dict[str, float] = {}
    factors: dict[str, dict[str, int]] = {}
    for name, cfg in PROFILED.items():
        t = UniVIPTransform(cfg)
        t(samples[0], np.random.default_rng(0))  # warm-up
        per_round: list[dict[str, float]] = []
        whole: list[float] = []
        for _ in range(rounds):
            laps = StageTimes()
            outs = []
            c0 = time.process_time()
            for i, j in items:
                out = t(samples[i], np.random.default_rng([seed, i, j]), laps)
                outs.append(dict(out, __key__=str(i), stats={}))
            whole.append(time.process_time() - c0)
            c0 = time.process_time()
            for k in range(0, len(outs) - batch + 1, batch):
                collate(outs[k : k + batch])
            n_collated = (len(outs) // batch) * batch
            if n_collated:
                laps.seconds[f"collate (batch {batch})"] = (time.process_time() - c0) * len(outs) / n_collated
            per_round.append(laps.seconds)
        stages = dict.fromkeys(s for r in per_round for s in r)
        table[name] = {st: float(np.median([r.get(st, 0.0) for r in per_round])) * 1e3 / len(items) for st in stages}
        totals[name] = float(np.median(whole)) * 1e3 / len(items)
        factors[name] = {st.rsplit(" ", 1)[1]: 0 for st in stages if st.startswith("JPEG decode")}
    stages = list(dict.fromkeys(st for col in table.values() for st in col))
    names = list(PROFILED)
    print(f"\n### Profile: CPU ms per sample by stage ({len(items)} items, median of {rounds} rounds)\n")
    print("| stage | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for st in stages:
        print(f"| {st} | " + " | ".join(f"{table[n][st]:.3f}" if st in table[n] else "" for n in names) + " |")
    print("| **sum of stages** | " + " | ".join(f"**{sum(table[n].values()):.3f}**" for n in names) + " |")
    print("| whole calls, timed outside (no collate) | " + " | ".join(f"{totals[n]:.3f}" for n in names) + " |")


def measure_augment(batch: int, reps: int, seed: int, device: str = "cpu") -> dict[int, float]:
    """ms per batch of ``gpu_colour`` on uint8 [batch, 3, 224, 224] on ``device``, per view index (CPU time on
    the CPU; wall time between synchronisations on CUDA)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (batch, 3, 224, 224), dtype=torch.uint8, generator=g).to(device)
    cuda = device.startswith("cuda")
    clock = time.perf_counter if cuda else time.process_time
    out = {}
    for view in (0, 1):
        gpu_colour(x, view, g)
        if cuda:
            torch.cuda.synchronize()
        t0 = clock()
        for _ in range(reps):
            gpu_colour(x, view, g)
        if cuda:
            torch.cuda.synchronize()
        out[view] = (clock() - t0) / reps * 1e3
    return out


def measure_decode(samples: list[dict], batch: int, reps: int, seed: int, device: str = "cuda") -> tuple[float, float]:
    """(device ms, host CPU ms) per batch of ``train.gpu_decode.decode_views`` (224 px views) on ``batch`` samples
    cycled from ``samples``, crops from the gpu_decode transform; wall time between synchronisations."""
    from train.data import collate
    from train.gpu_decode import decode_batch

    t = UniVIPTransform(ViewConfig(gpu_decode=True))
    items = [
        dict(t(samples[i % len(samples)], np.random.default_rng([seed, i])), __key__=str(i), stats={})
        for i in range(batch)
    ]
    b = collate(items)
    cuda = device.startswith("cuda")
    if cuda:
        b["jpeg"] = b["jpeg"].pin_memory()  # as the DataLoader delivers it (pin_memory=True)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    decode_batch(b, 224, device)
    sync()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(reps):
        decode_batch(b, 224, device)
    host = (time.process_time() - c0) / reps * 1e3
    sync()
    return (time.perf_counter() - t0) / reps * 1e3, host


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="few images, few draws, 3 short repeats (smoke run)")
    ap.add_argument("--repeats", type=int, default=3, help="whole comparisons (at least 3)")
    ap.add_argument("--rounds", type=int, default=None, help="repeats of each item within a comparison (5, quick 2)")
    ap.add_argument("--variants", type=int, default=None, help="random draws per image (default 8, quick 2)")
    ap.add_argument("--batch", type=int, default=32, help="batch for the train.augment timing")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gpu-batch", type=int, default=256, help="batch for the train.augment timing on CUDA, if any")
    ap.add_argument(
        "--keep-denormals",
        action="store_true",
        help="leave denormal floats on (torch's default): the naive pipeline's cost then swings with the blur's sigma",
    )
    ap.add_argument(
        "--profile", action="store_true", help="only the per-stage breakdown of the UniVIP pipelines (COCO-sized)"
    )
    args = ap.parse_args(argv)
    if args.repeats < 3:
        ap.error("--repeats must be at least 3: one comparison on a shared machine says little")
    rounds = args.rounds or (2 if args.quick else 5)
    variants = args.variants or (2 if args.quick else 8)
    load = LoadWatch()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    # The naive pipeline's float blur (torchvision's 23-tap kernel) hits denormal numbers for some draws of sigma and
    # image, and x86 computes those up to ~10x slower: its cost per item then swings by ~10x with the random draws
    # (24-230 ms here), and so does every ratio against it. Flushing them to zero makes it the steady, faster baseline
    # a careful user would get; the ratios below are therefore the conservative ones.
    flushed = not args.keep_denormals and torch.set_flush_denormal(True)

    with tempfile.TemporaryDirectory(prefix="train_bench_") as tmp:
        coco = load_samples(coco_sized_images(tmp), args.seed)
    local = load_samples(
        sorted(glob.glob(os.path.join(ROOT, "data", "sample", "**", "*.jpg"), recursive=True)), args.seed
    )
    if args.quick:
        coco, local = coco[:4], local[:4]
    if not coco:
        print("no photos found (scikit-image data, tests/fixtures or data/sample)", file=sys.stderr)
        return 1
    print(
        f"torch {torch.__version__}, OpenCV {cv2.__version__}, 1 thread; CPU time of this process; denormals "
        f"{'flushed to zero' if flushed else 'kept'}; {load.line()}"
    )
    if args.profile:
        profile(coco, variants, rounds, args.seed, args.batch)
        load.sample()
        print(load.line())
        return 0
    coco_runs = measure(
        "COCO-sized photos (640 px long side, JPEG q90)", coco, variants, rounds, args.repeats, args.seed, load
    )
    ratios = print_table(coco_runs)
    if local:
        print_table(measure("data/sample (as stored)", local, variants, rounds, args.repeats, args.seed, load))
    aug = measure_augment(args.batch, 2 if args.quick else 5, args.seed)
    print(
        f"\n`train.augment.gpu_colour` on CPU, uint8 [{args.batch}, 3, 224, 224]: "
        f"view 0 {aug[0]:.0f} ms/batch, view 1 {aug[1]:.0f} ms/batch (for the record; it is meant for the GPU)"
    )
    if torch.cuda.is_available():
        torch.set_num_threads(max(1, os.cpu_count() or 1))  # the GPU timing is not a per-core figure
        ga = measure_augment(args.gpu_batch, 20, args.seed, "cuda")
        print(
            f"`train.augment.gpu_colour` on {torch.cuda.get_device_name()}, uint8 [{args.gpu_batch}, 3, 224, 224]: "
            f"view 0 {ga[0]:.1f} ms/batch, view 1 {ga[1]:.1f} ms/batch "
            f"({args.gpu_batch * 2000 / (ga[0] + ga[1]):.0f} samples/s for both views)"
        )
        dec_ms, dec_host = measure_decode(coco, args.gpu_batch, 20, args.seed)
        print(
            f"`train.gpu_decode.decode_views` on {torch.cuda.get_device_name()}, {args.gpu_batch} COCO-sized JPEGs "
            f"-> 2 x [{args.gpu_batch}, 3, 224, 224]: {dec_ms:.1f} ms/batch ({args.gpu_batch * 1000 / dec_ms:.0f} "
            f"samples/s), host CPU {dec_host:.1f} ms/batch (launches, nvjpeg's host part)"
        )
    load.sample()
    print(
        f"\ntargets (COCO-sized, medians of {args.repeats} repeats): univip-cpu {ratios[CPU]:.1f}x the naive samples/s "
        f"(>= 8x: {'met' if ratios[CPU] >= 8 else 'NOT met'}; with the paper's instances {ratios[CPU_INST]:.1f}x); "
        f"gpu_aug CPU time {ratios[GPU_AUG]:.1f}x lower (>= 25x: {'met' if ratios[GPU_AUG] >= 25 else 'NOT met'}); "
        f"gpu_decode CPU time {ratios[GPU_DECODE]:.1f}x lower (>= 25x: {'met' if ratios[GPU_DECODE] >= 25 else 'NOT met'})"
    )
    print(load.line())
    problems = load.problems()
    if problems:
        bar = "!" * 100
        print(f"\n{bar}\nWARNING: BUSY MACHINE, these figures are not publishable:", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        print(
            "  rerun on an idle machine (the naive pipeline slows down more than the others under load)",
            file=sys.stderr,
        )
        print(bar, file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
