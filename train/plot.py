"""Loss curves from a training log: ``python -m train.plot OUT/log.jsonl -o curve.png``."""

from __future__ import annotations

import argparse
import json
import sys

LOSS_PREFIX = "loss"


def read_log(path: str) -> list[dict]:
    rows = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not JSON ({e})") from e
    return rows


def plot(rows: list[dict], output: str, title: str = "") -> None:
    """One line per loss term (every numeric field whose name starts with ``loss``) against ``step``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    terms = sorted({k for r in rows for k, v in r.items() if k.startswith(LOSS_PREFIX) and isinstance(v, (int, float))})
    if not terms:
        raise ValueError("the log has no loss fields")
    fig, ax = plt.subplots(figsize=(7, 4))
    for term in terms:
        pts = [(r["step"], r[term]) for r in rows if term in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=term, lw=2 if term == "loss" else 1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
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
