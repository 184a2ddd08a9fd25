"""prep.check: verify catches each kind of damage (and passes clean output), show draws chosen samples, stats
accounts for every planned input."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from imagegen import damage_jpeg_in_tar, jpeg_bytes, textured_image
from PIL import Image

from prep import check
from prep import run as prep_run
from prep.cli import prep
from prep.config import PrepConfig
from shards import layout, reader, schema


@pytest.fixture(scope="module")
def output(tmp_path_factory) -> str:
    """A finished output: 7 small images in 3 shards (3, 3, 1)."""
    root = tmp_path_factory.mktemp("imgs")
    for i in range(7):
        (root / f"im{i}.jpg").write_bytes(jpeg_bytes(textured_image(72 + 4 * i, 64, seed=10 + i)))
    out = str(tmp_path_factory.mktemp("out") / "out")
    cfg = PrepConfig(kind="folder", root=str(root), ss_max_side=96, min_side=8, shard_size=3)
    prep_run.run(cfg, out, workers=1, progress=False)
    return out


@pytest.fixture
def copy(output, tmp_path) -> str:
    dst = str(tmp_path / "out")
    shutil.copytree(output, dst)
    return dst


def problems_of(out: str) -> list[str]:
    problems, _ = check.verify(out, echo=lambda line: None)
    return problems


def rewrite_tar(path: str, change) -> None:
    """Rewrite a tar member by member: ``change(name, data)`` returns new bytes, or None to drop the member."""
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            data = change(name, data)
            if data is not None:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_clean_output_verifies(output):
    problems, totals = check.verify(output, echo=lambda line: None)
    assert problems == [] and totals == {"shards": 3, "samples": 7, "inputs": 7, "samples_skipped": {}}


def test_truncated_tar(copy):
    path = os.path.join(copy, "folder-000000.tar")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
    problems = problems_of(copy)
    assert any(p.startswith("folder-000000: stats tar_bytes") for p in problems)
    assert any(p.startswith("folder-000000:") and ("unreadable" in p or "no tar sample" in p) for p in problems)
    assert not any(p.startswith("folder-000001") for p in problems)


def test_tar_cut_between_members_is_caught_by_the_readers_end_marker_check(copy):
    # a tar cut right after a member parses as a complete archive with tarfile; only the missing end-of-archive
    # marker tells, and verify reads through shards.reader, which checks it
    path = os.path.join(copy, "folder-000000.tar")
    with tarfile.open(path) as tar:
        last = tar.getmembers()[-1]
    end = last.offset_data + -(-last.size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
    with open(path, "r+b") as f:
        f.truncate(end)
    problems = problems_of(copy)
    # every sample is whole before the cut (the last one too): only the missing end-of-archive marker tells
    assert any(
        p.startswith("folder-000000: tar unreadable after 3 samples") and "no end-of-archive marker" in p
        for p in problems
    ), problems
    assert all(p.startswith("folder-000000") for p in problems), problems


def test_deleted_member(copy):
    path = os.path.join(copy, "folder-000001.tar")
    keys = []
    rewrite_tar(path, lambda name, data: keys.append(name) or (None if len(keys) == 3 else data))  # 2nd sample's jpg
    problems = problems_of(copy)
    key = keys[2].split(".")[0]
    assert problems == [f"folder-000001: {key}: has no {key}.jpg (readers skip it: missing_member)"]
    r = CliRunner().invoke(prep, ["verify", copy])
    assert r.exit_code == 1 and "1 sample(s) that readers skip (missing_member 1)" in r.output


def test_extra_member_without_parquet_row(copy):
    path = os.path.join(copy, "folder-000002.tar")
    with tarfile.open(path) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar]
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        stray_meta = json.dumps({**json.loads(members[1][1]), "key": "stray"}).encode()
        for name, data in members + [("stray.jpg", members[0][1]), ("stray.json", stray_meta)]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert "folder-000002: tar sample 'stray' has no parquet ok row" in problems_of(copy)


def test_boxes_outside_image_and_undecodable_image(copy):
    names = []

    def damage(name: str, data: bytes):
        names.append(name)
        if len(names) == 2:  # the first sample's KEY.json: a box past the right edge
            meta = json.loads(data)
            meta["boxes"][0] = [0, 0, meta["width"] + 5, 10]
            return json.dumps(meta).encode()
        if len(names) == 3:  # the second sample's JPEG: same length, not a JPEG any more
            return b"\xff\xd8" + b"\x00" * (len(data) - 2)
        return data

    rewrite_tar(os.path.join(copy, "folder-000001.tar"), damage)
    first, second = names[0].split(".")[0], names[2].split(".")[0]
    problems = problems_of(copy)
    assert any(p.startswith(f"folder-000001: {first}: box 0 [0, 0, ") and "(readers skip it: bad_boxes)" in p
               for p in problems), problems  # fmt: skip
    # the hash tells first; the decode is checked too, as --quick shows
    assert f"folder-000001: {second}: {second}.jpg does not have the SHA-256 recorded in {second}.json (damaged in " \
        "storage) (readers skip it: image_sha256)" in problems  # fmt: skip
    quick = check.verify(copy, echo=lambda line: None, quick=True)[0]
    assert any(f"{second}.jpg: does not decode" in p and "bad_image" in p for p in quick), quick


def test_damaged_but_decodable_image_is_caught_by_its_hash(copy):
    key = damage_jpeg_in_tar(os.path.join(copy, "folder-000001.tar")).split(".")[0]
    problems = problems_of(copy)
    assert problems == [
        f"folder-000001: {key}: {key}.jpg does not have the SHA-256 recorded in {key}.json (damaged in storage) "
        "(readers skip it: image_sha256)"
    ]
    assert check.verify(copy, echo=lambda line: None, quick=True)[0] == []  # --quick does not hash
    r = CliRunner().invoke(prep, ["verify", copy])
    assert r.exit_code == 1 and f"folder-000001: {key}: {key}.jpg does not have the SHA-256" in r.output
    r = CliRunner().invoke(prep, ["verify", "--quick", copy])
    assert r.exit_code == 0 and "ok: 3 shards, 7 samples" in r.output


def test_format_version_2_records_image_hashes(output):
    for name in ("folder-000000", "folder-000002"):
        samples = list(reader.read_shard(os.path.join(output, name + ".tar")))
        rows = [r for r in check._read_parquet(os.path.join(output, name + ".parquet")).to_pylist()]
        assert [s["meta"]["format_version"] for s in samples] == [2] * len(samples)
        assert [s["meta"]["image_sha256"] for s in samples] == [schema.image_sha256(s["jpg"]) for s in samples]
        assert [r["image_sha256"] for r in rows] == [s["meta"]["image_sha256"] for s in samples]
    stats = json.loads(Path(output, "folder-000000.stats.json").read_text())
    manifest = json.loads(Path(output, schema.MANIFEST_NAME).read_text())
    assert stats["format_version"] == manifest["format_version"] == 2
    assert "fallback_images" in stats and "fallback_images" in manifest["totals"]


def downgrade_to_version_1(out: str) -> None:
    """Rewrite an output as format version 1 had it: no image hashes, no fallback counts, version 1 everywhere."""
    import pyarrow.parquet as pq

    def v1_member(name: str, data: bytes) -> bytes:
        if not name.endswith(".json"):
            return data
        meta = json.loads(data)
        del meta["image_sha256"]
        return json.dumps({**meta, "format_version": 1}, sort_keys=True, separators=(",", ":")).encode()

    for name in layout.shard_names(os.listdir(out)):
        base = os.path.join(out, name)
        rewrite_tar(base + schema.TAR_SUFFIX, v1_member)
        pq.write_table(
            pq.read_table(base + schema.PARQUET_SUFFIX).drop_columns(list(schema.ADDED_COLUMNS[2])),
            base + schema.PARQUET_SUFFIX,
        )
        st = json.loads(Path(base + schema.STATS_SUFFIX).read_text())
        del st["fallback_images"]
        st.update(
            format_version=1,
            tar_bytes=os.path.getsize(base + schema.TAR_SUFFIX),
            parquet_bytes=os.path.getsize(base + schema.PARQUET_SUFFIX),
        )
        Path(base + schema.STATS_SUFFIX).write_text(json.dumps(st))
    path = os.path.join(out, schema.MANIFEST_NAME)
    manifest = json.loads(Path(path).read_text())
    del manifest["totals"]["fallback_images"]
    manifest["format_version"] = 1
    manifest["totals"]["tar_bytes"] = sum(os.path.getsize(os.path.join(out, s["tar"])) for s in manifest["shards"])
    Path(path).write_text(json.dumps(manifest))


def test_format_version_1_is_still_read(copy, tmp_path):
    downgrade_to_version_1(copy)
    assert problems_of(copy) == []  # nothing to hash against: verify checks the rest
    summary = check.summarize(copy)
    assert summary["images"]["ok"] == 7 and summary["counts_add_up"]
    assert len(check.show(copy, str(tmp_path / "g.png"), n=3)) == 3
    urls = reader.expand_spec(os.path.join(copy, schema.MANIFEST_NAME))
    metas = [s["meta"] for u in urls for s in reader.read_shard(u)]
    assert len(metas) == 7 and {m["format_version"] for m in metas} == {1}
    assert {m["image_sha256"] for m in metas} == {None}
    row = check._read_parquet(urls[0][: -len(".tar")] + ".parquet").to_pylist()[0]
    assert row["image_sha256"] is None and row["fallback_boxes"] is None and row["kept_boxes"] > 0


def test_changed_stats_and_manifest(copy):
    path = os.path.join(copy, "folder-000000.stats.json")
    st = json.loads(Path(path).read_text())
    st["failed"] = {"corrupt": 1}
    Path(path).write_text(json.dumps(st))
    mpath = os.path.join(copy, schema.MANIFEST_NAME)
    manifest = json.loads(Path(mpath).read_text())
    manifest["totals"]["samples"] = 99
    Path(mpath).write_text(json.dumps(manifest))
    problems = problems_of(copy)
    assert "folder-000000: stats failed = {'corrupt': 1}, but the shard has {}" in problems
    assert f"{schema.MANIFEST_NAME}: totals samples = 99, the shards' stats add up to 7" in problems


def test_missing_files_and_incomplete_run(copy):
    os.remove(os.path.join(copy, "folder-000001.stats.json"))
    os.remove(os.path.join(copy, "folder-000002.parquet"))
    os.remove(os.path.join(copy, "folder-000002.tar"))
    os.remove(os.path.join(copy, "folder-000002.stats.json"))
    problems = problems_of(copy)
    assert "folder-000001: missing folder-000001.stats.json (not done: rerun prep to redo it)" in problems
    assert f"folder-000002: planned in {schema.RUN_CONFIG_NAME} but absent" in problems
    summary = check.summarize(copy)
    assert summary["accounting"] == {"planned_inputs": 7, "rows": 6, "ok": 6, "failed": 0, "adds_up": False}
    assert "the run is not finished" in check.format_summary(summary)


def test_show_draws_the_chosen_samples(output, tmp_path):
    a = check.show(output, str(tmp_path / "a.png"), n=3, seed=4, cell=96)
    b = check.show(output, str(tmp_path / "b.png"), n=3, seed=4, cell=96)
    assert a == b and len(set(a)) == 3
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    im = Image.open(tmp_path / "a.png").convert("RGB")
    assert im.size == (2 * 96, 2 * (96 + 14))
    pixels = np.asarray(im).reshape(-1, 3)
    assert (pixels == (255, 0, 0)).all(axis=1).any()  # the first-ranked box is drawn in red
    assert len(check.show(output, str(tmp_path / "c.png"), n=50)) == 7  # n larger than the output: every sample
    assert check.rank_colour(0, 10) == (255, 0, 0) and check.rank_colour(9, 10)[2] == 255


def test_show_leaves_out_a_bad_sample_and_names_it(copy, tmp_path):
    names = []

    def damage(name: str, data: bytes):
        names.append(name)
        if len(names) == 2:  # the first sample's KEY.json: a box far outside the image
            return json.dumps({**json.loads(data), "boxes": [[0, 0, 9000, 9000]]}).encode()
        if len(names) == 3:  # the second sample's JPEG: it does not decode
            return b"\xff\xd8" + b"\x00" * (len(data) - 2)
        return data

    rewrite_tar(os.path.join(copy, "folder-000000.tar"), damage)
    bad = {names[0].split(".")[0], names[2].split(".")[0]}
    r = CliRunner().invoke(prep, ["show", copy, "-n", "50", "-o", str(tmp_path / "g.png")])
    assert r.exit_code == 0, r.output
    assert r.stdout.strip() == f"{tmp_path / 'g.png'}: 5 samples (2 bad ones skipped)"
    lines = [line for line in r.stderr.splitlines() if line.startswith("skipping a bad sample: ")]
    assert len(lines) == 2 and all(os.path.join(copy, "folder-000000.tar") in line for line in lines)
    assert {line.split("sample '")[1].split("'")[0] for line in lines} == bad
    assert "bad_image" not in r.stderr and "does not decode" in lines[1]


def test_show_and_stats_on_empty_output(tmp_path):
    with pytest.raises(check.CheckError, match="no samples"):
        check.show(str(tmp_path), str(tmp_path / "g.png"))
    with pytest.raises(check.CheckError, match="parquet"):
        check.summarize(str(tmp_path))


def test_stats_over_http_reads_no_tar(output, copy, http_server):
    from click.testing import CliRunner

    from prep.cli import prep

    local = check.summarize(output)
    server = http_server(output)
    assert check.summarize(server.url) == local
    r = CliRunner().invoke(prep, ["stats", server.url, "--json"])
    assert r.exit_code == 0 and json.loads(r.output) == json.loads(json.dumps(local)), r.output
    paths = [path for _, path, _ in server.log]
    assert paths and not any(p.endswith(schema.TAR_SUFFIX) for p in paths), paths

    # no manifest (an unfinished run): the run config's plan names the shards, the stats files say which are done
    os.remove(os.path.join(copy, schema.MANIFEST_NAME))
    os.remove(os.path.join(copy, "folder-000001.stats.json"))
    os.remove(os.path.join(copy, "folder-000002.parquet"))
    server = http_server(copy)
    summary = check.summarize(server.url)
    assert summary["accounting"] == {"planned_inputs": 7, "rows": 6, "ok": 6, "failed": 0, "adds_up": False}
    assert summary["count_problems"] == [
        "folder-000002: has a stats file but no parquet rows",
        "folder-000001: parquet rows but no stats file (shard not done)",
    ]
    assert not any(p.endswith(schema.TAR_SUFFIX) for _, p, _ in server.log)
    os.remove(os.path.join(copy, schema.RUN_CONFIG_NAME))
    with pytest.raises(check.CheckError, match="neither manifest.json nor prep_config.json"):
        check.summarize(server.url)
