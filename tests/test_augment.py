"""train.augment: batched colour ops against torchvision per sample, probabilities, normalisation, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from train import augment
from train.augment import IMAGENET_MEAN, IMAGENET_STD, gpu_colour, sample_params
from train.views import ViewConfig

NO_COLOUR = dict(jitter_p=0.0, gray_p=0.0, blur_p=(0.0, 0.0), solarize_p=(0.0, 0.0))


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    """uint8 [6, 3, 40, 48]: crops of a real photo plus a gray ramp and a flat image."""
    from tests.imagegen import photo_path

    photo = torch.from_numpy(np.asarray(Image.open(photo_path("astronaut.jpg")).convert("RGB")).copy())
    photo = photo.permute(2, 0, 1)
    crops = [photo[:, y : y + 40, x : x + 48] for y, x in ((0, 0), (100, 120), (200, 60), (250, 250))]
    ramp = torch.linspace(0, 255, 48).round().to(torch.uint8).expand(3, 40, 48)
    flat = torch.full((3, 40, 48), 90, dtype=torch.uint8)
    return torch.stack(crops + [ramp, flat]).contiguous()


def denorm(y: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return y * std + mean


def test_identity_when_every_probability_is_zero(batch):
    g = torch.Generator().manual_seed(0)
    for view in (0, 1):
        y = gpu_colour(batch, view, g, ViewConfig(**NO_COLOUR))
        assert y.dtype == torch.float32 and y.shape == batch.shape
        assert torch.allclose(y, augment.normalize(batch), atol=1e-6)
        assert torch.allclose(denorm(y), batch.float() / 255, atol=1e-6)
    # float input in [0, 1] is the same as uint8 input
    y_float = gpu_colour(batch.float() / 255, 0, g, ViewConfig(**NO_COLOUR))
    assert torch.allclose(y_float, augment.normalize(batch), atol=1e-6)


def test_per_sample_parameters_differ(batch):
    same = batch[1:2].expand(8, -1, -1, -1).contiguous()
    y = gpu_colour(same, 0, torch.Generator().manual_seed(0), ViewConfig(jitter_p=1.0, gray_p=0.0))
    flat = y.flatten(1)
    for i in range(8):
        for j in range(i + 1, 8):
            assert not torch.allclose(flat[i], flat[j], atol=1e-3)


def test_asymmetric_probabilities_per_view():
    g = torch.Generator().manual_seed(1)
    cfg = ViewConfig()
    p0, p1 = sample_params(4000, 0, g, cfg), sample_params(4000, 1, g, cfg)
    assert p0["blur"].all() and not p0["solarize"].any()
    assert abs(p1["blur"].float().mean() - 0.1) < 0.02 and abs(p1["solarize"].float().mean() - 0.2) < 0.02
    assert abs(p0["jitter"].float().mean() - 0.8) < 0.02 and abs(p0["gray"].float().mean() - 0.2) < 0.02
    f = p0["factors"]
    assert f[:, 0].min() >= 0.6 and f[:, 0].max() <= 1.4 and f[:, 2].min() >= 0.8 and f[:, 2].max() <= 1.2
    assert f[:, 3].abs().max() <= 0.1 and p0["sigma"].min() >= 0.1 and p0["sigma"].max() <= 2.0
    assert (p0["order"].sort(dim=1).values == torch.arange(4)).all()
    assert len({tuple(o) for o in p0["order"].tolist()}) == 24  # every order occurs


def test_grayscale_gives_equal_channels(batch):
    y = denorm(gpu_colour(batch, 0, torch.Generator().manual_seed(0), ViewConfig(**dict(NO_COLOUR, gray_p=1.0))))
    assert torch.allclose(y[:, 0], y[:, 1], atol=1e-5) and torch.allclose(y[:, 1], y[:, 2], atol=1e-5)
    ref = TF.rgb_to_grayscale(batch.float() / 255, num_output_channels=3)
    assert torch.allclose(y, ref, atol=1e-5)


def test_solarize_threshold(batch):
    cfg = ViewConfig(**dict(NO_COLOUR, solarize_p=(0.0, 1.0)))
    ramp = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(1, 3, 16, 16).contiguous()
    y = denorm(gpu_colour(ramp, 1, torch.Generator().manual_seed(0), cfg))[0, 0].flatten() * 255
    v = torch.arange(256).float()
    expect = torch.where(v >= 128, 255 - v, v)
    assert torch.allclose(y, expect, atol=1e-3)
    # view 0 never solarizes under BYOL's probabilities
    y0 = denorm(gpu_colour(ramp, 0, torch.Generator().manual_seed(0), cfg))[0, 0].flatten() * 255
    assert torch.allclose(y0, v, atol=1e-3)


def test_blur_matches_torchvision_per_sample_and_keeps_constants(batch):
    x = batch.float() / 255
    sigma = torch.tensor([0.1, 0.7, 1.3, 2.0, 1.0, 1.5])
    y = augment.gaussian_blur(x, sigma, 23)
    for i in range(len(x)):
        ref = TF.gaussian_blur(x[i], [23, 23], [float(sigma[i])] * 2)
        assert torch.allclose(y[i], ref, atol=1e-5)
    assert torch.allclose(y[5], x[5], atol=1e-6)  # the flat image stays flat, mean kept
    assert abs(y[5].mean() - x[5].mean()) < 1e-6
    same = augment.gaussian_blur(x, torch.zeros(6), 23)  # sigma 0: untouched
    assert torch.equal(same, x)


def test_jitter_ops_match_torchvision_per_sample(batch):
    x = batch.float() / 255
    f = torch.tensor([0.6, 0.9, 1.2, 1.4, 1.0, 0.75])
    h = torch.tensor([-0.1, -0.05, 0.0, 0.03, 0.1, 0.5])
    got = {
        "brightness": augment.brightness(x, f),
        "contrast": augment.contrast(x, f),
        "saturation": augment.saturation(x, f),
        "hue": augment.hue(x, h),
    }
    for i in range(len(x)):
        assert torch.allclose(got["brightness"][i], TF.adjust_brightness(x[i], float(f[i])), atol=1e-6)
        assert torch.allclose(got["contrast"][i], TF.adjust_contrast(x[i], float(f[i])), atol=1e-5)
        assert torch.allclose(got["saturation"][i], TF.adjust_saturation(x[i], float(f[i])), atol=1e-5)
        assert torch.allclose(got["hue"][i], TF.adjust_hue(x[i], float(h[i])), atol=1e-5)


def test_random_order_and_full_pipeline_match_sequential_torchvision(batch):
    x = batch.float() / 255
    n = len(x)
    g = torch.Generator().manual_seed(3)
    cfg = ViewConfig(jitter_p=1.0, gray_p=0.5, blur_p=(1.0, 0.5), solarize_p=(0.0, 0.5))
    p = sample_params(n, 1, g, cfg)
    p["order"] = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2], [2, 0, 3, 1], [0, 2, 1, 3], [3, 0, 2, 1]])
    p["jitter"][0] = False
    y = denorm(gpu_colour(batch, 1, None, cfg, params=p))
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for i in range(n):
        r = x[i]
        if p["jitter"][i]:
            for o in p["order"][i].tolist():
                r = ops[o](r, float(p["factors"][i, o]))
        if p["gray"][i]:
            r = TF.rgb_to_grayscale(r, num_output_channels=3)
        if p["blur"][i]:
            r = TF.gaussian_blur(r, [23, 23], [float(p["sigma"][i])] * 2)
        if p["solarize"][i]:
            r = TF.solarize(r, 128 / 255)
        assert torch.allclose(y[i], r, atol=1e-4), i


def test_deterministic_for_a_generator_seed(batch):
    a = gpu_colour(batch, 0, torch.Generator().manual_seed(7))
    b = gpu_colour(batch, 0, torch.Generator().manual_seed(7))
    c = gpu_colour(batch, 0, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def full_params(n: int, seed: int) -> tuple[ViewConfig, dict[str, torch.Tensor]]:
    """Every op drawn by some samples, hue at every position of the order."""
    cfg = ViewConfig(jitter_p=0.7, gray_p=0.3, blur_p=(1.0, 0.5), solarize_p=(0.0, 0.5))
    p = sample_params(n, 1, torch.Generator().manual_seed(seed), cfg)
    p["order"] = torch.stack([torch.roll(torch.arange(4), i) for i in range(n)])
    return cfg, p


def test_hue_on_every_sample_kept_where_drawn_equals_the_subset_path(batch):
    """The static-shape form (what --compile compiles: hue computed for all, ``where`` keeps the drawn ones) gives the
    eager subset path's numbers: the same elementwise ops on the same pixels."""
    cfg, p = full_params(len(batch), 4)
    eager = augment._jitter_and_gray(batch, p, host=p)
    static = augment._jitter_and_gray(batch, p, host=None)
    torch.testing.assert_close(static, eager, rtol=0, atol=1e-6)
    assert not torch.equal(eager, batch.float() / 255)  # jitter did something


@pytest.mark.slow  # the first compilation takes a minute or more on a small CPU (torch's compile cache: seconds after)
def test_compiled_colour_equals_eager(batch):
    cfg, p = full_params(len(batch), 5)
    for images in (batch, batch[:, :, :24, :24].contiguous()):  # two shapes: views and instances get a graph each
        eager = gpu_colour(images, 1, None, cfg, params=p)
        compiled = gpu_colour(images, 1, None, cfg, params=p, compiled=True)
        torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_batch_with_cpu_generator_matches_cpu(batch):
    a = gpu_colour(batch, 1, torch.Generator().manual_seed(5))
    b = gpu_colour(batch.cuda(), 1, torch.Generator().manual_seed(5))
    assert b.device.type == "cuda" and torch.allclose(a, b.cpu(), atol=1e-4)


def test_errors():
    g = torch.Generator()
    with pytest.raises(ValueError, match="view must be 0 or 1"):
        gpu_colour(torch.zeros(1, 3, 8, 8), 2, g)
    with pytest.raises(ValueError, match="expected \\[B, 3, H, W\\]"):
        gpu_colour(torch.zeros(3, 8, 8), 0, g)


@pytest.mark.slow  # compiles two small graphs (~30 s on 2 cores with an empty compile cache)
def test_colour_bench_runs(capsys):
    import bench.colour_bench as colour_bench

    assert colour_bench.main(["--batch", "2", "--iters", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("max |compiled - eager|") == 2 and out.count("median:") == 2
