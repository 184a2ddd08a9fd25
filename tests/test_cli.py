"""The `prep` command line: end to end in process (CliRunner) and as `python -m prep` (subprocess), a real kill and
resume, clear errors before any work, and no torch in the prep/shards import graph."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from imagegen import jpeg_bytes, textured_image

from prep.cli import prep
from shards import schema
from tests.wait import wait_until

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--ss-max-side", "96", "--min-side", "8", "--shard-size", "3", "--no-progress"]


def write_images(directory, n: int, size: int = 80) -> str:
    os.makedirs(directory, exist_ok=True)
    for i in range(n):
        with open(os.path.join(directory, f"img_{i:02d}.jpg"), "wb") as f:
            f.write(jpeg_bytes(textured_image(size, size * 3 // 4, seed=i)))
    return str(directory)


def invoke(*args: str):
    return CliRunner().invoke(prep, [str(a) for a in args], catch_exceptions=False)


def python_m_prep(*args: str, **kwargs) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.run(
        [sys.executable, "-m", "prep", *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True, **kwargs
    )


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> str:
    return write_images(tmp_path_factory.mktemp("imgs"), 7)


def tars(out) -> dict[str, bytes]:
    return {n: open(os.path.join(out, n), "rb").read() for n in sorted(os.listdir(out)) if n.endswith(".tar")}


def rows(out) -> list[dict]:
    return [
        r
        for n in sorted(os.listdir(out))
        if n.endswith(".parquet")
        for r in pq.read_table(os.path.join(out, n)).drop_columns(list(schema.NONDETERMINISTIC_COLUMNS)).to_pylist()
    ]


def test_end_to_end_in_process(images, tmp_path):
    out = tmp_path / "out"
    r = invoke("folder", images, "--out", out, "--workers", "1", *FAST)
    assert r.exit_code == 0, r.output
    assert "manifest written: 7 inputs = 7 samples + 0 failed" in r.output
    manifest = json.loads((out / schema.MANIFEST_NAME).read_text())
    assert [s["name"] for s in manifest["shards"]] == ["folder-000000", "folder-000001", "folder-000002"]

    r = invoke("stats", out)
    assert r.exit_code == 0 and "counts add up" in r.output and "every input accounted for" in r.output
    r = invoke("stats", out, "--json", "--plot", tmp_path / "stats.png")
    assert r.exit_code == 0 and (tmp_path / "stats.png").stat().st_size > 1000
    summary = json.loads(r.output[: r.output.rindex("}") + 1])
    assert summary["images"]["ok"] == 7 and summary["accounting"]["adds_up"]

    r = invoke("show", out, "-n", "4", "-o", tmp_path / "grid.png", "--seed", "1")
    assert r.exit_code == 0 and "4 samples" in r.output
    from PIL import Image

    assert Image.open(tmp_path / "grid.png").size == (2 * 256, 2 * (256 + 14))

    r = invoke("verify", out)
    assert r.exit_code == 0 and "ok: 3 shards, 7 samples" in r.output
    os.remove(out / schema.MANIFEST_NAME)
    r = invoke("finalize", out)
    assert r.exit_code == 0 and json.loads((out / schema.MANIFEST_NAME).read_text()) == manifest


def test_python_m_prep_two_workers_matches_in_process_run(images, tmp_path):
    r = python_m_prep("--help")
    assert r.returncode == 0 and all(c in r.stdout for c in ("coco", "imagenet", "folder", "verify", "finalize"))
    help_text = " ".join(python_m_prep("folder", "--help").stdout.split())  # unwrapped
    assert "--ss-max-side" in help_text and "default: 500" in help_text and "--part I/N" in help_text

    a, b = tmp_path / "a", tmp_path / "b"
    assert invoke("folder", images, "--out", a, "--workers", "1", *FAST).exit_code == 0
    r = python_m_prep("folder", images, "--out", b, "--workers", "2", *FAST)
    assert r.returncode == 0, r.stderr
    assert tars(a) == tars(b) and rows(a) == rows(b)
    assert (a / schema.MANIFEST_NAME).read_bytes() == (b / schema.MANIFEST_NAME).read_bytes()


def test_killed_run_resumes_to_identical_output(tmp_path):
    """SIGKILL (no cleanup at all) after the first shard is done; the rerun equals an uninterrupted run."""
    root = write_images(tmp_path / "imgs", 12, size=128)
    args = [
        "folder",
        root,
        "--workers",
        "1",
        "--ss-max-side",
        "128",
        "--min-side",
        "8",
        "--shard-size",
        "2",
        "--no-progress",
    ]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert invoke(*args, "--out", whole).exit_code == 0

    proc = subprocess.Popen(
        [sys.executable, "-m", "prep", *args, "--out", str(killed)],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=REPO),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def first_shard_done() -> bool:
        assert proc.poll() is None, "the run ended before its first shard was done"
        return (killed / "folder-000000.stats.json").exists()

    # checked often: the kill must land before the last of the 6 shards is done
    wait_until(first_shard_done, 120, "the first shard's stats file", interval=0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    done = [n for n in os.listdir(killed) if n.endswith(".stats.json")]
    assert not (killed / schema.MANIFEST_NAME).exists() and len(done) < 6, "killed too late to test a resume"

    r = invoke(*args, "--out", killed)
    assert r.exit_code == 0, r.output
    assert f"{6 - len(done)} shards written, {len(done)} already done" in r.output
    assert tars(whole) == tars(killed) and rows(whole) == rows(killed)
    assert (whole / schema.MANIFEST_NAME).read_bytes() == (killed / schema.MANIFEST_NAME).read_bytes()
    assert not [n for n in os.listdir(killed) if n.startswith(".")]


def test_errors_before_any_work(images, tmp_path):
    out = tmp_path / "out"
    r = invoke("folder", tmp_path / "nope", "--out", out)
    assert r.exit_code == 2 and "nope" in r.output and "does not exist" in r.output
    bad = tmp_path / "instances.json"
    bad.write_text("{not json")
    r = invoke("coco", images, "--annotations", bad, "--out", out)
    assert r.exit_code == 2 and "instances.json" in r.output and "invalid JSON" in r.output
    for part in ("2/2", "x", "1/0"):
        r = invoke("folder", images, "--out", out, "--part", part)
        assert r.exit_code == 2 and "--part" in r.output, r.output
    r = invoke("folder", images, "--out", out, "--prefix", "a/b")
    assert r.exit_code == 2 and "--prefix 'a/b'" in r.output
    (tmp_path / "file").write_text("")
    r = invoke("folder", images, "--out", tmp_path / "file")
    assert r.exit_code == 2 and "not a directory" in r.output
    empty = tmp_path / "empty"
    empty.mkdir()
    r = invoke("folder", empty, "--out", out)
    assert r.exit_code == 2 and "no image files" in r.output
    assert not out.exists()  # nothing was started
    r = invoke("finalize", tmp_path)
    assert r.exit_code == 1 and schema.RUN_CONFIG_NAME in r.output


def test_resume_with_other_settings_is_refused_then_overwrite(images, tmp_path):
    out = tmp_path / "out"
    assert invoke("folder", images, "--out", out, "--workers", "1", *FAST).exit_code == 0
    r = invoke("folder", images, "--out", out, "--workers", "1", *FAST, "--iou", "0.7")
    assert r.exit_code == 1 and "iou: 0.5 in the output, 0.7 now" in r.output and "--overwrite" in r.output
    r = invoke("folder", images, "--out", out, "--workers", "1", *FAST, "--iou", "0.7", "--overwrite")
    assert r.exit_code == 0 and "3 shards written, 0 already done" in r.output
    r = invoke("folder", images, "--out", out, "--workers", "1", *FAST, "--iou", "0.7")
    assert r.exit_code == 0 and "0 shards written, 3 already done" in r.output


def test_fallback_tier_flags(images, tmp_path):
    def run(name, *flags):
        out = tmp_path / name
        r = invoke("folder", images, "--out", out, "--workers", "1", *FAST[:2], *FAST[4:], "--min-side", "40", *flags)
        assert r.exit_code == 0, r.output
        return json.loads((out / schema.MANIFEST_NAME).read_text())["config"], rows(out)

    two_cfg, two = run("two", "--fallback-min-side", "20", "--min-boxes", "8")
    one_cfg, one = run("one", "--fallback-min-side", "0", "--min-boxes", "8")
    assert (two_cfg["min_side"], two_cfg["fallback_min_side"]) == (40, 20) and one_cfg["fallback_min_side"] is None
    side = lambda b: min(b[2] - b[0], b[3] - b[1])  # noqa: E731
    for a, b in zip(
        one, two, strict=True
    ):  # the same first tier, then the fallback's boxes (shorter side in [20, 40)) after it
        assert b["boxes"][: a["kept_boxes"]] == a["boxes"]
        assert all(20 <= side(x) < 40 for x in b["boxes"][a["kept_boxes"] :])
    assert sum(r["kept_boxes"] for r in two) > sum(r["kept_boxes"] for r in one)
    default = invoke("folder", images, "--out", tmp_path / "d", "--workers", "1", *FAST[:2], *FAST[4:])
    assert default.exit_code == 0
    d = json.loads((tmp_path / "d" / schema.MANIFEST_NAME).read_text())["config"]
    assert (d["min_side"], d["fallback_min_side"], d["min_boxes"]) == (96, 64, 4)


def test_parts_then_finalize(images, tmp_path):
    out = tmp_path / "out"
    r = invoke("folder", images, "--out", out, "--workers", "1", "--part", "1/2", *FAST)
    assert r.exit_code == 0 and "prep finalize" in r.output and not (out / schema.MANIFEST_NAME).exists()
    r = invoke("finalize", out)
    assert r.exit_code == 1 and "folder-000000, folder-000002" in r.output
    r = invoke("folder", images, "--out", out, "--workers", "1", "--part", "0/2", *FAST)
    assert r.exit_code == 0 and "manifest written" in r.output


def test_verify_fails_on_damage(images, tmp_path):
    out = tmp_path / "out"
    assert invoke("folder", images, "--out", out, "--workers", "1", *FAST).exit_code == 0
    stats = out / "folder-000001.stats.json"
    st = json.loads(stats.read_text())
    st["samples"] += 1
    stats.write_text(json.dumps(st))
    r = invoke("verify", out)
    assert r.exit_code == 1 and "folder-000001: stats samples = 4, but the shard has 3" in r.output


def test_import_prep_and_shards_loads_no_torch():
    code = (
        "import sys, prep, shards, prep.cli, prep.run, prep.executors, prep.tasks, prep.check, prep.images, "
        "prep.proposals, prep.sources, shards.schema, shards.storage, shards.writer, shards.layout, shards.summary; "
        "prep.cli.prep.make_context('prep', ['folder', '--help'], resilient_parsing=True); "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision')]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO), capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr
