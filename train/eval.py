"""Frozen-feature evaluation of a backbone: k-nearest-neighbour and linear-probe accuracy on labelled shards.

    python -m train.eval runs/tiny/ckpt-00000050.pt --data shards/imagenet --val-fraction 0.2 --size 64
    python -m train.eval --export resnet50_univip.pth --train-data shards/in-train/ --val-data shards/in-val/
    python -m train.eval --random-init --arch resnet50 --train-data shards/in-train/ --val-data shards/in-val/

Data: shards written by ``prep imagenet`` (any ``ROOT/<class>/*`` tree; each ``KEY.json`` holds an int ``label``),
as train and val specs, or one spec split by a hash of the sample key (``--val-fraction``: the same split whatever
the order, worker count or machine). Each image is decoded, its shorter side resized to ``--resize`` (default
round(size * 256 / 224), antialiased bilinear) and its centre ``--size`` square cut out (torchvision's
Resize + CenterCrop), then ImageNet-normalised. ``--boxes``: instead, every stored proposal box of a sample (the
first ``--max-boxes``) is cut from the full image and resized to size x size without keeping its aspect, as UniVIP's
instance crops are; each crop carries its sample's label, and the split keeps a sample's crops together.

Features: the encoder's globally average-pooled output, in eval mode, bf16 autocast and channels_last on CUDA.
The CLI streams the shards (decoding in ``--workers`` processes) and keeps only the features: N x C float32
(C = 512 for resnet18/34, 2048 for resnet50/101; 1.28M ImageNet images at C = 2048 take 10.5 GB).

BatchNorm is in eval mode for every source, so a sample's feature never depends on the rest of its batch. A
checkpoint's encoder normalises with the running statistics it accumulated in training. A random-init encoder keeps
the defaults (mean 0, var 1): its BatchNorm layers are identities, activations grow with depth and all images' features
point in nearly one direction (cosine 0.98-1.0 between textured test images). We keep that rather than re-estimating the
statistics on the data: it is exactly the training loop's online encoder at step 0 (same seed, same weights), so the
floor is the point a training-time curve starts from; re-estimating would be a first, label-free, step of training.
kNN ranks by cosine and the probe standardises, so neither depends on the scale, and the ranking survives bf16
autocast (98% of top-5 neighbours kept, resnet18 and resnet50, in a check on 32 textured images).

kNN (Wu et al. 2018; DINO's ``eval_knn``): features l2-normalised, the ``k`` most cosine-similar train features
vote for their labels with weight exp(similarity / T); top-5 is reported too with more than 5 classes.

Linear probe: features standardised with the train split's mean and std, multinomial logistic regression
fitted full-batch with L-BFGS (strong Wolfe line search) from zero weights, with an L2 penalty wd/2 * ||W||^2 on the
weights (not the biases). The penalty makes the problem strictly convex, so the fit has one minimiser that depends
on no seed and no sample order, and it keeps the weights finite on separable train sets (any set with fewer samples
than feature dimensions is separable). The default 1e-4 (on standardised features, so it means the same for every
backbone) sits inside the range of sklearn's default C = 1, which is wd = 1 / N: 1e-3 for a thousand samples, 1e-6
for ImageNet. That bounds a small probe and is light on a large one; sweep ``--wd`` (1e-6 .. 1e-2 on a held-out part
of the train split) for headline numbers.

``--recompute-bn`` (``BNEstimate``, ``recompute_bn``): every BatchNorm layer's statistics re-estimated on the train
split's images before features are taken (a checkpoint's were accumulated on its training views, a random-init
encoder has none). A label-free adaptation to the probe's images, reported beside the standard numbers, never
instead of them.

kNN and the probe run on ``--device`` too: each needs the train features there (kNN also blocks of val x train
similarities, 256 MiB at most).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import hashlib
import json
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from shards import reader, schema, storage
from train import checkpoint as ckpt_io
from train import data
from train.augment import normalize
from train.config import default_workers
from train.model import ARCHS, ResNetEncoder
from train.views import crop_view, decode_for_crops, image_tensor

__all__ = [
    "Labelled",
    "EvalError",
    "load_labelled",
    "split",
    "in_val",
    "extract",
    "stream_features",
    "knn_scores",
    "knn_top1",
    "linear_scores",
    "linear_top1",
    "topk_accuracy",
    "classify",
    "load_encoder",
    "infer_arch",
    "evaluate",
    "main",
]

DEFAULT_K = 20
DEFAULT_TEMPERATURE = 0.07
DEFAULT_WD = 1e-4
DEFAULT_LINEAR_ITERS = 1000
ENCODERS = ("online", "target")
_BOX_SEP = "#"  # box crop keys are KEY#i; "#" never occurs in a sample key (schema.is_valid_key)


class EvalError(ValueError):
    """An evaluation that cannot run for a reason the user can fix; the message names the file or shard."""


@dataclass
class Labelled:
    """A small labelled set held in memory (training-time evaluation, benchmarks), sorted by key."""

    images: torch.Tensor  # uint8 [N, 3, S, S], resized and cropped (or box crops)
    labels: torch.Tensor  # int64 [N]
    keys: list[str]  # sample keys; a box crop's is "KEY#i", i its box's index in the sample

    def __len__(self) -> int:
        return len(self.keys)

    def subset(self, mask: torch.Tensor) -> Labelled:
        return Labelled(
            self.images[mask], self.labels[mask], [k for k, m in zip(self.keys, mask.tolist(), strict=True) if m]
        )


# --- pixels --------------------------------------------------------------------------------------------------------
def default_resize(size: int) -> int:
    """The standard 256 / 224 ratio: 224 -> 256, 64 -> 73."""
    return round(size * 256 / 224)


def centre_view(jpeg: bytes, width: int, height: int, *, size: int, resize: int, name: str = "sample") -> torch.Tensor:
    """torchvision's ``Resize(resize)`` + ``CenterCrop(size)`` with antialiased bilinear -> uint8 ``[3, size, size]``.

    The JPEG is decoded at full size: decoding at 1/d scale (as training does) would be about twice as fast but
    filters differently, e.g. 2.5 grey levels off on average at 320 -> 73 px, and evaluation should be the standard's.
    """
    img, _ = decode_for_crops(jpeg, width, height, [], draft=False, name=name)  # full size
    # torchvision's Resize(int): the shorter side becomes `resize`, the longer int(resize * long / short)
    if width <= height:
        out_w, out_h = resize, int(resize * height / width)
    else:
        out_w, out_h = int(resize * width / height), resize
    x = F.interpolate(image_tensor(img), size=(out_h, out_w), mode="bilinear", antialias=True, align_corners=False)
    top, left = round((out_h - size) / 2), round((out_w - size) / 2)
    return x[0, :3, top : top + size, left : left + size].contiguous()


def box_views(
    jpeg: bytes, width: int, height: int, boxes: np.ndarray, *, size: int, name: str = "sample"
) -> torch.Tensor:
    """Each box (int xyxy image pixels ``[B, 4]``, B >= 1) cut out and resized to size x size, aspect not kept
    (UniVIP's instance crops) -> uint8 ``[B, 3, size, size]``."""
    img, _ = decode_for_crops(jpeg, width, height, [], draft=False, name=name)  # full size, as above
    src = image_tensor(img)
    return torch.stack([crop_view(src, b, size) for b in boxes])


# --- labelled items from shards ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _View:
    size: int
    resize: int
    boxes: bool = False
    max_boxes: int | None = None


def sample_items(sample: dict[str, Any], view: _View) -> list[tuple[torch.Tensor, int, str]]:
    """A valid sample (``shards.reader``: with ``meta``) -> its (image uint8 [3, S, S], label, key) items: one, or one
    per box. ``schema.InvalidSample`` when its JPEG does not decode to its recorded size; EvalError without a label."""
    meta, key = sample["meta"], sample["__key__"]
    name = f"{storage.redact(sample['__url__'])}: sample {key}"
    label = meta.get("label")
    if not isinstance(label, int) or isinstance(label, bool) or label < 0:
        raise EvalError(
            f"{name} has label {json.dumps(label)}: evaluation needs labelled shards (prep imagenet "
            "writes the class index; prep coco and prep folder write none)"
        )
    width, height = int(meta["width"]), int(meta["height"])
    if not view.boxes:
        return [(centre_view(sample["jpg"], width, height, size=view.size, resize=view.resize, name=name), label, key)]
    boxes = meta["boxes"][: view.max_boxes]
    if len(boxes) == 0:
        return []
    crops = box_views(sample["jpg"], width, height, boxes, size=view.size, name=name)
    return [(c, label, f"{key}{_BOX_SEP}{i}") for i, c in enumerate(crops)]


@dataclass
class _Failure:
    """An error met in a DataLoader worker, handed to the main process as data: re-raised there as an EvalError
    with its own message instead of torch's wrapped traceback text."""

    message: str


@dataclass
class _Skip:
    """A sample skipped in a worker (it breaks the format's rule), handed to the main process to count and report."""

    url: str
    reason: str
    message: str


@dataclass
class _Batch:
    images: torch.Tensor  # uint8 [B, 3, S, S]
    labels: torch.Tensor  # int64 [B]
    keys: list[str]
    skips: list[_Skip]


class Skipped:
    """Samples an evaluation skipped, by reason (``schema.INVALID_REASONS``), each shard's first one warned about."""

    def __init__(self) -> None:
        self.by_reason: dict[str, int] = {}
        self._warned: set[str] = set()

    def add(self, skip: _Skip) -> None:
        self.by_reason[skip.reason] = self.by_reason.get(skip.reason, 0) + 1
        if skip.url not in self._warned:
            self._warned.add(skip.url)
            warnings.warn(
                f"skipping a bad sample: {skip.message} (further bad samples of {storage.redact(skip.url)} are not "
                "reported)",
                RuntimeWarning,
                stacklevel=2,
            )


class _Items(IterableDataset):
    """(image, label, key) of every valid sample of ``urls``, and a ``_Skip`` for each invalid one. Worker w of W
    reads shards w, w + W, ...; with fewer shards than workers, every worker reads every shard and decodes its
    samples w, w + W, ... (reading a tar is cheap next to decoding it). The order differs with W; callers sort by
    key."""

    def __init__(self, urls: list[str], view: _View, open_kwargs: dict[str, Any]):
        self.urls, self.view, self.open_kwargs = urls, view, open_kwargs

    def __iter__(self) -> Iterator:
        info = get_worker_info()
        w, n = (info.id, info.num_workers) if info else (0, 1)
        by_shard = len(self.urls) >= n
        index = 0
        for url in self.urls[w::n] if by_shard else self.urls:
            try:
                with storage.open_stream(url, **self.open_kwargs) as stream:
                    for item in reader.shard_items(stream, url):
                        mine = by_shard or index % n == w
                        index += 1
                        if not mine:
                            continue
                        if isinstance(item, reader.Rejected):
                            yield _Skip(url, item.reason, item.message)
                            continue
                        try:
                            yield from sample_items(item, self.view)
                        except schema.InvalidSample as e:  # the JPEG: corrupt, or not its recorded size
                            yield _Skip(url, e.reason, str(e))
            except (EvalError, reader.ShardError) as e:  # their messages name the shard
                yield _Failure(str(e))
                return
            except (OSError, ValueError, NotImplementedError) as e:  # open / network errors, bad URL
                shown = storage.redact(url)
                yield _Failure(str(e) if shown in str(e) else f"{shown}: {type(e).__name__}: {e}")
                return


def _collate(items: list) -> _Batch | _Failure:
    for item in items:
        if isinstance(item, _Failure):
            return item
    skips = [item for item in items if isinstance(item, _Skip)]
    good = [item for item in items if not isinstance(item, _Skip)]
    if not good:
        return _Batch(torch.zeros(0, dtype=torch.uint8), torch.zeros(0, dtype=torch.int64), [], skips)
    images, labels, keys = zip(*good, strict=True)
    return _Batch(torch.stack(images), torch.tensor(labels, dtype=torch.int64), list(keys), skips)


def resolve(spec: str, allow_manifest_outside: bool = False) -> reader.Shards:
    """``reader.resolve`` with its errors as EvalError; sample counts (for the progress bar) only where they cost no
    request per shard."""
    try:
        remote = storage.is_remote(spec) and storage.basename(spec.strip()) != schema.MANIFEST_NAME
        return reader.resolve(spec, sizes=not remote, allow_manifest_outside=allow_manifest_outside)
    except (reader.SpecError, reader.ShardError) as e:
        raise EvalError(str(e)) from e
    except (OSError, NotImplementedError, ValueError) as e:  # a manifest or listing that cannot be read
        shown = storage.redact(spec)
        raise EvalError(str(e) if shown.rstrip("/") in str(e) else f"{shown}: {e}") from e


def _batches(
    spec: str | reader.Shards,
    view: _View,
    *,
    batch_size: int,
    workers: int,
    progress: bool,
    desc: str,
    pin_memory: bool = False,
    skipped: Skipped | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
    """(images uint8 [B, 3, S, S], labels int64 [B], keys) of a spec's items, decoded in ``workers`` processes;
    invalid samples are skipped and go to ``skipped``."""
    shards = resolve(spec) if isinstance(spec, str) else spec
    skipped = skipped if skipped is not None else Skipped()
    loader = DataLoader(
        _Items(list(shards.urls), view, {"allow_pipe": storage.settings()["allow_pipe"]}),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=pin_memory,
        # one intra-op thread per worker, and the --s3-endpoint setting, whatever the start method
        worker_init_fn=functools.partial(data.worker_init, storage.settings()) if workers else None,
    )
    total = None if view.boxes or shards.sizes is None else sum(shards.sizes.values())
    with tqdm(
        total=total,
        desc=desc,
        unit="img" if not view.boxes else "crop",
        disable=not progress,
        dynamic_ncols=True,
        file=sys.stderr,
        mininterval=0.1 if sys.stderr.isatty() else 60.0,
    ) as bar:
        for batch in loader:
            if isinstance(batch, _Failure):
                raise EvalError(batch.message)
            for skip in batch.skips:
                skipped.add(skip)
            bar.update(len(batch.keys) + len(batch.skips))
            if batch.keys:
                yield batch.images, batch.labels, batch.keys


def _gather(
    spec: str | reader.Shards, view: _View, per_batch: Callable[[torch.Tensor], torch.Tensor], **loader_kw
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(per_batch(images) of every batch, labels, keys), concatenated and sorted by key, so the result does not
    depend on the number of workers. Raises EvalError when the spec holds no sample."""
    parts, labels, keys = [], [], []
    for images, y, k in _batches(spec, view, **loader_kw):
        parts.append(per_batch(images))
        labels.append(y)
        keys += k
    if not keys:
        shown = storage.redact(spec if isinstance(spec, str) else spec.spec)
        raise EvalError(f"{shown}: no samples" + (" with boxes" if view.boxes else ""))
    order = torch.tensor(sorted(range(len(keys)), key=keys.__getitem__))
    out = torch.cat(parts)
    del parts  # at most two copies of the features at once
    return out[order], torch.cat(labels)[order], [keys[i] for i in order.tolist()]


def load_labelled(
    spec: str | reader.Shards,
    *,
    size: int,
    boxes: bool = False,
    max_boxes: int | None = None,
    workers: int = 0,
    progress: bool = False,
    resize: int | None = None,
    skipped: Skipped | None = None,
) -> Labelled:
    """Every item of a labelled shard spec (anything ``shards.reader.resolve`` takes, or its result) in memory, sorted
    by key; invalid samples skipped (counted in ``skipped``). For small sets: N x 3 x size x size bytes. ``resize``
    defaults to ``default_resize(size)``."""
    view = _View(size, resize or default_resize(size), boxes, max_boxes)
    images, labels, keys = _gather(
        spec, view, lambda x: x, batch_size=64, workers=workers, progress=progress, desc="load", skipped=skipped
    )
    return Labelled(images, labels, keys)


# --- split ---------------------------------------------------------------------------------------------------------
def in_val(keys: list[str], val_fraction: float) -> torch.Tensor:
    """bool [N]: whether each key is in the val split, decided by a hash of its sample key alone (a box crop
    ``KEY#i`` goes with its sample), so the split is the same in any order, process or worker count."""

    def unit(key: str) -> float:
        digest = hashlib.blake2b(key.split(_BOX_SEP, 1)[0].encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big") / 2.0**64

    return torch.tensor([unit(k) < val_fraction for k in keys], dtype=torch.bool)


def _check_split(n_train: int, n_val: int, val_fraction: float) -> None:
    for name, n in (("train", n_train), ("val", n_val)):
        if n == 0:
            raise EvalError(f"--val-fraction {val_fraction} of {n_train + n_val} items leaves the {name} split empty")


def split(data: Labelled, val_fraction: float) -> tuple[Labelled, Labelled]:
    """(train, val) by ``in_val``: deterministic and disjoint. Raises EvalError when either is empty."""
    val = in_val(data.keys, val_fraction)
    _check_split(int((~val).sum()), int(val.sum()), val_fraction)
    return data.subset(~val), data.subset(val)


# --- features ------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _eval_mode(encoder: torch.nn.Module):
    was = encoder.training
    encoder.eval()
    try:
        yield
    finally:
        encoder.train(was)


def _features(encoder: torch.nn.Module, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """uint8 [B, 3, S, S] -> float32 [B, C] on the CPU; the encoder lives on ``device``."""
    x = normalize(images.to(device, non_blocking=True))
    if device.type == "cuda":
        with torch.autocast("cuda", dtype=torch.bfloat16):
            f = encoder(x.contiguous(memory_format=torch.channels_last))
    else:
        f = encoder(x)
    return f.float().cpu()


@torch.no_grad()
def extract(
    encoder: torch.nn.Module,
    images: torch.Tensor,
    *,
    device: torch.device,
    batch_size: int = 256,
    progress: bool = False,
) -> torch.Tensor:
    """Features of uint8 images ``[N, 3, S, S]`` -> float32 ``[N, C]`` on the CPU, with the encoder (already on
    ``device``) in eval mode; its previous mode is restored afterwards."""
    with _eval_mode(encoder):
        starts = range(0, len(images), batch_size)
        out = [
            _features(encoder, images[i : i + batch_size], device)
            for i in tqdm(starts, desc="features", disable=not progress, file=sys.stderr, dynamic_ncols=True)
        ]
    return torch.cat(out) if out else torch.zeros(0, getattr(encoder, "dim", 0))


def _bn_layers(net: torch.nn.Module) -> list[torch.nn.modules.batchnorm._BatchNorm]:
    return [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


class BNEstimate:
    """A copy of an encoder whose BatchNorm running statistics are re-estimated from images fed to it (``add``):
    reset, then the plain average over the batches seen (``momentum=None``), each a train-mode forward without
    gradient. Label-free; the encoder it was made from is untouched. ``net`` (eval mode) is the result.

    Why: a checkpoint's statistics were accumulated on its training views (another scale, crop and colour
    distribution than a probe's images), and a random-init encoder has none (mean 0, var 1: identities). With
    statistics of the probe's own images both are judged on the features alone; the standard numbers keep the
    encoder's own (see the module docstring), and this is reported beside them, never instead."""

    def __init__(self, encoder: torch.nn.Module, device: torch.device):
        self.net, self.device = copy.deepcopy(encoder), device
        self.layers = _bn_layers(self.net)
        for m in self.layers:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches
        self.batches = 0

    @torch.no_grad()
    def add(self, images: torch.Tensor) -> None:
        """uint8 ``[B, 3, S, S]``; a batch of one is skipped (BatchNorm cannot take the statistics of one value
        per channel when the last feature map is 1 x 1)."""
        if len(images) < 2:
            return
        self.net.train()
        _features(self.net, images, self.device)
        self.net.eval()
        self.batches += 1

    def result(self) -> torch.nn.Module:
        if self.layers and not self.batches:
            raise EvalError("re-estimating BatchNorm statistics needs at least one batch of two or more images")
        return self.net.eval()


def recompute_bn(
    encoder: torch.nn.Module, images: torch.Tensor, *, device: torch.device, batch_size: int = 256
) -> torch.nn.Module:
    """A copy of ``encoder`` (already on ``device``) with its BatchNorm statistics re-estimated on uint8 ``images``
    ``[N, 3, S, S]`` (``BNEstimate``), in eval mode."""
    est = BNEstimate(encoder, device)
    for i in range(0, len(images), batch_size):
        est.add(images[i : i + batch_size])
    return est.result()


@torch.no_grad()
def stream_features(
    encoder: torch.nn.Module,
    spec: str | reader.Shards,
    *,
    device: torch.device,
    size: int,
    resize: int | None = None,
    boxes: bool = False,
    max_boxes: int | None = None,
    batch_size: int = 256,
    workers: int = 0,
    progress: bool = False,
    desc: str = "features",
    skipped: Skipped | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(features float32 [N, C], labels int64 [N], keys) of a labelled shard spec (or its ``reader.resolve``
    result), sorted by key; the shards are streamed and only the features are kept. Invalid samples are skipped and
    counted in ``skipped``."""
    view = _View(size, resize or default_resize(size), boxes, max_boxes)
    with _eval_mode(encoder):
        return _gather(
            spec,
            view,
            lambda x: _features(encoder, x, device),
            batch_size=batch_size,
            workers=workers,
            progress=progress,
            desc=desc,
            pin_memory=device.type == "cuda",
            skipped=skipped,
        )


# --- classifiers ---------------------------------------------------------------------------------------------------
def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    """Fraction of rows of ``scores`` [M, C] whose label is among their ``k`` highest classes."""
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices
    return (top == labels.to(top.device)[:, None]).any(dim=1).float().mean().item()


@torch.no_grad()
def knn_scores(
    train_f: torch.Tensor,
    train_y: torch.Tensor,
    val_f: torch.Tensor,
    *,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
    n_classes: int | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Weighted kNN votes: train [N, C] + labels [N], val [M, C] -> float32 [M, n_classes] on the CPU, row i the
    sum of exp(cos / T) over the ``k`` train features most similar to val feature i, by their class."""
    device = device or train_f.device
    n_classes = n_classes or int(train_y.max()) + 1
    train = F.normalize(train_f.to(device, torch.float32), dim=1)
    train_y = train_y.to(device)
    k = min(k, len(train))
    chunk = max(1, (1 << 26) // max(1, len(train)))  # val rows per block: a block's similarities stay <= 256 MiB
    out = []
    for i in range(0, len(val_f), chunk):
        val = F.normalize(val_f[i : i + chunk].to(device, torch.float32), dim=1)
        sim, idx = (val @ train.T).topk(k, dim=1)
        votes = torch.zeros(len(val), n_classes, device=device)
        out.append(votes.scatter_add_(1, train_y[idx], (sim / temperature).exp()).cpu())
    return torch.cat(out) if out else torch.zeros(0, n_classes)


def knn_top1(
    train_f: torch.Tensor,
    train_y: torch.Tensor,
    val_f: torch.Tensor,
    val_y: torch.Tensor,
    *,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
    device: torch.device | None = None,
) -> float:
    n_classes = int(torch.cat([train_y, val_y]).max()) + 1
    scores = knn_scores(train_f, train_y, val_f, k=k, temperature=temperature, n_classes=n_classes, device=device)
    return topk_accuracy(scores, val_y, 1)


def linear_scores(
    train_f: torch.Tensor,
    train_y: torch.Tensor,
    val_f: torch.Tensor,
    *,
    n_classes: int | None = None,
    wd: float = DEFAULT_WD,
    max_iter: int = DEFAULT_LINEAR_ITERS,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Logistic-regression probe: fitted on train [N, C] + labels [N] -> val logits float32 [M, n_classes] (CPU).

    Standardised features, full-batch L-BFGS from zero weights, penalty wd/2 * ||W||^2: see the module docstring."""
    device = device or train_f.device
    n_classes = n_classes or int(train_y.max()) + 1
    x = train_f.to(device, torch.float32)
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-6)  # a constant feature gets weight 0 anyway
    x = (x - mean) / std
    y = train_y.to(device)
    weight = torch.zeros(n_classes, x.shape[1], device=device, requires_grad=True)
    bias = torch.zeros(n_classes, device=device, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ weight.T + bias, y) + wd / 2 * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        val = (val_f.to(device, torch.float32) - mean) / std
        return (val @ weight.T + bias).cpu()


def linear_top1(
    train_f: torch.Tensor,
    train_y: torch.Tensor,
    val_f: torch.Tensor,
    val_y: torch.Tensor,
    *,
    seed: int = 0,
    wd: float = DEFAULT_WD,
    max_iter: int = DEFAULT_LINEAR_ITERS,
    device: torch.device | None = None,
) -> float:
    """Top-1 of the linear probe. Nothing in the fit is random (zero start, full batch, a strictly convex
    problem), so ``seed`` does not change the result; it is kept so that callers can record one."""
    del seed
    n_classes = int(torch.cat([train_y, val_y]).max()) + 1
    scores = linear_scores(train_f, train_y, val_f, n_classes=n_classes, wd=wd, max_iter=max_iter, device=device)
    return topk_accuracy(scores, val_y, 1)


def classify(
    train_f: torch.Tensor,
    train_y: torch.Tensor,
    val_f: torch.Tensor,
    val_y: torch.Tensor,
    *,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
    knn: bool = True,
    linear: bool = True,
    wd: float = DEFAULT_WD,
    linear_iters: int = DEFAULT_LINEAR_ITERS,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Accuracies of the kNN classifier and the linear probe on features, and the set sizes:
    ``knn_top1`` (``knn_top5``), ``linear_top1`` (``linear_top5``; top-5 with more than 5 classes), ``n_train``,
    ``n_val``, ``n_classes`` (distinct labels in train and val)."""
    classes = torch.cat([train_y, val_y]).unique()
    width = int(classes.max()) + 1  # labels index the sorted class list of the whole source: gaps are fine
    out: dict[str, Any] = {"n_train": len(train_y), "n_val": len(val_y), "n_classes": len(classes)}
    topk = (1, 5) if len(classes) > 5 else (1,)
    if knn:
        scores = knn_scores(train_f, train_y, val_f, k=k, temperature=temperature, n_classes=width, device=device)
        out.update({f"knn_top{t}": topk_accuracy(scores, val_y, t) for t in topk})
    if linear:
        scores = linear_scores(train_f, train_y, val_f, n_classes=width, wd=wd, max_iter=linear_iters, device=device)
        out.update({f"linear_top{t}": topk_accuracy(scores, val_y, t) for t in topk})
    return out


def evaluate(
    encoder: torch.nn.Module,
    train: Labelled,
    val: Labelled,
    *,
    device: torch.device,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
    knn: bool = True,
    linear: bool = True,
    wd: float = DEFAULT_WD,
    linear_iters: int = DEFAULT_LINEAR_ITERS,
    batch_size: int = 256,
    progress: bool = False,
) -> dict[str, Any]:
    """``classify`` on the features of two in-memory sets (the encoder on ``device``, left in its mode)."""
    train_f = extract(encoder, train.images, device=device, batch_size=batch_size, progress=progress)
    val_f = extract(encoder, val.images, device=device, batch_size=batch_size, progress=progress)
    return classify(
        train_f,
        train.labels,
        val_f,
        val.labels,
        k=k,
        temperature=temperature,
        knn=knn,
        linear=linear,
        wd=wd,
        linear_iters=linear_iters,
        device=device,
    )


# --- encoders ------------------------------------------------------------------------------------------------------
@functools.cache
def _arch_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    """Backbone tensor names and shapes of a torchvision ResNet (no classifier), built on the meta device (no memory,
    no init cost)."""
    with torch.device("meta"):
        net = getattr(torchvision.models, arch)(weights=None)
    return {k: tuple(v.shape) for k, v in net.state_dict().items() if not k.startswith("fc.")}


_V = TypeVar("_V")  # a state dict's values: tensors, or their shapes


def _backbone(state: dict[str, _V]) -> dict[str, _V]:
    # the classifier is not part of the backbone (a full torchvision model's weights evaluate too);
    # num_batches_tracked does not change the features and some writers drop it
    return {k: v for k, v in state.items() if not k.startswith("fc.") and not k.endswith("num_batches_tracked")}


def infer_arch(state: dict[str, torch.Tensor]) -> str | None:
    """The ResNet in ``ARCHS`` whose backbone tensors have exactly these names and shapes, or None."""
    shapes = {k: tuple(v.shape) for k, v in _backbone(state).items()}
    for arch in ARCHS:
        if _backbone(_arch_shapes(arch)) == shapes:
            return arch
    return None


def _read_export(path: str) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise EvalError(f"{path}: no such file") from None
    except Exception as e:  # a detectron2 pickle, a truncated file, ...
        raise EvalError(
            f"{path}: not a torchvision state dict ({type(e).__name__}: {e}); write one with "
            "python -m train.export CKPT --format torchvision"
        ) from e
    if isinstance(state, dict) and {"model", "config"} <= set(state):
        raise EvalError(f"{path} is a training checkpoint, not an export: pass it as CKPT (or --checkpoint)")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise EvalError(f"{path}: not a torchvision state dict (expected a dict of tensors)")
    return state


def _load_into(net: ResNetEncoder, state: dict[str, torch.Tensor], path: str) -> None:
    # strict, except that num_batches_tracked stays the fresh net's where the file has none
    full = {**net.net.state_dict(), **{k: v for k, v in state.items() if not k.startswith("fc.")}}
    try:
        net.net.load_state_dict(full, strict=True)
    except RuntimeError as e:
        raise EvalError(f"{path}: the backbone does not fit: {e}") from e


def load_encoder(
    *,
    checkpoint: str | None = None,
    export: str | None = None,
    random_init: bool = False,
    arch: str | None = None,
    encoder: str = "online",
    seed: int = 0,
) -> tuple[ResNetEncoder, dict]:
    """The encoder to evaluate, on the CPU, from exactly one source, and a dict saying what was loaded
    (``source``: checkpoint | export | random-init, ``arch``, and ``path``, ``step``, ``encoder``, ``seed`` where
    they apply).

    checkpoint: a ``python -m train`` checkpoint; its config gives the arch, ``encoder`` picks the online or the
    target (EMA) branch. export: a ``python -m train.export --format torchvision`` file; the arch is inferred from
    the tensor shapes. random_init: ``ResNetEncoder(arch)`` after ``torch.manual_seed(seed)``, the same weights as
    the online encoder of a training run with that seed at step 0 (the caller's RNG state is left alone).
    ``arch``, when given with a file, must be the file's. Raises EvalError (a ValueError) naming the file."""
    given = [n for n, v in (("checkpoint", checkpoint), ("export", export), ("random_init", random_init)) if v]
    if len(given) != 1:
        raise EvalError(f"give exactly one encoder source (checkpoint, export or random_init), got {given or 'none'}")
    if arch is not None and arch not in ARCHS:
        raise EvalError(f"arch {arch!r}: expected one of {', '.join(ARCHS)}")
    if encoder not in ENCODERS:
        raise EvalError(f"encoder {encoder!r}: expected one of {', '.join(ENCODERS)}")
    if random_init:
        if arch is None:
            raise EvalError("a random-init encoder needs an arch")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return ResNetEncoder(arch), {"source": "random-init", "arch": arch, "seed": seed}
    if checkpoint:
        ckpt = ckpt_io.load(checkpoint)
        saved = ckpt["config"].get("arch")
        if arch is not None and arch != saved:
            raise EvalError(f"{checkpoint} holds a {saved} backbone, not {arch}")
        prefix = f"{encoder}.encoder.net."
        state = {k[len(prefix) :]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}
        if not state:
            raise EvalError(f"{checkpoint}: the model state has no {encoder} encoder ({prefix}*)")
        net = ResNetEncoder(saved)
        _load_into(net, state, checkpoint)
        return net, {
            "source": "checkpoint",
            "path": checkpoint,
            "step": int(ckpt["step"]),
            "arch": saved,
            "encoder": encoder,
        }
    assert export is not None  # exactly one source was given, and it is not checkpoint or random_init
    state = _read_export(export)
    found = infer_arch(state)
    if found is None:
        raise EvalError(
            f"{export}: its {len(state)} tensors are not the backbone of any of {', '.join(ARCHS)} "
            "(torchvision names and shapes)"
        )
    if arch is not None and arch != found:
        raise EvalError(f"{export} holds a {found} backbone, not {arch}")
    net = ResNetEncoder(found)
    _load_into(net, state, export)
    return net, {"source": "export", "path": export, "arch": found}


# --- command line --------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train.eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    g = p.add_argument_group("encoder (exactly one source)")
    g.add_argument("ckpt", nargs="?", metavar="CKPT", help="a ckpt-XXXXXXXX.pt written by python -m train")
    g.add_argument("--checkpoint", metavar="CKPT", help="the same, as a flag")
    g.add_argument(
        "--export",
        metavar="FILE",
        help="a python -m train.export --format torchvision file (or any torchvision ResNet state dict; fc is ignored)",
    )
    g.add_argument("--random-init", action="store_true", help="an untrained encoder (needs --arch): the floor")
    g.add_argument("--arch", choices=ARCHS, help="the architecture; with a checkpoint or export, a check")
    g.add_argument("--encoder", choices=ENCODERS, help="which branch of a checkpoint (default: online)")
    g.add_argument("--seed", type=int, default=0, help="initialisation seed of --random-init (default: 0)")
    g = p.add_argument_group(
        "labelled data (shards from prep imagenet: local dir, brace pattern, glob, manifest.json, s3://, https://)"
    )
    g.add_argument("--data", metavar="SPEC", help="one labelled set, split by --val-fraction")
    g.add_argument(
        "--val-fraction",
        type=float,
        metavar="F",
        help="with --data: the share of samples in the val split, chosen by a hash of the sample key",
    )
    g.add_argument("--train-data", metavar="SPEC", help="the train split (with --val-data)")
    g.add_argument("--val-data", metavar="SPEC", help="the val split (with --train-data)")
    g.add_argument("--size", type=int, default=224, help="input side in pixels (default: 224)")
    g.add_argument("--resize", type=int, help="shorter side before the centre crop (default: round(size*256/224))")
    g.add_argument(
        "--boxes",
        action="store_true",
        help="evaluate the stored proposal boxes instead of whole images: each box cut out and resized "
        "to size x size, labelled with its image's label",
    )
    g.add_argument(
        "--max-boxes", type=int, metavar="N", help="with --boxes: the first N boxes of a sample (default: all)"
    )
    g.add_argument(
        "--workers",
        type=int,
        default=default_workers(4),
        help=f"DataLoader processes decoding images (default: 4, or the usable cores: {default_workers(4)} here)",
    )
    g.add_argument(
        "--s3-endpoint",
        default="",
        help="S3 API endpoint for s3:// data (default: $S3_ENDPOINT_URL, else $AWS_ENDPOINT_URL, else AWS)",
    )
    g.add_argument("--allow-pipe", action="store_true", help="allow pipe: shard URLs (they run a shell command)")
    g.add_argument(
        "--allow-manifest-outside",
        action="store_true",
        help="follow manifest.json entries outside the manifest's own directory or prefix (absolute paths, '..', "
        "other URLs); refused otherwise",
    )
    g = p.add_argument_group("features (streamed: only N x C float32 features stay in memory)")
    g.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default: 256)")
    g.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto = cuda when available (bf16 autocast, channels_last), else cpu (default: auto)",
    )
    g = p.add_argument_group("classifiers")
    g.add_argument("--k", type=int, default=DEFAULT_K, help=f"kNN neighbours (default: {DEFAULT_K})")
    g.add_argument(
        "--temperature",
        type=float,
        default=DEFAULT_TEMPERATURE,
        help=f"kNN vote weight exp(cos / T) (default: {DEFAULT_TEMPERATURE})",
    )
    g.add_argument(
        "--wd",
        type=float,
        default=DEFAULT_WD,
        help=f"linear probe L2 penalty wd/2 * ||W||^2 on standardised features (default: {DEFAULT_WD})",
    )
    g.add_argument(
        "--linear-iters",
        type=int,
        default=DEFAULT_LINEAR_ITERS,
        help=f"linear probe L-BFGS iterations at most (default: {DEFAULT_LINEAR_ITERS})",
    )
    g.add_argument(
        "--recompute-bn",
        action="store_true",
        help="re-estimate every BatchNorm layer's statistics on the train split's images first (label-free; "
        "report it beside the standard numbers, which keep the encoder's own statistics)",
    )
    g.add_argument("--no-knn", action="store_true", help="skip the kNN classifier")
    g.add_argument("--no-linear", action="store_true", help="skip the linear probe")
    g = p.add_argument_group("output")
    g.add_argument(
        "--json",
        nargs="?",
        const="-",
        metavar="FILE",
        help="also write the results and every setting as JSON to FILE, or to stdout with - (the "
        "summary line then goes to stderr)",
    )
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.ckpt and args.checkpoint:
        p.error("give the checkpoint once: CKPT or --checkpoint")
    args.checkpoint = args.checkpoint or args.ckpt
    sources = [
        n for n, v in (("CKPT", args.checkpoint), ("--export", args.export), ("--random-init", args.random_init)) if v
    ]
    if len(sources) != 1:
        got = " ".join(sources) or "none"
        p.error(f"give exactly one encoder source: CKPT, --export FILE or --random-init (got {got})")
    if args.random_init and not args.arch:
        p.error("--random-init needs --arch")
    if args.encoder and not args.checkpoint:
        p.error("--encoder picks a branch of a checkpoint; it does not apply to " + sources[0])
    if args.data:
        if args.train_data or args.val_data:
            p.error("give --data (with --val-fraction) or --train-data and --val-data, not both")
        if args.val_fraction is None or not 0 < args.val_fraction < 1:
            p.error("--data needs --val-fraction F with 0 < F < 1")
    elif not (args.train_data and args.val_data):
        p.error("give --train-data and --val-data, or --data with --val-fraction")
    elif args.val_fraction is not None:
        p.error("--val-fraction splits --data; --train-data and --val-data are already split")
    args.resize = args.resize or default_resize(args.size)
    for name in ("size", "batch_size", "k", "linear_iters"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.resize < args.size:
        p.error(f"--resize {args.resize} is smaller than --size {args.size}")
    if args.workers < 0 or args.temperature <= 0 or args.wd < 0:
        p.error("--workers and --wd must be >= 0, --temperature > 0")
    if args.max_boxes is not None and (not args.boxes or args.max_boxes < 1):
        p.error("--max-boxes N needs --boxes and N >= 1")
    if args.no_knn and args.no_linear:
        p.error("--no-knn and --no-linear leave nothing to evaluate")


def _device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise EvalError("--device cuda: no CUDA device is visible")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The evaluation of parsed, checked arguments -> the JSON result."""
    storage.configure(endpoint_url=args.s3_endpoint or None, allow_pipe=args.allow_pipe)
    device = _device(args.device)
    net, loaded = load_encoder(
        checkpoint=args.checkpoint,
        export=args.export,
        random_init=args.random_init,
        arch=args.arch,
        encoder=args.encoder or "online",
        seed=args.seed,
    )
    encoder: torch.nn.Module = net.to(device)
    if device.type == "cuda":
        encoder = encoder.to(memory_format=torch.channels_last)
    specs = [args.data] if args.data else [args.train_data, args.val_data]
    shards = [resolve(spec, args.allow_manifest_outside) for spec in specs]  # each spec resolved once, both first
    skipped = Skipped()
    if args.recompute_bn:  # one more pass over the train split's images, before any feature is taken
        est = BNEstimate(encoder, device)
        view = _View(args.size, args.resize, args.boxes, args.max_boxes)
        loader_kw = dict(batch_size=args.batch_size, workers=args.workers, progress=not args.no_progress)
        # the BN pass's skips are the feature pass's too: count them there only
        for images, _, keys in _batches(shards[0], view, desc="BatchNorm statistics", **loader_kw):
            est.add(images[~in_val(keys, args.val_fraction)] if args.data else images)
        encoder = est.result()
    features = functools.partial(
        stream_features,
        encoder,
        device=device,
        size=args.size,
        resize=args.resize,
        boxes=args.boxes,
        max_boxes=args.max_boxes,
        batch_size=args.batch_size,
        workers=args.workers,
        progress=not args.no_progress,
        skipped=skipped,
    )
    if args.data:
        f, y, keys = features(shards[0])
        val = in_val(keys, args.val_fraction)
        _check_split(int((~val).sum()), int(val.sum()), args.val_fraction)
        train_f, train_y, val_f, val_y = f[~val], y[~val], f[val], y[val]
    else:
        train_f, train_y, _ = features(shards[0], desc="train")
        val_f, val_y, _ = features(shards[1], desc="val")
    result = classify(
        train_f,
        train_y,
        val_f,
        val_y,
        k=args.k,
        temperature=args.temperature,
        knn=not args.no_knn,
        linear=not args.no_linear,
        wd=args.wd,
        linear_iters=args.linear_iters,
        device=device,
    )
    settings = {
        name: getattr(args, name)
        for name in (
            "data",
            "val_fraction",
            "train_data",
            "val_data",
            "size",
            "resize",
            "boxes",
            "max_boxes",
            "batch_size",
            "k",
            "temperature",
            "wd",
            "linear_iters",
            "recompute_bn",
        )
    }
    settings.update(device=str(device), knn=not args.no_knn, linear=not args.no_linear)
    return {**result, "model": loaded, "settings": settings, "samples_skipped": dict(sorted(skipped.by_reason.items()))}


def summary(result: dict[str, Any]) -> str:
    """One line: accuracies | model | split sizes | classes."""
    scores = " ".join(f"{k} {result[k]:.3f}" for k in result if k.startswith(("knn_top", "linear_top")))
    m = result["model"]
    if m["source"] == "checkpoint":
        model = f"{m['arch']} {m['path']} step {m['step']} {m['encoder']}"
    elif m["source"] == "export":
        model = f"{m['arch']} {m['path']}"
    else:
        model = f"{m['arch']} random-init seed {m['seed']}"
    boxes = " box crops" if result["settings"]["boxes"] else ""
    skipped = result.get("samples_skipped") or {}
    bad = f" | {sum(skipped.values())} bad samples skipped ({', '.join(f'{r} {n}' for r, n in skipped.items())})"
    return (
        f"{scores} | {model} | train {result['n_train']} val {result['n_val']}{boxes} | {result['n_classes']} classes"
        + (bad if skipped else "")
    )


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    _check_args(p, args)
    try:
        result = run(args)
    except (EvalError, ckpt_io.CheckpointError) as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr, flush=True)
        return 1
    line = summary(result)
    if args.json == "-":
        print(line, file=sys.stderr)
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        print(line)
        if args.json:
            with open(args.json, "w") as f:
                f.write(json.dumps(result, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
