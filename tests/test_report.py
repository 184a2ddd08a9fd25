"""prep report: the page's structure (every section, well-formed, nothing to fetch), its numbers against
`prep stats --json`, the stats files and the Parquet, the gallery's boxes against the shards, the sample choice
(reproducible, bounded to the head of a few tars), the recall table, an s3:// output, and clear errors.
The page in a real browser: tests/test_report_browser.py."""

from __future__ import annotations

import io
import json
import os
import shutil
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from prep import evaluate
from prep import report as reports
from prep.cli import prep
from shards import schema

VOID = {"meta", "link", "input", "br", "img", "hr", "wbr", "source", "col", "area", "base", "embed", "track"}


class Element:
    def __init__(self, tag: str, attrs: dict[str, str | None]):
        self.tag, self.attrs, self.children, self.text = tag, attrs, [], ""

    def iter(self, tag: str | None = None, **attrs: str):
        """Every element below this one with ``tag`` (any when None) whose attributes include ``attrs``
        (``class_`` matches one word of ``class``)."""
        for child in self.children:
            cls = attrs.get("class_")
            if (tag is None or child.tag == tag) and all(
                (k == "class_" and cls in (child.attrs.get("class") or "").split()) or child.attrs.get(k) == v
                for k, v in attrs.items()
            ):
                yield child
            yield from child.iter(tag, **attrs)

    def find(self, tag: str | None = None, **attrs: str) -> Element:
        found = next(self.iter(tag, **attrs), None)
        assert found is not None, f"no <{tag} {attrs}>"
        return found

    def all_text(self) -> str:
        return self.text + "".join(c.all_text() for c in self.children)


class TreeBuilder(HTMLParser):
    """A tree of the page that fails on any element closed out of order or left open."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.root = Element("#document", {})
        self.stack = [self.root]

    def handle_starttag(self, tag, attrs):
        element = Element(tag, dict(attrs))
        self.stack[-1].children.append(element)
        if tag not in VOID:
            self.stack.append(element)

    def handle_startendtag(self, tag, attrs):
        self.stack[-1].children.append(Element(tag, dict(attrs)))

    def handle_endtag(self, tag):
        assert self.stack[-1].tag == tag, f"</{tag}> closes <{self.stack[-1].tag}>"
        self.stack.pop()

    def handle_data(self, data):
        self.stack[-1].text += data


def parse(page: str) -> Element:
    builder = TreeBuilder()
    builder.feed(page)
    builder.close()
    assert builder.stack == [builder.root], f"unclosed: {[e.tag for e in builder.stack[1:]]}"
    return builder.root


def invoke(*args):
    return CliRunner().invoke(prep, [str(a) for a in args], catch_exceptions=False)


def stats_json(out) -> dict:
    r = invoke("stats", out, "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def page(sample_output, tmp_path_factory) -> tuple[str, Element]:
    path = tmp_path_factory.mktemp("report") / "report.html"
    r = invoke("report", sample_output, "-o", path, "--no-progress")
    assert r.exit_code == 0, r.output
    assert f"{path}: " in r.stdout and "8 samples in the gallery" in r.stdout
    text = path.read_text()
    return text, parse(text)


def parquet_rows(out) -> dict[str, list[dict]]:
    return {
        n[: -len(schema.PARQUET_SUFFIX)]: pq.read_table(os.path.join(out, n)).to_pylist()
        for n in sorted(os.listdir(out))
        if n.endswith(schema.PARQUET_SUFFIX)
    }


def test_every_section_is_there_and_the_page_is_well_formed_and_self_contained(page):
    text, doc = page
    ids = [s.attrs["id"] for s in doc.iter("section")]
    assert ids == ["summary", "histograms", "inputs", "shards", "samples", "settings"]
    # nothing to fetch: every reference is inside the page, and the policy forbids any other
    refs = [(e.tag, k, v) for e in doc.iter() for k, v in e.attrs.items() if k in ("src", "href", "action", "srcset")]
    assert refs and all(v.startswith(("data:", "#")) for _, _, v in refs), [r for r in refs if r[2][:5] != "data:"]
    assert not list(doc.iter("link", rel="stylesheet")) and all("src" not in s.attrs for s in doc.iter("script"))
    csp = doc.find("meta", **{"http-equiv": "Content-Security-Policy"}).attrs["content"]
    assert "default-src 'none'" in csp and "img-src data:" in csp
    assert "url(" not in text and "@import" not in text


def test_summary_is_prep_stats_json(page, sample_output):
    _, doc = page
    expected = stats_json(sample_output)
    assert json.loads(doc.find("script", id="summary-json").all_text()) == expected
    tiles = list(doc.iter("div", class_="tile"))
    assert len(tiles) >= 8
    for tile in tiles:
        value = expected
        for part in tile.attrs["data-key"].split("."):
            value = value[part]
        assert json.loads(tile.attrs["data-v"]) == value, tile.attrs
    assert doc.find("div", **{"data-key": "images.ok"}).find("span", class_="v").all_text() == "8"
    assert doc.find("div", **{"data-key": "images.failed_total"}).find("span", class_="v").all_text() == "2"
    box_row = [td.all_text() for td in doc.find("tr", **{"data-key": "boxes_per_image"}).iter("td")]
    d = expected["boxes_per_image"]
    assert box_row[:2] == [str(d["count"]), f"{d['mean']:.1f}"] and box_row[-1] == f"{d['max']:.1f}"
    section = doc.find("section", id="summary").all_text()
    assert "every input accounted for" in section and "counts add up" in section
    for key in ("boxes_per_image", "box_size", "box_aspect"):  # one chart per histogram, one bar per bin
        bars = list(doc.find("figure", **{"data-key": key}).iter("rect", class_="bar"))
        assert len(bars) == len(expected[key]["histogram"]["counts"])
        assert [int(b.find("title").all_text().rsplit(": ", 1)[1].split()[0]) for b in bars] == expected[key][
            "histogram"
        ]["counts"]


def test_inputs_by_status_and_the_failed_paths_with_their_errors(page, sample_output):
    _, doc = page
    statuses = {
        tr.attrs["data-status"]: int(tr.find("td", class_="n").attrs["data-v"])
        for tr in doc.find("section", id="inputs").iter("tr")
        if "data-status" in tr.attrs
    }
    assert statuses == {"ok": 8, "empty": 1, "missing": 1}
    table = doc.find("table", id="failures-table")
    rows = [[td.all_text() for td in tr.iter("td")] for tr in table.find("tbody").iter("tr")]
    failed = [
        [shard, r["key"], r["path"], r["status"], r["error"]]
        for shard, shard_rows in parquet_rows(sample_output).items()
        for r in shard_rows
        if r["status"] != schema.STATUS_OK
    ]
    assert rows == failed and len(rows) == 2
    assert "000000000010.jpg: file not found" in rows[1][4]


def test_shard_table_is_the_stats_files(page, sample_output):
    _, doc = page
    table = doc.find("table", id="shards-table")
    assert "sortable" in table.attrs["class"]
    heads = [th.all_text() for th in table.find("thead").iter("th")]
    assert heads[:5] == ["shard", "inputs", "samples", "failed", "boxes"] and "tar size" in heads and "seconds" in heads
    rows = list(table.find("tbody").iter("tr"))
    assert [tr.find("td").all_text() for tr in rows] == ["coco-000000", "coco-000001", "coco-000002", "coco-000003"]
    for tr in rows:
        name = tr.find("td").all_text()
        st = json.loads(Path(sample_output, name + schema.STATS_SUFFIX).read_text())
        v = dict(zip(heads[1:], [td.attrs.get("data-v") for td in list(tr.iter("td"))[1:]], strict=True))
        assert int(v["inputs"]) == st["inputs"] and int(v["samples"]) == st["samples"]
        assert int(v["boxes"]) == st["boxes"] and int(v["failed"]) == sum(st["failed"].values())
        assert int(v["tar size"]) == st["tar_bytes"] and float(v["seconds"]) == st["seconds"]
        assert int(v["fallback tier"]) == st["fallback_images"]
    assert [th.attrs["data-type"] for th in table.find("thead").iter("th")][:2] == ["text", "num"]


def test_gallery_draws_every_box_of_the_shards_with_first_k_and_tiers_apart(page, sample_output):
    _, doc = page
    rows = {r["key"]: r for shard_rows in parquet_rows(sample_output).values() for r in shard_rows}
    cards = list(doc.find("div", id="gallery").iter("figure"))
    assert len(cards) == 8  # -n 48 > the 8 ok samples: all of them
    assert sorted(c.attrs["data-key"] for c in cards) == sorted(k for k, r in rows.items() if r["status"] == "ok")
    k = 4
    seen_fallback = 0
    for card in cards:
        row = rows[card.attrs["data-key"]]
        svg = card.find("svg")
        # boxes in stored pixels, unscaled (HTMLParser lowercases attribute names)
        assert svg.attrs["viewbox"] == f"0 0 {row['width']} {row['height']}"
        drawn = []
        for g in svg.iter("g"):
            for rect in g.iter("rect"):
                box = [int(rect.attrs[a]) for a in ("x", "y", "width", "height")]
                drawn.append((box, set(g.attrs["class"].split())))
        # each shard box drawn once, in its group: the first K and the rest, fallback-tier boxes dashed (class fb)
        expected = [[x0, y0, x1 - x0, y1 - y0] for x0, y0, x1, y1 in row["boxes"]]
        assert sorted(b for b, _ in drawn) == sorted(expected)
        n_fb = row["fallback_boxes"] or 0
        for rank, box in enumerate(expected):
            classes = next(c for b, c in drawn if b == box)
            assert ("first" in classes) == (rank < k) and ("rest" in classes) == (rank >= k)
            assert ("fb" in classes) == (rank >= len(expected) - n_fb)
        seen_fallback += n_fb > 0
        caption = card.find("figcaption").all_text()
        assert row["key"] in caption and f"{len(expected)} boxes" in caption
        thumb = card.find("image").attrs["href"]
        assert thumb.startswith("data:image/jpeg;base64,")
        im = Image.open(io.BytesIO(__import__("base64").b64decode(thumb.split(",", 1)[1])))
        assert max(im.size) == min(reports.THUMB_SIDE, max(row["width"], row["height"]))
    assert seen_fallback == 2  # the fixture's two photos that needed the fallback tier


def test_sample_choice_is_reproducible_and_reads_only_the_head_of_a_few_tars():
    counts = {f"s-{i:06d}": 1000 for i in range(300)}
    a = reports.choose_samples(counts, 48, seed=3)
    assert a == reports.choose_samples(counts, 48, seed=3) != reports.choose_samples(counts, 48, seed=4)
    assert sum(map(len, a.values())) == 48 and len(a) <= 48
    assert all(i < reports.HEAD for ordinals in a.values() for i in ordinals)
    assert all(ordinals == sorted(set(ordinals)) for ordinals in a.values())
    # fewer samples than asked: all of them; one big shard among small ones: deeper into it, only as far as needed
    assert reports.choose_samples({"a-000000": 3, "b-000000": 2}, 48, 0) == {"a-000000": [0, 1, 2], "b-000000": [0, 1]}
    deep = reports.choose_samples({"a-000000": 100, "b-000000": 1}, 20, 0)  # heads of 8 and 16 offer too few
    assert sum(map(len, deep.values())) == 20 and 2 * reports.HEAD <= max(deep["a-000000"]) < 4 * reports.HEAD
    assert reports.choose_samples({}, 48, 0) == {}


def test_n_and_seed_choose_the_gallery_and_n_0_opens_no_tar(sample_output, tmp_path):
    def keys(path) -> list[str]:
        return [c.attrs["data-key"] for c in parse(path.read_text()).find("div", id="gallery").iter("figure")]

    invoke("report", sample_output, "-o", tmp_path / "a.html", "-n", "3", "--seed", "1", "--no-progress")
    invoke("report", sample_output, "-o", tmp_path / "b.html", "-n", "3", "--seed", "1", "--no-progress")
    assert len(keys(tmp_path / "a.html")) == 3 and keys(tmp_path / "a.html") == keys(tmp_path / "b.html")
    seeds = {tuple(keys(tmp_path / "a.html"))}
    for seed in range(2, 6):
        invoke("report", sample_output, "-o", tmp_path / "c.html", "-n", "3", "--seed", seed, "--no-progress")
        seeds.add(tuple(keys(tmp_path / "c.html")))
    assert len(seeds) > 1

    # without the tars: -n 0 still makes the whole report (it never opens one)
    out = tmp_path / "no_tars"
    shutil.copytree(sample_output, out)
    for name in os.listdir(out):
        if name.endswith(schema.TAR_SUFFIX):
            os.remove(out / name)
    r = invoke("report", out, "-o", tmp_path / "d.html", "-n", "0")
    assert r.exit_code == 0 and "0 tars opened" in r.stdout, r.output
    doc = parse((tmp_path / "d.html").read_text())
    assert not list(doc.iter("figure", class_="card")) and "-n 0" in doc.find("section", id="samples").all_text()
    r = invoke("report", out, "-o", tmp_path / "e.html", "--no-progress")
    assert r.exit_code == 1 and "coco-000000.tar" in r.output and "Traceback" not in r.output


def test_a_bad_sample_is_left_out_of_the_gallery_and_named(sample_output, tmp_path):
    from test_check import rewrite_tar

    def keys(path) -> list[str]:
        return [c.attrs["data-key"] for c in parse(path.read_text()).find("div", id="gallery").iter("figure")]

    out = tmp_path / "out"
    shutil.copytree(sample_output, out)
    r = invoke("report", out, "-o", tmp_path / "a.html", "--no-progress")  # every ok sample: 8
    everything = keys(tmp_path / "a.html")
    victim = sorted(everything)[0]  # the first sample of coco-000000: a box far outside its image

    def damage(name: str, data: bytes):
        if name == f"{victim}.json":
            return json.dumps({**json.loads(data), "boxes": [[0, 0, 9000, 9000]]}).encode()
        return data

    rewrite_tar(str(out / "coco-000000.tar"), damage)
    r = invoke("report", out, "-o", tmp_path / "b.html", "--no-progress")
    assert r.exit_code == 0, r.output
    assert sorted(keys(tmp_path / "b.html")) == sorted(k for k in everything if k != victim)
    assert f"left out of the gallery, a bad sample: {out / 'coco-000000.tar'}: sample {victim!r}: box 0" in r.stderr


def test_progress_bar_for_the_tar_reads(sample_output, tmp_path):
    r = invoke("report", sample_output, "-o", tmp_path / "r.html")
    # the bar counts the samples to read (8 here: every sample of 3 tars), cleared when done
    assert r.exit_code == 0 and "reading tars" in r.stderr and "/8 [" in r.stderr, r.stderr


def test_recall_table_of_eval_proposals(sample_output, tmp_path):
    result = evaluate.evaluate(sample_output, evaluate.load_annotations(sample_output.annotations))
    (tmp_path / "eval.json").write_text(json.dumps(result))
    r = invoke("report", sample_output, "-o", tmp_path / "r.html", "--proposals-eval", tmp_path / "eval.json", "-n", 0)
    assert r.exit_code == 0, r.output
    doc = parse((tmp_path / "r.html").read_text())
    assert [s.attrs["id"] for s in doc.iter("section")][-2:] == ["proposal-quality", "settings"]
    table = doc.find("table", id="eval-table")
    tops = [tr.attrs["data-top"] for tr in table.find("tbody").iter("tr")]
    assert tops == list(result["abo"])
    cells = [td.all_text() for td in table.find("tbody").find("tr", **{"data-top": "all"}).iter("td")]
    groups = ["all", "small", "medium", "large"]
    want = [result["recall"][t]["all"][g] for t in result["recall"] for g in groups]
    want += [result["mabo"]["all"][g] for g in groups]
    assert cells == ["–" if v is None else f"{v:.3f}" for v in want]
    assert (
        result["annotations"]["objects"] == 2 and "objects: 2" in doc.find("section", id="proposal-quality").all_text()
    )


def test_errors_name_the_file(sample_output, tmp_path):
    (tmp_path / "bad.json").write_text('{"recall": {}}')
    r = invoke("report", sample_output, "-o", tmp_path / "r.html", "--proposals-eval", tmp_path / "bad.json")
    assert r.exit_code == 1 and "bad.json: not the output of `prep eval-proposals --json`" in r.output
    (tmp_path / "notjson.json").write_text("{")
    r = invoke("report", sample_output, "-o", tmp_path / "r.html", "--proposals-eval", tmp_path / "notjson.json")
    assert r.exit_code == 1 and "notjson.json: not JSON" in r.output
    r = invoke("report", tmp_path / "absent", "-o", tmp_path / "r.html")
    assert r.exit_code == 2 and "does not exist" in r.output
    r = invoke("report", sample_output, "-o", tmp_path / "no" / "r.html")
    assert r.exit_code == 2 and f"directory {tmp_path / 'no'} does not exist" in r.output
    (tmp_path / "empty").mkdir()
    r = invoke("report", tmp_path / "empty", "-o", tmp_path / "r.html")
    assert r.exit_code == 1 and "no shard parquet files" in r.output
    assert not (tmp_path / "r.html").exists()


def assert_same_report(url: str, page: tuple[str, Element], local: str, html) -> None:
    """The report of ``url`` is the local output's page but for the output's name in it."""
    r = invoke("report", url, "-o", html, "--no-progress")
    assert r.exit_code == 0, r.output
    text = html.read_text()
    assert json.loads(parse(text).find("script", id="summary-json").all_text()) == stats_json(local)
    assert text.replace(url, "OUT") == page[0].replace(local, "OUT")


def test_s3_output_gives_the_same_report(s3_server, sample_output, tmp_path, page):
    client = s3_server.client()
    for name in os.listdir(sample_output):
        client.upload_file(os.path.join(sample_output, name), s3_server.bucket, f"out/{name}")
    assert_same_report(s3_server.url("out"), page, sample_output, tmp_path / "s3.html")


def test_https_output_gives_the_same_report(http_server, sample_output, tmp_path, page):
    # an http(s) output cannot be listed: its shards come from the manifest, tars included
    server = http_server(sample_output)
    assert_same_report(server.url, page, sample_output, tmp_path / "http.html")
    assert any(path.endswith(".tar") for _, path, _ in server.log)


def test_size_stays_small(page):
    text, doc = page
    sizes = Counter()
    for card in doc.iter("figure", class_="card"):
        sizes["thumbnails"] += len(card.find("image").attrs["href"])
    # 8 thumbnails of <= 256 px and a few KB of tables, style and script
    assert len(text.encode()) < 250_000 and len(text.encode()) - sizes["thumbnails"] < 60_000, sizes
