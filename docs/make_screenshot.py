"""Rebuild `docs/run-page.png`, the README's picture of a run's page: the demo run, its
page opened in Debian's chromium (`apt install chromium`) through Playwright.

    python docs/make_screenshot.py [--dir /tmp/demo_page]
"""

from __future__ import annotations

import argparse
import logging
import shutil
from pathlib import Path

from flows.technical_fit import run_demo
from tasks.results.run_page import page_path

FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
OUT = Path(__file__).with_name("run-page.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/demo_page"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)
    shutil.rmtree(args.dir, ignore_errors=True)
    page = page_path(run_demo(args.dir))
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=FLAGS)
        tab = browser.new_page(viewport={"width": 1100, "height": 900})
        tab.goto(page.resolve().as_uri(), wait_until="load")
        tab.screenshot(path=str(OUT), full_page=True)
        browser.close()
    logging.info("Wrote %s", OUT)


if __name__ == "__main__":
    main()
