"""UniVIP losses as pure functions of tensors (docs/method.md, "Losses").

Every function here is free of module state and of distributed calls, so it runs the same in a unit test, in a
single-process run and inside DDP. Shapes: B batch, K (= M = N) instances per view, D output dimension.

All losses compute in float32 with autocast switched off: cosines of bf16 vectors keep only ~3 significant digits,
and Sinkhorn's exp(-C/eps) needs the full exponent range. The inputs are tiny (B x K x D), so the cost is nil.
"""

from __future__ import annotations

import contextlib
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "byol_loss",
    "sinkhorn",
    "instance_ot_loss",
    "symmetric_instance_ot_loss",
    "scene_instance_loss",
    "ot_masses",
]


def _float32(device: torch.device):
    """A context that disables autocast on `device`'s type, so the body runs in the dtype of its inputs."""
    if device.type in ("cuda", "cpu", "xpu", "mps"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def _cos_matrix(a: Tensor, b: Tensor) -> Tensor:
    """Pairwise cosine similarity: a [B, M, D], b [B, N, D] -> [B, M, N] (float32)."""
    return torch.bmm(F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1).transpose(1, 2))


def byol_loss(p: Tensor, z: Tensor) -> Tensor:
    """BYOL regression loss L(p, z) = -<p, z> / (|p| |z|), averaged over the batch.

    p: online prediction [B, D]; z: target projection [B, D], treated as a constant (detached here).
    Returns a scalar in [-1, 1]; -1 when every p_i points along z_i.
    """
    with _float32(p.device):
        return -F.cosine_similarity(p.float(), z.detach().float(), dim=-1).mean()


@torch.no_grad()
def sinkhorn(cost: Tensor, row_mass: Tensor, col_mass: Tensor, eps: float, iters: int) -> Tensor:
    """Entropic optimal-transport plan by Sinkhorn-Knopp in the log domain, batched.

    cost: [B, M, N]; row_mass: [B, M] and col_mass: [B, N], non-negative, each summing to 1 per batch element.
    Returns the plan P [B, M, N] (float32, no gradient) with P = diag(u) exp(-C/eps) diag(v), where the scalings
    alternate u <- a / (K v) then v <- b / (K^T u), `iters` times each.

    The last update is the column one, so the columns sum to col_mass exactly (to float32 rounding) and the rows
    sum to row_mass up to the remaining Sinkhorn error, which shrinks with more iterations or a larger eps.
    Working with log u, log v and log K = -C/eps keeps tiny eps free of underflow (exp(-2/1e-4) is 0 in float32,
    its log is not). Zero masses give -inf log scalings and therefore zero rows/columns of the plan, never NaN,
    provided each marginal has some positive mass.
    """
    if iters < 1:
        raise ValueError(f"sinkhorn: iters must be >= 1, got {iters}")
    if eps <= 0:
        raise ValueError(f"sinkhorn: eps must be > 0, got {eps}")
    with _float32(cost.device):
        log_k = -cost.float() / eps  # [B, M, N]
        log_a = row_mass.float().log()  # [B, M]; log(0) = -inf is intended
        log_b = col_mass.float().log()  # [B, N]
        log_v = torch.zeros_like(log_b)
        for _ in range(iters):
            log_u = log_a - torch.logsumexp(log_k + log_v[:, None, :], dim=2)
            log_v = log_b - torch.logsumexp(log_k + log_u[:, :, None], dim=1)
        return torch.exp(log_u[:, :, None] + log_k + log_v[:, None, :])


def _normalise_mass(mass: Tensor) -> Tensor:
    """[B, M] non-negative -> rows summing to 1; a row that is all zero becomes uniform (docs/method.md)."""
    total = mass.sum(dim=1, keepdim=True)
    uniform = torch.full_like(mass, 1.0 / mass.shape[1])
    # where() instead of a Python branch: no device sync, and each batch element falls back on its own.
    return torch.where(total > 0, mass / total.clamp_min(torch.finfo(mass.dtype).tiny), uniform)


@torch.no_grad()
def ot_masses(o: Tensor, t: Tensor, f_o: Tensor, f_t: Tensor) -> tuple[Tensor, Tensor]:
    """Marginals of the instance transport problem (docs/method.md): an instance that agrees with the scene gets more mass.

    o [B, M, D] online instances, t [B, N, D] target instances, f_o [B, 2, D] online scene outputs,
    f_t [B, 2, D] target scene outputs. With x^ = x / |x|:
      row_mass_m ∝ max(o^_m · mean_s(f^_t,s), 0),  col_mass_n ∝ max(t^_n · mean_s(f^_o,s), 0),
    each normalised to sum 1 per batch element, uniform where all entries are zero.
    Returns (row_mass [B, M], col_mass [B, N]), float32, no gradient.
    """
    with _float32(o.device):
        scene_t = F.normalize(f_t.float(), dim=-1).mean(dim=1)  # [B, D]
        scene_o = F.normalize(f_o.float(), dim=-1).mean(dim=1)  # [B, D]
        rows = torch.einsum("bmd,bd->bm", F.normalize(o.float(), dim=-1), scene_t).clamp_min(0)
        cols = torch.einsum("bnd,bd->bn", F.normalize(t.float(), dim=-1), scene_o).clamp_min(0)
        return _normalise_mass(rows), _normalise_mass(cols)


def instance_ot_loss(o: Tensor, t: Tensor, f_o: Tensor, f_t: Tensor, eps: float = 0.05, iters: int = 50) -> Tensor:
    """Instance-instance loss by optimal transport, one direction (the caller symmetrises over the two views).

    o: online instance outputs of one view [B, K, D] (after projector + predictor; gradients flow into it);
    t: target instance outputs of the other view [B, K, D] (constant); f_o, f_t: online / target scene outputs of
    both views [B, 2, D], used only for the masses (constant).
    cost C_mn = 1 - cos(o_m, t_n); masses from `ot_masses`; plan = sinkhorn(C, rows, cols, eps, iters), a constant.
    Returns the batch mean of -sum_mn cos(o_m, t_n) * plan_mn, a scalar.
    """
    with _float32(o.device):
        cos = _cos_matrix(o, t.detach())  # [B, K, K]; gradient reaches o only
        rows, cols = ot_masses(o.detach(), t.detach(), f_o.detach(), f_t.detach())
        plan = sinkhorn(1.0 - cos.detach(), rows, cols, eps, iters)
        return -(cos * plan).sum(dim=(1, 2)).mean()


def symmetric_instance_ot_loss(
    o1: Tensor, o2: Tensor, t1: Tensor, t2: Tensor, f_o: Tensor, f_t: Tensor, eps: float = 0.05, iters: int = 50
) -> Tensor:
    """``instance_ot_loss(o1, t2, ...) + instance_ot_loss(o2, t1, ...)`` (docs/method.md: symmetrised over the views)
    as one call over a 2B batch: the two directions are independent transport problems, so stacking them gives the
    same plans and the same sum (up to float rounding of the mean), with one Sinkhorn loop instead of two. The loop is
    ~22 small CUDA kernels an iteration (logsumexp alone ~9), launch-bound on a GPU: at 50 iterations this saves
    ~1,100 launches a step."""
    o, t = torch.cat([o1, o2]), torch.cat([t2, t1])
    return 2 * instance_ot_loss(o, t, f_o.repeat(2, 1, 1), f_t.repeat(2, 1, 1), eps, iters)


def scene_instance_loss(o: Tensor, z_scenes: Tensor, linear: nn.Module) -> Tensor:
    """Scene-instance affinity loss: the K instances of a view, taken together, must agree with both scenes.

    o: online instance outputs [B, K, D]; z_scenes: target scene outputs of the two views [B, 2, D] (constant);
    linear: maps K*D -> D (the learned layer of docs/method.md).
    I = linear(o.flatten(1)) [B, D]; returns sum over s in {1, 2} of the batch mean of -cos(I, z_s), a scalar.
    """
    with _float32(o.device):
        inst = linear(o.float().flatten(1))  # [B, D]
        z = z_scenes.detach().float()
        # two scenes: never sum's 0 start
        return cast(Tensor, sum(-F.cosine_similarity(inst, z[:, s], dim=-1).mean() for s in range(z.shape[1])))
