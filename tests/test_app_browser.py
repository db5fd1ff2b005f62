"""The marimo app in a real browser: it loads the default model, Step adds one token per click, the four
mission panels draw charts with data, and docs/screenshot.png is refreshed.

Needs Debian's chromium at /usr/bin/chromium and the playwright package (`.ci/install-browser` installs
both); skipped otherwise. `WORKBENCH_APP_NOTEBOOK=path` points it at another notebook,
`WORKBENCH_APP_SCREENSHOT=path` writes the screenshot elsewhere.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = Path(os.environ.get("WORKBENCH_APP_NOTEBOOK", ROOT / "notebooks" / "workbench.py"))
SCREENSHOT = Path(os.environ.get("WORKBENCH_APP_SCREENSHOT", ROOT / "docs" / "screenshot.png"))
PANELS = ("KV cache", "QK norm", "Expert routing", "Tokens/s")

SERVER_START_S = 120  # until marimo answers HTTP
APP_READY_S = 120  # until the initial run (model load, first cells) is done
CLICK_S = 60  # per click, until the new token is on the page and the kernel is idle
CHARTS_S = 30  # until every panel's chart has drawn

sync_api = pytest.importorskip(
    "playwright.sync_api", exc_type=ImportError, reason="playwright is not installed (.ci/install-browser)"
)

from app_driver import CHROMIUM, AppPage, MarimoServer, chart_has_data, launch_chromium  # noqa: E402

if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} is missing (.ci/install-browser installs it)", allow_module_level=True)
if not NOTEBOOK.exists():
    pytest.skip(f"{NOTEBOOK} does not exist yet", allow_module_level=True)


@pytest.fixture(scope="module")
def server(request):
    srv = MarimoServer(NOTEBOOK)
    request.addfinalizer(srv.stop)  # registered first: runs even if start/wait fails
    srv.start(cwd=ROOT)
    srv.wait_ready(SERVER_START_S)
    return srv


@pytest.fixture(scope="module")
def app(server, request):
    pw = sync_api.sync_playwright().start()
    request.addfinalizer(pw.stop)
    ctx, profile = launch_chromium(pw)
    request.addfinalizer(lambda: shutil.rmtree(profile, ignore_errors=True))
    request.addfinalizer(ctx.close)
    page = ctx.new_page()
    page.set_default_timeout(30_000)
    page.goto(server.url, wait_until="domcontentloaded")
    a = AppPage(page, server)
    a.wait_ready(APP_READY_S)
    return a


def test_step_adds_one_token_per_click(app):
    start = app.tokens()
    assert start["count"] > 0, start
    counts = [start["count"]]
    for _ in range(3):
        counts.append(app.click_and_wait("Step", timeout=CLICK_S))
    end = app.tokens()
    assert counts == [start["count"] + i for i in range(4)], (
        f"token counts after 0..3 clicks of Step: {counts} (source: {end['source']})\n"
        f"before: {start['text']!r}\nafter:  {end['text']!r}"
    )
    assert end["generated"] == start["generated"] + 3, (start, end)
    assert end["text"].startswith(start["text"]), (start["text"], end["text"])


def test_mission_panels_show_charts_with_data(app):
    def per_panel():
        charts = app.charts()
        found = {p: [c for c in charts if c["heading"] and p.lower() in c["heading"].lower()] for p in PANELS}
        return charts, found

    def all_drawn():
        _, found = per_panel()
        return all(any(chart_has_data(c) for c in cs) for cs in found.values())

    try:
        app.wait_until(all_drawn, CHARTS_S, "a drawn chart with data under each mission panel")
    except TimeoutError:
        pass  # report below, panel by panel
    charts, found = per_panel()
    headings = app.page.locator("h2").all_inner_texts()
    missing = [p for p, cs in found.items() if not any(chart_has_data(c) for c in cs)]
    assert not missing, (
        f"panels without a drawn chart with data: {missing}\nh2 headings on the page: {headings}\n"
        + "\n".join(f"  chart under {c['heading']!r}: {c}" for c in charts)
    )


def test_step_x8_and_reset(app):
    """Step ×8 adds up to eight tokens (fewer only if the model ends the text) without an error; Reset
    goes back to the bare prompt."""
    before = app.token_count()
    after = app.click_and_wait("Step ×8", timeout=CLICK_S)
    assert before < after <= before + 8
    assert "internal error" not in app.page.evaluate("() => document.body.innerText").lower()
    app.button("Reset").click()
    app.wait_until(lambda: app.tokens()["generated"] == 0, CLICK_S, "the generated tokens to clear after Reset")
    app.wait_idle(CLICK_S)
    app.click_and_wait("Step", timeout=CLICK_S)
    assert app.tokens()["generated"] == 1


def test_screenshot(app):
    app.click_and_wait("Step ×8", timeout=CLICK_S)  # a few more steps, so the README picture has curves
    app.wait_idle(CLICK_S)
    app.full_page_screenshot(SCREENSHOT)
    assert SCREENSHOT.stat().st_size > 10_000
