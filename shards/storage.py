"""One small interface over where shards live: local paths, ``s3://bucket/prefix`` and ``http(s)://`` (read-only).

Writers need: list a prefix, atomic whole-object writes, read small files. Readers need: a byte stream that survives
transient network failures. Local writes go to a temporary name in the same directory and are renamed; remote writes
are single PUTs (an S3 object is never visible half-written).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import BinaryIO


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def local_path(url: str) -> str:
    return url[len("file://") :] if url.startswith("file://") else url


def join(base: str, *names: str) -> str:
    if is_remote(base):
        return "/".join([base.rstrip("/"), *names])
    return os.path.join(local_path(base), *names)


def basename(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def list_names(base: str) -> list[str]:
    """Names of the files directly under ``base``, sorted; empty when ``base`` does not exist."""
    if is_remote(base):
        raise NotImplementedError(f"listing {base!r}: remote outputs are not supported yet")
    path = local_path(base)
    if not os.path.isdir(path):
        return []
    return sorted(n for n in os.listdir(path) if os.path.isfile(os.path.join(path, n)))


def exists(url: str) -> bool:
    if is_remote(url):
        raise NotImplementedError(f"{url!r}: remote outputs are not supported yet")
    return os.path.exists(local_path(url))


def makedirs(base: str) -> None:
    if not is_remote(base):
        os.makedirs(local_path(base), exist_ok=True)


def read_bytes(url: str) -> bytes:
    with open_stream(url) as f:
        return f.read()


def write_bytes(url: str, data: bytes) -> None:
    """Atomic: readers see the old content or the new, never a prefix."""
    if is_remote(url):
        raise NotImplementedError(f"{url!r}: remote outputs are not supported yet")
    path = local_path(url)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=os.path.dirname(path) or ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        _unlink(tmp)
        raise


def put_file(local_file: str, url: str) -> None:
    """Move a finished local file to ``url`` atomically (rename locally, upload remotely); ``local_file`` is consumed."""
    if is_remote(url):
        raise NotImplementedError(f"{url!r}: remote outputs are not supported yet")
    dst = local_path(url)
    try:
        os.replace(local_file, dst)
    except OSError:  # another filesystem: copy beside the destination, then rename
        tmp = dst + f".{os.getpid()}.tmp"
        shutil.copyfile(local_file, tmp)
        os.replace(tmp, dst)
        _unlink(local_file)


def remove(url: str) -> None:
    """Delete if present."""
    if is_remote(url):
        raise NotImplementedError(f"{url!r}: remote outputs are not supported yet")
    _unlink(local_path(url))


def staging_dir(base: str) -> str:
    """A local directory where files for ``base`` are built before ``put_file``: same filesystem when local."""
    if is_remote(base):
        return tempfile.mkdtemp(prefix="shards-")
    return local_path(base)


def open_stream(url: str) -> BinaryIO:
    """A readable binary stream of the whole object."""
    if is_remote(url):
        raise NotImplementedError(f"{url!r}: remote streams are not supported yet")
    return open(local_path(url), "rb")


def arrow_filesystem(url: str):
    """(pyarrow filesystem, path inside it) for reading Parquet at ``url``."""
    import pyarrow.fs as pafs

    if is_remote(url):
        raise NotImplementedError(f"{url!r}: remote outputs are not supported yet")
    return pafs.LocalFileSystem(), os.path.abspath(local_path(url))


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
