"""train.losses against naive loops written from the paper's formulas (docs/method.md), plus degenerate cases."""

import math

import pytest
import torch
from torch import nn

from train.losses import (
    byol_loss,
    instance_ot_loss,
    ot_masses,
    scene_instance_loss,
    sinkhorn,
    symmetric_instance_ot_loss,
)

TOL = 1e-5


pytestmark = pytest.mark.usefixtures("torch_one_thread")


# ---- naive references: plain Python loops over batch, m, n, in float64 ----------------------------------------


def naive_cos(a, b):
    dot = sum(float(x) * float(y) for x, y in zip(a, b, strict=True))
    na = math.sqrt(sum(float(x) ** 2 for x in a))
    nb = math.sqrt(sum(float(y) ** 2 for y in b))
    return dot / (na * nb)


def naive_byol(p, z):
    return sum(-naive_cos(p[i], z[i]) for i in range(len(p))) / len(p)


def naive_sinkhorn(cost, a, b, eps, iters):
    """Probability-domain Sinkhorn-Knopp: u <- a / (K v), v <- b / (K^T u), K = exp(-C / eps)."""
    plans = []
    for bi in range(len(cost)):
        m_, n_ = len(cost[bi]), len(cost[bi][0])
        k = [[math.exp(-float(cost[bi][m][n]) / eps) for n in range(n_)] for m in range(m_)]
        u, v = [1.0] * m_, [1.0] * n_
        for _ in range(iters):
            u = [float(a[bi][m]) / sum(k[m][n] * v[n] for n in range(n_)) for m in range(m_)]
            v = [float(b[bi][n]) / sum(k[m][n] * u[m] for m in range(m_)) for n in range(n_)]
        plans.append([[u[m] * k[m][n] * v[n] for n in range(n_)] for m in range(m_)])
    return torch.tensor(plans, dtype=torch.float64)


def naive_masses(o, t, f_o, f_t):
    """row_m ∝ max(ô_m · mean(f̂_t), 0), col_n ∝ max(t̂_n · mean(f̂_o), 0); uniform if all zero."""

    def unit(x):
        n = math.sqrt(sum(float(e) ** 2 for e in x))
        return [float(e) / n for e in x]

    def mass(inst, scenes):
        s1, s2 = unit(scenes[0]), unit(scenes[1])
        mean = [(x + y) / 2 for x, y in zip(s1, s2, strict=True)]
        w = [max(sum(x * y for x, y in zip(unit(i), mean, strict=True)), 0.0) for i in inst]
        total = sum(w)
        return [x / total for x in w] if total > 0 else [1.0 / len(w)] * len(w)

    rows = [mass(o[b], f_t[b]) for b in range(len(o))]
    cols = [mass(t[b], f_o[b]) for b in range(len(t))]
    return rows, cols


def naive_instance_ot(o, t, f_o, f_t, eps, iters):
    rows, cols = naive_masses(o, t, f_o, f_t)
    bsz, k = len(o), len(o[0])
    cost = [[[1 - naive_cos(o[b][m], t[b][n]) for n in range(k)] for m in range(k)] for b in range(bsz)]
    plan = naive_sinkhorn(cost, rows, cols, eps, iters)
    total = 0.0
    for b in range(bsz):
        for m in range(k):
            for n in range(k):
                total += -naive_cos(o[b][m], t[b][n]) * float(plan[b, m, n])
    return total / bsz


def naive_scene_instance(o, z, weight, bias):
    total = 0.0
    for s in range(2):
        acc = 0.0
        for b in range(len(o)):
            flat = [float(x) for m in range(len(o[b])) for x in o[b][m]]
            inst = [sum(weight[j][i] * flat[i] for i in range(len(flat))) + bias[j] for j in range(len(weight))]
            acc += -naive_cos(inst, z[b][s])
        total += acc / len(o)
    return total


def _rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g)


def _ot_inputs(b=3, k=4, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    # A shared component makes most instance/scene dot products positive, so the masses are not all uniform.
    base = torch.randn(b, 1, d, generator=g)
    o = base + 0.7 * torch.randn(b, k, d, generator=g)
    t = base + 0.7 * torch.randn(b, k, d, generator=g)
    f_o = base + 0.7 * torch.randn(b, 2, d, generator=g)
    f_t = base + 0.7 * torch.randn(b, 2, d, generator=g)
    return o, t, f_o, f_t


# ---- byol_loss ---------------------------------------------------------------------------------------------------


def test_byol_matches_loop():
    p, z = _rand(5, 7, seed=1), _rand(5, 7, seed=2)
    assert abs(byol_loss(p, z).item() - naive_byol(p.tolist(), z.tolist())) < TOL


def test_byol_identical_is_minus_one_and_scale_free():
    p = _rand(4, 6)
    assert byol_loss(p, p).item() == pytest.approx(-1.0, abs=TOL)
    assert byol_loss(p, 3.0 * p).item() == pytest.approx(-1.0, abs=TOL)
    assert byol_loss(p, -p).item() == pytest.approx(1.0, abs=TOL)


def test_byol_no_grad_into_target():
    p = _rand(4, 6).requires_grad_()
    z = _rand(4, 6, seed=3).requires_grad_()
    byol_loss(p, z).backward()
    assert p.grad is not None and z.grad is None


# ---- sinkhorn ----------------------------------------------------------------------------------------------------


def _masses(b, n, seed):
    w = torch.rand(b, n, generator=torch.Generator().manual_seed(seed)) + 0.1
    return w / w.sum(1, keepdim=True)


@pytest.mark.parametrize("eps,iters", [(0.5, 5), (0.2, 30), (0.1, 50)])
def test_sinkhorn_matches_probability_domain_loop(eps, iters):
    cost = torch.rand(2, 4, 5, generator=torch.Generator().manual_seed(4)) * 2
    a, b = _masses(2, 4, 5), _masses(2, 5, 6)
    plan = sinkhorn(cost, a, b, eps, iters)
    ref = naive_sinkhorn(cost.tolist(), a.tolist(), b.tolist(), eps, iters)
    assert plan.dtype == torch.float32 and plan.shape == (2, 4, 5)
    assert torch.allclose(plan.double(), ref, atol=TOL)


def test_sinkhorn_marginals():
    cost = torch.rand(3, 4, 4, generator=torch.Generator().manual_seed(7)) * 2
    a, b = _masses(3, 4, 8), _masses(3, 4, 9)
    plan = sinkhorn(cost, a, b, eps=0.05, iters=200)
    # The column update runs last: columns are exact; rows converge.
    assert torch.allclose(plan.sum(1), b, atol=1e-6)
    assert torch.allclose(plan.sum(2), a, atol=1e-4)
    assert (plan >= 0).all()


def test_sinkhorn_permutation_equivariant():
    cost = torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(10)) * 2
    a, b = _masses(2, 4, 11), _masses(2, 4, 12)
    perm = torch.tensor([2, 0, 3, 1])
    plan = sinkhorn(cost, a, b, 0.1, 50)
    assert torch.allclose(sinkhorn(cost[:, :, perm], a, b[:, perm], 0.1, 50), plan[:, :, perm], atol=1e-6)
    assert torch.allclose(sinkhorn(cost[:, perm], a[:, perm], b, 0.1, 50), plan[:, perm], atol=1e-6)


def test_sinkhorn_large_eps_is_product_of_marginals():
    cost = torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(13)) * 2
    a, b = _masses(2, 4, 14), _masses(2, 4, 15)
    plan = sinkhorn(cost, a, b, eps=1e4, iters=10)
    assert torch.allclose(plan, a[:, :, None] * b[:, None, :], atol=1e-5)


def test_sinkhorn_tiny_eps_log_domain_is_finite():
    cost = torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(16)) * 2
    a, b = _masses(2, 4, 17), _masses(2, 4, 18)
    plan = sinkhorn(cost, a, b, eps=1e-4, iters=50)
    assert torch.isfinite(plan).all()
    # log K = -C/eps reaches 2e4 here; float32 keeps ~1e-3 absolute precision on it, hence the looser bound.
    assert torch.allclose(plan.sum(1), b, atol=1e-3)


def test_sinkhorn_zero_mass_entries():
    cost = torch.rand(1, 3, 3, generator=torch.Generator().manual_seed(19))
    a = torch.tensor([[0.5, 0.0, 0.5]])
    b = torch.tensor([[0.0, 0.25, 0.75]])
    plan = sinkhorn(cost, a, b, 0.05, 100)
    assert torch.isfinite(plan).all()
    assert (plan[0, 1] == 0).all() and (plan[0, :, 0] == 0).all()
    assert torch.allclose(plan.sum(2), a, atol=1e-5)


def test_sinkhorn_no_grad_and_float32_under_autocast():
    cost = (torch.rand(2, 3, 3) * 2).requires_grad_()
    a, b = _masses(2, 3, 20), _masses(2, 3, 21)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plan = sinkhorn(cost.bfloat16(), a, b, 0.05, 50)
    assert not plan.requires_grad and plan.dtype == torch.float32
    with pytest.raises(ValueError, match="iters"):
        sinkhorn(cost, a, b, 0.05, 0)


# ---- instance_ot_loss ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("eps,iters", [(0.5, 10), (0.1, 50)])
def test_instance_ot_matches_loop(eps, iters):
    o, t, f_o, f_t = _ot_inputs()
    got = instance_ot_loss(o, t, f_o, f_t, eps=eps, iters=iters).item()
    want = naive_instance_ot(o.tolist(), t.tolist(), f_o.tolist(), f_t.tolist(), eps, iters)
    assert abs(got - want) < TOL


def test_symmetric_instance_ot_is_both_directions_in_one_batch():
    """Value against the naive loop of each direction, gradients against the two separate calls."""
    o1, t1, f_o, f_t = _ot_inputs(seed=8)
    o2, t2, _, _ = _ot_inputs(seed=9)
    o1.requires_grad_(True)
    o2.requires_grad_(True)
    got = symmetric_instance_ot_loss(o1, o2, t1, t2, f_o, f_t, eps=0.1, iters=30)
    want = sum(
        naive_instance_ot(o.tolist(), t.tolist(), f_o.tolist(), f_t.tolist(), 0.1, 30) for o, t in ((o1, t2), (o2, t1))
    )
    assert abs(got.item() - want) < 2 * TOL
    g_batched = torch.autograd.grad(got, (o1, o2))
    pair = instance_ot_loss(o1, t2, f_o, f_t, 0.1, 30) + instance_ot_loss(o2, t1, f_o, f_t, 0.1, 30)
    torch.testing.assert_close(got, pair, rtol=0, atol=1e-6)
    for a, b in zip(g_batched, torch.autograd.grad(pair, (o1, o2)), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)


def test_ot_masses_match_loop_and_are_not_trivial():
    o, t, f_o, f_t = _ot_inputs(seed=5)
    rows, cols = ot_masses(o, t, f_o, f_t)
    nrows, ncols = naive_masses(o.tolist(), t.tolist(), f_o.tolist(), f_t.tolist())
    assert torch.allclose(rows.double(), torch.tensor(nrows, dtype=torch.float64), atol=TOL)
    assert torch.allclose(cols.double(), torch.tensor(ncols, dtype=torch.float64), atol=TOL)
    assert (rows.std(1) > 0).all()  # the inputs really exercise the scene weighting


def test_ot_masses_all_zero_fall_back_to_uniform():
    o, t, f_o, f_t = _ot_inputs(b=2, k=3)
    # Scenes pointing away from every instance: all dot products negative -> all masses clipped to zero.
    o, t = o.abs() + 0.1, t.abs() + 0.1
    f_o, f_t = -(f_o.abs() + 0.1), -(f_t.abs() + 0.1)
    rows, cols = ot_masses(o, t, f_o, f_t)
    assert torch.allclose(rows, torch.full((2, 3), 1 / 3)) and torch.allclose(cols, torch.full((2, 3), 1 / 3))
    loss = instance_ot_loss(o, t, f_o, f_t)
    want = naive_instance_ot(o.tolist(), t.tolist(), f_o.tolist(), f_t.tolist(), 0.05, 50)
    assert abs(loss.item() - want) < TOL


def test_instance_ot_permuting_target_instances_permutes_plan_and_keeps_loss():
    o, t, f_o, f_t = _ot_inputs(seed=6)
    perm = torch.tensor([3, 1, 0, 2])
    base = instance_ot_loss(o, t, f_o, f_t, eps=0.1)
    assert instance_ot_loss(o, t[:, perm], f_o, f_t, eps=0.1).item() == pytest.approx(base.item(), abs=1e-6)
    assert instance_ot_loss(o[:, perm], t, f_o, f_t, eps=0.1).item() == pytest.approx(base.item(), abs=1e-6)
    rows, cols = ot_masses(o, t, f_o, f_t)
    cost = 1 - torch.nn.functional.cosine_similarity(o[:, :, None], t[:, None], dim=-1)
    plan = sinkhorn(cost, rows, cols, 0.1, 50)
    rows_p, cols_p = ot_masses(o, t[:, perm], f_o, f_t)
    plan_p = sinkhorn(cost[:, :, perm], rows_p, cols_p, 0.1, 50)
    assert torch.allclose(plan_p, plan[:, :, perm], atol=1e-6)


def test_instance_ot_identical_instances():
    o, t, f_o, f_t = _ot_inputs(b=2, k=4)
    same = o[:, :1].expand(-1, 4, -1).contiguous()
    rows, cols = ot_masses(same, same, f_o, f_t)
    assert torch.allclose(rows, torch.full_like(rows, 0.25)) and torch.allclose(cols, torch.full_like(cols, 0.25))
    # Every pair has cosine 1 and the plan sums to 1: the loss is exactly -1.
    assert instance_ot_loss(same, same, f_o, f_t).item() == pytest.approx(-1.0, abs=TOL)


def test_instance_ot_single_instance():
    o, t, f_o, f_t = _ot_inputs(b=3, k=1)
    want = sum(-naive_cos(o[b, 0].tolist(), t[b, 0].tolist()) for b in range(3)) / 3
    assert instance_ot_loss(o, t, f_o, f_t).item() == pytest.approx(want, abs=TOL)


def test_instance_ot_tiny_eps_finite():
    o, t, f_o, f_t = _ot_inputs()
    o.requires_grad_()
    loss = instance_ot_loss(o, t, f_o, f_t, eps=1e-4, iters=50)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(o.grad).all()


def test_instance_ot_gradient_reaches_online_only():
    o, t, f_o, f_t = (x.requires_grad_() for x in _ot_inputs())
    instance_ot_loss(o, t, f_o, f_t).backward()
    assert o.grad is not None and o.grad.abs().sum() > 0
    assert t.grad is None and f_o.grad is None and f_t.grad is None


def test_instance_ot_gradient_treats_plan_as_constant():
    o, t, f_o, f_t = _ot_inputs(b=2)
    o.requires_grad_()
    loss = instance_ot_loss(o, t, f_o, f_t, eps=0.1)
    loss.backward()
    rows, cols = ot_masses(o, t, f_o, f_t)
    cost = 1 - torch.nn.functional.cosine_similarity(o[:, :, None], t[:, None], dim=-1)
    plan = sinkhorn(cost, rows, cols, 0.1, 50)
    o2 = o.detach().clone().requires_grad_()
    cos = torch.nn.functional.cosine_similarity(o2[:, :, None], t[:, None], dim=-1)
    (-(cos * plan).sum((1, 2)).mean()).backward()
    assert torch.allclose(o.grad, o2.grad, atol=1e-6)


def test_instance_ot_under_bf16_autocast():
    o, t, f_o, f_t = _ot_inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = instance_ot_loss(o.bfloat16(), t.bfloat16(), f_o.bfloat16(), f_t.bfloat16())
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert loss.item() == pytest.approx(instance_ot_loss(o, t, f_o, f_t).item(), abs=0.05)


# ---- scene_instance_loss -------------------------------------------------------------------------------------------


def test_scene_instance_matches_loop():
    torch.manual_seed(0)
    b, k, d = 3, 4, 5
    o, z = _rand(b, k, d, seed=30), _rand(b, 2, d, seed=31)
    linear = nn.Linear(k * d, d)
    got = scene_instance_loss(o, z, linear).item()
    want = naive_scene_instance(o.tolist(), z.tolist(), linear.weight.tolist(), linear.bias.tolist())
    assert abs(got - want) < TOL


def test_scene_instance_gradients():
    torch.manual_seed(0)
    o = _rand(2, 4, 3).requires_grad_()
    z = _rand(2, 2, 3, seed=1).requires_grad_()
    linear = nn.Linear(12, 3)
    scene_instance_loss(o, z, linear).backward()
    assert o.grad is not None and linear.weight.grad is not None and z.grad is None


def test_scene_instance_range():
    torch.manual_seed(0)
    linear = nn.Linear(8, 4)
    o = _rand(4, 2, 4)
    z_same = linear(o.flatten(1)).detach()[:, None].expand(-1, 2, -1)
    assert scene_instance_loss(o, z_same, linear).item() == pytest.approx(-2.0, abs=TOL)
