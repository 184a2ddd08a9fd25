"""Input-pipeline benchmark (issue #3 item 7, first bullet): CPU cost per sample of the UniVIP view pipeline against a
naive torchvision BYOL pipeline on the same images, in the same process, one thread.

Pipelines, each producing the two 224 px views of one sample from its JPEG bytes:
- ``naive``: PIL decode, then per view torchvision.transforms.v2 RandomResizedCrop(224), RandomHorizontalFlip,
  ColorJitter(0.4, 0.4, 0.2, 0.1) p 0.8, RandomGrayscale 0.2, GaussianBlur(23, (0.1, 2.0)) p 1.0 / 0.1,
  RandomSolarize(128) p 0 / 0.2, ToImage + ToDtype + Normalize (the usual BYOL recipe; no boxes).
- ``univip-cpu``: ``train.views.UniVIPTransform`` (metadata, Algorithm 1, K boxes, decode, crops, CPU colour ops).
- ``univip-gpu_aug``: the same with ``gpu_aug=True``: the CPU decodes, crops and flips; colour ops are left to
  ``train.augment.gpu_colour`` (its CPU time per batch is reported for the record, not counted).
- ``univip-gpu_decode``: ``gpu_decode=True``: the CPU reads the JPEG header and runs Algorithm 1 and the flips, and
  hands over the bytes as a tensor; ``train.gpu_decode.decode_views`` decodes, crops and resizes on the GPU (its GPU
  time per batch is reported when CUDA is available, not counted).
- ``decode only``: PIL full decode, the floor every pipeline pays.
Pipelines run interleaved item by item so that load from other processes hits them alike; the figure is CPU time
(``time.process_time``) of this single-threaded process, best of a few rounds per item (the same random draws each
round), so samples/s per core = 1000 / (ms per sample). On a shared machine the naive pipeline's large convolution
slows down more than the rest under load (its CPU time here varied 30-100 ms per sample between busy runs), so
publish figures from an otherwise idle machine.

Images: COCO-sized photos (the photos bundled with scikit-image, resized to 640 px on the long side, JPEG quality 90,
written to a temporary directory) so decode cost is realistic: the targets are read from this table; and
``data/sample/**/*.jpg`` (small photos, <= 400 px) in a second table when present. Boxes come
from a simple generator (proposal-like sizes), as the pipeline's cost hardly depends on them.

    python bench/train_bench.py            # full run (about a minute on an idle machine)
    python bench/train_bench.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import glob
import io
import os
import sys
import tempfile
import time

import cv2
import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from train.augment import IMAGENET_MEAN, IMAGENET_STD, gpu_colour  # noqa: E402
from train.views import UniVIPTransform, ViewConfig  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
    if not sources:
        for p in sorted(glob.glob(os.path.join(ROOT, "tests", "fixtures", "*.jpg"))):
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


def measure(samples: list[dict], variants: int, rounds: int, seed: int) -> dict[str, float]:
    """CPU ms per sample of each pipeline: every (image, variant) item is one fixed piece of work (its random draws
    are seeded by item), repeated ``rounds`` times with the pipelines interleaved; an item's cost is its fastest
    round (the usual microbenchmark estimate, robust to other processes' load), averaged over items."""
    naive = naive_pipeline()
    cpu = UniVIPTransform(ViewConfig())
    gpu = UniVIPTransform(ViewConfig(gpu_aug=True))
    gdec = UniVIPTransform(ViewConfig(gpu_decode=True))
    pipes = {
        "naive torchvision BYOL": lambda s, r: naive(s["jpg"]),
        "univip-cpu": lambda s, r: cpu(s, r),
        "univip-gpu_aug (CPU part)": lambda s, r: gpu(s, r),
        "univip-gpu_decode (CPU part)": lambda s, r: gdec(s, r),
        "decode only (PIL, full size)": lambda s, r: Image.open(io.BytesIO(s["jpg"])).convert("RGB"),
    }
    items = [(i, j) for i in range(len(samples)) for j in range(variants)]
    best = {name: np.full(len(items), np.inf) for name in pipes}
    fallbacks = 0
    for fn in pipes.values():  # warm-up (imports, first-call allocations)
        fn(samples[0], np.random.default_rng(0))
    for r in range(rounds):
        for n, (i, j) in enumerate(items):
            for name, fn in pipes.items():
                rng = np.random.default_rng([seed, i, j])
                torch.manual_seed(seed * 1_000_003 + i * 1009 + j)  # torchvision's draws
                t0 = time.process_time()
                out = fn(samples[i], rng)
                best[name][n] = min(best[name][n], time.process_time() - t0)
                if name == "univip-cpu" and r == 0:
                    fallbacks += out["fallback"]
    res = {name: float(v.mean()) * 1e3 for name, v in best.items()}
    res["_fallback_rate"] = fallbacks / len(items)
    res["_n"] = len(items)
    return res


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


def print_table(title: str, samples: list[dict], res: dict[str, float]) -> None:
    sizes = np.array([[s["meta"]["width"], s["meta"]["height"]] for s in samples])
    kib = np.mean([len(s["jpg"]) for s in samples]) / 1024
    print(
        f"\n### {title}: {len(samples)} images, mean {sizes[:, 0].mean():.0f}x{sizes[:, 1].mean():.0f} px, "
        f"{kib:.0f} KiB; {res['_n']} items (image x random draw); fallback rate {res['_fallback_rate']:.2f}\n"
    )
    naive = res["naive torchvision BYOL"]
    print("| pipeline (2 views of 224 px) | CPU ms / sample | samples/s per core | naive / this |")
    print("|---|---:|---:|---:|")
    for name in (
        "naive torchvision BYOL",
        "univip-cpu",
        "univip-gpu_aug (CPU part)",
        "univip-gpu_decode (CPU part)",
        "decode only (PIL, full size)",
    ):
        ms = res[name]
        print(f"| {name} | {ms:.2f} | {1000 / ms:.0f} | {naive / ms:.1f}x |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="few images and one round (smoke run)")
    ap.add_argument("--rounds", type=int, default=None, help="repeats of each item (default 5, quick 2)")
    ap.add_argument("--variants", type=int, default=None, help="random draws per image (default 8, quick 2)")
    ap.add_argument("--batch", type=int, default=32, help="batch for the train.augment timing")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gpu-batch", type=int, default=256, help="batch for the train.augment timing on CUDA, if any")
    args = ap.parse_args(argv)
    rounds = args.rounds or (2 if args.quick else 5)
    variants = args.variants or (2 if args.quick else 8)
    torch.set_num_threads(1)
    cv2.setNumThreads(1)

    with tempfile.TemporaryDirectory(prefix="train_bench_") as tmp:
        coco = load_samples(coco_sized_images(tmp), args.seed)
    local = load_samples(
        sorted(glob.glob(os.path.join(ROOT, "data", "sample", "**", "*.jpg"), recursive=True)), args.seed
    )
    if args.quick:
        coco, local = coco[:4], local[:4]
    if not coco:
        print("no photos found (scikit-image data or tests/fixtures)", file=sys.stderr)
        return 1
    print(f"torch {torch.__version__}, 1 thread; CPU time of this process, best of {rounds} round(s) per item")
    res = measure(coco, variants, rounds, args.seed)
    print_table("COCO-sized photos (640 px long side, JPEG q90)", coco, res)
    if local:
        print_table("data/sample (as stored)", local, measure(local, variants, rounds, args.seed))
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
    naive = res["naive torchvision BYOL"]
    cpu_ratio, gpu_ratio = naive / res["univip-cpu"], naive / res["univip-gpu_aug (CPU part)"]
    dec_ratio = naive / res["univip-gpu_decode (CPU part)"]
    print(
        f"\ntargets (COCO-sized): univip-cpu {cpu_ratio:.1f}x the naive samples/s (>= 8x: "
        f"{'met' if cpu_ratio >= 8 else 'NOT met'}); gpu_aug CPU time {gpu_ratio:.1f}x lower (>= 25x: "
        f"{'met' if gpu_ratio >= 25 else 'NOT met'}); gpu_decode CPU time {dec_ratio:.1f}x lower (>= 25x: "
        f"{'met' if dec_ratio >= 25 else 'NOT met'})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
