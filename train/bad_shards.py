"""The bad-shard policy (``on_bad_shard``): what the data stream does with a shard or sample it cannot use.

'skip' (the default) warns once per URL and counts; 'fail' raises ``BadShardError`` naming the URL (and the key for
one sample). The stream (``train.data``) detects the faults and hands them here:
- a shard that cannot be opened or read as a tar (missing object, not a tar, cut short, network failure after the
  storage layer's retries: ``reader.ShardError``, OSError); a tar with no ``KEY.json`` members at all gets the
  message "shard without boxes: URL". Samples it yielded before the fault are kept, and it is read again wherever
  the plan meets it, so the order stays a function of the bytes (counted once per process that meets it: each
  DataLoader worker may count it);
- a single sample that breaks the rule every reader applies (``shards.reader``: a missing, duplicated or odd member,
  invalid ``KEY.json`` or boxes, a damaged tar header, with ``verify_images`` ``KEY.jpg`` bytes that do not have the
  SHA-256 its ``KEY.json`` records), a JPEG that does not decode to its recorded size, or a failing transform: that
  sample is skipped alone, counted by reason (``SKIP_REASONS``) and warned about once per shard with its key; the
  samples before and after it are delivered. Samples with zero boxes are not errors: Algorithm 1 falls back to random
  boxes;
- a transform that fails on every sample (``MAX_FAILURES_IN_A_ROW`` in a row, or every sample there is) is broken,
  not unlucky: that raises under either policy instead of skipping through the whole data set.
With 'skip', ranks never diverge: the stream still delivers exactly ``steps_per_epoch`` batches on every rank.

DDP and 'fail': the stream raises on the rank that met the fault. The loop (``train.__main__``) does not let that
rank leave the others waiting in DDP's next all-reduce: every step all ranks exchange a "my batch failed" flag over a
CPU group (``dist.failed_ranks``) and then stop together, the failing rank with its own error, the others naming it.
(After an exception from a worker, torch's DataLoader takes about 5 s per worker to shut its workers down: a failing
rank exits seconds late, it does not hang.)
"""

from __future__ import annotations

import warnings

from shards import schema, storage

POLICIES = ("skip", "fail")
# Why samples are skipped: the reasons of the format's rule (``schema.INVALID_REASONS``), and a transform that raised
SKIP_REASONS = (*schema.INVALID_REASONS, "transform")
# A transform that fails this often without one success is broken (or so is every image): stop instead of skipping on
MAX_FAILURES_IN_A_ROW = 1000


class BadShardError(RuntimeError):
    """A shard or sample could not be used; the message names the URL (and the key for one sample)."""


class BadShardPolicy:
    """Decisions on faults under one policy, with this process's counts (``samples_skipped``, ``shards_skipped``, and
    ``skipped_{reason}`` for each of ``SKIP_REASONS``) and the URLs already warned about. One per process: DataLoader
    workers each hold a copy."""

    def __init__(self, on_bad_shard: str):
        if on_bad_shard not in POLICIES:
            raise ValueError(f"on_bad_shard must be one of {POLICIES}, got {on_bad_shard!r}")
        self.policy = on_bad_shard
        self.counts = {"samples_skipped": 0, "shards_skipped": 0, **{skip_name(r): 0 for r in SKIP_REASONS}}
        # A bad shard is read again wherever the plan meets it (its good prefix is a function of its bytes alone, so
        # the sample order does not depend on which worker met it first); it is warned about and counted once.
        self.bad_urls: set[str] = set()
        self._warned: set[str] = set()
        self._bad_samples: set[tuple[str, str]] = set()

    def warn(self, url: str, message: str) -> None:
        """Warn about ``url`` unless it was warned about already: a broken shard may hold thousands of bad samples."""
        if url not in self._warned:
            self._warned.add(url)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    def bad_shard(self, url: str, message: str, cause: BaseException | None = None) -> None:
        """The rest of shard ``url`` cannot be read: raise ('fail') or warn and count it once ('skip')."""
        if self.policy == "fail":
            raise BadShardError(message) from cause
        if url not in self.bad_urls:
            self.bad_urls.add(url)
            self.warn(url, f"skipping shard: {message}")
            self.counts["shards_skipped"] += 1

    def bad_sample(
        self, url: str, key: str | None, message: str, cause: BaseException | None = None, *, reason: str
    ) -> None:
        """Sample ``key`` of ``url`` (None: a damaged stretch of the tar, named by ``message``) cannot be used for
        ``reason`` (one of ``SKIP_REASONS``): raise ('fail') or count it once and warn once per shard."""
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}")
        if self.policy == "fail":
            raise BadShardError(message) from cause
        if (url, key or message) in self._bad_samples:  # met again while borrowing (plan rule 3): counted once
            return
        self._bad_samples.add((url, key or message))
        self.warn(
            url, f"skipping a bad sample: {message} (further bad samples of {storage.redact(url)} are not reported)"
        )
        self.counts["samples_skipped"] += 1
        self.counts[skip_name(reason)] += 1

    def transform_failed(self, url: str, key: str, error: Exception, in_a_row: int, total_samples: int) -> None:
        """The transform raised ``error`` on a sample, the ``in_a_row``-th failure without a success in between: a bad
        sample, unless that many failures (or as many as there are samples) say the transform itself is broken."""
        shown = storage.redact(url)
        if in_a_row > min(total_samples, MAX_FAILURES_IN_A_ROW):
            raise BadShardError(
                f"the transform failed on {in_a_row} samples in a row (last: {shown} {key!r}: "
                f"{type(error).__name__}: {error})"
            ) from error
        if isinstance(error, schema.InvalidSample):  # the data, found bad where it is decoded (the JPEG's size)
            self.bad_sample(url, key, f"{shown}: sample {key!r}: {error}", error, reason=error.reason)
        else:
            message = f"{shown}: sample {key!r}: transform failed: {type(error).__name__}: {error}"
            self.bad_sample(url, key, message, error, reason="transform")


def skip_name(reason: str) -> str:
    """The counter of samples skipped for ``reason``: ``skipped_{reason}``."""
    return f"skipped_{reason}"
