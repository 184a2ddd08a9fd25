"""Read shards as a pipeline of small generators: shard spec -> URLs -> byte stream -> tar members -> samples.

    shards = resolve("s3://bucket/coco/manifest.json")       # URLs and sample counts, resolved once
    for url in shards.urls:
        for sample in read_shard(url, on_reject=print):      # only valid samples; the rest go to on_reject
            sample["jpg"], sample["meta"]["boxes"]           # JPEG bytes, int32 [N, 4] xyxy

Each stage takes plain iterables, so it can be tested with a list: ``tar_members`` (a forward-only tar parser that
resynchronises after a damaged header), ``group_by_key`` (consecutive members -> samples), ``validate`` (the rule
of ``schema``: ``docs/format.md``, "What a reader accepts"). A sample that breaks the rule is skipped alone: it
becomes a ``Rejected`` (shard URL, key, reason, one-line message) and every good sample before and after it is
delivered. Only a shard that cannot be read as a tar (not a tar at all, cut short) raises ``ShardError`` (a
ValueError), after the samples read before the fault; a shard that cannot be opened raises OSError
(``FileNotFoundError``, ``PermissionError``, ``storage.StreamError``). Streams are read once, front to back, so a
remote shard never needs seeking; nothing is ever written.
"""

from __future__ import annotations

import fnmatch
import glob
import json
import os
import re
import tarfile
import warnings
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from shards import layout, schema, storage


class ShardError(ValueError):
    """A shard that cannot be read as a tar (not a tar, cut short), or a manifest that is not valid; the message
    names the URL."""


class SpecError(ValueError):
    """A shard spec that matches no shard, or names shards it may not (a manifest pointing elsewhere, ``pipe:``)."""


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


def _manifest_shards(url: str, allow_outside: bool) -> dict[str, int]:
    """{tar URL: samples} of a manifest. Tar names are relative to the manifest's location; an entry that leaves it
    (``schema.tar_entry_inside``) is a SpecError unless ``allow_outside``."""
    where = storage.redact(url)
    try:
        manifest = json.loads(storage.read_bytes(url))
        if not isinstance(manifest, dict):
            raise TypeError(f"a JSON {type(manifest).__name__}, not an object")
        version = manifest.get("format_version")
        if version not in schema.READABLE_VERSIONS:
            raise ValueError(f"format_version {version!r:.40}, this reader knows {schema.READABLE_VERSIONS}")
        base = storage.parent(url)
        sizes: dict[str, int] = {}
        for entry in manifest["shards"]:
            tar, samples = entry["tar"], entry["samples"]
            if not isinstance(tar, str) or not (isinstance(samples, int) and samples >= 0):
                raise TypeError(f"shard entry {entry!r:.200} needs a tar name and a sample count >= 0")
            if schema.tar_entry_inside(tar):
                sizes[storage.join(base, tar)] = samples
            elif allow_outside:
                sizes[tar if "://" in tar or os.path.isabs(tar) else storage.join(base, tar)] = samples
            else:
                raise SpecError(
                    f"{where}: shard entry {tar!r:.200} is not a name inside the manifest's own directory or prefix "
                    "(absolute paths, '.' and '..' parts and other URLs are refused); pass --allow-manifest-outside "
                    "to read it anyway"
                )
        return sizes
    except SpecError:
        raise
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        detail = f"no {exc}" if isinstance(exc, KeyError) else str(exc)[:300]
        raise ShardError(f"{where}: not a valid manifest: {detail}") from None


def _is_output(spec: str) -> bool:
    """Whether ``spec`` names an output as ``prep --out`` takes it: a local directory or an ``s3://bucket/prefix``,
    with or without a trailing slash (or any URL prefix ending in ``/``). Not a brace pattern, glob or file."""
    kind = storage.scheme(spec)
    if "{" in spec or _is_glob(spec) or kind == "pipe" or spec.endswith(schema.TAR_SUFFIX):
        return False
    if kind == "file":
        return spec.endswith("/") or os.path.isdir(storage.local_path(spec))
    return spec.endswith("/") or (kind == "s3" and storage.basename(spec) != schema.MANIFEST_NAME)


@dataclass(frozen=True)
class Shards:
    """A shard spec resolved once (``resolve``): its shard URLs, sorted, and their sample counts where known (from
    the manifest or the stats files; None when a count is unknown: then readers count by reading)."""

    spec: str
    urls: tuple[str, ...]
    sizes: Mapping[str, int] | None


def resolve(
    spec: str, *, sizes: bool = True, allow_manifest_outside: bool = False, allow_pipe: bool | None = None
) -> Shards:
    """A spec -> its ``Shards``, reading the manifest or listing the prefix once: an output as ``prep --out`` took it
    (a directory or ``s3://bucket/prefix``, with or without a trailing slash: the shards of its ``manifest.json``
    when it has one, else its ``*.tar``), a brace pattern (``out/coco-{000000..000099}.tar``), a glob (``out/*.tar``,
    also on s3), a ``manifest.json`` (local or URL), or one shard path/URL.

    ``sizes``: without a manifest, read each shard's stats file for its count (one GET per shard remotely); False
    leaves them unknown. ``allow_manifest_outside``: follow manifest entries outside its own location. ``allow_pipe``:
    as ``storage.open_stream``'s. Raises SpecError when nothing matched, when none of the local paths exists, for
    ``pipe:`` URLs that are not allowed and for manifest entries outside it; ShardError for an invalid manifest;
    OSError when the manifest or listing cannot be read."""
    spec = spec.strip()
    kind = storage.scheme(spec)
    where = storage.redact(spec)
    counts: dict[str, int] | None = None
    listing: list[str] | None = None
    manifest: str | None = None
    if storage.basename(spec) == schema.MANIFEST_NAME and "{" not in spec:
        manifest = spec
    elif _is_output(spec):
        listing = storage.list_names(spec)
        if schema.MANIFEST_NAME in listing:
            manifest = storage.join(spec, schema.MANIFEST_NAME)
    if manifest is not None:
        counts = _manifest_shards(manifest, allow_manifest_outside)
        urls = list(counts)
    elif listing is not None:
        urls = [storage.join(spec, n) for n in layout.tars(listing)]
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
    elif spec.endswith(schema.TAR_SUFFIX):
        if kind == "file" and not os.path.isfile(storage.local_path(spec)):
            raise SpecError(f"no shards matched {where!r}: no such file")
        urls = [spec]
    else:
        raise SpecError(
            f"{where!r} is not a shard spec: give a directory, an s3:// prefix, a URL prefix ending in '/', a brace "
            f"pattern, a glob, a {schema.MANIFEST_NAME} or a .tar"
        )
    urls = sorted(set(urls))
    if not urls:
        raise SpecError(f"no shards matched {where!r}")
    local = [u for u in urls if storage.scheme(u) == "file"]
    if local and not any(os.path.exists(storage.local_path(u)) for u in local):
        # a brace pattern (or a manifest) names files without looking at the disk: none of them exists
        raise SpecError(f"no shards matched {where!r}: none of the {len(local)} paths it names exists")
    if not storage.pipe_allowed(allow_pipe) and any(storage.scheme(u) == "pipe" for u in urls):
        # refused here, not per shard: each would only be skipped as a bad shard
        raise SpecError(f"{where!r}: pipe: URLs run a shell command; pass --allow-pipe to use them")
    if counts is None and sizes:
        counts = _stats_sizes(urls)
    return Shards(spec, tuple(urls), None if counts is None else {u: counts[u] for u in urls})


def _stats_sizes(urls: list[str]) -> dict[str, int] | None:
    """Samples per shard from each ``NAME.stats.json``; None when one is missing or unreadable (warned about)."""
    sizes = {}
    for url in urls:
        if not url.endswith(schema.TAR_SUFFIX) or storage.scheme(url) == "pipe":
            return None
        stats_url = layout.sibling(url, schema.STATS_SUFFIX)
        try:
            samples = json.loads(storage.read_bytes(stats_url))["samples"]
            if not (isinstance(samples, int) and samples >= 0):
                raise ValueError(f"samples = {samples!r:.40}")
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError, RecursionError) as e:
            warnings.warn(
                f"{storage.redact(stats_url)}: not a valid stats file ({type(e).__name__}: {e}); the sample counts "
                "are found by reading the shards",
                RuntimeWarning,
                stacklevel=3,
            )
            return None
        sizes[url] = samples
    return sizes


def expand_spec(spec: str, **kwargs: Any) -> list[str]:
    """The shard URLs of ``resolve(spec, sizes=False, **kwargs)``."""
    return list(resolve(spec, sizes=False, **kwargs).urls)


# --- stream -> members ------------------------------------------------------------------------------------------------
_BLOCK = tarfile.BLOCKSIZE
_ZEROS = bytes(_BLOCK)
_REGULAR = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)
# Types without data after their header (their size field is ignored, as tarfile does); any other type has data.
_NO_DATA = {
    tarfile.LNKTYPE: "hard link",
    tarfile.SYMTYPE: "symbolic link",
    tarfile.CHRTYPE: "character device",
    tarfile.BLKTYPE: "block device",
    tarfile.DIRTYPE: "directory",
    tarfile.FIFOTYPE: "FIFO",
}
# Headers that describe the next member (PAX, GNU long names) or the archive; their own data is small.
_EXTENDED = (
    tarfile.XHDTYPE,
    tarfile.SOLARIS_XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
)
EXTENDED_MAX_BYTES = 1 << 16


@dataclass(frozen=True)
class Member:
    """One entry of a tar: ``name`` and ``data`` (a regular file within its size limit); or ``data`` None and
    ``problem`` saying why (not a regular file, over its limit); or ``name`` None for a damaged stretch of the tar
    (``problem`` says where). ``offset``: of its header (of the stretch) in the tar."""

    name: str | None
    data: bytes | None
    offset: int
    problem: str | None = None


def member_limit(name: str) -> int:
    """The most bytes a member may hold and still be read: ``KEY.json``'s limit for metadata, ``KEY.jpg``'s for any
    other member (a larger one is skipped, never held in memory)."""
    return schema.META_MAX_BYTES if name.lower().endswith("." + schema.META_EXT) else schema.IMAGE_MAX_BYTES


class _Source:
    """Exact reads from a forward-only stream, counting the offset."""

    def __init__(self, stream: storage.Stream):
        self._stream, self.offset = stream, 0

    def read(self, n: int) -> bytes:
        """``n`` bytes, fewer only at the end of the stream. Large reads go in chunks: a buffered file allocates what
        it is asked for up front, and a declared size may be far larger than the file."""
        parts = []
        left = n
        while left > 0:
            part = self._stream.read(min(left, storage.STREAM_BUFFER))  # a raw stream may return less than asked
            if not part:
                break
            parts.append(part)
            left -= len(part)
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        self.offset += len(data)
        return data

    def skip(self, n: int) -> int:
        """Read past ``n`` bytes in chunks (a huge declared size costs no memory); returns how many there were."""
        done = 0
        while done < n:
            chunk = self.read(min(n - done, storage.STREAM_BUFFER))
            if not chunk:
                break
            done += len(chunk)
        return done


def _padded(size: int) -> int:
    return -(-size // _BLOCK) * _BLOCK


def _pax_records(data: bytes) -> dict[str, str]:
    """``LENGTH key=value\\n`` records of a PAX header; ValueError when malformed."""
    records, pos = {}, 0
    while pos < len(data):
        space = data.find(b" ", pos, pos + 20)
        if space < 0 or not data[pos:space].isdigit():
            raise ValueError(f"malformed PAX record at byte {pos}")
        end = pos + int(data[pos:space])
        if end <= space + 1 or end > len(data) or data[end - 1 : end] != b"\n":
            raise ValueError(f"malformed PAX record at byte {pos}")
        name, eq, value = data[space + 1 : end - 1].partition(b"=")
        if not eq:
            raise ValueError(f"malformed PAX record at byte {pos}")
        records[name.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos = end
    return records


def tar_members(stream: storage.Stream, limit: Callable[[str], int] = member_limit) -> Iterator[Member]:
    """The members of a tar stream in order, reading forward only; never extracts anything.

    USTAR, PAX and GNU headers (long names, PAX ``path`` and ``size``). A block that is not a valid header where one
    is due (a bad checksum, zero blocks followed by data) starts a damaged stretch: the following blocks are tried
    until one is a valid header, and the stretch is yielded as a ``Member`` with ``name`` None, so one damaged header
    costs its own member, not the rest of the shard. Members other than regular files, and members over
    ``limit(name)`` bytes, come with ``problem`` set and their data skipped. Zero blocks end the archive when nothing
    but zeros follows them (the end-of-archive marker, two zero blocks, and record padding); followed by data they are
    a damaged stretch too, and reading goes on. Raises ``tarfile.ReadError`` when the stream ends before the
    end-of-archive marker, after the members before the cut."""
    src = _Source(stream)
    damaged: int | None = None  # where a stretch without a valid header began
    name_ext: str | None = None  # the next member's name from a PAX or GNU long-name header
    size_ext: int | None = None  # its size from a PAX header
    bad_ext: str | None = None  # why the extended header before the next member is unusable
    carried: bytes | None = None  # the block read after a run of zero blocks, still to be looked at

    def cut(at: int, where: str) -> tarfile.ReadError:
        if damaged is not None:
            return tarfile.ReadError(
                f"no valid tar header in the {src.offset - damaged} bytes from byte {damaged} to the end, and no "
                "end-of-archive marker"
            )
        if src.offset == 0:
            return tarfile.ReadError("empty file")
        return tarfile.ReadError(f"truncated archive: no end-of-archive marker (cut {where} at byte {at})")

    def stretch(end: int) -> Member:
        assert damaged is not None
        return Member(
            None, None, damaged, f"{end - damaged} bytes at byte {damaged} hold no valid tar header (skipped)"
        )

    while True:
        if carried is not None:
            at, block, carried = src.offset - _BLOCK, carried, None
        else:
            at, block = src.offset, src.read(_BLOCK)
        if len(block) < _BLOCK:
            raise cut(at, "before a header" if not block else "inside a header")
        if block == _ZEROS:
            zeros = 1  # a run of zero blocks: the end-of-archive marker and record padding when only zeros follow
            while (following := src.read(_BLOCK)) == _ZEROS:
                zeros += 1
            if following.count(0) == len(following):  # the end of the stream (a zero tail shorter than a block)
                if zeros < 2:
                    raise cut(at, "inside the end-of-archive marker")
                if damaged is not None:
                    yield stretch(at)
                return
            # zeros where a header is due, then data: a zeroed region of the tar (or a second archive appended)
            damaged = at if damaged is None else damaged
            if len(following) < _BLOCK:
                yield stretch(src.offset)
                raise cut(src.offset, "inside a header")
            carried = following
            continue
        try:
            info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
            if info.size < 0:
                raise ValueError("negative size")
        except (tarfile.HeaderError, ValueError):
            damaged = at if damaged is None else damaged
            name_ext = size_ext = bad_ext = None  # what an extended header said may not be about what follows
            continue
        if damaged is not None:
            yield stretch(at)
            damaged = None
        size, kind = info.size, info.type
        if kind in _EXTENDED:
            padded = _padded(size)
            if size > EXTENDED_MAX_BYTES:
                if src.skip(padded) < padded:
                    raise cut(src.offset, "inside an extended header")
                name_ext, size_ext, bad_ext = None, None, f"its extended header holds {size} bytes, over the limit"
                continue
            data = src.read(padded)
            if len(data) < padded:
                raise cut(src.offset, "inside an extended header")
            data = data[:size]
            if kind in (tarfile.XHDTYPE, tarfile.SOLARIS_XHDTYPE):
                try:
                    records = _pax_records(data)
                    if "size" in records:
                        if not records["size"].isdigit():
                            raise ValueError(f"PAX size {records['size']!r:.40}")
                        size_ext = int(records["size"])
                    name_ext = records.get("path", name_ext)
                except ValueError as e:
                    bad_ext = f"its PAX header is not valid ({e})"
            elif kind == tarfile.GNUTYPE_LONGNAME:
                name_ext = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            continue  # a global PAX header or a GNU long link name: nothing a sample uses
        name = info.name if name_ext is None else name_ext
        size = size if size_ext is None else size_ext
        problem, name_ext, size_ext, bad_ext = bad_ext, None, None, None
        if kind in _NO_DATA:
            yield Member(name, None, at, problem or f"a {_NO_DATA[kind]}, not a regular file")
            continue
        padded = _padded(size)
        if problem is None and kind not in _REGULAR:
            problem = f"of tar type {kind!r}, not a regular file"
        if problem is None and size > limit(name):
            problem = f"{size} bytes, over the limit of {limit(name)}"
        if problem is not None:
            if src.skip(padded) < padded:
                raise cut(src.offset, f"inside member {name!r:.100}")
            yield Member(name, None, at, problem)
            continue
        data = src.read(size)
        if len(data) < size:
            raise cut(src.offset, f"inside member {name!r:.100}")
        yield Member(name, data, at)
        if len(src.read(padded - size)) < padded - size:
            raise cut(src.offset, f"inside the padding of member {name!r:.100}")


# --- members -> samples -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Rejected:
    """A sample, or a stretch of a tar, that breaks the rule of ``docs/format.md`` and is skipped alone: ``reason`` is
    a key of ``schema.INVALID_REASONS``, ``detail`` what is wrong; ``key`` None for a damaged stretch that names no
    sample. ``message``: all of it in one line naming the shard and the key."""

    url: str
    key: str | None
    reason: str
    detail: str

    @property
    def message(self) -> str:
        where = "tar" if self.key is None else f"sample {self.key!r:.100}"
        return f"{storage.redact(self.url)}: {where}: {self.detail}"


def split_name(name: str) -> tuple[str, str] | None:
    """``dir/KEY.ext.more`` -> (``dir/KEY``, ``ext.more``): the extension starts at the first dot of the file name,
    as in WebDataset, lower case; None for a name without one."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem:
        return None
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def group_by_key(members: Iterable[Member], url: str) -> Iterator[dict[str, Any] | Rejected]:
    """Consecutive members sharing a key -> a sample ``{"__key__", "__url__", "jpg": bytes, "json": bytes}`` when
    they are exactly one regular ``KEY.jpg`` and one ``KEY.json`` under a valid key seen for the first time in the
    shard; else a ``Rejected`` (reported once per key: later pieces of a rejected key add nothing). A damaged
    stretch is a ``Rejected`` of its own. When the members end in an error, the complete sample read before it is
    still yielded, then the error raised."""
    outcome: dict[str, bool] = {}  # key -> delivered (True) or rejected (False), in this shard
    key: str | None = None
    group: list[tuple[str, Member]] = []

    def close() -> dict[str, Any] | Rejected | None:
        if key is None:
            return None
        item = _sample(url, key, group, outcome.get(key))
        if key not in outcome:
            outcome[key] = isinstance(item, dict)
        return item

    try:
        for m in members:
            if m.name is None:  # a damaged stretch is no member: the sample around it may still be whole
                yield Rejected(url, None, "damaged_tar", m.problem or "damaged")
                continue
            key_ext = split_name(m.name)
            k, ext = key_ext if key_ext is not None else (m.name, "")
            if k != key:
                item = close()
                if item is not None:
                    yield item
                key, group = k, []
            group.append((ext, m))
        item = close()
        if item is not None:
            yield item
    except Exception:
        item = close()
        if isinstance(item, dict):  # complete before the fault: its bytes are all there
            yield item
        raise


def _sample(
    url: str, key: str, group: list[tuple[str, Member]], before: bool | None
) -> dict[str, Any] | Rejected | None:
    """One key's consecutive members -> its sample or why not; ``before``: the outcome of an earlier group of the
    same key in this shard (None: first time)."""
    if before is False:
        return None  # more of a sample already rejected: reported once
    first = group[0][1]
    if before:
        return Rejected(url, key, "duplicate_member", f"appears again at byte {first.offset} (each key once per shard)")
    names = [m.name for _, m in group]
    if not schema.is_valid_key(key) or any(not ext for ext, _ in group):
        return Rejected(
            url,
            key,
            "bad_name",
            f"member name {names[0]!r:.100} is not KEY.{schema.IMAGE_EXT} / KEY.{schema.META_EXT} with a valid key "
            "(letters, digits, '_' and '-': no folders, dots, absolute or '..' paths)",
        )
    for _, m in group:
        if m.problem is not None:
            return Rejected(url, key, "bad_member", f"{m.name!r:.100} is {m.problem}")
    exts = [ext for ext, _ in group]
    for ext in exts:
        if exts.count(ext) > 1:
            return Rejected(url, key, "duplicate_member", f"has {exts.count(ext)} {key}.{ext} members")
        if ext not in schema.SAMPLE_MEMBERS:
            return Rejected(
                url,
                key,
                "unexpected_member",
                f"has a member {key}.{ext} besides {key}.{schema.IMAGE_EXT} and {key}.{schema.META_EXT}",
            )
    missing = [f"{key}.{ext}" for ext in schema.SAMPLE_MEMBERS if ext not in exts]
    if missing:
        return Rejected(url, key, "missing_member", "has no " + " and no ".join(missing))
    sample: dict[str, Any] = {"__key__": key, "__url__": url}
    sample.update((ext, m.data) for ext, m in group)
    return sample


def validate(
    items: Iterable[dict[str, Any] | Rejected], *, verify_images: bool = False
) -> Iterator[dict[str, Any] | Rejected]:
    """Samples of ``group_by_key`` -> the same with ``"meta"`` (``schema.decode_meta``: boxes int32 [N, 4]) when
    their KEY.json follows the rule, else a ``Rejected``; Rejected items pass. ``verify_images``: a JPEG whose
    SHA-256 is not the one its KEY.json records is rejected too (format version 1 records none: not checked)."""
    for item in items:
        if isinstance(item, Rejected):
            yield item
            continue
        key = item["__key__"]
        try:
            meta = schema.decode_meta(item[schema.META_EXT], key=key)
            want = meta["image_sha256"]
            if verify_images and want is not None and schema.image_sha256(item[schema.IMAGE_EXT]) != want:
                raise schema.InvalidSample(
                    "image_sha256",
                    f"{key}.{schema.IMAGE_EXT} does not have the SHA-256 recorded in {key}.{schema.META_EXT} "
                    "(damaged in storage)",
                )
        except schema.InvalidSample as e:
            yield Rejected(item["__url__"], key, e.reason, str(e))
            continue
        yield {**item, "meta": meta}


def accepted(
    items: Iterable[dict[str, Any] | Rejected], on_reject: Callable[[Rejected], None] | None
) -> Iterator[dict[str, Any]]:
    """The samples among ``items``; each ``Rejected`` goes to ``on_reject`` (which may raise), or, without one, is
    raised as a ShardError."""
    for item in items:
        if isinstance(item, Rejected):
            if on_reject is None:
                raise ShardError(item.message)
            on_reject(item)
        else:
            yield item


def shard_items(
    stream: storage.Stream, url: str, *, verify_images: bool = False
) -> Generator[dict[str, Any] | Rejected, None, None]:
    """Valid samples and ``Rejected`` items of one shard's stream, in tar order; ShardError naming ``url`` when it
    cannot be read as a tar (after the items before the fault)."""
    try:
        yield from validate(group_by_key(tar_members(stream), url), verify_images=verify_images)
    except tarfile.ReadError as exc:
        raise ShardError(f"{storage.redact(url)}: not a readable tar: {exc}") from None


def read_shard(
    url: str,
    *,
    on_reject: Callable[[Rejected], None] | None = None,
    verify_images: bool = False,
    **open_kwargs: Any,
) -> Generator[dict[str, Any], None, None]:
    """Valid samples of one shard, with ``"meta"``; every other one goes to ``on_reject`` (``accepted``) and costs
    nothing else. ``open_kwargs`` go to ``storage.open_stream`` (retries, backoff, timeout, allow_pipe). The stream
    is closed when the generator is exhausted or closed early."""
    with storage.open_stream(url, **open_kwargs) as stream:
        yield from accepted(shard_items(stream, url, verify_images=verify_images), on_reject)


def read_shards(
    urls: Iterable[str],
    *,
    prefetch: int = 1,
    on_error: Callable[[str, Exception], None] | None = None,
    on_reject: Callable[[Rejected], None] | None = None,
    **open_kwargs: Any,
) -> Iterator[dict[str, Any]]:
    """Valid samples of several shards in order, opening the next ``prefetch`` shards in the background (a remote
    open costs a round trip, tens of ms on S3, and the opened stream starts reading ahead), so the consumer never
    waits between shards. Invalid samples go to ``on_reject`` as in ``read_shard``. A shard that fails (OSError,
    ShardError) goes to ``on_error(url, exc)``, which may raise, or return to skip the rest of that shard; without
    it the error propagates."""
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
                    yield from accepted(shard_items(stream, url), on_reject)
            except (OSError, ShardError) as exc:
                if on_error is None:
                    raise
                on_error(url, exc)
    finally:  # stopped early: close the streams opened ahead
        for _, opened in pending:
            opened.add_done_callback(lambda f: f.exception() is None and f.result().close())
        pool.shutdown(wait=False)
