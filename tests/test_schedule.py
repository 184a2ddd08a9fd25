"""Schedules (pure functions of the step) and the optimizers built from the config."""

import math

import pytest
import torch
from torch import nn

from train import optim, schedule
from train.config import TrainConfig, parse_args, preset


def test_lr_warmup_is_linear_then_cosine_to_zero():
    peak, total, warm = 0.4, 1000, 100
    lrs = [schedule.lr(s, peak=peak, total=total, warmup=warm) for s in range(total + 1)]
    assert lrs[0] == pytest.approx(peak / warm)
    assert lrs[49] == pytest.approx(peak * 50 / warm)
    assert lrs[warm - 1] == pytest.approx(peak) and lrs[warm] == pytest.approx(peak)
    assert all(a < b for a, b in zip(lrs[: warm - 1], lrs[1:warm], strict=True))
    assert all(a >= b for a, b in zip(lrs[warm:], lrs[warm + 1 :], strict=False))
    assert lrs[warm + (total - warm) // 2] == pytest.approx(peak / 2)
    assert lrs[total] == pytest.approx(0.0, abs=1e-12)
    assert schedule.lr(5 * total, peak=peak, total=total, warmup=warm) == pytest.approx(0.0, abs=1e-12)


def test_lr_without_warmup_starts_at_peak():
    assert schedule.lr(0, peak=1.0, total=10, warmup=0) == pytest.approx(1.0)


def test_ema_tau_rises_from_base_to_one_monotonically():
    total = 500
    taus = [schedule.ema_tau(s, base=0.99, total=total) for s in range(total + 1)]
    assert taus[0] == pytest.approx(0.99)
    assert taus[-1] == pytest.approx(1.0)
    assert taus[total // 2] == pytest.approx(0.995)
    assert all(a <= b for a, b in zip(taus, taus[1:], strict=False))
    assert schedule.ema_tau(2 * total, base=0.99, total=total) == pytest.approx(1.0)


def test_presets_and_lr_scaling_rule():
    coco, imagenet = preset("coco"), preset("imagenet")
    assert (coco.batch_size, coco.optimizer, coco.peak_lr, coco.weight_decay, coco.warmup_epochs, coco.epochs) == (
        512,
        "sgd",
        0.4,
        1e-4,
        4,
        800,
    )
    assert (imagenet.batch_size, imagenet.optimizer, imagenet.weight_decay, imagenet.epochs) == (
        4096,
        "lars",
        1.5e-6,
        200,
    )
    assert imagenet.peak_lr == pytest.approx(3.2)
    # the global batch is split over ranks; lr follows --batch-size linearly
    cfg = parse_args(["--preset", "coco", "--batch-size", "256"])
    assert cfg.peak_lr == pytest.approx(0.2) and cfg.per_rank_batch(4) == 64
    with pytest.raises(ValueError, match="global batch"):
        cfg.per_rank_batch(3)
    assert parse_args(["--preset", "tiny", "--arch", "resnet50"]).arch == "resnet50"  # flags beat the preset


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="instance_mode"):
        TrainConfig(instance_mode="bogus").validate()
    with pytest.raises(ValueError, match="every loss weight is 0"):
        TrainConfig(w_scene=0, w_scene_instance=0, w_instance=0).validate()


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))


def test_param_groups_exclude_biases_and_bn():
    net = _net()
    groups = optim.param_groups(net.named_parameters(), 1e-4, exclude=True)
    assert [len(g["params"]) for g in groups] == [2, 4]  # conv.w + linear.w | conv.b, bn.w, bn.b, linear.b
    assert groups[1]["weight_decay"] == 0 and groups[1]["lars"] is False
    assert len(optim.param_groups(net.named_parameters(), 1e-4, exclude=False)) == 1


def test_lars_matches_hand_computed_update():
    w = nn.Parameter(torch.tensor([3.0, 4.0]))  # |w| = 5
    b = nn.Parameter(torch.tensor([1.0]))
    opt = optim.LARS(
        [dict(params=[w], weight_decay=0.1, lars=True), dict(params=[b], weight_decay=0.0, lars=False)],
        lr=0.5,
        momentum=0.9,
        eta=0.01,
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


def test_build_optimizers_train_a_tiny_net():
    for name in ("sgd", "lars"):
        net = _net()
        cfg = TrainConfig(
            optimizer=name, lr=0.1 if name == "sgd" else 1.0, lr_batch=512, weight_decay=1e-4, wd_exclude_bn_bias=True
        )
        opt = optim.build(net.named_parameters(), cfg)
        x, y = torch.randn(16, 3, 8, 8), torch.randn(16, 2)
        losses = []
        for _ in range(30):
            opt.zero_grad()
            loss = nn.functional.mse_loss(net(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[-1] < losses[0] and math.isfinite(losses[-1]), name
