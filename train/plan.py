"""Which samples each (rank, slot) reads in an epoch, planned from the per-shard sample counts alone.

Pure functions of (urls, counts, seed, epoch, world_size, streams, batch_size): every rank and every DataLoader worker
computes the same plan without communication. ``train.data`` streams it.

Steps. Every rank runs ``steps_per_epoch = total_samples // (world_size * batch_size)`` steps per epoch. A rank's
batches are spread over ``streams`` slots (``S``): global batch ``i`` of a rank comes from slot ``i % S``, so slot
``s`` delivers ``quota(s)`` samples (its share of ``steps_per_epoch`` batches).

Shards per epoch. The shard list is permuted with a seed of (seed, epoch), identical on every rank. Shard ``j`` of the
permutation goes to rank ``j % world_size`` and, within the rank, to slot ``(j // world_size) % S`` (round-robin).
Rule that guarantees every quota and never hangs:
  1. each slot reads its own shards in order, up to its quota; the unread tail of any shard goes to a pool;
  2. slots that fall short (uneven counts, fewer shards than ranks * S) take ranges of the pool, in order.
Every sample is then read at most once per epoch and all but ``total % (world_size * batch_size)`` are read.
A range that starts inside a shard streams past the samples before it without decoding them (bytes are read but not
decoded: keep at least ``world_size * S`` shards to avoid that cost).
  3. If a slot still runs dry at run time (a bad shard was skipped, a tar holds fewer samples than its count says), it
     reads whole shards in the order of ``borrow_order``: fresh permutations of all shards, seeded by (seed, epoch,
     rank, slot, pass), until its quota is met (``train.data`` raises when a whole pass yields nothing).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

# First element of every random-generator seed tuple of the data path (here and in train.data), so the streams drawn
# for different purposes never coincide. The values are part of the sample order: changing one changes every run.
SHARD_ORDER, BUFFER, BORROW_ORDER, TRANSFORM = 0, 1, 2, 3

Range = tuple[str, int, int]  # (url, start, stop): samples start..stop-1 of the shard, in tar order


@dataclass(frozen=True)
class EpochPlanner:
    """The layout of one run's data: sorted shard URLs with their sample counts, and how ranks and slots split them.

    Build it with ``EpochPlanner.of``; every rank builds the same one."""

    urls: tuple[str, ...]
    sizes: tuple[int, ...]  # samples of urls[i]
    batch_size: int  # per rank
    world_size: int
    streams: int  # slots per rank (S)
    seed: int

    @classmethod
    def of(cls, sizes: Mapping[str, int], *, batch_size: int, world_size: int, streams: int, seed: int) -> EpochPlanner:
        """From ``{url: sample count}``. Raises ValueError on a bad layout or when one step cannot be filled."""
        if batch_size < 1 or streams < 1 or world_size < 1:
            raise ValueError(f"bad layout: batch_size={batch_size} streams={streams} world={world_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        urls = tuple(sorted(sizes))
        counts = tuple(int(sizes[u]) for u in urls)
        if any(n < 0 for n in counts):
            raise ValueError("negative shard sample count")
        planner = cls(urls, counts, batch_size, world_size, streams, seed)
        if planner.steps_per_epoch == 0:
            raise ValueError(
                f"{planner.total_samples} samples in {len(urls)} shards cannot fill one step of "
                f"world_size {world_size} x batch_size {batch_size}"
            )
        return planner

    @property
    def total_samples(self) -> int:
        return sum(self.sizes)

    @property
    def steps_per_epoch(self) -> int:
        """Steps of every rank in every epoch."""
        return self.total_samples // (self.world_size * self.batch_size)

    @property
    def samples_per_epoch(self) -> int:
        """Samples each rank delivers per epoch."""
        return self.steps_per_epoch * self.batch_size

    def quota(self, slot: int) -> int:
        """Samples slot ``slot`` of each rank delivers per epoch."""
        steps, S = self.steps_per_epoch, self.streams
        return (steps // S + (slot < steps % S)) * self.batch_size

    def ranges(self, epoch: int, rank: int) -> list[list[Range]]:
        """Per slot of ``rank``: the sample ranges it reads in ``epoch`` (rules 1 and 2), in reading order."""
        W, S = self.world_size, self.streams
        order = np.random.default_rng((self.seed, SHARD_ORDER, epoch)).permutation(len(self.urls))
        quotas = [self.quota(g % S) for g in range(W * S)]  # global slot g = rank * S + slot
        taken = [0] * (W * S)
        ranges: list[list[Range]] = [[] for _ in range(W * S)]
        pool: list[Range] = []
        for j, idx in enumerate(order):
            url, size = self.urls[idx], self.sizes[idx]
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
        return ranges[rank * S : (rank + 1) * S]

    def borrow_order(self, epoch: int, rank: int, slot: int, attempt: int) -> Sequence[str]:
        """Rule 3: the shards slot ``slot`` of ``rank`` reads whole in its ``attempt``-th pass (1, 2, ...)."""
        rng = np.random.default_rng((self.seed, BORROW_ORDER, epoch, rank, slot, attempt))
        return [self.urls[i] for i in rng.permutation(len(self.urls))]
