"""RoIAlign's mean over bins (``--instance-mode roi``): torchvision's kernel then ``.mean((2, 3))`` against
``train.roi.roi_mean`` (one bmm), forward + backward, side by side in one process.

The shapes are the trainer's: the encoder's last feature map [B, C, 7, 7] of 224 px views (ResNet-50: C = 2048,
ResNet-18: 512), K boxes per view, 7 x 7 bins of 2 x 2 samples. The two are timed alternately, ``--iters`` calls
each per round (3 on CPU, where torchvision's call takes seconds; 50 on CUDA), for ``--repeats`` rounds (3 at least); each round's ratio is printed, then the median and the spread.
On CUDA each call is timed with events after a synchronisation.

    python bench/roi_bench.py                     # CPU, ResNet-50 shapes, batch 64
    python bench/roi_bench.py --device cuda --batch 512
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from torchvision.ops import roi_align

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from train.model import boxes_to_rois  # noqa: E402
from train.roi import roi_mean  # noqa: E402


def torchvision_mean(fmap: torch.Tensor, boxes: torch.Tensor, scale: float, bins: int, sr: int) -> torch.Tensor:
    b, k, _ = boxes.shape
    rois = boxes_to_rois(boxes.to(fmap.dtype))
    pooled = roi_align(fmap, rois, output_size=bins, spatial_scale=scale, sampling_ratio=sr, aligned=True)
    return pooled.mean(dim=(2, 3)).reshape(b, k, -1)


def timed(fn, fmap: torch.Tensor, boxes: torch.Tensor, iters: int) -> float:
    """Seconds per forward + backward call."""
    scale = fmap.shape[-1] / 224
    grad = torch.randn(boxes.shape[0], boxes.shape[1], fmap.shape[1], device=fmap.device, dtype=fmap.dtype)
    cuda = fmap.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fmap.grad = None
        fn(fmap, boxes, scale, 7, 2).backward(grad)
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=64, help="views per call (per-rank batch)")
    ap.add_argument("--channels", type=int, default=2048, help="feature channels (ResNet-50: 2048)")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--iters", type=int, default=0, help="calls per round (default: 3 on CPU, 50 on CUDA)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    args = ap.parse_args(argv)
    if args.repeats < 3:
        ap.error("--repeats must be at least 3: a ratio needs its spread")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    iters = args.iters or (50 if device.type == "cuda" else 3)
    g = torch.Generator().manual_seed(0)
    fmap = torch.randn(args.batch, args.channels, 7, 7, generator=g).to(device, dtype)
    if device.type == "cuda":  # the trainer's memory format: channels_last on GPU, contiguous on CPU
        fmap = fmap.contiguous(memory_format=torch.channels_last)
    fmap.requires_grad_(True)
    wh = 224 * (1 + 4 * torch.rand(args.batch, args.k, 2, generator=g)) / 7
    xy = (224 - wh) * torch.rand(args.batch, args.k, 2, generator=g)
    boxes = torch.cat([xy, xy + wh], dim=-1).to(device)
    for fn in (torchvision_mean, roi_mean):  # warm-up (allocator, kernels)
        timed(fn, fmap, boxes, 1)
    print(
        f"{device} ({torch.get_num_threads()} threads), {args.dtype}, {'channels_last' if device.type == 'cuda' else 'contiguous'} fmap [{args.batch}, {args.channels}, 7, 7], "
        f"K={args.k}, 7 x 7 bins x 2 x 2 samples; ms per forward + backward"
    )
    ratios, old, new = [], [], []
    for r in range(args.repeats):
        t_old, t_new = timed(torchvision_mean, fmap, boxes, iters), timed(roi_mean, fmap, boxes, iters)
        old.append(1e3 * t_old)
        new.append(1e3 * t_new)
        ratios.append(t_old / t_new)
        print(
            f"round {r + 1}: torchvision roi_align + mean {old[-1]:.3f} ms, roi_mean {new[-1]:.3f} ms, {ratios[-1]:.1f}x"
        )
    print(
        f"median: torchvision {statistics.median(old):.3f} ms ({min(old):.3f}-{max(old):.3f}), roi_mean "
        f"{statistics.median(new):.3f} ms ({min(new):.3f}-{max(new):.3f}), {statistics.median(ratios):.1f}x faster "
        f"({min(ratios):.1f}-{max(ratios):.1f})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
