"""Read shards as a pipeline of small generators: shard spec -> URLs -> byte stream -> tar members -> samples.

    for url in expand_spec("s3://bucket/coco/manifest.json"):
        for sample in map(decode, read_shard(url)):
            sample["jpg"], sample["meta"]["boxes"]      # JPEG bytes, int32 [N, 4] xyxy

Each stage takes plain iterables, so it can be tested with a list. Streams are read once, front to back (tarfile
mode ``r|``), so a remote shard never needs seeking. Errors name the shard URL: a malformed shard raises
``ShardError`` (a ValueError); a shard that cannot be read raises OSError (``FileNotFoundError``,
``PermissionError``, ``storage.StreamError``).
"""

from __future__ import annotations

import fnmatch
import glob
import io
import json
import os
import re
import tarfile
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from shards import layout, schema, storage


class ShardError(ValueError):
    """A shard whose content does not follow the format (corrupt tar, a sample missing a member, bad KEY.json)."""


class SpecError(ValueError):
    """A shard spec that matches no shard."""


# --- spec -> URLs ----------------------------------------------------------------------------------------------------
_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"(\d+)\.\.(\d+)")


def expand_braces(pattern: str) -> list[str]:
    """``a-{000..002}.tar`` -> ``a-000.tar, a-001.tar, a-002.tar``; ``{x,y}`` lists; groups multiply; no nesting.

    A range is zero-padded to the longer bound's width when either bound has a leading zero (as in bash)."""
    m = _BRACE.search(pattern)
    if not m:
        return [pattern]
    head, body, tail = pattern[: m.start()], m.group(1), pattern[m.end() :]
    r = _RANGE.fullmatch(body)
    if r:
        lo, hi = r.groups()
        padded = (len(lo) > 1 and lo[0] == "0") or (len(hi) > 1 and hi[0] == "0")
        width = max(len(lo), len(hi)) if padded else 0
        step = 1 if int(hi) >= int(lo) else -1
        items = [str(i).zfill(width) for i in range(int(lo), int(hi) + step, step)]
    elif "," in body:
        items = body.split(",")
    else:
        items = ["{" + body + "}"]  # not a brace expression: literal text
    return [head + item + rest for item in items for rest in expand_braces(tail)]


def _is_glob(spec: str) -> bool:
    return any(c in spec for c in "*?[")


def _manifest_shards(spec: str) -> list[tuple[str, int]]:
    """(tar URL, samples) from a manifest; tar names are relative to the manifest's location."""
    try:
        manifest = json.loads(storage.read_bytes(spec))
        if manifest.get("format_version") not in schema.READABLE_VERSIONS:
            version = manifest.get("format_version")
            raise ShardError(f"format_version {version}, this reader knows {schema.READABLE_VERSIONS}")
        entries = manifest["shards"]
        base = storage.parent(spec)
        return [
            (t if "://" in t or os.path.isabs(t) else storage.join(base, t), int(s["samples"]))
            for s in entries
            for t in [s["tar"]]
        ]
    except (ValueError, KeyError, TypeError) as exc:
        raise ShardError(f"{storage.redact(spec)}: not a valid manifest: {exc}") from None


def _is_output(spec: str) -> bool:
    """Whether ``spec`` names an output as ``prep --out`` takes it: a local directory or an ``s3://bucket/prefix``,
    with or without a trailing slash (or any URL prefix ending in ``/``). Not a brace pattern, glob or file."""
    kind = storage.scheme(spec)
    if "{" in spec or _is_glob(spec) or kind == "pipe" or spec.endswith(schema.TAR_SUFFIX):
        return False
    if kind == "file":
        return spec.endswith("/") or os.path.isdir(storage.local_path(spec))
    return spec.endswith("/") or (kind == "s3" and storage.basename(spec) != schema.MANIFEST_NAME)


def _manifest_of(spec: str) -> str | None:
    """The manifest a spec stands for: the spec itself when it names a ``manifest.json``, the one inside an output
    (``_is_output``) when it has one (one listing), else None."""
    if storage.basename(spec) == schema.MANIFEST_NAME and "{" not in spec:
        return spec
    if _is_output(spec) and schema.MANIFEST_NAME in storage.list_names(spec):
        return storage.join(spec, schema.MANIFEST_NAME)
    return None


def expand_spec(spec: str) -> list[str]:
    """Shard URLs for a spec, sorted: an output as ``prep --out`` took it (a directory or ``s3://bucket/prefix``, with
    or without a trailing slash: the shards of its ``manifest.json`` when it has one, else its ``*.tar``), a brace
    pattern (``out/coco-{000000..000099}.tar``), a glob (``out/*.tar``, also on s3), a ``manifest.json`` (local or
    URL), or one shard path/URL. Raises SpecError when nothing matched."""
    spec = spec.strip()
    kind = storage.scheme(spec)
    where = storage.redact(spec)
    manifest = _manifest_of(spec)
    if manifest is not None:
        urls = [url for url, _ in _manifest_shards(manifest)]
    elif "{" in spec:
        urls = expand_braces(spec)
    elif kind == "pipe":
        urls = [spec]
    elif _is_glob(spec):
        if kind == "file":
            urls = layout.tars(glob.glob(storage.local_path(spec)))
        else:  # wildcards in the last component only: list the prefix, match names
            base, pattern = spec.rsplit("/", 1)
            names = layout.tars(storage.list_names(base))
            urls = [storage.join(base, n) for n in names if fnmatch.fnmatchcase(n, pattern)]
    elif _is_output(spec):
        urls = [storage.join(spec, n) for n in layout.tars(storage.list_names(spec))]
    elif spec.endswith(schema.TAR_SUFFIX):
        if kind == "file" and not os.path.isfile(storage.local_path(spec)):
            raise SpecError(f"no shards matched {where!r}: no such file")
        urls = [spec]
    else:
        raise SpecError(
            f"{where!r} is not a shard spec: give a directory, an s3:// prefix, a URL prefix ending in '/', a brace "
            f"pattern, a glob, a {schema.MANIFEST_NAME} or a .tar"
        )
    if not urls:
        raise SpecError(f"no shards matched {where!r}")
    return sorted(set(urls))


def shard_sizes(spec: str) -> dict[str, int] | None:
    """Samples per shard URL (the URLs ``expand_spec`` gives): from the manifest (named, or inside the output), else
    from every ``NAME.stats.json``; None when a count is unknown (a shard without a stats file)."""
    manifest = _manifest_of(spec.strip())
    if manifest is not None:
        return dict(_manifest_shards(manifest))
    sizes = {}
    for url in expand_spec(spec):
        if not url.endswith(schema.TAR_SUFFIX) or storage.scheme(url) == "pipe":
            return None
        try:
            stats = json.loads(storage.read_bytes(layout.sibling(url, schema.STATS_SUFFIX)))
        except FileNotFoundError:
            return None
        sizes[url] = int(stats["samples"])
    return sizes


# --- stream -> members -> samples ------------------------------------------------------------------------------------
def tar_members(stream: storage.Stream) -> Iterator[tuple[str, bytes]]:
    """(name, content) of each regular file in a tar stream, in order, reading forward only.

    Reads the stream to its end and raises ``tarfile.ReadError`` when the end-of-archive marker is missing: tarfile
    takes a stream cut at a header boundary for a complete archive, which would silently drop samples."""
    watched = _TailWatch(stream)
    with tarfile.open(fileobj=watched, mode="r|") as tar:
        for member in tar:
            content = tar.extractfile(member) if member.isfile() else None  # None for anything but a regular file
            if content is not None:
                yield member.name, content.read()
    while watched.read(1 << 16):
        pass
    if watched.tail != bytes(_END_MARKER):
        raise tarfile.ReadError("truncated archive: no end-of-archive marker")


_END_MARKER = 2 * tarfile.BLOCKSIZE  # two zero blocks end every tar; record padding after them is zeros too


class _TailWatch(io.BufferedIOBase):
    """A read-only stream wrapper that remembers the last bytes read (a file object that cannot write or seek, as
    tarfile expects of one)."""

    def __init__(self, stream: storage.Stream):
        self._stream, self.tail = stream, b""

    def read(self, n: int | None = -1, /) -> bytes:
        data = self._stream.read(-1 if n is None else n)
        if data:
            self.tail = (self.tail + data[-_END_MARKER:])[-_END_MARKER:]
        return data


def split_name(name: str) -> tuple[str, str] | None:
    """``dir/KEY.ext.more`` -> (``dir/KEY``, ``ext.more``): the extension starts at the first dot of the file name,
    as in WebDataset; None for a name without one."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem:
        return None
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


# The members every sample of a shard has.
SAMPLE_MEMBERS = (schema.IMAGE_EXT, schema.META_EXT)


def group_by_key(
    members: Iterable[tuple[str, bytes]], url: str, *, require: Iterable[str] = SAMPLE_MEMBERS
) -> Iterator[dict[str, Any]]:
    """Consecutive members sharing a key -> ``{"__key__", "__url__", "jpg": bytes, "json": bytes}``. A sample
    without one of the extensions in ``require`` raises ShardError (``require=()``: yielded as it is, for a check
    that names what is missing)."""
    require = tuple(require)
    sample: dict[str, Any] | None = None
    for name, data in members:
        parts = split_name(name)
        if parts is None:
            continue
        key, ext = parts
        if sample is None or key != sample["__key__"]:
            if sample is not None:
                yield _complete(sample, require)
            sample = {"__key__": key, "__url__": url}
        if ext in sample:
            raise ShardError(f"{storage.redact(url)}: sample {key!r} has two {ext!r} members")
        sample[ext] = data
    if sample is not None:
        yield _complete(sample, require)


def _complete(sample: dict[str, Any], require: tuple[str, ...]) -> dict[str, Any]:
    missing = [ext for ext in require if ext not in sample]
    if missing:
        raise ShardError(
            f"{storage.redact(sample['__url__'])}: sample {sample['__key__']!r} has no "
            + " and no ".join(f"{sample['__key__']}.{ext}" for ext in missing)
        )
    return sample


def read_shard(
    url: str, *, require: Iterable[str] = SAMPLE_MEMBERS, **open_kwargs
) -> Generator[dict[str, Any], None, None]:
    """Samples of one shard (``require``: see ``group_by_key``); ``open_kwargs`` go to ``storage.open_stream``
    (retries, backoff, timeout, allow_pipe). The stream is closed when the generator is exhausted or closed early."""
    with storage.open_stream(url, **open_kwargs) as stream:
        yield from _stream_samples(stream, url, require)


def _stream_samples(
    stream: storage.Stream, url: str, require: Iterable[str] = SAMPLE_MEMBERS
) -> Iterator[dict[str, Any]]:
    try:
        yield from group_by_key(tar_members(stream), url, require=require)
    except (tarfile.TarError, EOFError) as exc:
        raise ShardError(f"{storage.redact(url)}: not a readable tar: {exc}") from None


def read_shards(
    urls: Iterable[str],
    *,
    prefetch: int = 1,
    on_error: Callable[[str, Exception], None] | None = None,
    **open_kwargs,
) -> Iterator[dict[str, Any]]:
    """Samples of several shards in order, opening the next ``prefetch`` shards in the background (a remote open
    costs a round trip, tens of ms on S3, and the opened stream starts reading ahead), so the consumer never waits
    between shards. A shard that fails (OSError, ShardError) goes to ``on_error(url, exc)``, which may raise, or
    return to skip the rest of that shard; without it the error propagates."""
    todo = iter(urls)
    pending: deque = deque()
    pool = ThreadPoolExecutor(1, thread_name_prefix="shards-open")

    def open_next() -> None:
        url = next(todo, None)
        if url is not None:
            pending.append((url, pool.submit(storage.open_stream, url, **open_kwargs)))

    try:
        for _ in range(prefetch + 1):
            open_next()
        while pending:
            url, opened = pending.popleft()
            open_next()
            try:
                with opened.result() as stream:
                    yield from _stream_samples(stream, url)
            except (OSError, ShardError) as exc:
                if on_error is None:
                    raise
                on_error(url, exc)
    finally:  # stopped early: close the streams opened ahead
        for _, opened in pending:
            opened.add_done_callback(lambda f: f.exception() is None and f.result().close())
        pool.shutdown(wait=False)


def decode(sample: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``sample`` with ``"meta"`` = ``schema.decode_meta(sample["json"])`` (boxes int32 [N, 4])."""
    try:
        meta = schema.decode_meta(sample[schema.META_EXT])
    except (ValueError, TypeError) as exc:
        raise ShardError(
            f"{storage.redact(sample.get('__url__', '?'))}: sample {sample.get('__key__')!r}: bad metadata: {exc}"
        ) from None
    return {**sample, "meta": meta}
