"""Local files: temporary names, atomic writes with the umask's permissions, moves that are renames where they can be."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from typing import BinaryIO

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
        unlink(tmp)
        raise


def sync(f: BinaryIO) -> None:
    """Flush ``f`` to disk: before a rename, so that after a power loss the new name never points at unwritten
    blocks."""
    f.flush()
    os.fsync(f.fileno())


def move(src: str, dst: str) -> None:
    """Move the finished file ``src`` to ``dst`` atomically: a rename, or across filesystems a copy written with
    ``atomic_file`` beside ``dst``; ``src`` is gone afterwards."""
    try:
        os.replace(src, dst)
    except OSError:  # another filesystem: copy beside the destination, then rename
        with atomic_file(dst) as f, open(src, "rb") as source:
            shutil.copyfileobj(source, f)
        unlink(src)


def list_names(path: str) -> list[str]:
    """Names of the files directly in directory ``path``, sorted; empty when it does not exist."""
    if not os.path.isdir(path):
        return []
    return sorted(n for n in os.listdir(path) if os.path.isfile(os.path.join(path, n)))


def unlink(path: str) -> None:
    """Delete ``path`` if present."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
