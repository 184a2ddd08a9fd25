"""UniVIP training-step time / BYOL step time on CPU, against the ratio of their FLOPs.

Same encoder, batch, image size and optimizer for every method; a step is the trainer's own (``train.setup.make_step``:
normalisation, forward + backward, SGD step, EMA update) on a synthetic uint8 batch in the loader's layout; the UniVIP
crop variant takes its instance crops from the batch, as the paper's ``--instance-source image`` does.
Methods are timed round-robin (one step of each in turn), so a change in machine load during the run hits all of
them alike; the figure is the median over the measured steps. FLOPs are counted with
torch.utils.flop_counter.FlopCounterMode over one forward + backward (matmuls and convolutions; BatchNorm, RoIAlign,
Sinkhorn and the optimizer are not counted, and are what a time ratio above the FLOP ratio measures).

Default (ResNet-18, batch 16, 224 px views, 96 px instance crops) takes ~2-3 minutes on 2 cores:
    python -m bench.step_bench
On a machine shared with other jobs, time CPU instead of wall-clock (one thread):
    python -m bench.step_bench --threads 1 --clock cpu
Quick check that it runs:
    python -m bench.step_bench --batch 4 --size 64 --instance-size 32 --proj-hidden 256 --steps 2 --warmup 1
Operations a step dispatches (a proxy for kernel launches on a GPU, where the small ops of the loss region cost a
launch each), instead of timing:
    python -m bench.step_bench --count-ops --batch 4 --size 64 --instance-size 32 --proj-hidden 256
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Mapping

import torch
from torch.utils.flop_counter import FlopCounterMode

from train import setup
from train.config import TrainConfig, preset
from train.model import UniVIP
from train.step import model_inputs

VARIANTS = {  # name -> TrainConfig overrides; univip-crop is the paper's (instances cut from the source image)
    "byol": dict(method="byol"),
    "univip-crop": dict(method="univip", instance_mode="crop", instance_source="image"),
    "univip-roi": dict(method="univip", instance_mode="roi"),
}


def bench_config(variant: str, **overrides) -> TrainConfig:
    """The trainer's config (coco preset: its SGD, weight decay, EMA) for one variant, with the benchmark's sizes."""
    return dataclasses.replace(preset("coco"), **VARIANTS[variant], **overrides).validate()


def synthetic_batch(cfg: TrainConfig, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch as the loader collates it, on ``device``: uint8 views [B, 3, S, S], K boxes per view [B, K, 4] (xyxy
    view pixels, sides 1/7 to 5/7 of the view) and, when the config cuts instances from the source image, uint8
    instance crops [B, K, 3, s, s]. B is the per-rank batch of one rank."""
    g = torch.Generator(device=device).manual_seed(seed)
    b, s, k, i = cfg.per_rank_batch(1), cfg.image_size, cfg.k, cfg.instance_size
    out = {
        f"view{v}": torch.randint(0, 256, (b, 3, s, s), generator=g, device=device, dtype=torch.uint8) for v in (1, 2)
    }
    for v in (1, 2):
        wh = s * (1 + 4 * torch.rand(b, k, 2, generator=g, device=device)) / 7
        xy = (s - wh) * torch.rand(b, k, 2, generator=g, device=device)
        out[f"boxes{v}"] = torch.cat([xy, xy + wh], dim=-1)
    if cfg.instance_crops:
        for v in (1, 2):
            out[f"inst{v}"] = torch.randint(0, 256, (b, k, 3, i, i), generator=g, device=device, dtype=torch.uint8)
    return out


def step_flops(model: UniVIP, inputs: Mapping[str, torch.Tensor | None]) -> int:
    """FLOPs of one forward + backward on ``model_inputs`` (matmul/conv only, as FlopCounterMode counts them)."""
    with FlopCounterMode(display=False) as counter:
        model(**inputs)["total"].backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def count_ops(step, batch: dict, cfg: TrainConfig) -> int:
    """aten operations dispatched by one step (after a first one: optimizer state, cached constants), a proxy for
    kernel launches on a GPU (composite ops such as logsumexp count once here and launch several kernels there)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    step(batch, 0, lr=cfg.peak_lr, tau=cfg.ema_base)
    with Count():
        step(batch, 1, lr=cfg.peak_lr, tau=cfg.ema_base)
    return Count.n


def run(args: argparse.Namespace) -> list[dict]:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    names = [n for n in VARIANTS if n == "byol" or n.split("-")[1] in args.modes]
    steps, flops = {}, {}
    for name in names:
        cfg = bench_config(
            name,
            arch=args.arch,
            proj_hidden=args.proj_hidden,
            pred_hidden=args.proj_hidden,
            k=args.k,
            image_size=args.size,
            instance_size=args.instance_size,
            batch_size=args.batch,
            device="cpu",
        )
        model = setup.build_model(cfg, device)  # seeded: the same initial encoder for every method
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        batch = synthetic_batch(cfg, device)
        flops[name] = step_flops(model, model_inputs(batch, setup.view_config(cfg), device))
        step = setup.make_step(cfg, device, model, setup.build_optimizer(model, cfg))
        steps[name] = (step, batch, cfg)
    if args.count_ops:
        return [dict(method=name, ops=count_ops(*steps[name])) for name in names]
    # CPU time of this process is immune to other processes' load on a shared machine, but it also counts the
    # spinning of idle OpenMP threads, so it is only meaningful with --threads 1.
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    times = {name: [] for name in names}
    for i in range(args.warmup + args.steps):
        for name, (step, batch, cfg) in steps.items():
            start = clock()
            step(batch, i, lr=cfg.peak_lr, tau=cfg.ema_base)
            if i >= args.warmup:
                times[name].append(clock() - start)
    base_t, base_f = statistics.median(times["byol"]), flops["byol"]
    rows = []
    for name in names:
        t = statistics.median(times[name])
        rows.append(
            dict(
                method=name,
                ms=1000 * t,
                gflops=flops[name] / 1e9,
                time_ratio=t / base_t,
                flop_ratio=flops[name] / base_f,
            )
        )
    return rows


def format_table(rows: list[dict], args: argparse.Namespace) -> str:
    head = (
        f"{args.arch}, batch {args.batch}, {args.size} px views, {args.instance_size} px crops, K={args.k}, "
        f"{torch.get_num_threads()} threads, {args.clock} clock, "
        f"median of {args.steps} steps after {args.warmup} warm-up\n\n"
    )
    lines = [
        "| method | step ms | GFLOP/step (fwd+bwd) | time ratio | FLOP ratio | time/FLOP ratio - 1 |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        dev = r["time_ratio"] / r["flop_ratio"] - 1
        lines.append(
            f"| {r['method']} | {r['ms']:.0f} | {r['gflops']:.1f} | {r['time_ratio']:.2f} | "
            f"{r['flop_ratio']:.2f} | {100 * dev:+.1f} % |"
        )
    return head + "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="resnet18", help="resnet18 (default, quick) or resnet50")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=224, help="view side in pixels")
    ap.add_argument("--instance-size", type=int, default=96, help="instance crop side ('crop' mode)")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--proj-hidden", type=int, default=4096, help="projector/predictor hidden width")
    ap.add_argument("--modes", default="crop,roi", help="UniVIP instance modes to compare with BYOL")
    ap.add_argument("--steps", type=int, default=5, help="measured steps per method")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="wall: elapsed time; cpu: this process's CPU time (use with --threads 1 on a busy machine)",
    )
    ap.add_argument(
        "--count-ops",
        action="store_true",
        help="instead of timing: count the aten operations of one step per method (a proxy for GPU kernel launches)",
    )
    args = ap.parse_args(argv)
    if args.clock == "cpu" and args.threads != 1:
        ap.error("--clock cpu needs --threads 1: with more threads CPU time includes idle threads spinning")
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if args.count_ops:
        rows = run(args)
        print(f"{args.arch}, batch {args.batch}; aten operations dispatched by one step (after a first one)\n")
        print("| method | aten ops / step | ÷ BYOL |\n|---|---:|---:|")
        for r in rows:
            print(f"| {r['method']} | {r['ops']} | {r['ops'] / rows[0]['ops']:.2f} |")
        return
    print(format_table(run(args), args))


if __name__ == "__main__":
    main()
