"""Remote byte streams that survive transient failures: resumed with a Range request where they broke, after
checking that the object did not change, and read ahead in a background thread so the transfer overlaps parsing.

A backend (``s3``, ``http``) supplies an opener ``open_at(offset) -> (body, total size, ETag)``; ``open_resuming``
turns it into the stream ``storage.open_stream`` returns.
"""

from __future__ import annotations

import contextlib
import functools
import io
import queue
import re
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

from shards.storage.urls import redact

# Chunk size of remote reads: large enough that per-call overhead is negligible.
STREAM_BUFFER = 1 << 20

T = TypeVar("T")


class StreamError(OSError):
    """A remote read that could not be completed: retries exhausted, or the object changed while being read."""


class Transient(OSError):
    """A failure worth retrying (5xx, throttling, a stream that ended early)."""


class Body(Protocol):
    """The body of one remote GET, read forward."""

    def read(self, n: int) -> bytes: ...

    def close(self) -> None: ...


# ``open_at(offset) -> (body from that byte, size of the whole object or None, ETag or None)``
Opener = Callable[[int], tuple[Body, "int | None", "str | None"]]


def open_resuming(
    url: str, open_at: Opener, *, retries: int, backoff: float, readahead: int
) -> Readahead | io.BufferedReader:
    """The stream of the object at ``url`` (see ``storage.open_stream`` for the arguments); opened here, so a missing
    object or refused access raises now."""
    raw = ResumingStream(url, open_at, retries=retries, backoff=backoff)
    return Readahead(raw, readahead) if readahead > 0 else io.BufferedReader(raw, STREAM_BUFFER)


class ResumingStream(io.RawIOBase):
    """Raw stream over a remote object that reopens at the current offset after a transient failure."""

    def __init__(self, url: str, open_at: Opener, *, retries: int, backoff: float):
        self.url, self._open_at, self._retries, self._backoff = url, open_at, retries, backoff
        self._pos = 0
        self._body: Body | None = None
        self._size: int | None = None
        self._etag: str | None = None
        self._with_retries(self._ensure_open)  # fail at open time for a missing object or refused access

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)

    def read(self, size: int | None = -1) -> bytes:
        # bytes straight from the body, no copy through a buffer (the readahead thread calls this)
        if size is None or size < 0:
            return b"".join(iter(lambda: self.read(STREAM_BUFFER), b""))
        return self._with_retries(lambda: self._read_once(size))

    def close(self) -> None:
        self._drop_body()
        super().close()

    def _ensure_open(self) -> Body:
        if self._body is None:
            body, size, etag = self._open_at(self._pos)
            if self._size is None:
                self._size, self._etag = size, etag
            elif size != self._size or (etag and self._etag and etag != self._etag):
                body.close()
                raise StreamError(f"{redact(self.url)}: the object changed while being read (size or ETag differs)")
            self._body = body
        return self._body

    def _read_once(self, size: int) -> bytes:
        data = self._ensure_open().read(size)
        if not data and self._size is not None and self._pos < self._size:
            raise Transient(f"stream ended at byte {self._pos} of {self._size}")
        self._pos += len(data)
        return data

    def _with_retries(self, step: Callable[[], T]) -> T:
        failures = 0  # per call: a read that makes progress earns a fresh budget
        while True:
            try:
                return step()
            except transient_errors() as exc:
                self._drop_body()
                failures += 1
                if failures > self._retries:
                    raise StreamError(
                        f"{redact(self.url)}: giving up after {failures} tries at byte {self._pos}: {describe(exc)}"
                    ) from None
                time.sleep(min(self._backoff * 2 ** (failures - 1), 30.0))

    def _drop_body(self) -> None:
        if self._body is not None:
            with contextlib.suppress(Exception):
                self._body.close()
            self._body = None


class Readahead(io.RawIOBase):
    """Reads ``raw`` in a background thread, up to ``depth`` chunks ahead of the consumer (socket reads release the
    GIL, so bytes keep arriving while the consumer parses). The consumer gets the reader's exceptions."""

    def __init__(self, raw: ResumingStream, depth: int):
        self._chunks: queue.Queue[bytes | BaseException] = queue.Queue(depth)
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

    def read(self, size: int | None = -1) -> bytes:
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

    def readinto(self, buf: Any) -> int:
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


def _read_ahead(raw: ResumingStream, chunks: queue.Queue[bytes | BaseException], stop: threading.Event) -> None:
    def put(item: bytes | BaseException) -> None:
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
def transient_errors() -> tuple[type[BaseException], ...]:
    """Exceptions of a remote read worth retrying: ours, connection and timeout errors of the libraries underneath."""
    import http.client

    import botocore.exceptions as bex
    import requests
    import urllib3.exceptions

    return (
        Transient,
        ConnectionError,
        TimeoutError,
        http.client.HTTPException,
        urllib3.exceptions.HTTPError,
        requests.RequestException,
        bex.ConnectionError,
        bex.HTTPClientError,
        bex.IncompleteReadError,
    )


def describe(exc: BaseException) -> str:
    """An exception as one short line for an error message: library messages can quote the URL they fetched, so any
    query string or ``user:password@`` is cut out."""
    text = re.sub(r"\?[^\s'\"]*", "?…", str(exc))
    text = re.sub(r"//[^/\s@'\"]*@", "//", text)
    return (text if isinstance(exc, Transient) else f"{type(exc).__name__}: {text}")[:300]
