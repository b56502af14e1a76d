"""`fanlora report`: the page's content, and the page rendered in headless Chromium (Debian's, driven by Playwright).

The browser test needs `scripts/setup.sh --browser`; it is skipped without it unless FANLORA_REQUIRE_BROWSER=1
(set by CI, which installs the browser), so CI cannot pass by skipping it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from helpers import copy_run, fail

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


@pytest.fixture(scope="module")
def run_with_metrics(searched_run, tmp_path_factory):
    """The tiny searched run, selected, with a task's base and adapter metrics beside it."""
    from fanlora.cli import main

    _, searched = searched_run
    run = copy_run(searched, tmp_path_factory.mktemp("report") / "run")
    assert main(["select", "--run-dir", str(run)]) == 0
    for who, acc in (("base", 0.5), ("fanlora", 0.75)):
        (run / "copa" / who).mkdir(parents=True)
        (run / "copa" / who / "metrics.json").write_text(json.dumps({"task": "copa", "acc": acc, "n": 8}))
    return run


@pytest.mark.e2e
def test_report_holds_heatmap_setting_and_metrics(run_with_metrics, capsys):
    from fanlora.cli import main
    from fanlora.setting import Setting

    assert main(["report", str(run_with_metrics)]) == 0
    page = (run_with_metrics / "report.html").read_text()
    setting = Setting.read(run_with_metrics / "setting.json")
    layers, kinds = setting.num_layers, len(setting.kinds)
    assert page.count("data-score=") == layers * kinds
    assert page.count('class="kept"') == setting.n_modules
    assert "0.7500" in page and "0.5000" in page  # the adapter's and the base's accuracy
    assert "<polyline" in page  # stage a's loss curve
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")  # nothing to fetch
    assert 'src="data:image/png;base64,' in page  # the PNG figures inline


def test_report_refuses_a_directory_without_results(tmp_path, capsys):
    assert "neither scores.json nor setting.json" in fail(capsys, ["report", str(tmp_path)])
    assert "does not exist" in fail(capsys, ["report", str(tmp_path / "nope")])
    assert not (tmp_path / "report.html").exists()


def _browser_or_skip():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if sync_playwright is None or not Path(CHROMIUM).is_file():
        if os.environ.get("FANLORA_REQUIRE_BROWSER") == "1":
            pytest.fail("FANLORA_REQUIRE_BROWSER=1 but Chromium/Playwright are missing: run scripts/setup.sh --browser")
        pytest.skip("headless Chromium not installed (scripts/setup.sh --browser)")
    return sync_playwright


@pytest.mark.e2e
def test_report_renders_in_chromium_without_console_errors(run_with_metrics):
    from fanlora.report import write_report

    sync_playwright = _browser_or_skip()
    page_path = write_report(run_with_metrics)
    flags = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=flags)
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        problems: list[str] = []
        page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
        local = ("file:", "data:")
        page.on("request", lambda r: None if r.url.startswith(local) else problems.append(f"network: {r.url}"))
        page.goto(page_path.resolve().as_uri())
        page.wait_for_load_state("load")
        assert page.locator("#heatmap td[data-score]").count() > 0
        assert page.locator("#setting-layers tr").count() > 1
        assert page.locator("#metrics table").count() == 1
        assert all(page.evaluate("[...document.images].map(i => i.complete && i.naturalWidth > 0)"))
        cell = page.locator("#heatmap td.kept").first
        cell.hover()
        assert "score" in page.locator("#hover").inner_text() and "(kept)" in page.locator("#hover").inner_text()
        browser.close()
    assert problems == []


@pytest.mark.e2e
@pytest.mark.parametrize("name", ["run.json", "search/metrics.json", "copa/fanlora/metrics.json"])
def test_report_refuses_a_cut_or_junk_run_file_with_one_line(run_with_metrics, tmp_path, capsys, name):
    run = copy_run(run_with_metrics, tmp_path / "run")
    (run / "report.html").unlink(missing_ok=True)
    text = (run / name).read_text()
    (run / name).write_text(text[: len(text) // 2])  # cut in half, as a full disk or a kill leaves it
    err = fail(capsys, ["report", str(run)])
    assert name.split("/")[-1] in err and "unreadable" in err and not (run / "report.html").exists()
    (run / name).write_text("[1, 2]")  # junk: valid JSON, not an object
    assert "not a JSON object" in fail(capsys, ["report", str(run)])
