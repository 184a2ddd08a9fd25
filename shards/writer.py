"""ShardWriter: one shard's tar and parquet built under temporary names, moved into place, stats file last.

A shard is done exactly when ``NAME.stats.json`` exists: it is written after the tar and the parquet are in place, so
a crash at any point leaves either a done shard or one that a rerun redoes. The tar bytes depend only on the samples
and their order (member headers carry no time, owner or host), so equal inputs give byte-identical tars.

For a remote output (``s3://…``) the files are built in ``storage.staging_dir(out)``, a local directory named after the
output URL, and uploaded as whole objects (tar, parquet, then stats); a rerun finds what a killed run left there.
"""

from __future__ import annotations

import io
import os
import tarfile
import time
from collections.abc import Mapping
from types import TracebackType
from typing import Any

import pyarrow.parquet as pq

from shards import layout, schema, storage

# zstd: a little smaller than snappy on box lists (~5% on 1,000 rows of 50-100 boxes), and pyarrow, duckdb, pandas
# and Spark all read it. The level is fixed so the bytes do not follow a library default.
PARQUET_COMPRESSION = "zstd"
PARQUET_COMPRESSION_LEVEL = 3

_COLUMNS = frozenset(schema.PARQUET_SCHEMA.names)


class ShardWriter:
    """Context manager writing shard ``name`` into ``out``; on an exception it removes its temporary files and
    writes nothing final (an existing done shard of the same name is left as it was).

    ``config`` is stored in the stats file; ``fingerprint`` marks which settings produced the shard; ``min_boxes``
    decides the ``few_boxes`` count."""

    def __init__(self, out: str, name: str, *, config: Mapping[str, Any], fingerprint: str, min_boxes: int):
        schema.parse_shard_name(name)  # raises on a name that is not {prefix}-{index:06d}
        self.out, self.name = out, name
        self.config, self.fingerprint, self.min_boxes = dict(config), fingerprint, min_boxes
        self.stats: dict[str, Any] | None = None
        self._rows: list[dict[str, Any]] = []
        self._keys: set[str] = set()
        self._start = time.monotonic()
        self._closed = False

        storage.makedirs(out)
        self._stage = storage.staging_dir(out)
        os.makedirs(self._stage, exist_ok=True)
        # Hidden temporary names (out of every listing of shards) with the permissions of any new file (the umask's),
        # which the rename into place keeps.
        self._file, self._tar_tmp = storage.temp_file(self._stage, name + schema.TAR_SUFFIX)
        self._parquet_tmp: str | None = None
        # open for the writer's whole life, closed by close() or abort(): no with-block can hold it
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)  # noqa: SIM115

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.close()

    def write(self, row: Mapping[str, Any], jpeg: bytes | None = None, meta: bytes | None = None) -> None:
        """Add one input's parquet row (from ``schema.make_row``); an ok row also needs its ``KEY.jpg`` bytes and
        ``KEY.json`` bytes (``schema.encode_meta``), a failed row neither. ``image_bytes`` and ``image_sha256`` are
        filled from ``jpeg`` (or checked against it when the row has them)."""
        if self._closed:
            raise ValueError(f"shard {self.name}: write after close")
        if row.keys() != _COLUMNS:
            raise ValueError(f"shard {self.name}: row is not a schema.make_row dict (columns {sorted(row)})")
        key = row["key"]
        if not isinstance(key, str) or not schema.is_valid_key(key):
            raise ValueError(f"shard {self.name}: invalid sample key {key!r} (letters, digits, '_' and '-' only)")
        if key in self._keys:
            raise ValueError(f"shard {self.name}: duplicate sample key {key!r}")
        ok = row["status"] == schema.STATUS_OK
        if not ok and (jpeg is not None or meta is not None):
            raise ValueError(f"shard {self.name}: failed row {key!r} ({row['status']}) must not carry jpeg or meta")

        row = dict(row)
        if ok:
            if jpeg is None or meta is None:
                raise ValueError(f"shard {self.name}: ok row {key!r} needs both jpeg and meta bytes")
            if row["image_bytes"] is None:
                row["image_bytes"] = len(jpeg)
            elif row["image_bytes"] != len(jpeg):
                raise ValueError(
                    f"shard {self.name}: row {key!r} says image_bytes={row['image_bytes']}, jpeg has {len(jpeg)}"
                )
            digest = schema.image_sha256(jpeg)
            if row["image_sha256"] is None:
                row["image_sha256"] = digest
            elif row["image_sha256"] != digest:
                raise ValueError(f"shard {self.name}: row {key!r} has an image_sha256 that is not the jpeg's")
            # never write a sample every reader would skip (docs/format.md, "What a reader accepts")
            if len(jpeg) > schema.IMAGE_MAX_BYTES:
                raise ValueError(f"shard {self.name}: {key}.jpg is {len(jpeg)} bytes, over {schema.IMAGE_MAX_BYTES}")
            try:
                written = schema.decode_meta(meta, key=key)
            except schema.InvalidSample as e:
                raise ValueError(f"shard {self.name}: {key}.json breaks the format's rule: {e}") from None
            if written["image_sha256"] not in (None, digest):
                raise ValueError(f"shard {self.name}: {key}.json records an image_sha256 that is not the jpeg's")
            self._add(f"{key}.{schema.IMAGE_EXT}", jpeg)
            self._add(f"{key}.{schema.META_EXT}", meta)
        self._keys.add(key)
        self._rows.append(row)

    def _add(self, member: str, data: bytes) -> None:
        info = tarfile.TarInfo(member)
        info.size = len(data)
        info.mtime = 0
        info.mode = 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        self._tar.addfile(info, io.BytesIO(data))

    def close(self) -> dict[str, Any]:
        """Finish the tar, write the parquet, move both into place, then write ``NAME.stats.json``; returns the stats."""
        if self._closed:
            if self.stats is None:
                raise ValueError(f"shard {self.name}: closed after an error, nothing was written")
            return self.stats
        try:
            self._tar.close()
            storage.sync(self._file)
            self._file.close()

            f, self._parquet_tmp = storage.temp_file(self._stage, self.name + schema.PARQUET_SUFFIX)
            with f:
                pq.write_table(
                    schema.rows_to_table(self._rows),
                    f,
                    compression=PARQUET_COMPRESSION,
                    compression_level=PARQUET_COMPRESSION_LEVEL,
                )
                storage.sync(f)

            stats = schema.make_stats(
                shard=self.name,
                config_fingerprint=self.fingerprint,
                rows=self._rows,
                tar_bytes=os.path.getsize(self._tar_tmp),
                parquet_bytes=os.path.getsize(self._parquet_tmp),
                seconds=time.monotonic() - self._start,
                min_boxes=self.min_boxes,
            )
            stats["config"] = self.config
            stats_bytes = schema.dumps(stats)  # before anything moves: an unserialisable config fails here

            def final(suffix: str) -> str:
                return layout.shard_file(self.out, self.name, suffix)

            # A rewritten shard stops being done before its files change, so stats always describe the files beside them.
            storage.remove(final(schema.STATS_SUFFIX))
            storage.put_file(self._tar_tmp, final(schema.TAR_SUFFIX))
            storage.put_file(self._parquet_tmp, final(schema.PARQUET_SUFFIX))
            storage.write_bytes(final(schema.STATS_SUFFIX), stats_bytes)
        except BaseException:
            self.abort()
            raise
        self._closed = True
        self.stats = stats
        return stats

    def abort(self) -> None:
        """Drop everything written so far: temporary files go, final files are not touched."""
        self._closed = True
        try:
            self._tar.close()
        except Exception:  # the tar may be half-written; it is deleted next anyway
            pass
        self._file.close()
        # put_file consumed the ones already uploaded; the stage directory is shared with other shards' writers
        for path in (self._tar_tmp, self._parquet_tmp):
            if path is not None:
                _unlink(path)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
