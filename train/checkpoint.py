"""Checkpoints: everything a run needs to continue exactly (model with online and target, optimizer, step, data
position, RNG states, config), saved atomically as ``OUT/ckpt-{step:08d}.pt`` and loaded strictly.

Only plain containers, numbers, strings and tensors are stored, so ``torch.load(weights_only=True)`` reads them
(no pickled classes: a checkpoint cannot run code on load)."""

from __future__ import annotations

import os
import platform
import random
import re
from typing import Any

import numpy as np
import torch
from torch import nn

from shards import storage

from .config import RESUME_MUST_MATCH, TrainConfig, upgrade

CKPT_VERSION = 1
_NAME_RE = re.compile(r"^ckpt-(\d{8})\.pt$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used for this run; the message names the file and the reason."""


def path_for(out: str, step: int) -> str:
    return os.path.join(out, f"ckpt-{step:08d}.pt")


def list_checkpoints(out: str) -> list[str]:
    """Checkpoint paths in ``out``, oldest step first (temporary files of an interrupted save are ignored)."""
    if not os.path.isdir(out):
        return []
    names = sorted(n for n in os.listdir(out) if _NAME_RE.match(n))
    return [os.path.join(out, n) for n in names]


def find_latest(out: str) -> str | None:
    paths = list_checkpoints(out)
    return paths[-1] if paths else None


def versions() -> dict[str, str]:
    import torchvision

    # str(): torch's version object is a class weights_only loading refuses
    return {
        "checkpoint": str(CKPT_VERSION),
        "torch": str(torch.__version__),
        "torchvision": str(torchvision.__version__),
        "numpy": str(np.__version__),
        "python": platform.python_version(),
    }


# --- RNG states as weights_only-safe values ---------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """This process's torch / CUDA / numpy / random generator states."""
    legacy = np.random.get_state()  # the global RandomState is MT19937: always the legacy tuple, never the dict
    assert isinstance(legacy, tuple)
    name, keys, pos, has_gauss, gauss = legacy
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# --- save / load -------------------------------------------------------------------------------------------------
def save(
    out: str,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    config: TrainConfig,
    data_position: dict[str, Any],
    rng: list[dict[str, Any]],
    world_size: int,
    keep: int = 0,
) -> str:
    """Write ``OUT/ckpt-{step:08d}.pt`` atomically (temporary file in the same directory, then rename) and keep the
    newest ``keep`` checkpoints (0 = all). Call on one rank; ``rng`` holds every rank's ``rng_state()``.

    ``step`` is the number of optimizer steps taken: a run resumed from it starts at step ``step``."""
    os.makedirs(out, exist_ok=True)
    payload = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": int(step),
        "data": dict(data_position),
        "rng": list(rng),
        "world_size": int(world_size),
        "config": config.to_dict(),
        "versions": versions(),
    }
    path = path_for(out, step)
    with storage.atomic_file(path) as f:  # readable as the umask says, like config.json and log.jsonl
        torch.save(payload, f)
    if keep > 0:
        for old in list_checkpoints(out)[:-keep]:
            os.unlink(old)
    return path


def load(path: str) -> dict[str, Any]:
    """Read a checkpoint onto the CPU with ``weights_only=True``."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such checkpoint")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, foreign pickle, ...
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from e
    missing = {"model", "optimizer", "step", "data", "config"} - set(ckpt)
    if missing:
        raise CheckpointError(f"{path}: not a train checkpoint (missing {sorted(missing)})")
    return ckpt


def check_config(ckpt: dict[str, Any], config: TrainConfig, world_size: int, path: str = "checkpoint") -> None:
    """Raise ``CheckpointError`` naming every field in ``RESUME_MUST_MATCH`` that differs from the checkpoint's."""
    saved = upgrade(ckpt["config"])  # a checkpoint written before a field was renamed
    now = config.to_dict()
    diffs = [f"{k}: checkpoint {saved.get(k)!r} vs now {now[k]!r}" for k in RESUME_MUST_MATCH if saved.get(k) != now[k]]
    if ckpt.get("world_size", world_size) != world_size:
        # the saved data position counts samples per rank
        diffs.append(f"world_size: checkpoint {ckpt['world_size']} vs now {world_size}")
    if diffs:
        raise CheckpointError(f"{path} was written by another config; differing fields: " + "; ".join(diffs))


def restore(
    ckpt: dict[str, Any], *, model: nn.Module, optimizer: torch.optim.Optimizer | None, path: str = "checkpoint"
) -> None:
    """Load model (strict) and optimizer state in place; the caller checked the config first."""
    try:
        model.load_state_dict(ckpt["model"], strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: model state does not fit this model: {e}") from e
    if optimizer is not None:
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{path}: optimizer state does not fit: {e}") from e
