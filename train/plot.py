"""Curves from training logs: ``python -m train.plot OUT/log.jsonl -o curve.png``.

One log: the loss terms on top; below, when the log has them, the collapse signal ``z_std`` (about 1/sqrt(D) when
healthy, 0 at collapse) and ``knn_top1`` of the evaluation during training (``--eval-data``). A falling loss alone
does not show learning: a collapsed network lowers BYOL's loss too.

Several logs (runs to compare): each run's total ``loss``, ``z_std`` and ``knn_top1`` overlaid (``--labels``, default
each log's directory name; labels that differ only in their last word, such as seeds "byol s0" and "byol s1", share a
colour and differ in line style); ``--baseline NAME=VALUE`` draws a horizontal line on the kNN panel
(the random-init floor of ``python -m train.eval --random-init``):

    python -m train.plot runs/byol/log.jsonl runs/univip/log.jsonl --baseline random-init=0.41 -o knn.png"""

from __future__ import annotations

import argparse
import json
import os
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


def plot_runs(
    runs: list[tuple[str, list[dict]]], output: str, title: str = "", baselines: dict[str, float] | None = None
) -> None:
    """Several runs overlaid: total ``loss``, then ``z_std`` and ``knn_top1`` where any run has them, one colour
    per run; ``baselines`` as horizontal lines on the kNN panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["loss"] + [
        k for k in ("z_std", "knn_top1") if any(isinstance(r.get(k), (int, float)) for _, rows in runs for r in rows)
    ]
    if baselines and "knn_top1" not in keys:
        keys.append("knn_top1")
    fig, axes = plt.subplots(len(keys), 1, figsize=(8, 2.6 + 2.4 * len(keys)), sharex=True, squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    # labels that differ only in their last word ("byol s0", "byol s1": seeds of one method) share a colour
    groups = list(dict.fromkeys(label.rsplit(" ", 1)[0] for label, _ in runs))
    seen: dict[str, int] = {}
    for label, rows in runs:
        group = label.rsplit(" ", 1)[0]
        colour, style = colours[groups.index(group) % len(colours)], ("-", "--", ":", "-.")[seen.get(group, 0) % 4]
        seen[group] = seen.get(group, 0) + 1
        for ax, key in zip(axes[:, 0], keys, strict=True):
            pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
            if pts:
                marker = "o" if key == "knn_top1" else None
                ax.plot(*zip(*pts, strict=True), label=label, color=colour, ls=style, marker=marker, ms=3)
    for ax, key in zip(axes[:, 0], keys, strict=True):
        if key == "knn_top1":
            for j, (name, value) in enumerate((baselines or {}).items()):
                ax.axhline(value, ls="--", lw=1, color="grey", alpha=0.5 + 0.5 * j / max(1, len(baselines or {})))
                ax.annotate(name, (0, value), xycoords=("axes fraction", "data"), fontsize=7, va="bottom")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[0, 0].set_title(title)
    axes[0, 0].legend(fontsize=7, ncol=2)
    axes[-1, 0].set_xlabel("step")
    fig.tight_layout()
    fig.savefig(output, dpi=120)
    plt.close(fig)


def _baseline(text: str) -> tuple[str, float]:
    name, sep, value = text.rpartition("=")
    try:
        if not sep or not name:
            raise ValueError
        return name, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--baseline {text!r}: expected NAME=VALUE, e.g. random-init=0.41") from None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m train.plot", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("log", nargs="+", help="OUT/log.jsonl (several: their runs overlaid)")
    p.add_argument("-o", "--output", default="loss.png")
    p.add_argument("--labels", nargs="+", help="one label per log (default: each log's directory name)")
    p.add_argument("--baseline", nargs="+", type=_baseline, default=[], help="NAME=VALUE lines on the kNN panel")
    p.add_argument("--title", default=None, help="figure title (default: the log's path, or none for several)")
    args = p.parse_args(argv)
    if args.labels and len(args.labels) != len(args.log):
        p.error(f"--labels: {len(args.labels)} labels for {len(args.log)} logs")
    try:
        if len(args.log) == 1 and not args.baseline:
            plot(read_log(args.log[0]), args.output, title=args.log[0] if args.title is None else args.title)
        else:
            labels = args.labels or [os.path.basename(os.path.dirname(os.path.abspath(path))) for path in args.log]
            runs = [(label, read_log(path)) for label, path in zip(labels, args.log, strict=True)]
            plot_runs(runs, args.output, title=args.title or "", baselines=dict(args.baseline))
    except (OSError, ValueError) as e:
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        return 1
    print(args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
