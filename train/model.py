"""UniVIP networks (docs/method.md, "Networks"): ResNet encoder, BYOL MLPs, online and target branches, instance features.

The training loop owns the EMA: it calls `model(view1, view2, boxes1, boxes2)` for the loss terms, steps the
optimizer, then `update_target(model, tau)`. Nothing here updates the target behind the loop's back.

`forward` runs four branch passes (online and target, each view) and then the loss region (`loss_terms`: predictor,
scene-instance layer, losses); `compile_regions` (`--compile`) compiles exactly these, in place.

Instance features, two ways (`ModelConfig.instance_mode`; docs/method.md, "Instances"):
- "crop" (the paper's, default): K instance crops of `instance_size` pixels pass through the same encoder. The
  paper's crops are cut from the source image by the input pipeline (`crops1`, `crops2` of `UniVIP.forward`:
  `--instance-source image`); without them each box is cut out of the augmented view tensor with
  `torchvision.ops.roi_align` (one batched call; `--instance-source view`, cheaper but it upsamples small boxes).
  With 96 px crops of 224 px views this costs ~1.7x the encoder FLOPs of BYOL.
- "roi" (cheaper, not the paper's): RoIAlign of each box on the encoder's last feature map of the view, averaged
  over its `roi_output` x `roi_output` bins (`train.roi.roi_mean`: the same numbers as torchvision's kernel, as one
  bmm). One encoder pass per view, ~1.0x BYOL's FLOPs.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torchvision.ops import roi_align

from train.config import ARCHS, TrainConfig, loss_weights
from train.losses import byol_loss, scene_instance_loss, symmetric_instance_ot_loss
from train.roi import roi_mean

__all__ = [
    "ModelConfig",
    "ResNetEncoder",
    "MLP",
    "Branch",
    "UniVIP",
    "update_target",
    "boxes_to_rois",
    "TERMS",
    "LOGGED",
    "embedding_std",
]

TERMS = ("scene", "scene_instance", "instance")
LOGGED = ("total", *TERMS, "z_std")  # what UniVIP.forward returns: the weighted total, the terms, the collapse signal
METHODS = ("univip", "byol")
INSTANCE_MODES = ("crop", "roi")


@dataclass
class ModelConfig:
    """Every setting that shapes the networks and the loss terms. Defaults are the paper's ResNet-50 setting."""

    arch: str = "resnet50"
    proj_hidden: int = 4096
    proj_dim: int = 256
    pred_hidden: int = 4096
    k: int = 4  # instances per view; the scene-instance linear layer is K*proj_dim -> proj_dim
    method: str = "univip"  # "byol": scene term only, and no scene-instance layer is built
    instance_mode: str = "crop"  # "crop" | "roi", see the module docstring
    instance_size: int = 96  # crop side in pixels ("crop" mode)
    roi_output: int = 7  # RoIAlign bins per side on the feature map ("roi" mode)
    w_scene: float = 1.0
    w_scene_instance: float = 1.0
    w_instance: float = 1.0
    ot_eps: float = 0.05
    ot_iters: int = 50

    def __post_init__(self):
        for name, value, allowed in (
            ("arch", self.arch, ARCHS),
            ("method", self.method, METHODS),
            ("instance_mode", self.instance_mode, INSTANCE_MODES),
        ):
            if value not in allowed:
                raise ValueError(f"ModelConfig.{name}={value!r}: expected one of {', '.join(allowed)}")
        if self.k < 1:
            raise ValueError(f"ModelConfig.k={self.k}: need at least one instance per view")

    def weights(self) -> dict[str, float]:
        """Loss weights by term; "byol" zeroes the two UniVIP terms."""
        return loss_weights(self.method, self.w_scene, self.w_scene_instance, self.w_instance)

    @classmethod
    def from_train(cls, cfg: TrainConfig) -> ModelConfig:
        """The networks and loss settings of a training run's config."""
        return cls(
            arch=cfg.arch,
            proj_hidden=cfg.proj_hidden,
            proj_dim=cfg.proj_dim,
            pred_hidden=cfg.pred_hidden,
            k=cfg.k,
            method=cfg.method,
            instance_mode=cfg.instance_mode,
            instance_size=cfg.instance_size,
            w_scene=cfg.w_scene,
            w_scene_instance=cfg.w_scene_instance,
            w_instance=cfg.w_instance,
            ot_eps=cfg.sinkhorn_eps,
            ot_iters=cfg.sinkhorn_iters,
        )


class ResNetEncoder(nn.Module):
    """torchvision ResNet, random init, without its classifier.

    `self.net` is the torchvision model itself (fc replaced by Identity), so its state dict keys are torchvision's
    and export needs no renaming. forward: [B, 3, H, W] -> [B, C] globally average-pooled;
    feature_map: [B, 3, H, W] -> [B, C, H/32, W/32]. C = 512 (resnet18/34) or 2048 (resnet50/101).
    """

    def __init__(self, arch: str):
        super().__init__()
        net = getattr(torchvision.models, arch)(weights=None)
        self.dim = net.fc.in_features
        net.fc = nn.Identity()
        self.net = net

    def feature_map(self, x: Tensor) -> Tensor:
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        return n.layer4(n.layer3(n.layer2(n.layer1(x))))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class MLP(nn.Sequential):
    """BYOL's projector / predictor: Linear -> BatchNorm1d -> ReLU -> Linear. [N, in_dim] -> [N, out_dim]."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__(
            nn.Linear(in_dim, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim)
        )


def boxes_to_rois(boxes: Tensor) -> Tensor:
    """[B, K, 4] xyxy boxes -> [B*K, 5] rows (batch index, x1, y1, x2, y2), the layout roi_align takes."""
    b, k, _ = boxes.shape
    idx = torch.arange(b, device=boxes.device, dtype=boxes.dtype).repeat_interleave(k)
    return torch.cat([idx[:, None], boxes.reshape(b * k, 4)], dim=1)


def _like_weights(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """Give an input the memory format of the encoder, so a channels_last model gets channels_last batches."""
    if conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous():
        return x.contiguous(memory_format=torch.channels_last)
    return x


class Branch(nn.Module):
    """Encoder + projector, plus the instance-feature logic. The online and target branches are two of these.

    forward(view [B, 3, H, W], boxes [B, K, 4] xyxy view pixels or None) -> (scene [B, D], instances [B, K, D] or None),
    D = projector output dimension. Boxes are continuous pixel coordinates with end-exclusive x2/y2 (a box covering
    pixel columns 0..9 is x1=0, x2=10), which is what roi_align's aligned=True expects.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.encoder = ResNetEncoder(cfg.arch)
        self.projector = MLP(self.encoder.dim, cfg.proj_hidden, cfg.proj_dim)
        self.instance_mode = cfg.instance_mode
        self.instance_size = cfg.instance_size
        self.roi_output = cfg.roi_output

    def instance_crops(self, view: Tensor, boxes: Tensor) -> Tensor:
        """The K boxes cut out of each view and resized: [B, 3, H, W], [B, K, 4] -> [B*K, 3, S, S].

        sampling_ratio=-1 (adaptive) averages ceil(box/S) samples per output pixel, so shrinking a large box is
        area-averaged rather than aliased, and enlarging a small one is bilinear.
        """
        rois = boxes_to_rois(boxes.to(view.dtype))
        return roi_align(view, rois, output_size=self.instance_size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)

    def forward(
        self, view: Tensor, boxes: Tensor | None = None, crops: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """crops: the K instance crops of each view made by the input pipeline, [B, K, 3, s, s] normalised, or None
        (then "crop" mode cuts them out of the view with roi_align)."""
        view = _like_weights(view, self.encoder.net.conv1)
        if boxes is None and crops is None:
            return self.projector(self.encoder(view)), None
        if crops is not None:
            b, k = crops.shape[:2]
            scene_feat = self.encoder(view)  # [B, C]
            inst_feat = self.encoder(_like_weights(crops.flatten(0, 1), self.encoder.net.conv1))  # [B*K, C]
            return self.projector(scene_feat), self.projector(inst_feat).reshape(b, k, -1)
        assert boxes is not None  # both None returned above
        b, k, _ = boxes.shape
        if self.instance_mode == "crop":
            scene_feat = self.encoder(view)  # [B, C]
            crops = _like_weights(self.instance_crops(view, boxes), self.encoder.net.conv1)
            inst_feat = self.encoder(crops)  # [B*K, C]
        else:
            fmap = self.encoder.feature_map(view)  # [B, C, h, w]
            scene_feat = fmap.mean(dim=(2, 3))  # the same global average pool as ResNet's avgpool
            # RoIAlign (roi_output x roi_output bins, 2 x 2 samples each) averaged over its bins, as one bmm
            inst_feat = roi_mean(fmap, boxes, fmap.shape[-1] / view.shape[-1], self.roi_output, 2).flatten(0, 1)
        # Scene and instances go through the projector separately: their BatchNorm statistics differ (whole views
        # vs object crops) and mixing them would couple the two batches.
        return self.projector(scene_feat), self.projector(inst_feat).reshape(b, k, -1)


class UniVIP(nn.Module):
    """Online branch (encoder, projector) + predictor + scene-instance linear; target branch = EMA copy.

    The target starts as a deep copy of the online branch with requires_grad False and is changed only by
    `update_target`. With method "byol" no scene-instance layer exists, so DDP sees no unused parameters.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.online = Branch(cfg)
        self.predictor = MLP(cfg.proj_dim, cfg.pred_hidden, cfg.proj_dim)
        self.linear = nn.Linear(cfg.k * cfg.proj_dim, cfg.proj_dim) if cfg.method == "univip" else None
        self.target = copy.deepcopy(self.online)
        self.target.requires_grad_(False)
        self._loss_region = self.loss_terms  # torch.compile'd by compile_regions

    def compile_regions(self, mode: str = "default") -> None:
        """torch.compile (static shapes) the encoder passes, each branch's forward (encoder, instance features,
        projector), and the loss region (`loss_terms`: predictor, scene-instance layer, losses, Sinkhorn). In place:
        parameter names and the state dict stay the same. ``mode``: torch.compile's ("reduce-overhead" replays CUDA
        graphs). The first call of each region compiles it; a new input shape would compile it again."""
        options: dict[str, Any] = dict(dynamic=False, mode=mode)
        self.online.compile(**options)
        self.target.compile(**options)
        self._loss_region = torch.compile(self.loss_terms, **options)

    def predict(self, scene: Tensor, inst: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Predictor on online projections: scene [B, D], instances [B, K, D] or None -> (p [B, D], o [B, K, D])."""
        p = self.predictor(scene)
        o = None if inst is None else self.predictor(inst.flatten(0, 1)).reshape(inst.shape)
        return p, o

    def online_forward(
        self, view: Tensor, boxes: Tensor | None = None, crops: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None, Tensor]:
        """Online branch: view [B, 3, H, W], boxes [B, K, 4] or None, crops [B, K, 3, s, s] or None ->
        (p [B, D] scene prediction, o [B, K, D] instance predictions or None, y [B, D] scene projection)."""
        scene, inst = self.online(view, boxes, crops)
        return *self.predict(scene, inst), scene

    @torch.no_grad()
    def target_forward(
        self, view: Tensor, boxes: Tensor | None = None, crops: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Target projections (no gradient): view, boxes or None, crops or None -> (z [B, D], t [B, K, D] or None)."""
        return self.target(view, boxes, crops)

    def forward(
        self,
        view1: Tensor,
        view2: Tensor,
        boxes1: Tensor,
        boxes2: Tensor,
        weights: Mapping[str, float] | None = None,
        crops1: Tensor | None = None,
        crops2: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """All loss terms for one batch.

        view1, view2: [B, 3, H, W] augmented views; boxes1, boxes2: [B, K, 4] the same K objects in each view's pixels.
        weights: {"scene", "scene_instance", "instance"} -> float, default from the config; a zero weight skips the
        term's computation (its instance passes too, when no other term needs them).
        crops1, crops2: [B, K, 3, s, s] the instances of each view cut from the source image and augmented like the
        view (`--instance-source image`), or None: "crop" mode then cuts them out of the views.
        Returns {"scene", "scene_instance", "instance", "total"} scalars (skipped terms are 0) and "z_std", the
        collapse signal of the online scene projections (`embedding_std`, no gradient).
          scene          = L(p1, z2) + L(p2, z1)                          (BYOL, symmetrised)
          scene_instance = mean over v in {1, 2} of sum over s of L(linear(o_v), z_s)
          instance       = OT(o1, t2) + OT(o2, t1)                        (symmetrised like the scene term)
        """
        w = self.cfg.weights() if weights is None else {term: float(weights.get(term, 0.0)) for term in TERMS}
        if self.linear is None and w["scene_instance"] != 0:
            raise ValueError("scene_instance weight is non-zero but the model was built with method='byol'")
        need_o = w["scene_instance"] != 0 or w["instance"] != 0
        need_t = w["instance"] != 0
        y1, i1 = self.online(view1, *((boxes1, crops1) if need_o else (None, None)))
        y2, i2 = self.online(view2, *((boxes2, crops2) if need_o else (None, None)))
        z1, t1 = self.target_forward(view1, *((boxes1, crops1) if need_t else (None, None)))
        z2, t2 = self.target_forward(view2, *((boxes2, crops2) if need_t else (None, None)))
        return self._loss_region(y1, i1, y2, i2, z1, t1, z2, t2, w)

    def loss_terms(
        self,
        y1: Tensor,
        i1: Tensor | None,
        y2: Tensor,
        i2: Tensor | None,
        z1: Tensor,
        t1: Tensor | None,
        z2: Tensor,
        t2: Tensor | None,
        w: Mapping[str, float],
    ) -> dict[str, Tensor]:
        """The loss region of `forward`, from the branches' projections: online scene y [B, D] and instances
        i [B, K, D] (or None) of each view, target scene z [B, D] and instances t [B, K, D] (or None), weights ``w``.
        Applies the predictor, then the terms `forward` documents."""
        p1, o1 = self.predict(y1, i1)
        p2, o2 = self.predict(y2, i2)
        zero = p1.new_zeros((), dtype=torch.float32)
        terms = dict.fromkeys(TERMS, zero)
        if w["scene"] != 0:
            terms["scene"] = byol_loss(p1, z2) + byol_loss(p2, z1)
        if w["scene_instance"] != 0:
            z = torch.stack([z1, z2], dim=1)  # [B, 2, D]
            assert o1 is not None and o2 is not None and self.linear is not None, "scene_instance needs instances"
            terms["scene_instance"] = 0.5 * (
                scene_instance_loss(o1, z, self.linear) + scene_instance_loss(o2, z, self.linear)
            )
        if w["instance"] != 0:
            f_o, f_t = torch.stack([p1, p2], dim=1), torch.stack([z1, z2], dim=1)
            eps, iters = self.cfg.ot_eps, self.cfg.ot_iters
            assert o1 is not None and o2 is not None and t1 is not None and t2 is not None, "instance needs instances"
            # OT(o1, t2) + OT(o2, t1), both directions in one batched Sinkhorn loop
            terms["instance"] = symmetric_instance_ot_loss(o1, o2, t1, t2, f_o, f_t, eps, iters)
        terms["total"] = cast(Tensor, sum(w[t] * terms[t] for t in TERMS))  # TERMS is not empty: never the 0 start
        terms["z_std"] = 0.5 * (embedding_std(y1) + embedding_std(y2))
        return terms


@torch.no_grad()
def embedding_std(y: Tensor) -> Tensor:
    """Collapse signal (SimSiam, Chen & He 2021): the per-dimension standard deviation over the batch of the
    l2-normalised vectors y [B, D], averaged over dimensions -> float32 scalar. About 1/sqrt(D) when the vectors
    spread over the sphere; 0 when every input maps to one vector (collapse), which BYOL's loss cannot tell apart
    from learning because a collapsed network lowers it too."""
    return F.normalize(y.detach().float(), dim=-1).std(dim=0, correction=0).mean()


@torch.no_grad()
def update_target(model: nn.Module, tau: float) -> None:
    """EMA step of the target branch: xi <- tau * xi + (1 - tau) * theta; buffers copied.

    `model` is a UniVIP or a DDP wrapper of one. Buffers (BatchNorm running statistics, batch counters) are copied,
    not averaged: the target normalises with batch statistics in training, so they only matter for evaluation.
    """
    net = cast(UniVIP, getattr(model, "module", model))  # the docstring's contract
    online: list[Tensor] = [p for p in net.online.parameters()]
    target: list[Tensor] = [p for p in net.target.parameters()]
    if len(online) != len(target):
        raise RuntimeError(f"update_target: online has {len(online)} parameters, target {len(target)}")
    torch._foreach_lerp_(target, online, 1.0 - tau)
    # buffers copied in one multi-tensor call per dtype (running statistics, batch counters): the fast path wants one
    by_dtype: dict[torch.dtype, tuple[list[Tensor], list[Tensor]]] = {}
    for b_t, b_o in zip(net.target.buffers(), net.online.buffers(), strict=True):
        dst, src = by_dtype.setdefault(b_t.dtype, ([], []))
        dst.append(b_t)
        src.append(b_o)
    for dst, src in by_dtype.values():
        torch._foreach_copy_(dst, src)
