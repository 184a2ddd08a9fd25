"""prep report in a real browser: headless Chromium (Debian's chromium package, driven over the DevTools pipe,
tests/browser.py) opens the page from disk with every host name unresolvable, and the test checks that the console
stays free of errors, that nothing but the file itself and data: URLs was requested, that the numbers the page shows
are `prep stats --json`, that clicking a header sorts the shard table (and again reverses it), that the gallery pages
and hides the boxes beyond the first K, and that the screenshot is a picture, not a blank page.

Skipped only where Chromium is absent, and never in CI (.ci/run installs it): there its absence fails."""

from __future__ import annotations

import json
import os

import pytest
from click.testing import CliRunner
from PIL import Image, ImageStat

from prep import report as reports
from prep import report_page
from prep.cli import prep
from tests import browser


@pytest.fixture(scope="module")
def chromium() -> str:
    binary = browser.find_chromium()
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed; .ci/run installs it (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium); CI installs it and runs this test")
    return binary


@pytest.fixture(scope="module")
def report_file(sample_output, tmp_path_factory) -> str:
    """The sample output's report, 3 gallery cards a page (so its 8 samples make 3 pages)."""
    path = str(tmp_path_factory.mktemp("page") / "report.html")
    report_page.write_report(reports.make_report(sample_output, page_size=3), path)
    return path


def test_report_in_chromium(chromium, report_file, sample_output, tmp_path):
    stats = json.loads(CliRunner().invoke(prep, ["stats", str(sample_output), "--json"]).stdout)
    url = "file://" + report_file
    with browser.Chromium(chromium, str(tmp_path / "profile"), width=1280, height=1000) as page:
        page.open(url)
        assert page.console_errors == []
        assert page.requests and all(u == url or u.startswith("data:") for u in page.requests), page.requests

        # every section laid out; the numbers are prep stats --json
        sections = page.evaluate(
            "Array.from(document.querySelectorAll('section')).map(s => [s.id, s.getBoundingClientRect().height])"
        )
        assert [s for s, _ in sections] == ["summary", "histograms", "inputs", "shards", "samples", "settings"]
        assert all(h > 40 for _, h in sections), sections
        assert page.evaluate("JSON.parse(document.getElementById('summary-json').textContent)") == stats
        tiles = page.evaluate(
            "Object.fromEntries(Array.from(document.querySelectorAll('.tile'))"
            ".map(t => [t.dataset.key, t.querySelector('.v').textContent]))"
        )
        assert tiles["images.inputs"] == "10" and tiles["images.ok"] == "8" and tiles["images.failed_total"] == "2"
        assert tiles["boxes_per_image.total"] == f"{stats['boxes_per_image']['total']:,}"

        # a header click sorts the shard table by that column, a second click reverses it
        def column(i: int) -> list[str]:
            return page.evaluate(
                f"Array.from(document.querySelectorAll('#shards-table tbody tr')).map(r => r.children[{i}].dataset.v)"
            )

        boxes = [int(v) for v in column(4)]
        assert boxes != sorted(boxes)  # the shards' own order is not the sorted one: the click must change it
        page.click("#shards-table thead th:nth-child(5)")
        assert [int(v) for v in column(4)] == sorted(boxes)
        assert page.evaluate("document.querySelector('#shards-table thead th:nth-child(5)').ariaSort") == "ascending"
        page.click("#shards-table thead th:nth-child(5)")
        assert [int(v) for v in column(4)] == sorted(boxes, reverse=True)
        page.click("#shards-table thead th:nth-child(1)")
        names = page.evaluate(
            "Array.from(document.querySelectorAll('#shards-table tbody tr')).map(r => r.children[0].textContent)"
        )
        assert names == sorted(names)

        # the gallery pages (3 cards a page here) and hides all but the first K boxes on demand
        def visible() -> list[str]:
            return page.evaluate(
                "Array.from(document.querySelectorAll('#gallery figure'))"
                ".filter(f => f.getBoundingClientRect().height > 0).map(f => f.dataset.key)"
            )

        first_page = visible()
        assert len(first_page) == 3 and page.evaluate("document.getElementById('prev').disabled")
        assert page.evaluate("document.getElementById('page-label').textContent").startswith("page 1 of 3")
        page.click("#next")
        second_page = visible()
        assert len(second_page) == 3 and not set(first_page) & set(second_page)
        page.click("#next")
        assert len(visible()) == 2 and page.evaluate("document.getElementById('next').disabled")
        page.click("#prev")
        assert visible() == second_page
        shown = "Array.from(document.querySelectorAll('#gallery g.rest')).filter(g => getComputedStyle(g).display !== 'none').length"
        assert page.evaluate(shown) > 0
        page.click("#first-only")
        assert page.evaluate(shown) == 0
        page.click("#first-only")

        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(str(tmp_path / "report.png"), full_page=True)
        page.screenshot(str(tmp_path / "top.png"))
        assert page.console_errors == []

    with Image.open(tmp_path / "report.png") as shot:
        assert shot.width == 1280 and shot.height > 2000, shot.size
        rgb = shot.convert("RGB")
        # a page of text, charts and photos: many colours and real contrast (a blank or all-dark page has neither)
        assert len(rgb.getcolors(1 << 20) or []) > 2000
        assert min(ImageStat.Stat(rgb).stddev) > 30
