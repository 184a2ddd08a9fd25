"""The GPU colour augmentation (``--gpu-aug``): ``train.augment.gpu_colour`` eager against its torch.compile'd form
(``--compile``), side by side in one process, on the CPU or a CUDA device.

A batch of uint8 224 px views and, separately, of 96 px instance crops (K = 4 per view), the parameters drawn per
call from one seeded CPU generator, as the trainer does. The two forms alternate, ``--iters`` calls each per round,
for ``--repeats`` rounds (3 at least): each round's ratio is printed, then the median and the spread. The first
compiled call (compilation, printed) is not timed; both forms are first run on the same parameters and their largest
difference printed (exit status 1 above 1e-4). CPU: CPU time of this process; CUDA: wall time between
synchronisations.

    python bench/colour_bench.py                           # CPU, batch 32
    python bench/colour_bench.py --device cuda --batch 256
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from train.augment import gpu_colour, sample_params  # noqa: E402
from train.views import ViewConfig  # noqa: E402


def timed(x: torch.Tensor, compiled: bool, iters: int, g: torch.Generator, cfg: ViewConfig) -> float:
    """ms per call, both view indices alternating (view 0 blurs every sample, view 1 a tenth)."""
    cuda = x.device.type == "cuda"
    clock = time.perf_counter if cuda else time.process_time
    if cuda:
        torch.cuda.synchronize()
    start = clock()
    for i in range(iters):
        gpu_colour(x, i % 2, g, cfg, compiled=compiled)
    if cuda:
        torch.cuda.synchronize()
    return (clock() - start) / iters * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=32, help="views per call (instances: 4 per view)")
    ap.add_argument("--iters", type=int, default=0, help="calls per round and form (default: 4 on CPU, 40 on CUDA)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    if args.repeats < 3:
        ap.error("--repeats must be at least 3: a ratio needs its spread")
    device = torch.device(args.device)
    iters = args.iters or (40 if device.type == "cuda" else 4)
    iters += iters % 2  # both view indices equally often
    cfg, g = ViewConfig(), torch.Generator().manual_seed(0)
    inputs = {
        "views 224 px": torch.randint(0, 256, (args.batch, 3, 224, 224), dtype=torch.uint8, generator=g),
        "instances 96 px": torch.randint(0, 256, (4 * args.batch, 3, 96, 96), dtype=torch.uint8, generator=g),
    }
    print(f"{device} ({torch.get_num_threads()} threads), torch {torch.__version__}, batch {args.batch}")
    status = 0
    for name, x in inputs.items():
        x = x.to(device)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)  # as the loader's pinned batches arrive
        for compiled in (False, True):  # warm-up; the first compiled calls compile (both view indices, same graphs)
            start = time.perf_counter()
            timed(x, compiled, 2, g, cfg)
            if compiled:
                print(
                    f"{name} [{x.shape[0]}, 3, {x.shape[2]}, {x.shape[3]}]: first compiled calls "
                    f"{time.perf_counter() - start:.1f} s (compilation)"
                )
        worst = 0.0
        for view in (0, 1):  # the same parameters through both forms: the numbers must agree
            params = sample_params(x.shape[0], view, g, cfg)
            a = gpu_colour(x, view, cfg=cfg, params=params)
            b = gpu_colour(x, view, cfg=cfg, params=params, compiled=True)
            worst = max(worst, float((a - b).abs().max()))
        print(f"  max |compiled - eager| over both views: {worst:.2e} (normalised units)")
        if worst > 1e-4:
            print("  MISMATCH: the compiled colour augmentation differs from the eager one", file=sys.stderr)
            status = 1
        eager, comp, ratios = [], [], []
        for r in range(args.repeats):
            eager.append(timed(x, False, iters, g, cfg))
            comp.append(timed(x, True, iters, g, cfg))
            ratios.append(eager[-1] / comp[-1])
            print(f"  round {r + 1}: eager {eager[-1]:.2f} ms, compiled {comp[-1]:.2f} ms, {ratios[-1]:.2f}x")
        print(
            f"  median: eager {statistics.median(eager):.2f} ms ({min(eager):.2f}-{max(eager):.2f}), compiled "
            f"{statistics.median(comp):.2f} ms ({min(comp):.2f}-{max(comp):.2f}), "
            f"{statistics.median(ratios):.2f}x faster ({min(ratios):.2f}-{max(ratios):.2f})"
        )
    return status


if __name__ == "__main__":
    sys.exit(main())
