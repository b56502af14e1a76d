"""Render a run's report.html in headless Chromium and save a screenshot (docs/report.png in the README).

bash scripts/setup.sh --browser
python scripts/report_screenshot.py runs/demo docs/report.png
"""

from __future__ import annotations

import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]


def main(run: str, out: str) -> int:
    page_path = Path(run) / "report.html"
    if not page_path.is_file():
        print(f"error: {page_path} does not exist: run `fanlora report {run}` first", file=sys.stderr)
        return 2
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=FLAGS)
        page = browser.new_page(viewport={"width": 1250, "height": 1000})
        page.goto(page_path.resolve().as_uri())
        page.locator("#heatmap td.kept").nth(3).hover()
        page.screenshot(path=out, full_page=False)
        browser.close()
    print(f"screenshot → {out}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3:
        print("usage: python scripts/report_screenshot.py RUN_DIR OUT.png", file=sys.stderr)
        raise SystemExit(2)
    raise SystemExit(main(sys.argv[1], sys.argv[2]))
