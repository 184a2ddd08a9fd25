"""The learning benchmark's parts: bench/scenes.py's two sets, bench/probes.py's retrieval measure, and
bench/learn.py --quick end to end (scenes -> prep -> the lightly reference, BYOL, UniVIP, UniVIP without OT -> every
probe against random init). The end-to-end test checks the pipeline and the results file, not the accuracies (a
few CPU steps learn nothing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))

import learn  # noqa: E402  (bench/learn.py)
import probes  # noqa: E402  (bench/probes.py)
import scenes  # noqa: E402  (bench/scenes.py)


@pytest.mark.parametrize("kind", scenes.SETS)
def test_scenes_are_pure_functions_of_their_arguments(kind):
    img, objects, background = scenes.scene(7, 3, 96, kind)
    again = scenes.scene(7, 3, 96, kind)
    assert np.array_equal(img, again[0]) and objects == again[1] and background == again[2]
    assert img.shape == (96, 96, 3) and img.dtype == np.uint8 and 3 <= len(objects) <= 6
    other = scenes.scene(7, 3, 96, "shape" if kind == "category" else "category")
    assert not np.array_equal(img, other[0])  # the two sets draw differently from the same (seed, index)


def test_category_set_fills_each_class_from_its_own_pool():
    seen: dict[str, set[str]] = {c: set() for c in scenes.CLASSES}
    backgrounds = set()
    for i in range(60):
        _, objects, background = scenes.scene(0, i, 96, "category")
        backgrounds.add(background)
        for o in objects:
            seen[scenes.CLASSES[o.cls]].add(o.fill)
    for cls, fills in seen.items():
        assert fills == set(scenes.CATEGORY_FILLS[cls]), cls  # every source of the pool, nothing else
    assert backgrounds <= set(scenes.CATEGORY_BACKGROUNDS) and len(backgrounds) > 3
    used_by_classes = {s for pool in scenes.CATEGORY_FILLS.values() for s in pool}
    assert not used_by_classes & set(scenes.CATEGORY_BACKGROUNDS)  # a background never shows a class's texture
    # the shape set: any sample photo fills any class (texture says nothing about the class)
    fills = {o.fill for i in range(60) for o in scenes.scene(0, i, 96, "shape")[1]}
    assert fills == set(scenes.SHAPE_SOURCES)


def test_crops_and_backgrounds_are_labelled_trees(tmp_path):
    by_class = scenes.make_crops(str(tmp_path / "c"), 6, size=96, crop_size=32, seed=1, kind="category")
    by_fill = scenes.make_crops(str(tmp_path / "f"), 6, size=96, crop_size=32, seed=1, kind="category", label="fill")
    assert set(by_class) <= set(scenes.CLASSES) and set(by_fill) <= set(scenes.SOURCES)
    assert sum(by_class.values()) == sum(by_fill.values())  # the same objects, labelled two ways
    for cls, n in by_class.items():
        assert len(os.listdir(tmp_path / "c" / cls)) == n
    bg = scenes.make_backgrounds(str(tmp_path / "b"), 5, size=96, crop_size=32, seed=4, kind="category")
    assert sum(bg.values()) == 5 and set(bg) <= set(scenes.CATEGORY_BACKGROUNDS)
    with pytest.raises(ValueError, match="crop label"):
        scenes.make_crops(str(tmp_path / "x"), 1, label="colour")


def test_retrieval_top1_counts_partners_found_first():
    f = torch.eye(4) + 0.01
    assert probes.retrieval_top1(f, f) == 1.0
    assert probes.retrieval_top1(f, f[[1, 0, 2, 3]]) == 0.5
    with pytest.raises(Exception, match="NAME=PATH"):
        probes.parse_encoder("no-equals-sign")
    assert probes.parse_encoder("r=random:resnet18:3")[1] == {"random_init": True, "arch": "resnet18", "seed": 3}
    assert probes.parse_encoder("x=runs/a/backbone.pth")[1] == {"export": "runs/a/backbone.pth"}


def test_targets_compare_means_with_the_larger_seed_spread():
    def row(method, seed, knn, linear, curve=()):
        return dict(method=method, seed=seed, knn_top1=knn, linear_top1=linear, knn_curve=list(curve))

    results = [
        row("random-init", 0, 0.50, 0.40),
        row("random-init", 1, 0.52, 0.42),
        row("reference", 0, 0.60, 0.50, [(250, 0.55), (500, 0.60)]),
        row("reference", 1, 0.62, 0.52, [(250, 0.57), (500, 0.62)]),
        row("byol", 0, 0.605, 0.56, [(250, 0.50), (500, 0.61)]),
        row("byol", 1, 0.625, 0.58, [(250, 0.50)]),  # no point at 500: the mean there is of seed 0 alone
        row("univip", 0, 0.63, 0.62),
        row("univip", 1, 0.66, 0.60),
    ]
    lines = learn.targets(results, ["reference", "byol", "univip"])
    assert "BYOL - random-init, knn: +10.5 points (target >= +5)" in lines
    assert "ours (byol) - reference, knn: +0.5 points, seed spread ±1.0: within" in lines
    assert "ours (byol) - reference, linear: +6.0 points, seed spread ±1.0: OUTSIDE" in lines
    assert "univip - BYOL, knn: +3.0 points, seed spread ±1.5: ahead by more than the spread" in lines
    assert "univip - BYOL, linear: +4.0 points, seed spread ±1.0: ahead by more than the spread" in lines
    assert "ours (byol) - reference, kNN at step 250: -6.0 points, seed spread ±1.0: OUTSIDE" in lines
    assert "ours (byol) - reference, kNN at step 500: +0.0 points, seed spread ±1.0: within" in lines
    one = learn.targets([r for r in results if r["seed"] == 0], ["reference", "byol"])
    assert "ours (byol) - reference, knn: +0.5 points, seed spread ±0.0: one seed each: no spread to judge by" in one


@pytest.mark.slow
def test_quick_learning_benchmark(tmp_path):
    work = tmp_path / "learn"
    methods = ["reference", "byol", "univip", "univip-no-ot"]
    cmd = [sys.executable, os.path.join(ROOT, "bench", "learn.py"), "--quick", "--work", str(work), "--workers", "2"]
    cmd += ["--methods", *methods, "--json", str(tmp_path / "copy.json")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    with open(work / "results.json") as f:
        res = json.load(f)
    assert json.loads((tmp_path / "copy.json").read_text()) == res
    assert res["set"] == "category" and res["samples"]["scenes"] == 48
    per_epoch = 48 // 16
    assert res["steps"] == 6 and res["steps"] % per_epoch == 0  # whole epochs: both schedules end at the last step
    assert res["samples"]["probe_train"] > 50 and res["samples"]["probe_val"] > 30
    rows = {r["method"]: r for r in res["results"]}
    assert set(rows) == {"random-init", *methods}
    for name, row in rows.items():
        assert 0 <= row["knn_top1"] <= 1 and 0 <= row["linear_top1"] <= 1, row
        if name != "random-init":
            assert [step for step, _ in row["knn_curve"]] == [3, 6]  # every run logs the kNN curve, the reference too
    # every probe, in both BatchNorm modes, for every encoder
    for name, probe in res["probes"].items():
        for mode in probes.BN_MODES:
            assert set(probe[mode]) == {"class", "fill", "background", "retrieval"}, (name, mode)
            assert 0 <= probe[mode]["retrieval"]["top1"] <= 1 and probe[mode]["retrieval"]["n"] == 16
    # each trained method ran the flags it names, with the same settings as the reference
    runs = work / "runs"
    cfg = {m: json.loads((runs / f"{m}-s0" / "config.json").read_text()) for m in methods}
    assert cfg["byol"]["method"] == "byol" and cfg["byol"]["views"] == "auto" and not cfg["byol"]["blur"]
    assert cfg["univip-no-ot"]["w_instance"] == 0 and cfg["univip"]["w_instance"] == 1
    ref = cfg.pop("reference")
    assert ref["steps"] == 6 and not ref["blur"] and ref["image_size"] == 32
    for c in cfg.values():
        assert c["max_steps"] == 6 and c["batch_size"] == 16 and c["seed"] == 0 and c["image_size"] == 32
        for key in ("lr", "lr_batch", "weight_decay", "ema_base", "proj_hidden", "proj_dim", "pred_hidden"):
            assert c[key] == ref[key], key
    assert os.path.getsize(runs / "reference-s0" / "backbone.pth") > 0
    assert (work / "knn_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = res["table"].splitlines()
    assert table[0].startswith("| method |") and len(table) == 2 + 5
    assert len({line.count("|") for line in table}) == 1  # every row has the header's columns
    assert len(res["probe_table"].splitlines()) == 2 + 2 * 5
    assert any(line.startswith("ours (byol) - reference, knn") for line in res["targets"])
    assert "learn: category set, quick mode, 6 steps" in r.stdout
