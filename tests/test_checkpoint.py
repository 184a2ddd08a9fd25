"""Checkpoints: atomic save, strict weights_only round trip, config mismatch errors; export formats."""

import os
import pickle

import pytest
import torch
import torchvision

from train import checkpoint, export, optim
from train.config import preset
from train.model import ModelConfig, UniVIP


def _tiny(**overrides):
    import dataclasses

    return dataclasses.replace(preset("tiny"), proj_hidden=32, proj_dim=16, pred_hidden=32, **overrides)


@pytest.fixture(autouse=True)
def one_thread():
    # the test machine is small and shared: more threads only add contention for these tiny tensors
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _build(cfg, seed=0):
    torch.manual_seed(seed)
    model = UniVIP(ModelConfig.from_train(cfg))
    return model, optim.build([(n, p) for n, p in model.named_parameters() if p.requires_grad], cfg)


_CACHE = {}


def _trained(cfg):
    """A tiny model and its optimizer after one step (momentum buffers exist); built once per module."""
    if "trained" not in _CACHE:
        model, opt = _build(cfg)
        v = torch.rand(2, 3, 32, 32)
        boxes = torch.tensor([[0.0, 0, 16, 16], [8, 8, 24, 24], [0, 8, 32, 32], [4, 4, 12, 30]]).expand(2, 4, 4)
        model(v, v.flip(-1), boxes, boxes)["total"].backward()
        opt.step()
        _CACHE["trained"] = model, opt
    return _CACHE["trained"]


def _save(tmp_path, cfg, model, opt, step=7, **kw):
    return checkpoint.save(
        str(tmp_path),
        step,
        model=model,
        optimizer=opt,
        config=cfg,
        data_position={"epoch": 1, "samples": 56},
        rng=[checkpoint.rng_state()],
        world_size=1,
        **kw,
    )


def test_round_trip_is_exact_and_strict(tmp_path):
    cfg = _tiny()
    model, opt = _trained(cfg)
    path = _save(tmp_path, cfg, model, opt)
    assert os.path.basename(path) == "ckpt-00000007.pt"
    assert [n for n in os.listdir(tmp_path) if n.endswith(".tmp")] == []
    assert checkpoint.find_latest(str(tmp_path)) == path

    ckpt = checkpoint.load(path)
    assert ckpt["step"] == 7 and ckpt["data"] == {"epoch": 1, "samples": 56} and ckpt["config"] == cfg.to_dict()
    assert ckpt["versions"]["torch"] == str(torch.__version__)
    model2, opt2 = _build(cfg, seed=1)
    checkpoint.check_config(ckpt, cfg, world_size=1)
    checkpoint.restore(ckpt, model=model2, optimizer=opt2)
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(s1[i]["momentum_buffer"], s2[i]["momentum_buffer"]) for i in s1)

    # strict: a missing key is an error naming the file
    state = dict(ckpt["model"])
    state.pop(next(iter(state)))
    with pytest.raises(checkpoint.CheckpointError, match="ckpt-00000007"):
        checkpoint.restore({**ckpt, "model": state}, model=model2, optimizer=None, path=path)


def test_rng_states_restore():
    state = checkpoint.rng_state()
    import random

    import numpy as np

    a = (torch.rand(3), np.random.rand(3), random.random())
    checkpoint.set_rng_state(state)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and (a[1] == b[1]).all() and a[2] == b[2]


def test_config_mismatch_names_the_fields(tmp_path):
    cfg = _tiny()
    model, opt = _trained(cfg)
    ckpt = checkpoint.load(_save(tmp_path, cfg, model, opt))
    other = _tiny(k=3, arch="resnet50", workers=4)  # workers may change, k and arch may not
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.check_config(ckpt, other, world_size=1, path="ck.pt")
    msg = str(e.value)
    assert "ck.pt" in msg and "k: checkpoint 4 vs now 3" in msg and "arch" in msg and "workers" not in msg
    with pytest.raises(checkpoint.CheckpointError, match="world_size: checkpoint 1 vs now 2"):
        checkpoint.check_config(ckpt, cfg, world_size=2)


def test_unreadable_and_pruned(tmp_path):
    bad = tmp_path / "ckpt-00000001.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(checkpoint.CheckpointError, match="ckpt-00000001.pt: not a readable checkpoint"):
        checkpoint.load(str(bad))
    cfg = _tiny()
    model, opt = _trained(cfg)
    for step in (2, 3, 4):
        _save(tmp_path, cfg, model, opt, step=step, keep=2)
    assert sorted(os.listdir(tmp_path)) == ["ckpt-00000003.pt", "ckpt-00000004.pt"]


def test_export_torchvision_and_detectron2(tmp_path):
    cfg = _tiny(arch="resnet50")
    model, opt = _build(cfg)
    path = _save(tmp_path, cfg, model, opt)
    tv, d2 = str(tmp_path / "r50.pth"), str(tmp_path / "r50.pkl")
    for fmt, out in (("torchvision", tv), ("detectron2", d2)):
        assert export.main([path, "--format", fmt, "-o", out]) == 0

    sd = torch.load(tv, weights_only=True)
    res = torchvision.models.resnet50().load_state_dict(sd, strict=False)
    assert sorted(res.missing_keys) == ["fc.bias", "fc.weight"] and res.unexpected_keys == []
    assert torch.equal(sd["layer2.0.conv1.weight"], model.online.encoder.net.layer2[0].conv1.weight)

    with open(d2, "rb") as f:
        obj = pickle.load(f)
    assert obj["matching_heuristics"] is True and "__author__" in obj
    m = obj["model"]
    assert (m["stem.conv1.weight"] == sd["conv1.weight"].numpy()).all()
    assert (m["stem.conv1.norm.running_var"] == sd["bn1.running_var"].numpy()).all()
    assert (m["res2.0.conv3.norm.weight"] == sd["layer1.0.bn3.weight"].numpy()).all()
    assert (m["res5.0.shortcut.weight"] == sd["layer4.0.downsample.0.weight"].numpy()).all()
    assert (m["res3.0.shortcut.norm.bias"] == sd["layer2.0.downsample.1.bias"].numpy()).all()
    assert not any(k.endswith("num_batches_tracked") or k.startswith(("layer", "fc")) for k in m)
    assert len(m) == sum(not k.endswith("num_batches_tracked") for k in sd)


def test_detectron2_export_prints_the_config_that_matches_torchvision(tmp_path, capsys):
    # torchvision strides in the 3x3 conv; detectron2's default (STRIDE_IN_1X1 True) would load the same shapes
    # silently into another network, so the export must say how to build the right one
    cfg = _tiny()
    model, opt = _build(cfg)
    path = _save(tmp_path, cfg, model, opt)
    assert export.main([path, "--format", "detectron2", "-o", str(tmp_path / "r18.pkl")]) == 0
    err = capsys.readouterr().err
    for text in ("STRIDE_IN_1X1: False", "DEPTH: 18", "RES2_OUT_CHANNELS: 64", "FORMAT: RGB", "123.675"):
        assert text in err, text
    assert "RES2_OUT_CHANNELS" not in export.detectron2_config("resnet50", "x.pkl")


def test_detectron2_names():
    assert export.detectron2_name("layer3.5.bn2.running_mean") == "res4.5.conv2.norm.running_mean"
    assert export.detectron2_name("bn1.weight") == "stem.conv1.norm.weight"
    assert export.detectron2_name("layer1.0.downsample.1.num_batches_tracked") is None
