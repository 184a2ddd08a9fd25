"""bench/learn.py --quick end to end: scenes -> prep -> three trainings -> train.eval against random init. It checks
the pipeline and the results file, not the accuracies (a dozen CPU steps learn nothing)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_learning_benchmark(tmp_path):
    work = tmp_path / "learn"
    r = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, "bench", "learn.py"),
            "--quick",
            "--work",
            str(work),
            "--workers",
            "2",
            "--json",
            str(tmp_path / "copy.json"),
        ],
        capture_output=True,
        text=True,
        timeout=1200,
        env=dict(os.environ, PYTHONPATH=ROOT),
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    with open(work / "results.json") as f:
        res = json.load(f)
    assert json.loads((tmp_path / "copy.json").read_text()) == res
    assert res["steps"] == 12 and res["samples"]["scenes"] == 48
    assert res["samples"]["probe_train"] > 50 and res["samples"]["probe_val"] > 30
    rows = {r["method"]: r for r in res["results"]}
    assert set(rows) == {"random-init", "byol", "univip", "univip-no-ot"}
    for name, row in rows.items():
        assert "error" not in row, row
        assert 0 <= row["knn_top1"] <= 1 and 0 <= row["linear_top1"] <= 1, row
        if name != "random-init":
            assert [step for step, _ in row["knn_curve"]] == [6, 12]  # --eval-every during training
            assert row["z_std"] > 0
    # each trained method ran the flags it names: BYOL on its own views, UniVIP without OT at weight 0
    cfg = {m: json.loads((work / "runs" / f"{m}-s0" / "config.json").read_text()) for m in rows if m != "random-init"}
    assert cfg["byol"]["method"] == "byol" and cfg["byol"]["views"] == "auto"  # the method's own: byol
    assert cfg["univip-no-ot"]["w_instance"] == 0 and cfg["univip"]["w_instance"] == 1
    assert all(c["max_steps"] == 12 and c["batch_size"] == 16 and c["seed"] == 0 for c in cfg.values())
    table = res["table"].splitlines()
    assert table[0].startswith("| method |") and len(table) == 2 + 4
    assert len({line.count("|") for line in table}) == 1  # every row has the header's columns
    assert "learn: quick mode, 12 steps" in r.stdout
