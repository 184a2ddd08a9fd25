"""Curves from a training log: ``python -m train.plot OUT/log.jsonl -o curve.png``.

Top: the loss terms. Below, when the log has them: the collapse signal ``z_std`` (about 1/sqrt(D) when healthy, 0 at
collapse) and ``knn_top1`` of the evaluation during training (``--eval-data``). A falling loss alone does not show
learning: a collapsed network lowers BYOL's loss too."""

from __future__ import annotations

import argparse
import json
import sys

LOSS_PREFIX = "loss"


# Log fields renamed since, old name -> new: rows of older logs are read under the new names.
RENAMED = {"momentum": "ema_tau"}


def read_log(path: str) -> list[dict]:
    rows = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not JSON ({e})") from e
            for old, new in RENAMED.items():
                if old in row and new not in row:
                    row[new] = row.pop(old)
            rows.append(row)
    return rows


def plot(rows: list[dict], output: str, title: str = "") -> None:
    """One line per loss term (every numeric field whose name starts with ``loss``) against ``step``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    terms = sorted({k for r in rows for k, v in r.items() if k.startswith(LOSS_PREFIX) and isinstance(v, (int, float))})
    if not terms:
        raise ValueError("the log has no loss fields")
    extra = [k for k in ("z_std", "knn_top1") if any(isinstance(r.get(k), (int, float)) for r in rows)]
    fig, axes = plt.subplots(1 + len(extra), 1, figsize=(7, 4 + 2 * len(extra)), sharex=True, squeeze=False)
    ax = axes[0, 0]
    for term in terms:
        pts = [(r["step"], r[term]) for r in rows if term in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=term, lw=2 if term == "loss" else 1)
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    for sub, key in zip(axes[1:, 0], extra, strict=True):
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        sub.plot([p[0] for p in pts], [p[1] for p in pts], marker="o" if key == "knn_top1" else None, ms=3)
        sub.set_ylabel(key)
        sub.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(output, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.plot", description=__doc__)
    p.add_argument("log", help="OUT/log.jsonl")
    p.add_argument("-o", "--output", default="loss.png")
    args = p.parse_args(argv)
    plot(read_log(args.log), args.output, title=args.log)
    print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
