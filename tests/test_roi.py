"""train.roi.roi_mean against a loop written from RoIAlign's definition (float64, exact) and against torchvision's
kernel followed by the mean over bins (its CPU kernel agrees to ~1e-7 relative even in float64): values, gradients."""

import math

import pytest
import torch
from torchvision.ops import roi_align

from train.model import boxes_to_rois
from train.roi import roi_mean, sample_weights


def reference(fmap, boxes, scale, bins, sr):
    pooled = roi_align(fmap, boxes_to_rois(boxes), bins, spatial_scale=scale, sampling_ratio=sr, aligned=True)
    return pooled.mean(dim=(2, 3)).reshape(boxes.shape[0], boxes.shape[1], -1)


def bilinear(img, y, x):
    """RoIAlign's sampling rule (Mask R-CNN; torchvision's bilinear_interpolate), one sample of img [H, W]."""
    h, w = len(img), len(img[0])
    if y < -1.0 or y > h or x < -1.0 or x > w:
        return 0.0
    y, x = max(y, 0.0), max(x, 0.0)
    y0, x0 = min(int(math.floor(y)), h - 1), min(int(math.floor(x)), w - 1)
    ly = 0.0 if y0 >= h - 1 else y - y0
    lx = 0.0 if x0 >= w - 1 else x - x0
    y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
    return (
        (1 - ly) * (1 - lx) * img[y0][x0]
        + (1 - ly) * lx * img[y0][x1]
        + ly * (1 - lx) * img[y1][x0]
        + ly * lx * img[y1][x1]
    )


def naive(fmap, boxes, scale, bins, sr):
    """For each box and channel: bins x bins bins, sr x sr samples at the centres of each bin's sub-cells
    (aligned=True: box corners shifted by half a pixel), the mean of all samples."""
    b, k, _ = boxes.shape
    out = torch.zeros(b, k, fmap.shape[1], dtype=torch.float64)
    for i in range(b):
        for j in range(k):
            x0, y0, x1, y1 = (float(v) * scale - 0.5 for v in boxes[i, j])
            bh, bw = (y1 - y0) / bins, (x1 - x0) / bins
            for c in range(fmap.shape[1]):
                img = fmap[i, c].tolist()
                total = 0.0
                for py in range(bins):
                    for px in range(bins):
                        for sy in range(sr):
                            for sx in range(sr):
                                y = y0 + py * bh + (sy + 0.5) * bh / sr
                                x = x0 + px * bw + (sx + 0.5) * bw / sr
                                total += bilinear(img, y, x)
                out[i, j, c] = total / (bins * bins * sr * sr)
    return out


def random_boxes(b, k, side, gen, margin=0.0):
    """Boxes of every size, some reaching past the image by up to ``margin`` of its side."""
    lo = torch.rand(b, k, 2, generator=gen) * side * (1 + margin) - side * margin
    wh = torch.rand(b, k, 2, generator=gen) * side * 0.9 + 0.5
    return torch.cat([lo, lo + wh], dim=-1)


@pytest.mark.parametrize(
    "hw, side, bins, sr, margin",
    [((7, 7), 224, 7, 2, 0.0), ((7, 7), 224, 7, 2, 0.3), ((5, 9), 160, 3, 1, 0.2), ((12, 12), 96, 4, 3, 0.5)],
)
def test_matches_roi_align_then_mean(hw, side, bins, sr, margin):
    gen = torch.Generator().manual_seed(0)
    b, k, c = 3, 5, 6
    fmap = torch.randn(b, c, *hw, generator=gen, dtype=torch.float64)
    boxes = random_boxes(b, k, side, gen, margin).double()
    scale = hw[1] / side
    got = roi_mean(fmap, boxes, scale, bins, sr)
    torch.testing.assert_close(got, naive(fmap, boxes, scale, bins, sr), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, reference(fmap, boxes, scale, bins, sr), rtol=1e-5, atol=1e-6)


def test_gradient_matches_roi_align():
    """roi_mean is linear in fmap, so its gradient is the weights: compare with torchvision's backward kernel."""
    gen = torch.Generator().manual_seed(1)
    fmap = torch.randn(2, 8, 7, 7, generator=gen, dtype=torch.float64)
    boxes = random_boxes(2, 4, 224, gen, margin=0.2).double()
    up = torch.randn(2, 4, 8, generator=gen, dtype=torch.float64)
    grads = []
    for fn in (roi_mean, reference):
        x = fmap.clone().requires_grad_(True)
        (fn(x, boxes, 7 / 224, 7, 2) * up).sum().backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_edge_cases_of_the_sampling_rule():
    """A box far outside gives zeros; a box over the whole map averages it evenly when the grid is uniform; a box
    on the last pixel reads that pixel alone."""
    fmap = torch.arange(2 * 4 * 4, dtype=torch.float64).reshape(1, 2, 4, 4)
    boxes = torch.tensor(
        [[[100.0, 100.0, 120.0, 120.0], [0.0, 0.0, 4.0, 4.0], [3.6, 3.6, 3.9, 3.9]]], dtype=torch.float64
    )
    got = roi_mean(fmap, boxes, 1.0, 2, 2)
    torch.testing.assert_close(got, naive(fmap, boxes, 1.0, 2, 2))
    assert got[0, 0].abs().max() == 0
    torch.testing.assert_close(got[0, 2], fmap[0, :, 3, 3])


def test_weights_are_a_mean_over_samples():
    lo, hi = torch.tensor([0.0, -0.5]), torch.tensor([6.0, 3.0])
    w = sample_weights(lo, hi, 7, 3, 2)
    assert w.shape == (2, 7)
    torch.testing.assert_close(w.sum(dim=1), torch.ones(2))  # every sample inside the map: weights sum to one


def test_channels_last_and_bfloat16():
    gen = torch.Generator().manual_seed(2)
    fmap = torch.randn(2, 16, 7, 7, generator=gen)
    boxes = random_boxes(2, 4, 224, gen)
    want = reference(fmap, boxes, 7 / 224, 7, 2)
    cl = fmap.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(roi_mean(cl, boxes, 7 / 224, 7, 2), want, rtol=1e-5, atol=1e-6)
    low = cl.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as the trainer's encoder hands it over: a bf16 map
        got = roi_mean(low, boxes, 7 / 224, 7, 2)
        tv = reference(low, boxes, 7 / 224, 7, 2)  # torchvision's autocast runs roi_align in float32
    assert got.dtype == tv.dtype == torch.bfloat16  # computed in float32, returned in the map's dtype, as torchvision
    exact = reference(low.float(), boxes, 7 / 224, 7, 2)  # float32 sums, rounded once to bf16 below
    torch.testing.assert_close(got.float(), exact, rtol=2**-8, atol=1e-6)  # within one bf16 rounding (2^-9)
    torch.testing.assert_close(got, tv)


def test_rejects_adaptive_sampling():
    with pytest.raises(ValueError, match="sampling_ratio"):
        roi_mean(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 4), 1.0, 2, -1)


def test_roi_bench_runs(capsys):
    import bench.roi_bench as roi_bench

    assert roi_bench.main(["--batch", "2", "--channels", "8", "--iters", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("round ") == 3 and "x faster" in out
