"""The forms a location takes: a local path (or ``file://``), ``s3://bucket/key``, ``http(s)://…``, ``pipe:command``."""

from __future__ import annotations

import os
from urllib.parse import urlsplit


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


def s3_split(url: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> (bucket, key); ValueError without a bucket."""
    parts = urlsplit(url)
    if not parts.netloc:
        raise ValueError(f"{url!r}: an S3 URL needs a bucket (s3://bucket/key)")
    return parts.netloc, parts.path.lstrip("/")
