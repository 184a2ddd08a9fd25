"""``TrainConfig``: every training setting in one dataclass, presets, and the CLI generated from its fields.

Precedence: dataclass defaults (the paper's COCO recipe) < ``--preset`` overrides < explicit flags.
The config is saved as JSON in ``OUT/config.json`` and inside every checkpoint; a resumed run must agree on the
fields in ``RESUME_MUST_MATCH`` (they change parameter shapes, optimizer state or the meaning of the data position).

Batch size and learning rate: ``batch_size`` is the GLOBAL batch (the paper's 512 / 4096), divided evenly over the
ranks (an error when it does not divide). ``lr`` is the peak learning rate at a global batch of ``lr_batch``; the run
uses ``lr * batch_size / lr_batch`` (linear scaling rule, Goyal et al. 2017), so changing ``--batch-size`` alone keeps
the recipe: coco = 0.4 at 512, imagenet = 0.2 at 256 -> 3.2 at 4096 (BYOL's LARS rule).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

ARCHS = ("resnet18", "resnet34", "resnet50", "resnet101")  # torchvision ResNets the encoder builds


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask, as the DataLoader counts them when it warns about
    more workers than cores), not the machine's."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no affinity call on this platform
        return os.cpu_count() or 1


def default_workers(most: int) -> int:
    """A default worker count: ``most``, or the usable cores when there are fewer."""
    return min(most, usable_cores())


def _f(default: Any, help: str, choices: tuple | None = None):
    return field(default=default, metadata={"help": help, "choices": choices})


def loss_weights(method: str, w_scene: float, w_scene_instance: float, w_instance: float) -> dict[str, float]:
    """The weight of each loss term; ``byol`` is scene-scene alone (shared by TrainConfig and model.ModelConfig)."""
    if method == "byol":
        return {"scene": w_scene, "scene_instance": 0.0, "instance": 0.0}
    return {"scene": w_scene, "scene_instance": w_scene_instance, "instance": w_instance}


@dataclass
class TrainConfig:
    # --- where
    data: str = _f(
        "",
        "shards: directory, brace pattern (out/coco-{000000..000099}.tar), glob or manifest.json; "
        "local, s3://bucket/prefix/ (listing or manifest) or http(s):// (manifest or brace pattern)",
    )
    out: str = _f("runs/univip", "output directory: config.json, log.jsonl, ckpt-XXXXXXXX.pt")
    preset: str = _f("coco", "settings bundle applied before the other flags", ("coco", "imagenet", "tiny"))
    resume: bool = _f(False, "continue from the newest checkpoint in --out (same config required)")
    # --- model
    arch: str = _f("resnet50", "encoder (torchvision, random init)", ARCHS)
    method: str = _f(
        "univip",
        "univip = three losses; byol = plain BYOL: scene-scene only (instance weights "
        "ignored), on BYOL's own views unless --views overlap",
        ("univip", "byol"),
    )
    views: str = _f(
        "auto",
        "how the two views are drawn: overlap = Algorithm 1 (overlapping crops holding K boxes), "
        "byol = two independent random resized crops, boxes unused; auto: overlap for univip, "
        "byol for byol (byol on overlap views is an ablation, not BYOL)",
        ("auto", "overlap", "byol"),
    )
    w_scene: float = _f(1.0, "weight of the scene-scene (BYOL) loss; 0 disables it")
    w_scene_instance: float = _f(1.0, "weight of the scene-instance loss; 0 disables it")
    w_instance: float = _f(1.0, "weight of the instance-instance (optimal transport) loss; 0 disables it")
    k: int = _f(4, "instances per view (Algorithm 1's K)")
    view_iters: int = _f(20, "Algorithm 1: tries for an overlap holding K boxes before the random-box fallback")
    crop_min_scale: float = _f(0.08, "random resized crop: smallest area fraction of a view")
    blur: bool = _f(
        True,
        "BYOL's Gaussian blur (p 1.0 / 0.1, sigma 0.1-2 px); --no-blur for small images, as the small-image "
        "literature does (SimCLR's CIFAR-10 setting, lightly's and solo-learn's CIFAR recipes): at 32 px a 2 px "
        "sigma erases what a 224 px view keeps",
    )
    image_size: int = _f(224, "view side in pixels")
    instance_size: int = _f(96, "instance crop side in pixels (instance_mode=crop)")
    instance_mode: str = _f(
        "crop",
        "crop = K instance crops through the encoder (paper); roi = RoIAlign on the "
        "encoder's last feature map (cheaper, not the paper's)",
        ("crop", "roi"),
    )
    instance_source: str = _f(
        "image",
        "instance_mode=crop: image = each box cut from the decoded source image at "
        "its own resolution, resized to --instance-size, flipped and coloured like its view "
        "(paper); view = cut from the augmented view (cheaper, upsamples small boxes)",
        ("image", "view"),
    )
    proj_hidden: int = _f(4096, "projector hidden width")
    proj_dim: int = _f(256, "projector / predictor output width")
    pred_hidden: int = _f(4096, "predictor hidden width")
    sinkhorn_eps: float = _f(0.05, "entropic regularisation of the instance matching (paper silent; OTA uses 0.1)")
    sinkhorn_iters: int = _f(50, "Sinkhorn-Knopp iterations")
    # --- optimisation
    batch_size: int = _f(512, "GLOBAL batch size (all ranks together); must divide by the number of ranks")
    epochs: int = _f(800, "epochs; the lr and EMA schedules span epochs * steps_per_epoch steps")
    max_steps: int = _f(0, "stop after this many steps (0 = run the whole schedule); the schedules are unchanged")
    optimizer: str = _f("sgd", "sgd (momentum) or lars (BYOL's, trust ratio)", ("sgd", "lars"))
    lr: float = _f(0.4, "peak learning rate at a global batch of --lr-batch (scaled linearly to --batch-size)")
    lr_batch: int = _f(512, "reference global batch for --lr")
    weight_decay: float = _f(1e-4, "weight decay")
    wd_exclude_bn_bias: bool = _f(False, "no weight decay (and no LARS adaptation) on biases and BatchNorm parameters")
    sgd_momentum: float = _f(0.9, "momentum of SGD and LARS (not the EMA: that is --ema-base)")
    lars_eta: float = _f(0.001, "LARS trust coefficient")
    optim_impl: str = _f(
        "auto",
        "optimizer update kernels: auto = torch's fused SGD on CUDA, multi-tensor (foreach) otherwise and for LARS; "
        "foreach; fused (SGD; LARS has none and uses foreach); loop = one tensor at a time (the reference)",
        ("auto", "foreach", "fused", "loop"),
    )
    warmup_epochs: float = _f(4.0, "linear lr warm-up from 0, then cosine decay to 0")
    ema_base: float = _f(0.99, "EMA decay (tau) of the target at step 0; rises to 1 on a cosine (BYOL)")
    grad_clip: float = _f(0.0, "clip the global gradient norm to this value (0 = off)")
    seed: int = _f(0, "seed for initialisation, data order and augmentation")
    # --- input pipeline
    workers: int = _f(default_workers(8), "DataLoader worker processes per rank (the default: 8, or the usable cores)")
    shuffle_buffer: int = _f(1000, "samples held in the shuffle buffer of each stream")
    streams: int = _f(
        0,
        "independent sample streams per rank (0 = max(1, workers)); the sample order depends on "
        "it, not on --workers, so keep it when resuming with another worker count",
    )
    gpu_aug: bool = _f(False, "colour jitter, grayscale, blur and solarize on the device, batched (CPU only crops)")
    gpu_decode: bool = _f(
        False,
        "decode the JPEGs on the device too (nvjpeg on CUDA), with the crops, resizes and "
        "flips: the CPU only reads bytes and runs Algorithm 1 (implies --gpu-aug)",
    )
    on_bad_shard: str = _f(
        "skip", "unreadable shard or sample: skip it (counted in the log) or fail the run", ("skip", "fail")
    )
    verify_images: bool = _f(
        False,
        "check each JPEG against the SHA-256 in its KEY.json (shard format 2); a "
        "mismatch is a bad sample (see --on-bad-shard)",
    )
    allow_pipe: bool = _f(False, "allow pipe: shard URLs (they run a shell command)")
    allow_manifest_outside: bool = _f(
        False,
        "follow manifest.json entries outside the manifest's own directory or prefix (absolute paths, '..', other "
        "URLs); refused otherwise",
    )
    s3_endpoint: str = _f(
        "",
        "S3 API endpoint of an S3-compatible store for s3:// data (MinIO, Ceph...); empty: "
        "$S3_ENDPOINT_URL, else $AWS_ENDPOINT_URL, else AWS. Credentials: the AWS environment "
        "or profile",
    )
    # --- monitoring
    collapse_warn: float = _f(
        0.1,
        "warn once when z_std * sqrt(proj_dim) falls below this (z_std: per-dimension std "
        "of the l2-normalised online projections; 1 = spread over the sphere, 0 = collapse)",
    )
    eval_data: str = _f("", "labelled shards (prep imagenet) for a kNN evaluation during training; empty: none")
    eval_val_data: str = _f(
        "", "held-out labelled shards for that evaluation; empty: --eval-val-fraction of --eval-data"
    )
    eval_val_fraction: float = _f(0.2, "share of --eval-data held out (by key hash) when --eval-val-data is empty")
    eval_every: int = _f(
        0,
        "run the kNN evaluation every N steps and at the end (0 = only at the end, when "
        "--eval-data is given); logged as knn_top1",
    )
    eval_size: int = _f(0, "image side for the evaluation (0 = --image-size)")
    # --- hardware
    device: str = _f("auto", "auto = cuda when available, else cpu", ("auto", "cpu", "cuda"))
    sync_bn: bool = _f(False, "SyncBatchNorm across ranks in the online network")
    amp: bool = _f(True, "bf16 autocast on GPU (ignored on CPU)")
    channels_last: bool = _f(True, "channels_last memory format on GPU (ignored on CPU)")
    compile: bool = _f(
        False,
        "torch.compile the encoder passes and the loss region (static shapes; train.model.UniVIP.compile_regions), "
        "and with --gpu-aug on CUDA the colour augmentation's pointwise chains (train.augment.gpu_colour). "
        "The first step compiles them: tiny preset on 2 CPU cores about 4 minutes the first time, a few seconds "
        "once torch's compile cache holds the graphs; ResNet-50 on a GPU: bench/gpu.sh reports it",
    )
    compile_mode: str = _f(
        "default",
        "torch.compile mode with --compile: default; reduce-overhead = replay CUDA graphs too (fewer kernel "
        "launches; CUDA only); max-autotune = also search kernel configurations (the longest compilation)",
        ("default", "reduce-overhead", "max-autotune"),
    )
    # --- bookkeeping
    ckpt_every: int = _f(1000, "checkpoint every N steps (and always at the end); 0 = only at the end")
    keep_ckpts: int = _f(3, "keep the newest N checkpoints (0 = keep all)")
    log_every: int = _f(10, "log (JSONL + progress bar) every N steps")

    # --- derived values ------------------------------------------------------------------------------------------
    def per_rank_batch(self, world: int) -> int:
        if self.batch_size % world:
            raise ValueError(f"--batch-size {self.batch_size} is the global batch and must divide by the {world} ranks")
        return self.batch_size // world

    @property
    def peak_lr(self) -> float:
        return self.lr * self.batch_size / self.lr_batch

    def loss_weights(self) -> dict[str, float]:
        """The weight of each loss term; ``--method byol`` is scene-scene alone."""
        return loss_weights(self.method, self.w_scene, self.w_scene_instance, self.w_instance)

    def validate(self) -> TrainConfig:
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ValueError(f"{f.name}={getattr(self, f.name)!r}: expected one of {', '.join(choices)}")
        positive = (
            "k",
            "image_size",
            "instance_size",
            "proj_hidden",
            "proj_dim",
            "pred_hidden",
            "batch_size",
            "epochs",
            "lr_batch",
            "sinkhorn_iters",
            "view_iters",
            "log_every",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in (
            "max_steps",
            "workers",
            "shuffle_buffer",
            "streams",
            "ckpt_every",
            "keep_ckpts",
            "grad_clip",
            "weight_decay",
            "warmup_epochs",
            "lr",
            "w_scene",
            "w_scene_instance",
            "w_instance",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.ema_base <= 1:
            raise ValueError(f"ema_base must lie in [0, 1], got {self.ema_base}")
        if not 0 < self.crop_min_scale <= 1:
            raise ValueError(f"crop_min_scale must lie in (0, 1], got {self.crop_min_scale}")
        if sum(self.loss_weights().values()) == 0:
            raise ValueError("every loss weight is 0: nothing to train")
        if self.method == "univip" and self.view_mode == "byol":
            raise ValueError(
                "--views byol draws independent crops that share no instances: UniVIP needs --views overlap"
            )
        if not 0 < self.eval_val_fraction < 1:
            raise ValueError(f"eval_val_fraction must lie in (0, 1), got {self.eval_val_fraction}")
        if self.eval_size < 0 or self.eval_every < 0:
            raise ValueError("eval_size and eval_every must be >= 0")
        return self

    @property
    def view_mode(self) -> str:
        """The views actually drawn: --views, or the method's own (overlap for univip, byol for byol)."""
        if self.views != "auto":
            return self.views
        return "byol" if self.method == "byol" else "overlap"

    @property
    def instance_crops(self) -> bool:
        """Whether the input pipeline cuts the instances out of the source image (and the model takes them)."""
        needs_instances = self.method == "univip" and (self.w_scene_instance != 0 or self.w_instance != 0)
        return needs_instances and self.instance_mode == "crop" and self.instance_source == "image"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TrainConfig:
        """A config from its saved dict (``config.json``, a checkpoint's); old field names are read too."""
        d = upgrade(d)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown config fields: {sorted(unknown)}")
        return cls(**d)


# Renamed fields, old name -> new: configs, checkpoints and command lines written before the rename still work.
# `momentum` was the SGD / LARS momentum; it read like the EMA's, which is `ema_base` / `ema_tau`.
RENAMED = {"momentum": "sgd_momentum"}


def upgrade(d: Mapping[str, Any]) -> dict[str, Any]:
    """A saved config dict with the old names of ``RENAMED`` fields replaced by the current ones."""
    out = dict(d)
    for old, new in RENAMED.items():
        if old in out and new not in out:
            out[new] = out.pop(old)
    return out


# Fields a resumed run must share with its checkpoint: they change parameter shapes (arch, dims, k, method and the
# loss weights that decide which heads exist), the optimizer state layout, or what the saved data position and
# schedule mean (batch, seed, epochs). Everything else (workers, logging, device, max_steps...) may change.
RESUME_MUST_MATCH = (
    "arch",
    "method",
    "views",
    "k",
    "image_size",
    "instance_size",
    "instance_mode",
    "instance_source",
    "proj_hidden",
    "proj_dim",
    "pred_hidden",
    "w_scene",
    "w_scene_instance",
    "w_instance",
    "optimizer",
    "batch_size",
    "epochs",
    "seed",
    "wd_exclude_bn_bias",
)

PRESETS: dict[str, dict[str, Any]] = {
    # The paper's COCO recipe, optimiser from ORL (same group): SGD 0.4 @ 512, wd 1e-4, 4 warm-up epochs, 800 epochs.
    "coco": {},
    # BYOL's ImageNet recipe: LARS, lr 0.2 per 256 images (3.2 at 4096), wd 1.5e-6 without BN/bias, 10 warm-up epochs.
    "imagenet": dict(
        batch_size=4096,
        optimizer="lars",
        lr=0.2,
        lr_batch=256,
        weight_decay=1.5e-6,
        wd_exclude_bn_bias=True,
        warmup_epochs=10.0,
        epochs=200,
    ),
    # Small enough for a laptop CPU: demo and tests.
    "tiny": dict(
        arch="resnet18",
        proj_hidden=512,
        proj_dim=128,
        pred_hidden=512,
        image_size=64,
        instance_size=32,
        batch_size=8,
        lr=0.05,
        lr_batch=8,
        warmup_epochs=1.0,
        epochs=100,
        workers=1,
        shuffle_buffer=64,
        sinkhorn_iters=20,
        ckpt_every=50,
        log_every=1,
        amp=False,
        channels_last=False,
        device="cpu",
    ),
}


def preset(name: str) -> TrainConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: expected one of {', '.join(PRESETS)}")
    return TrainConfig(**{**PRESETS[name], "preset": name})


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


class _OldFlag(argparse.Action):
    """A renamed field's old flag, kept for one release: sets the new field and prints a deprecation warning."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(
            f"{parser.prog}: warning: {option_string} is deprecated and will be removed: use {_flag(self.dest)}",
            file=sys.stderr,
        )
        setattr(namespace, self.dest, values)


def build_parser() -> argparse.ArgumentParser:
    epilog = ["presets (applied before explicit flags):"]
    for name, overrides in PRESETS.items():
        text = ", ".join(f"{k}={v}" for k, v in overrides.items()) or "the defaults shown above"
        epilog.append(f"  {name}: {text}")
    p = argparse.ArgumentParser(
        prog="python -m train",
        description="UniVIP self-supervised pre-training from proposal shards. Single process: "
        "python -m train ...; several: torchrun --nproc-per-node N -m train ... "
        "Defaults are the coco preset.",
        epilog="\n".join(epilog),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        kind = hints[f.name]
        # an empty default would print as "(default: )": --data has no usable default, the others say what empty means
        suffix = " (required)" if f.name == "data" else "" if f.default == "" else f" (default: {f.default})"
        help_text = f.metadata["help"] + suffix
        kwargs: dict[str, Any] = dict(default=argparse.SUPPRESS, help=help_text, dest=f.name)
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = kind
            if f.metadata.get("choices"):
                kwargs["choices"] = f.metadata["choices"]
        p.add_argument(_flag(f.name), **kwargs)
    types = {f.name: hints[f.name] for f in dataclasses.fields(TrainConfig)}
    for old, new in RENAMED.items():
        help_text = f"deprecated: the old name of {_flag(new)}"
        p.add_argument(
            _flag(old), type=types[new], dest=new, default=argparse.SUPPRESS, action=_OldFlag, help=help_text
        )
    return p


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """argv -> validated config: the preset's values, then every flag given explicitly."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))
    cfg = preset(args.pop("preset", "coco"))
    try:
        return dataclasses.replace(cfg, **args).validate()
    except ValueError as e:
        parser.error(str(e))
