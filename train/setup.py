"""A run's parts built from its ``TrainConfig``: views, loader, model, optimizer and the step function. The loop
(``train.__main__``) and the benchmarks (``bench/gpu_bench.py``, ``bench/step_bench.py``) build them here, so a
benchmark times the trainer's own model, optimizer and step."""

from __future__ import annotations

import contextlib

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from shards import reader, storage
from train import data, dist, optim
from train.config import TrainConfig
from train.model import ModelConfig, UniVIP
from train.step import TrainStep
from train.views import UniVIPTransform, ViewConfig


class TrainError(RuntimeError):
    """A run that cannot start or go on for a reason the user can fix; printed without a traceback."""


def view_config(cfg: TrainConfig) -> ViewConfig:
    return ViewConfig(
        size=cfg.image_size,
        scale=(cfg.crop_min_scale, 1.0),
        blur_p=(1.0, 0.1) if cfg.blur else (0.0, 0.0),
        k=cfg.k,
        iters=cfg.view_iters,
        instance_size=cfg.instance_size,
        views=cfg.view_mode,
        instance_crops=cfg.instance_crops,
        gpu_aug=cfg.gpu_aug or cfg.gpu_decode,
        gpu_decode=cfg.gpu_decode,
    )


def build_loader(
    cfg: TrainConfig, device: torch.device, *, rank: int, world: int, position: data.DataPosition, streams: int
):
    """(loader of this rank's batches, steps_per_epoch) over ``cfg.data``; what the user can fix raises TrainError.
    The stream is a pure function of (seed, epoch, rank, streams); ``position`` says where a resumed run stood."""
    # process-wide storage settings; make_loader hands them to its worker processes
    storage.configure(endpoint_url=cfg.s3_endpoint or None, allow_pipe=cfg.allow_pipe)
    try:
        shards = reader.resolve(
            cfg.data, allow_manifest_outside=cfg.allow_manifest_outside, allow_pipe=cfg.allow_pipe
        )  # the manifest read, or the prefix listed, once: the loader takes its URLs and counts
        return data.make_loader(
            shards,
            UniVIPTransform(view_config(cfg)),
            batch_size=cfg.per_rank_batch(world),
            workers=cfg.workers,
            seed=cfg.seed,
            shuffle_buffer=cfg.shuffle_buffer,
            rank=rank,
            world_size=world,
            position=position,
            on_bad_shard=cfg.on_bad_shard,
            pin_memory=device.type == "cuda",
            streams=streams,
            open_kwargs={"allow_pipe": cfg.allow_pipe},
            verify_images=cfg.verify_images,
        )
    except (reader.SpecError, reader.ShardError, data.BadShardError) as e:
        raise TrainError(str(e)) from e
    except (OSError, NotImplementedError) as e:
        # the manifest, listing or stats files could not be read (missing, access denied, retries exhausted) or the
        # spec needs what the scheme lacks (an http listing): storage's messages name the URL, never a credential
        shown = storage.redact(cfg.data)
        raise TrainError(str(e) if shown.rstrip("/") in str(e) else f"{shown}: {e}") from e
    except ValueError as e:  # e.g. too few samples for one step
        raise TrainError(f"{cfg.data}: {e}") from e


def build_model(cfg: TrainConfig, device: torch.device) -> UniVIP:
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    model = UniVIP(ModelConfig.from_train(cfg))
    if cfg.sync_bn and dist.world_size() > 1:
        if device.type != "cuda":
            raise TrainError("--sync-bn needs CUDA devices (torch's SyncBatchNorm has no CPU kernel)")
        # both branches: BYOL normalises online and target alike with statistics of the global batch; the target's
        # SyncBN layers keep the online ones' names, so the EMA update pairs them as before
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    if channels_last(cfg, device):
        model = model.to(memory_format=torch.channels_last)
    return model


def build_optimizer(model: UniVIP, cfg: TrainConfig) -> torch.optim.Optimizer:
    """``cfg.optimizer`` over the trainable (online) parameters; the target changes only through the EMA."""
    return optim.build([(n, p) for n, p in model.named_parameters() if p.requires_grad], cfg)


def channels_last(cfg: TrainConfig, device: torch.device) -> bool:
    return cfg.channels_last and device.type == "cuda"


def autocast(cfg: TrainConfig, device: torch.device):
    """A factory of the forward's precision context: bf16 autocast on CUDA with ``--amp``, else nothing."""
    if cfg.amp and device.type == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext


def make_step(cfg: TrainConfig, device: torch.device, model: UniVIP, opt: torch.optim.Optimizer) -> TrainStep:
    """The step the loop calls once per batch, over ``model`` (restored first when resuming): ``--compile``'s regions,
    DDP across ranks and the precision of ``cfg``. Turns cuDNN autotuning on for CUDA (the input shapes never
    change)."""
    if cfg.compile:
        model.compile_regions(cfg.compile_mode)  # in place, before DDP wraps the model
    # DDP reduces the gradients of the trainable (online) parameters; the target has requires_grad False, so DDP
    # leaves it alone: it changes only through the step's EMA update. A zero loss weight leaves a head unused.
    net: torch.nn.Module = model
    if dist.world_size() > 1:
        unused = cfg.method == "univip" and min(cfg.loss_weights().values()) == 0
        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=unused)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    return TrainStep(
        net,
        model,
        opt,
        view_config(cfg),
        device,
        seed=cfg.seed,
        rank=dist.rank(),
        grad_clip=cfg.grad_clip,
        autocast=autocast(cfg, device),
        channels_last=channels_last(cfg, device),
        cuda_graphs=cfg.compile and cfg.compile_mode == "reduce-overhead" and device.type == "cuda",
        # on CUDA only: the compiled form computes hue for every sample, memory-bound work on a GPU (a few fused
        # kernels instead of ~440 eager operations, dozens of them passes over the batch) but compute on a CPU, where it measured no faster
        # (docs/benchmarks.md, bench/colour_bench.py)
        compiled_colour=cfg.compile and cfg.gpu_aug and device.type == "cuda",
    )
