"""bench/gpu.sh --smoke: the whole GPU check (batch search, eager and compiled step, prep + a real training run,
profile) on the CPU at toy sizes, so the script is known to work before device time is spent on it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@pytest.mark.slow  # the compiled step compiles for minutes on a small CPU
@pytest.mark.timeout(1500)
def test_smoke_check_runs_every_part(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [
            "bash",
            os.path.join(ROOT, "bench", "gpu.sh"),
            "--smoke",
            "--variants",
            "univip-crop,univip-roi",
            "--compile-variants",
            "univip-crop",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1400,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert {"gpu_bench.json", "gpu_bench.md", "profile.txt", "train_log.jsonl", "gpu_check.log"} <= set(os.listdir(out))
    result = json.loads((out / "gpu_bench.json").read_text())
    assert result["errors"] == [] and result["device"]["device"] == "cpu"
    variants = [row["variant"] for row in result["rows"]]
    assert variants == ["univip-crop", "univip-roi", "univip-crop+compile(default)"], variants
    assert all(row["batch"] == 8 and row["images_per_s"] > 0 and row["flops"] > 0 for row in result["rows"])
    assert [t["batch"] for t in result["batch_search"]["univip-crop"]] == [4, 8]
    train = result["train"]
    assert train["steps"] == 4 and train["images_per_s"] > 0 and 0 <= train["data_wait"] <= 1
    assert train["data"] == "data/sample via prep"
    assert result["profile"]["top"] and "aten::" in (out / "profile.txt").read_text()
    assert "| univip-crop+compile(default) | 8 |" in (out / "gpu_bench.md").read_text()


def test_batch_search_stops_at_the_first_out_of_memory(monkeypatch):
    from bench import gpu_bench

    args = gpu_bench.parse_args(["--smoke", "--batches", "2,4,8,16"])
    tried = []

    def step(self, batch):
        tried.append(self.cfg.batch_size)
        if self.cfg.batch_size >= 8:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return torch.zeros(())

    monkeypatch.setattr(gpu_bench.Setup, "step", step)
    best, trials = gpu_bench.search_batch("byol", args, torch.device("cpu"), deadline=float("inf"))
    assert best == 4 and [(t["batch"], t["fits"]) for t in trials] == [(2, True), (4, True), (8, False)]
    assert tried == [2, 2, 4, 4, 8]  # two steps per batch that fits, 16 never built
