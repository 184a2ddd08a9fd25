"""`prep report`: size of the HTML and seconds to make it, on the demo output and on a 1,000-shard output.

    python bench/report_bench.py                           # demo + 1,000 shards x 1,000 rows (~3 min, mostly synthesis)
    python bench/report_bench.py --shards 40 --rows 200    # smoke test, seconds

The demo output is what `make demo` makes (`prep coco` of the 8 sample photos, `--shard-size 4`): its report is the
real thing, gallery included (every sample: 8 < 48). The 1,000-shard output is metadata only, synthesised as
`bench/stats_bench.py` does (Parquet, stats files, run config, manifest; about 1 failure per 1,000 inputs, so about
1,000 failed paths, the most the failed-inputs table lists), and has no tars: its report is made with ``-n 0``, and the
gallery's share of a full report is the demo's bytes per gallery sample times 48 (a sample's share is its thumbnail,
at most 256 px, and its boxes, at most ``--max-boxes``). Each run is ``python -m prep report`` in a fresh process;
the page is split by section to show where the bytes are.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench.stats_bench import _env, real_output, synthesise  # noqa: E402
from prep.report import GALLERY_SAMPLES  # noqa: E402
from shards import schema  # noqa: E402

DEMO_ARGS = ["--shard-size", "4", "--workers", "1", "--no-progress"]


def demo_output(work: str) -> str:
    """The output `make demo` makes (same command and settings), cached under ``work``."""
    out = os.path.join(work, "demo")
    if os.path.exists(os.path.join(out, schema.MANIFEST_NAME)):
        return out
    coco = os.path.join(REPO, "data", "sample", "coco")
    cmd = [sys.executable, "-m", "prep", "coco", os.path.join(coco, "images"), "--out", out, *DEMO_ARGS]
    cmd += ["--annotations", os.path.join(coco, "annotations", "instances_sample.json")]
    subprocess.run(cmd, cwd=REPO, check=True, env=_env(REPO))
    return out


def run_report(out: str, html: str, *extra: str) -> float:
    """Wall seconds of ``python -m prep report OUT -o HTML`` (imports included)."""
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "prep", "report", out, "-o", html, "--no-progress", *extra]
    subprocess.run(cmd, cwd=REPO, check=True, env=_env(REPO), stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def breakdown(html: str) -> dict[str, int]:
    """Bytes of the page by part: each section, the embedded summary JSON, style and script, the gallery cards."""
    with open(html, encoding="utf-8") as f:
        text = f.read()
    parts = {"total": len(text.encode())}
    for m in re.finditer(r'<section id="([\w-]+)">.*?</section>', text, re.S):
        parts[f"section {m.group(1)}"] = len(m.group(0).encode())
    for m in re.finditer(r"<(script|style)[^>]*>.*?</\1>", text, re.S):
        kind = "summary json" if 'id="summary-json"' in m.group(0)[:60] else m.group(1)
        parts[kind] = parts.get(kind, 0) + len(m.group(0).encode())
    cards = re.findall(r'<figure class="card".*?</figure>', text, re.S)
    parts["gallery cards"] = len(cards)
    parts["bytes per card"] = round(sum(len(c.encode()) for c in cards) / len(cards)) if cards else 0
    return parts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "report_bench"))
    ap.add_argument("--shards", type=int, default=1000)
    ap.add_argument("--rows", type=int, default=1000, help="rows (inputs) per shard")
    ap.add_argument("--boxes-per-image", type=float, default=53.1)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    os.makedirs(args.work, exist_ok=True)
    results: dict = {"load_before": round(os.getloadavg()[0], 2)}

    demo = demo_output(args.work)
    html = os.path.join(args.work, "demo.html")
    seconds = run_report(demo, html)
    demo_parts = breakdown(html)
    results["demo"] = {"seconds": round(seconds, 2), "bytes": demo_parts}
    print(f"demo: {demo_parts['total']:,} bytes in {seconds:.1f} s; {json.dumps(demo_parts)}")

    big = os.path.join(args.work, f"out-{args.shards}x{args.rows}")
    t0 = time.perf_counter()
    synthesise(real_output(args.work), big, args.shards, args.rows, args.boxes_per_image)
    print(f"synthetic output ready in {time.perf_counter() - t0:.0f} s: {big}")
    html = os.path.join(args.work, "big.html")
    seconds = run_report(big, html, "-n", "0")
    parts = breakdown(html)
    gallery = GALLERY_SAMPLES * demo_parts["bytes per card"]
    results["synthetic"] = {
        "shards": args.shards,
        "rows": args.rows,
        "seconds_n0": round(seconds, 2),
        "bytes_n0": parts,
        "gallery_estimate": gallery,
        "total_estimate": parts["total"] + gallery,
    }
    print(
        f"{args.shards} shards x {args.rows} rows, -n 0: {parts['total']:,} bytes in {seconds:.1f} s; "
        f"{json.dumps(parts)}\n  + a {GALLERY_SAMPLES}-sample gallery at the demo's {demo_parts['bytes per card']:,} "
        f"bytes a card: ~{parts['total'] + gallery:,} bytes"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
