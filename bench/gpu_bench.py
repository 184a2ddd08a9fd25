"""The GPU check (``bench/gpu.sh``): the trainer's own step at the paper's setting, a real training run from shards, and
the step's top CUDA kernels, all within ``--budget-s``. ``--smoke`` runs every part on the CPU at toy sizes.

1. Step (synthetic input). For each variant (``byol``, ``univip-crop`` = the paper's, instances cut from the source
   image; ``univip-roi``) the per-GPU batch is searched upward (``--batches``, e.g. 128, 256, 512, 1024) until a step
   runs out of memory; at the largest that fits, the step of ``train.setup.make_step`` (GPU colour augmentation of views
   and instances, forward under bf16 autocast, channels_last, backward, SGD, EMA) runs ``--steps`` times after
   ``--warmup``, timed with CUDA events (no per-step synchronisation). The input is a synthetic uint8 batch in the
   loader's layout already on the device. The learning rate follows the trainer's linear scaling rule with the batch.
   FLOPs of one forward + backward are counted by ``torch.utils.flop_counter.FlopCounterMode`` (matmuls and
   convolutions; BatchNorm, RoIAlign, Sinkhorn, augmentation and optimizer not counted) at a small batch and scaled
   to the batch (they are linear in it); MFU = FLOPs / step time / ``--peak-tflops``.
2. The same with ``--compile`` (``--compile-variants``, the paper's variant first), at the batch found in 1: the first
   step's wall time (it compiles every region) is reported as ``first_step_s``.
3. A real run: ``python -m train`` for ``--train-steps`` steps on shards with the real loader (``--workers`` processes,
   ``--gpu-aug``), from ``--data`` or, without it, from shards ``prep`` makes here out of ``data/sample`` (selective
   search needs OpenCV's contrib module). The few sample images are repeated by a manifest of symlinked shard copies
   (page-cache reads: a lower bound on the CPU work of real data). ``images_per_s`` and ``data_wait`` come from the
   run's own ``log.jsonl`` (the first row, start-up included, is left out).
4. ``torch.profiler`` over a few steps of the paper's variant: the kernels with the most device time.

Every phase checks the budget before it starts; a phase that does not fit is listed as skipped. Output: a markdown
report on stdout and, under ``$OUT`` (or ``--out-dir``): ``gpu_bench.json``, ``gpu_bench.md``, ``profile.txt``,
``train_log.jsonl``.

    bench/gpu.sh                                        # on the GPU machine: the whole check, 9 minutes at most
    python bench/gpu_bench.py --smoke --out-dir /tmp/x  # every part on the CPU at toy sizes
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
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

PREFETCH = 2  # batches in flight per DataLoader worker (train.data.make_loader's prefetch_factor)
OOM = (torch.OutOfMemoryError,) if hasattr(torch, "OutOfMemoryError") else (torch.cuda.OutOfMemoryError,)
SAMPLE_COCO = os.path.join(ROOT, "data", "sample", "coco")


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


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def peak_memory_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def reset_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


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

    def __init__(self, name: str, args: argparse.Namespace, device: torch.device, batch: int, compile: bool = False):
        self.name, self.device = name, device
        self.cfg = bench_config(
            name,
            arch=args.arch,
            proj_hidden=args.proj_hidden,
            pred_hidden=args.proj_hidden,
            k=args.k,
            image_size=args.image_size,
            instance_size=args.instance_size,
            batch_size=batch,
            gpu_aug=True,
            amp=args.amp,
            channels_last=args.channels_last,
            compile=compile,
            compile_mode=args.compile_mode,
            seed=args.seed,
            device=device.type,
        )
        self.vcfg = setup.view_config(self.cfg)
        self.model = setup.build_model(self.cfg, device)  # seeded: the same initial encoder for every variant
        self.opt = setup.build_optimizer(self.model, self.cfg)
        self.run_step = setup.make_step(self.cfg, device, self.model, self.opt)
        torch.backends.cudnn.benchmark = device.type == "cuda" and args.cudnn_benchmark
        self.it = 0

    def batch(self) -> dict[str, torch.Tensor]:
        """A synthetic batch in the loader's layout, on the device."""
        return synthetic_batch(self.cfg, self.device, self.cfg.seed)

    def inputs(self, batch: dict) -> dict:
        """The step's input stage alone (GPU colour augmentation of views and instances)."""
        return model_inputs(batch, self.vcfg, self.device, step_generator(self.cfg.seed, self.it, 0))

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
        free_memory(self.device)


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
    """Add images/s, TFLOP/s and MFU to a row holding ``batch``, ``step_s`` and ``flops``."""
    row["images_per_s"] = row["batch"] / row["step_s"]
    row["step_ms"] = 1000 * row["step_s"]
    if row.get("flops"):
        row["gflop_per_step"] = row["flops"] / 1e9
        row["tflops"] = row["flops"] / row["step_s"] / 1e12
        row["mfu"] = row["tflops"] / args.peak_tflops if device.type == "cuda" else None
    return row


# --- phase 1 and 2: the step on synthetic input --------------------------------------------------------------------
def flops_per_sample(name: str, args, device) -> float:
    """Forward + backward FLOPs per sample, counted at a batch of 8 (FLOPs are linear in the batch)."""
    bench = Setup(name, args, device, batch=8)
    try:
        return bench.flops(bench.batch()) / 8
    finally:
        bench.close()


def search_batch(name: str, args, device, deadline: float) -> tuple[int | None, list[dict]]:
    """The largest of ``args.batches`` (ascending) at which two steps run; stops at the first out-of-memory.
    -> (batch or None, the trials: batch, fits, peak memory)."""
    best, trials = None, []
    for b in args.batches:
        if best is not None and time.perf_counter() > deadline:
            trials.append(dict(batch=b, fits=None, note="not tried: time share used"))
            break
        reset_memory(device)
        bench, fits = None, False
        try:
            bench = Setup(name, args, device, batch=b)
            batch = bench.batch()
            for _ in range(2):  # the first also autotunes cuDNN and creates the optimizer state
                bench.step(batch)
            sync(device)
            fits = True
        except OOM:
            pass  # the exception (and the frames holding its tensors) is gone once this block ends
        peak = peak_memory_gib(device)
        batch = None
        if bench is not None:
            bench.close()
        free_memory(device)
        trials.append(dict(batch=b, fits=fits, peak_mem_gib=peak))
        print(f"    batch {b}: {'fits' if fits else 'out of memory'}, peak {peak} GiB", flush=True)
        if not fits:
            break
        best = b
    return best, trials


def bench_step(name: str, args, device, batch: int, deadline: float, compile: bool, flops: float | None) -> dict:
    """Time the trainer's step at ``batch``; with ``compile`` the first step (compilation) is timed on its own."""
    reset_memory(device)
    bench = Setup(name, args, device, batch=batch, compile=compile)
    try:
        data_ = bench.batch()
        t0 = time.perf_counter()
        bench.step(data_)
        sync(device)
        first_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        timed_steps(lambda: bench.step(data_), args.warmup, deadline)
        sync(device)
        warm_s = time.perf_counter() - t0
        clock = Clock(device)
        clock.start()
        # --steps, or fewer when a step is slow: what --measure-s allows (at least 3), and never past the deadline
        per_step = max(warm_s / max(1, args.warmup), 1e-6)
        n = max(3, min(args.steps, int(args.measure_s / per_step)))
        steps = timed_steps(lambda: bench.step(data_), n, deadline)
        step_s = clock.stop() / steps
        # the input stage alone (colour augmentation of views and instances), for the record (it is inside step_s)
        n_aug = max(1, min(10, args.steps))
        clock.start()
        for _ in range(n_aug):
            bench.inputs(data_)
        aug_s = clock.stop() / n_aug
        row = dict(
            variant=name + (f"+compile({args.compile_mode})" if compile else ""),
            input="synthetic",
            batch=batch,
            steps=steps,
            first_step_s=round(first_s, 2),
            warmup_s=round(warm_s, 2),
            step_s=step_s,
            aug_ms=1000 * aug_s,
            flops=flops * batch if flops else None,
            peak_mem_gib=peak_memory_gib(device),
            lr=bench.cfg.peak_lr,
        )
        return derived(row, args, device)
    finally:
        bench.close()


# --- phase 3: a real training run ----------------------------------------------------------------------------------
def find_shards(spec: str) -> tuple[list[str], dict[str, int]]:
    """(tar URLs, samples per URL) of a shard spec; raises FileNotFoundError naming the spec when it has none."""
    try:
        shards = reader.resolve(spec)
    except Exception as e:  # SpecError and OS errors alike
        raise FileNotFoundError(f"no shards at {spec!r}: {e}") from e
    urls = list(shards.urls)
    sizes = dict(shards.sizes or data.count_samples(urls))
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
                raise ValueError(f"{storage.redact(u)}: the training run repeats local shards only")
            name = f"r{c:05d}-{os.path.basename(storage.local_path(u))}"
            os.symlink(os.path.abspath(storage.local_path(u)), os.path.join(tmp, name))
            entries.append({"tar": name, "samples": sizes[u]})
    path = os.path.join(tmp, schema.MANIFEST_NAME)
    with open(path, "w") as f:
        json.dump({"format_version": schema.FORMAT_VERSION, "shards": entries}, f)
    return path


def sample_shards(work: str, workers: int) -> str:
    """Shards made by ``prep`` from the bundled COCO sample (a few photos with their annotations file)."""
    try:
        import cv2

        cv2.ximgproc.segmentation  # noqa: B018 - selective search lives in OpenCV's contrib module
    except (ImportError, AttributeError) as e:
        raise RuntimeError(
            "prep needs OpenCV's contrib module (opencv-contrib-python-headless) for selective search: carry it "
            "as a wheel (see docs/benchmarks.md) or pass --data with shards made elsewhere"
        ) from e
    out = os.path.join(work, "sample_shards")
    cmd = [
        sys.executable,
        "-m",
        "prep",
        "coco",
        os.path.join(SAMPLE_COCO, "images"),
        "--annotations",
        os.path.join(SAMPLE_COCO, "annotations", "instances_sample.json"),
        "--out",
        out,
        "--shard-size",
        "4",
        "--workers",
        str(max(1, workers)),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"prep failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return out


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


def _env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": ROOT + (os.pathsep + path if path else ""), "PYTHONUNBUFFERED": "1"}


def train_run(args, device, deadline: float, out_dir: str | None, notes: list[str]) -> dict:
    """``python -m train`` on repeated shards for ``args.train_steps`` steps (stopped at ``deadline``); the rates
    from its log."""
    # a batch as the workers hand it over: uint8 views and instance crops of both views, boxes
    sample_bytes = 2 * (3 * args.image_size**2 + args.k * 3 * args.instance_size**2 + 16 * args.k)
    workers, note = shm_workers(args.workers, args.train_batch * sample_bytes)
    if note:
        notes.append(note)
    work = tempfile.mkdtemp(prefix="gpu_bench_train_")
    try:
        t0 = time.perf_counter()
        spec = args.data or sample_shards(work, workers)
        prep_s = time.perf_counter() - t0
        urls, sizes = find_shards(spec)
        links = os.path.join(work, "repeated")
        os.makedirs(links)
        need = int(args.train_batch * (args.train_steps + 2) * 1.1)
        manifest = repeated_manifest(urls, sizes, need, 4 * max(1, workers), links)
        run = os.path.join(work, "run")
        log_every = max(1, args.train_steps // 10)
        cmd = [
            sys.executable,
            "-m",
            "train",
            "--data",
            manifest,
            "--out",
            run,
            "--device",
            device.type,
            "--arch",
            args.arch,
            "--image-size",
            str(args.image_size),
            "--instance-size",
            str(args.instance_size),
            "--k",
            str(args.k),
            "--proj-hidden",
            str(args.proj_hidden),
            "--pred-hidden",
            str(args.proj_hidden),
            "--batch-size",
            str(args.train_batch),
            "--max-steps",
            str(args.train_steps),
            "--log-every",
            str(log_every),
            "--ckpt-every",
            "0",
            "--keep-ckpts",
            "1",
            "--workers",
            str(workers),
            "--shuffle-buffer",
            str(args.shuffle_buffer),
            "--gpu-aug",
            "--amp" if args.amp else "--no-amp",
            "--channels-last" if args.channels_last else "--no-channels-last",
            *args.train_args,
        ]
        print(f"    {' '.join(cmd[2:])}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        timed_out = False
        try:
            output, _ = proc.communicate(timeout=max(10.0, deadline - time.perf_counter()))
        except subprocess.TimeoutExpired:  # stop the run and its loader workers; the rows logged so far still count
            timed_out = True
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
        wall = time.perf_counter() - t0
        log = os.path.join(run, "log.jsonl")
        rows = []
        if os.path.exists(log):
            with open(log) as f:
                rows = [json.loads(line) for line in f if line.strip()]
            if out_dir:
                shutil.copy(log, os.path.join(out_dir, "train_log.jsonl"))
        if proc.returncode not in (0, None) and not timed_out:
            raise RuntimeError(f"python -m train failed ({proc.returncode}):\n{output[-3000:]}")
        if not rows:
            raise RuntimeError(f"python -m train logged nothing in {wall:.0f} s:\n{output[-3000:]}")
        steady = rows[1:] or rows  # the first row holds the start-up: workers, shard opening, cuDNN autotuning
        return dict(
            data=args.data or "data/sample via prep",
            unique_samples=sum(sizes.values()),
            prep_s=round(prep_s, 1),
            batch=args.train_batch,
            workers=workers,
            steps=rows[-1]["step"],
            timed_out=timed_out,
            wall_s=round(wall, 1),
            images_per_s=statistics.median(r["images_per_s"] for r in steady),
            data_wait=statistics.mean(r["data_wait"] for r in steady),
            first_row_images_per_s=rows[0]["images_per_s"],
            loss_first=rows[0]["loss"],
            loss_last=rows[-1]["loss"],
            fallback_rate=rows[-1]["fallback_rate"],
            rows=len(rows),
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --- phase 4: profile ----------------------------------------------------------------------------------------------
def profile_step(name: str, args, device, batch: int, out_dir: str | None) -> dict:
    """``torch.profiler`` over ``args.profile_steps`` steps after 3 warm-up steps: the kernels (on a GPU) or the ops
    (on a CPU) with the most self time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    bench = Setup(name, args, device, batch=batch)
    try:
        data_ = bench.batch()
        for _ in range(3):
            bench.step(data_)
        sync(device)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            for _ in range(args.profile_steps):
                bench.step(data_)
            sync(device)
    finally:
        bench.close()
    events = prof.key_averages()

    def self_us(e) -> float:  # torch renamed cuda -> device in these fields
        if cuda:
            return getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)
        return e.self_cpu_time_total

    if cuda:
        events = [e for e in events if e.device_type == DeviceType.CUDA] or list(events)
    ranked = sorted(events, key=self_us, reverse=True)
    total = sum(self_us(e) for e in ranked) or 1.0
    top = [
        dict(name=e.key, self_ms=self_us(e) / 1000 / args.profile_steps, share=self_us(e) / total, calls=e.count)
        for e in ranked[: args.profile_top]
    ]
    lines = [
        f"{'kernels' if cuda else 'CPU ops'} by self {'device' if cuda else 'CPU'} time, {name}, batch {batch}, "
        f"per step (mean of {args.profile_steps}); total {total / 1000 / args.profile_steps:.1f} ms/step",
        "",
        f"{'ms/step':>9} {'share':>6} {'calls':>6}  name",
    ]
    lines += [f"{t['self_ms']:9.2f} {t['share']:6.1%} {t['calls']:6d}  {t['name'][:140]}" for t in top]
    text = "\n".join(lines)
    if out_dir:
        with open(os.path.join(out_dir, "profile.txt"), "w") as f:
            f.write(text + "\n")
    return dict(
        variant=name, batch=batch, steps=args.profile_steps, total_ms=total / 1000 / args.profile_steps, top=top
    )


# --- report --------------------------------------------------------------------------------------------------------
def _fmt(value, spec: str, none: str = "–") -> str:
    return none if value is None else format(value, spec)


def format_report(result: dict) -> str:
    d, a = result["device"], result["config"]
    gpu = d["device"].startswith("cuda")
    kind = d["name"] if gpu else f"{d['name']}: CPU run, NOT a GPU result"
    prec = "bf16 autocast" if a["amp"] else "fp32"
    lines = [
        f"## UniVIP GPU check: {kind}",
        "",
        f"torch {d['torch']}, torchvision {d['torchvision']}, {prec}, "
        f"{'channels_last' if a['channels_last'] else 'contiguous'}, {a['arch']}, {a['image_size']} px views, "
        f"K={a['k']}, {a['instance_size']} px instances, projector/predictor {a['proj_hidden']}->256; step = "
        f"train.setup.make_step (GPU colour aug + fwd/bwd + SGD + EMA) on synthetic input; {a['steps']} steps after "
        f"{a['warmup']} warm-up; MFU against {a['peak_tflops']:g} TFLOP/s" + ("" if gpu else " (not computed on CPU)"),
        "",
        "| variant | batch | images/s | step ms | first step s | GFLOP/step | TFLOP/s | MFU | aug ms | peak GiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['variant']} | {r['batch']} | {r['images_per_s']:.1f} | {r['step_ms']:.1f} | "
            f"{_fmt(r.get('first_step_s'), '.1f')} | {_fmt(r.get('gflop_per_step'), '.0f')} | "
            f"{_fmt(r.get('tflops'), '.1f')} | {_fmt(r.get('mfu'), '.1%')} | {_fmt(r.get('aug_ms'), '.1f')} | "
            f"{_fmt(r.get('peak_mem_gib'), '.1f')} |"
        )
    for name, trials in result["batch_search"].items():
        tried = ", ".join(
            f"{t['batch']} {'ok' if t['fits'] else 'OOM' if t['fits'] is False else 'not tried'}"
            + (f" ({t['peak_mem_gib']} GiB)" if t.get("peak_mem_gib") and t["fits"] else "")
            for t in trials
        )
        lines.append(f"- batch search {name}: {tried}")
    t = result.get("train")
    if t:
        lines += [
            "",
            f"Training run (`python -m train`, real loader, {t['workers']} workers, --gpu-aug, batch {t['batch']}, "
            f"{t['data']}: {t['unique_samples']} unique samples repeated): {t['steps']} steps in {t['wall_s']:.0f} s"
            + (" (stopped at its time share)" if t["timed_out"] else "")
            + f"; {t['images_per_s']:.1f} images/s, data wait {t['data_wait']:.1%} (log rows after the first); "
            f"loss {t['loss_first']:.3f} -> {t['loss_last']:.3f}; Algorithm 1 fallback rate {t['fallback_rate']:.1%}",
        ]
    p = result.get("profile")
    if p:
        lines += ["", f"Top {'kernels' if gpu else 'CPU ops'}, {p['variant']} step, batch {p['batch']}:", ""]
        lines += [f"- {k['self_ms']:.2f} ms/step ({k['share']:.1%}) x{k['calls']}: {k['name'][:100]}" for k in p["top"]]
    for note in result["notes"]:
        lines.append(f"- note: {note}")
    for err in result["errors"]:
        lines.append(f"- ERROR: {err}")
    lines.append(f"\nelapsed {result['elapsed_s']:.0f} s")
    return "\n".join(lines)


SMOKE = dict(  # every part on the CPU in a few minutes (compilation, when asked for, takes the longest)
    device="cpu",
    arch="resnet18",
    image_size=64,
    instance_size=32,
    proj_hidden=256,
    batches="4,8",
    steps=2,
    warmup=1,
    train_steps=4,
    train_batch=8,
    workers=1,
    profile_steps=2,
    budget_s=900,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help=f"toy sizes on the CPU (overrides: {SMOKE})")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--arch", default="resnet50")
    ap.add_argument("--image-size", type=int, default=224, help="view side in pixels")
    ap.add_argument("--instance-size", type=int, default=96, help="instance crop side")
    ap.add_argument("--k", type=int, default=4, help="instances per view")
    ap.add_argument("--proj-hidden", type=int, default=4096, help="projector/predictor hidden width")
    ap.add_argument("--batches", default="128,256,512,1024", help="per-GPU batches tried, ascending, until one OOMs")
    ap.add_argument("--variants", default="univip-crop,byol,univip-roi", help="variants timed eagerly")
    ap.add_argument(
        "--compile-variants",
        default="univip-crop,byol,univip-roi",
        help="variants timed again with --compile, in this order while the budget lasts ('' none)",
    )
    ap.add_argument("--compile-mode", default="default", choices=("default", "reduce-overhead", "max-autotune"))
    ap.add_argument("--steps", type=int, default=20, help="measured steps per measurement")
    ap.add_argument("--warmup", type=int, default=3, help="warm-up steps after the first")
    ap.add_argument("--measure-s", type=float, default=12.0, help="measure fewer than --steps when they take longer")
    ap.add_argument("--data", default=None, help="shards for the training run (default: prep data/sample here)")
    ap.add_argument("--train-steps", type=int, default=200, help="steps of the training run (0: no run)")
    ap.add_argument("--train-batch", type=int, default=256, help="batch of the training run")
    ap.add_argument("--train-args", nargs=argparse.REMAINDER, default=[], help="more flags for python -m train (last)")
    ap.add_argument("--workers", type=int, default=max(1, cores - 2), help="DataLoader workers of the training run")
    ap.add_argument("--shuffle-buffer", type=int, default=64, help="samples per slot before the first leaves")
    ap.add_argument("--profile-steps", type=int, default=5, help="steps profiled (0: no profile)")
    ap.add_argument("--profile-top", type=int, default=25, help="kernels listed")
    ap.add_argument(
        "--peak-tflops",
        type=float,
        default=989.0,
        help="peak dense bf16 TFLOP/s for MFU (H100 SXM / H200: 989; H100 PCIe: 756)",
    )
    ap.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    ap.add_argument(
        "--amp", choices=("auto", "on", "off"), default="auto", help="bf16 autocast (auto: on for cuda, off on CPU)"
    )
    ap.add_argument("--no-cudnn-benchmark", dest="cudnn_benchmark", action="store_false")
    ap.add_argument("--budget-s", type=float, default=420, help="wall-clock budget of this script, seconds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out-dir", default=os.environ.get("OUT"), help="where the result files go (default: $OUT)")
    args = ap.parse_args(argv)
    if args.smoke:
        given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in (argv or sys.argv[1:]) if a.startswith("--")}
        for k, v in SMOKE.items():
            if k not in given:
                setattr(args, k, v)
    args.batches = sorted(int(b) for b in str(args.batches).split(",") if b.strip())
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    args.compile_variants = [v.strip() for v in args.compile_variants.split(",") if v.strip()]
    for v in args.variants + args.compile_variants:
        if v not in VARIANTS:
            ap.error(f"unknown variant {v!r}: expected one of {', '.join(VARIANTS)}")
    if args.steps < 1 or args.warmup < 0 or not args.batches or min(args.batches) < 2:
        ap.error("need --steps >= 1, --warmup >= 0 and --batches of at least 2 (BatchNorm needs two samples)")
    args.amp = args.amp == "on" or (args.amp == "auto" and args.device.startswith("cuda"))
    return args


# phases that are worth less than the ones after them wait for enough budget: seconds that must remain
RESERVE = {"cuda": dict(compile=150.0, train=100.0, profile=25.0), "cpu": dict(compile=1.0, train=1.0, profile=1.0)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    budget = Budget(args.budget_s)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no CUDA device visible to torch (pass --smoke for a CPU run)")
        if device.index is None:  # set_device and the memory statistics want an index
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    if args.out_dir:
        os.makedirs(args.out_dir, exist_ok=True)
    reserve = RESERVE["cuda" if device.type == "cuda" else "cpu"]
    info = device_info(device)
    print(f"device: {info['name']} ({device}); torch {info['torch']}; {info['cpu_cores']} CPU cores", flush=True)
    result = {
        "device": info,
        "config": {k: v for k, v in vars(args).items()},
        "rows": [],
        "batch_search": {},
        "notes": [],
        "errors": [],
    }
    if CV2_VERSION is None:
        result["notes"].append("OpenCV missing: a placeholder cv2 module let train.views import (gpu_aug path only)")

    def attempt(label: str, fn, *fn_args):
        """fn(*fn_args), or None after recording its error."""
        print(f"[{budget.elapsed():5.0f} s] {label} ...", flush=True)
        try:
            return fn(*fn_args)
        except Exception as e:  # keep the other measurements; the error goes into the report and the exit code
            result["errors"].append(f"{label}: {type(e).__name__}: {e}")
            print(f"  failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            free_memory(device)
            return None

    def record(row: dict | None) -> None:
        if row:
            result["rows"].append(row)
            print(
                f"[{budget.elapsed():5.0f} s]   {row['variant']} batch {row['batch']}: {row['images_per_s']:.1f} "
                f"images/s, {row['step_ms']:.1f} ms/step, first step {row['first_step_s']:.1f} s",
                flush=True,
            )

    def skip(label: str) -> None:
        result["notes"].append(f"{label}: skipped, {budget.left():.0f} s of the {args.budget_s:g} s budget left")

    # 1. eager steps: batch search, then the timing at the largest batch that fits
    found, flops = {}, {}
    later = reserve["compile"] + reserve["train"] + reserve["profile"]
    for i, name in enumerate(args.variants):
        share = (budget.left() - later) / (len(args.variants) - i)
        if share < 1:
            skip(f"step {name}")
            continue
        deadline = time.perf_counter() + share
        flops[name] = attempt(f"FLOPs {name}", flops_per_sample, name, args, device)
        b, trials = attempt(f"batch search {name}", search_batch, name, args, device, deadline) or (None, [])
        result["batch_search"][name] = trials
        if b is None:
            result["notes"].append(f"step {name}: no batch of {args.batches} fits")
            continue
        found[name] = b
        record(attempt(f"step {name} batch {b}", bench_step, name, args, device, b, deadline, False, flops[name]))

    # 2. compiled step of the paper's variant, then 3. the training run, 4. the profile; then the other compiled ones
    compiled = [n for n in args.compile_variants if n in found]

    def compile_phase(name: str, after: float) -> None:
        if budget.left() - after < reserve["compile"]:
            skip(f"compiled step {name}")
            return
        deadline = time.perf_counter() + budget.left() - after
        b = found[name]
        record(
            attempt(f"compiled step {name} batch {b}", bench_step, name, args, device, b, deadline, True, flops[name])
        )

    if compiled:
        compile_phase(compiled[0], reserve["train"] + reserve["profile"])
    if args.train_steps <= 0:
        result["notes"].append("training run: off (--train-steps 0)")
    elif budget.left() - reserve["profile"] >= reserve["train"]:
        deadline = time.perf_counter() + budget.left() - reserve["profile"]
        result["train"] = attempt("training run", train_run, args, device, deadline, args.out_dir, result["notes"])
    else:
        skip("training run")
    profiled = "univip-crop" if "univip-crop" in found else next(iter(found), None)
    if args.profile_steps <= 0:
        result["notes"].append("profile: off (--profile-steps 0)")
    elif profiled and budget.left() >= reserve["profile"]:
        b = min(found[profiled], args.batches[0] * 2)
        result["profile"] = attempt("profile", profile_step, profiled, args, device, b, args.out_dir)
    elif profiled:
        skip("profile")
    for name in compiled[1:]:
        compile_phase(name, 0.0)

    result["elapsed_s"] = budget.elapsed()
    report = format_report(result)
    print()
    print(report)
    if args.out_dir:
        with open(os.path.join(args.out_dir, "gpu_bench.json"), "w") as f:
            json.dump(result, f, indent=1, default=str)
        with open(os.path.join(args.out_dir, "gpu_bench.md"), "w") as f:
            f.write(report + "\n")
        print(f"wrote {args.out_dir}/gpu_bench.json, gpu_bench.md")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
