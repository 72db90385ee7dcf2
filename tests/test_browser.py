"""report.html in headless Chromium: every resource loads (nothing external) and the page is not blank.

Chromium comes from the Debian package `chromium` (`make chromium`, part of `make test`). A probe script is
inserted into a copy of the report: it records every failed load (capture-phase error events), the state of
each image and the resource timing entries, and writes them into the DOM, which `--dump-dom` prints.
Name resolution is disabled (`--host-resolver-rules`), so any external resource would fail and be reported.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from report_helpers import tiny_run_dir

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (run `make chromium`)")

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
         "--host-resolver-rules=MAP * ~NOTFOUND"]
PROBE = """<script>
window.__failed = [];
window.addEventListener('error', function (e) {
  var t = e.target || {}; window.__failed.push(t.src || t.href || e.message || 'error'); }, true);
window.addEventListener('load', function () {
  var images = Array.prototype.map.call(document.images, function (i) {
    return {ok: i.complete && i.naturalWidth > 0, width: i.naturalWidth}; });
  var resources = performance.getEntriesByType('resource').map(function (r) { return r.name.slice(0, 80); });
  var pre = document.createElement('pre'); pre.id = 'lorasens-probe';
  pre.textContent = JSON.stringify({failed: window.__failed, images: images, resources: resources});
  document.body.appendChild(pre);
});
</script>"""


def chromium(args: list[str], profile: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True,
                          timeout=120)


def probe(html_path: Path, tmp_path: Path) -> dict:
    page = html_path.read_text()
    probed = tmp_path / f"probe_{html_path.name}"
    probed.write_text(page.replace("<head>", "<head>" + PROBE, 1))
    result = chromium(["--virtual-time-budget=5000", "--dump-dom", probed.as_uri()], tmp_path / "profile_dom")
    found = re.search(r'<pre id="lorasens-probe">(.*?)</pre>', result.stdout, re.S)
    assert found, f"probe did not run: {result.stderr[-2000:]}"
    return json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    return tiny_run_dir(tmp_path_factory) / "report.html"


def test_report_loads_with_no_failed_resource(report, tmp_path):
    state = probe(report, tmp_path)
    assert state["failed"] == []
    assert len(state["images"]) == 7 and all(i["ok"] and i["width"] >= 400 for i in state["images"])
    assert [r for r in state["resources"] if not r.startswith("data:")] == []


def test_the_probe_sees_a_failed_resource(report, tmp_path):
    # Negative control: the same page with one external and one missing image must be reported.
    broken = tmp_path / "broken.html"
    broken.write_text(report.read_text().replace(
        "<main>", '<main><img src="http://example.invalid/x.png"><img src="missing.png">', 1))
    state = probe(broken, tmp_path)
    assert "http://example.invalid/x.png" in state["failed"]
    assert any(f.endswith("/missing.png") for f in state["failed"])


def test_report_screenshot_is_not_blank(report, tmp_path):
    from PIL import Image

    shot = tmp_path / "report.png"
    result = chromium(["--window-size=1280,1600", f"--screenshot={shot}", report.as_uri()], tmp_path / "profile_shot")
    assert shot.exists(), result.stderr[-2000:]
    with Image.open(shot) as image:
        assert image.size == (1280, 1600)
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 1
    most_common = max(count for count, _ in colours)
    assert most_common < 0.9 * 1280 * 1600  # text, tables and plots, not one flat colour


ANSWER_PROBE = """<script>
window.addEventListener('load', function () {
  var box = document.getElementById('answer'), grid = document.getElementById('answer-grid');
  var r = box.getBoundingClientRect(), g = grid ? grid.getBoundingClientRect() : null;
  var pre = document.createElement('pre'); pre.id = 'lorasens-probe';
  pre.textContent = JSON.stringify({top: r.top + window.scrollY, text: box.innerText,
    grid: g && {width: g.width, height: g.height, cells: grid.querySelectorAll('td').length,
                marked: grid.querySelectorAll('td.sel').length}});
  document.body.appendChild(pre);
});
</script>"""


def test_answer_box_is_on_the_first_screen_and_draws_the_grid(report, tmp_path):
    import json as _json

    from report_helpers import copy_run

    from lorasens.presentation.report import write_report

    run = copy_run(report.parent, tmp_path / "run")
    (run / "validation").mkdir(exist_ok=True)
    (run / "validation" / "placement_validation.json").write_text(_json.dumps(
        {"verdicts": {"matched_random": "recommended wins (-0.05 nats, CI [-0.08, -0.02])"}}))
    page = write_report(run, redraw=False).path
    probed = tmp_path / "answer.html"
    probed.write_text(page.read_text().replace("<head>", "<head>" + ANSWER_PROBE, 1))
    result = chromium(["--window-size=1280,900", "--virtual-time-budget=5000", "--dump-dom", probed.as_uri()],
                      tmp_path / "profile_answer")
    found = re.search(r'<pre id="lorasens-probe">(.*?)</pre>', result.stdout, re.S)
    assert found, result.stderr[-2000:]
    state = json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))
    assert state["top"] < 900
    assert re.search(r"\d+% of them on attention .*\d+% on MLP", state["text"])
    assert "Top layers:" in state["text"]
    assert "recommended wins" in state["text"]
    # tiny-random-llama: 4 layers x 7 module types, the recommended cells marked
    grid = state["grid"]
    assert grid["cells"] == 28 and grid["marked"] >= 1 and grid["width"] > 100 and grid["height"] > 30
