"""What a representation encodes: the learning benchmark's frozen-feature probes, for several encoders at once.

Every encoder (a ``python -m train`` checkpoint, a torchvision-format export such as ``bench/reference_byol.py``'s,
or a random-init one) goes through the same ``train.eval`` code as ``python -m train.eval``: centre views, features
in eval mode, kNN (k 20, T 0.07) and the linear probe. Probes (``bench/learn.py`` makes their data):
- ``class``: object crops of held-out scenes labelled by class (the benchmark's measure);
- ``fill``: the same kind of crops labelled by the source their fill was cut from (which photo or texture);
- ``background``: whole held-out scenes labelled by the source their background was cut from;
- ``retrieval``: two training views (``train.views``, the run's view settings) of each of N held-out scenes; top-1
  of finding a view-1's partner among the N view-2s by cosine similarity of the features (chance 1/N).
Each probe runs twice: with the BatchNorm statistics the encoder has (the standard numbers), and with them
re-estimated on the probe's own training images (``train.eval.recompute_bn``; for retrieval, on the views
themselves: the probe has no training split), reported beside the standard numbers, never instead of them.

    python bench/probes.py --work learn_data --size 32 --encoder random=random:resnet18:0 \\
        --encoder byol=runs/byol-s0/ckpt-00001000.pt --encoder ref=runs/ref-s0/backbone.pth --json probes.json
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import scenes  # noqa: E402  (bench/scenes.py)

from train import eval as evaluation  # noqa: E402
from train.views import UniVIPTransform, ViewConfig  # noqa: E402

# labelled probes: name -> (train, val) directories of prep imagenet outputs under the benchmark's work directory
LABELLED = {
    "class": ("probe_train", "probe_val"),
    "fill": ("fill_train", "fill_val"),
    "background": ("bg_train", "bg_val"),
}
BN_MODES = ("stored", "probe")  # the encoder's own BatchNorm statistics / re-estimated on the probe's images
RETRIEVAL_SEED = 3  # the held-out scenes of the retrieval probe: a set seed no other product uses


def parse_encoder(text: str) -> tuple[str, dict]:
    """``NAME=PATH`` (a checkpoint ``*.pt`` or a torchvision export ``*.pth``) or ``NAME=random:ARCH:SEED`` ->
    (name, ``train.eval.load_encoder`` keyword arguments)."""
    name, sep, source = text.partition("=")
    if not sep or not name or not source:
        raise argparse.ArgumentTypeError(f"--encoder {text!r}: expected NAME=PATH or NAME=random:ARCH:SEED")
    if source.startswith("random:"):
        _, arch, seed = source.split(":")
        return name, {"random_init": True, "arch": arch, "seed": int(seed)}
    if source.endswith(".pth"):
        return name, {"export": source}
    return name, {"checkpoint": source}


def retrieval_views(
    n: int, *, kind: str, scene_size: int, view: ViewConfig, seed: int = RETRIEVAL_SEED
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two views (uint8 ``[n, 3, S, S]`` each) of each of ``n`` held-out scenes of set ``kind``: the scene as a JPEG,
    as training reads it, through the training transform with BYOL's independent crops and per-scene randomness."""
    transform = UniVIPTransform(ViewConfig(**{**view.__dict__, "views": "byol", "instance_crops": False}))
    v1, v2 = [], []
    for i in range(n):
        img, _, _ = scenes.scene(seed, i, scene_size, kind)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=scenes.JPEG_QUALITY)
        meta = {"width": scene_size, "height": scene_size, "boxes": np.zeros((0, 4), np.int64), "key": f"r{i}"}
        out = transform({"jpg": buf.getvalue(), "meta": meta}, rng=np.random.default_rng((seed, i)))
        v1.append(out["view1"].contiguous())
        v2.append(out["view2"].contiguous())
    return torch.stack(v1), torch.stack(v2)


def retrieval_top1(f1: torch.Tensor, f2: torch.Tensor) -> float:
    """Fraction of rows i of ``f1`` [N, C] whose most cosine-similar row of ``f2`` [N, C] is row i."""
    sim = F.normalize(f1.float(), dim=1) @ F.normalize(f2.float(), dim=1).T
    return float((sim.argmax(dim=1) == torch.arange(len(f1))).float().mean())


def probe_encoder(
    encoder: torch.nn.Module,
    sets: dict[str, tuple[evaluation.Labelled, evaluation.Labelled]],
    views: tuple[torch.Tensor, torch.Tensor] | None,
    device: torch.device,
) -> dict[str, dict]:
    """Every probe in both BatchNorm modes: ``{bn_mode: {probe: {knn_top1, linear_top1} or {top1}}}``."""
    out: dict[str, dict] = {}
    for mode in BN_MODES:
        res: dict[str, dict] = {}
        for name, (train, val) in sets.items():
            net = evaluation.recompute_bn(encoder, train.images, device=device) if mode == "probe" else encoder
            r = evaluation.evaluate(net, train, val, device=device)
            res[name] = {"knn_top1": r["knn_top1"], "linear_top1": r["linear_top1"]}
        if views is not None:
            both = torch.cat(views)
            net = evaluation.recompute_bn(encoder, both, device=device) if mode == "probe" else encoder
            f = evaluation.extract(net, both, device=device)
            res["retrieval"] = {"top1": retrieval_top1(f[: len(views[0])], f[len(views[0]) :]), "n": len(views[0])}
        out[mode] = res
    return out


def run(
    work: str,
    encoders: list[tuple[str, dict]],
    *,
    size: int,
    kind: str,
    scene_size: int,
    view: ViewConfig | None,
    retrieval_n: int = 500,
    device: str = "cpu",
    log=print,
) -> dict[str, dict]:
    """Load every probe's data once, then probe each encoder: ``{encoder name: probe_encoder(...)}``."""
    dev = torch.device(device)
    t0 = time.perf_counter()
    sets = {}
    for name, (train_dir, val_dir) in LABELLED.items():
        train_spec, val_spec = os.path.join(work, train_dir), os.path.join(work, val_dir)
        if os.path.exists(os.path.join(val_spec, "manifest.json")):
            sets[name] = (
                evaluation.load_labelled(train_spec, size=size),
                evaluation.load_labelled(val_spec, size=size),
            )
    views = retrieval_views(retrieval_n, kind=kind, scene_size=scene_size, view=view) if view else None
    log(f"probes: data loaded in {time.perf_counter() - t0:.0f} s ({', '.join(sets)}{', retrieval' if views else ''})")
    results = {}
    for name, source in encoders:
        t = time.perf_counter()
        encoder, _ = evaluation.load_encoder(**source)
        results[name] = probe_encoder(encoder.to(dev), sets, views, dev)
        log(f"probes: {name} in {time.perf_counter() - t:.0f} s: {json.dumps(results[name]['stored'])}")
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    p.add_argument("--work", required=True, help="bench/learn.py's data directory")
    p.add_argument("--encoder", action="append", type=parse_encoder, required=True, help="NAME=SOURCE (repeat)")
    p.add_argument("--size", type=int, required=True, help="probe image side")
    p.add_argument("--set", dest="kind", choices=scenes.SETS, default="category")
    p.add_argument("--scene-size", type=int, default=96, help="retrieval: held-out scene side")
    p.add_argument("--view-size", type=int, default=0, help="retrieval: view side (0: no retrieval probe)")
    p.add_argument("--no-blur", action="store_true", help="retrieval views without BYOL's blur")
    p.add_argument("--retrieval-n", type=int, default=500)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--json", required=True)
    a = p.parse_args(argv)
    view = None
    if a.view_size:
        view = ViewConfig(size=a.view_size, blur_p=(0.0, 0.0) if a.no_blur else (1.0, 0.1))
    kw = dict(size=a.size, kind=a.kind, scene_size=a.scene_size, view=view, retrieval_n=a.retrieval_n, device=a.device)
    res = run(a.work, a.encoder, **kw)
    with open(a.json, "w") as f:
        json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
