"""The training loop end to end on CPU: python -m train on tiny generated shards (loss goes down, resume is exact,
clear errors, --help), plus train.plot.

Shards are written with shards.writer.ShardWriter from synthetic textured JPEGs with random proposal boxes, so the
stats files give the sample counts as prep's output does."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from imagegen import damage_jpeg_in_tar, jpeg_bytes, textured_image

from shards import schema
from shards.writer import ShardWriter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# small and shared test machine: one intra-op thread per process keeps runs fast and the timings stable
ENV = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
TINY = [
    "--preset",
    "tiny",
    "--workers",
    "0",
    "--proj-hidden",
    "64",
    "--proj-dim",
    "32",
    "--pred-hidden",
    "64",
    "--image-size",
    "32",
    "--instance-size",
    "16",
    "--sinkhorn-iters",
    "10",
    "--shuffle-buffer",
    "8",
]


def make_train_shards(root: str, counts, size: int = 64, seed: int = 0) -> str:
    """Prep-like shards ``t-00000j.tar`` (+ parquet + stats) holding ``counts[j]`` textured images with 6 boxes."""
    rng = np.random.default_rng(seed)
    for j, n in enumerate(counts):
        name = schema.shard_name("t", j)
        with ShardWriter(root, name, config={}, fingerprint="test", min_boxes=4) as w:
            for i in range(n):
                key = f"s{j}_{i:03d}"
                img = textured_image(size, size, seed=int(rng.integers(1 << 30)))
                x0, y0 = rng.integers(0, size // 2, (2, 6))
                x1, y1 = x0 + rng.integers(8, size // 2, 6), y0 + rng.integers(8, size // 2, 6)
                boxes = np.stack([x0, y0, np.minimum(x1, size), np.minimum(y1, size)], 1)
                jpeg = jpeg_bytes(img)
                meta = schema.encode_meta(
                    key=key,
                    path=f"{key}.jpg",
                    width=size,
                    height=size,
                    boxes=boxes,
                    image_sha256=schema.image_sha256(jpeg),
                )
                w.write(
                    schema.make_row(key, f"{key}.jpg", width=size, height=size, kept_boxes=6, boxes=boxes), jpeg, meta
                )
    return root


def run_train(*args, check=True, timeout=300):
    proc = subprocess.run(
        [sys.executable, "-m", "train", *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"python -m train failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def read_log(out) -> list[dict]:
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_train_shards(str(tmp_path_factory.mktemp("shards")), [24, 24])


@pytest.fixture(scope="module")
def reference_run(shards, tmp_path_factory):
    """16 uninterrupted steps (epochs of 6 steps) with one DataLoader worker, checkpoints every 8 steps."""
    out = str(tmp_path_factory.mktemp("ref"))
    run_train(*TINY, "--workers", "1", "--data", shards, "--out", out, "--max-steps", "16", "--ckpt-every", "8")
    return out


@pytest.mark.slow
def test_short_run_lowers_the_loss(reference_run):
    rows = read_log(reference_run)
    assert [r["step"] for r in rows] == list(range(1, 17))
    first, last = np.mean([r["loss"] for r in rows[:3]]), np.mean([r["loss"] for r in rows[-3:]])
    assert last < first - 0.5, (first, last)
    r = rows[-1]
    assert r["loss"] == pytest.approx(r["loss_scene"] + r["loss_scene_instance"] + r["loss_instance"], abs=1e-5)
    assert r["lr"] > 0 and 0.99 < r["ema_tau"] < 1 and r["images_per_s"] > 0 and 0 <= r["data_wait"] <= 1
    assert 0 <= r["fallback_rate"] <= 1 and r["shards_skipped"] == 0
    assert 0 < r["z_std"] <= 1 and "knn_top1" not in r  # the collapse signal every row; no --eval-data here
    assert sorted(n for n in os.listdir(reference_run) if n.startswith("ckpt")) == [
        "ckpt-00000008.pt",
        "ckpt-00000016.pt",
    ]
    with open(os.path.join(reference_run, "config.json")) as f:
        assert json.load(f)["preset"] == "tiny"
    from train import plot

    png = os.path.join(reference_run, "curve.png")
    assert plot.main([os.path.join(reference_run, "log.jsonl"), "-o", png]) == 0 and os.path.getsize(png) > 0


@pytest.mark.slow
def test_resume_gives_the_uninterrupted_run(shards, reference_run, tmp_path):
    import torch

    out = str(tmp_path / "run")
    args = [*TINY, "--workers", "1", "--data", shards, "--out", out, "--ckpt-every", "8"]
    run_train(*args, "--max-steps", "5")  # stops mid-epoch: the data position matters
    run_train(*args, "--max-steps", "8", "--resume")  # crosses the epoch boundary after step 6
    ref = {r["step"]: r for r in read_log(reference_run)}
    resumed = read_log(out)
    assert [r["step"] for r in resumed] == list(range(1, 9))
    for r in resumed[5:]:
        for term in ("loss", "loss_scene", "loss_scene_instance", "loss_instance"):
            assert r[term] == pytest.approx(ref[r["step"]][term], abs=1e-5), (r["step"], term)
    a = torch.load(os.path.join(out, "ckpt-00000008.pt"), weights_only=True)
    b = torch.load(os.path.join(reference_run, "ckpt-00000008.pt"), weights_only=True)
    assert a["data"] == b["data"] == {"epoch": 1, "consumed": 16, "streams": 1}
    for k, v in b["model"].items():
        torch.testing.assert_close(a["model"][k], v, rtol=0, atol=1e-5, msg=k)


@pytest.mark.slow  # each run compiles (minutes the first time on a small CPU, seconds from torch's cache)
def test_compiled_resume_gives_the_uninterrupted_compiled_run(shards, tmp_path):
    import torch

    args = [*TINY, "--data", shards, "--ckpt-every", "2", "--compile"]
    ref, out = str(tmp_path / "ref"), str(tmp_path / "run")
    first = run_train(*args, "--out", ref, "--max-steps", "4", timeout=900)
    said = first.stdout + first.stderr
    assert "--compile: the first step compiles" in said and "first step, compilation included:" in said
    run_train(*args, "--out", out, "--max-steps", "2", timeout=900)
    run_train(*args, "--out", out, "--max-steps", "4", "--resume", timeout=900)
    expected = {r["step"]: r for r in read_log(ref)}
    rows = read_log(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        for term in ("loss", "loss_scene", "loss_scene_instance", "loss_instance"):
            assert r[term] == pytest.approx(expected[r["step"]][term], abs=1e-5), (r["step"], term)
    a = torch.load(os.path.join(out, "ckpt-00000004.pt"), weights_only=True)
    b = torch.load(os.path.join(ref, "ckpt-00000004.pt"), weights_only=True)
    assert a["config"]["compile"] is True and set(a["model"]) == set(b["model"])
    for k, v in b["model"].items():
        torch.testing.assert_close(a["model"][k], v, rtol=0, atol=1e-5, msg=k)


def test_collapse_warning_once(tmp_path, capsys):
    import dataclasses

    from train.__main__ import Logger
    from train.config import preset

    log = Logger(dataclasses.replace(preset("tiny"), out=str(tmp_path)), start=0, end=10)
    healthy = 1 / 128**0.5  # tiny preset: proj_dim 128
    log.check_collapse({"step": 1, "z_std": healthy})
    assert "collapsing" not in capsys.readouterr().err
    log.check_collapse({"step": 2, "z_std": 0.001})
    log.check_collapse({"step": 3, "z_std": 0.0001})
    log.close()
    err = capsys.readouterr().err
    assert err.count("collapsing") == 1 and "step 2" in err


def test_resumed_log_drops_rows_after_the_checkpoint(tmp_path):
    # a run killed at step 7 after its step-5 checkpoint repeats steps 6 and 7 when resumed: logged once only
    import dataclasses

    from train.__main__ import Logger
    from train.config import preset

    path = tmp_path / "log.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 8)))
    Logger(dataclasses.replace(preset("tiny"), out=str(tmp_path)), start=5, end=10).close()
    assert [r["step"] for r in read_log(tmp_path)] == [1, 2, 3, 4, 5]


def test_plot_reads_logs_written_before_the_ema_rename(tmp_path):
    from train import plot

    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1 / s, "momentum": 0.99}) + "\n" for s in range(1, 4)))
    rows = plot.read_log(str(log))
    assert [r["ema_tau"] for r in rows] == [0.99] * 3 and all("momentum" not in r for r in rows)
    assert plot.main([str(log), "-o", str(tmp_path / "old.png")]) == 0


# The error paths run train.__main__.main in this process (no torch start-up per case); the runs above cover
# `python -m train` itself.
def _main(capsys, *argv) -> tuple[int, str]:
    from train.__main__ import main

    code = main(list(argv))
    return code, capsys.readouterr().err


def test_refuses_existing_run_and_other_config(shards, tmp_path, capsys):
    from train import checkpoint, optim
    from train.config import parse_args
    from train.model import ModelConfig, UniVIP

    out = str(tmp_path / "run")
    cfg = parse_args([*TINY, "--data", shards, "--out", out])
    model = UniVIP(ModelConfig.from_train(cfg))
    opt = optim.build(model.named_parameters(), cfg)
    checkpoint.save(
        out,
        16,
        model=model,
        optimizer=opt,
        config=cfg,
        data_position={"epoch": 2, "consumed": 32},
        rng=[checkpoint.rng_state()],
        world_size=1,
    )
    base = [*TINY, "--data", shards, "--out", out, "--max-steps", "30"]
    code, err = _main(capsys, *base)
    assert code == 1 and "already holds checkpoints" in err and "--resume" in err
    code, err = _main(capsys, *base, "--resume", "--k", "3", "--arch", "resnet50")
    assert code == 1, err
    assert "ckpt-00000016.pt was written by another config" in err
    assert "k: checkpoint 4 vs now 3" in err and "arch: checkpoint 'resnet18' vs now 'resnet50'" in err


def test_resume_reads_a_checkpoint_written_before_the_momentum_rename(shards, tmp_path, capsys):
    import torch

    out = tmp_path / "run"
    args = [*TINY, "--data", shards, "--out", str(out), "--log-every", "1"]
    code, err = _main(capsys, *args, "--max-steps", "1")
    assert code == 0, err
    path = out / "ckpt-00000001.pt"
    ckpt = torch.load(path, weights_only=True)
    ckpt["config"]["momentum"] = ckpt["config"].pop("sgd_momentum")  # the field's name before the rename
    torch.save(ckpt, path)
    code, err = _main(capsys, *args, "--max-steps", "2", "--resume")
    assert code == 0, err
    assert [r["step"] for r in read_log(out)] == [1, 2]


def test_clear_data_errors(tmp_path, capsys):
    code, err = _main(
        capsys, *TINY, "--data", str(tmp_path / "nowhere-{000000..000003}.tar"), "--out", str(tmp_path / "o1")
    )
    assert code == 1 and "no shards matched" in err and "nowhere" in err
    code, err = _main(capsys, *TINY, "--data", str(tmp_path / "*.tar"), "--out", str(tmp_path / "o2"))
    assert code == 1 and "no shards matched" in err
    # a plain image tar (no KEY.json): not a prep shard
    import tarfile

    bad = tmp_path / "plain-000000.tar"
    with tarfile.open(bad, "w") as tar:
        tar.add(os.path.join(ROOT, "tests", "fixtures", "coffee.jpg"), arcname="a.jpg")
    code, err = _main(capsys, *TINY, "--data", str(bad), "--out", str(tmp_path / "o3"), "--on-bad-shard", "fail")
    assert code == 1 and "shard without boxes" in err and str(bad) in err
    with pytest.warns(RuntimeWarning, match="shard without boxes"):  # skipped, then nothing is left to train on
        code, err = _main(capsys, *TINY, "--data", str(bad), "--out", str(tmp_path / "o4"))
    assert code == 1 and "0 samples" in err


def test_each_bad_sample_of_issue_17_costs_one_sample(tmp_path, capsys):
    # a one-shard data set edited by hand, run as the issue ran it: every case skipped alone, counted by reason, named
    from test_check import rewrite_tar

    data = make_train_shards(str(tmp_path / "shards"), [14])
    tar = os.path.join(data, "t-000000.tar")
    bad_boxes = [[[0, 0, 1e12, 1e12]], [[0.5, 1e308, float("nan"), 3]], [[-3, 0, 10, 10]], [[5000, 5000, 9000, 9000]],
                 [[4, 4, 4, 9]], [[30, 2, 4, 40]]]  # fmt: skip
    edits = {f"s0_{i + 2:03d}.json": boxes for i, boxes in enumerate(bad_boxes)}

    def edit(name: str, payload: bytes):
        if name == "s0_009.json":
            return None  # the sample's KEY.json is missing
        if name in edits:
            return json.dumps({**json.loads(payload), "boxes": edits[name]}).encode()
        return payload

    rewrite_tar(tar, edit)
    with pytest.warns(RuntimeWarning) as record:
        code, err = _main(capsys, *TINY, "--data", tar, "--out", str(tmp_path / "o"), "--max-steps", "2",
                          "--batch-size", "4")  # fmt: skip
    assert code == 0, err
    row = read_log(tmp_path / "o")[-1]
    assert row["step"] == 2 and row["shards_skipped"] == 0
    assert row["samples_skipped"] == 7 and row["samples_skipped_by_reason"] == {"bad_boxes": 6, "missing_member": 1}
    messages = [str(w.message) for w in record if "bad sample" in str(w.message)]
    assert messages == [
        f"skipping a bad sample: {tar}: sample 's0_002': box 0 is [0, 0, 1000000000000.0, 1000000000000.0], not 4 "
        f"integers [x0, y0, x1, y1] (further bad samples of {tar} are not reported)"
    ]


def test_a_manifest_pointing_elsewhere_is_refused_unless_allowed(shards, tmp_path, capsys):
    manifest = tmp_path / "elsewhere" / "manifest.json"
    manifest.parent.mkdir()
    stats = []
    for name in sorted(os.listdir(shards)):
        if name.endswith(schema.STATS_SUFFIX):
            with open(os.path.join(shards, name)) as f:
                stats.append(json.load(f))
    m = schema.make_manifest(config={}, versions={}, classes=None, stats=stats)
    for entry in m["shards"]:
        entry["tar"] = os.path.join(shards, entry["tar"])  # absolute paths into another directory
    manifest.write_text(json.dumps(m))
    args = [*TINY, "--data", str(manifest), "--max-steps", "1"]
    code, err = _main(capsys, *args, "--out", str(tmp_path / "o1"))
    assert (
        code == 1 and "is not a name inside the manifest's own directory" in err and "--allow-manifest-outside" in err
    )
    assert err.count("\n") == 1  # one line, no traceback
    code, err = _main(capsys, *args, "--out", str(tmp_path / "o2"), "--allow-manifest-outside")
    assert code == 0, err


def test_verify_images_skips_a_damaged_image(tmp_path, capsys):
    data = make_train_shards(str(tmp_path / "shards"), [8, 8])
    damage_jpeg_in_tar(os.path.join(data, "t-000001.tar"))  # still decodes: only the hash tells
    args = [*TINY, "--data", data, "--max-steps", "2", "--log-every", "2"]
    code, err = _main(capsys, *args, "--out", str(tmp_path / "plain"))
    assert code == 0, err
    assert read_log(tmp_path / "plain")[-1]["samples_skipped"] == 0  # off by default
    with pytest.warns(RuntimeWarning, match="t-000001.tar: sample 's1_000'"):
        code, err = _main(capsys, *args, "--out", str(tmp_path / "checked"), "--verify-images")
    assert code == 0, err
    assert read_log(tmp_path / "checked")[-1]["samples_skipped"] == 1


def test_outputs_get_the_permissions_of_the_umask(shards, tmp_path, capsys, umask):
    umask(0o027)
    out = tmp_path / "run"
    code, err = _main(capsys, *TINY, "--data", shards, "--out", str(out), "--max-steps", "1")
    assert code == 0, err
    modes = {n: os.stat(out / n).st_mode & 0o777 for n in os.listdir(out)}
    assert {"config.json", "log.jsonl", "ckpt-00000001.pt"} <= set(modes)
    assert modes == dict.fromkeys(modes, 0o640), modes  # the checkpoint is renamed into place: not mkstemp's 0600


def test_help_lists_flags_and_presets(capsys):
    from train.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for text in (
        "--batch-size",
        "GLOBAL batch",
        "--preset {coco,imagenet,tiny}",
        "--instance-mode {crop,roi}",
        "--no-amp",
        "imagenet: batch_size=4096",
    ):
        assert text in out, text
    data_help = out.split("\n  --data DATA")[1].split("\n  --out OUT")[0]
    assert "(default: )" not in out and "(required)" in data_help  # --data has no usable default
    # and the real entry point answers too
    assert "usage: python -m train" in run_train("--help").stdout


def test_plot_writes_a_png(tmp_path):
    from train import plot

    log, png = tmp_path / "log.jsonl", str(tmp_path / "curve.png")
    log.write_text(
        "".join(json.dumps({"step": s, "loss": 1 / s, "loss_scene": 0.5 / s, "lr": 0.1}) + "\n" for s in range(1, 6))
    )
    assert plot.main([str(log), "-o", png]) == 0
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # the collapse signal and the kNN accuracy get panels of their own
    rows = [{"step": s, "loss": 1 / s, "z_std": 0.05, **({"knn_top1": 0.3} if s % 2 else {})} for s in range(1, 6)]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    png2 = str(tmp_path / "curve2.png")
    assert plot.main([str(log), "-o", png2]) == 0
    from PIL import Image

    assert Image.open(png2).height > Image.open(png).height


def test_plot_overlays_several_runs_with_baselines(tmp_path, capsys):
    from PIL import Image

    from train import plot

    logs = []
    for name, slope in (("a", 1.0), ("b", 2.0)):
        (tmp_path / name).mkdir()
        log = tmp_path / name / "log.jsonl"
        rows = [{"step": s, "loss": -slope * s, **({"knn_top1": 0.3 + 0.01 * s} if s % 2 else {})} for s in range(1, 8)]
        log.write_text("".join(json.dumps(r) + "\n" for r in rows))
        logs.append(str(log))
    png = str(tmp_path / "runs.png")
    assert plot.main([*logs, "--baseline", "random-init=0.31", "-o", png]) == 0
    assert Image.open(png).height > 0
    with pytest.raises(SystemExit):
        plot.main([*logs, "--labels", "only-one", "-o", png])
    with pytest.raises(SystemExit):
        plot.main([logs[0], "--baseline", "no-value", "-o", png])
    capsys.readouterr()
    assert plot.main([str(tmp_path / "missing.jsonl"), logs[0], "-o", png]) == 1
    assert "missing.jsonl" in capsys.readouterr().err


def test_no_blur_turns_off_both_views_blur():
    from train import setup
    from train.config import parse_args

    assert setup.view_config(parse_args([*TINY, "--data", "x"])).blur_p == (1.0, 0.1)  # BYOL's, the default
    assert setup.view_config(parse_args([*TINY, "--data", "x", "--no-blur"])).blur_p == (0.0, 0.0)
