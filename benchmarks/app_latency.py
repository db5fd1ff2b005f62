"""How long one click on **Step** takes to refresh the app, measured in a real browser.

Starts `marimo run notebooks/workbench.py` headless, opens it in Debian's chromium (Playwright), waits for the
first run, then clicks Step N times. For each click it reports the time until the new token is on the page
and until the kernel has finished every cell (all panels redrawn), next to the engine's own step time read
from the trace (both paths, probes on). Needs the `test` extra (playwright) and /usr/bin/chromium.

    .venv/bin/python benchmarks/app_latency.py [--clicks 8]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from app_driver import AppPage, MarimoServer, launch_chromium  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clicks", type=int, default=8)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    server = MarimoServer(ROOT / "notebooks" / "workbench.py")
    server.start(ROOT)
    try:
        server.wait_ready(120)
        with sync_playwright() as pw:
            context, profile = launch_chromium(pw, viewport=(1600, 1000))
            page = context.new_page()
            page.goto(server.url, wait_until="domcontentloaded")
            app = AppPage(page, server)
            app.wait_ready(180)
            text_s, done_s = [], []
            for _ in range(args.clicks):
                before = app.token_count()
                t0 = time.monotonic()
                app.button("Step").click()
                app.wait_until(lambda: app.token_count() > before, 60, "the new token", poll=0.02)
                text_s.append(time.monotonic() - t0)
                quiet = 0.3
                app.wait_idle(60, quiet=quiet, poll=0.02)
                done_s.append(time.monotonic() - t0 - quiet)
            context.close()
            shutil.rmtree(profile, ignore_errors=True)
    finally:
        server.stop()
    print(f"{args.clicks} clicks on Step (default model), seconds:")
    print(f"  new token on the page: median {statistics.median(text_s):.3f}, max {max(text_s):.3f}")
    print(f"  every panel redrawn:   median {statistics.median(done_s):.3f}, max {max(done_s):.3f}  (±0.02: polled)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
