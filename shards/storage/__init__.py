"""One small interface over where shards live: local paths, ``s3://bucket/prefix`` and ``http(s)://`` (read-only).

Writers need: list a prefix, atomic whole-object writes, read small files. Readers need: a byte stream that survives
transient network failures. Local writes go to a temporary name in the same directory and are renamed; remote writes
are single PUTs (an S3 object is never visible half-written).

This module is the front every caller uses (``from shards import storage``); it picks the backend by the URL's
scheme. Behind it, one module per concern: ``urls`` (the forms of a location), ``config`` (the command line's S3
endpoint and ``pipe:`` opt-in), ``local`` (temporary names, atomic files), ``s3``, ``http``, ``pipe``, and
``streams`` (resuming remote reads, read-ahead).

S3 goes through boto3 with the standard AWS credential chain (environment, profile); the endpoint of an S3-compatible
store comes from ``configure(endpoint_url=...)`` (the CLIs' flag), else ``S3_ENDPOINT_URL``, else ``AWS_ENDPOINT_URL``.
Error messages name the URL and the reason, never a credential. ``pipe:`` URLs run a shell command and are refused
unless enabled (``configure(allow_pipe=True)``, ``open_stream(..., allow_pipe=True)`` or ``SHARDS_ALLOW_PIPE=1``).
"""

from __future__ import annotations

import functools
import hashlib
import os
import tempfile
from types import TracebackType
from typing import Any, Protocol

from shards.storage import http, local, pipe, s3
from shards.storage.config import ALLOW_PIPE_ENV, configure, endpoint_url, pipe_allowed, settings
from shards.storage.local import atomic_file, sync, temp_file, temp_target
from shards.storage.streams import STREAM_BUFFER, StreamError, open_resuming
from shards.storage.urls import basename, is_remote, join, local_path, parent, redact, scheme

__all__ = [
    "ALLOW_PIPE_ENV",
    "STREAM_BUFFER",
    "Stream",
    "StreamError",
    "arrow_filesystem",
    "atomic_file",
    "basename",
    "configure",
    "endpoint_url",
    "exists",
    "is_remote",
    "join",
    "list_names",
    "local_path",
    "makedirs",
    "open_stream",
    "parent",
    "pipe_allowed",
    "put_file",
    "read_bytes",
    "redact",
    "remove",
    "scheme",
    "settings",
    "staging_dir",
    "sync",
    "temp_file",
    "temp_target",
    "write_bytes",
]


class Stream(Protocol):
    """What ``open_stream`` returns: a binary stream read forward, closed by its context manager."""

    def read(self, size: int = -1, /) -> bytes: ...

    def close(self) -> None: ...

    def __enter__(self) -> Stream: ...

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None, /
    ) -> None: ...


def _read_only(url: str, what: str) -> NotImplementedError:
    return NotImplementedError(
        f"{redact(url)}: cannot {what}, {scheme(url)} URLs are read-only (write to a local path or s3://)"
    )


def list_names(base: str) -> list[str]:
    """Names of the files (objects) directly under ``base``, sorted; empty when ``base`` does not exist locally."""
    kind = scheme(base)
    if kind == "s3":
        return s3.list_names(base)
    if kind != "file":
        raise NotImplementedError(
            f"{redact(base)}: {kind} has no listing; give a manifest.json, a brace pattern or the shard URLs"
        )
    return local.list_names(local_path(base))


def exists(url: str) -> bool:
    kind = scheme(url)
    if kind == "s3":
        return s3.exists(url)
    if kind in ("http", "https"):
        return http.exists(url)
    if kind == "pipe":
        raise NotImplementedError(f"{url!r}: a pipe: URL has no existence check")
    return os.path.exists(local_path(url))


def makedirs(base: str) -> None:
    # object stores have no directories: a prefix exists once an object is under it
    if not is_remote(base):
        os.makedirs(local_path(base), exist_ok=True)


def read_bytes(url: str) -> bytes:
    with open_stream(url) as f:
        return f.read()


def write_bytes(url: str, data: bytes) -> None:
    """Atomic: readers see the old content or the new, never a prefix."""
    kind = scheme(url)
    if kind == "s3":
        s3.write_bytes(url, data)
        return
    if kind != "file":
        raise _read_only(url, "write")
    with atomic_file(local_path(url)) as f:
        f.write(data)


def put_file(local_file: str, url: str) -> None:
    """Move a finished local file to ``url`` atomically (rename locally, upload remotely); ``local_file`` is consumed."""
    kind = scheme(url)
    if kind == "s3":
        s3.upload(local_file, url)
        local.unlink(local_file)
        return
    if kind != "file":
        raise _read_only(url, "upload")
    local.move(local_file, local_path(url))


def remove(url: str) -> None:
    """Delete if present."""
    kind = scheme(url)
    if kind == "s3":
        s3.remove(url)
        return
    if kind != "file":
        raise _read_only(url, "delete")
    local.unlink(local_path(url))


def staging_dir(base: str) -> str:
    """The local directory where files for ``base`` are built before ``put_file``: ``base`` itself when local (same
    filesystem, so ``put_file`` is a rename), else ``$TMPDIR/shards-staging/<hash of the URL>``, one per output, so
    the next run into the same output finds (and removes) the temporary files a killed one left. Not created here."""
    if not is_remote(base):
        return local_path(base)
    digest = hashlib.sha256(base.rstrip("/").encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), "shards-staging", digest)


def open_stream(
    url: str,
    *,
    retries: int = 5,
    backoff: float = 0.5,
    timeout: float = 30,
    readahead: int = 4,
    allow_pipe: bool | None = None,
) -> Stream:
    """A readable binary stream of the whole object, to be closed by the caller (a context manager).

    Remote streams survive transient failures (connection reset or refused, timeouts, HTTP 5xx/429, S3 throttling,
    a body that ends early): up to ``retries`` retries with exponential backoff from ``backoff`` seconds, each one
    resuming at the byte where the stream broke with a Range request, after checking that the object (ETag, size) did
    not change. Then ``StreamError`` naming the URL. Missing objects raise ``FileNotFoundError`` and refused access
    ``PermissionError`` at once. ``timeout`` bounds connecting and each read, in seconds. ``readahead``: MiB a
    background thread reads ahead of the consumer, so the network transfer overlaps the parsing (0: none)."""
    kind = scheme(url)
    if kind == "file":
        return open(local_path(url), "rb")
    if kind == "pipe":
        return pipe.open_pipe(url, allow_pipe)
    if kind == "s3":
        opener = functools.partial(s3.open_at, url, timeout=timeout)
    elif kind in ("http", "https"):
        opener = functools.partial(http.open_at, url, timeout=timeout)
    else:
        raise ValueError(f"{redact(url)}: unsupported URL scheme {kind!r} (local path, s3://, http(s)://, pipe:)")
    return open_resuming(url, opener, retries=retries, backoff=backoff, readahead=readahead)


def arrow_filesystem(url: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path inside it) for reading Parquet at ``url``."""
    import pyarrow.fs as pafs

    kind = scheme(url)
    if kind == "s3":
        return s3.arrow_filesystem(url)
    if kind != "file":
        raise NotImplementedError(f"{redact(url)}: Parquet can be read from local paths and s3:// only")
    return pafs.LocalFileSystem(), os.path.abspath(local_path(url))
