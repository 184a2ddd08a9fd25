"""train.step: a collated batch -> model inputs (views, boxes, instance crops coloured like their view) -> one step."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.test_gpu_decode import batch_of
from tests.test_views import make_sample, random_boxes
from train.model import ModelConfig, UniVIP
from train.step import model_inputs, step_generator, train_step
from train.views import UniVIPTransform, ViewConfig

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def photo_sample():
    from PIL import Image

    from tests.imagegen import photo_path

    img = Image.open(photo_path("coffee.jpg")).convert("RGB")
    return make_sample(np.asarray(img), random_boxes(img.width, img.height, 30, np.random.default_rng(0), 0.4))


def collated(sample, cfg: ViewConfig, n: int = 3) -> dict:
    t = UniVIPTransform(cfg)
    return batch_of([t(sample, np.random.default_rng(i)) for i in range(n)])


def denormalise(x: torch.Tensor) -> torch.Tensor:
    """Normalised images [..., 3, H, W] -> [0, 1] pixels."""
    from train.augment import IMAGENET_MEAN, IMAGENET_STD

    return x * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)


def is_grey(x: torch.Tensor) -> bool:
    raw = denormalise(x)
    return bool((raw[..., 0, :, :] - raw[..., 1, :, :]).abs().max() < 1e-4)


@pytest.mark.parametrize("gpu_decode", [False, True])
def test_gpu_aug_colours_instances_like_their_view(photo_sample, gpu_decode):
    """One set of colour parameters per view and sample, applied to the view and its K instances."""
    cfg = ViewConfig(
        size=32,
        instance_size=24,
        instance_crops=True,
        gpu_aug=True,
        gpu_decode=gpu_decode,
        gray_p=1.0,
        jitter_p=0.0,
        blur_p=(0.0, 0.0),
        solarize_p=(0.0, 0.0),
    )
    x = model_inputs(collated(photo_sample, cfg), cfg, torch.device("cpu"), step_generator(0, 0, 0))
    assert x["view1"].shape == (3, 3, 32, 32) and x["crops1"].shape == (3, 4, 3, 24, 24)
    assert all(is_grey(x[k]) for k in ("view1", "view2", "crops1", "crops2"))
    # solarize drawn for view 2 only (p 0 / 1), no flips: view 2's instances are view 1's solarized
    sol = ViewConfig(
        size=32,
        instance_size=24,
        instance_crops=True,
        gpu_aug=True,
        gpu_decode=gpu_decode,
        flip=0.0,
        gray_p=0.0,
        jitter_p=0.0,
        blur_p=(0.0, 0.0),
        solarize_p=(0.0, 1.0),
    )
    y = model_inputs(collated(photo_sample, sol), sol, torch.device("cpu"), step_generator(0, 0, 0))
    raw1, raw2 = denormalise(y["crops1"]), denormalise(y["crops2"])
    torch.testing.assert_close(raw2, torch.where(raw1 >= 0.5, 1 - raw1, raw1), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="generator"):
        model_inputs(collated(photo_sample, cfg), cfg, torch.device("cpu"))


def test_cpu_path_inputs_are_normalised_crops(photo_sample):
    cfg = ViewConfig(size=32, instance_size=24, instance_crops=True)
    b = collated(photo_sample, cfg)
    x = model_inputs(b, cfg, torch.device("cpu"))
    from train.augment import normalize

    assert torch.equal(x["crops2"], normalize(b["inst2"].flatten(0, 1)).view(3, 4, 3, 24, 24))
    assert torch.equal(x["view1"], normalize(b["view1"]))
    none = model_inputs(collated(photo_sample, ViewConfig(size=32)), ViewConfig(size=32), torch.device("cpu"))
    assert none["crops1"] is None and none["crops2"] is None


def test_train_step_updates_online_and_moves_target_by_ema(photo_sample):
    cfg = ViewConfig(size=32, instance_size=24, instance_crops=True)
    torch.manual_seed(0)
    model = UniVIP(ModelConfig(arch="resnet18", proj_hidden=32, proj_dim=16, pred_hidden=32, instance_size=24))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    online0 = [p.detach().clone() for p in model.online.parameters()]
    target0 = [p.detach().clone() for p in model.target.parameters()]
    out = train_step(model, model, opt, model_inputs(collated(photo_sample, cfg), cfg, torch.device("cpu")), tau=0.9)
    assert set(out) >= {"total", "z_std"} and torch.isfinite(out["total"])
    for t0, o1, t1 in zip(target0, model.online.parameters(), model.target.parameters(), strict=True):
        torch.testing.assert_close(t1, 0.9 * t0 + 0.1 * o1)  # EMA with the updated online weights
    assert any(not torch.equal(a, b) for a, b in zip(online0, model.online.parameters(), strict=True))
