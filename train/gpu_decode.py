"""The two views of a batch made on the device from JPEG bytes (``--gpu-decode``): decode, crop, resize, flip.

The loader workers ran ``train.views.UniVIPTransform`` with ``gpu_decode=True``: Algorithm 1 on the metadata and the
flips, no decoding. ``decode_views`` turns their output into the views the CPU path (``gpu_aug=True``) would have made
for the same random draws:

1. ``torchvision.io.decode_jpeg(list, mode=RGB, device=device)``. On CUDA that is one batched nvjpeg call: baseline
   JPEGs go to the hardware JPEG decoder of A100/H100-class GPUs, others (progressive) to nvjpeg's hybrid backend,
   whose Huffman stage runs on this process's CPU; torchvision makes the current stream wait for the decoder's. On the
   CPU it is libjpeg-turbo image by image (the same pixels as PIL's decode), which is how the tests run this module.
   Grayscale JPEGs come out as three equal channels; CMYK ones never arrive (``views.device_jpeg`` re-encodes them,
   as nvjpeg's batched decoder rejects them and with them the whole batch). Prep stores RGB JPEGs, so RGB mode is all
   that is needed.
2. Per view: the crop is a slice of the decoded image, converted to float32 and resized to S x S by
   ``F.interpolate(bilinear, antialias=True, align_corners=False)``: the CPU path's filter (PIL's antialiased
   bilinear, whose support grows with the shrink factor), on float32 because CUDA has no uint8 kernel for it, then
   rounded. It agrees with the CPU path's uint8 kernel to 1 level. Not ``torchvision.ops.roi_align``, although it
   would do all crops of a view in one call: it averages a fixed grid of bilinear samples per output pixel, a box
   filter instead of PIL's triangle one, so its views differ from the CPU path's whenever a crop is shrunk (the
   usual case), and it needs the images in one ``[N, C, H, W]`` tensor, i.e. every image padded to the largest.
3. Flips: once for the whole batch (``torch.where``), not per sample.

Host cost: about two kernel launches per view (the float copy of the crop, the resize) and a few per batch, so
~4 B launches for a batch of B. The CUDA antialiased kernel keeps its filter weights in 48 KiB of shared memory and
refuses shrink factors above ~90; a crop more than ``MAX_SHRINK`` times the view side is shrunk in two such steps
(the two filters' combination is a little smoother than one; nothing visible at such factors).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg

from train.data import unpack

MAX_SHRINK = 64  # crop side / view side above which the resize takes two steps (the CUDA kernel's limit is ~90)


def _decode(jpegs: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    with warnings.catch_warnings():
        # torchvision 0.29 deprecates its decoders in favour of TorchCodec (not a dependency here): one warning per
        # call otherwise, i.e. per training step
        warnings.simplefilter("ignore", DeprecationWarning)
        return decode_jpeg(list(jpegs), mode=ImageReadMode.RGB, device=device)


def _resize(patch: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 ``[3, h, w]`` (any device, may be a strided slice) -> float32 ``[3, size, size]`` in 0..255."""
    x = patch.unsqueeze(0).float()
    h, w = x.shape[2:]
    if max(h, w) > MAX_SHRINK * size:  # two steps, each within the kernel's limit; the extent maps exactly
        r = MAX_SHRINK // 2 * size / max(h, w)
        x = F.interpolate(
            x,
            size=(max(size, round(h * r)), max(size, round(w * r))),
            mode="bilinear",
            antialias=True,
            align_corners=False,
        )
    return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0]


def _check(crop: list[int], w: int, h: int, i: int) -> None:
    x0, y0, x1, y1 = crop
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        raise ValueError(f"decode_views: sample {i}: crop {crop} outside its {w}x{h} image")


def _flip(x: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """float ``[B, ...]`` images flipped horizontally where ``flips`` ``[B]`` holds, rounded to uint8 levels."""
    shape = (-1,) + (1,) * (x.dim() - 1)
    x = torch.where(flips.to(x.device, non_blocking=True).view(shape), x.flip(-1), x)
    return x.round_().clamp_(0, 255).to(torch.uint8)


def cut_views(
    images: Sequence[torch.Tensor],
    crops1: torch.Tensor,
    crops2: torch.Tensor,
    flips1: torch.Tensor,
    flips2: torch.Tensor,
    size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both views of each decoded image (uint8 ``[3, H, W]`` on the device) -> ``(view1, view2)`` uint8
    ``[B, 3, S, S]``. crops: ``[B, 4]`` xyxy image pixels; flips: bool ``[B]``."""
    views = []
    for crops, flips in ((crops1, flips1), (crops2, flips2)):
        boxes = crops.round().to(torch.int64).tolist()  # host ints: slicing needs them, and they are exact
        out = []
        for i, (img, box) in enumerate(zip(images, boxes, strict=True)):
            _check(box, img.shape[2], img.shape[1], i)
            out.append(_resize(img[:, box[1] : box[3], box[0] : box[2]], size))
        views.append(_flip(torch.stack(out), flips))  # float32 [B, 3, S, S] -> uint8
    return views[0], views[1]


def cut_instances(
    images: Sequence[torch.Tensor], boxes: torch.Tensor, flips1: torch.Tensor, flips2: torch.Tensor, size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The K instance boxes of each decoded image cut at the image's own resolution and resized to ``size``, once;
    each view's set flipped like its view -> ``(inst1, inst2)`` uint8 ``[B, K, 3, s, s]``. boxes: ``[B, K, 4]`` xyxy
    image pixels (``views.UniVIPTransform``'s ``inst_boxes``). B * K resize launches: the instances' cost."""
    ints = boxes.round().to(torch.int64).tolist()
    crops = []
    for i, (img, img_boxes) in enumerate(zip(images, ints, strict=True)):
        for box in img_boxes:
            box = [box[0], box[1], max(box[2], box[0] + 1), max(box[3], box[1] + 1)]
            _check(box, img.shape[2], img.shape[1], i)
            crops.append(_resize(img[:, box[1] : box[3], box[0] : box[2]], size))
    x = torch.stack(crops).view(len(ints), -1, 3, size, size)  # float32 [B, K, 3, s, s]
    return _flip(x, flips1), _flip(x, flips2)


def decode_views(
    jpegs: Sequence[torch.Tensor],
    crops1: torch.Tensor,
    crops2: torch.Tensor,
    flips1: torch.Tensor,
    flips2: torch.Tensor,
    size: int,
    device: torch.device | str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode B JPEGs on ``device`` and cut both views from each -> ``(view1, view2)`` uint8 ``[B, 3, S, S]``.

    jpegs: B uint8 ``[nbytes]`` CPU tensors (pinned memory helps nvjpeg). crops1, crops2: ``[B, 4]`` xyxy in image
    pixels (Algorithm 1's integer crops; on the CPU: they are read on the host). flips1, flips2: bool ``[B]``
    (CPU or ``device``). size: view side S. Raises ValueError when a crop does not lie inside its image."""
    b = len(jpegs)
    if not (len(crops1) == len(crops2) == len(flips1) == len(flips2) == b) or b == 0:
        raise ValueError(
            f"decode_views: {b} JPEGs but {len(crops1)}, {len(crops2)} crops and {len(flips1)}, "
            f"{len(flips2)} flips (need the same non-zero number)"
        )
    return cut_views(_decode(jpegs, torch.device(device)), crops1, crops2, flips1, flips2, size)


def decode_batch(
    batch: Mapping[str, Any], size: int, device: torch.device | str, instance_size: int | None = None
) -> dict[str, torch.Tensor]:
    """A collated batch of the ``gpu_decode`` transform (``train.data.collate`` packs the JPEG bytes into ``jpeg`` +
    ``jpeg_sizes``) -> ``view1``, ``view2`` uint8 ``[B, 3, S, S]`` on ``device``, and, when the batch carries
    ``inst_boxes`` (instances cut from the source image), ``inst1``, ``inst2`` uint8 ``[B, K, 3, s, s]``
    (s = ``instance_size``), all from one decode of each JPEG."""
    jpegs = unpack(batch["jpeg"], batch["jpeg_sizes"])
    b = len(jpegs)
    if not (len(batch["crop1"]) == len(batch["crop2"]) == b) or b == 0:
        raise ValueError(f"decode_batch: {b} JPEGs but {len(batch['crop1'])}, {len(batch['crop2'])} crops")
    images = _decode(jpegs, torch.device(device))
    v1, v2 = cut_views(images, batch["crop1"], batch["crop2"], batch["flip1"], batch["flip2"], size)
    out = {"view1": v1, "view2": v2}
    if "inst_boxes" in batch:
        if not instance_size:
            raise ValueError("decode_batch: the batch carries instance boxes but no instance_size was given")
        out["inst1"], out["inst2"] = cut_instances(
            images, batch["inst_boxes"], batch["flip1"], batch["flip2"], instance_size
        )
    return out
