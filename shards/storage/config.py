"""Process-wide storage settings from the command line: the S3 endpoint and the ``pipe:`` opt-in."""

from __future__ import annotations

import os
from typing import Any, TypedDict

ALLOW_PIPE_ENV = "SHARDS_ALLOW_PIPE"


class Settings(TypedDict):
    endpoint_url: str | None
    allow_pipe: bool


_config: Settings = {"endpoint_url": None, "allow_pipe": False}


def configure(*, endpoint_url: str | None = None, allow_pipe: bool = False) -> None:
    """Process-wide settings from the command line; replaces earlier ones (``configure()`` restores the defaults).

    endpoint_url: S3 API endpoint of an S3-compatible store (``None``: the environment's, else AWS).
    allow_pipe: accept ``pipe:`` URLs in ``open_stream`` (they run a shell command)."""
    _config["endpoint_url"] = endpoint_url or None
    _config["allow_pipe"] = bool(allow_pipe)


def settings() -> dict[str, Any]:
    """The current ``configure`` settings, for processes that do not inherit them (spawned workers):
    ``configure(**settings())`` there repeats them."""
    return dict(_config)


def endpoint_url() -> str | None:
    """The S3 endpoint: ``configure``'s, else ``S3_ENDPOINT_URL``, else ``AWS_ENDPOINT_URL``, else None (AWS)."""
    return _config["endpoint_url"] or os.environ.get("S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL") or None


def pipe_allowed(allow_pipe: bool | None = None) -> bool:
    """Whether ``pipe:`` URLs may run: ``allow_pipe`` when given, else ``configure``'s or ``SHARDS_ALLOW_PIPE``."""
    if allow_pipe is not None:
        return allow_pipe
    return _config["allow_pipe"] or os.environ.get(ALLOW_PIPE_ENV, "") not in ("", "0")
