"""One training step, shared by the loop (``train.__main__``) and the benchmarks: a collated batch -> model inputs on
the device (``model_inputs``), then forward, backward, optimizer step and EMA update (``train_step``). ``TrainStep``
binds both to a run's model, optimizer and settings (``train.setup.make_step`` builds it): the loop and the
benchmarks call that one object per batch.

Inputs. The loader delivers uint8 views (or, with ``--gpu-decode``, JPEG bytes and crops that ``train.gpu_decode``
turns into views on the device), boxes in view pixels, and, with ``--instance-source image``, the K instance crops of
each view cut from the source image. With ``--gpu-aug`` the colour augmentation runs here, on the device: one set of
random parameters per view and sample, applied to the view and to its K instances alike (an instance gets the colour
augmentation of the view it belongs to, as on the CPU path). Without it everything arrives coloured and is only
normalised.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from train import augment, gpu_decode, optim
from train.model import update_target
from train.views import ViewConfig


def step_generator(seed: int, step: int, rank: int) -> torch.Generator:
    """The GPU colour augmentation's randomness, a pure function of (seed, step, rank): resumed runs repeat it."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence((seed, step, rank)).generate_state(1)[0]))


def _repeat(params: dict[str, torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """Per-sample colour parameters -> the same parameters for each of a sample's k instances (sample-major)."""
    return {name: v.repeat_interleave(k, dim=0) for name, v in params.items()}


def model_inputs(
    batch: Mapping[str, Any],
    vcfg: ViewConfig,
    device: torch.device,
    generator: torch.Generator | None = None,
    channels_last: bool = False,
    compiled_colour: bool = False,
) -> dict[str, torch.Tensor | None]:
    """A collated batch -> the keyword arguments of ``UniVIP.forward``: ``view1``, ``view2`` float ``[B, 3, S, S]``
    normalised, ``boxes1``, ``boxes2`` ``[B, K, 4]``, ``crops1``, ``crops2`` float ``[B, K, 3, s, s]`` or None.
    ``generator`` (``step_generator``) drives the colour augmentation when ``vcfg.gpu_aug``. ``channels_last``: views
    and instance crops alike in the memory format of a channels_last encoder (each crop ``[3, s, s]`` image of the
    flattened ``[B*K, 3, s, s]`` batch), converted once here rather than by each branch that reads them.
    ``compiled_colour`` (``--compile``): the GPU colour augmentation's torch.compile'd kernels."""
    if vcfg.gpu_decode:  # the workers sent JPEG bytes, crops and flips: views (and instances) made on the device
        x = gpu_decode.decode_batch(batch, vcfg.size, device, vcfg.instance_size)
    else:
        x = {k: batch[k].to(device, non_blocking=True) for k in ("view1", "view2", "inst1", "inst2") if k in batch}
    out: dict[str, torch.Tensor | None] = {k: batch[k].to(device, non_blocking=True) for k in ("boxes1", "boxes2")}
    for v in (1, 2):
        view, inst = x[f"view{v}"], x.get(f"inst{v}")  # uint8 [B, 3, S, S], [B, K, 3, s, s] or None
        if vcfg.gpu_aug:
            if generator is None:
                raise ValueError("model_inputs: gpu_aug needs the step's generator")
            params = augment.sample_params(view.shape[0], v - 1, generator, vcfg)
            out[f"view{v}"] = augment.gpu_colour(view, v - 1, cfg=vcfg, params=params, compiled=compiled_colour)
            if inst is not None:
                b, k = inst.shape[:2]
                crops = augment.gpu_colour(
                    inst.flatten(0, 1), v - 1, cfg=vcfg, params=_repeat(params, k), compiled=compiled_colour
                )
                out[f"crops{v}"] = crops.view(b, k, *crops.shape[1:])
        else:
            out[f"view{v}"] = augment.normalize(view)
            if inst is not None:
                out[f"crops{v}"] = augment.normalize(inst.flatten(0, 1)).view(inst.shape)
        out.setdefault(f"crops{v}", None)
        if channels_last:
            view_out = out[f"view{v}"]
            assert view_out is not None  # set above for both views
            out[f"view{v}"] = view_out.contiguous(memory_format=torch.channels_last)
            crops_out = out[f"crops{v}"]
            if crops_out is not None:  # the [B, K] -> [B*K] split is a view: the encoder gets these strides
                flat = crops_out.flatten(0, 1).contiguous(memory_format=torch.channels_last)
                out[f"crops{v}"] = flat.view(crops_out.shape)
    return out


def train_step(
    net: nn.Module,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    inputs: Mapping[str, Any],
    *,
    tau: float,
    grad_clip: float = 0.0,
    autocast=contextlib.nullcontext,
) -> dict[str, torch.Tensor]:
    """Forward (``net``: the model or its DDP wrapper), backward, optional clipping, optimizer step, then the EMA
    update of ``model``'s target. Returns the forward's outputs (loss terms and ``z_std``), left on the device."""
    with autocast():
        out = net(**inputs)
    opt.zero_grad(set_to_none=True)
    out["total"].backward()
    if grad_clip:
        # the norm stays on the device (no check that it is finite: that would read it on the host every step);
        # foreach kernels wherever the device has them
        params = [p for p in model.parameters() if p.requires_grad]
        torch.nn.utils.clip_grad_norm_(params, grad_clip, error_if_nonfinite=False, foreach=None)
    opt.step()
    update_target(model, tau)  # EMA: target <- tau * target + (1 - tau) * online
    return out


class TrainStep:
    """One step of a run: ``step(batch, it, lr=..., tau=...)`` sets the learning rate, makes the model inputs (GPU
    colour augmentation drawn from ``step_generator(seed, it, rank)``) and runs ``train_step``. Returns the loss
    terms and ``z_std`` on the device: nothing here waits for the device."""

    def __init__(
        self,
        net: nn.Module,
        model: nn.Module,
        opt: torch.optim.Optimizer,
        vcfg: ViewConfig,
        device: torch.device,
        *,
        seed: int,
        rank: int = 0,
        grad_clip: float = 0.0,
        autocast=contextlib.nullcontext,
        channels_last: bool = False,
        cuda_graphs: bool = False,
        compiled_colour: bool = False,
    ):
        self.net, self.model, self.opt, self.vcfg, self.device = net, model, opt, vcfg, device
        self.seed, self.rank, self.grad_clip, self.autocast = seed, rank, grad_clip, autocast
        self.channels_last, self.cuda_graphs, self.compiled_colour = channels_last, cuda_graphs, compiled_colour

    def __call__(self, batch: Mapping[str, Any], it: int, *, lr: float, tau: float) -> dict[str, torch.Tensor]:
        """The returned tensors are valid until the next call: with ``cuda_graphs`` (``--compile-mode
        reduce-overhead``) the next replay writes over them, so keep copies (the Logger stacks them)."""
        if self.cuda_graphs:  # the previous step's graph outputs are no longer needed: their memory is reused
            torch.compiler.cudagraph_mark_step_begin()
        optim.set_lr(self.opt, lr)
        g = step_generator(self.seed, it, self.rank) if self.vcfg.gpu_aug else None
        inputs = model_inputs(batch, self.vcfg, self.device, g, self.channels_last, self.compiled_colour)
        return train_step(
            self.net, self.model, self.opt, inputs, tau=tau, grad_clip=self.grad_clip, autocast=self.autocast
        )
