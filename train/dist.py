"""Small, honest distributed helpers: they work the same with or without a process group (rank 0 of 1).

Only ``torchrun`` is supported: it sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT.
"""

from __future__ import annotations

import gc
import os
from datetime import timedelta

import torch
import torch.distributed as dist

# A gloo group for small host-side flags and counters: on GPU runs it keeps them off NCCL, so checking them forces no
# device synchronisation. None without a group or when the default group is already gloo.
_CPU_GROUP: dist.ProcessGroup | None = None


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", 0)) if is_dist() else 0


def is_main() -> bool:
    return rank() == 0


def print0(*args, **kwargs) -> None:
    """print on rank 0 only (instead of patching builtins.print)."""
    if is_main():
        print(*args, **kwargs, flush=True)


def setup(device: str = "auto", timeout_s: float = 1800) -> torch.device:
    """Join the torchrun process group when launched by torchrun (nccl on GPU, gloo on CPU); return this rank's device.

    ``device``: auto | cpu | cuda. A plain ``python -m train`` (no WORLD_SIZE in the environment) starts no group."""
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA device is visible")
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
    if launched and not is_dist():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            timeout=timedelta(seconds=timeout_s),
            device_id=dev if use_cuda else None,
        )
        if use_cuda:
            global _CPU_GROUP
            group = dist.new_group(backend="gloo", timeout=timedelta(seconds=timeout_s))
            assert isinstance(group, dist.ProcessGroup)  # every rank is a member: never GroupMember.NON_GROUP_MEMBER
            _CPU_GROUP = group
    return dev


def teardown() -> None:
    """Call in ``finally:`` so a failed rank leaves the group instead of leaving it half torn down.

    The groups are destroyed here, not at interpreter exit: ``destroy_process_group`` only unregisters a group, and
    the gloo group's C++ object (with its worker threads) lives on while anything refers to it. A DDP module does
    (its reducer), and after an exception the traceback's frames keep the model alive in a reference cycle; that
    cycle was collected only while the interpreter shut down, when a gloo worker thread that still has to free a
    tensor Python owns cannot take the GIL any more: it is made to exit mid-destructor and the process aborts with
    "terminate called without an active exception" (exit -6, now and then, under load). Collecting first drops those
    references while the interpreter is alive, so the last one goes inside ``destroy_process_group``, which joins the
    group's threads."""
    global _CPU_GROUP
    _CPU_GROUP = None
    gc.collect()
    if is_dist():
        dist.destroy_process_group()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place and returned (identity without a group)."""
    if is_dist():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    return all_reduce_sum(x).div_(world_size())


def host_sum(values: list[float]) -> list[float]:
    """Element-wise sum over ranks of a few host numbers (counters), through the CPU group: no device sync."""
    if not is_dist():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=_CPU_GROUP)
    return t.tolist()


def failed_ranks(failed: bool) -> list[int]:
    """The ranks that report ``failed`` (a collective over the CPU group: every rank must call it, every step)."""
    if not is_dist():
        return [0] if failed else []
    t = torch.zeros(world_size(), dtype=torch.int32)
    t[rank()] = int(failed)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=_CPU_GROUP)
    return t.nonzero().flatten().tolist()


def gather_objects(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank (a collective)."""
    if not is_dist():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj, group=_CPU_GROUP)
    return out


def barrier() -> None:
    if is_dist():
        dist.barrier()
