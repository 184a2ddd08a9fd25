"""train.optim: weight-decay exclusions, SGD and LARS as built from the config, their update kernels (foreach, fused,
loop) against each other and LARS against a loop written from its formula, the learning rate set by the loop."""

import dataclasses
import math

import pytest
import torch
from torch import nn

from train import optim
from train.config import TrainConfig, preset

pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _net(seed: int = 0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))


def _train(net: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 1) -> list[float]:
    """``steps`` steps on one fixed random batch; the losses."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(16, 3, 8, 8, generator=g), torch.randn(16, 2, generator=g)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(net(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_param_groups_exclude_biases_and_bn():
    net = _net()
    groups = optim.param_groups(net.named_parameters(), 1e-4, exclude=True)
    assert [len(g["params"]) for g in groups] == [2, 4]  # conv.w + linear.w | conv.b, bn.w, bn.b, linear.b
    assert groups[1]["weight_decay"] == 0 and groups[1]["lars"] is False
    assert len(optim.param_groups(net.named_parameters(), 1e-4, exclude=False)) == 1


def test_lars_matches_hand_computed_update():
    for foreach in (True, False):
        w = nn.Parameter(torch.tensor([3.0, 4.0]))  # |w| = 5
        b = nn.Parameter(torch.tensor([1.0]))
        opt = optim.LARS(
            [dict(params=[w], weight_decay=0.1, lars=True), dict(params=[b], weight_decay=0.0, lars=False)],
            lr=0.5,
            momentum=0.9,
            eta=0.01,
            foreach=foreach,
        )
        w.grad = torch.tensor([0.0, 1.0])
        b.grad = torch.tensor([2.0])
        opt.step()
        g = torch.tensor([0.3, 1.4])  # grad + wd * w
        trust = 0.01 * 5 / g.norm()
        torch.testing.assert_close(w.detach(), torch.tensor([3.0, 4.0]) - 0.5 * trust * g)
        torch.testing.assert_close(b.detach(), torch.tensor([0.0]))  # plain momentum SGD, no trust ratio
        b.grad = torch.tensor([2.0])
        opt.step()
        torch.testing.assert_close(b.detach(), torch.tensor([0.0 - 0.5 * (0.9 * 2 + 2)]))


def naive_lars(params_groups: list[dict], state: dict, lr: float, momentum: float, eta: float) -> None:
    """One LARS step written from the formula, tensor by tensor, in float64 Python numbers for the norms."""
    with torch.no_grad():
        for group in params_groups:
            for p in group["params"]:
                g = p.grad + group["weight_decay"] * p
                if group["lars"]:
                    w_norm = math.sqrt(float((p.double() ** 2).sum()))
                    g_norm = math.sqrt(float((g.double() ** 2).sum()))
                    if w_norm > 0 and g_norm > 0:
                        g = g * (eta * w_norm / g_norm)
                v = state.get(p)
                state[p] = g.clone() if v is None else momentum * v + g
                p -= lr * state[p]


@pytest.mark.parametrize("foreach", [True, False])
def test_lars_equals_the_formula_over_several_steps(foreach):
    net, ref = _net(), _net()
    groups = optim.param_groups(net.named_parameters(), 1e-3, exclude=True)
    ref_groups = optim.param_groups(ref.named_parameters(), 1e-3, exclude=True)
    opt = optim.LARS(groups, lr=0.5, momentum=0.9, eta=0.02, foreach=foreach)
    g = torch.Generator().manual_seed(3)
    state = {}
    for step in range(5):
        lr = 0.5 * (step + 1) / 5  # the loop changes the lr every step
        optim.set_lr(opt, lr)
        x, y = torch.randn(16, 3, 8, 8, generator=g), torch.randn(16, 2, generator=g)
        for m in (net, ref):
            m.zero_grad()
            nn.functional.mse_loss(m(x), y).backward()
        if step == 2:  # a zero gradient: trust ratio 1, not a division by zero
            net[0].weight.grad.zero_()
            ref[0].weight.grad.zero_()
        opt.step()
        naive_lars(ref_groups, state, lr, 0.9, 0.02)
        for (name, a), b in zip(net.named_parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"step {step}: {name}")


def test_lars_kernels_agree_and_keep_the_state_layout():
    a, b = _net(), _net()
    cfg = TrainConfig(optimizer="lars", lr=1.0, lr_batch=512, weight_decay=1e-4, wd_exclude_bn_bias=True)
    opt_a = optim.build(a.named_parameters(), dataclasses.replace(cfg, optim_impl="foreach"))
    opt_b = optim.build(b.named_parameters(), dataclasses.replace(cfg, optim_impl="loop"))
    assert opt_a.foreach and not opt_b.foreach
    assert _train(a, opt_a, 4) == pytest.approx(_train(b, opt_b, 4), rel=1e-6)
    sa, sb = opt_a.state_dict(), opt_b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]  # a checkpoint does not depend on the kernels
    for i in sa["state"]:
        torch.testing.assert_close(sa["state"][i]["momentum_buffer"], sb["state"][i]["momentum_buffer"])


@pytest.mark.parametrize(
    "impl, foreach, fused",
    [("auto", True, False), ("foreach", True, False), ("loop", False, False), ("fused", False, True)],
)
def test_sgd_kernels_on_cpu(impl, foreach, fused):
    net = _net()
    cfg = TrainConfig(lr=0.1, lr_batch=512, weight_decay=1e-4, optim_impl=impl)
    opt = optim.build(net.named_parameters(), cfg)
    assert isinstance(opt, torch.optim.SGD)
    assert all(g["foreach"] is foreach and g["fused"] is fused and g["momentum"] == 0.9 for g in opt.param_groups)
    ref_net = _net()
    ref = torch.optim.SGD(ref_net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, foreach=False)
    assert _train(net, opt, 5) == pytest.approx(_train(ref_net, ref, 5), rel=1e-5)


def test_resolve_impl_per_device_and_optimizer():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert optim.resolve_impl("auto", "sgd", cuda) == "fused" and optim.resolve_impl("auto", "sgd", cpu) == "foreach"
    assert (
        optim.resolve_impl("auto", "lars", cuda) == "foreach" and optim.resolve_impl("fused", "lars", cuda) == "foreach"
    )
    assert optim.resolve_impl("loop", "sgd", cuda) == "loop"
    with pytest.raises(ValueError, match="optimizer implementation"):
        optim.resolve_impl("bogus", "sgd", cpu)


def test_the_run_keeps_its_kernels_when_loading_a_checkpoint():
    """SGD keeps foreach/fused in its param groups, which load_state_dict replaces with the saved ones."""
    old_net, net = _net(), _net()
    old = optim.build(old_net.named_parameters(), TrainConfig(optim_impl="loop"))
    _train(old_net, old, 1)
    opt = optim.build(net.named_parameters(), TrainConfig(optim_impl="fused"))
    opt.load_state_dict(old.state_dict())
    assert all(g["fused"] is True and g["foreach"] is False for g in opt.param_groups)
    assert len(opt.state) == len(old.state)


def test_set_lr_sets_every_group():
    net = _net()
    opt = optim.build(net.named_parameters(), TrainConfig(wd_exclude_bn_bias=True))
    optim.set_lr(opt, 0.123)
    assert len(opt.param_groups) == 2 and all(g["lr"] == 0.123 for g in opt.param_groups)


def test_build_optimizers_train_a_tiny_net():
    for name in ("sgd", "lars"):
        net = _net()
        cfg = TrainConfig(
            optimizer=name, lr=0.1 if name == "sgd" else 1.0, lr_batch=512, weight_decay=1e-4, wd_exclude_bn_bias=True
        )
        losses = _train(net, optim.build(net.named_parameters(), cfg), 30)
        assert losses[-1] < losses[0] and math.isfinite(losses[-1]), name
    assert optim.build(_net().named_parameters(), preset("imagenet")).param_groups[0]["lr"] == pytest.approx(3.2)
