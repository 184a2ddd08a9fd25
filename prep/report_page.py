"""The HTML of ``prep report``: one page with its style, script, pictures and data inside, nothing fetched when it is
viewed (a Content-Security-Policy allows data: pictures and the page's own inline style and script only); and the
command's body (``report``): the report gathered (``prep.report``), rendered and written.

Every number shown comes from the report's data as gathered (``prep.report``): the summary tiles and tables from the
``check.summarize`` result that ``prep stats --json`` prints (also embedded whole as JSON, ``#summary-json``), each
tile carrying the raw value and its path in that JSON (``data-key``, ``data-v``). Tables are plain HTML (readable
without the script); the script sorts them by a header click and pages the gallery. Boxes are SVG drawn over each
thumbnail in the stored image's own pixels (the SVG's viewBox), so no coordinate is rescaled here.
"""

from __future__ import annotations

import html
import json
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from prep import check, evaluate
from prep.report import GALLERY_SAMPLES, Report, Sample, ShardRow, data_uri, make_report, read_evaluation
from shards import schema, storage
from shards import summary as summaries

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'"

# Summary tiles: (path in the summary JSON, label, digits; None: an integer).
TILES = (
    ("shards", "shards", None),
    ("images.inputs", "inputs", None),
    ("images.ok", "samples (ok)", None),
    ("images.failed_total", "failed", None),
    ("images.few_boxes", "samples with fewer than K boxes", None),
    ("boxes_per_image.total", "boxes", None),
    ("boxes_per_image.mean", "boxes per sample, mean", 1),
    ("box_size.p50", "box side √area, median (px)", 1),
    ("bytes_per_shard.total", "image bytes", None),
    ("seconds_per_image.mean", "selective search, s per image", 3),
)
# Distribution rows: (summary key, label, digits).
DISTRIBUTIONS = (
    ("boxes_per_image", "kept boxes per sample", 1),
    ("box_size", "box side √(w·h), px", 1),
    ("box_aspect", "box aspect w / h", 2),
)
# Histograms: (summary key, title, unit counted, log scale on x).
HISTOGRAMS = (
    ("boxes_per_image", "kept boxes per sample", "samples", False),
    ("box_size", "box side √(w·h), px", "boxes", False),
    ("box_aspect", "box aspect w / h", "boxes", True),
)


def render(report: Report) -> str:
    """The whole page of ``report``."""
    s = report.summary
    sections = [
        ("summary", "Summary", _summary_section(report)),
        ("histograms", "Distributions", _histogram_section(s)),
        ("inputs", "Inputs by status", _inputs_section(report)),
        ("shards", "Shards", _shards_section(report)),
        ("samples", "Samples", _gallery_section(report)),
    ]
    if report.evaluation is not None:
        sections.append(("proposal-quality", "Proposal quality", _evaluation_section(report.evaluation)))
    sections.append(("settings", "Settings", _settings_section(report)))
    nav = "".join(f'<a href="#{sid}">{html.escape(title)}</a>' for sid, title, _ in sections)
    body = "".join(
        f'<section id="{sid}"><h2>{html.escape(title)}</h2>{content}</section>' for sid, title, content in sections
    )
    meta = [f"format version {s.get('format_version', '?')}", f"{s['shards']} shards"]
    if report.fingerprint:
        meta.append(f"settings fingerprint {report.fingerprint}")
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<link rel="icon" href="data:,">'
        f"<title>prep report: {_e(report.out)}</title><style>{STYLE}</style></head>\n"
        f'<body><header><h1>prep report <span class="out">{_e(report.out)}</span></h1>'
        f'<p class="meta">{" · ".join(_e(m) for m in meta)}</p><nav>{nav}</nav></header>\n'
        f"<main>{body}</main>\n"
        f'<script type="application/json" id="summary-json">{_json_in_html(s)}</script>\n'
        f"<script>{SCRIPT}</script></body></html>\n"
    )


# --- sections --------------------------------------------------------------------------------------------------------
def _summary_section(report: Report) -> str:
    s = report.summary
    tiles = []
    for path, label, digits in TILES:
        value = _at(s, path)
        label = label.replace("K", str(report.min_boxes)) if "K boxes" in label else label
        shown = _mb(value) if path == "bytes_per_shard.total" and value is not None else _num(value, digits)
        tiles.append(
            f'<div class="tile" data-key="{path}" data-v="{_e(json.dumps(value))}">'
            f'<span class="v">{shown}</span><span class="l">{_e(label)}</span></div>'
        )
    ok = s["counts_add_up"] and s["accounting"]["adds_up"] is not False
    verdict = (
        '<p class="verdict good">counts add up: every input is one ok sample or one failure</p>'
        if ok
        else '<p class="verdict bad">COUNTS DO NOT ADD UP</p>'
    )
    problems = [*s["count_problems"], *s.get("box_problems", [])]
    problem_list = (
        '<ul class="problems">' + "".join(f"<li>{_e(p)}</li>" for p in problems) + "</ul>" if problems else ""
    )
    rows = []
    for key, label, digits in DISTRIBUTIONS:
        d = s[key]
        cells = [_num(d["count"])] + [
            _num(d[k], digits) for k in ("mean", "min", *(f"p{p}" for p in summaries.PERCENTILES), "max")
        ]
        rows.append(f'<tr data-key="{key}"><th scope="row">{_e(label)}</th>' + _tds(cells) + "</tr>")
    head = ["", "count", "mean", "min", *(f"p{p}" for p in summaries.PERCENTILES), "max"]
    sec = s["seconds_per_image"]
    return (
        f'<div class="tiles">{"".join(tiles)}</div>{verdict}{problem_list}'
        f'<p class="accounting">{_e(check.accounting_line(s))}</p>'
        f'<table class="dist"><thead><tr>{"".join(f"<th>{h}</th>" for h in head)}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
        f'<p class="note">Selective search: {_num(sec["mean"], 3)} s per image on average, p50 {_num(sec["p50"], 3)}, '
        f"p95 {_num(sec['p95'], 3)}, {_num(sec['total'], 1)} s in all over {_num(sec['count'])} images. "
        f"Raw proposals before the filters: {_num(s['boxes_per_image']['raw_mean'], 1)} per sample. "
        f"Percentiles: {_e(s.get('percentiles', ''))}.</p>"
    )


def _histogram_section(s: Mapping[str, Any]) -> str:
    figures = []
    for key, title, unit, log in HISTOGRAMS:
        figures.append(
            f'<figure class="hist" data-key="{key}">{histogram_svg(s[key], unit, log=log)}'
            f"<figcaption>{_e(title)}</figcaption></figure>"
        )
    return f'<div class="hists">{"".join(figures)}</div>'


def _inputs_section(report: Report) -> str:
    im = report.summary["images"]
    rows = [("ok", im["ok"], "in the tar: a sample with its proposals")]
    rows += [(r, n, schema.FAILURE_REASONS.get(r, "unknown reason")) for r, n in im["failed"].items()]
    status_rows = "".join(
        f'<tr data-status="{_e(r)}"><td><span class="status {"ok" if r == "ok" else "bad"}">{_e(r)}</span></td>'
        f'<td class="n" data-v="{n}">{_num(n)}</td><td class="n">{_pct(n, im["inputs"])}</td><td>{_e(why)}</td></tr>'
        for r, n, why in rows
    )
    out = (
        '<table class="status-table"><thead><tr><th>status</th><th>inputs</th><th>share</th><th>meaning</th></tr>'
        f"</thead><tbody>{status_rows}</tbody></table>"
    )
    failed = im["failed_total"]
    if not failed:
        return out + '<p class="note">No failed inputs.</p>'
    shown = len(report.failures)
    note = f"{_num(failed)} failed inputs" + (
        f"; the first {_num(shown)} are listed" if shown < failed else ", all listed"
    )
    body = "".join(
        f'<tr><td>{_e(f["shard"])}</td><td>{_e(f["key"])}</td><td class="path">{_e(f["path"])}</td>'
        f'<td><span class="status bad">{_e(f["status"])}</span></td><td>{_e(f["error"] or "")}</td></tr>'
        for f in report.failures
    )
    heads = [(h, False) for h in ("shard", "key", "path", "status", "error")]
    return (
        out
        + f'<h3>Failed inputs</h3><p class="note">{note}. Click a header to sort.</p>'
        + _sortable("failures-table", heads, body)
    )


def _sortable(table_id: str, heads: Sequence[tuple[str, bool]], body: str, foot: str = "") -> str:
    """A table the script sorts by a header click, in a scrolling box; ``heads``: (title, numeric) per column."""
    header = "".join(f'<th data-type="{"num" if num else "text"}">{_e(h)}</th>' for h, num in heads)
    return (
        f'<div class="scroll"><table class="sortable" id="{table_id}"><thead><tr>{header}</tr></thead>'
        f"<tbody>{body}</tbody>{f'<tfoot>{foot}</tfoot>' if foot else ''}</table></div>"
    )


def _shards_section(report: Report) -> str:
    heads = [
        ("shard", False),
        ("inputs", True),
        ("samples", True),
        ("failed", True),
        ("boxes", True),
        ("boxes / sample", True),
        ("fallback tier", True),
        ("tar size", True),
        ("seconds", True),
        ("s / input", True),
    ]
    body = "".join(_shard_row(row) for row in report.shards)
    done = [r.stats for r in report.shards if r.stats is not None]
    totals = [
        sum(st["inputs"] for st in done),
        sum(st["samples"] for st in done),
        sum(sum(st["failed"].values()) for st in done),
        sum(st["boxes"] for st in done),
    ]
    samples = totals[1]
    fallback = [st.get("fallback_images") for st in done]
    foot = (
        f"<tr><th>{len(report.shards)} shards</th>"
        + _tds(
            [
                *map(_num, totals),
                _num(totals[3] / samples if samples else None, 1),
                _num(sum(f for f in fallback if f is not None)) if done and None not in fallback else "–",
                _mb(sum(st["tar_bytes"] for st in done)),
                _num(sum(st["seconds"] for st in done), 1),
                "",
            ]
        )
        + "</tr>"
    )
    not_done = sum(r.stats is None for r in report.shards)
    note = f" {not_done} shards have no stats file (not done: rerun prep); their cells are empty." if not_done else ""
    return (
        f'<p class="note">One row per shard, from its stats file. Click a header to sort; again to reverse. '
        f"“fallback tier”: samples whose first tier kept fewer than {report.min_boxes} boxes.{note}</p>"
        + _sortable("shards-table", heads, body, foot)
    )


def _shard_row(row: ShardRow) -> str:
    st = row.stats
    if st is None:
        return f'<tr class="notdone"><td>{_e(row.name)}</td>' + _tds([""] * 9) + "</tr>"
    failed = sum(st["failed"].values())
    per_sample = st["boxes"] / st["samples"] if st["samples"] else None
    per_input = st["seconds"] / st["inputs"] if st["inputs"] else None
    cells = [
        (st["inputs"], _num(st["inputs"])),
        (st["samples"], _num(st["samples"])),
        (failed, _num(failed)),
        (st["boxes"], _num(st["boxes"])),
        (per_sample, _num(per_sample, 1)),
        (st.get("fallback_images"), _num(st.get("fallback_images"))),
        (st["tar_bytes"], _mb(st["tar_bytes"])),
        (st["seconds"], _num(st["seconds"], 1)),
        (per_input, _num(per_input, 3)),
    ]
    tds = "".join(f'<td data-v="{"" if v is None else v}">{shown}</td>' for v, shown in cells)
    return f"<tr><td>{_e(row.name)}</td>{tds}</tr>"


def _gallery_section(report: Report) -> str:
    if not report.samples:
        return '<p class="note">No samples drawn (<code>-n 0</code>, or no shard holds an ok sample).</p>'
    k = report.min_boxes
    cfg = report.config or {}
    min_side, fallback_side = cfg.get("min_side"), cfg.get("fallback_min_side")
    tier1 = f"sides ≥ {min_side} px" if min_side else "first tier"
    tier2 = (
        f"sides {fallback_side}–{min_side} px, only where the first tier kept fewer than {k}" if fallback_side else ""
    )
    reads = report.tar_reads
    legend = (
        '<div class="legend">'
        f'<span><svg width="28" height="12"><line class="lg first" x1="0" y1="6" x2="28" y2="6"/></svg>first {k} '
        "boxes (rank order, the K of UniVIP)</span>"
        '<span><svg width="28" height="12"><line class="lg rest" x1="0" y1="6" x2="28" y2="6"/></svg>the rest</span>'
        f'<span><svg width="28" height="12"><line class="lg tier" x1="0" y1="6" x2="28" y2="6"/></svg>solid: {_e(tier1)}'
        "</span>"
        + (
            f'<span><svg width="28" height="12"><line class="lg tier fb" x1="0" y1="6" x2="28" y2="6"/></svg>'
            f"dashed: fallback tier, {_e(tier2)}</span>"
            if tier2
            else ""
        )
        + "</div>"
    )
    note = (
        f"{len(report.samples)} samples chosen with seed {report.seed} among the first samples of each shard "
        f"({len(reads)} tars opened, {sum(reads.values())} samples read). Hover a box for its rank and size."
    )
    controls = (
        '<div class="controls" hidden><label><input type="checkbox" id="first-only"> only the first '
        f'{k} boxes</label><span class="pager"><button type="button" id="prev">◀ previous</button>'
        '<span id="page-label"></span><button type="button" id="next">next ▶</button></span></div>'
    )
    cards = "".join(_card(sample, k) for sample in report.samples)
    return (
        f'<p class="note">{_e(note)}</p>{legend}{controls}'
        f'<div id="gallery" class="gallery" data-page-size="{report.page_size}">{cards}</div>'
    )


def _card(sample: Sample, k: int) -> str:
    boxes = sample.boxes.tolist()
    n = len(boxes)
    fb_from = n - sample.fallback  # boxes from here on came from the fallback tier
    groups: dict[tuple[bool, bool], list[str]] = {}
    for rank, (x0, y0, x1, y1) in enumerate(boxes):
        first, fb = rank < k, rank >= fb_from
        title = (
            f"<title>rank {rank + 1}: {x1 - x0}×{y1 - y0} px{', fallback tier' if fb else ''}</title>" if first else ""
        )
        groups.setdefault((first, fb), []).append(
            f'<rect x="{x0}" y="{y0}" width="{x1 - x0}" height="{y1 - y0}">{title}</rect>'
        )
    # the rest first, the first K on top of them
    layers = "".join(
        f'<g class="{"first" if first else "rest"}{" fb" if fb else ""}">{"".join(groups[first, fb])}</g>'
        for first, fb in sorted(groups)
    )
    w, h = sample.width, sample.height
    fallback = f" ({sample.fallback} fallback)" if sample.fallback else ""
    return (
        f'<figure class="card" data-key="{_e(sample.key)}" data-shard="{_e(sample.shard)}" data-boxes="{n}" '
        f'data-fallback="{sample.fallback}"><div class="thumb">'
        f'<svg viewBox="0 0 {w} {h}" role="img" aria-label="{_e(sample.key)}: {n} proposals">'
        f'<image href="{data_uri(sample.thumbnail)}" x="0" y="0" width="{w}" height="{h}" '
        f'preserveAspectRatio="none"/>{layers}</svg></div>'
        f'<figcaption><span class="key" title="{_e(sample.path)} in {_e(sample.shard)}">{_e(sample.key)}</span>'
        f'<span class="count">{n} boxes{_e(fallback)}</span></figcaption></figure>'
    )


def _evaluation_section(r: Mapping[str, Any]) -> str:
    groups = ["all"] + [name for name, _ in evaluate.SIZES]
    metrics = [(f"recall@{t}", r["recall"][t]) for t in r["recall"]] + [("MABO", r["mabo"])]
    head1 = "<th></th>" + "".join(f'<th colspan="{len(groups)}">{_e(m)}</th>' for m, _ in metrics)
    head2 = "<th>boxes</th>" + "".join(f"<th>{g}</th>" for _ in metrics for g in groups)
    body = ""
    for top in r["abo"]:
        label = "all" if top == "all" else f"first {top}"
        cells = [_num(values[top][g], 3) for _, values in metrics for g in groups]
        body += f'<tr data-top="{_e(top)}"><th scope="row">{label}</th>{_tds(cells)}</tr>'
    lines = "".join(f"<li>{_e(line)}</li>" for line in evaluate.describe_evaluation(dict(r)))
    return (
        f'<ul class="plain">{lines}</ul><table class="eval" id="eval-table"><thead><tr>{head1}</tr><tr>{head2}</tr>'
        f"</thead><tbody>{body}</tbody></table>"
        '<p class="note">From <code>prep eval-proposals --json</code>: the share of ground-truth objects whose best '
        "IoU with the first K proposals reaches the threshold, and MABO, by COCO object size.</p>"
    )


def _settings_section(report: Report) -> str:
    if not report.config:
        return '<p class="note">No manifest, run config or stats file records the settings.</p>'
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(json.dumps(v))}</td></tr>" for k, v in sorted(report.config.items()))
    versions = ""
    if report.versions:
        versions = "".join(
            f"<tr><th>{_e(k)}</th><td>{_e(str(v))}</td></tr>" for k, v in sorted(report.versions.items())
        )
        versions = f'<h3>Versions</h3><table class="kv">{versions}</table>'
    return (
        f'<details><summary>prep settings of this output</summary><table class="kv">{rows}</table>{versions}</details>'
    )


# --- histograms ------------------------------------------------------------------------------------------------------
def histogram_svg(d: Mapping[str, Any], unit: str, *, log: bool = False, width: int = 360, height: int = 190) -> str:
    """An SVG bar chart of a summary distribution's ``histogram`` (bins of equal width on the drawn scale: linear,
    or log for ``log``), each bar titled with its range and count, and a line at the median."""
    counts, edges = d["histogram"]["counts"], d["histogram"]["edges"]
    if not counts or not max(counts):
        return f'<svg class="histogram" viewBox="0 0 {width} {height}"><text x="10" y="30">no {unit}</text></svg>'
    left, right, top, bottom = 44, 8, 10, height - 34
    bar_w = (width - left - right) / len(counts)
    peak = max(counts)
    bars = []
    for i, c in enumerate(counts):
        h = (bottom - top) * c / peak
        bars.append(
            f'<rect class="bar" x="{left + i * bar_w + 0.5:.1f}" y="{bottom - h:.1f}" width="{max(bar_w - 1, 0.5):.1f}"'
            f' height="{h:.1f}"><title>{_edge(edges[i])}–{_edge(edges[i + 1])}: {c:,} {unit}</title></rect>'
        )

    def x_of(v: float) -> float:
        """Position of value ``v`` on the axis: its bin, then linearly (or in log) within it."""
        t = [math.log(e) for e in edges] if log else list(edges)
        v = math.log(v) if log else v
        i = min(max(sum(e <= v for e in t) - 1, 0), len(counts) - 1)
        frac = (v - t[i]) / (t[i + 1] - t[i]) if t[i + 1] > t[i] else 0.0
        return left + (i + min(max(frac, 0.0), 1.0)) * bar_w

    median = ""
    if d.get("p50") is not None:
        x = x_of(d["p50"])
        median = (
            f'<line class="median" x1="{x:.1f}" y1="{top - 4}" x2="{x:.1f}" y2="{bottom}"/>'
            f'<text class="median-label" x="{x + 3:.1f}" y="{top + 6}">median {_edge(d["p50"])}</text>'
        )
    ticks = "".join(
        f'<text class="tick" x="{left + i * bar_w:.1f}" y="{bottom + 14}" text-anchor="{anchor}">{_edge(edges[i])}</text>'
        for i, anchor in ((0, "start"), (len(counts) // 2, "middle"), (len(counts), "end"))
    )
    return (
        f'<svg class="histogram" viewBox="0 0 {width} {height}" role="img" aria-label="histogram">'
        f'<line class="axis" x1="{left}" y1="{bottom}" x2="{width - right}" y2="{bottom}"/>'
        f'<text class="tick" x="{left - 4}" y="{top + 8}" text-anchor="end">{peak:,}</text>'
        f'<text class="tick" x="{left - 4}" y="{bottom}" text-anchor="end">0</text>'
        f'<text class="unit" transform="translate(12 {(top + bottom) / 2:.0f}) rotate(-90)" text-anchor="middle">'
        f"{unit}</text>"
        f"{''.join(bars)}{median}{ticks}</svg>"
    )


# --- formatting ------------------------------------------------------------------------------------------------------
def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _at(d: Mapping[str, Any], path: str) -> Any:
    for part in path.split("."):
        d = d[part]
    return d


def _num(v: float | None, digits: int | None = None) -> str:
    if v is None:
        return "–"
    if digits is None:
        return f"{int(v):,}"
    return f"{v:,.{digits}f}"


def _edge(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 or float(v).is_integer() else f"{v:.2f}"


def _mb(n: float) -> str:
    return f"{n / 1e6:,.2f} MB" if n >= 1e5 else f"{n / 1e3:,.1f} kB"


def _pct(n: int, total: int) -> str:
    """A share in percent: one decimal, or two significant digits below 1% (488 of a million is 0.049%, not 0.0%)."""
    if not total:
        return "–"
    p = 100 * n / total
    return f"{p:.1f}%" if p >= 1 or p == 0 else f"{p:.2g}%"


def _tds(cells: Sequence[str] | Iterable[str]) -> str:
    return "".join(f"<td>{c}</td>" for c in cells)


def _json_in_html(obj: Any) -> str:
    """JSON safe inside a <script> element: '</' cannot end it early ('\\/' is the same string in JSON)."""
    return json.dumps(obj, sort_keys=True, default=str).replace("</", "<\\/")


STYLE = """
:root{--fg:#1d2330;--muted:#5b6476;--line:#dfe3ea;--bg:#f5f6f8;--card:#fff;--accent:#2f6fde;--first:#ff7a00;
--rest:#1fb5e8;--good:#1d8a4a;--bad:#c62f2f}
*{box-sizing:border-box}
[hidden]{display:none!important}
body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;color:var(--fg);
background:var(--bg)}
header{background:#1d2330;color:#fff;padding:14px 28px 0}
header h1{margin:0;font-size:20px;font-weight:600}
header .out{font-weight:400;color:#b9c3d6;margin-left:8px;font-family:ui-monospace,monospace;font-size:15px}
header .meta{margin:4px 0 10px;color:#b9c3d6;font-size:13px}
nav{display:flex;gap:4px;flex-wrap:wrap}
nav a{color:#dfe6f3;text-decoration:none;padding:6px 10px;border-radius:6px 6px 0 0;font-size:13px}
nav a:hover{background:#2e3749}
main{max-width:1280px;margin:0 auto;padding:8px 28px 40px}
section{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:14px 18px;margin:16px 0}
h2{margin:0 0 10px;font-size:17px}
h3{margin:16px 0 6px;font-size:15px}
.note{color:var(--muted);margin:6px 0}
.tiles{display:grid;grid-template-columns:repeat(auto-fill,minmax(150px,1fr));gap:10px}
.tile{border:1px solid var(--line);border-radius:8px;padding:8px 10px;display:flex;flex-direction:column}
.tile .v{font-size:21px;font-weight:600;font-variant-numeric:tabular-nums}
.tile .l{color:var(--muted);font-size:12px}
.verdict{font-weight:600;margin:10px 0 2px}
.verdict.good{color:var(--good)}
.verdict.bad{color:var(--bad)}
.problems{color:var(--bad)}
.accounting{margin:2px 0 10px}
table{border-collapse:collapse;font-variant-numeric:tabular-nums}
th,td{padding:4px 10px;border-bottom:1px solid var(--line);text-align:right;white-space:nowrap}
th:first-child,td:first-child{text-align:left}
thead th{background:#eef1f5;font-weight:600;position:sticky;top:0}
table.sortable thead th{cursor:pointer;user-select:none}
table.sortable thead th:hover{background:#e2e7ef}
th[aria-sort=ascending]::after{content:" ▲";font-size:10px}
th[aria-sort=descending]::after{content:" ▼";font-size:10px}
tfoot th,tfoot td{font-weight:600;border-top:2px solid var(--line)}
tr.notdone td{background:#fff3f3}
td.path{font-family:ui-monospace,monospace;font-size:12px;text-align:left;white-space:normal;word-break:break-all}
#failures-table th,#failures-table td{text-align:left}
#failures-table td:last-child{white-space:normal}
.scroll{max-height:420px;overflow:auto;border:1px solid var(--line);border-radius:6px}
.status{padding:1px 7px;border-radius:9px;font-size:12px;font-weight:600}
.status.ok{background:#dff3e6;color:var(--good)}
.status.bad{background:#fbe3e3;color:var(--bad)}
.status-table th:last-child,.status-table td:last-child{text-align:left}
.status-table td:last-child{color:var(--muted)}
.hists{display:grid;grid-template-columns:repeat(auto-fit,minmax(300px,1fr));gap:14px}
.hist{margin:0}
.hist figcaption{text-align:center;color:var(--muted);font-size:13px}
.histogram{width:100%;height:auto}
.histogram .bar{fill:var(--accent)}
.histogram .bar:hover{fill:#173f8a}
.histogram .axis{stroke:#9aa3b2}
.histogram text{font-size:10px;fill:var(--muted)}
.histogram .median{stroke:var(--first);stroke-width:1.5;stroke-dasharray:3 2}
.histogram .median-label{fill:var(--first);paint-order:stroke;stroke:#fff;stroke-width:3px}
.legend{display:flex;gap:18px;flex-wrap:wrap;margin:8px 0;color:var(--muted);font-size:13px}
.legend span{display:flex;align-items:center;gap:6px}
.lg{stroke-width:3}
.lg.first{stroke:var(--first)}
.lg.rest{stroke:var(--rest)}
.lg.tier{stroke:#59606e;stroke-width:2}
.lg.fb{stroke-dasharray:5 3}
.controls{display:flex;justify-content:space-between;align-items:center;margin:8px 0}
.pager{display:flex;gap:10px;align-items:center}
button{font:inherit;padding:4px 12px;border:1px solid var(--line);background:#fff;border-radius:6px;cursor:pointer}
button:disabled{opacity:.4;cursor:default}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(220px,1fr));gap:12px}
.card{margin:0;border:1px solid var(--line);border-radius:8px;overflow:hidden;background:#fff}
.thumb{aspect-ratio:1;background:#20242c;display:flex;align-items:center;justify-content:center}
.thumb svg{width:100%;height:100%}
.thumb rect{fill:none;vector-effect:non-scaling-stroke}
.thumb .rest rect{stroke:var(--rest);stroke-width:1.2;opacity:.85}
.thumb .first rect{stroke:var(--first);stroke-width:2.5}
.thumb .fb rect{stroke-dasharray:5 3}
.thumb .first rect:hover{stroke:#fff}
.gallery.first-only .rest{display:none}
.card figcaption{padding:5px 8px;display:flex;flex-wrap:wrap;justify-content:space-between;column-gap:8px;font-size:12px}
.card .key{font-family:ui-monospace,monospace;overflow:hidden;text-overflow:ellipsis}
.card .count{color:var(--muted);white-space:nowrap}
table.eval th,table.eval td{text-align:center}
table.eval tbody th{text-align:left}
ul.plain{margin:0 0 8px;padding-left:18px;color:var(--muted)}
table.kv th{text-align:left;font-weight:500;color:var(--muted)}
table.kv td{text-align:left;font-family:ui-monospace,monospace;font-size:12px}
details summary{cursor:pointer;color:var(--accent)}
code{font-family:ui-monospace,monospace;font-size:12px;background:#eef1f5;padding:0 4px;border-radius:4px}
"""

# Sorting: a header click sorts its column (numbers by the cell's data-v when it has one), a second click reverses.
# Paging: the gallery's cards data-page-size at a time. Both only change what is shown; nothing is fetched.
SCRIPT = """
"use strict";
function cellValue(row, col, numeric) {
  const cell = row.children[col];
  const raw = cell.dataset.v !== undefined ? cell.dataset.v : cell.textContent;
  if (!numeric) return raw;
  const v = parseFloat(raw);
  return Number.isNaN(v) ? -Infinity : v;
}
function sortTable(table, th, col) {
  const asc = th.getAttribute("aria-sort") !== "ascending";
  for (const h of table.tHead.rows[0].cells) h.removeAttribute("aria-sort");
  th.setAttribute("aria-sort", asc ? "ascending" : "descending");
  const numeric = th.dataset.type === "num";
  const rows = Array.from(table.tBodies[0].rows);
  rows.sort((a, b) => {
    const x = cellValue(a, col, numeric), y = cellValue(b, col, numeric);
    const c = numeric ? (x === y ? 0 : x < y ? -1 : 1) : String(x).localeCompare(String(y));
    return asc ? c : -c;
  });
  table.tBodies[0].append(...rows);
}
for (const table of document.querySelectorAll("table.sortable")) {
  Array.from(table.tHead.rows[0].cells).forEach((th, col) => {
    th.tabIndex = 0;
    th.title = "sort by " + th.textContent;
    th.addEventListener("click", () => sortTable(table, th, col));
    th.addEventListener("keydown", (e) => {
      if (e.key === "Enter" || e.key === " ") { e.preventDefault(); sortTable(table, th, col); }
    });
  });
}
const gallery = document.getElementById("gallery");
if (gallery) {
  const cards = Array.from(gallery.children);
  const size = parseInt(gallery.dataset.pageSize, 10) || cards.length;
  const pages = Math.max(1, Math.ceil(cards.length / size));
  const prev = document.getElementById("prev"), next = document.getElementById("next");
  const label = document.getElementById("page-label");
  let page = 0;
  const show = () => {
    cards.forEach((card, i) => { card.hidden = Math.floor(i / size) !== page; });
    label.textContent = `page ${page + 1} of ${pages} · ${cards.length} samples`;
    prev.disabled = page === 0;
    next.disabled = page === pages - 1;
  };
  prev.addEventListener("click", () => { if (page > 0) { page--; show(); } });
  next.addEventListener("click", () => { if (page < pages - 1) { page++; show(); } });
  document.getElementById("first-only").addEventListener("change", (e) => {
    gallery.classList.toggle("first-only", e.target.checked);
  });
  document.querySelector(".controls").hidden = false;
  show();
}
"""


# --- the command ---------------------------------------------------------------------------------------------------
def write_report(report: Report, output: str) -> int:
    """Render ``report`` into the HTML file ``output`` (written atomically); returns its size in bytes."""
    page = render(report).encode()
    with storage.atomic_file(output) as f:
        f.write(page)
    return len(page)


def report(
    out: str,
    output: str,
    *,
    n: int = GALLERY_SAMPLES,
    seed: int = 0,
    proposals_eval: str | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """``prep report``: gather (``prep.report``) and write; returns what the command prints (bytes, samples, tars
    read, the messages of the bad samples left out of the gallery, seconds)."""
    start = time.perf_counter()
    evaluation = read_evaluation(proposals_eval) if proposals_eval else None
    r = make_report(out, n=n, seed=seed, evaluation=evaluation, progress=progress)
    size = write_report(r, output)
    return {
        "bytes": size,
        "shards": len(r.shards),
        "samples": len(r.samples),
        "tars": len(r.tar_reads),
        "tar_samples_read": sum(r.tar_reads.values()),
        "rejected": [item.message for item in r.rejected],
        "seconds": round(time.perf_counter() - start, 2),
    }
