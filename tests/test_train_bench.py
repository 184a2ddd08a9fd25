"""bench/train_bench.py --quick runs end to end and prints every pipeline's row and the targets line."""

import pytest


@pytest.mark.slow  # ~15 s on 2 cores
def test_quick_run_prints_every_pipeline(capsys):
    from bench import train_bench

    assert train_bench.main(["--quick"]) == 0
    out = capsys.readouterr().out
    for name in train_bench.ORDER:
        assert f"| {name} |" in out, name
    assert "targets (COCO-sized, medians of 3 repeats)" in out
