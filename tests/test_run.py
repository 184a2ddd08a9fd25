"""prep.run: planning, one record, resume, settings checks, --part, failures, reproducibility."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
from imagegen import jpeg_bytes, textured_image, write_bad_inputs

from prep import run as prep_run
from prep.config import PrepConfig
from prep.sources import Record, load_source
from shards import schema


def write_images(directory: str, n: int) -> str:
    """n small textured JPEGs (64-96 px) named img_00.jpg … in ``directory``."""
    os.makedirs(directory, exist_ok=True)
    for i in range(n):
        w, h = 64 + 8 * (i % 5), 96 - 8 * (i % 4)
        with open(os.path.join(directory, f"img_{i:02d}.jpg"), "wb") as f:
            f.write(jpeg_bytes(textured_image(w, h, seed=i)))
    return directory


def small_cfg(root: str, **kw) -> PrepConfig:
    # tiny images: selective search on <= 96 px, boxes down to 8 px, 3 inputs per shard
    base = dict(kind="folder", root=root, ss_max_side=96, min_side=8, shard_size=3)
    base.update(kw)
    return PrepConfig(**base)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> str:
    return write_images(str(tmp_path_factory.mktemp("images")), 10)


def shard_files(out: str, suffix: str) -> dict[str, bytes]:
    return {n: open(os.path.join(out, n), "rb").read() for n in sorted(os.listdir(out)) if n.endswith(suffix)}


def parquet_rows(out: str) -> dict[str, list[dict]]:
    """Parquet rows per shard without the timing columns."""
    rows = {}
    for n in sorted(os.listdir(out)):
        if n.endswith(schema.PARQUET_SUFFIX):
            t = pq.read_table(os.path.join(out, n))
            rows[n] = t.drop_columns(list(schema.NONDETERMINISTIC_COLUMNS)).to_pylist()
    return rows


def assert_same_output(a: str, b: str) -> None:
    tars_a, tars_b = shard_files(a, schema.TAR_SUFFIX), shard_files(b, schema.TAR_SUFFIX)
    assert tars_a.keys() == tars_b.keys() and tars_a
    for n in tars_a:
        assert tars_a[n] == tars_b[n], f"{n} differs"
    assert parquet_rows(a) == parquet_rows(b)
    assert shard_files(a, schema.MANIFEST_NAME) == shard_files(b, schema.MANIFEST_NAME)


# --- planning --------------------------------------------------------------------------------------------------------
def test_plan_chunks_records_in_order(images):
    cfg = small_cfg(images, prefix="x")
    records = load_source("folder", images).records
    tasks = prep_run.plan(records, cfg)
    assert [t.name for t in tasks] == ["x-000000", "x-000001", "x-000002", "x-000003"]
    assert [len(t) for t in tasks] == [3, 3, 3, 1]
    assert [r for t in tasks for r in t.records] == records
    assert [t.name for t in prep_run.select_part(tasks, (1, 2))] == ["x-000001", "x-000003"]
    assert prep_run.parse_part("1/4") == (1, 4)
    for bad in ("4/4", "-1/2", "1", "a/b", "0/0"):
        with pytest.raises(ValueError, match="part"):
            prep_run.parse_part(bad)


# --- one record ------------------------------------------------------------------------------------------------------
def test_process_record_ok_row_matches_meta(images):
    cfg = small_cfg(images)
    rec = load_source("folder", images).records[0]
    row, jpeg, meta = prep_run.process_record(rec, cfg)
    assert row["status"] == "ok" and row["key"] == rec.key and row["path"] == rec.relpath
    with open(rec.path, "rb") as f:
        assert jpeg == f.read()  # an RGB JPEG needing no change is stored as it is
    m = schema.decode_meta(meta)
    assert (m["width"], m["height"]) == (row["width"], row["height"]) == (64, 96)
    assert m["boxes"].tolist() == row["boxes"] and row["kept_boxes"] == len(row["boxes"]) > 0
    assert row["raw_boxes"] >= row["kept_boxes"] and row["image_bytes"] == len(jpeg)


def test_process_record_failures_become_rows(tmp_path, monkeypatch):
    (tmp_path / "text.jpg").write_bytes(b"not an image\n" * 5)
    cfg = small_cfg(str(tmp_path))
    missing = Record(key="gone", path=str(tmp_path / "gone.jpg"), relpath="gone.jpg", label=3)
    row, jpeg, meta = prep_run.process_record(missing, cfg)
    assert (row["status"], row["label"], jpeg, meta) == ("missing", 3, None, None)
    assert "gone.jpg" in row["error"]
    text = Record(key="text", path=str(tmp_path / "text.jpg"), relpath="text.jpg")
    assert prep_run.process_record(text, cfg)[0]["status"] == "not_image"

    # selective search raising (any exception type) is one failed row, not a dead run
    write_images(str(tmp_path / "ok"), 1)
    good = Record(key="good", path=str(tmp_path / "ok" / "img_00.jpg"), relpath="ok/img_00.jpg", image_id=7)

    def broken(*args, **kwargs):
        raise MemoryError("cv2 out of memory")

    monkeypatch.setattr("prep.proposals.selective_search", broken)
    row, jpeg, meta = prep_run.process_record(good, cfg)
    assert row["status"] == "proposal_failed" and "MemoryError: cv2 out of memory" in row["error"]
    assert (row["width"], row["height"], row["image_id"], jpeg) == (64, 96, 7, None)


# --- whole runs ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(images, tmp_path_factory) -> str:
    """An uninterrupted one-worker run over the 10 images (4 shards)."""
    out = str(tmp_path_factory.mktemp("ref") / "out")
    result = prep_run.run(small_cfg(images), out, workers=1, progress=False)
    assert result.manifest is not None and len(result.written) == 4
    return out


def test_runs_are_byte_identical_across_runs_and_worker_counts(images, reference, tmp_path):
    again = str(tmp_path / "again")
    prep_run.run(small_cfg(images), again, workers=1, progress=False)
    assert_same_output(reference, again)
    two = str(tmp_path / "two")
    prep_run.run(small_cfg(images), two, workers=2, progress=False)
    assert_same_output(reference, two)


def test_rerun_skips_done_shards_and_redoes_partial_ones(images, reference, tmp_path):
    out = str(tmp_path / "out")
    shutil.copytree(reference, out)
    result = prep_run.run(small_cfg(images), out, workers=1, progress=False)
    assert result.written == [] and len(result.skipped) == 4

    # what a killed run leaves: a shard without stats, temporary files of the shard being written, no manifest
    os.remove(os.path.join(out, "folder-000002.stats.json"))
    os.remove(os.path.join(out, schema.MANIFEST_NAME))
    with open(os.path.join(out, "folder-000002.tar"), "r+b") as f:
        f.truncate(100)
    for leftover in (".folder-000003.tar.abc123.tmp", ".folder-000003.parquet.x.tmp"):
        (tmp_path / "out" / leftover).write_bytes(b"partial")
    result = prep_run.run(small_cfg(images), out, workers=1, progress=False)
    assert result.written == ["folder-000002"] and result.manifest is not None
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
    assert_same_output(reference, out)


def test_other_settings_are_refused_and_overwrite_starts_over(images, reference, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    (out / "notes.txt").write_text("mine")
    (out / "other-000000.tar").write_bytes(b"another prefix, not this run's")
    with pytest.raises(prep_run.RunConfigError) as e:
        prep_run.run(small_cfg(images, seed=5, mode="single"), str(out), workers=1, progress=False)
    msg = str(e.value)
    assert "mode: 'fast' in the output, 'single' now" in msg and "seed: 0 in the output, 5 now" in msg
    assert schema.RUN_CONFIG_NAME in msg and "--overwrite" in msg

    result = prep_run.run(
        small_cfg(images, seed=5, prefix="new", shard_size=5), str(out), workers=1, progress=False, overwrite=True
    )
    names = sorted(os.listdir(out))
    assert not [n for n in names if n.startswith("folder-")]  # the previous run's shards are gone
    assert "notes.txt" in names and "other-000000.tar" in names  # nothing else is touched
    assert len(result.written) == 2 and json.loads((out / schema.MANIFEST_NAME).read_text())["config"]["seed"] == 5


def test_resume_with_other_opencv_or_pillow_is_refused(images, reference, tmp_path):
    # another OpenCV gives other boxes (another Pillow other pixels and JPEG bytes): resuming would mix them in one
    # output under a manifest that names the first versions only
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    os.remove(out / "folder-000003.stats.json")
    path = out / schema.RUN_CONFIG_NAME
    original = json.loads(path.read_text())
    for lib in ("opencv", "pillow"):
        changed = json.loads(json.dumps(original))
        changed["versions"][lib] = "0.0.1"
        path.write_text(json.dumps(changed))
        with pytest.raises(prep_run.RunConfigError, match=f"{lib}: '0.0.1' in the output, '[^']+' now"):
            prep_run.run(small_cfg(images), str(out), workers=1, progress=False)
    # versions that do not decide shard content (e.g. running from a checkout, another Python) still resume
    changed = json.loads(json.dumps(original))
    changed["versions"].update(prep="0.0.1", python="3.0.0", pyarrow="1.0")
    path.write_text(json.dumps(changed))
    result = prep_run.run(small_cfg(images), str(out), workers=1, progress=False)
    assert result.written == ["folder-000003"]


def test_changed_inputs_are_refused(images, reference, tmp_path):
    root = tmp_path / "imgs"
    shutil.copytree(images, root)
    out = str(tmp_path / "out")
    shutil.copytree(reference, out)
    prep_run.run(small_cfg(str(root)), out, workers=1, progress=False)  # moved root, same inputs: resumes
    write_images(str(root / "more"), 1)
    with pytest.raises(prep_run.RunConfigError, match="other inputs.*10 inputs.*11 inputs"):
        prep_run.run(small_cfg(str(root)), out, workers=1, progress=False)


def test_parts_then_manifest_equals_single_run(images, reference, tmp_path):
    out = str(tmp_path / "out")
    first = prep_run.run(small_cfg(images), out, workers=1, part=(0, 2), progress=False)
    assert first.written == ["folder-000000", "folder-000002"] and first.manifest is None
    with pytest.raises(
        prep_run.RunConfigError, match="2 of 4 planned shards are not done: folder-000001, folder-000003"
    ):
        prep_run.finalize(out)
    second = prep_run.run(small_cfg(images), out, workers=2, part=(1, 2), progress=False)
    assert second.written == ["folder-000001", "folder-000003"] and second.manifest is not None
    assert_same_output(reference, out)
    assert prep_run.finalize(out) == second.manifest


def test_overwrite_with_part_is_refused_before_deleting_anything(images, reference, tmp_path):
    # in an array job every task would clear the whole output, deleting the shards the other parts had written
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    before = sorted(os.listdir(out))
    with pytest.raises(prep_run.RunConfigError, match="--overwrite.*--part"):
        prep_run.run(small_cfg(images, seed=3), str(out), workers=1, part=(1, 2), overwrite=True, progress=False)
    assert sorted(os.listdir(out)) == before


def test_failed_shard_is_reported_and_others_are_kept(images, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "folder-000001.stats.json").mkdir()  # the writer cannot replace it: that shard task fails
    for workers in (1, 2):
        with pytest.raises(prep_run.ShardsFailed) as e:
            prep_run.run(small_cfg(images), str(out), workers=workers, progress=False)
        assert [n for n, _ in e.value.failures] == ["folder-000001"]
        assert "folder-000001" in str(e.value) and "rerun" in str(e.value)
        done = sorted(n for n in os.listdir(out) if n.endswith(".stats.json") and (out / n).is_file())
        assert done == ["folder-000000.stats.json", "folder-000002.stats.json", "folder-000003.stats.json"]
        assert not (out / schema.MANIFEST_NAME).exists()
        assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
        for n in done:
            os.remove(out / n)  # so the two-worker round runs them again


def test_bad_inputs_all_end_up_as_samples_or_error_rows(tmp_path):
    from prep import check

    root = tmp_path / "bad"
    expected = write_bad_inputs(str(root))
    out = str(tmp_path / "out")
    result = prep_run.run(small_cfg(str(root), shard_size=4), out, workers=2, progress=False)
    rows = [r for shard in parquet_rows(out).values() for r in shard]
    assert sorted(r["path"] for r in rows) == sorted(expected)
    for r in rows:
        assert r["status"] == expected[r["path"]], (r["path"], r["error"])
        assert (r["error"] is None) == (r["status"] == "ok")
    totals = result.manifest["totals"]
    n_ok = sum(s == "ok" for s in expected.values())
    assert (totals["inputs"], totals["samples"]) == (len(expected), n_ok)
    assert sum(totals["failed"].values()) == len(expected) - n_ok
    summary = check.summarize(out)
    assert summary["counts_add_up"] and summary["accounting"]["adds_up"]
    text = check.format_summary(summary)
    assert "counts add up" in text and f"{len(expected)} planned = {n_ok} ok + {len(expected) - n_ok} failed" in text
    assert "failed too_large: 1" in text and "failed empty: 1" in text
    problems, _ = check.verify(out, echo=lambda line: None)
    assert problems == []


def test_error_rows_do_not_depend_on_where_the_source_root_is(tmp_path):
    # root is left out of the fingerprint so a moved data set resumes; its rows must not name the old location,
    # and two people with the same data at different mount points must get the same parquet
    write_bad_inputs(str(tmp_path / "a" / "data"))
    shutil.copytree(tmp_path / "a" / "data", tmp_path / "elsewhere")
    outs = []
    for root in (tmp_path / "a" / "data", tmp_path / "elsewhere"):
        outs.append(str(tmp_path / f"out_{root.name}"))
        prep_run.run(small_cfg(str(root), shard_size=20), outs[-1], workers=1, progress=False)
    rows = parquet_rows(outs[0])
    errors = [r["error"] for shard in rows.values() for r in shard if r["error"]]
    assert errors and not [e for e in errors if str(tmp_path) in e]
    assert rows == parquet_rows(outs[1])


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_outputs_get_the_permissions_of_the_umask(images, tmp_path, umask, mask):
    # temporary files are renamed into place: they must not keep the 0600 of tempfile.mkstemp
    umask(mask)
    out = tmp_path / "out"
    prep_run.run(small_cfg(images), str(out), workers=1, progress=False)
    modes = {n: os.stat(out / n).st_mode & 0o777 for n in os.listdir(out)}
    assert {
        schema.MANIFEST_NAME,
        schema.RUN_CONFIG_NAME,
        "folder-000000.tar",
        "folder-000000.parquet",
        "folder-000000.stats.json",
    } <= set(modes)
    assert modes == dict.fromkeys(modes, 0o666 & ~mask), modes


def test_versions_name_every_library():
    v = prep_run.versions()
    assert {"prep", "opencv", "numpy", "pyarrow", "python"} <= set(v)
    assert all(isinstance(x, str) and x for x in v.values())
    assert np.__version__ == v["numpy"]
