"""train.gpu_decode (--gpu-decode) on the CPU: the views equal the CPU path's for the same random draws, boxes follow
the pixels, collate packs the JPEG bytes, odd JPEGs are handled, and a tiny training run works. The decode itself runs
through ``torchvision.io.decode_jpeg`` on the CPU here (the same call as on CUDA, another decoder); the CUDA test
runs only where a GPU is visible."""

from __future__ import annotations

import io
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from tests.test_views import (
    COLOURS,
    NO_COLOUR,
    check_box_position,
    colour_under,
    make_sample,
    random_boxes,
    rectangles_image,
)
from train import gpu_decode, views
from train.data import collate, unpack
from train.gpu_decode import decode_batch, decode_views
from train.views import UniVIPTransform, ViewConfig


def batch_of(outs: list[dict]) -> dict:
    return collate([dict(o, __key__=f"k{i}", stats={}) for i, o in enumerate(outs)])


def both_paths(sample: dict, seeds, **cfg) -> tuple[list[dict], list[dict], torch.Tensor, torch.Tensor]:
    """(CPU-path outputs, gpu_decode outputs, decode_views' view1, view2) for the same per-seed generators. The CPU
    reference decodes at full size (draft=False): the reduced-scale decode is the CPU path's own shortcut."""
    cpu = UniVIPTransform(ViewConfig(gpu_aug=True, draft=False, **cfg))
    dev = UniVIPTransform(ViewConfig(gpu_decode=True, **cfg))
    ref = [cpu(sample, np.random.default_rng(s)) for s in seeds]
    outs = [dev(sample, np.random.default_rng(s)) for s in seeds]
    d = decode_batch(batch_of(outs), cfg.get("size", 224), "cpu")
    v1, v2 = d["view1"], d["view2"]
    return ref, outs, v1, v2


@pytest.fixture(scope="module")
def photo_sample():
    from tests.imagegen import photo_path

    img = Image.open(photo_path("astronaut.jpg")).convert("RGB")
    return make_sample(
        np.asarray(img), random_boxes(img.width, img.height, 30, np.random.default_rng(0), 0.4), key="astro"
    )


def test_transform_output(photo_sample):
    t = UniVIPTransform(ViewConfig(size=64, gpu_decode=True))
    out = t(photo_sample, np.random.default_rng(1))
    assert set(out) == {"jpeg", "crop1", "crop2", "flip1", "flip2", "boxes1", "boxes2", "fallback"}
    assert out["jpeg"].dtype == torch.uint8 and bytes(out["jpeg"].numpy()) == photo_sample["jpg"]
    for v in (1, 2):
        assert out[f"crop{v}"].dtype == torch.float32 and out[f"crop{v}"].shape == (4,)
        assert isinstance(out[f"flip{v}"], bool)
        assert out[f"boxes{v}"].dtype == torch.float32 and out[f"boxes{v}"].shape == (4, 4)
    again = t(photo_sample, np.random.default_rng(1))
    assert all(torch.equal(out[k], again[k]) for k in ("crop1", "crop2", "boxes1", "boxes2"))


def test_views_and_boxes_match_the_cpu_path(photo_sample):
    seeds = range(12)
    ref, outs, v1, v2 = both_paths(photo_sample, seeds, size=64)
    assert v1.dtype == torch.uint8 and v1.shape == (12, 3, 64, 64) and v2.shape == (12, 3, 64, 64)
    for r, o in zip(ref, outs, strict=True):
        assert torch.equal(r["boxes1"], o["boxes1"]) and torch.equal(r["boxes2"], o["boxes2"])
        assert r["fallback"] == o["fallback"]
    flips = [o["flip1"] for o in outs] + [o["flip2"] for o in outs]
    assert any(flips) and not all(flips)  # both branches of the flip are compared
    for v, got in ((1, v1), (2, v2)):
        want = torch.stack([r[f"view{v}"] for r in ref])
        diff = (got.int() - want.int()).abs().float()
        # same decoder output here; the resize differs only by float vs uint8 rounding
        assert diff.mean() < 1.5 and diff.max() <= 2, (v, diff.mean(), diff.max())


def test_coloured_rectangles_stay_under_their_boxes():
    arr, boxes = rectangles_image()
    cfg = dict(size=96, scale=(0.5, 1.0), flip=0.5, **NO_COLOUR)
    seeds = range(16)
    _, outs, v1, v2 = both_paths(make_sample(arr, boxes), seeds, **cfg)
    checked = 0
    for i, out in enumerate(outs):
        if out["fallback"]:
            continue
        for m in range(4):
            ids = []
            for view, box in ((v1[i], out["boxes1"][m]), (v2[i], out["boxes2"][m])):
                px = colour_under(view, box, 1.0)
                dist = np.abs(px[:, None, :] - COLOURS[None]).max(axis=2)
                ids.append(np.bincount(dist.argmin(axis=1), minlength=6).argmax())
                assert (dist[:, ids[-1]] < 40).mean() > 0.95
                check_box_position(view, box, COLOURS[ids[-1]], 96)
            assert ids[0] == ids[1], "box m must show the same object in both views"
            checked += 1
    assert checked > 30


def test_collate_packs_variable_length_bytes():
    lengths = (5, 9, 1)
    samples = [
        {
            "jpeg": torch.arange(n, dtype=torch.uint8) + i,
            "crop1": torch.zeros(4),
            "flip1": i == 1,
            "__key__": f"k{i}",
            "stats": {"samples_skipped": 0},
        }
        for i, n in enumerate(lengths)
    ]
    b = collate(samples)
    assert b["jpeg"].shape == (sum(lengths),) and b["jpeg_sizes"].tolist() == list(lengths)
    parts = unpack(b["jpeg"], b["jpeg_sizes"])
    assert len(parts) == 3 and all(
        torch.equal(p, s["jpeg"]) and p.is_contiguous() for p, s in zip(parts, samples, strict=True)
    )
    assert b["crop1"].shape == (3, 4) and b["flip1"].tolist() == [False, True, False]


def jpeg_in_mode(arr: np.ndarray, mode: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, "JPEG", quality=95)
    return buf.getvalue()


@pytest.mark.parametrize("mode", ["L", "CMYK"])
def test_grayscale_and_cmyk_jpegs(photo_sample, mode):
    arr = np.asarray(Image.open(io.BytesIO(photo_sample["jpg"])).convert("RGB"))
    sample = dict(photo_sample, jpg=jpeg_in_mode(arr, mode))
    jpeg = views.device_jpeg(sample["jpg"], arr.shape[1], arr.shape[0])
    reencoded = Image.open(io.BytesIO(bytes(jpeg.numpy())))
    # grayscale goes to the decoder as is; CMYK is re-encoded as an RGB (YCbCr) JPEG on the CPU
    assert reencoded.mode == ("L" if mode == "L" else "RGB")
    ref, _, v1, _ = both_paths(sample, range(4), size=48)
    want = torch.stack([r["view1"] for r in ref])
    assert (v1.int() - want.int()).abs().float().mean() < 1.5
    if mode == "L":
        assert torch.equal(v1[:, 0], v1[:, 1]) and torch.equal(v1[:, 1], v1[:, 2])


def test_errors(photo_sample):
    bad = {"jpg": photo_sample["jpg"], "meta": dict(photo_sample["meta"], width=999)}
    with pytest.raises(ValueError, match="astro.*metadata says 999x"):
        UniVIPTransform(ViewConfig(gpu_decode=True))(bad, np.random.default_rng(0))
    with pytest.raises(ValueError, match="astro: cannot open"):
        UniVIPTransform(ViewConfig(gpu_decode=True))(
            {"jpg": b"not a jpeg", "meta": photo_sample["meta"]}, np.random.default_rng(0)
        )
    jpeg = [torch.frombuffer(bytearray(photo_sample["jpg"]), dtype=torch.uint8)]
    w, h = photo_sample["meta"]["width"], photo_sample["meta"]["height"]
    inside, outside = torch.tensor([[0.0, 0, 10, 10]]), torch.tensor([[0.0, 0, w + 1, 10]])
    no = torch.tensor([False])
    with pytest.raises(ValueError, match=f"sample 0: crop .* outside its {w}x{h} image"):
        decode_views(jpeg, inside, outside, no, no, 8, "cpu")
    with pytest.raises(ValueError, match="same non-zero number"):
        decode_views(jpeg, inside.repeat(2, 1), inside, no, no, 8, "cpu")


def test_large_shrink_takes_two_steps():
    # a crop more than MAX_SHRINK view sides wide is resized in two steps (the CUDA kernel's limit); on a smooth
    # image that changes the view by well under a level, and the extent (the box geometry) is kept exactly
    size, side = 2, 2 * gpu_decode.MAX_SHRINK * 2 + 10  # shrink factor 133
    yy, xx = np.mgrid[0:side, 0:side]
    arr = np.stack([xx * 255 // side, yy * 255 // side, np.full_like(xx, 90)], -1).astype(np.uint8)
    img = torch.from_numpy(arr).permute(2, 0, 1)
    got = gpu_decode._resize(img, size)
    plain = torch.nn.functional.interpolate(img[None].float(), size=(size, size), mode="bilinear", antialias=True)[0]
    assert side > gpu_decode.MAX_SHRINK * size
    assert (got - plain).abs().max() < 0.5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu(photo_sample):
    dev = UniVIPTransform(ViewConfig(size=64, gpu_decode=True))
    b = batch_of([dev(photo_sample, np.random.default_rng(s)) for s in range(8)])
    cpu = decode_batch(b, 64, "cpu")
    cuda = decode_batch(b, 64, "cuda")
    for c, g in ((cpu[k], cuda[k]) for k in ("view1", "view2")):
        assert g.device.type == "cuda"
        # nvjpeg's IDCT and chroma upsampling are not libjpeg-turbo's: a level or so apart
        assert (g.cpu().int() - c.int()).abs().float().mean() < 1.5


@pytest.mark.slow
def test_tiny_training_run_with_gpu_decode(tmp_path):
    from tests.test_train import TINY, make_train_shards, read_log, run_train

    shards = make_train_shards(str(tmp_path / "shards"), [12, 12])
    out = str(tmp_path / "out")
    # one DataLoader worker: the packed JPEG bytes cross a process boundary as they do in real runs
    run_train(*TINY, "--workers", "1", "--gpu-decode", "--data", shards, "--out", out, "--max-steps", "3")
    rows = read_log(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r[k]) for r in rows for k in ("loss", "loss_scene", "loss_instance"))
    with open(os.path.join(out, "config.json")) as f:
        assert '"gpu_decode": true' in f.read()


def test_instances_from_the_source_image_match_the_cpu_path(photo_sample):
    """--instance-source image with --gpu-decode: the K instances cut on the device from the one decode of each JPEG
    equal the CPU path's (same random draws, full-size decode), flipped like their views."""
    geo = dict(size=48, instance_size=32, instance_crops=True)
    cpu = UniVIPTransform(ViewConfig(gpu_aug=True, draft=False, **geo))
    dev = UniVIPTransform(ViewConfig(gpu_decode=True, **geo))
    seeds = range(6)
    ref = [cpu(photo_sample, np.random.default_rng(s)) for s in seeds]
    outs = [dev(photo_sample, np.random.default_rng(s)) for s in seeds]
    assert all(o["inst_boxes"].shape == (4, 4) for o in outs)
    got = decode_batch(batch_of(outs), 48, "cpu", instance_size=32)
    for v in (1, 2):
        want = torch.stack([r[f"inst{v}"] for r in ref])  # [B, K, 3, 32, 32]
        assert got[f"inst{v}"].shape == want.shape and got[f"inst{v}"].dtype == torch.uint8
        assert (got[f"inst{v}"].int() - want.int()).abs().float().mean() < 1.0
    with pytest.raises(ValueError, match="instance_size"):
        decode_batch(batch_of(outs), 48, "cpu")
