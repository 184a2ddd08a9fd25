"""Shard tasks: plan them from a Source, process one record and one shard, run a plan with resume, finalize.

One output directory holds one run: ``OUT/prep_config.json`` (``schema.RUN_CONFIG_NAME``) records its settings,
fingerprint, versions, class list and shard plan. A later run into the same output must have the same fingerprint and
the same inputs (else ``RunConfigError``, or ``overwrite=True`` to start over). Done shards (``shards.layout.done``: the
stats file with the tar and parquet it describes) are skipped; anything else is (re)written from scratch, so a killed
run resumed gives the same bytes as an uninterrupted one.

``out`` may be an ``s3://bucket/prefix`` URL (anything ``shards.storage`` can write): the run config, manifest and shard
objects go there, each shard built locally and uploaded whole, its stats object last; resume lists the prefix once.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from prep.config import PrepConfig
from shards import layout, schema, storage

# Settings of the run config that identify a run but do not decide shard content.
_NOT_CONTENT = ("root",)
# Library versions that do decide shard content: OpenCV the boxes, Pillow the decoded pixels and the JPEG bytes.
# A resume under others would mix two kinds of shards under one manifest (which records the first run's versions).
_CONTENT_VERSIONS = ("format", "opencv", "pillow")


class RunConfigError(RuntimeError):
    """The output holds a run made with other settings or other inputs (or is not a prep output at all)."""


class ShardsFailed(RuntimeError):
    """Some shard tasks raised or their worker died; the others were written. ``failures``: [(shard, message)]."""

    def __init__(self, failures: list[tuple[str, str]]):
        self.failures = failures
        lines = "\n".join(f"  {name}: {msg.strip().splitlines()[-1] if msg.strip() else msg}" for name, msg in failures)
        super().__init__(f"{len(failures)} shard(s) failed (rerun the same command to retry them):\n{lines}")


@dataclass(frozen=True)
class ShardTask:
    """One unit of work: the records written to shard ``name`` (the index-th shard of the plan)."""

    index: int
    name: str
    records: tuple  # tuple[prep.sources.Record, ...]

    def __len__(self) -> int:
        return len(self.records)


# --- planning --------------------------------------------------------------------------------------------------------
def plan(records: list, cfg: PrepConfig) -> list[ShardTask]:
    """Records in source order, cut into chunks of ``cfg.shard_size``; shard i is ``schema.shard_name(prefix, i)``."""
    size = cfg.shard_size
    return [
        ShardTask(i, schema.shard_name(cfg.shard_prefix, i), tuple(records[start : start + size]))
        for i, start in enumerate(range(0, len(records), size))
    ]


def select_part(tasks: list[ShardTask], part: tuple[int, int]) -> list[ShardTask]:
    """``part=(i, n)``: tasks i, i+n, i+2n, … (one slice of a SLURM array / scheduler job)."""
    i, n = part
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"part must be i/N with 0 <= i < N, got {i}/{n}")
    return tasks[i::n]


def parse_part(text: str) -> tuple[int, int]:
    """``"1/4"`` -> ``(1, 4)``; ValueError naming the text otherwise."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m:
        raise ValueError(f"--part must look like i/N (e.g. 0/4), got {text!r}")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1 or i >= n:
        raise ValueError(f"--part {text}: need 0 <= i < N")
    return i, n


def source_digest(records: list) -> str:
    """Digest of the input list (keys, relative paths, labels, ids): a resumed run must plan the same shards."""
    h = hashlib.sha256()
    for r in records:
        h.update(f"{r.key}\0{r.relpath}\0{r.label}\0{r.image_id}\n".encode())
    return h.hexdigest()[:16]


def versions() -> dict[str, str]:
    """Versions of everything that decides shard bytes (recorded in the run config and the manifest)."""
    import cv2
    import numpy
    import PIL
    import pyarrow

    try:
        prep_version = importlib.metadata.version("univip-shards")
    except importlib.metadata.PackageNotFoundError:  # running from a checkout without `pip install`
        prep_version = "checkout"
    return {
        "prep": prep_version,
        "format": str(schema.FORMAT_VERSION),
        "opencv": cv2.__version__,
        "numpy": numpy.__version__,
        "pyarrow": pyarrow.__version__,
        "pillow": PIL.__version__,
        "python": platform.python_version(),
    }


# --- one record, one shard -------------------------------------------------------------------------------------------
def process_record(rec, cfg: PrepConfig) -> tuple[dict, bytes | None, bytes | None]:
    """(parquet row, jpeg bytes, KEY.json bytes) for one input; jpeg and meta are None for a failure row.

    Never raises for a bad input: unreadable images become a row with the ImageError reason, and any error of selective
    search becomes ``proposal_failed`` (the run goes on; the message is kept in the ``error`` column)."""
    from prep import images, proposals

    ids = dict(label=rec.label, image_id=rec.image_id)
    try:
        img = images.load_image(rec.path, max_side=cfg.max_side, max_pixels=cfg.max_pixels, quality=cfg.jpeg_quality)
    except images.ImageError as e:
        # the message names the file by its path relative to the root, like the `path` column: rows must not depend
        # on where the data set is mounted (root is not part of the fingerprint, so a moved data set resumes)
        error = e.message.replace(rec.path, rec.relpath)
        return schema.make_row(rec.key, rec.relpath, e.reason, error=error, **ids), None, None
    except Exception as e:  # a decoder failure the loader did not classify: still one bad input, not a dead run
        return schema.make_row(rec.key, rec.relpath, "corrupt", error=f"{type(e).__name__}: {e}", **ids), None, None

    height, width = img.rgb.shape[:2]
    sizes = dict(width=width, height=height, orig_width=img.orig_width, orig_height=img.orig_height, sha256=img.sha256)
    try:
        prop = proposals.propose(img.rgb, rec.key, cfg)
    except Exception as e:
        row = schema.make_row(rec.key, rec.relpath, "proposal_failed", error=f"{type(e).__name__}: {e}", **ids, **sizes)
        return row, None, None

    digest = schema.image_sha256(img.jpeg)  # of the bytes stored in the tar, for KEY.json and the row alike
    row = schema.make_row(
        rec.key,
        rec.relpath,
        schema.STATUS_OK,
        **ids,
        **sizes,
        raw_boxes=prop.raw,
        kept_boxes=len(prop.boxes),
        fallback_boxes=prop.fallback,
        boxes=prop.boxes,
        ss_seconds=prop.seconds,
        image_bytes=len(img.jpeg),
        image_sha256=digest,
    )
    meta = schema.encode_meta(
        key=rec.key, path=rec.relpath, width=width, height=height, boxes=prop.boxes, image_sha256=digest, **ids
    )
    return row, img.jpeg, meta


def run_shard(out: str, name: str, records, cfg: PrepConfig, progress: Callable[[int], None] | None = None) -> dict:
    """Write shard ``name`` from ``records`` (tar, parquet, then stats); returns the stats. ``progress(1)`` per image."""
    from shards.writer import ShardWriter

    with ShardWriter(out, name, config=cfg.to_dict(), fingerprint=cfg.fingerprint(), min_boxes=cfg.min_boxes) as w:
        for rec in records:
            row, jpeg, meta = process_record(rec, cfg)
            w.write(row, jpeg, meta)
            if progress is not None:
                progress(1)
        return w.close()


def run_task(
    out: str,
    cfg: PrepConfig,
    task: ShardTask,
    tick: Callable[[int], None] | None = None,
    *,
    endpoint_url: str | None = None,
) -> dict:
    """The function executors call (module level so it pickles into worker processes and Ray tasks).

    ``endpoint_url``: the S3 endpoint of the driver (``--s3-endpoint``). It travels with the task because a worker
    process does not see the driver's ``storage.configure``, and a forkserver started earlier not even its current
    environment. Credentials never travel: workers take them from their own AWS environment or profile."""
    if endpoint_url and storage.endpoint_url() != endpoint_url:
        storage.configure(endpoint_url=endpoint_url)
    return run_shard(out, task.name, task.records, cfg, tick)


# --- the run config --------------------------------------------------------------------------------------------------
def _content_config(cfg_dict: dict) -> dict:
    return {k: v for k, v in cfg_dict.items() if k not in _NOT_CONTENT}


def make_run_config(cfg: PrepConfig, source, tasks: list[ShardTask]) -> dict[str, Any]:
    return {
        "format_version": schema.FORMAT_VERSION,
        "config": cfg.to_dict(),
        "fingerprint": cfg.fingerprint(),
        "versions": versions(),
        "classes": source.classes,
        "source": {
            "kind": source.kind,
            "inputs": sum(len(t) for t in tasks),
            "digest": source_digest([r for t in tasks for r in t.records]),
        },
        "shards": [t.name for t in tasks],
    }


def read_run_config(out: str) -> dict | None:
    path = storage.join(out, schema.RUN_CONFIG_NAME)
    if not storage.exists(path):
        return None
    try:
        return json.loads(storage.read_bytes(path))
    except ValueError as e:
        raise RunConfigError(f"{path}: not valid JSON ({e}); remove it or use --overwrite") from None


def config_differences(old: dict, new: dict) -> list[str]:
    """``["mode: 'quality' in the output, 'fast' now", …]`` for the content settings that differ."""
    old, new = _content_config(old), _content_config(new)
    return [
        f"{k}: {old.get(k, '<unset>')!r} in the output, {new.get(k, '<unset>')!r} now"
        for k in sorted(set(old) | set(new))
        if old.get(k, "<unset>") != new.get(k, "<unset>")
    ]


def check_resume(out: str, old: dict, new: dict) -> None:
    """Raise RunConfigError unless ``new`` (this run) may continue the run recorded in ``old``."""
    path = storage.join(out, schema.RUN_CONFIG_NAME)
    if old.get("fingerprint") != new["fingerprint"]:
        diffs = config_differences(old.get("config", {}), new["config"]) or ["(fingerprint only)"]
        raise RunConfigError(
            f"{out} holds shards made with other settings ({path}):\n  "
            + "\n  ".join(diffs)
            + "\nUse the same settings to resume, another --out, or --overwrite to delete those shards and start over."
        )
    old_v, new_v = old.get("versions") or {}, new["versions"]
    changed = [
        f"{k}: {old_v.get(k, '<unset>')!r} in the output, {new_v.get(k)!r} now"
        for k in _CONTENT_VERSIONS
        if old_v.get(k, "<unset>") != new_v.get(k)
    ]
    if changed:
        raise RunConfigError(
            f"{out} holds shards made with other library versions ({path}):\n  "
            + "\n  ".join(changed)
            + "\nThey change the boxes or the stored images: resume with those versions, use another --out, or "
            "--overwrite to start over."
        )
    if old.get("source", {}).get("digest") != new["source"]["digest"]:
        o, n = old.get("source", {}), new["source"]
        raise RunConfigError(
            f"{out} was started on other inputs ({path}): {o.get('inputs')} inputs (digest {o.get('digest')}) "
            f"in the output, {n['inputs']} inputs (digest {n['digest']}) now. The source changed since the first run; "
            "use another --out or --overwrite."
        )


def _leftover_temp_files(out: str, names: set[str]) -> list[str]:
    """Temporary files of shards in ``names`` left by a killed run (a live writer removes its own on error): in
    ``out`` and, for a remote output, in its local staging directory (full paths there)."""

    def temp_of(n: str) -> bool:
        return layout.temp_shard(n) in names

    found = [storage.join(out, n) for n in storage.list_names(out) if temp_of(n)]
    stage = storage.staging_dir(out)
    if storage.is_remote(out) and os.path.isdir(stage):
        found += [os.path.join(stage, n) for n in sorted(os.listdir(stage)) if temp_of(n)]
    return found


def clear_output(out: str, prefixes: set[str]) -> list[str]:
    """Delete what a previous run with one of ``prefixes`` wrote to ``out`` (and nothing else); returns the names."""
    removed = layout.run_files(storage.list_names(out), prefixes)
    # run config first, so an interrupted clear never leaves shards without it looking resumable with new settings
    removed.sort(key=lambda n: n != schema.RUN_CONFIG_NAME)
    for n in removed:
        storage.remove(storage.join(out, n))
    return removed


def read_shard_stats(out: str, name: str) -> dict:
    """The ``NAME.stats.json`` of shard ``name`` (RunConfigError naming it when it is not JSON)."""
    path = layout.shard_file(out, name, schema.STATS_SUFFIX)
    try:
        return json.loads(storage.read_bytes(path))
    except ValueError as e:
        raise RunConfigError(f"{path}: unreadable stats file ({e}); delete it to redo that shard") from None


# --- a whole run -----------------------------------------------------------------------------------------------------
@dataclass
class RunResult:
    planned: int  # shards in the whole plan
    skipped: list[str]  # this part's shards already done before this run
    written: list[str]  # this part's shards written now
    manifest: dict | None  # set when this run finished the plan and finalized it


def load_source_for(cfg: PrepConfig):
    from prep.sources import load_source

    return load_source(cfg.kind, cfg.root, cfg.annotations)


def run(
    cfg: PrepConfig,
    out: str,
    *,
    workers: int = 1,
    part: tuple[int, int] = (0, 1),
    overwrite: bool = False,
    executor: str = "local",
    progress: bool = True,
    source=None,
    log: Callable[[str], None] = lambda msg: None,
) -> RunResult:
    """Process this part's shard tasks of ``cfg`` into ``out``; finalize when the whole plan is done.

    Raises RunConfigError (other settings / inputs in ``out``) before any work, ShardsFailed after the other shards
    were written when some shard tasks failed."""
    from prep import executors
    from prep.tasks import TasksFailed

    if overwrite and tuple(part) != (0, 1):
        # every part of an array job would clear the whole output, deleting what the other parts had written
        raise RunConfigError(
            f"--overwrite cannot be combined with --part {part[0]}/{part[1]}: each part would delete the shards of "
            f"the others. Clear {out} once (delete it, or use another --out), then run the parts without --overwrite."
        )
    if source is None:
        source = load_source_for(cfg)
    tasks = plan(source.records, cfg)
    mine = select_part(tasks, part)
    storage.makedirs(out)
    new = make_run_config(cfg, source, tasks)
    old: dict | None = None
    if overwrite:
        try:
            previous = read_run_config(out) or {}
        except RunConfigError:  # an unreadable run config is one more thing --overwrite replaces
            previous = {}
        old_cfg = previous.get("config") or {}
        prefixes = {cfg.shard_prefix, old_cfg.get("prefix") or old_cfg.get("kind") or cfg.shard_prefix}
        removed = clear_output(out, prefixes)
        if removed:
            log(f"--overwrite: removed {len(removed)} files of the previous run in {out}")
    else:
        old = read_run_config(out)
    if old is not None:
        check_resume(out, old, new)
    else:
        _check_orphan_stats(out, tasks, new["fingerprint"])
        storage.write_bytes(storage.join(out, schema.RUN_CONFIG_NAME), schema.dumps(new))

    # one listing decides what is done (on S3: one request, not three per shard); a shard with a tar or parquet but
    # no stats is partial and redone, its objects overwritten
    finished = layout.done_shards(out)
    done = [t for t in mine if t.name in finished]
    todo = [t for t in mine if t.name not in finished]
    # a killed run leaves temporary files of the shard it was writing (that shard is redone from scratch); other
    # parts' shards are left alone, their temporary files may belong to a process running now
    for path in _leftover_temp_files(out, {t.name for t in mine}):
        storage.remove(path)
    log(
        f"{len(tasks)} shards planned ({new['source']['inputs']} inputs), part {part[0]}/{part[1]}: "
        f"{len(mine)} shards, {len(done)} already done, {len(todo)} to write"
    )
    run_tasks = executors.get(executor)
    failures: list[tuple[str, str]] = []
    try:
        run_tasks(
            todo, partial(run_task, out, cfg, endpoint_url=storage.endpoint_url()), workers=workers, progress=progress
        )
    except TasksFailed as e:
        failures = e.failures
    written = [t.name for t in todo if t.name not in {n for n, _ in failures}]
    if failures:
        raise ShardsFailed(failures)
    manifest = None
    finished = layout.done_shards(out)
    if all(t.name in finished for t in tasks):
        manifest = finalize(out)
    return RunResult(planned=len(tasks), skipped=[t.name for t in done], written=written, manifest=manifest)


def _check_orphan_stats(out: str, tasks: list[ShardTask], fp: str) -> None:
    """No run config but stats files of this plan: only resume if they were made with these settings."""
    finished = layout.done_shards(out)
    for t in tasks:
        if t.name in finished:
            st = read_shard_stats(out, t.name)
            if st.get("fingerprint") != fp:
                raise RunConfigError(
                    f"{layout.shard_file(out, t.name, schema.STATS_SUFFIX)} was made with other settings (fingerprint "
                    f"{st.get('fingerprint')}, this run {fp}) and {schema.RUN_CONFIG_NAME} is missing; "
                    "use another --out or --overwrite."
                )


def finalize(out: str) -> dict:
    """Write ``OUT/manifest.json`` from every planned shard's stats; RunConfigError if a shard is not done."""
    run_cfg = read_run_config(out)
    if run_cfg is None:
        raise RunConfigError(f"{storage.join(out, schema.RUN_CONFIG_NAME)} not found: {out} is not a prep output")
    names = run_cfg["shards"]
    finished = layout.done_shards(out)  # one listing, not one request per shard
    missing = [n for n in names if n not in finished]
    if missing:
        shown = ", ".join(missing[:10]) + (f" … ({len(missing)} in all)" if len(missing) > 10 else "")
        raise RunConfigError(
            f"cannot finalize {out}: {len(missing)} of {len(names)} planned shards are not done: {shown}"
        )
    shard_stats = [read_shard_stats(out, n) for n in names]
    other = [s["shard"] for s in shard_stats if s.get("fingerprint") != run_cfg["fingerprint"]]
    if other:
        raise RunConfigError(f"cannot finalize {out}: shards made with other settings: {', '.join(other)}")
    # config without the root, so manifest["fingerprint"] equals every shard's stats fingerprint
    manifest = schema.make_manifest(
        config=_content_config(run_cfg["config"]),
        versions=run_cfg["versions"],
        classes=run_cfg.get("classes"),
        stats=shard_stats,
    )
    storage.write_bytes(storage.join(out, schema.MANIFEST_NAME), schema.dumps(manifest))
    return manifest
