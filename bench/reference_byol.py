"""Reference BYOL written with lightly: the yardstick our ``python -m train --method byol`` must match.

Everything that makes it BYOL comes from lightly (``pip install '.[bench]'``), nothing from ``train/``:
- views: lightly's ``BYOLView1Transform`` / ``BYOLView2Transform`` (torchvision's random resized crop, flip, colour
  jitter, grayscale, PIL's Gaussian blur, solarization, ImageNet normalisation) on PIL images;
- networks: a torchvision ResNet (``fc`` removed; ``--stem small``: the 3x3 stride-1 first convolution and no
  max-pool of the small-image literature, as ``train.model.ResNetEncoder`` builds it), lightly's
  ``BYOLProjectionHead`` and ``BYOLPredictionHead``;
- loss: lightly's ``NegativeCosineSimilarity``, summed over the two directions (BYOL's symmetrised loss, as lightly's
  ImageNet benchmark does since it found that a mean halves the gradient);
- target: lightly's ``update_momentum`` of the backbone and projection head copies, with the momentum from lightly's
  ``cosine_schedule`` (BYOL's: base -> 1 over the run), and ``deactivate_requires_grad``;
- learning rate: SGD with momentum, lightly's ``CosineWarmupScheduler`` per step (linear warm-up, cosine to 0).
The data is read with the ``webdataset`` library straight from the shards ``prep`` wrote (JPEG + JSON members), so
it shares no reader either. Only the evaluation is ours on purpose (``train.eval``: the same kNN and probes for both
rows), and the backbone is written as ``OUT/backbone.pth`` in torchvision's format, the file
``python -m train.eval --export`` reads.

The settings mirror ``python -m train``'s flags of the same names, so ``bench/learn.py`` passes both the same
values: ``--lr`` is the peak at a batch of ``--lr-batch`` (scaled linearly), warm-up in steps, EMA from
``--ema-base``. ``OUT/log.jsonl`` has a row every ``--log-every`` steps (``step``, ``loss``, ``lr``, ``tau``,
``images_per_s``; ``knn_top1`` at every ``--eval-every`` and at the end, from ``train.eval`` on the same labelled
sets as ``python -m train --eval-data``).

    python bench/reference_byol.py --data learn_data/scenes --out runs/ref --image-size 32 --batch-size 64 \\
        --steps 1000 --eval-data learn_data/probe_train --eval-val-data learn_data/probe_val --eval-every 250
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torchvision
from lightly.loss import NegativeCosineSimilarity
from lightly.models.modules import BYOLPredictionHead, BYOLProjectionHead
from lightly.models.utils import deactivate_requires_grad, update_momentum
from lightly.transforms.byol_transform import BYOLView1Transform, BYOLView2Transform
from lightly.utils.scheduler import CosineWarmupScheduler, cosine_schedule
from PIL import Image
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def backbone(arch: str, stem: str) -> nn.Module:
    """torchvision's ResNet without its classifier; ``small``: 3x3 stride-1 stem, no max-pool."""
    net = getattr(torchvision.models, arch)(weights=None)
    if stem == "small":
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    net.dim = net.fc.in_features
    net.fc = nn.Identity()
    return net


class BYOL(nn.Module):
    """lightly's BYOL modules: online backbone + projection + prediction; momentum copies of the first two."""

    def __init__(self, net: nn.Module, hidden: int, dim: int, pred_hidden: int):
        super().__init__()
        self.backbone = net
        self.projection_head = BYOLProjectionHead(net.dim, hidden, dim)
        self.prediction_head = BYOLPredictionHead(dim, pred_hidden, dim)
        self.backbone_momentum = copy.deepcopy(self.backbone)
        self.projection_head_momentum = copy.deepcopy(self.projection_head)
        deactivate_requires_grad(self.backbone_momentum)
        deactivate_requires_grad(self.projection_head_momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.prediction_head(self.projection_head(self.backbone(x)))

    def forward_momentum(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection_head_momentum(self.backbone_momentum(x)).detach()


class Views:
    """JPEG bytes -> (view 1, view 2) tensors with lightly's BYOL view transforms."""

    def __init__(self, size: int, min_scale: float, blur: bool):
        blur1, blur2 = (1.0, 0.1) if blur else (0.0, 0.0)
        self.t1 = BYOLView1Transform(input_size=size, min_scale=min_scale, gaussian_blur=blur1)
        self.t2 = BYOLView2Transform(input_size=size, min_scale=min_scale, gaussian_blur=blur2)

    def __call__(self, sample: dict) -> tuple[torch.Tensor, torch.Tensor]:
        img = Image.open(io.BytesIO(sample["jpg"])).convert("RGB")
        return self.t1(img), self.t2(img)


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker (base seed + id); numpy and random, which lightly's blur and solarize draw from, not
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def loader(urls: list[str], views: Views, batch: int, workers: int, seed: int) -> torch.utils.data.DataLoader:
    import webdataset as wds

    ds = (
        wds.WebDataset(urls, resampled=True, shardshuffle=False, seed=seed, nodesplitter=None)
        .shuffle(1000, rng=random.Random(seed))
        .map(views)
    )
    g = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        ds.batched(batch, partial=False),
        batch_size=None,
        num_workers=workers,
        worker_init_fn=_seed_worker,
        generator=g,
        persistent_workers=workers > 0,
    )


class Probe:
    """kNN top-1 of the online backbone on labelled shards, with ``train.eval`` (as ``python -m train --eval-data``)."""

    def __init__(self, train_spec: str, val_spec: str, size: int, device: torch.device):
        from train import eval as evaluation

        self.ev, self.device = evaluation, device
        self.train = evaluation.load_labelled(train_spec, size=size)
        self.val = evaluation.load_labelled(val_spec, size=size)

    def knn(self, net: nn.Module) -> float:
        f_train = self.ev.extract(net, self.train.images, device=self.device)
        f_val = self.ev.extract(net, self.val.images, device=self.device)
        return self.ev.knn_top1(f_train, self.train.labels, f_val, self.val.labels)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--data", required=True, help="training shards: a prep output directory (its manifest.json)")
    p.add_argument("--out", required=True, help="output directory: log.jsonl, backbone.pth, config.json")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--stem", choices=("imagenet", "small"), default="imagenet")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--crop-min-scale", type=float, default=0.08)
    p.add_argument("--blur", action=argparse.BooleanOptionalAction, default=True, help="BYOL's Gaussian blur")
    p.add_argument("--proj-hidden", type=int, default=4096)
    p.add_argument("--proj-dim", type=int, default=256)
    p.add_argument("--pred-hidden", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--lr", type=float, default=0.06)
    p.add_argument("--lr-batch", type=int, default=256)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--sgd-momentum", type=float, default=0.9)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--ema-base", type=float, default=0.99)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: bf16 autocast, as python -m train")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--eval-data", default="", help="labelled shards: the kNN memory")
    p.add_argument("--eval-val-data", default="", help="labelled shards: the kNN queries")
    p.add_argument("--eval-every", type=int, default=0)
    p.add_argument("--eval-size", type=int, default=0, help="evaluation image side (0 = --image-size)")
    a = p.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "config.json"), "w") as f:
        json.dump(vars(a), f, indent=1, sort_keys=True)

    from shards import reader

    urls = reader.expand_spec(a.data)
    torch.manual_seed(a.seed)
    device = torch.device(a.device)
    model = BYOL(backbone(a.arch, a.stem), a.proj_hidden, a.proj_dim, a.pred_hidden).to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    criterion = NegativeCosineSimilarity()
    peak = a.lr * a.batch_size / a.lr_batch
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.SGD(params, lr=peak, momentum=a.sgd_momentum, weight_decay=a.weight_decay)
    sched = CosineWarmupScheduler(opt, warmup_epochs=a.warmup_steps, max_epochs=a.steps, end_value=0.0)
    probe = Probe(a.eval_data, a.eval_val_data, a.eval_size or a.image_size, device) if a.eval_data else None
    views = Views(a.image_size, a.crop_min_scale, a.blur)
    batches = iter(loader(urls, views, a.batch_size, a.workers, a.seed))
    model.train()
    t0, seen = time.perf_counter(), 0
    with open(os.path.join(a.out, "log.jsonl"), "w") as log:
        for step in range(1, a.steps + 1):
            x0, x1 = (x.to(device, non_blocking=True) for x in next(batches))
            tau = cosine_schedule(step - 1, a.steps, a.ema_base, 1.0)
            update_momentum(model.backbone, model.backbone_momentum, m=tau)
            update_momentum(model.projection_head, model.projection_head_momentum, m=tau)
            with autocast:
                p0, p1 = model(x0), model(x1)
                z0, z1 = model.forward_momentum(x0), model.forward_momentum(x1)
            loss = criterion(p0.float(), z1.float()) + criterion(p1.float(), z0.float())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            lr = opt.param_groups[0]["lr"]
            opt.step()
            sched.step()
            seen += len(x0)
            evaluated = probe is not None and (step == a.steps or (a.eval_every and step % a.eval_every == 0))
            if step % a.log_every == 0 or step == a.steps or evaluated:
                loss_value = float(loss.detach())
                if not math.isfinite(loss_value):
                    raise SystemExit(f"reference BYOL: loss is {loss_value} at step {step}")
                now = time.perf_counter()
                row = {"step": step, "loss": loss_value, "lr": lr, "tau": tau, "images_per_s": seen / (now - t0)}
                if evaluated:
                    assert probe is not None
                    row["knn_top1"] = probe.knn(model.backbone)
                    t0 += time.perf_counter() - now  # the evaluation is not training time
                log.write(json.dumps(row) + "\n")
                log.flush()
                print(json.dumps(row), flush=True)
    # torchvision names and shapes (train.eval --export infers the arch from them)
    state = {k: v.cpu() for k, v in model.backbone.state_dict().items()}
    torch.save(state, os.path.join(a.out, "backbone.pth"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
