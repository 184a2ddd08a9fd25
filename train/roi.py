"""RoIAlign averaged over its bins, as one batched matrix product (the "roi" instance mode; docs/method.md, "Instances").

`torchvision.ops.roi_align(fmap, rois, output_size=R, spatial_scale, sampling_ratio=n, aligned=True)` followed by a
mean over the R x R bins averages R*n x R*n bilinear samples laid on a product grid over each box. A bilinear weight
is a product of a row weight and a column weight, and the grid is a product of rows and columns, so the average is a
rank-one weighting of the feature map: instance[c] = sum_{y,x} a[y] b[x] fmap[c, y, x], where a (b) is the mean of
the R*n row (column) samples' interpolation weights. `roi_mean` builds a and b (O(K (H + W)) work) and applies them
with one `bmm` over the K boxes of each image.

Why: torchvision's kernel loops over every sample of every bin and channel, and its backward scatters into the
feature map (atomics on CUDA, a serial loop on CPU): on the CPU the step_bench profile put ~430 ms of a 4.4 s step in
roi_align, most in its backward. A bmm and its backward are dense GEMMs. The numbers are the same up to float
summation order (tests/test_roi.py: against a float64 loop written from the definition, and values and gradients
against torchvision's kernel, out-of-image boxes and bf16 autocast included).
"""

from __future__ import annotations

import torch
from torch import Tensor


def sample_weights(lo: Tensor, hi: Tensor, size: int, bins: int, sampling_ratio: int) -> Tensor:
    """Mean bilinear weights along one axis: box edges ``lo``, ``hi`` ``[N]`` (feature-map pixels, already shifted by
    aligned=True's half pixel) -> ``[N, size]``: entry j is the average, over the ``bins * sampling_ratio`` samples
    spread evenly over the box, of the weight sample s gives pixel j.

    Per sample, torchvision's ``bilinear_interpolate`` rule: a sample beyond [-1, size] gives nothing; one in [-1, 0]
    reads pixel 0; one at or past the last pixel reads it alone. Clamping the position into [0, size - 1] and taking
    the hat function max(0, 1 - |pos - j|) gives exactly these weights, in a few batched ops (no scatter)."""
    n = bins * sampling_ratio
    step = (hi - lo) / n  # bin / sampling_ratio: the samples sit at the centres of n equal slices of the box
    pos = lo[:, None] + (torch.arange(n, device=lo.device, dtype=lo.dtype) + 0.5) * step[:, None]  # [N, n]
    valid = ((pos >= -1.0) & (pos <= size)).to(lo.dtype)
    pixels = torch.arange(size, device=lo.device, dtype=lo.dtype)
    hat = (1 - (pos.clamp(0, size - 1)[:, :, None] - pixels).abs()).clamp_min(0)  # [N, n, size]
    return (hat * valid[:, :, None]).sum(dim=1) / n


def roi_mean(fmap: Tensor, boxes: Tensor, spatial_scale: float, bins: int, sampling_ratio: int) -> Tensor:
    """RoIAlign (aligned=True, fixed ``sampling_ratio``) of each box on ``fmap`` averaged over its ``bins`` x
    ``bins`` bins: ``[B, C, H, W]``, ``[B, K, 4]`` xyxy (input pixels, ``spatial_scale`` to feature-map pixels) ->
    ``[B, K, C]`` = ``roi_align(...).mean((2, 3))`` of the boxes in ``boxes_to_rois`` order.

    Computed in float32 (float64 when boxes or map are float64), also under autocast, and returned in the map's
    dtype: what torchvision's roi_align does under autocast. Works for any memory format: a channels_last map is
    already ``[B, H*W, C]`` in memory."""
    if sampling_ratio < 1:
        raise ValueError(f"roi_mean needs a fixed sampling_ratio >= 1, got {sampling_ratio}")
    b, c, h, w = fmap.shape
    k = boxes.shape[1]
    coords = torch.promote_types(boxes.dtype, torch.float32)  # float32 at least (bf16 boxes would move by pixels)
    xyxy = boxes.reshape(b * k, 4).to(coords) * spatial_scale - 0.5  # aligned=True: pixel centres at integer + 0.5
    if h == w:  # both axes in one call (half the small kernels a GPU launches)
        both = sample_weights(xyxy[:, [1, 0]].T.reshape(-1), xyxy[:, [3, 2]].T.reshape(-1), h, bins, sampling_ratio)
        rows, cols = both.split(b * k)  # [B*K, H], [B*K, W]
    else:
        rows = sample_weights(xyxy[:, 1], xyxy[:, 3], h, bins, sampling_ratio)
        cols = sample_weights(xyxy[:, 0], xyxy[:, 2], w, bins, sampling_ratio)
    weights = (rows[:, :, None] * cols[:, None, :]).reshape(b, k, h * w)
    pixels = fmap.permute(0, 2, 3, 1).reshape(b, h * w, c)  # a view for channels_last maps, a small copy otherwise
    # float32 at least, autocast off, as torchvision's kernel computes under autocast: bf16 would round every
    # sampling weight by up to 0.4 %
    dtype = torch.promote_types(weights.dtype, pixels.dtype)
    with torch.autocast(fmap.device.type, enabled=False):
        return torch.bmm(weights.to(dtype), pixels.to(dtype)).to(fmap.dtype)
