"""The report page in a real browser: headless Chromium paints every plot and the whole table, offline."""

from __future__ import annotations

import re
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
from test_report import OPTIONS, make_runs

import robustkd

CHROMIUM = shutil.which("chromium")
# Chromium refuses to run as root without --no-sandbox; the page is our own file, with no network access.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run", "--disable-extensions"]
PROBE = """<script>
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var painted = images.filter(function (im) { return im.complete && im.naturalWidth > 0; });
  document.body.setAttribute("data-images", String(images.length));
  document.body.setAttribute("data-images-ok", String(painted.length));
  document.body.setAttribute("data-scroll-width", String(document.documentElement.scrollWidth));
  document.body.setAttribute("data-ranked", String(document.querySelectorAll("#ranking tbody tr").length));
});
</script>
"""

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed; 'make browser' installs it (Debian)"),
]


class _Rows(HTMLParser):
    def __init__(self):
        super().__init__()
        self.models: list[str] = []
        self.body: dict[str, str | None] = {}

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "tr" and "data-model" in attrs:
            self.models.append(attrs["data-model"])
        if tag == "body":
            self.body = attrs


def _chromium(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, *FLAGS, *args], capture_output=True, text=True, timeout=180, check=False)


def test_chromium_renders_every_plot_and_student(tmp_path):
    from PIL import Image

    runs = make_runs(tmp_path / "runs", students=("kd", "ard", "rslad"))
    students = [runs["kd"], runs["ard"], runs["rslad"]]
    result = robustkd.report(students, tmp_path / "report", device="cpu", progress=False, **OPTIONS)
    page = tmp_path / "report" / "report.html"
    n_images = page.read_text().count("<img ")
    assert n_images == 4

    # The DOM after load, from a copy of the page with a probe that records whether each image decoded.
    probed = tmp_path / "probed.html"
    probed.write_text(page.read_text().replace("</body>", PROBE + "</body>"))
    dom = _chromium("--virtual-time-budget=10000", "--dump-dom", probed.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    rows = _Rows()
    rows.feed(dom.stdout)
    assert rows.body.get("data-images") == str(n_images), dom.stdout[-500:]
    assert rows.body.get("data-images-ok") == str(n_images)
    assert rows.models == ["teacher", "kd", "ard", "rslad"]
    for name in ("kd", "ard", "rslad"):
        assert re.search(rf"<b>{name}</b> \(teacher: teacher\): ", dom.stdout)
        assert result["summary"][name]["text"].split(":")[0] in dom.stdout

    # At 1280 px the page needs no horizontal scrolling, and it ranks every student.
    narrow = _chromium("--window-size=1280,1000", "--virtual-time-budget=10000", "--dump-dom", probed.as_uri())
    assert narrow.returncode == 0, narrow.stderr[-2000:]
    width = _Rows()
    width.feed(narrow.stdout)
    assert int(width.body["data-scroll-width"]) <= 1280
    assert width.body.get("data-ranked") == "3" and [e["rank"] for e in result["ranking"]] == [1, 2, 3]
    assert "Which student to ship" in narrow.stdout
    assert ('id="nearest-miss"' in narrow.stdout) == (result["nearest_miss"] is not None)

    # The page as painted: tall enough for the table and all four plots.
    shot = tmp_path / "shot.png"
    painted = _chromium("--window-size=1400,4200", f"--screenshot={shot}", page.as_uri())
    assert painted.returncode == 0 and shot.is_file(), painted.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape == (4200, 1400, 3)
    assert (pixels.min(axis=2) < 240).mean() > 0.02
    # Matplotlib's first line colour (C0, #1f77b4) appears only where a plot was painted.
    c0 = (np.abs(pixels - np.array([31, 119, 180])) < 25).all(axis=2).sum()
    assert c0 > 500


def test_the_probe_sees_a_broken_image(tmp_path):
    """The DOM check above can fail: an image whose data does not decode is counted as not painted."""
    page = '<html><body><img src="data:image/png;base64,iVBORw0KGgo="><img src="data:image/png;base64,' + (
        "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
        '"></body></html>'
    )
    probed = tmp_path / "probed.html"
    probed.write_text(page.replace("</body>", PROBE + "</body>"))
    dom = _chromium("--virtual-time-budget=10000", "--dump-dom", probed.as_uri())
    rows = _Rows()
    rows.feed(dom.stdout)
    assert rows.body.get("data-images") == "2" and rows.body.get("data-images-ok") == "1"


def test_the_probe_sees_a_page_too_wide(tmp_path):
    """The width check above can fail: a table wider than the window makes the page scroll sideways."""
    cells = "".join(f"<td>column {i} of a wide table</td>" for i in range(40))
    probed = tmp_path / "wide.html"
    probed.write_text(f"<html><body><table><tr>{cells}</tr></table>{PROBE}</body></html>")
    dom = _chromium("--window-size=1280,1000", "--virtual-time-budget=10000", "--dump-dom", probed.as_uri())
    rows = _Rows()
    rows.feed(dom.stdout)
    assert int(rows.body["data-scroll-width"]) > 1280
