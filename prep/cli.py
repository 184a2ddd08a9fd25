"""``prep``: turn images into selective-search proposal shards (WebDataset tar + Parquet), then inspect them.

Thin over the modules: options become a PrepConfig, sources are checked before any work, prep.run does the rest.
"""

from __future__ import annotations

import json
import os
import sys

import click

from prep.config import SS_MODES, PrepConfig
from shards import schema

_DEFAULTS = PrepConfig(kind="folder", root=".")


def _parse_part(ctx, param, value):
    if value is None:
        return (0, 1)
    from prep.run import parse_part

    try:
        return parse_part(value)
    except ValueError as e:
        raise click.BadParameter(str(e), ctx=ctx, param=param) from None


def _set_s3_endpoint(ctx, param, value):
    if value is None:
        return None
    if not value.startswith(("http://", "https://")) or len(value.split("://", 1)[1].strip("/")) == 0:
        raise click.BadParameter(f"{value!r}: give the endpoint as http(s)://host[:port]", ctx=ctx, param=param)
    from shards import storage

    # worker processes get it with each task (prep.run.run_task), Ray workers through their runtime env
    storage.configure(endpoint_url=value)
    return value


def _s3_endpoint_option(f):
    return click.option(
        "--s3-endpoint",
        metavar="URL",
        callback=_set_s3_endpoint,
        expose_value=False,
        is_eager=True,
        help="S3 API endpoint of an S3-compatible store (MinIO, Ceph, …) for s3:// URLs. Credentials come from the "
        "AWS environment or profile.  [default: $S3_ENDPOINT_URL, else $AWS_ENDPOINT_URL, else AWS]",
    )(f)


def _check_remote(out: str, *, write: bool) -> None:
    """Fail before any work when a URL output cannot be used: a read-only scheme, wrong credentials, no bucket, an
    unreachable endpoint. One listing of the prefix; the message names it and never a credential."""
    from shards import storage

    if not storage.is_remote(out):
        return
    listable = ("s3",)  # the schemes shards.storage can list (and write)
    if storage.scheme(out) not in listable:
        what = "write to" if write else "list"
        raise click.UsageError(
            f"{storage.redact(out)}: cannot {what} {storage.scheme(out)}:// URLs; use a local "
            "directory or s3://bucket/prefix"
        )
    import botocore.exceptions

    try:
        storage.list_names(out)
    except (OSError, ValueError) as e:  # storage's messages name the URL and the reason
        raise click.ClickException(str(e)) from None
    except botocore.exceptions.BotoCoreError as e:  # e.g. the endpoint refuses connections
        endpoint = storage.redact(storage.endpoint_url() or "of AWS")
        raise click.ClickException(
            f"{storage.redact(out)}: cannot reach the S3 endpoint {endpoint} ({type(e).__name__}); check "
            "--s3-endpoint / $AWS_ENDPOINT_URL"
        ) from None


def _run_options(f):
    """Options shared by the source commands (coco, imagenet, folder)."""
    from prep.executors import EXECUTORS, default_workers

    d = _DEFAULTS
    options = [
        click.option(
            "--out",
            "-o",
            required=True,
            help="Output directory for the shards (created if missing), or s3://bucket/prefix.",
        ),
        click.option("--prefix", default="", help="Shard name prefix  [default: the source kind, e.g. coco]"),
        click.option(
            "--shard-size",
            type=click.IntRange(min=1),
            default=d.shard_size,
            show_default=True,
            help="Images (inputs, failures included) per shard.",
        ),
        click.option(
            "--workers",
            "-j",
            type=click.IntRange(min=1),
            default=default_workers(),
            show_default=True,
            help="Worker processes (1 runs in this process).",
        ),
        click.option(
            "--part",
            callback=_parse_part,
            metavar="I/N",
            help="Only shard tasks I, I+N, I+2N, … (e.g. $SLURM_ARRAY_TASK_ID/N); the part that completes the "
            "plan writes the manifest.  [default: 0/1, all]",
        ),
        click.option(
            "--overwrite",
            is_flag=True,
            help="Delete the shards, manifest and run config of an earlier run in --out (nothing else) and "
            "start over (not with --part). Without it, rerunning resumes and other settings are refused.",
        ),
        click.option(
            "--executor",
            type=click.Choice(sorted(EXECUTORS)),
            default="local",
            show_default=True,
            help="Where shard tasks run: local processes, or Ray tasks (see --ray-address).",
        ),
        click.option(
            "--ray-address",
            metavar="ADDR",
            default=None,
            help="With --executor ray: the cluster (host:port, or auto for the one `ray start` made on this "
            "node)  [default: $RAY_ADDRESS, else a local Ray instance with --workers CPUs]",
        ),
        click.option(
            "--mode",
            type=click.Choice(SS_MODES),
            default=d.mode,
            show_default=True,
            help="OpenCV selective search: fast (switchToSelectiveSearchFast), quality (…Quality: slower, "
            "more boxes), single (switchToSingleStrategy: fastest).",
        ),
        click.option(
            "--ss-max-side",
            type=click.IntRange(min=16),
            default=d.ss_max_side,
            show_default=True,
            help="Longer side (px) of the copy selective search runs on; boxes are mapped back.",
        ),
        click.option(
            "--seed",
            type=int,
            default=d.seed,
            show_default=True,
            help="Seed of the per-image generator (with the key): same boxes in the same order in any run.",
        ),
        click.option(
            "--min-side",
            type=click.IntRange(min=1),
            default=d.min_side,
            show_default=True,
            help="Drop boxes with a side shorter than this (stored-image px).",
        ),
        click.option(
            "--fallback-min-side",
            type=click.IntRange(min=0),
            default=d.fallback_min_side,
            show_default=True,
            help="Second tier: for images with fewer than --min-boxes boxes of --min-side, add boxes down to "
            "this side (same rules, after the first tier's, up to --max-boxes). 0, or a value >= "
            "--min-side: no second tier.",
        ),
        click.option(
            "--max-aspect",
            type=click.FloatRange(min=1.0),
            default=d.max_aspect,
            show_default=True,
            help="Drop boxes with long/short side above this.",
        ),
        click.option(
            "--iou",
            type=click.FloatRange(min=0.0, max=1.0, min_open=True),
            default=d.iou,
            show_default=True,
            help="Greedy suppression in selective-search order: drop a box overlapping a kept one above this IoU.",
        ),
        click.option(
            "--max-boxes",
            type=click.IntRange(min=1, max=schema.MAX_BOXES),
            default=d.max_boxes,
            show_default=True,
            help="Keep the first N boxes after the filters.",
        ),
        click.option(
            "--min-boxes",
            type=click.IntRange(min=0),
            default=d.min_boxes,
            show_default=True,
            help="K of UniVIP: images with fewer boxes of --min-side get the second tier; images with fewer "
            "boxes in all are kept and counted as few_boxes.",
        ),
        click.option(
            "--max-side",
            type=click.IntRange(min=16),
            default=None,
            help="Downscale stored images so the longer side is at most this (px).  [default: keep size]",
        ),
        click.option(
            "--jpeg-quality",
            type=click.IntRange(1, 100),
            default=d.jpeg_quality,
            show_default=True,
            help="Quality of re-encoded images (JPEGs needing no change are stored as they are).",
        ),
        click.option(
            "--max-pixels",
            type=click.IntRange(min=1),
            default=d.max_pixels,
            show_default=True,
            help="Refuse images with more pixels (decompression-bomb guard, checked before decoding).",
        ),
        click.option("--no-progress", is_flag=True, help="No progress bar."),
    ]
    f = _s3_endpoint_option(f)  # applied first: listed last
    for option in reversed(options):
        f = option(f)
    return f


def _run(kind: str, root: str, annotations: str | None, opts: dict) -> None:
    from prep import run as prep_run
    from prep.sources import SourceError, load_source

    try:
        cfg = PrepConfig(
            kind=kind,
            root=root,
            annotations=annotations,
            fallback_min_side=opts["fallback_min_side"] or None,
            **{
                k: opts[k]
                for k in (
                    "mode",
                    "ss_max_side",
                    "seed",
                    "min_side",
                    "max_aspect",
                    "iou",
                    "max_boxes",
                    "min_boxes",
                    "max_side",
                    "jpeg_quality",
                    "max_pixels",
                    "shard_size",
                    "prefix",
                )
            },
        )
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    if opts["prefix"] and not schema.is_valid_key(opts["prefix"]):
        raise click.UsageError(f"--prefix {opts['prefix']!r}: use letters, digits, '_' and '-' only")
    if os.path.exists(opts["out"]) and not os.path.isdir(opts["out"]):
        raise click.UsageError(f"--out {opts['out']}: exists and is not a directory")
    _check_remote(opts["out"], write=True)
    try:
        source = load_source(kind, root, annotations)
    except SourceError as e:
        raise click.UsageError(str(e)) from None

    def log(msg: str) -> None:
        click.echo(msg, err=True)

    out = opts["out"]
    if opts["executor"] == "ray":
        from prep import ray_executor
        from shards import storage

        ray_executor.configure(address=opts["ray_address"])
        if not storage.is_remote(out):
            out = os.path.abspath(out)  # Ray workers do not run in this directory
    elif opts["ray_address"]:
        raise click.UsageError("--ray-address needs --executor ray")

    try:
        result = prep_run.run(
            cfg,
            out,
            workers=opts["workers"],
            part=opts["part"],
            overwrite=opts["overwrite"],
            executor=opts["executor"],
            progress=not opts["no_progress"],
            source=source,
            log=log,
        )
    except prep_run.RunConfigError as e:
        raise click.ClickException(str(e)) from None
    except prep_run.ShardsFailed as e:
        raise click.ClickException(str(e)) from None
    except ConnectionError as e:  # --executor ray: no cluster at --ray-address
        raise click.ClickException(str(e)) from None
    except OSError as e:  # storage errors name the path or URL (e.g. access denied writing the run config)
        raise click.ClickException(str(e)) from None
    click.echo(
        f"{len(result.written)} shards written, {len(result.skipped)} already done, "
        f"{result.planned} planned in {opts['out']}",
        err=True,
    )
    if result.manifest is not None:
        t = result.manifest["totals"]
        failed = sum(t["failed"].values())
        click.echo(
            f"manifest written: {t['inputs']} inputs = {t['samples']} samples + {failed} failed; "
            f"{t['boxes']} boxes, {t['few_boxes']} samples with fewer than {cfg.min_boxes}"
            + (f", {t['fallback_images']} needed the fallback tier" if "fallback_images" in t else ""),
            err=True,
        )
    elif opts["part"] != (0, 1):
        click.echo(
            "other parts still running or to run; the last one writes the manifest "
            f"(or run `prep finalize {opts['out']}`)",
            err=True,
        )


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 120})
def prep():
    """Selective-search proposal shards for object-level self-supervised pre-training.

    \b
    prep coco data/coco --annotations data/coco/annotations/instances_train2017.json --out shards/coco
    prep stats shards/coco
    prep show shards/coco -n 16 -o grid.png
    prep report shards/coco -o report.html

    Rerunning a command resumes it (done shards are skipped, partial ones redone).
    """


def _root_arg(f):
    return click.argument("root", type=click.Path(exists=True, file_okay=False))(f)


@prep.command()
@_root_arg
@click.option(
    "--annotations",
    type=click.Path(exists=True, dir_okay=False),
    help="COCO instances_*.json: image list and ids (else every image under ROOT).",
)
@_run_options
def coco(root, annotations, **opts):
    """COCO images (ROOT/...), listed by --annotations (key = 12-digit image id) or found under ROOT."""
    _run("coco", root, annotations, opts)


@prep.command()
@_root_arg
@_run_options
def imagenet(root, **opts):
    """ImageNet-style tree ROOT/<wnid>/<images>; label = index of the sorted wnid (class list in the manifest)."""
    _run("imagenet", root, None, opts)


@prep.command()
@_root_arg
@_run_options
def folder(root, **opts):
    """Every image under ROOT (recursive, hidden files skipped), in sorted path order."""
    _run("folder", root, None, opts)


def _check_out(ctx, param, value):
    from shards import storage

    if storage.is_remote(value):
        _check_remote(value, write=False)
    elif not os.path.isdir(storage.local_path(value)):
        what = "is not a directory" if os.path.exists(storage.local_path(value)) else "does not exist"
        raise click.BadParameter(f"{value!r} {what}", ctx=ctx, param=param)
    return value


def _check_output_file(ctx, param, value):
    """A file to write: its directory must exist (else the error would name a temporary file)."""
    if value is not None and not os.path.isdir(os.path.dirname(os.path.abspath(value))):
        raise click.BadParameter(
            f"{value!r}: directory {os.path.dirname(os.path.abspath(value))} does not exist", ctx=ctx, param=param
        )
    return value


def _out_arg(f):
    # a callback, not click.Path(exists=True): OUT may be an s3:// URL; --s3-endpoint is processed first (eager)
    return _s3_endpoint_option(click.argument("out", callback=_check_out)(f))


def _check_summary_out(ctx, param, value):
    from shards import storage

    # http(s) cannot be listed, but a summary needs no listing: the manifest names the shards (shards.layout)
    if storage.scheme(value) in ("http", "https"):
        return value
    return _check_out(ctx, param, value)


@prep.command()
@_out_arg
def finalize(out):
    """Write OUT/manifest.json once every planned shard is done (after `--part` jobs)."""
    from prep import run as prep_run
    from shards import storage

    try:
        manifest = prep_run.finalize(out)
    except (prep_run.RunConfigError, OSError) as e:
        raise click.ClickException(str(e)) from None
    t = manifest["totals"]
    click.echo(f"{storage.join(out, schema.MANIFEST_NAME)}: {t['shards']} shards, {t['samples']} samples")


@prep.command()
@_s3_endpoint_option
@click.argument("out", callback=_check_summary_out)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--plot", type=click.Path(dir_okay=False), help="Also draw the distributions into this PNG.")
def stats(out, as_json, plot):
    """Summary of an output from its Parquet and stats files (never the tars): ok / failed by reason, boxes, sizes,
    bytes, timing. OUT: a directory, s3://bucket/prefix, or an http(s):// URL of an output with a manifest."""
    from prep import check

    try:
        summary = check.summarize(out, plot=plot)
    except (check.CheckError, OSError) as e:
        raise click.ClickException(str(e)) from None
    if as_json:
        click.echo(json.dumps(summary, indent=2, sort_keys=True, default=str))
    else:
        click.echo(check.format_summary(summary))
    if plot:
        click.echo(f"plot written to {plot}", err=True)


@prep.command("eval-proposals")
@_s3_endpoint_option
@click.argument("out", callback=_check_summary_out)
@click.option(
    "--annotations",
    required=True,
    type=click.Path(exists=True, dir_okay=False),
    help="COCO instances JSON with the ground-truth boxes (iscrowd annotations are ignored).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def eval_proposals(out, annotations, as_json):
    """Proposal quality against COCO ground truth, from the Parquet files: recall at IoU 0.5 and 0.7 and MABO of the
    first 4 / 20 / all kept boxes, per object size (small / medium / large), and selective-search seconds per image.

    Samples are matched to annotated images by image id, else by path; ground-truth boxes are scaled to the stored
    image (--max-side)."""
    from prep import evaluate
    from shards import layout

    try:
        gt = evaluate.load_annotations(annotations)
        result = evaluate.evaluate(out, gt, layout.listing(out))
    except (OSError, ValueError) as e:  # AnnotationError is a ValueError; all name the file
        raise click.ClickException(str(e)) from None
    click.echo(json.dumps(result, indent=2, sort_keys=True) if as_json else evaluate.format_evaluation(result))


@prep.command()
@_out_arg
@click.option("-n", "count", type=click.IntRange(min=1), default=16, show_default=True, help="Samples to draw.")
@click.option(
    "-o", "--output", default="grid.png", show_default=True, type=click.Path(dir_okay=False), help="PNG to write."
)
@click.option("--seed", type=int, default=0, show_default=True, help="Which samples (random choice with this seed).")
@click.option(
    "--boxes",
    "max_boxes",
    type=click.IntRange(min=1),
    default=20,
    show_default=True,
    help="Draw the first N boxes of each sample (rank colours: red = first, blue = last).",
)
@click.option("--cell", type=click.IntRange(min=64), default=256, show_default=True, help="Cell size (px).")
def show(out, count, output, seed, max_boxes, cell):
    """Draw the proposal boxes of N random samples onto a grid PNG (key as caption)."""
    from prep import check

    skipped: list = []

    def reject(item) -> None:  # a chosen sample that breaks the format's rule: named, then left out
        click.echo(f"skipping a bad sample: {item.message}", err=True)
        skipped.append(item)

    try:
        keys = check.show(out, output, n=count, seed=seed, max_boxes=max_boxes, cell=cell, on_reject=reject)
    except (check.CheckError, OSError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"{output}: {len(keys)} samples" + (f" ({len(skipped)} bad ones skipped)" if skipped else ""))


@prep.command()
@_s3_endpoint_option
@click.argument("out", callback=_check_summary_out)
@click.option(
    "-o",
    "--output",
    default="report.html",
    show_default=True,
    type=click.Path(dir_okay=False),
    callback=_check_output_file,
    help="HTML to write.",
)
@click.option(
    "-n",
    "count",
    type=click.IntRange(min=0),
    default=48,
    show_default=True,
    help="Samples in the gallery, each among the first few of its shard (0: none, no tar is read).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Which samples (random choice with this seed).")
@click.option(
    "--proposals-eval",
    type=click.Path(exists=True, dir_okay=False),
    help="Also show the recall table of this `prep eval-proposals --json` output.",
)
@click.option("--no-progress", is_flag=True, help="No progress bar for the tar reads.")
def report(out, output, count, seed, proposals_eval, no_progress):
    """One self-contained HTML file of an output, to open offline in a browser: the summary of `prep stats`,
    inputs by status with the failed paths, a sortable shard table, a gallery of N samples with their proposals, and
    the recall of `prep eval-proposals`. Reads the Parquet, stats files and manifest, and the head of at most N tars.
    OUT: a directory, s3://bucket/prefix, or an http(s):// URL of an output with a manifest."""
    from prep import check, report_page
    from prep import report as reports

    try:
        made = report_page.report(
            out, output, n=count, seed=seed, proposals_eval=proposals_eval, progress=not no_progress
        )
    except (reports.ReportError, check.CheckError, OSError) as e:
        raise click.ClickException(str(e)) from None
    for message in made["rejected"]:
        click.echo(f"left out of the gallery, a bad sample: {message}", err=True)
    click.echo(
        f"{output}: {made['bytes'] / 1e6:.2f} MB, {made['shards']} shards, {made['samples']} samples in the gallery "
        f"({made['tars']} tars opened, {made['tar_samples_read']} samples read), {made['seconds']:.1f} s"
    )


@prep.command()
@_s3_endpoint_option
@click.argument("out", callback=_check_summary_out)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["coco-results"]),
    default="coco-results",
    show_default=True,
    help="coco-results: the JSON list of detections pycocotools' COCO.loadRes, FiftyOne and CVAT read.",
)
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(dir_okay=False),
    callback=_check_output_file,
    help="JSON file to write.",
)
@click.option(
    "--images",
    type=click.Path(dir_okay=False),
    callback=_check_output_file,
    help="The images list to write beside it (ids, paths, sizes).  [default: OUTPUT with .images.json]",
)
def export(out, fmt, output, images):
    """The kept proposals of an output for other tools, streamed from the Parquet files: one detection per box,
    bbox [x, y, w, h] in the source image's pixels, score 1 / (1 + rank), category_id 1; and an images list mapping
    image ids to paths (the COCO image ids when the output has them, else 1, 2, 3, …).
    OUT: a directory, s3://bucket/prefix, or an http(s):// URL of an output with a manifest."""
    from prep import export as exports

    try:
        done = exports.export_coco_results(out, output, images)
    except (OSError, ValueError) as e:  # both name the file
        raise click.ClickException(str(e)) from None
    ids = "ids assigned 1.." if done["assigned_ids"] else "COCO image ids"
    click.echo(f"{output}: {done['boxes']} boxes of {done['images']} images ({ids}; images list {done['images_list']})")


@prep.command()
@_out_arg
@click.option("--quick", is_flag=True, help="Do not hash the stored images (skips the SHA-256 check of their bytes).")
def verify(out, quick):
    """Check every shard: tar members vs Parquet rows vs stats, boxes inside images, images decode and match their
    SHA-256 (format 2); and the manifest.

    Prints one line per problem; exit status 1 if there is any."""
    from prep import check

    try:
        problems, summary = check.verify(out, echo=lambda line: click.echo(line), quick=quick)
    except OSError as e:  # the output itself unreachable (a broken shard is a problem line, not this)
        raise click.ClickException(str(e)) from None
    if problems:
        skipped = summary["samples_skipped"]
        if skipped:
            reasons = ", ".join(f"{reason} {n}" for reason, n in skipped.items())
            click.echo(f"{sum(skipped.values())} sample(s) that readers skip ({reasons})", err=True)
        click.echo(f"{len(problems)} problem(s) in {out}", err=True)
        sys.exit(1)
    click.echo(f"ok: {summary['shards']} shards, {summary['samples']} samples, {summary['inputs']} inputs")


def main(argv=None) -> None:
    """Console script entry point (``prep = prep.cli:main``)."""
    prep.main(args=argv, prog_name="prep")
