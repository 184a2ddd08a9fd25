"""train.config: views per method, instance source, validation, the view settings the loop derives."""

from __future__ import annotations

import dataclasses
import os

import pytest

from train.config import RESUME_MUST_MATCH, TrainConfig, parse_args, preset
from train.setup import view_config


def test_views_default_per_method():
    byol = parse_args(["--preset", "tiny", "--method", "byol"])
    assert byol.view_mode == "byol" and view_config(byol).views == "byol" and not view_config(byol).instance_crops
    univip = parse_args(["--preset", "tiny"])
    assert univip.view_mode == "overlap" and view_config(univip).instance_crops
    ablation = parse_args(["--preset", "tiny", "--method", "byol", "--views", "overlap"])
    assert view_config(ablation).views == "overlap"


def test_instance_source_and_mode_decide_the_pipeline_crops():
    base = preset("tiny")
    assert dataclasses.replace(base, instance_source="view").instance_crops is False
    assert dataclasses.replace(base, instance_mode="roi").instance_crops is False
    assert dataclasses.replace(base, w_scene_instance=0.0, w_instance=0.0).instance_crops is False
    assert base.instance_crops is True
    assert {"views", "instance_source"} <= set(RESUME_MUST_MATCH)


def test_univip_on_byol_views_is_refused(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--preset", "tiny", "--views", "byol"])
    assert "UniVIP needs --views overlap" in capsys.readouterr().err
    with pytest.raises(ValueError, match="eval_val_fraction"):
        TrainConfig(eval_val_fraction=1.0).validate()


def test_renamed_momentum_reads_old_flags_and_configs(capsys):
    """`momentum` (SGD / LARS) became `sgd_momentum`; the old flag still works for one release, with a warning."""
    assert parse_args(["--preset", "tiny", "--momentum", "0.8"]).sgd_momentum == 0.8
    err = capsys.readouterr().err
    assert "warning: --momentum is deprecated" in err and "use --sgd-momentum" in err
    assert parse_args(["--preset", "tiny", "--sgd-momentum", "0.7"]).sgd_momentum == 0.7
    assert "deprecated" not in capsys.readouterr().err
    old = preset("tiny").to_dict()
    old["momentum"] = old.pop("sgd_momentum") / 2  # a config.json or checkpoint written before the rename
    assert TrainConfig.from_dict(old) == dataclasses.replace(preset("tiny"), sgd_momentum=0.45)
    with pytest.raises(ValueError, match="unknown config fields"):
        TrainConfig.from_dict({**old, "bogus": 1})


def test_default_worker_counts_follow_the_usable_cores(monkeypatch):
    from train import config
    from train import eval as ev

    cores = config.usable_cores()
    assert cores == len(os.sched_getaffinity(0))
    assert config.default_workers(64) == cores and config.default_workers(1) == 1
    # the coco preset's default and train.eval's: never more workers than cores (the DataLoader would warn)
    assert TrainConfig().workers == min(8, cores)
    assert ev.build_parser().parse_args(["--random-init"]).workers == min(4, cores)
    monkeypatch.setattr(config.os, "sched_getaffinity", lambda pid: {0, 1, 2})
    assert config.default_workers(8) == 3
