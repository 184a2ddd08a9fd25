"""SGD and LARS over parameter groups with the usual exclusions (biases and BatchNorm: no decay, no adaptation)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling (You et al. 2017) as BYOL uses it.

    Per parameter tensor with ``lars=True`` in its group: g <- g + wd * w; g <- g * eta * |w| / |g| (trust ratio,
    1 when either norm is 0); v <- momentum * v + g; w <- w - lr * v. Groups with ``lars=False`` (biases, BN) get
    plain momentum SGD on the raw gradient, and their ``weight_decay`` is 0 by construction in ``param_groups``."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars=True))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if group["weight_decay"]:
                    g = g.add(p, alpha=group["weight_decay"])
                if group["lars"]:
                    w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(g)
                    trust = torch.where(
                        (w_norm > 0) & (g_norm > 0), group["eta"] * w_norm / g_norm, torch.ones_like(w_norm)
                    )
                    g = g.mul(trust)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(g)
                p.add_(buf, alpha=-group["lr"])
        return loss


def is_excluded(name: str, p: torch.Tensor) -> bool:
    """Biases and normalisation weights: every 0/1-dimensional tensor (BN gamma/beta, linear and conv biases)."""
    return p.ndim <= 1


def param_groups(named: Iterable[tuple[str, nn.Parameter]], weight_decay: float, exclude: bool) -> list[dict]:
    """[{params, weight_decay, lars}] with biases and BN parameters in a group of their own when ``exclude``."""
    decay, rest = [], []
    for name, p in named:
        if not p.requires_grad:
            continue
        (rest if exclude and is_excluded(name, p) else decay).append(p)
    groups = [dict(params=decay, weight_decay=weight_decay, lars=True)]
    if rest:
        groups.append(dict(params=rest, weight_decay=0.0, lars=False))
    return groups


def build(named: Iterable[tuple[str, nn.Parameter]], cfg) -> torch.optim.Optimizer:
    """The optimizer of ``cfg.optimizer`` over the trainable (online) parameters; lr is set every step by the loop."""
    groups = param_groups(named, cfg.weight_decay, cfg.wd_exclude_bn_bias)
    if cfg.optimizer == "sgd":
        for g in groups:
            g.pop("lars")
        return torch.optim.SGD(groups, lr=cfg.peak_lr, momentum=cfg.sgd_momentum)
    if cfg.optimizer == "lars":
        return LARS(groups, lr=cfg.peak_lr, momentum=cfg.sgd_momentum, eta=cfg.lars_eta)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")


def set_lr(opt: torch.optim.Optimizer, value: float) -> None:
    for g in opt.param_groups:
        g["lr"] = value
