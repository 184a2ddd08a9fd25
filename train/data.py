"""Streaming proposal shards into training batches: rank/worker split with equal steps, shuffle buffer, resume.

Layout. Every rank runs ``steps_per_epoch = total_samples // (world_size * batch_size)`` steps per epoch, computed
from the per-shard sample counts (identical on every rank). A rank's batches are spread over ``streams`` slots
(``S``, default: the number of DataLoader workers): global batch ``i`` of a rank comes from slot ``i % S``. Worker
``w`` of ``W`` produces batches ``w, w + W, ...`` (``S`` must be a multiple of ``W``, so each slot lives in one
worker), which is exactly the order in which the DataLoader interleaves its workers. The sequence of batches therefore
depends on (seed, epoch, world_size, rank, S, batch_size) and NOT on the number of workers: ``workers=0`` and
``workers=2`` give the same batches when ``streams=2``.

Shards per epoch. The shard list is permuted with a seed of (seed, epoch), identical on every rank. Shard ``j`` of the
permutation goes to rank ``j % world_size`` and, within the rank, to slot ``(j // world_size) % S`` (round-robin).
Slot ``s`` must deliver ``quota_s`` samples (its share of ``steps_per_epoch`` batches). Rule that guarantees the quota
and never hangs, planned from the counts alone so every rank agrees without communication:
  1. each slot reads its own shards in order, up to its quota; the unread tail of any shard goes to a pool;
  2. slots that fall short (uneven counts, fewer shards than ranks * S) take ranges of the pool, in order.
Every sample is then read at most once per epoch and all but ``total % (world_size * batch_size)`` are read.
A range that starts inside a shard streams past the samples before it without decoding them (bytes are read but not
decoded: keep at least ``world_size * S`` shards to avoid that cost).
  3. If a slot still runs dry at run time (a bad shard was skipped, a tar holds fewer samples than its count says), it
     reads whole shards from fresh permutations of all shards (seeded by seed, epoch, rank, slot, pass) until its
     quota is met; a pass that yields no sample at all raises ``BadShardError`` instead of looping forever.

Shuffling. Each slot has its own buffer of ``shuffle_buffer`` raw samples (JPEG bytes and decoded metadata, about
100 KB each: memory is ``shuffle_buffer * S / W`` samples per worker); the first sample leaves once the buffer is
full. The transform runs after the buffer with ``numpy.random.default_rng((seed, 3, epoch, rank, slot, index))``,
``index`` counting the slot's samples, so a sample's augmentation does not depend on what ran before it.

Epochs and resume. The dataset counts its own epochs: its n-th ``__iter__`` in a process is epoch
``position.epoch + n``, the first one skipping ``position.consumed`` samples of this rank. Skipped samples are read
and pass the shuffle buffer (to rebuild its state) but are not transformed, so nothing is decoded. This requires the
DataLoader to keep its workers (``persistent_workers=True``, which ``make_loader`` sets): fresh workers would each start
again at ``position.epoch``. The resumed stream equals the uninterrupted one unless a transform failed (and was skipped)
before the checkpoint.

Bad shards (``on_bad_shard``). A shard that cannot be opened or read (missing object, corrupt or truncated tar,
network failure after the storage layer's retries, a sample missing a member: ``reader.ShardError``) is skipped with
one warning naming its URL ('skip', the default) or raises ``BadShardError`` naming it ('fail'). Samples it yielded
before the fault are kept, and it is read again wherever the plan meets it, so the order stays a function of the
bytes (it is counted once per process that meets it: each worker may count it). A tar with no ``KEY.json`` members
at all gets the message "shard without boxes: URL". A single sample with unreadable metadata or a failing transform
is skipped the same way, and so, with ``verify_images``, is a sample whose ``KEY.jpg`` bytes do not have the SHA-256
its ``KEY.json`` records (format version 2: a JPEG damaged in storage can still decode; version 1 records no hash and
is read unchecked, with one warning per shard). Samples with zero boxes are not errors: Algorithm 1 falls back to random boxes. Counts of
skipped samples and shards, and of samples borrowed at run time (rule 3), travel with the batches
(``batch["stats"]``; accumulate them with ``DataCounters``), because DataLoader workers are separate processes.

DDP and 'fail': a rank that raises leaves the others in their next collective. We rely on torchrun: when one rank's
process exits with an error, torchrun's agent stops all ranks of the group (and gloo peers see the connection close;
the process-group timeout bounds NCCL). The loop only has to let the exception propagate and tear down in
``finally:``; no extra collective check is needed. (After an exception from a worker, torch's DataLoader takes
about 5 s per worker to shut its workers down: a failing rank exits seconds late, it does not hang.)
With 'skip', ranks never diverge: every rank still delivers exactly ``steps_per_epoch`` batches.
"""

from __future__ import annotations

import functools
import itertools
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from shards import reader, schema, storage

Transform = Callable[[dict, np.random.Generator], dict]
POLICIES = ("skip", "fail")
STAT_NAMES = ("samples_skipped", "shards_skipped", "samples_borrowed")

# first element of every rng seed tuple, so the streams for different purposes never coincide
_SHARD_ORDER, _BUFFER, _BORROW_ORDER, _TRANSFORM = 0, 1, 2, 3
# A transform that fails this often without one success is broken (or so is every image): stop instead of skipping on
_MAX_FAILURES_IN_A_ROW = 1000


class BadShardError(RuntimeError):
    """A shard or sample could not be used; the message names the URL (and the key for one sample)."""


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
    samples_skipped: int = 0
    shards_skipped: int = 0
    samples_borrowed: int = 0
    fallbacks: int = 0  # Algorithm 1 fell back to random boxes (the transform's ``fallback`` output)

    def add(self, batch: Mapping[str, Any]) -> None:
        stats = batch.get("stats", {})
        for name in STAT_NAMES:
            setattr(self, name, getattr(self, name) + int(stats.get(name, 0)))
        if "fallback" in batch:
            fb = batch["fallback"]
            self.fallbacks += int(fb.sum()) if isinstance(fb, torch.Tensor) else sum(map(int, fb))
        self.samples += len(batch["__key__"])

    def as_dict(self) -> dict[str, float]:
        d = {name: getattr(self, name) for name in ("samples", *STAT_NAMES, "fallbacks")}
        d["fallback_rate"] = self.fallbacks / self.samples if self.samples else 0.0
        return d


class _ShardSamples:
    """Reads the valid samples of shards under a bad-shard policy; holds this process's counters and warnings."""

    def __init__(self, on_bad_shard: str, open_kwargs: Mapping[str, Any] | None = None, verify_images: bool = False):
        if on_bad_shard not in POLICIES:
            raise ValueError(f"on_bad_shard must be one of {POLICIES}, got {on_bad_shard!r}")
        self.policy = on_bad_shard
        self.open_kwargs = dict(open_kwargs or {})  # storage.open_stream: retries, backoff, timeout, allow_pipe
        self.verify_images = verify_images
        self.counts = dict.fromkeys(STAT_NAMES, 0)
        # A bad shard is read again wherever the plan meets it (its good prefix is a function of its bytes alone, so
        # the sample order does not depend on which worker met it first); it is warned about and counted once.
        self.bad_urls: set[str] = set()
        self._warned: set[str] = set()
        self._bad_samples: set[tuple[str, str]] = set()

    def _warn(self, url: str, message: str) -> None:
        if url not in self._warned:  # once per URL: a broken shard may hold thousands of broken samples
            self._warned.add(url)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    def bad_shard(self, url: str, message: str, cause: BaseException | None = None) -> None:
        if self.policy == "fail":
            raise BadShardError(message) from cause
        if url not in self.bad_urls:
            self.bad_urls.add(url)
            self._warn(url, f"skipping shard: {message}")
            self.counts["shards_skipped"] += 1

    def bad_sample(self, url: str, key: str, message: str, cause: BaseException | None = None) -> None:
        if self.policy == "fail":
            raise BadShardError(message) from cause
        if (url, key) in self._bad_samples:  # met again while borrowing (rule 3): counted once
            return
        self._bad_samples.add((url, key))
        self._warn(
            url,
            f"skipping samples of {storage.redact(url)}: {message} (further bad samples of this shard "
            "are not reported)",
        )
        self.counts["samples_skipped"] += 1

    def read(self, url: str) -> Iterator[dict]:
        """Decoded samples (``reader.decode``: with ``meta``) of one shard; faults follow the policy."""
        good = 0
        try:
            for raw in reader.read_shard(url, **self.open_kwargs):
                try:
                    sample = reader.decode(raw)
                except ValueError as e:  # the reader's message names the URL and the key
                    self.bad_sample(url, raw.get("__key__", "?"), str(e), e)
                    continue
                if self.verify_images and not self._image_intact(url, sample):
                    continue
                good += 1
                yield sample
        except BadShardError:
            raise
        except Exception as e:  # open / tar / network / missing-member errors, from inside the reader's generator
            shown = storage.redact(url)
            if good == 0 and isinstance(e, reader.ShardError) and self._without_json(url):
                self.bad_shard(
                    url,
                    f"shard without boxes: {shown} (no KEY.{schema.META_EXT} members: a plain image "
                    "tar, not a prep shard)",
                    e,
                )
            else:
                detail = str(e) if shown in str(e) else f"{shown}: {e}"  # the reader's errors name the URL already
                self.bad_shard(url, f"cannot read shard: {type(e).__name__}: {detail}", e)

    def _image_intact(self, url: str, sample: dict) -> bool:
        """Whether the JPEG bytes have the SHA-256 that KEY.json records; a mismatch is a bad sample."""
        want = sample["meta"]["image_sha256"]
        if want is None:
            self._warn(
                url, f"{storage.redact(url)}: format version 1 records no image hashes; its images are not verified"
            )
            return True
        if schema.image_sha256(sample[schema.IMAGE_EXT]) == want:
            return True
        key = sample["__key__"]
        self.bad_sample(
            url,
            key,
            f"{storage.redact(url)}: sample {key!r}: {key}.{schema.IMAGE_EXT} does not have the "
            f"SHA-256 recorded in {key}.{schema.META_EXT} (damaged in storage)",
        )
        return False

    def _without_json(self, url: str) -> bool:
        """Whether the first members of a shard hold no metadata at all (read again only on this error path)."""
        try:
            with storage.open_stream(url, **self.open_kwargs) as stream:
                names = [name for name, _ in itertools.islice(reader.tar_members(stream), 4)]
        except Exception:
            return False
        return bool(names) and not any(n.endswith("." + schema.META_EXT) for n in names)


def count_samples(
    urls: Sequence[str], on_bad_shard: str = "skip", open_kwargs: Mapping[str, Any] | None = None
) -> dict[str, int]:
    """Sample counts by reading every shard once (all bytes are streamed; images are not decoded).

    Only for shards without a manifest or stats files: every rank pays a full read of the data set at start-up."""
    src = _ShardSamples(on_bad_shard, open_kwargs)
    return {url: sum(1 for _ in src.read(url)) for url in urls}


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


class ShardStream(IterableDataset):
    """Samples of the shards for one rank, transformed; see the module docstring for the layout rules.

    urls: shard tar URLs (any order; sorted here). sizes: {url: sample count} (``reader.shard_sizes``); None or
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
        self.urls = sorted(set(urls))
        self.transform = transform
        self.batch_size, self.seed, self.shuffle_buffer = batch_size, seed, shuffle_buffer
        self.rank, self.world_size, self.streams = rank, world_size, streams
        self._src = _ShardSamples(on_bad_shard, open_kwargs, verify_images)

        sizes = dict(sizes or {})
        missing = [u for u in self.urls if u not in sizes]
        if missing:  # shards found bad while counting are warned about here, not counted in the batches' stats
            sizes.update(count_samples(missing, on_bad_shard, open_kwargs))
        self._reported = dict(self._src.counts)  # counters already reported in the stats of earlier outputs
        self.sizes = {u: int(sizes[u]) for u in self.urls}
        if any(n < 0 for n in self.sizes.values()):
            raise ValueError("negative shard sample count")
        self.total_samples = sum(self.sizes.values())
        self.steps_per_epoch = self.total_samples // (world_size * batch_size)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{self.total_samples} samples in {len(self.urls)} shards cannot fill one step of "
                f"world_size {world_size} x batch_size {batch_size}"
            )

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

    @property
    def samples_per_epoch(self) -> int:
        """Samples this rank yields per epoch (``steps_per_epoch * batch_size``)."""
        return self.steps_per_epoch * self.batch_size

    def __len__(self) -> int:
        return self.samples_per_epoch

    def counts(self) -> dict[str, int]:
        """This process's skip/borrow counters (in the main process only when ``workers=0``)."""
        return dict(self._src.counts)

    # --- planning (pure functions of the counts, identical on every rank and worker) ------------------------------
    def quota(self, slot: int) -> int:
        """Samples slot ``slot`` of each rank delivers per epoch."""
        steps, S = self.steps_per_epoch, self.streams
        return (steps // S + (slot < steps % S)) * self.batch_size

    def plan(self, epoch: int) -> list[list[tuple[str, int, int]]]:
        """Per slot of this rank: the (url, start, stop) sample ranges it reads in ``epoch`` (rules 1 and 2)."""
        W, S = self.world_size, self.streams
        order = np.random.default_rng((self.seed, _SHARD_ORDER, epoch)).permutation(len(self.urls))
        quotas = [self.quota(g % S) for g in range(W * S)]  # global slot g = rank * S + slot
        taken = [0] * (W * S)
        ranges: list[list[tuple[str, int, int]]] = [[] for _ in range(W * S)]
        pool: list[tuple[str, int, int]] = []
        for j, idx in enumerate(order):
            url, size = self.urls[idx], self.sizes[self.urls[idx]]
            g = (j % W) * S + (j // W) % S
            n = min(size, quotas[g] - taken[g])
            if n > 0:
                ranges[g].append((url, 0, n))
                taken[g] += n
            if size > n:
                pool.append((url, n, size))
        p = 0
        for g in range(W * S):
            while taken[g] < quotas[g]:  # cannot run out: sum(quotas) <= total samples
                url, a, b = pool[p]
                n = min(b - a, quotas[g] - taken[g])
                ranges[g].append((url, a, a + n))
                taken[g] += n
                if a + n < b:
                    pool[p] = (url, a + n, b)
                else:
                    p += 1
        return ranges[self.rank * S : (self.rank + 1) * S]

    # --- reading --------------------------------------------------------------------------------------------------
    def _planned(self, ranges: list[tuple[str, int, int]]) -> Iterator[dict]:
        for url, start, stop in ranges:
            yield from itertools.islice(self._src.read(url), start, stop)

    def _borrowed(self, epoch: int, slot: int) -> Iterator[dict]:
        """Rule 3: whole shards from fresh permutations until the consumer stops; raises when a pass finds nothing."""
        for p in itertools.count(1):
            rng = np.random.default_rng((self.seed, _BORROW_ORDER, epoch, self.rank, slot, p))
            found = 0
            for idx in rng.permutation(len(self.urls)):
                for sample in self._src.read(self.urls[idx]):
                    found += 1
                    self._src.counts["samples_borrowed"] += 1
                    yield sample
            if not found:
                raise BadShardError(
                    f"no readable sample in any of the {len(self.urls)} shards (first: {storage.redact(self.urls[0])}); "
                    f"{len(self._src.bad_urls)} were skipped as bad: cannot fill the epoch"
                )

    def _slot(self, epoch: int, slot: int, ranges: list[tuple[str, int, int]], skip: int) -> Iterator[dict]:
        """Transformed samples of one slot, the first ``skip`` raw samples dropped before the transform."""
        rng = np.random.default_rng((self.seed, _BUFFER, epoch, self.rank, slot))
        # separate buffers: the borrowed stream must not start (and mix in) while planned samples remain
        raw = itertools.chain(
            _shuffled(self._planned(ranges), self.shuffle_buffer, rng),
            _shuffled(self._borrowed(epoch, slot), self.shuffle_buffer, rng),
        )
        failures = 0  # transform failures since the last success
        for index, sample in enumerate(raw):
            if index < skip:
                if index == skip - 1:
                    self._reported = dict(self._src.counts)  # the replay's events were reported before the restart
                continue
            out = sample
            if self.transform is not None:
                try:
                    out = self.transform(
                        sample, np.random.default_rng((self.seed, _TRANSFORM, epoch, self.rank, slot, index))
                    )
                except Exception as e:
                    url, key = sample.get("__url__", "?"), sample.get("__key__", "?")
                    failures += 1
                    if failures > min(self.total_samples, _MAX_FAILURES_IN_A_ROW):
                        raise BadShardError(
                            f"the transform failed on {failures} samples in a row (last: "
                            f"{storage.redact(url)} {key!r}: {type(e).__name__}: {e})"
                        ) from e
                    self._src.bad_sample(
                        url, key, f"{storage.redact(url)}: sample {key!r}: transform failed: {type(e).__name__}: {e}", e
                    )
                    continue
            failures = 0
            out["__key__"] = sample["__key__"]
            now = dict(self._src.counts)
            out["stats"] = {k: now[k] - self._reported[k] for k in STAT_NAMES}
            self._reported = now
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
    """Stack a list of samples: tensors -> [B, ...] (view1/view2 uint8 [B,3,S,S], boxes1/boxes2 float32 [B,K,4]),
    numbers and bools -> [B] tensors (fallback bool [B]), ``stats`` summed, anything else (keys, bytes) -> list.

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
                out[name] = torch.stack(values)
            except RuntimeError as e:
                raise ValueError(f"collate: {name!r} has different shapes across the batch: {e}") from e
        elif isinstance(first, np.ndarray):
            out[name] = torch.from_numpy(np.stack(values))
        elif isinstance(first, (bool, int, float, np.bool_, np.number)):
            out[name] = torch.tensor(values)
        else:
            out[name] = values
    return out


def unpack(flat: torch.Tensor, sizes: torch.Tensor) -> list[torch.Tensor]:
    """A ``PACKED`` field of a batch -> its B tensors (views into ``flat``, contiguous)."""
    return list(flat.split(sizes.tolist()))


def _worker_init(storage_settings: Mapping[str, Any], worker_id: int) -> None:
    # workers parallelise over samples; intra-op threads in each of them would oversubscribe the cores
    torch.set_num_threads(1)
    # storage.configure (--s3-endpoint) is module state: a spawned or forkserver worker would start without it
    storage.configure(**storage_settings)


def make_loader(
    spec: str | Sequence[str],
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

    spec: directory, brace pattern, glob, manifest.json (local or URL), or a list of tar URLs. Iterate the loader
    once per epoch; each ``iter()`` is the next epoch (workers are persistent). ``streams`` (default: ``workers`` or
    1) fixes the sample order independently of ``workers``; keep it when resuming with another worker count.
    ``open_kwargs`` go to ``storage.open_stream`` (retries, backoff, timeout, allow_pipe) in every worker, and so
    do the ``storage.configure`` settings of this process (the S3 endpoint), whatever the workers' start method."""
    streams = streams or max(1, workers)
    if streams % max(1, workers):
        raise ValueError(f"streams={streams} must be a multiple of workers={workers} (each slot lives in one worker)")
    if isinstance(spec, str):
        urls = reader.expand_spec(spec)
        if not urls:
            raise FileNotFoundError(f"no shards matched {spec!r}")
        sizes = reader.shard_sizes(spec)
    else:
        urls, sizes = list(spec), None
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
        worker_init_fn=functools.partial(_worker_init, storage.settings()) if workers else None,
        persistent_workers=workers > 0,
        prefetch_factor=2 if workers else None,  # 2 batches per worker in flight: enough to hide decode jitter
    )
    return loader, dataset.steps_per_epoch
