"""Proposal quality against cost: `prep eval-proposals` over --mode x --ss-max-side on labelled scenes.

    python bench/proposals_bench.py                                   # 48 scenes + 8 photos x 15 settings, ~15 min
    python bench/proposals_bench.py --n 2 --modes single --sides 250  # smoke test, seconds
    python bench/proposals_bench.py --json bench/results/proposals_cpu.json

Labelled set: ``bench/scenes.py`` scenes (shape objects on photo textures, COCO boxes) at three sizes, ``--n`` of each,
160 px (objects 32-67 px: small and medium by COCO's areas), 320 px (medium, large) and 640 px (large, COCO's image
size), merged into one COCO file. Each setting runs ``prep coco`` with default filters on the scenes and on the
bundled COCO sample photos (``data/sample/coco``, 8 photos of 266-400 px). The sample's annotation file lists no
objects, so the photos give timing on real images only; recall comes from the scenes.

Cost is selective-search core-seconds per image as prep records them (``ss_seconds``: one thread per image), so the
figures do not depend on the worker count; ``--workers`` only shortens the run. "full" is no downscale at all.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "bench"))

import scenes  # noqa: E402

from prep import evaluate  # noqa: E402
from prep import run as prep_run  # noqa: E402
from prep.config import PrepConfig  # noqa: E402
from shards import summary as summaries  # noqa: E402

SCENE_SIZES = (160, 320, 640)
FULL = 1 << 16  # --ss-max-side larger than any image: selective search on the image itself
SAMPLE = os.path.join(REPO, "data", "sample", "coco")


def labelled_set(work: str, n: int, seed: int = 0) -> tuple[str, str]:
    """(root, instances.json): ``n`` scenes of each of ``SCENE_SIZES``, merged into one COCO file under ``work``."""
    root = os.path.join(work, f"scenes-{n}")
    path = os.path.join(root, "instances.json")
    if os.path.exists(path):
        return root, path
    images, annotations, categories = [], [], None
    for size in SCENE_SIZES:
        sub = os.path.join(root, f"s{size}")
        with open(scenes.make_scenes(sub, n, size=size, seed=seed + size)) as f:
            doc = json.load(f)
        categories = doc["categories"]
        new_id = {im["id"]: len(images) + i + 1 for i, im in enumerate(doc["images"])}
        images += [dict(im, id=new_id[im["id"]], file_name=f"s{size}/images/{im['file_name']}") for im in doc["images"]]
        annotations += [
            dict(a, id=len(annotations) + i + 1, image_id=new_id[a["image_id"]])
            for i, a in enumerate(doc["annotations"])
        ]
    with open(path + ".tmp", "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)
    os.replace(path + ".tmp", path)
    return root, path


def run_setting(
    work: str, tag: str, root: str, annotations: str, mode: str, side: int, workers: int
) -> tuple[str, float]:
    """(output, wall s) of prep coco with ``mode`` and ``side``; an earlier complete output is reused (wall -1)."""
    out = os.path.join(work, "out", f"{tag}-{mode}-{side}")
    cfg = PrepConfig(kind="coco", root=root, annotations=annotations, mode=mode, ss_max_side=side, shard_size=16)
    if os.path.exists(os.path.join(out, "manifest.json")):
        with open(os.path.join(out, "prep_config.json")) as f:
            if json.load(f)["fingerprint"] == cfg.fingerprint():
                return out, -1.0
    t0 = time.perf_counter()
    prep_run.run(cfg, out, workers=workers, progress=False, overwrite=os.path.exists(out))
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "proposals_bench"))
    ap.add_argument("--n", type=int, default=16, help=f"scenes of each size {SCENE_SIZES}")
    ap.add_argument("--modes", nargs="+", default=["fast", "single", "quality"])
    ap.add_argument("--sides", nargs="+", default=["250", "320", "400", "500", "full"])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--no-sample", action="store_true", help="scenes only (no timing on the sample photos)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    os.makedirs(args.work, exist_ok=True)
    root, annotations = labelled_set(args.work, args.n)
    gt = evaluate.load_annotations(annotations)
    sample_ann = os.path.join(SAMPLE, "annotations", "instances_sample.json")
    print(f"labelled set: {len(gt.ids)} scenes, {len(gt.boxes)} objects; load average {os.getloadavg()[0]:.2f}")
    rows = []
    for mode in args.modes:
        for side_name in args.sides:
            side = FULL if side_name == "full" else int(side_name)
            load = round(os.getloadavg()[0], 2)
            out, wall = run_setting(args.work, "scenes", root, annotations, mode, side, args.workers)
            r = evaluate.evaluate(out, gt)
            row = {
                "mode": mode,
                "ss_max_side": side_name,
                "load_before": load,
                "wall_s": round(wall, 1),
                "seconds_per_image": r["seconds_per_image"]["mean"],
                "kept_boxes": r["kept_boxes_per_image"],
                "recall": r["recall"],
                "mabo": r["mabo"],
            }
            if not args.no_sample:
                s_out, _ = run_setting(
                    args.work, "sample", os.path.join(SAMPLE, "images"), sample_ann, mode, side, args.workers
                )
                s = summaries.summarize_output(s_out)
                row["sample_seconds_per_image"] = s["seconds_per_image"]["mean"]
                row["sample_kept_boxes"] = s["boxes_per_image"]["mean"]
            rec = r["recall"]["0.5"]["all"]["all"]
            row["recall_per_core_second"] = round(rec / row["seconds_per_image"], 3)
            rows.append(row)
            print(
                f"{mode:>7} {side_name:>4}: {row['seconds_per_image']:.3f} s/image, R@0.5 all boxes {rec:.3f}, "
                f"R@0.7 {r['recall']['0.7']['all']['all']:.3f}, MABO {r['mabo']['all']['all']:.3f}, "
                f"{row['kept_boxes']:.1f} boxes; photos {row.get('sample_seconds_per_image', float('nan')):.3f} "
                f"s/image (load {load})"
            )

    print()
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"scenes": len(gt.ids), "objects": len(gt.boxes), "rows": rows}, f, indent=2)
            f.write("\n")


def markdown(rows: list[dict]) -> str:
    """The table for docs/benchmarks.md (prep's default setting marked, the best recall per core-second in bold)."""
    default = (PrepConfig.mode, str(PrepConfig.ss_max_side))
    head = (
        "| mode | ss_max_side | s / image, scenes | s / image, photos | kept boxes | R@0.5 first 4 | R@0.5 first 20 "
        "| R@0.5 all | R@0.5 small / medium / large (all boxes) | R@0.7 all | MABO all | R@0.5 all per core-second |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    best = max(r["recall_per_core_second"] for r in rows)
    for r in rows:
        rc, per = r["recall"], r["recall_per_core_second"]
        a = rc["0.5"]["all"]
        mode = r["mode"] + (" (default)" if (r["mode"], r["ss_max_side"]) == default else "")
        lines.append(
            f"| {mode} | {r['ss_max_side']} | {r['seconds_per_image']:.3f} | {_f(r.get('sample_seconds_per_image'))} | "
            f"{r['kept_boxes']:.1f} | {rc['0.5']['4']['all']:.3f} | {rc['0.5']['20']['all']:.3f} | {a['all']:.3f} | "
            f"{_f(a['small'], 2)} / {_f(a['medium'])} / {_f(a['large'])} | {rc['0.7']['all']['all']:.3f} | "
            f"{r['mabo']['all']['all']:.3f} | {f'**{per:.2f}**' if per == best else f'{per:.2f}'} |"
        )
    return "\n".join(lines)


def _f(v, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


if __name__ == "__main__":
    main()
