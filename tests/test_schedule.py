"""Schedules (pure functions of the step), presets and the lr scaling rule."""

from itertools import pairwise

import pytest

from train import schedule
from train.config import TrainConfig, parse_args, preset


def test_lr_warmup_is_linear_then_cosine_to_zero():
    peak, total, warm = 0.4, 1000, 100
    lrs = [schedule.lr(s, peak=peak, total=total, warmup=warm) for s in range(total + 1)]
    assert lrs[0] == pytest.approx(peak / warm)
    assert lrs[49] == pytest.approx(peak * 50 / warm)
    assert lrs[warm - 1] == pytest.approx(peak) and lrs[warm] == pytest.approx(peak)
    assert all(a < b for a, b in pairwise(lrs[:warm]))
    assert all(a >= b for a, b in pairwise(lrs[warm:]))
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
    assert all(a <= b for a, b in pairwise(taus))
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
