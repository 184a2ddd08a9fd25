"""The data stream of one rank: its planned shard ranges read, shuffled and transformed into samples, resumable.

``train.plan`` decides which samples each (rank, slot) reads per epoch, from the counts alone; ``train.bad_shards``
decides what a fault costs. This module reads the shards (metadata decoded, image hashes checked), shuffles, runs the
transform and keeps the position; ``make_loader`` wraps it in a DataLoader.

Slots and workers. A rank's batches come from ``streams`` slots (``S``, default: the number of DataLoader workers):
global batch ``i`` of a rank comes from slot ``i % S``. Worker ``w`` of ``W`` produces batches ``w, w + W, ...``
(``S`` must be a multiple of ``W``, so each slot lives in one worker), which is exactly the order in which the
DataLoader interleaves its workers. The sequence of batches therefore depends on (seed, epoch, world_size, rank, S,
batch_size) and NOT on the number of workers: ``workers=0`` and ``workers=2`` give the same batches when
``streams=2``.

A slot's samples. Its planned ranges in order, then (only if a fault left it short) whole borrowed shards (plan rule
3); a borrowing pass that yields no sample at all raises ``BadShardError`` instead of looping forever.

Shuffling. Each slot has its own buffer of ``shuffle_buffer`` raw samples (JPEG bytes and decoded metadata, about
100 KB each: memory is ``shuffle_buffer * S / W`` samples per worker); the first sample leaves once the buffer is
full. The planned and the borrowed samples pass separate buffers (the borrowed stream must not start, and mix in,
while planned samples remain), drawing on one generator per slot. The transform runs after the buffer with
``numpy.random.default_rng((seed, 3, epoch, rank, slot, index))`` (``transform_rng``), ``index`` counting the slot's
samples, so a sample's augmentation does not depend on what ran before it.

Epochs and resume. The dataset counts its own epochs: its n-th ``__iter__`` in a process is epoch
``position.epoch + n``, the first one skipping ``position.consumed`` samples of this rank. Skipped samples are read
and pass the shuffle buffer (to rebuild its state) but are not transformed, so nothing is decoded. This requires the
DataLoader to keep its workers (``persistent_workers=True``, which ``make_loader`` sets): fresh workers would each start
again at ``position.epoch``. The resumed stream equals the uninterrupted one unless a transform failed (and was skipped)
before the checkpoint.

Counts. Samples and shards skipped under the bad-shard policy, and samples borrowed (rule 3), travel with the samples
(``sample["stats"]``: the counts since this process's previous output; ``collate`` sums them per batch, accumulate
them with ``DataCounters``), because DataLoader workers are separate processes.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from shards import reader, schema, storage
from train.bad_shards import SKIP_REASONS, BadShardError, BadShardPolicy, skip_name
from train.plan import BUFFER, TRANSFORM, EpochPlanner, Range

Transform = Callable[[dict, np.random.Generator], dict]
# The counts that travel with the samples (``sample["stats"]``): totals, then samples skipped by reason
STAT_NAMES = ("samples_skipped", "shards_skipped", "samples_borrowed", *map(skip_name, SKIP_REASONS))


@dataclass(frozen=True)
class DataPosition:
    """Where the data stream of one rank stands: ``consumed`` samples of ``epoch`` were already trained on.

    ``consumed`` is a multiple of the per-rank batch size (whole steps)."""

    epoch: int = 0
    consumed: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.consumed}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DataPosition:
        return cls(epoch=int(d["epoch"]), consumed=int(d["consumed"]))

    @classmethod
    def from_step(cls, step: int, steps_per_epoch: int, batch_size: int) -> DataPosition:
        """The position after ``step`` optimizer steps from the very start (every epoch has ``steps_per_epoch``)."""
        return cls(epoch=step // steps_per_epoch, consumed=(step % steps_per_epoch) * batch_size)


@dataclass
class DataCounters:
    """Totals the loop logs, accumulated from batches (``add``); one instance per rank."""

    samples: int = 0
    fallbacks: int = 0  # Algorithm 1 fell back to random boxes (the transform's ``fallback`` output)
    stats: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STAT_NAMES, 0))  # STAT_NAMES' totals

    def add(self, batch: Mapping[str, Any]) -> None:
        got = batch.get("stats", {})
        for name in STAT_NAMES:
            self.stats[name] += int(got.get(name, 0))
        if "fallback" in batch:
            fb = batch["fallback"]
            self.fallbacks += int(fb.sum()) if isinstance(fb, torch.Tensor) else sum(map(int, fb))
        self.samples += len(batch["__key__"])

    @property
    def samples_skipped(self) -> int:
        return self.stats["samples_skipped"]

    @property
    def shards_skipped(self) -> int:
        return self.stats["shards_skipped"]

    @property
    def samples_borrowed(self) -> int:
        return self.stats["samples_borrowed"]

    def skipped_by_reason(self) -> dict[str, int]:
        """Samples skipped per reason of ``SKIP_REASONS`` (every reason, zeros included)."""
        return {reason: self.stats[skip_name(reason)] for reason in SKIP_REASONS}

    def as_dict(self) -> dict[str, float]:
        d: dict[str, float] = {"samples": self.samples, **self.stats, "fallbacks": self.fallbacks}
        d["fallback_rate"] = self.fallbacks / self.samples if self.samples else 0.0
        return d


# --- reading one shard -------------------------------------------------------------------------------------------
def shard_samples(
    url: str,
    policy: BadShardPolicy,
    open_kwargs: Mapping[str, Any] | None = None,
    verify_images: bool = False,
) -> Iterator[dict]:
    """The valid samples of one shard (``shards.reader``: with ``meta``); each invalid one goes to ``policy`` as a bad
    sample (skipped alone, counted by reason), a shard that cannot be read to its end as a bad shard (the samples
    before the fault are kept).

    ``open_kwargs`` go to ``storage.open_stream`` (retries, backoff, timeout, allow_pipe). ``verify_images``: a sample
    whose JPEG bytes do not have the SHA-256 its KEY.json records is a bad sample."""
    open_kwargs = open_kwargs or {}
    shown = storage.redact(url)
    good, looked = 0, False  # looked: whether the shard's head was read again for KEY.json members
    try:
        with storage.open_stream(url, **open_kwargs) as stream:
            for item in reader.shard_items(stream, url, verify_images=verify_images):
                if isinstance(item, reader.Rejected):
                    plain = not good and not looked and item.reason == "missing_member"
                    looked |= plain
                    if plain and _without_json(url, open_kwargs):
                        policy.bad_shard(
                            url,
                            f"shard without boxes: {shown} (no KEY.{schema.META_EXT} members: a plain image tar, "
                            "not a prep shard)",
                        )
                        return
                    policy.bad_sample(url, item.key, item.message, reason=item.reason)
                    continue
                if verify_images and item["meta"]["image_sha256"] is None:
                    policy.warn(url, f"{shown}: format version 1 records no image hashes; its images are not verified")
                good += 1
                yield item
    except BadShardError:
        raise
    except Exception as e:  # open / tar / network errors
        detail = str(e) if shown in str(e) else f"{shown}: {e}"  # the reader's errors name the URL already
        policy.bad_shard(url, f"cannot read shard: {type(e).__name__}: {detail}", e)


def _without_json(url: str, open_kwargs: Mapping[str, Any]) -> bool:
    """Whether the first members of a shard hold no metadata at all (read again only on this path)."""
    try:
        with storage.open_stream(url, **open_kwargs) as stream:
            names = [m.name or "" for m in itertools.islice(reader.tar_members(stream), 4)]
    except Exception:
        return False
    return bool(names) and not any(n.endswith("." + schema.META_EXT) for n in names)


def count_samples(
    urls: Sequence[str], on_bad_shard: str = "skip", open_kwargs: Mapping[str, Any] | None = None
) -> dict[str, int]:
    """Sample counts by reading every shard once (all bytes are streamed; images are not decoded).

    Only for shards without a manifest or stats files: every rank pays a full read of the data set at start-up."""
    policy = BadShardPolicy(on_bad_shard)
    return {url: sum(1 for _ in shard_samples(url, policy, open_kwargs)) for url in urls}


# --- the stream --------------------------------------------------------------------------------------------------
def _shuffled(items: Iterator, size: int, rng: np.random.Generator) -> Iterator:
    """Buffer shuffle: hold ``size`` items, emit a random one per new item, then the rest in random order."""
    if size <= 1:
        yield from items
        return
    buf: list = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = int(rng.integers(size))
        yield buf[j]
        buf[j] = item
    for j in rng.permutation(len(buf)):
        yield buf[j]


def transform_rng(seed: int, epoch: int, rank: int, slot: int, index: int) -> np.random.Generator:
    """The generator of the transform of sample ``index`` of a slot: a function of its place in the stream only."""
    return np.random.default_rng((seed, TRANSFORM, epoch, rank, slot, index))


class ShardStream(IterableDataset):
    """Samples of the shards for one rank, transformed; see the module docstring and ``train.plan`` for the rules.

    urls: shard tar URLs (any order; sorted here). sizes: {url: sample count} (``reader.resolve``'s); None or
    missing URLs are counted by reading (``count_samples``: a full read per rank). transform(sample, rng) -> dict
    (e.g. ``UniVIPTransform``: view1/view2 uint8 [3,S,S], boxes1/boxes2 float32 [K,4], fallback bool); None yields
    the decoded sample itself. Every output also gets ``__key__`` (str) and ``stats`` (skip/borrow counts since the
    previous output of this process). Yields exactly ``steps_per_epoch * batch_size`` samples per epoch.
    ``verify_images``: skip (and count) samples whose JPEG bytes differ from the SHA-256 in their KEY.json.
    """

    def __init__(
        self,
        urls: Sequence[str],
        sizes: Mapping[str, int] | None,
        transform: Transform | None = None,
        *,
        batch_size: int,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        rank: int = 0,
        world_size: int = 1,
        position: DataPosition | None = None,
        on_bad_shard: str = "skip",
        streams: int = 1,
        open_kwargs: Mapping[str, Any] | None = None,
        verify_images: bool = False,
    ):
        super().__init__()
        if not urls:
            raise ValueError("ShardStream: no shard URLs given")
        if batch_size < 1 or streams < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad layout: batch_size={batch_size} streams={streams} rank={rank} world={world_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.transform = transform
        self.shuffle_buffer, self.rank = shuffle_buffer, rank
        self.open_kwargs = dict(open_kwargs or {})
        self.verify_images = verify_images
        self._policy = BadShardPolicy(on_bad_shard)
        self._borrowed_samples = 0  # plan rule 3, in this process

        urls = sorted(set(urls))
        sizes = dict(sizes or {})
        missing = [u for u in urls if u not in sizes]
        if missing:  # shards found bad while counting are warned about here, not counted in the batches' stats
            sizes.update(count_samples(missing, on_bad_shard, open_kwargs))
        self.planner = EpochPlanner.of(
            {u: sizes[u] for u in urls}, batch_size=batch_size, world_size=world_size, streams=streams, seed=seed
        )
        self._reported = self.counts()  # counters already reported in the stats of earlier outputs

        position = position or DataPosition()
        if position.consumed % batch_size or not 0 <= position.consumed <= self.samples_per_epoch:
            raise ValueError(
                f"data position {position} is not a whole number of steps of batch {batch_size} "
                f"within an epoch of {self.samples_per_epoch} samples per rank"
            )
        if position.consumed == self.samples_per_epoch:
            position = DataPosition(position.epoch + 1, 0)
        self.position = position
        self._iterations = 0  # __iter__ calls in this process (persistent workers keep their own count)

    # the layout, as the planner holds it
    @property
    def urls(self) -> list[str]:
        return list(self.planner.urls)

    @property
    def sizes(self) -> dict[str, int]:
        return dict(zip(self.planner.urls, self.planner.sizes, strict=True))

    @property
    def batch_size(self) -> int:
        return self.planner.batch_size

    @property
    def seed(self) -> int:
        return self.planner.seed

    @property
    def world_size(self) -> int:
        return self.planner.world_size

    @property
    def streams(self) -> int:
        return self.planner.streams

    @property
    def total_samples(self) -> int:
        return self.planner.total_samples

    @property
    def steps_per_epoch(self) -> int:
        return self.planner.steps_per_epoch

    @property
    def samples_per_epoch(self) -> int:
        """Samples this rank yields per epoch (``steps_per_epoch * batch_size``)."""
        return self.planner.samples_per_epoch

    def __len__(self) -> int:
        return self.samples_per_epoch

    def quota(self, slot: int) -> int:
        """Samples slot ``slot`` of each rank delivers per epoch."""
        return self.planner.quota(slot)

    def plan(self, epoch: int) -> list[list[Range]]:
        """Per slot of this rank: the (url, start, stop) sample ranges it reads in ``epoch``."""
        return self.planner.ranges(epoch, self.rank)

    def counts(self) -> dict[str, int]:
        """This process's skip/borrow counters (in the main process only when ``workers=0``)."""
        return {**self._policy.counts, "samples_borrowed": self._borrowed_samples}

    # --- the five steps of a slot, composed in _slot ---------------------------------------------------------------
    def _read(self, url: str) -> Iterator[dict]:
        return shard_samples(url, self._policy, self.open_kwargs, self.verify_images)

    def _planned(self, ranges: list[Range]) -> Iterator[dict]:
        for url, start, stop in ranges:
            yield from itertools.islice(self._read(url), start, stop)

    def _borrowed(self, epoch: int, slot: int) -> Iterator[dict]:
        """Plan rule 3: whole shards in borrowing order until the consumer stops; raises when a pass finds nothing."""
        for attempt in itertools.count(1):
            found = 0
            for url in self.planner.borrow_order(epoch, self.rank, slot, attempt):
                for sample in self._read(url):
                    found += 1
                    self._borrowed_samples += 1
                    yield sample
            if not found:
                raise BadShardError(
                    f"no readable sample in any of the {len(self.planner.urls)} shards (first: "
                    f"{storage.redact(self.planner.urls[0])}); {len(self._policy.bad_urls)} were skipped as bad: "
                    "cannot fill the epoch"
                )

    def _raw(self, epoch: int, slot: int, ranges: list[Range]) -> Iterator[dict]:
        """The slot's raw samples in shuffled order (never exhausted: borrowing raises rather than ending)."""
        rng = np.random.default_rng((self.seed, BUFFER, epoch, self.rank, slot))
        return itertools.chain(
            _shuffled(self._planned(ranges), self.shuffle_buffer, rng),
            _shuffled(self._borrowed(epoch, slot), self.shuffle_buffer, rng),
        )

    def _transformed(self, samples: Iterator[tuple[int, dict]], epoch: int, slot: int) -> Iterator[tuple[dict, dict]]:
        """(sample, output) for each ``(index, sample)``; a sample whose transform fails goes to the policy."""
        failures = 0  # transform failures since the last success
        for index, sample in samples:
            if self.transform is None:
                yield sample, sample
                continue
            try:
                out = self.transform(sample, transform_rng(self.seed, epoch, self.rank, slot, index))
            except Exception as e:
                failures += 1
                url, key = sample.get("__url__", "?"), sample.get("__key__", "?")
                self._policy.transform_failed(url, key, e, failures, self.total_samples)
                continue
            failures = 0
            yield sample, out

    def _stats(self) -> dict[str, int]:
        """Counts since the previous call (the previous output of this process)."""
        now = self.counts()
        delta = {k: now[k] - self._reported[k] for k in STAT_NAMES}
        self._reported = now
        return delta

    def _slot(self, epoch: int, slot: int, ranges: list[Range], skip: int) -> Iterator[dict]:
        """Outputs of one slot: its shuffled samples, the first ``skip`` replayed untransformed (resume)."""
        samples = enumerate(self._raw(epoch, slot, ranges))
        if skip:
            for _ in itertools.islice(samples, skip):  # rebuild the buffer's state without decoding
                pass
            self._reported = self.counts()  # the replay's events were reported before the restart
        for sample, out in self._transformed(samples, epoch, slot):
            out["__key__"] = sample["__key__"]
            out["stats"] = self._stats()
            yield out

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        S, B = self.streams, self.batch_size
        if S % workers:
            raise ValueError(f"streams={S} must be a multiple of the DataLoader's num_workers={workers}")
        epoch = self.position.epoch + self._iterations
        first = self.position.consumed // B if self._iterations == 0 else 0  # batches already trained on
        self._iterations += 1
        ranges = self.plan(epoch)
        slots: dict[int, Iterator[dict]] = {}
        # this worker's batches, in the order the DataLoader asks for them (worker 0 first on every iter())
        for i in range(first + worker, self.steps_per_epoch, workers):
            s = i % S
            if s not in slots:
                slots[s] = self._slot(epoch, s, ranges[s], skip=(i // S) * B)
            for _ in range(B):
                yield next(slots[s])  # never exhausted: _borrowed raises rather than ending


# Variable-length 1-D tensors (the JPEG bytes of the gpu_decode transform): packed by collate, see there
PACKED = ("jpeg",)


def collate(batch: list[dict]) -> dict:
    """Stack a list of samples: tensors -> [B, ...] (view1/view2 uint8 [B,3,S,S] with channels-last strides,
    boxes1/boxes2 float32 [B,K,4]), numbers and bools -> [B] tensors (fallback bool [B]), ``stats`` summed, anything
    else (keys, bytes) -> list.

    Fields in ``PACKED`` (1-D tensors of different lengths) are concatenated into one tensor ``name`` [sum of
    lengths] with ``name_sizes`` int64 [B] (``unpack`` splits them again): one storage, so a worker hands the batch
    over with one shared-memory segment instead of one per sample (B file descriptors passed one by one: 256
    tensors of 100 KB cost the main process ~74 ms of CPU per batch here, one packed tensor ~3 ms)."""
    out: dict[str, Any] = {}
    for name in batch[0]:
        values = [b[name] for b in batch]
        first = values[0]
        if name == "stats":
            out[name] = {k: sum(v[k] for v in values) for k in first}
        elif name in PACKED:
            out[name] = torch.cat(values)
            out[f"{name}_sizes"] = torch.tensor([len(v) for v in values], dtype=torch.int64)
        elif isinstance(first, torch.Tensor):
            try:
                out[name] = _stack(values)
            except RuntimeError as e:
                raise ValueError(f"collate: {name!r} has different shapes across the batch: {e}") from e
        elif isinstance(first, np.ndarray):
            out[name] = torch.from_numpy(np.stack(values))
        elif isinstance(first, (bool, int, float, np.bool_, np.number)):
            out[name] = torch.tensor(values)
        else:
            out[name] = values
    return out


def _stack(values: list[torch.Tensor]) -> torch.Tensor:
    """``torch.stack``, except for images whose memory is channels-last (``[..., 3, H, W]`` views of ``[..., H, W,
    3]`` arrays, as ``train.views`` makes them): those are stacked as they lie, a plain copy, into a channels-last
    batch. Stacking them into a contiguous one would transpose every pixel (~0.4 ms a sample for two 224 px views)."""
    first = values[0]
    if first.dim() >= 3 and not first.is_contiguous() and all(v.movedim(-3, -1).is_contiguous() for v in values):
        return torch.stack([v.movedim(-3, -1) for v in values]).movedim(-1, -3)
    return torch.stack(values)


def unpack(flat: torch.Tensor, sizes: torch.Tensor) -> list[torch.Tensor]:
    """A ``PACKED`` field of a batch -> its B tensors (views into ``flat``, contiguous)."""
    return list(flat.split(sizes.tolist()))


def worker_init(storage_settings: Mapping[str, Any], worker_id: int) -> None:
    # workers parallelise over samples; intra-op threads in each of them (torch's, OpenCV's: the transform's decode,
    # resizes and colour ops) would oversubscribe the cores
    torch.set_num_threads(1)
    cv2.setNumThreads(0)  # 0: run every OpenCV function sequentially in the calling thread, no pool
    # storage.configure (--s3-endpoint) is module state: a spawned or forkserver worker would start without it
    storage.configure(**storage_settings)


def make_loader(
    spec: str | reader.Shards | Sequence[str],
    transform: Transform | None = None,
    *,
    batch_size: int,
    workers: int = 0,
    seed: int = 0,
    shuffle_buffer: int = 1000,
    rank: int = 0,
    world_size: int = 1,
    position: DataPosition | None = None,
    on_bad_shard: str = "skip",
    pin_memory: bool = False,
    streams: int | None = None,
    open_kwargs: Mapping[str, Any] | None = None,
    verify_images: bool = False,
) -> tuple[DataLoader, int]:
    """(DataLoader over this rank's batches, steps_per_epoch). ``batch_size`` is per rank.

    spec: a spec ``reader.resolve`` resolved (its URLs and sample counts), a spec to resolve here (directory, brace
    pattern, glob, manifest.json, local or URL), or a list of tar URLs (counted by reading). Iterate the loader
    once per epoch; each ``iter()`` is the next epoch (workers are persistent). ``streams`` (default: ``workers`` or
    1) fixes the sample order independently of ``workers``; keep it when resuming with another worker count.
    ``open_kwargs`` go to ``storage.open_stream`` (retries, backoff, timeout, allow_pipe) in every worker, and so
    do the ``storage.configure`` settings of this process (the S3 endpoint), whatever the workers' start method."""
    streams = streams or max(1, workers)
    if streams % max(1, workers):
        raise ValueError(f"streams={streams} must be a multiple of workers={workers} (each slot lives in one worker)")
    shards = reader.resolve(spec) if isinstance(spec, str) else spec
    if isinstance(shards, reader.Shards):
        urls, sizes = list(shards.urls), shards.sizes
    else:
        urls, sizes = list(shards), None
        if not urls:
            raise FileNotFoundError("no shards given (empty list)")
    dataset = ShardStream(
        urls,
        sizes,
        transform,
        batch_size=batch_size,
        seed=seed,
        shuffle_buffer=shuffle_buffer,
        rank=rank,
        world_size=world_size,
        position=position,
        on_bad_shard=on_bad_shard,
        streams=streams,
        open_kwargs=open_kwargs,
        verify_images=verify_images,
    )
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        worker_init_fn=functools.partial(worker_init, storage.settings()) if workers else None,
        persistent_workers=workers > 0,
        prefetch_factor=2 if workers else None,  # 2 batches per worker in flight: enough to hide decode jitter
    )
    return loader, dataset.steps_per_epoch
