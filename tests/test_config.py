"""train.config: views per method, instance source, validation, the view settings the loop derives."""

from __future__ import annotations

import dataclasses

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
