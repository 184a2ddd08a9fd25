"""Export the online encoder of a checkpoint for fine-tuning.

    python -m train.export OUT/ckpt-00001000.pt --format torchvision -o resnet50_univip.pth
    python -m train.export OUT/ckpt-00001000.pt --format detectron2 -o resnet50_univip.pkl

torchvision: a plain ``state_dict`` that ``torchvision.models.resnet50().load_state_dict(sd, strict=False)`` accepts
with only ``fc.weight``/``fc.bias`` missing (the classifier is not pre-trained).
detectron2: a pickle ``{"model": {name: numpy array}, "__author__": ..., "matching_heuristics": True}`` with
detectron2's ResNet names (stem.conv1, res2..res5, convN.norm, shortcut). The config lines that make detectron2
build the network these weights belong to are printed by the export (``detectron2_config``): besides the weights and
torchvision's RGB mean/std (on detectron2's 0-255 scale), ``MODEL.RESNETS.STRIDE_IN_1X1: False``. torchvision's
bottleneck strides in its 3x3 conv, detectron2's default (MSRA weights) in the 1x1: the shapes are the same, so the
weights would load without a warning into a network whose features differ from the pre-trained ones.
"""

from __future__ import annotations

import argparse
import pickle
import re
import sys

import torch

from .checkpoint import load

_PROBE = "layer1.0.conv1.weight"


def encoder_state(model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The online encoder's tensors with torchvision ResNet names, from a checkpoint's ``model`` state.

    The encoder is found as the prefix of ``layer1.0.conv1.weight``; with several (online and target), the one whose
    prefix names neither the target nor the EMA copy is taken."""
    prefixes = sorted({k[: -len(_PROBE)] for k in model_state if k.endswith(_PROBE)})
    online = [p for p in prefixes if not re.search(r"target|momentum|ema|teacher", p)]
    if len(online) != 1:
        raise ValueError(f"cannot tell the online ResNet encoder among prefixes {prefixes}")
    prefix = online[0]
    out = {k[len(prefix) :]: v for k, v in model_state.items() if k.startswith(prefix)}
    return {k: v for k, v in out.items() if not k.startswith("fc.")}


def to_torchvision(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def detectron2_name(name: str) -> str | None:
    """torchvision ResNet name -> detectron2 name (None: not used by detectron2, e.g. num_batches_tracked)."""
    if name.endswith("num_batches_tracked"):
        return None
    m = re.match(r"^layer(\d)\.(.*)$", name)
    if m is None:  # the stem: conv1, bn1
        name = "stem." + name
    else:
        name = f"res{int(m.group(1)) + 1}.{m.group(2)}"
    name = re.sub(r"\bbn(\d)\b", r"conv\1.norm", name)
    name = name.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")
    return name


def to_detectron2(state: dict[str, torch.Tensor]) -> dict:
    model = {}
    for k, v in state.items():
        new = detectron2_name(k)
        if new is not None:
            model[new] = v.detach().float().cpu().numpy()
    return {"model": model, "__author__": "univip", "matching_heuristics": True}


def detectron2_config(arch: str, weights: str) -> str:
    """The detectron2 YAML lines for an exported torchvision ResNet ``arch`` stored at ``weights``."""
    depth = int(arch.removeprefix("resnet"))
    lines = [
        "MODEL:",
        f"  WEIGHTS: {weights}",
        "  PIXEL_MEAN: [123.675, 116.280, 103.530]",
        "  PIXEL_STD: [58.395, 57.120, 57.375]",
        "  RESNETS:",
        f"    DEPTH: {depth}",
        "    STRIDE_IN_1X1: False  # torchvision strides in the 3x3 conv",
    ]
    if depth < 50:  # BasicBlock ResNets: detectron2 needs the narrower res2
        lines.append("    RES2_OUT_CHANNELS: 64")
    return "\n".join(lines + ["INPUT:", "  FORMAT: RGB"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m train.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("checkpoint", help="a ckpt-XXXXXXXX.pt written by python -m train")
    p.add_argument("--format", required=True, choices=("torchvision", "detectron2"))
    p.add_argument("-o", "--output", required=True, help="file to write")
    args = p.parse_args(argv)
    ckpt = load(args.checkpoint)
    state = encoder_state(ckpt["model"])
    if args.format == "torchvision":
        torch.save(to_torchvision(state), args.output)
    else:
        with open(args.output, "wb") as f:
            pickle.dump(to_detectron2(state), f)
    arch = ckpt["config"]["arch"]
    print(f"{args.output}: {arch} encoder, {len(state)} tensors, step {ckpt['step']}", file=sys.stderr)
    if args.format == "detectron2":
        print("detectron2 config for these weights:\n" + detectron2_config(arch, args.output), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
