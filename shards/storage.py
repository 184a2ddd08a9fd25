"""One small interface over where shards live: local paths, ``s3://bucket/prefix`` and ``http(s)://`` (read-only).

Writers need: list a prefix, atomic whole-object writes, read small files. Readers need: a byte stream that survives
transient network failures. Local writes go to a temporary name in the same directory and are renamed; remote writes
are single PUTs (an S3 object is never visible half-written).

S3 goes through boto3 with the standard AWS credential chain (environment, profile); the endpoint of an S3-compatible
store comes from ``configure(endpoint_url=...)`` (the CLIs' flag), else ``S3_ENDPOINT_URL``, else ``AWS_ENDPOINT_URL``.
Error messages name the URL and the reason, never a credential. ``pipe:`` URLs run a shell command and are refused
unless enabled (``configure(allow_pipe=True)``, ``open_stream(..., allow_pipe=True)`` or ``SHARDS_ALLOW_PIPE=1``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import os
import queue
import re
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import BinaryIO
from urllib.parse import urlsplit

_config = {"endpoint_url": None, "allow_pipe": False}
ALLOW_PIPE_ENV = "SHARDS_ALLOW_PIPE"
# Chunk size of remote reads: large enough that per-call overhead is negligible.
STREAM_BUFFER = 1 << 20


class StreamError(OSError):
    """A remote read that could not be completed: retries exhausted, or the object changed while being read."""


class _Transient(OSError):
    """A failure worth retrying (5xx, throttling, a stream that ended early)."""


def configure(*, endpoint_url: str | None = None, allow_pipe: bool = False) -> None:
    """Process-wide settings from the command line; replaces earlier ones (``configure()`` restores the defaults).

    endpoint_url: S3 API endpoint of an S3-compatible store (``None``: the environment's, else AWS).
    allow_pipe: accept ``pipe:`` URLs in ``open_stream`` (they run a shell command)."""
    _config.update(endpoint_url=endpoint_url or None, allow_pipe=bool(allow_pipe))


def settings() -> dict:
    """The current ``configure`` settings, for processes that do not inherit them (spawned workers):
    ``configure(**settings())`` there repeats them."""
    return dict(_config)


def endpoint_url() -> str | None:
    return _config["endpoint_url"] or os.environ.get("S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL") or None


# --- URLs ------------------------------------------------------------------------------------------------------------
def is_remote(url: str) -> bool:
    return ("://" in url and not url.startswith("file://")) or url.startswith("pipe:")


def local_path(url: str) -> str:
    return url[len("file://") :] if url.startswith("file://") else url


def scheme(url: str) -> str:
    """``s3``, ``http``, ``https``, ``pipe`` or ``file`` (local paths)."""
    if url.startswith("pipe:"):
        return "pipe"
    return url.split("://", 1)[0].lower() if is_remote(url) else "file"


def join(base: str, *names: str) -> str:
    if is_remote(base):
        return "/".join([base.rstrip("/"), *names])
    return os.path.join(local_path(base), *names)


def basename(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def parent(url: str) -> str:
    """The directory or prefix holding ``url`` (what relative names in a manifest are relative to)."""
    if is_remote(url):
        return url.rstrip("/").rsplit("/", 1)[0]
    return os.path.dirname(local_path(url)) or "."


def redact(url: str) -> str:
    """``url`` safe to print: no ``user:password@`` and no query string (pre-signed URLs carry signatures there)."""
    if not is_remote(url) or url.startswith("pipe:"):
        return url
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return f"{parts.scheme}://{netloc}{parts.path}" + ("?…" if parts.query else "")


def _s3_split(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    if not parts.netloc:
        raise ValueError(f"{url!r}: an S3 URL needs a bucket (s3://bucket/key)")
    return parts.netloc, parts.path.lstrip("/")


def _read_only(url: str, what: str) -> NotImplementedError:
    return NotImplementedError(
        f"{redact(url)}: cannot {what}, {scheme(url)} URLs are read-only (write to a local path or s3://)"
    )


# --- the storage API -------------------------------------------------------------------------------------------------
def list_names(base: str) -> list[str]:
    """Names of the files (objects) directly under ``base``, sorted; empty when ``base`` does not exist locally."""
    kind = scheme(base)
    if kind == "s3":
        bucket, key = _s3_split(base)
        prefix = key.rstrip("/") + "/" if key.strip("/") else ""
        names = []
        with _s3_errors(base):
            pages = _s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/")
            for page in pages:
                names += [obj["Key"][len(prefix) :] for obj in page.get("Contents", [])]
        return sorted(n for n in names if n)
    if kind != "file":
        raise NotImplementedError(
            f"{redact(base)}: {kind} has no listing; give a manifest.json, a brace pattern or the shard URLs"
        )
    path = local_path(base)
    if not os.path.isdir(path):
        return []
    return sorted(n for n in os.listdir(path) if os.path.isfile(os.path.join(path, n)))


def exists(url: str) -> bool:
    kind = scheme(url)
    if kind == "s3":
        bucket, key = _s3_split(url)
        try:
            with _s3_errors(url):
                _s3_client().head_object(Bucket=bucket, Key=key)
        except FileNotFoundError:
            return False
        return True
    if kind in ("http", "https"):
        import requests

        try:
            resp = _http_session().head(url, allow_redirects=True, timeout=30)
        except requests.RequestException as exc:
            raise OSError(f"{redact(url)}: {_describe(exc)}") from None
        if resp.status_code == 404:
            return False
        _check_http_status(resp.status_code, url)
        return True
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


# A file being written is named ``.{final name}.{random}.tmp`` beside (or staged for) its final name: the leading dot
# keeps it out of every listing of shards, and the final name in it tells which shard a leftover belongs to.
_TEMP_RE = re.compile(r"^\.(?P<final>.+)\.[^.]+\.tmp$")


def temp_target(name: str) -> str | None:
    """The final name a temporary file ``name`` (``temp_file``) was being written for; None for any other name."""
    m = _TEMP_RE.match(name)
    return m.group("final") if m else None


def temp_file(directory: str, name: str) -> tuple[BinaryIO, str]:
    """(binary file open for writing, its path): a new temporary file for the final name ``name`` in ``directory``
    (``.{name}.{random}.tmp``), with the permissions any new file gets there (0666 less the umask, default ACLs
    applied), unlike ``tempfile.mkstemp``'s 0600, which a rename would carry over to the final name and lock other
    users out of the output."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    for _ in range(100):
        path = os.path.join(directory, f".{name}.{secrets.token_hex(6)}.tmp")
        try:
            fd = os.open(path, flags, 0o666)  # the kernel applies the umask, as for any new file
        except FileExistsError:
            continue
        return os.fdopen(fd, "wb"), path
    raise FileExistsError(f"{directory}: no free temporary name for {name} after 100 tries")


@contextlib.contextmanager
def atomic_file(path: str) -> Iterator[BinaryIO]:
    """Write a local file atomically: yields a binary file (``temp_file`` beside ``path``), flushed to disk and
    renamed to ``path`` when the block ends; an exception removes it and leaves ``path`` as it was. The one way this
    project writes a whole local file (shard files, run config, manifest, checkpoints, the training config)."""
    f, tmp = temp_file(os.path.dirname(path) or ".", os.path.basename(path))
    try:
        with f:
            yield f
            sync(f)
        os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise


def sync(f: BinaryIO) -> None:
    """Flush ``f`` to disk: before a rename, so that after a power loss the new name never points at unwritten
    blocks."""
    f.flush()
    os.fsync(f.fileno())


def write_bytes(url: str, data: bytes) -> None:
    """Atomic: readers see the old content or the new, never a prefix."""
    kind = scheme(url)
    if kind == "s3":
        bucket, key = _s3_split(url)
        with _s3_errors(url):
            _s3_client().put_object(Bucket=bucket, Key=key, Body=data)
        return
    if kind != "file":
        raise _read_only(url, "write")
    with atomic_file(local_path(url)) as f:
        f.write(data)


def put_file(local_file: str, url: str) -> None:
    """Move a finished local file to ``url`` atomically (rename locally, upload remotely); ``local_file`` is consumed."""
    kind = scheme(url)
    if kind == "s3":
        bucket, key = _s3_split(url)
        # upload_file switches to a multipart upload for big files: S3 shows the object only once the upload
        # completes, so it still appears whole or not at all
        with _s3_errors(url):
            _s3_client().upload_file(local_file, bucket, key)
        _unlink(local_file)
        return
    if kind != "file":
        raise _read_only(url, "upload")
    dst = local_path(url)
    try:
        os.replace(local_file, dst)
    except OSError:  # another filesystem: copy beside the destination, then rename
        with atomic_file(dst) as f, open(local_file, "rb") as src:
            shutil.copyfileobj(src, f)
        _unlink(local_file)


def remove(url: str) -> None:
    """Delete if present."""
    kind = scheme(url)
    if kind == "s3":
        bucket, key = _s3_split(url)
        with _s3_errors(url):
            _s3_client().delete_object(Bucket=bucket, Key=key)  # S3 deletes are idempotent
        return
    if kind != "file":
        raise _read_only(url, "delete")
    _unlink(local_path(url))


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
) -> BinaryIO:
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
        return _open_pipe(url, allow_pipe)
    if kind == "s3":
        opener = functools.partial(_s3_open_at, url, timeout=timeout)
    elif kind in ("http", "https"):
        opener = functools.partial(_http_open_at, url, timeout=timeout)
    else:
        raise ValueError(f"{redact(url)}: unsupported URL scheme {kind!r} (local path, s3://, http(s)://, pipe:)")
    raw = _ResumingStream(url, opener, retries=retries, backoff=backoff)
    return _Readahead(raw, readahead) if readahead > 0 else io.BufferedReader(raw, STREAM_BUFFER)


def arrow_filesystem(url: str):
    """(pyarrow filesystem, path inside it) for reading Parquet at ``url``."""
    import pyarrow.fs as pafs

    kind = scheme(url)
    if kind == "s3":
        bucket, key = _s3_split(url)
        # the credentials boto3 resolves (env, profile, SSO...) so both layers use the same identity
        session = _boto_session()
        kwargs = {"region": session.region_name or "us-east-1"}
        creds = session.get_credentials()
        if creds is not None:
            frozen = creds.get_frozen_credentials()
            kwargs.update(access_key=frozen.access_key, secret_key=frozen.secret_key, session_token=frozen.token)
        endpoint = endpoint_url()
        if endpoint:
            parts = urlsplit(endpoint)
            kwargs.update(endpoint_override=parts.netloc, scheme=parts.scheme or "https")
        return pafs.S3FileSystem(**kwargs), f"{bucket}/{key}"
    if kind != "file":
        raise NotImplementedError(f"{redact(url)}: Parquet can be read from local paths and s3:// only")
    return pafs.LocalFileSystem(), os.path.abspath(local_path(url))


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


# --- resuming remote streams -----------------------------------------------------------------------------------------
# An opener is ``open_at(offset) -> (body, total_size, etag)``; body has read(n) and close().
Opener = Callable[[int], tuple]


class _ResumingStream(io.RawIOBase):
    """Raw stream over a remote object that reopens at the current offset after a transient failure."""

    def __init__(self, url: str, open_at: Opener, *, retries: int, backoff: float):
        self.url, self._open_at, self._retries, self._backoff = url, open_at, retries, backoff
        self._pos = 0
        self._body = None
        self._size = self._etag = None
        self._with_retries(self._ensure_open)  # fail at open time for a missing object or refused access

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)

    def read(self, size: int = -1) -> bytes:
        # bytes straight from the body, no copy through a buffer (the readahead thread calls this)
        if size is None or size < 0:
            return b"".join(iter(lambda: self.read(STREAM_BUFFER), b""))
        return self._with_retries(lambda: self._read_once(size))

    def close(self) -> None:
        self._drop_body()
        super().close()

    def _ensure_open(self) -> None:
        if self._body is not None:
            return
        body, size, etag = self._open_at(self._pos)
        if self._size is None:
            self._size, self._etag = size, etag
        elif size != self._size or (etag and self._etag and etag != self._etag):
            body.close()
            raise StreamError(f"{redact(self.url)}: the object changed while being read (size or ETag differs)")
        self._body = body

    def _read_once(self, size: int) -> bytes:
        self._ensure_open()
        data = self._body.read(size)
        if not data and self._size is not None and self._pos < self._size:
            raise _Transient(f"stream ended at byte {self._pos} of {self._size}")
        self._pos += len(data)
        return data

    def _with_retries(self, step):
        failures = 0  # per call: a read that makes progress earns a fresh budget
        while True:
            try:
                return step()
            except _transient_errors() as exc:
                self._drop_body()
                failures += 1
                if failures > self._retries:
                    raise StreamError(
                        f"{redact(self.url)}: giving up after {failures} tries at byte {self._pos}: {_describe(exc)}"
                    ) from None
                time.sleep(min(self._backoff * 2 ** (failures - 1), 30.0))

    def _drop_body(self) -> None:
        if self._body is not None:
            with contextlib.suppress(Exception):
                self._body.close()
            self._body = None


class _Readahead(io.RawIOBase):
    """Reads ``raw`` in a background thread, up to ``depth`` chunks ahead of the consumer (socket reads release the
    GIL, so bytes keep arriving while the consumer parses). The consumer gets the reader's exceptions."""

    def __init__(self, raw: io.RawIOBase, depth: int):
        self._chunks: queue.Queue = queue.Queue(depth)
        self._stop = threading.Event()
        self._left = memoryview(b"")
        self._eof = False
        # the thread holds no reference to self: a stream dropped without close() is collected, and closing it stops
        # the thread
        threading.Thread(target=_read_ahead, args=(raw, self._chunks, self._stop), daemon=True).start()

    def readable(self) -> bool:
        return True

    def _fill(self) -> bool:
        """True when bytes are ready in ``_left``; waits for the next chunk; raises what the reader raised."""
        if not self._left and not self._eof:
            item = self._chunks.get()
            if isinstance(item, BaseException):
                self._eof = True
                raise item
            self._eof = not item
            self._left = memoryview(item)
        return bool(self._left)

    def read(self, size: int = -1) -> bytes:
        # full reads like a BufferedReader (callers may expect them), sliced from the chunks without a buffer copy
        if size is None or size < 0:
            return self.readall()
        parts = []
        while size > 0 and self._fill():
            part = self._left[:size]
            self._left = self._left[len(part) :]
            parts.append(part)
            size -= len(part)
        return b"".join(parts)

    def readinto(self, buf) -> int:
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)

    def readall(self) -> bytes:
        parts = []
        while self._fill():
            parts.append(self._left)
            self._left = memoryview(b"")
        return b"".join(parts)

    def close(self) -> None:
        self._stop.set()
        super().close()


def _read_ahead(raw: io.RawIOBase, chunks: queue.Queue, stop: threading.Event) -> None:
    def put(item) -> None:
        while not stop.is_set():  # a closed consumer takes no more chunks: give up instead of blocking
            try:
                chunks.put(item, timeout=0.1)
                return
            except queue.Full:
                pass

    try:
        while not stop.is_set():
            data = raw.read(STREAM_BUFFER)
            put(data)
            if not data:
                return
    except BaseException as exc:  # handed to the consumer, raised there
        put(exc)
    finally:
        raw.close()  # only this thread touches raw


@functools.cache
def _transient_errors() -> tuple:
    import http.client

    import botocore.exceptions as bex
    import requests
    import urllib3.exceptions

    return (
        _Transient,
        ConnectionError,
        TimeoutError,
        http.client.HTTPException,
        urllib3.exceptions.HTTPError,
        requests.RequestException,
        bex.ConnectionError,
        bex.HTTPClientError,
        bex.IncompleteReadError,
    )


def _describe(exc: BaseException) -> str:
    # library messages can quote the URL they fetched: keep them, minus any query string or user:password@
    text = re.sub(r"\?[^\s'\"]*", "?…", str(exc))
    text = re.sub(r"//[^/\s@'\"]*@", "//", text)
    return (text if isinstance(exc, _Transient) else f"{type(exc).__name__}: {text}")[:300]


# --- HTTP(S) ---------------------------------------------------------------------------------------------------------
_http_sessions: dict = {}


def _http_session():
    import requests

    # one session per process: keep-alive connections, never shared across a fork
    pid = os.getpid()
    if pid not in _http_sessions:
        _http_sessions[pid] = requests.Session()
    return _http_sessions[pid]


def _check_http_status(status: int, url: str) -> None:
    if status in (401, 403):
        raise PermissionError(f"{redact(url)}: access denied (HTTP {status})")
    if status == 404 or status == 410:
        raise FileNotFoundError(f"{redact(url)}: not found (HTTP {status})")
    if status >= 500 or status in (408, 429):
        raise _Transient(f"HTTP {status}")
    if status >= 400:
        raise OSError(f"{redact(url)}: HTTP {status}")


def _http_open_at(url: str, offset: int, *, timeout: float):
    headers = {"Accept-Encoding": "identity"}  # Range offsets count bytes as stored, not decoded
    if offset:
        headers["Range"] = f"bytes={offset}-"
    resp = _http_session().get(url, headers=headers, stream=True, timeout=(timeout, timeout))
    try:
        _check_http_status(resp.status_code, url)
        size = resp.headers.get("Content-Length")
        size = int(size) if size is not None else None
        if resp.status_code == 206:
            m = re.fullmatch(r"bytes (\d+)-\d+/(\d+|\*)", resp.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != offset:
                got = resp.headers.get("Content-Range")
                raise StreamError(f"{redact(url)}: bad Content-Range {got!r} when resuming at byte {offset}")
            size = int(m.group(2)) if m.group(2) != "*" else None
        elif offset:
            # the server ignored Range and sent the whole object again: skip what was already delivered
            skip = offset
            while skip > 0:
                chunk = resp.raw.read(min(skip, STREAM_BUFFER))
                if not chunk:
                    raise _Transient(f"stream ended at byte {offset - skip} while skipping to byte {offset}")
                skip -= len(chunk)
    except BaseException:
        resp.close()
        raise
    return _HTTPBody(resp), size, resp.headers.get("ETag")


class _HTTPBody:
    def __init__(self, resp):
        self._resp = resp

    def read(self, n: int) -> bytes:
        return self._resp.raw.read(n)

    def close(self) -> None:
        self._resp.close()


# --- S3 --------------------------------------------------------------------------------------------------------------
_CREDENTIAL_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
)
_THROTTLING = {
    "Throttling",
    "ThrottlingException",
    "SlowDown",
    "RequestTimeout",
    "RequestLimitExceeded",
    "TooManyRequestsException",
    "ServiceUnavailable",
    "InternalError",
}


def _boto_session():
    # cached per process and credential environment (tests and CLIs may change it); a session caches the service
    # model, which makes every further client cheap (~0.04 s instead of ~0.4 s)
    return _cached_session(os.getpid(), tuple(os.environ.get(k) for k in _CREDENTIAL_ENV))


@functools.lru_cache(maxsize=8)
def _cached_session(pid, env):
    import boto3

    return boto3.session.Session()


def _s3_client(*, timeout: float = 60, attempts: int = 5):
    return _cached_s3_client(_boto_session(), endpoint_url(), timeout, attempts)


@functools.lru_cache(maxsize=16)
def _cached_s3_client(session, endpoint, timeout, attempts):
    from botocore.config import Config

    config = Config(
        connect_timeout=timeout,
        read_timeout=timeout,
        retries={"mode": "standard", "total_max_attempts": attempts},
        max_pool_connections=32,
    )
    return session.client("s3", endpoint_url=endpoint, config=config)


def _s3_error(exc, url: str) -> OSError:
    err = exc.response.get("Error", {})
    code = str(err.get("Code", ""))
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    where = redact(url)
    if status == 404 or code in ("NoSuchKey", "NoSuchBucket", "NotFound", "404"):
        what = "bucket does not exist" if code == "NoSuchBucket" else "no such object"
        return FileNotFoundError(f"{where}: {what}")
    if status in (401, 403) or code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"):
        return PermissionError(
            f"{where}: access denied by the S3 endpoint ({code or status}); check the AWS credentials "
            "(environment or profile) and the endpoint URL"
        )
    if status == 412 or code == "PreconditionFailed":
        return StreamError(f"{where}: the object changed while being read (ETag differs)")
    if status >= 500 or status == 429 or code in _THROTTLING:
        return _Transient(f"S3 {code or 'error'} (HTTP {status})")
    return OSError(f"{where}: S3 error {code} (HTTP {status}): {err.get('Message', '')}")


@contextlib.contextmanager
def _s3_errors(url: str):
    """Turn botocore errors into FileNotFoundError / PermissionError / OSError naming the URL."""
    from botocore.exceptions import ClientError, NoCredentialsError, PartialCredentialsError

    try:
        yield
    except ClientError as exc:
        raise _s3_error(exc, url) from None
    except (NoCredentialsError, PartialCredentialsError):
        raise PermissionError(
            f"{redact(url)}: no usable AWS credentials (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE)"
        ) from None


def _s3_open_at(url: str, offset: int, *, timeout: float):
    bucket, key = _s3_split(url)
    kwargs = {"Bucket": bucket, "Key": key}
    if offset:
        kwargs["Range"] = f"bytes={offset}-"
    # one attempt per call: _ResumingStream owns the retry policy (and resumes mid-object, which botocore cannot)
    with _s3_errors(url):
        resp = _s3_client(timeout=timeout, attempts=1).get_object(**kwargs)
    size = resp.get("ContentLength")
    m = re.fullmatch(r"bytes (\d+)-\d+/(\d+)", resp.get("ContentRange") or "")
    if m:
        size = int(m.group(2))
    return resp["Body"], size, resp.get("ETag")


# --- pipe: -----------------------------------------------------------------------------------------------------------
def _open_pipe(url: str, allow_pipe: bool | None) -> BinaryIO:
    if allow_pipe is None:
        allow_pipe = _config["allow_pipe"] or os.environ.get(ALLOW_PIPE_ENV, "") not in ("", "0")
    if not allow_pipe:
        raise PermissionError(
            f"{url!r}: pipe: URLs run a shell command and are disabled; enable them explicitly "
            f"(--allow-pipe, storage.configure(allow_pipe=True) or {ALLOW_PIPE_ENV}=1)"
        )
    cmd = url[len("pipe:") :]
    proc = subprocess.Popen(cmd, shell=True, stdout=subprocess.PIPE)
    return io.BufferedReader(_PipeStream(url, proc), STREAM_BUFFER)


class _PipeStream(io.RawIOBase):
    """stdout of a shell command; a non-zero exit status at end of stream is an error."""

    def __init__(self, url: str, proc: subprocess.Popen):
        self.url, self._proc = url, proc

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        n = self._proc.stdout.readinto(buf)
        if n == 0 and self._proc.wait() != 0:
            raise OSError(f"{self.url!r}: command exited with status {self._proc.returncode}")
        return n

    def close(self) -> None:
        if self._proc.poll() is None:  # closed before the end: stop the command instead of leaving it blocked
            self._proc.terminate()
        self._proc.stdout.close()
        self._proc.wait()
        super().close()
