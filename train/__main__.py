"""The UniVIP training loop: ``python -m train --preset tiny --data DIR --out OUT`` or
``torchrun --nproc-per-node N -m train ...``.

Steps are counted from 1: log row ``step`` = n and ``ckpt-{n:08d}.pt`` both mean "after n optimizer steps".
The lr and EMA schedules span ``epochs * steps_per_epoch`` steps; ``--max-steps`` stops earlier without changing them.

``OUT/log.jsonl``, one row per ``--log-every`` steps (rank 0): ``loss`` and ``loss_{scene,scene_instance,instance}``
(unweighted terms; ``loss`` is the weighted sum), averaged over ranks and the steps since the previous row; ``lr``;
``z_std`` (collapse signal: per-dimension std of the l2-normalised online scene projections, about 1/sqrt(D) when
healthy, 0 when collapsed; a warning is printed once below ``--collapse-warn``/sqrt(D)); ``knn_top1`` (rows of
evaluation steps, with ``--eval-data``: kNN top-1 of the online encoder's features, ``train.eval``); ``ema_tau``
(the EMA decay of the target; logs before it was renamed call it ``momentum``); ``images_per_s`` (all ranks); ``data_wait`` (fraction of wall time spent waiting for batches);
``fallback_rate`` (Algorithm 1 fell back to random boxes), ``shards_skipped`` and ``samples_skipped``, summed over
ranks since this process started, and ``samples_skipped_by_reason`` (the reasons of ``train.bad_shards.SKIP_REASONS``
with a count: ``{"bad_boxes": 2, "missing_member": 1}``).

Resume: a resumed run repeats the uninterrupted one exactly on CPU (data order, augmentation and RNG states are
restored). On GPU it matches only to floating-point noise: cuDNN autotuning and atomic adds in backward kernels
(roi_align among them) are not deterministic.

Data errors under DDP: with ``--on-bad-shard skip`` (default) every rank still yields exactly ``steps_per_epoch``
batches (``train.data``), so ranks never diverge. With ``fail``, or any other exception while fetching a batch, the
rank does not raise at once: every step all ranks exchange a "my batch failed" flag over a CPU (gloo) group, and then
all of them stop together, the failing rank with its own error and the others naming it. No rank is left waiting in
DDP's gradient all-reduce until the process-group timeout, with or without torchrun.
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
from tqdm import tqdm

from shards import storage
from train import checkpoint, data, dist, schedule, setup
from train.config import TrainConfig, parse_args
from train.model import LOGGED, TERMS
from train.setup import TrainError


def open_run(cfg: TrainConfig, world: int) -> tuple[dict | None, str | None]:
    """Check --out against --resume; return the checkpoint to resume from (loaded, config checked) and its path."""
    path = checkpoint.find_latest(cfg.out)
    if path and not cfg.resume:
        raise TrainError(
            f"{cfg.out} already holds checkpoints ({os.path.basename(path)}): pass --resume to continue "
            "that run or choose another --out"
        )
    if path is None:
        if cfg.resume:
            dist.print0(f"--resume: no checkpoint in {cfg.out}, starting from step 0")
        return None, None
    ckpt = checkpoint.load(path)
    checkpoint.check_config(ckpt, cfg, world, path)
    return ckpt, path


def drop_rows_after(path: str, step: int) -> None:
    """Remove the rows of ``path`` (a log.jsonl) logged after ``step``: a run that stopped between its last checkpoint
    and a later log row repeats those steps when resumed, and the log must not hold them twice."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    keep = [line for line in lines if not line.strip() or json.loads(line).get("step", 0) <= step]
    if len(keep) < len(lines):
        with storage.atomic_file(path) as f:
            f.write("".join(keep).encode())


class Logger:
    """Rank 0: a tqdm bar and ``OUT/log.jsonl``. Every rank: the window sums behind the logged rates."""

    def __init__(self, cfg: TrainConfig, start: int, end: int):
        self.main = dist.is_main()
        self.bar = tqdm(
            total=end,
            initial=start,
            disable=not self.main,
            dynamic_ncols=True,
            desc="train",
            mininterval=0.1 if sys.stderr.isatty() else 60.0,
        )  # batch logs: a line a minute
        path = os.path.join(cfg.out, "log.jsonl")
        if self.main:
            drop_rows_after(path, start)
        self.file = open(path, "a") if self.main else None  # noqa: SIM115 - open for the run, closed in close()
        self.proj_dim, self.collapse_warn, self.warned = cfg.proj_dim, cfg.collapse_warn, False
        self.reset()

    def reset(self) -> None:
        self.t0, self.wait, self.steps = time.perf_counter(), 0.0, 0
        self.terms: torch.Tensor | None = None

    def step(self, losses: dict[str, torch.Tensor], wait: float) -> None:
        vals = torch.stack([losses[t].detach().float() for t in LOGGED])
        self.terms = vals if self.terms is None else self.terms + vals  # stays on the device: no sync per step
        self.wait += wait
        self.steps += 1
        self.bar.update(1)

    def write(
        self,
        step: int,
        lr: float,
        tau: float,
        images: int,
        counters: data.DataCounters,
        extra: dict | None = None,
        paused: float = 0.0,
    ) -> dict:
        """A collective (every rank calls it at the same steps): losses averaged over ranks and the window.
        ``extra``: more fields for the row (the evaluation's); ``paused``: seconds of the window that were not
        training (the evaluation), left out of the rates."""
        assert self.terms is not None, "Logger.write before any step"
        terms = dist.all_reduce_mean(self.terms / self.steps).tolist()
        elapsed = time.perf_counter() - self.t0 - paused
        c, by_reason = counters.as_dict(), counters.skipped_by_reason()
        wait, samples, fallbacks, shards_skipped, samples_skipped, *reasons = dist.host_sum(
            [self.wait, c["samples"], c["fallbacks"], c["shards_skipped"], c["samples_skipped"], *by_reason.values()]
        )
        row = {
            "step": step,
            "loss": terms[0],
            **{f"loss_{t}": v for t, v in zip(TERMS, terms[1:-1], strict=True)},
            "z_std": terms[-1],
            "lr": lr,
            "ema_tau": tau,
            "images_per_s": images * self.steps / elapsed,
            "data_wait": wait / dist.world_size() / elapsed,
            "fallback_rate": fallbacks / max(samples, 1),
            "shards_skipped": int(shards_skipped),
            "samples_skipped": int(samples_skipped),
            "samples_skipped_by_reason": {r: int(n) for r, n in zip(by_reason, reasons, strict=True) if n},
            **(extra or {}),
        }
        self.check_collapse(row)
        if self.main:
            assert self.file is not None  # opened on the main rank
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
            self.bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{lr:.3g}", wait=f"{row['data_wait']:.0%}")
        self.reset()
        return row

    def note(self, text: str) -> None:
        """A line above the progress bar (rank 0)."""
        if self.main:
            tqdm.write(text, file=sys.stderr)

    def check_collapse(self, row: dict) -> None:
        """Warn once per run when the online projections collapse (BYOL's loss falls for a collapsed network too)."""
        level = row["z_std"] * self.proj_dim**0.5  # 1: spread over the sphere; 0: every input maps to one vector
        if level < self.collapse_warn and not self.warned and self.main:
            self.warned = True
            tqdm.write(
                f"warning: step {row['step']}: the online projections are collapsing: z_std {row['z_std']:.4g} "
                f"= {level:.3f} / sqrt({self.proj_dim}) (healthy: about 1 / sqrt(D)); lower the lr or check "
                "the EMA and predictor settings",
                file=sys.stderr,
            )

    def close(self) -> None:
        self.bar.close()
        if self.file:
            self.file.close()


class KnnProbe:
    """``--eval-data``: the kNN evaluation of ``train.eval`` on a labelled set loaded once, run on rank 0 while the
    other ranks wait (the features of a small set take seconds; every rank sees the result)."""

    def __init__(self, cfg: TrainConfig, device: torch.device):
        from train import eval as evaluation  # torch-side module, imported only when asked for

        self.evaluation, self.device = evaluation, device
        self.train = self.val = None
        error = None
        if dist.is_main():
            size = cfg.eval_size or cfg.image_size
            try:

                def load(spec: str):
                    return evaluation.load_labelled(evaluation.resolve(spec, cfg.allow_manifest_outside), size=size)

                labelled = load(cfg.eval_data)
                if cfg.eval_val_data:
                    self.train, self.val = labelled, load(cfg.eval_val_data)
                else:
                    self.train, self.val = evaluation.split(labelled, cfg.eval_val_fraction)
                dist.print0(
                    f"kNN evaluation: {len(self.train.labels)} labelled images as memory, "
                    f"{len(self.val.labels)} held out, {size} px"
                )
            except (ValueError, OSError) as e:
                error = TrainError(f"--eval-data: {e}")
        if dist.failed_ranks(error is not None):  # every rank stops, not only the one that read the data
            raise error or TrainError("stopping: rank 0 could not load --eval-data (see its error)")

    def knn(self, encoder: torch.nn.Module) -> float:
        """A collective: kNN top-1 of ``encoder``'s features (train mode restored afterwards)."""
        acc = 0.0
        if dist.is_main():
            ev = self.evaluation
            assert self.train is not None and self.val is not None  # loaded on the main rank
            f_train = ev.extract(encoder, self.train.images, device=self.device)
            f_val = ev.extract(encoder, self.val.images, device=self.device)
            acc = ev.knn_top1(f_train, self.train.labels, f_val, self.val.labels)
        return float(dist.host_sum([acc])[0])  # rank 0's value on every rank


class Batches:
    """The loader's batches, epoch after epoch (each ``iter()`` of the loader is the next epoch; workers persist).

    Errors while fetching are not raised at once: every step all ranks exchange a "my batch failed" flag, then all of
    them stop together (see the module docstring)."""

    def __init__(self, loader):
        self.loader, self.it = loader, iter(loader)

    def next(self) -> tuple[dict, float]:
        """(batch, seconds spent waiting for it)."""
        t0 = time.perf_counter()
        batch, error = None, None
        try:
            try:
                batch = next(self.it)
            except StopIteration:
                self.it = iter(self.loader)
                batch = next(self.it)
        except Exception as e:  # noqa: BLE001 - handed to every rank first, raised after the flag exchange
            error = e
        failed = dist.failed_ranks(error is not None)  # every rank, every step: nobody hangs in DDP
        if failed:
            if error is not None:
                try:
                    raise error
                finally:  # no cycle frame -> error -> traceback -> frame keeping the model alive (dist.teardown)
                    error = None
            raise TrainError(f"stopping because rank(s) {failed} failed to read data (see their error)")
        assert batch is not None  # no error on any rank
        return batch, time.perf_counter() - t0


def resume_position(cfg: TrainConfig, ckpt: dict | None) -> tuple[data.DataPosition, int]:
    """(where the data stream stands, streams per rank): the checkpoint's, or the start of a new run."""
    streams = ckpt["data"].get("streams", 0) if ckpt and not cfg.streams else cfg.streams
    position = data.DataPosition.from_dict(ckpt["data"]) if ckpt else data.DataPosition()
    return position, streams or max(1, cfg.workers)


def restore(ckpt: dict | None, path: str | None, model, opt) -> int:
    """Load the checkpoint's model, optimizer and this rank's RNG states; the step to start from (0 without one)."""
    if not ckpt:
        return 0
    assert path is not None  # open_run returns a path with every checkpoint
    checkpoint.restore(ckpt, model=model, optimizer=opt, path=path)
    rng = ckpt.get("rng") or []
    if len(rng) == dist.world_size():
        checkpoint.set_rng_state(rng[dist.rank()])
    dist.print0(f"resumed from {path} at step {ckpt['step']} (epoch {ckpt['data']['epoch']})")
    return ckpt["step"]


def train(cfg: TrainConfig, device: torch.device) -> dict:
    """Run (or continue) training in this process; returns {"model", "steps" (taken here), "counters"}."""
    rank, world = dist.rank(), dist.world_size()
    batch_size = cfg.per_rank_batch(world)
    if not cfg.data:
        raise TrainError("--data is required: a shard directory, brace pattern, glob or manifest.json")
    os.makedirs(cfg.out, exist_ok=True)
    dist.barrier()  # every rank sees the directory (and no rank has written checkpoints yet) before the check
    ckpt, ckpt_path = open_run(cfg, world)
    if dist.is_main():
        with storage.atomic_file(os.path.join(cfg.out, "config.json")) as f:
            f.write(cfg.to_json().encode())

    position, streams = resume_position(cfg, ckpt)
    loader, steps_per_epoch = setup.build_loader(
        cfg, device, rank=rank, world=world, position=position, streams=streams
    )
    total = cfg.epochs * steps_per_epoch  # the schedules span the whole run; --max-steps only stops earlier
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    end = min(total, cfg.max_steps) if cfg.max_steps else total
    model = setup.build_model(cfg, device)
    opt = setup.build_optimizer(model, cfg)
    start = restore(ckpt, ckpt_path, model, opt)
    del ckpt
    step = setup.make_step(cfg, device, model, opt)
    probe = KnnProbe(cfg, device) if cfg.eval_data else None
    dist.print0(
        f"{cfg.arch} {cfg.method}: {world} rank(s) x batch {batch_size}, {steps_per_epoch} steps/epoch, "
        f"steps {start}..{end} of {total}, peak lr {cfg.peak_lr:.4g}, device {device}"
    )

    if cfg.compile:
        dist.print0(
            "--compile: the first step compiles the model (minutes on a small CPU, about a minute or two on a GPU; "
            "seconds once torch's compile cache holds the graphs)"
        )
    log, counters, batches = Logger(cfg, start, end), data.DataCounters(), Batches(loader)
    try:
        for it in range(start, end):
            n = it + 1  # steps taken after this one: what the log row and the checkpoint name
            lr = schedule.lr(it, peak=cfg.peak_lr, total=total, warmup=warmup)
            tau = schedule.ema_tau(it, base=cfg.ema_base, total=total)
            batch, wait = batches.next()
            counters.add(batch)
            t_step = time.perf_counter()
            losses = step(batch, it, lr=lr, tau=tau)
            if cfg.compile and it == start:  # one wait for the device, on the first step only
                float(losses["total"])
                log.note(f"first step, compilation included: {time.perf_counter() - t_step:.1f} s")
            log.step(losses, wait)
            evaluated = probe is not None and (n == end or (cfg.eval_every and n % cfg.eval_every == 0))
            if n % cfg.log_every == 0 or n == end or evaluated:
                t_eval = time.perf_counter()
                extra = {"knn_top1": probe.knn(model.online.encoder)} if evaluated and probe is not None else None
                log.write(n, lr, tau, batch_size * world, counters, extra, paused=time.perf_counter() - t_eval)
            if (cfg.ckpt_every and n % cfg.ckpt_every == 0) or n == end:
                save(cfg, n, model, opt, steps_per_epoch, batch_size, streams)
    finally:
        log.close()
    return {"model": model, "steps": max(0, end - start), "counters": counters}


def save(cfg: TrainConfig, step: int, model, opt, steps_per_epoch: int, batch_size: int, streams: int) -> None:
    """A collective (RNG states of every rank); rank 0 writes."""
    rng = dist.gather_objects(checkpoint.rng_state())
    if dist.is_main():
        pos = data.DataPosition.from_step(step, steps_per_epoch, batch_size).to_dict()
        checkpoint.save(
            cfg.out,
            step,
            model=model,
            optimizer=opt,
            config=cfg,
            data_position={**pos, "streams": streams},
            rng=rng,
            world_size=dist.world_size(),
            keep=cfg.keep_ckpts,
        )


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    try:
        device = dist.setup(cfg.device)
        train(cfg, device)
    except (TrainError, checkpoint.CheckpointError, data.BadShardError) as e:
        prefix = f"rank {dist.rank()}: " if dist.world_size() > 1 else ""
        print(f"python -m train: error: {prefix}{e}", file=sys.stderr, flush=True)
        return 1
    finally:
        dist.teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
