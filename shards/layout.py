"""An output's files: which names belong to which shard, which shards are done, what a killed run left behind.

An output (a directory, an ``s3://`` prefix, or read-only an ``http(s)://`` URL) holds for each shard ``NAME``
(``schema.shard_name``) the files ``NAME.tar``, ``NAME.parquet`` and ``NAME.stats.json``, the last written last: a
shard is done when all three are there. ``prep_config.json`` and ``manifest.json`` describe the whole run. A file being
written has a hidden temporary name (``storage.temp_file``) until it is complete, and no hidden file is ever a shard.

The functions over ``names`` take one listing of the output (``listing(out)``): one request on S3, not one per shard.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

from shards import schema, storage

# The files of one shard, in the order the writer completes them (the stats file last: the done marker).
SHARD_SUFFIXES = (schema.TAR_SUFFIX, schema.PARQUET_SUFFIX, schema.STATS_SUFFIX)
# The files of a whole run beside its shards.
RUN_FILES = (schema.RUN_CONFIG_NAME, schema.MANIFEST_NAME)


def shard_file(out: str, name: str, suffix: str) -> str:
    """The file ``suffix`` (``schema.TAR_SUFFIX``, …) of shard ``name`` in output ``out``."""
    return storage.join(out, name + suffix)


def sibling(path: str, suffix: str) -> str:
    """The file ``suffix`` of the shard that the file ``path`` (a path or URL) belongs to: ``…/coco-000003.tar`` ->
    ``…/coco-000003.stats.json``. ValueError for a name that is not a shard file."""
    for own in SHARD_SUFFIXES:
        if path.endswith(own):
            return path[: -len(own)] + suffix
    raise ValueError(f"{storage.redact(path)}: not a shard file ({', '.join(SHARD_SUFFIXES)})")


def split(name: str) -> tuple[str, str] | None:
    """``coco-000003.tar`` -> (``coco-000003``, ``.tar``): the shard a file belongs to and which of its files it is;
    None for any other name (hidden and temporary files, the run files, a stem that is not a shard name)."""
    if name.startswith("."):
        return None
    for suffix in SHARD_SUFFIXES:
        if name.endswith(suffix):
            stem = name[: -len(suffix)]
            return (stem, suffix) if is_shard_name(stem) else None
    return None


def is_shard_name(stem: str) -> bool:
    try:
        schema.parse_shard_name(stem)
    except ValueError:
        return False
    return True


def shard_names(names: Iterable[str], suffix: str | None = None) -> list[str]:
    """The shards with a file among ``names`` (only ``suffix`` counts when given), sorted."""
    return sorted({parts[0] for parts in map(split, names) if parts and suffix in (None, parts[1])})


def done(names: Iterable[str]) -> set[str]:
    """The shards whose tar, parquet and stats file are all among ``names``."""
    present = set(names)
    return {n for n in shard_names(present, schema.STATS_SUFFIX) if all(n + s in present for s in SHARD_SUFFIXES)}


def done_shards(out: str) -> set[str]:
    """The done shards of output ``out``, from one listing."""
    return done(storage.list_names(out))


def is_done(out: str, name: str) -> bool:
    """Whether shard ``name`` of ``out`` is done, asked of each of its files (no listing: for one shard)."""
    return all(storage.exists(shard_file(out, name, s)) for s in SHARD_SUFFIXES)


def tars(names: Iterable[str]) -> list[str]:
    """The tars among ``names`` (file names, paths or URLs), hidden ones (temporary files) left out. Any tar, named as
    a shard or not: the reader reads every WebDataset tar it is given."""
    return [n for n in names if n.endswith(schema.TAR_SUFFIX) and not storage.basename(n).startswith(".")]


def temp_shard(name: str) -> str | None:
    """The shard a temporary file ``name`` was being written for (a killed writer leaves it); None for any other."""
    final = storage.temp_target(name)
    parts = split(final) if final is not None else None
    return parts[0] if parts else None


def run_files(names: Iterable[str], prefixes: Iterable[str]) -> list[str]:
    """The files among ``names`` that a run owns, for shard name prefixes ``prefixes``: the run files, its shards'
    files and the temporary files of those shards. Nothing else (another run's shards, the user's own files)."""
    prefixes = set(prefixes)

    def owned(name: str) -> bool:
        if name in RUN_FILES:
            return True
        parts = split(name)
        shard = parts[0] if parts else temp_shard(name)
        return shard is not None and schema.parse_shard_name(shard)[0] in prefixes

    return [n for n in names if owned(n)]


def listing(out: str) -> set[str]:
    """The file names of output ``out``: a listing where the storage has one; for ``http(s)://``, which has none, the
    names its manifest (else its run config's plan) promises, minus the tars (found through the manifest by the reader).
    FileNotFoundError for an ``http(s)://`` output with neither."""
    if storage.scheme(out) not in ("http", "https"):
        return set(storage.list_names(out))
    manifest_url = storage.join(out, schema.MANIFEST_NAME)
    if storage.exists(manifest_url):
        # a manifest is written only when every shard is done: each has its parquet and stats file
        names = [s["name"] for s in json.loads(storage.read_bytes(manifest_url))["shards"]]
        for name in names:  # a manifest names the shards beside it: nothing that would resolve elsewhere
            if not isinstance(name, str) or "/" in name or not is_shard_name(name):
                raise ValueError(f"{storage.redact(manifest_url)}: {name!r:.100} is not the name of a shard beside it")
        return {schema.MANIFEST_NAME} | {n + s for n in names for s in (schema.PARQUET_SUFFIX, schema.STATS_SUFFIX)}
    config_url = storage.join(out, schema.RUN_CONFIG_NAME)
    if not storage.exists(config_url):
        raise FileNotFoundError(
            f"{storage.redact(out)}: neither {schema.MANIFEST_NAME} nor {schema.RUN_CONFIG_NAME} found "
            "(an http(s) output cannot be listed: its shards are found through those files)"
        )
    # an unfinished run: ask for each planned shard's files (one HEAD each)
    planned = json.loads(storage.read_bytes(config_url)).get("shards", [])
    wanted = [n + s for n in planned for s in (schema.PARQUET_SUFFIX, schema.STATS_SUFFIX)]
    return {schema.RUN_CONFIG_NAME} | {n for n in wanted if storage.exists(storage.join(out, n))}
