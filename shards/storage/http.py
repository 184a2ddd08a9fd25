"""``http(s)://`` (read-only): existence by HEAD, reads by GET, resumed with a Range request (``streams``)."""

from __future__ import annotations

import os
import re
from typing import Any

from shards.storage.streams import STREAM_BUFFER, StreamError, Transient, describe
from shards.storage.urls import redact

_sessions: dict[int, Any] = {}


def _session() -> Any:
    import requests

    # one session per process: keep-alive connections, never shared across a fork
    pid = os.getpid()
    if pid not in _sessions:
        _sessions[pid] = requests.Session()
    return _sessions[pid]


def check_status(status: int, url: str) -> None:
    """Raise what an HTTP status means for reading ``url``: PermissionError, FileNotFoundError, a transient failure
    (5xx, 408, 429: retried) or OSError; nothing for a success."""
    if status in (401, 403):
        raise PermissionError(f"{redact(url)}: access denied (HTTP {status})")
    if status == 404 or status == 410:
        raise FileNotFoundError(f"{redact(url)}: not found (HTTP {status})")
    if status >= 500 or status in (408, 429):
        raise Transient(f"HTTP {status}")
    if status >= 400:
        raise OSError(f"{redact(url)}: HTTP {status}")


def exists(url: str) -> bool:
    import requests

    try:
        resp = _session().head(url, allow_redirects=True, timeout=30)
    except requests.RequestException as exc:
        raise OSError(f"{redact(url)}: {describe(exc)}") from None
    if resp.status_code == 404:
        return False
    check_status(resp.status_code, url)
    return True


def open_at(url: str, offset: int, *, timeout: float) -> tuple[Body, int | None, str | None]:
    """The body of ``url`` from byte ``offset`` on, the object's size (None if the server does not say) and ETag."""
    headers = {"Accept-Encoding": "identity"}  # Range offsets count bytes as stored, not decoded
    if offset:
        headers["Range"] = f"bytes={offset}-"
    resp = _session().get(url, headers=headers, stream=True, timeout=(timeout, timeout))
    try:
        check_status(resp.status_code, url)
        length = resp.headers.get("Content-Length")
        size = int(length) if length is not None else None
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
                    raise Transient(f"stream ended at byte {offset - skip} while skipping to byte {offset}")
                skip -= len(chunk)
    except BaseException:
        resp.close()
        raise
    return Body(resp), size, resp.headers.get("ETag")


class Body:
    """The undecoded bytes of one response, read forward."""

    def __init__(self, resp: Any):
        self._resp = resp

    def read(self, n: int) -> bytes:
        return self._resp.raw.read(n)

    def close(self) -> None:
        self._resp.close()
