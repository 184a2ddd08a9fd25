"""SGD and LARS over parameter groups with the usual exclusions (biases and BatchNorm: no decay, no adaptation).

Update kernels (``--optim-impl``): ``auto`` takes torch's fused SGD on CUDA and multi-tensor (``foreach``) updates
elsewhere and for LARS; ``loop`` updates one tensor at a time (the reference the others are tested against). They
compute the same update; only the rounding of the fused kernel may differ in the last bits."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

IMPLS = ("auto", "foreach", "fused", "loop")


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling (You et al. 2017) as BYOL uses it.

    Per parameter tensor with ``lars=True`` in its group: g <- g + wd * w; g <- g * eta * |w| / |g| (trust ratio,
    1 when either norm is 0); v <- momentum * v + g; w <- w - lr * v. Groups with ``lars=False`` (biases, BN) get
    plain momentum SGD on the raw gradient, and their ``weight_decay`` is 0 by construction in ``param_groups``.

    ``foreach`` (default): each group's tensors in multi-tensor calls, every trust ratio of the group computed at
    once from two ``_foreach_norm`` calls, nothing read back by the host. Else one tensor at a time."""

    def __init__(
        self,
        params,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        eta: float = 0.001,
        foreach: bool = True,
    ):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars=True))
        # an attribute, not a group setting: saved param groups (older checkpoints too) keep their keys
        self.foreach = foreach

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                (self._update_foreach if self.foreach else self._update_loop)(group, params)
        return loss

    def _buffers(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        for p in params:
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p)
        return [self.state[p]["momentum_buffer"] for p in params]

    def _update_foreach(self, group: dict, params: list[torch.Tensor]) -> None:
        grads: list[torch.Tensor] | tuple[torch.Tensor, ...] = [p.grad for p in params if p.grad is not None]
        assert len(grads) == len(params)  # step() passes only the parameters that have a gradient
        if group["weight_decay"]:
            grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
        if group["lars"]:
            w_norm = torch.stack(torch._foreach_norm(params))  # [N], one per tensor
            g_norm = torch.stack(torch._foreach_norm(grads))
            trust = torch.where((w_norm > 0) & (g_norm > 0), group["eta"] * w_norm / g_norm, torch.ones_like(w_norm))
            grads = torch._foreach_mul(grads, list(trust.unbind(0)))
        bufs = self._buffers(params)
        torch._foreach_mul_(bufs, group["momentum"])
        torch._foreach_add_(bufs, grads)
        torch._foreach_add_(params, bufs, alpha=-group["lr"])

    def _update_loop(self, group: dict, params: list[torch.Tensor]) -> None:
        for p, buf in zip(params, self._buffers(params), strict=True):
            g = p.grad
            assert g is not None  # step() passes only the parameters that have a gradient
            if group["weight_decay"]:
                g = g.add(p, alpha=group["weight_decay"])
            if group["lars"]:
                w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(g)
                trust = torch.where(
                    (w_norm > 0) & (g_norm > 0), group["eta"] * w_norm / g_norm, torch.ones_like(w_norm)
                )
                g = g.mul(trust)
            buf.mul_(group["momentum"]).add_(g)
            p.add_(buf, alpha=-group["lr"])


def is_excluded(name: str, p: torch.Tensor) -> bool:
    """Biases and normalisation weights: every 0/1-dimensional tensor (BN gamma/beta, linear and conv biases)."""
    return p.ndim <= 1


def param_groups(named: Iterable[tuple[str, nn.Parameter]], weight_decay: float, exclude: bool) -> list[dict]:
    """[{params, weight_decay, lars}] with biases and BN parameters in a group of their own when ``exclude``."""
    decay: list[nn.Parameter] = []
    rest: list[nn.Parameter] = []
    for name, p in named:
        if not p.requires_grad:
            continue
        (rest if exclude and is_excluded(name, p) else decay).append(p)
    groups = [dict(params=decay, weight_decay=weight_decay, lars=True)]
    if rest:
        groups.append(dict(params=rest, weight_decay=0.0, lars=False))
    return groups


def resolve_impl(impl: str, optimizer: str, device: torch.device) -> str:
    """The update kernels ``impl`` means for ``optimizer`` on ``device``: "fused", "foreach" or "loop"."""
    if impl not in IMPLS:
        raise ValueError(f"unknown optimizer implementation {impl!r}: expected one of {', '.join(IMPLS)}")
    if impl == "auto":
        impl = "fused" if optimizer == "sgd" and device.type == "cuda" else "foreach"
    if impl == "fused" and optimizer == "lars":
        impl = "foreach"  # torch has no fused LARS kernel
    return impl


def build(named: Iterable[tuple[str, nn.Parameter]], cfg) -> torch.optim.Optimizer:
    """The optimizer of ``cfg.optimizer`` over the trainable (online) parameters; lr is set every step by the loop.
    Update kernels from ``cfg.optim_impl``, on the parameters' device."""
    groups = param_groups(named, cfg.weight_decay, cfg.wd_exclude_bn_bias)
    first = next((p for g in groups for p in g["params"]), None)
    impl = resolve_impl(cfg.optim_impl, cfg.optimizer, first.device if first is not None else torch.device("cpu"))
    if cfg.optimizer == "sgd":
        for g in groups:
            g.pop("lars")
        kernels = dict(foreach=impl == "foreach", fused=impl == "fused")
        opt = torch.optim.SGD(groups, lr=cfg.peak_lr, momentum=cfg.sgd_momentum, **kernels)

        # SGD keeps these flags in its param groups, which load_state_dict replaces with the checkpoint's: the run's
        # choice, not the one the checkpoint was written with, must hold after a resume
        def keep_kernels(optimizer: torch.optim.Optimizer) -> None:
            for g in optimizer.param_groups:
                g.update(kernels)

        opt.register_load_state_dict_post_hook(keep_kernels)
        return opt
    if cfg.optimizer == "lars":
        return LARS(groups, lr=cfg.peak_lr, momentum=cfg.sgd_momentum, eta=cfg.lars_eta, foreach=impl != "loop")
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")


def set_lr(opt: torch.optim.Optimizer, value: float) -> None:
    for g in opt.param_groups:
        g["lr"] = value
