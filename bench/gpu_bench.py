"""GPU training-step benchmark (issue #3 item 7, `bench/gpu.sh`): UniVIP / BYOL images/s and model FLOP utilisation.

A step is what the training loop does per batch: GPU colour augmentation of both views (``train.augment.gpu_colour``,
per-sample parameters drawn on a CPU generator, as the loop does), forward under bf16 autocast with a channels_last
model, backward, SGD step, EMA update of the target (``update_target``). "images/s" counts source images (samples):
each gives two views of ``--image-size`` px and, in crop mode, 2*K instance crops of ``--instance-size`` px.

Measured, for each variant (``byol``, ``univip-crop`` = the paper's, ``univip-roi``):
1. synthetic input: random uint8 views already on the device and random valid boxes; ``--steps`` steps after
   ``--warmup``, timed with CUDA events around the whole run (no per-step synchronisation);
2. the real loader (``--data``, variants of ``--loader-variants``): ``train.data.make_loader`` over the shards with
   ``UniVIPTransform(gpu_aug=True)`` in ``--workers`` CPU workers, pinned memory, non_blocking copies. A few demo
   samples are repeated (symlinked shard copies listed in a temporary manifest) so that one epoch covers the run.
   "data wait" is the time the GPU sat idle between steps because the next batch was not there yet: CUDA events
   recorded just before and just after ``next(loader)`` give the gap on the GPU's own timeline (the CPU time spent
   blocked in ``next()`` is reported too, as the loop logs it). The loader alone (no model) is timed afterwards;
   with ``--gpu-decode`` (default on) the same again, last, with ``gpu_decode=True``: the workers send JPEG bytes and
   crops, ``train.gpu_decode.decode_batch`` makes the views on the GPU inside the step (as ``--gpu-decode`` trains);
   ``decode_views`` alone is timed too, and its views are compared with the CPU path's for the same random draws
   (mean |difference| in levels: nvjpeg is not libjpeg-turbo). A failure there is reported and stops nothing else;
3. FLOPs of one forward + backward, counted by ``torch.utils.flop_counter.FlopCounterMode`` (matmuls and
   convolutions; BatchNorm, RoIAlign, Sinkhorn's elementwise ops, the augmentation and the optimizer are not
   counted) at the benchmark batch, and MFU = FLOPs / step time / ``--peak-tflops`` (989 = H100 SXM / H200 dense
   bf16; an H100 PCIe is 756).

Everything runs within ``--budget-s`` seconds (phases that would start later are skipped and listed), prints a
markdown table and writes JSON to ``--json`` (default ``$OUT/gpu_bench.json`` when ``$OUT`` is set).

    bench/gpu.sh --data demo_out/shards                                     # on the GPU machine
    python bench/gpu_bench.py --device cpu --arch resnet18 --batch 4 --steps 2 --image-size 64 --instance-size 32
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import itertools
import json
import math
import os
import platform
import sys
import tempfile
import time
import types

import numpy as np
import torch
import torchvision

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def _guard_cv2() -> str | None:
    """``train.views`` imports OpenCV at module level for its CPU colour ops, which ``gpu_aug=True`` never calls.
    On a machine without OpenCV put a placeholder module in its place that fails when actually used, so the GPU
    path still imports. Returns the OpenCV version, or None when the placeholder was installed."""
    try:
        import cv2

        return cv2.__version__
    except ImportError:
        pass

    class _Missing(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            raise ImportError(
                f"cv2.{name}: OpenCV is not installed here; bench/gpu_bench.py only supports gpu_aug views without it"
            )

    sys.modules["cv2"] = _Missing("cv2")
    return None


CV2_VERSION = _guard_cv2()

from bench.step_bench import VARIANTS, bench_config, step_flops, synthetic_batch  # noqa: E402
from shards import reader, schema, storage  # noqa: E402
from train import data, setup  # noqa: E402
from train.step import model_inputs, step_generator  # noqa: E402
from train.views import UniVIPTransform, ViewConfig  # noqa: E402

PREFETCH = 2  # batches in flight per DataLoader worker (train.data.make_loader's prefetch_factor)


# --- helpers -------------------------------------------------------------------------------------------------------
class Budget:
    """Wall-clock budget of the whole run: phases check ``left()`` before starting and loops stop at ``deadline``."""

    def __init__(self, seconds: float):
        self.t0 = time.perf_counter()
        self.seconds = seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.seconds - self.elapsed()


class Clock:
    """Elapsed seconds of device work: CUDA events on a GPU (after synchronising on the end event), else wall time."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def start(self) -> None:
        if self.cuda:
            self.e0 = torch.cuda.Event(enable_timing=True)
            self.e0.record()
        else:
            self.t0 = time.perf_counter()

    def stop(self) -> float:
        if self.cuda:
            e1 = torch.cuda.Event(enable_timing=True)
            e1.record()
            e1.synchronize()
            return self.e0.elapsed_time(e1) / 1000
        return time.perf_counter() - self.t0


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_info(device: torch.device) -> dict:
    info = {
        "device": str(device),
        "name": (
            torch.cuda.get_device_name(device)
            if device.type == "cuda"
            else f"CPU ({platform.processor() or platform.machine()})"
        ),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "opencv": CV2_VERSION,
        "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            capability=f"{props.major}.{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1),
            sms=props.multi_processor_count,
        )
    return info


class Setup:
    """One variant's run parts as the trainer builds them (``train.setup``: model, optimizer, step function) from a
    ``TrainConfig`` holding the benchmark's sizes; ``step`` is the trainer's own step."""

    def __init__(self, name: str, args: argparse.Namespace, device: torch.device, vcfg: ViewConfig):
        self.name, self.device = name, device
        self.cfg = bench_config(
            name,
            arch=args.arch,
            proj_hidden=args.proj_hidden,
            pred_hidden=args.proj_hidden,
            k=args.k,
            image_size=args.image_size,
            instance_size=args.instance_size,
            batch_size=args.batch,
            gpu_aug=True,
            gpu_decode=vcfg.gpu_decode,
            amp=args.amp,
            channels_last=args.channels_last,
            seed=args.seed,
            device=device.type,
        )
        self.vcfg = setup.view_config(self.cfg)
        self.model = setup.build_model(self.cfg, device)  # seeded: the same initial encoder for every variant
        self.opt = setup.build_optimizer(self.model, self.cfg)
        self.run_step = setup.make_step(self.cfg, device, self.model, self.opt)
        torch.backends.cudnn.benchmark = device.type == "cuda" and args.cudnn_benchmark
        self.it = 0
        self.compiled = False

    def batch(self) -> dict[str, torch.Tensor]:
        """A synthetic batch in the loader's layout, on the device."""
        return synthetic_batch(dataclasses.replace(self.cfg, gpu_decode=False), self.device, self.cfg.seed)

    def inputs(self, batch: dict) -> dict:
        """The step's input stage alone (GPU colour augmentation of views and instances)."""
        return model_inputs(batch, self.vcfg, self.device, step_generator(self.cfg.seed, self.it, 0))

    def compile(self) -> None:
        """torch.compile the encoders (online and target); roi mode's feature_map path is compiled separately."""
        for branch in (self.model.online, self.model.target):
            enc = branch.encoder
            enc.net.compile(dynamic=False)  # one static graph per input size (views, instance crops)
            enc.feature_map = torch.compile(enc.feature_map, dynamic=False)
        self.compiled = True

    def flops(self, batch: dict) -> int:
        """Model FLOPs of one forward + backward (the input stage not counted)."""
        with setup.autocast(self.cfg, self.device)():
            n = step_flops(self.model, self.inputs(batch))
        self.opt.zero_grad(set_to_none=True)
        return n

    def step(self, batch: dict) -> torch.Tensor:
        """One training step; returns the loss tensor (no synchronisation)."""
        out = self.run_step(batch, self.it, lr=self.cfg.peak_lr, tau=self.cfg.ema_base)
        self.it += 1
        return out["total"]

    def close(self) -> None:
        del self.model, self.opt, self.run_step
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def peak_memory_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def timed_steps(run_step, n: int, deadline: float) -> int:
    """Run up to ``n`` steps, stopping early (at >= 1 step) once ``time.perf_counter()`` passes ``deadline``."""
    done = 0
    while done < n:
        run_step()
        done += 1
        if time.perf_counter() > deadline:
            break
    return done


def derived(row: dict, args: argparse.Namespace, device: torch.device) -> dict:
    """Add images/s, TFLOP/s and MFU to a row holding ``step_s`` and ``flops``."""
    row["images_per_s"] = args.batch / row["step_s"]
    row["step_ms"] = 1000 * row["step_s"]
    if row.get("flops"):
        row["gflop_per_step"] = row["flops"] / 1e9
        row["tflops"] = row["flops"] / row["step_s"] / 1e12
        row["mfu"] = row["tflops"] / args.peak_tflops if device.type == "cuda" else None
    return row


# --- phase 1: synthetic input --------------------------------------------------------------------------------------
def bench_synthetic(name: str, args, device, vcfg, deadline: float) -> dict:
    bench = Setup(name, args, device, vcfg)
    try:
        batch = bench.batch()
        reset_memory(device)
        flops = bench.flops(batch)
        if args.compile:
            bench.compile()
        t0 = time.perf_counter()
        timed_steps(lambda: bench.step(batch), args.warmup, deadline)
        sync(device)
        warm_s = time.perf_counter() - t0
        clock = Clock(device)
        clock.start()
        steps = timed_steps(lambda: bench.step(batch), args.steps, deadline)
        step_s = clock.stop() / steps
        # the input stage alone (colour augmentation of views and instances), for the record (it is inside step_s)
        n_aug = max(1, min(10, args.steps))
        clock.start()
        for _ in range(n_aug):
            bench.inputs(batch)
        aug_s = clock.stop() / n_aug
        row = dict(
            variant=name + ("+compile" if args.compile else ""),
            input="synthetic",
            steps=steps,
            warmup_s=round(warm_s, 2),
            step_s=step_s,
            aug_ms=1000 * aug_s,
            flops=flops,
            peak_mem_gib=peak_memory_gib(device),
            data_wait=None,
        )
        return derived(row, args, device)
    finally:
        bench.close()


# --- phase 2: the real loader --------------------------------------------------------------------------------------
def find_shards(spec: str) -> tuple[list[str], dict[str, int]]:
    """(tar URLs, samples per URL) of a shard spec; raises FileNotFoundError naming the spec when it has none."""
    try:
        urls = reader.expand_spec(spec)
    except Exception as e:  # SpecError and OS errors alike: the caller falls back to synthetic only
        raise FileNotFoundError(f"no shards at {spec!r}: {e}") from e
    sizes = reader.shard_sizes(spec) or data.count_samples(urls)
    if not sum(sizes.get(u, 0) for u in urls):
        raise FileNotFoundError(f"no samples in the shards at {spec!r}")
    return urls, {u: sizes[u] for u in urls}


def repeated_manifest(urls: list[str], sizes: dict[str, int], min_samples: int, min_shards: int, tmp: str) -> str:
    """A manifest in ``tmp`` listing symlinked copies of the local shards, enough for ``min_samples`` samples and at
    least ``min_shards`` shards (so every loader slot gets whole shards). Returns the manifest path."""
    unique = sum(sizes.values())
    copies = max(math.ceil(min_samples / unique), math.ceil(min_shards / len(urls)), 1)
    entries = []
    for c in range(copies):
        for u in urls:
            if storage.scheme(u) != "file":
                raise ValueError(f"{storage.redact(u)}: the loader benchmark repeats local shards only")
            name = f"r{c:05d}-{os.path.basename(storage.local_path(u))}"
            os.symlink(os.path.abspath(storage.local_path(u)), os.path.join(tmp, name))
            entries.append({"tar": name, "samples": sizes[u]})
    path = os.path.join(tmp, schema.MANIFEST_NAME)
    with open(path, "w") as f:
        json.dump({"format_version": schema.FORMAT_VERSION, "shards": entries}, f)
    return path


def source_megapixels(urls: list[str], limit: int = 64) -> float:
    """Mean size of the stored images (metadata of the first ``limit`` samples), in megapixels."""
    px = []
    for u in urls:
        for s in reader.read_shard(u):
            meta = reader.decode(s)["meta"]
            px.append(int(meta["width"]) * int(meta["height"]))
            if len(px) >= limit:
                return float(np.mean(px)) / 1e6
    return float(np.mean(px)) / 1e6 if px else float("nan")


def shm_workers(workers: int, batch_bytes: int) -> tuple[int, str | None]:
    """Workers whose queued batches fit in /dev/shm (DataLoader workers hand batches over through it; containers
    often mount a small one, and running out kills a worker with a bus error). -> (workers, note or None)."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return workers, None
    free = st.f_bavail * st.f_frsize
    fit = int(free // (batch_bytes * 1.5)) // PREFETCH - 1  # 1.5: headroom for the pinning thread and the rest
    if fit >= workers:
        return workers, None
    fit = max(1, fit)
    return fit, (
        f"/dev/shm has {free / 2**30:.2f} GiB free, too little for {workers} workers x {PREFETCH} batches of "
        f"{batch_bytes / 2**20:.0f} MiB: using {fit} worker(s)"
    )


def decode_check(urls: list[str], args, device, n: int = 32) -> float:
    """Mean |view level difference| between ``decode_views`` on ``device`` and the CPU path (full-size decode) for
    the same random draws, over both views of the first ``n`` samples."""
    from train.gpu_decode import decode_batch

    samples = []
    for u in urls:
        samples += [reader.decode(s) for s in itertools.islice(reader.read_shard(u), n - len(samples))]
        if len(samples) >= n:
            break
    geo = dict(size=args.image_size, k=args.k)
    cpu = UniVIPTransform(ViewConfig(gpu_aug=True, draft=False, **geo))
    dev = UniVIPTransform(ViewConfig(gpu_decode=True, **geo))
    ref = [cpu(s, np.random.default_rng([args.seed, i])) for i, s in enumerate(samples)]
    batch = data.collate(
        [dict(dev(s, np.random.default_rng([args.seed, i])), __key__=str(i), stats={}) for i, s in enumerate(samples)]
    )
    d = decode_batch(batch, args.image_size, device)
    views = (d["view1"], d["view2"])
    diffs = [
        (v.cpu().int() - torch.stack([r[f"view{j + 1}"] for r in ref]).int()).abs().float().mean()
        for j, v in enumerate(views)
    ]
    return float(sum(diffs) / 2)


def bench_loader(
    name: str, args, device, vcfg, urls, sizes, deadline: float, flops: int | None, notes: list[str]
) -> dict:
    if vcfg.gpu_decode:  # imported here: a failure of this optional path must not stop the other phases
        from train.gpu_decode import decode_batch
    # two uint8 views + two float boxes (with gpu_decode the JPEG bytes instead, usually fewer: an upper bound)
    batch_bytes = args.batch * 2 * (3 * args.image_size**2 + 4 * 4 * args.k)
    workers, note = shm_workers(args.workers, batch_bytes)
    if note:
        notes.append(note)
    warm = args.warmup + PREFETCH * max(1, workers)  # past the first fill of every worker's prefetch queue
    drain = PREFETCH * max(1, workers)
    need_batches = warm + args.steps + drain + args.steps + 2
    with tempfile.TemporaryDirectory(prefix="gpu_bench_") as tmp:
        manifest = repeated_manifest(urls, sizes, need_batches * args.batch, 4 * max(1, workers), tmp)
        bench = Setup(name, args, device, vcfg)
        transform = UniVIPTransform(bench.vcfg)  # the variant's own views and instance crops, as the trainer's
        loader, steps_per_epoch = data.make_loader(
            manifest,
            transform,
            batch_size=args.batch,
            workers=workers,
            seed=args.seed,
            shuffle_buffer=args.shuffle_buffer,
            pin_memory=device.type == "cuda",
        )
        it = iter(loader)
        counters = data.DataCounters()
        cuda = device.type == "cuda"
        gaps: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        cpu_wait = [0.0]
        measuring = [False]

        def next_batch():
            nonlocal it
            try:
                return next(it)
            except StopIteration:  # not expected (one epoch covers the run), but the loop would start the next one
                it = iter(loader)
                return next(it)

        def run_step():
            if cuda and measuring[0]:
                a = torch.cuda.Event(enable_timing=True)
                a.record()
            t0 = time.perf_counter()
            batch = next_batch()
            if measuring[0]:
                cpu_wait[0] += time.perf_counter() - t0
                counters.add(batch)
                if cuda:
                    b = torch.cuda.Event(enable_timing=True)
                    b.record()
                    gaps.append((a, b))
            bench.step(batch)  # with vcfg.gpu_decode the step decodes the views on the device

        try:
            if flops is None:
                flops = bench.flops(bench.batch())
            if args.compile:
                bench.compile()
            reset_memory(device)
            t0 = time.perf_counter()
            timed_steps(run_step, warm, deadline)
            sync(device)
            warm_s = time.perf_counter() - t0
            measuring[0] = True
            clock = Clock(device)
            clock.start()
            w0 = time.perf_counter()
            steps = timed_steps(run_step, args.steps, deadline)
            total = clock.stop()
            wall = time.perf_counter() - w0
            measuring[0] = False
            idle = sum(a.elapsed_time(b) for a, b in gaps) / 1000 if cuda else cpu_wait[0]
            row = dict(
                variant=name + ("+compile" if args.compile else ""),
                input=f"loader{' + GPU decode' if vcfg.gpu_decode else ''}, {workers} workers",
                workers=workers,
                steps=steps,
                warmup_s=round(warm_s, 2),
                step_s=total / steps,
                flops=flops,
                peak_mem_gib=peak_memory_gib(device),
                data_wait=idle / total,
                cpu_wait=cpu_wait[0] / wall,
                fallback_rate=counters.as_dict()["fallback_rate"],
                steps_per_epoch=steps_per_epoch,
            )
            bench.close()
            # the loader alone: drop what the workers queued up while the model ran, then time fresh batches
            loader_only = None
            if time.perf_counter() < deadline:
                for _ in range(drain):
                    next_batch()
                t0 = time.perf_counter()
                n = timed_steps(next_batch, args.steps, deadline)
                loader_only = n * args.batch / (time.perf_counter() - t0)
            row["loader_only_images_per_s"] = loader_only
            if vcfg.gpu_decode and time.perf_counter() < deadline:
                try:  # decode_views alone on one batch, and its views against the CPU path's
                    batch = next_batch()
                    n = max(1, min(10, args.steps))
                    clock.start()
                    for _ in range(n):
                        decode_batch(batch, args.image_size, device)
                    row["decode_ms"] = 1000 * clock.stop() / n
                    row["decode_diff"] = decode_check(urls, args, device)
                except Exception as e:  # the throughput row above is still worth keeping
                    notes.append(f"gpu_decode check failed: {type(e).__name__}: {e}")
            return derived(row, args, device)
        finally:
            if hasattr(setup, "model"):
                bench.close()
            it = loader = None  # drop the iterator: its workers shut down before the symlinks go


# --- report --------------------------------------------------------------------------------------------------------
def _fmt(value, spec: str, none: str = "–") -> str:
    return none if value is None else format(value, spec)


def format_report(result: dict) -> str:
    d, a = result["device"], result["config"]
    gpu = d["device"].startswith("cuda")
    kind = d["name"] if gpu else f"{d['name']}: CPU run, NOT a GPU result"
    prec = "bf16 autocast" if a["amp"] else "fp32"
    lines = [
        f"## UniVIP training step: {kind}",
        "",
        f"torch {d['torch']}, torchvision {d['torchvision']}, {prec}, "
        f"{'channels_last' if a['channels_last'] else 'contiguous'}, {a['arch']}, batch {a['batch']}, "
        f"{a['image_size']} px views, K={a['k']}, {a['instance_size']} px instance crops, projector/predictor "
        f"{a['proj_hidden']}->256; step = GPU colour aug + fwd/bwd + SGD + EMA; {a['steps']} steps after "
        f"{a['warmup']} warm-up; MFU against {a['peak_tflops']:g} TFLOP/s"
        + ("" if gpu else " (not computed on CPU)")
        + ("; torch.compile on the encoders" if a["compile"] else ""),
        "",
        "| variant | input | images/s | step ms | data wait | GFLOP/step (fwd+bwd) | TFLOP/s | MFU | aug ms "
        "| peak mem GiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['variant']} | {r['input']} | {r['images_per_s']:.1f} | {r['step_ms']:.1f} | "
            f"{_fmt(r.get('data_wait'), '.1%')} | {_fmt(r.get('gflop_per_step'), '.1f')} | "
            f"{_fmt(r.get('tflops'), '.1f')} | {_fmt(r.get('mfu'), '.1%')} | {_fmt(r.get('aug_ms'), '.1f')} | "
            f"{_fmt(r.get('peak_mem_gib'), '.1f')} |"
        )
    lo = result.get("loader")
    if lo:
        lines += [
            "",
            f"Loader: {lo['spec']}: {lo['unique_samples']} unique samples ({lo['source_megapixels']:.2f} MP "
            f"mean) repeated by symlinked shard copies (page-cache reads), {d['cpu_cores']} CPU cores, "
            f"shuffle buffer {a['shuffle_buffer']}.",
        ]
        for r in result["rows"]:
            if r["input"].startswith("loader"):
                lines.append(
                    f"- {r['variant']}: loader alone {_fmt(r.get('loader_only_images_per_s'), '.0f')} "
                    f"images/s; data wait = "
                    f"{'GPU idle between steps (CUDA events)' if gpu else 'time in next()'}, "
                    f"CPU blocked in next() "
                    f"{_fmt(r.get('cpu_wait'), '.1%')}; Algorithm 1 fallback rate "
                    f"{_fmt(r.get('fallback_rate'), '.1%')}"
                    + (
                        f"; decode_views alone {_fmt(r.get('decode_ms'), '.1f')} ms/batch, views vs the CPU "
                        f"path: mean |diff| {_fmt(r.get('decode_diff'), '.2f')} levels"
                        if "GPU decode" in r["input"]
                        else ""
                    )
                )
    for note in result["notes"]:
        lines.append(f"- note: {note}")
    for err in result["errors"]:
        lines.append(f"- ERROR: {err}")
    lines.append(f"\nelapsed {result['elapsed_s']:.0f} s")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--batch", type=int, default=128, help="samples per step")
    ap.add_argument("--image-size", type=int, default=224, help="view side in pixels")
    ap.add_argument("--instance-size", type=int, default=96, help="instance crop side ('crop' mode)")
    ap.add_argument("--k", type=int, default=4, help="instances per view")
    ap.add_argument("--proj-hidden", type=int, default=4096, help="projector/predictor hidden width")
    ap.add_argument("--variants", default="byol,univip-crop,univip-roi", help="synthetic-input variants")
    ap.add_argument("--loader-variants", default="univip-crop", help="variants timed with the real loader ('' none)")
    ap.add_argument("--steps", type=int, default=50, help="measured steps per measurement")
    ap.add_argument("--warmup", type=int, default=10, help="warm-up steps (the loader adds 2 per worker)")
    ap.add_argument("--data", default=None, help="shard spec for the real loader; without shards: synthetic only")
    ap.add_argument(
        "--gpu-decode",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time the real loader with the views decoded on the GPU (train --gpu-decode), last",
    )
    ap.add_argument("--workers", type=int, default=min(12, max(1, cores - 2)), help="DataLoader workers")
    ap.add_argument(
        "--shuffle-buffer", type=int, default=64, help="samples per slot before the first leaves (only delays start-up)"
    )
    ap.add_argument(
        "--peak-tflops",
        type=float,
        default=989.0,
        help="peak dense bf16 TFLOP/s for MFU (H100 SXM / H200: 989; H100 PCIe: 756)",
    )
    ap.add_argument("--compile", action="store_true", help="torch.compile the encoders (adds minutes of warm-up)")
    ap.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    ap.add_argument(
        "--amp", choices=("auto", "on", "off"), default="auto", help="bf16 autocast (auto: on for cuda, off on CPU)"
    )
    ap.add_argument(
        "--aug-generator",
        choices=("cpu", "device"),
        default="cpu",
        help="where gpu_colour draws its per-sample parameters (cpu: as train/__main__.py does)",
    )
    ap.add_argument("--no-cudnn-benchmark", dest="cudnn_benchmark", action="store_false")
    ap.add_argument("--budget-s", type=float, default=320, help="wall-clock budget of this script, seconds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="result file (default: $OUT/gpu_bench.json when $OUT is set)")
    args = ap.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    args.loader_variants = [v.strip() for v in args.loader_variants.split(",") if v.strip()]
    for v in args.variants + args.loader_variants:
        if v not in VARIANTS:
            ap.error(f"unknown variant {v!r}: expected one of {', '.join(VARIANTS)}")
    if args.steps < 1 or args.warmup < 0 or args.batch < 2:
        ap.error("need --steps >= 1, --warmup >= 0 and --batch >= 2 (BatchNorm needs two samples)")
    args.amp = args.amp == "on" or (args.amp == "auto" and args.device.startswith("cuda"))
    if args.json is None and os.environ.get("OUT"):
        args.json = os.path.join(os.environ["OUT"], "gpu_bench.json")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    budget = Budget(args.budget_s)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device visible to torch (pass --device cpu for a smoke run)")
        if device.index is None:  # set_device and the memory statistics want an index
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
    info = device_info(device)
    print(f"device: {info['name']} ({device}); torch {info['torch']}; {info['cpu_cores']} CPU cores", flush=True)
    vcfg = ViewConfig(size=args.image_size, k=args.k, instance_size=args.instance_size, gpu_aug=True)
    config = {k: v for k, v in vars(args).items()}
    result = {"device": info, "config": config, "rows": [], "notes": [], "errors": [], "loader": None}
    if device.type == "cuda" and args.cudnn_benchmark:
        result["notes"].append("cudnn.benchmark on, as in train/__main__.py")
    if CV2_VERSION is None:
        result["notes"].append("OpenCV missing: a placeholder cv2 module let train.views import (gpu_aug path only)")

    # phases in order; each gets an equal share of what is left, and is skipped when under `floor` seconds remain
    phases: list[tuple[str, str]] = [("synthetic", v) for v in args.variants]
    shards = None
    if args.loader_variants:
        if not args.data:
            result["notes"].append("no --data: real-loader measurement skipped (synthetic only)")
        else:
            try:
                shards = find_shards(args.data)
                phases += [("loader", v) for v in args.loader_variants]
                # last: whatever happens on the GPU decode path cannot disturb the measurements before it
                phases += [("loader-gpu_decode", v) for v in args.loader_variants if args.gpu_decode]
            except FileNotFoundError as e:
                result["notes"].append(f"{e}: real-loader measurement skipped (synthetic only)")
    if shards:
        urls, sizes = shards
        result["loader"] = dict(
            spec=args.data,
            shards=len(urls),
            unique_samples=sum(sizes.values()),
            source_megapixels=source_megapixels(urls),
        )
    floor = 20.0 if device.type == "cuda" else 1.0
    flops: dict[str, int] = {}
    for i, (kind, name) in enumerate(phases):
        left = budget.left()
        if left < floor:
            result["notes"].append(f"{kind} {name}: skipped, {left:.0f} s of the {args.budget_s:g} s budget left")
            continue
        deadline = time.perf_counter() + left / (len(phases) - i)
        print(f"[{budget.elapsed():5.0f} s] {kind} {name} ...", flush=True)
        try:
            if kind == "synthetic":
                row = bench_synthetic(name, args, device, vcfg, deadline)
                flops[name] = row["flops"]
            else:
                lcfg = dataclasses.replace(vcfg, gpu_decode=kind == "loader-gpu_decode")
                row = bench_loader(name, args, device, lcfg, *shards, deadline, flops.get(name), result["notes"])
            if row["steps"] < args.steps:
                result["notes"].append(f"{kind} {name}: only {row['steps']} of {args.steps} steps fit its time share")
            result["rows"].append(row)
            print(
                f"[{budget.elapsed():5.0f} s]   {row['images_per_s']:.1f} images/s, {row['step_ms']:.1f} ms/step",
                flush=True,
            )
        except Exception as e:  # keep the other measurements; the error goes into the report and the exit code
            result["errors"].append(f"{kind} {name}: {type(e).__name__}: {e}")
            print(f"  failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    result["elapsed_s"] = budget.elapsed()
    print()
    print(format_report(result))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
        print(f"wrote {args.json}")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
