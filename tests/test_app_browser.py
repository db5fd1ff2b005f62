"""The marimo app (notebooks/workbench.py).

Headless, wherever the tests run: the notebook's named cells run one at a time (marimo's `cell.run`) on a
real session, and a step, a new session, a load or an upload that raises anything at all shows one sentence
in a danger callout while the session stays as it was and the next step works; the model card names the
form of the weights and the thread count; the process-wide model shelf (workbench/app_state.py) loads a
model once for every tab; the server, started as `make run` starts it, refuses whoever lacks its token.

In a real browser (needs Debian's chromium at /usr/bin/chromium and the playwright package,
`.ci/install-browser` installs both; skipped otherwise): it loads the default model, Step adds one token per
click, the four mission panels draw charts with data, a second tab shares the one loaded model but has its
own session, a step that fails inside sampling leaves a callout and the token count and the next Step works,
and docs/screenshot.png is refreshed. `WORKBENCH_APP_NOTEBOOK=path` points it at another notebook,
`WORKBENCH_APP_SCREENSHOT=path` writes the screenshot elsewhere.
"""

from __future__ import annotations

import asyncio
import gc
import html
import http.cookiejar
import importlib.util
import io
import os
import re
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from app_driver import CHROMIUM, FAULT_MESSAGE, AppPage, MarimoServer, chart_has_data, launch_chromium
from workbench import app_state, models
from workbench.errors import InputError
from workbench.model import Model
from workbench.session import Sampling, Session

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = Path(os.environ.get("WORKBENCH_APP_NOTEBOOK", ROOT / "notebooks" / "workbench.py"))
SCREENSHOT = Path(os.environ.get("WORKBENCH_APP_SCREENSHOT", ROOT / "docs" / "screenshot.png"))
PANELS = ("KV cache", "QK norm", "Expert routing", "Tokens/s")
VIEWPORT = (1600, 1000)  # the screen: the four mission panels must fit in it

SERVER_START_S = 120  # until marimo answers HTTP
APP_READY_S = 120  # until the initial run (model load, first cells) is done
CLICK_S = 60  # per click, until the new token is on the page and the kernel is idle
CHARTS_S = 30  # until every panel's chart has drawn

if not NOTEBOOK.exists():
    pytest.skip(f"{NOTEBOOK} does not exist yet", allow_module_level=True)


# ---- the notebook's cells, headless ----------------------------------------------------------------------

def ui(value=None):
    """Stands in for a UI element: the cells read only `.value`."""
    return SimpleNamespace(value=value)


def plain(markup) -> str:
    """The text of a cell's output: marimo nests HTML in JSON in escaped attributes (callouts, accordions)."""
    text = markup.text if hasattr(markup, "text") else str(markup or "")
    for _ in range(8):
        before = text
        text = re.sub(r"\\u([0-9a-fA-F]{4})", lambda m: chr(int(m.group(1), 16)), html.unescape(text))
        if text == before:
            break
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", text)).strip()


def callout_kinds(markup) -> list[str]:
    text = markup.text if hasattr(markup, "text") else str(markup or "")
    return re.findall(r"data-kind='&quot;(\w+)&quot;'", text)


@pytest.fixture(scope="module")
def nb():
    """The notebook as a module (its cells are not run): the named cells (helpers, load_model, model_card,
    new_session, advance, show_upload) run with `.run(**refs)`; refs left out are computed by running the
    cells that define them."""
    spec = importlib.util.spec_from_file_location("workbench_app_notebook", NOTEBOOK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def error_callout(nb):
    _, defs = nb.helpers.run()
    return defs["error_callout"]


@pytest.fixture(scope="module")
def tiny_model(tiny_paths):
    from conftest import load_model

    return load_model(tiny_paths["qwen3moe"])


def new_tiny_session(model) -> Session:
    return Session(model, model.tokenizer.encode("def add(a, b):"), path="both", probes=True, context=64)


def advance(nb, error_callout, session, n: int = 1):
    """The app's step cell as Step (n=1) or Step ×8 (n=8) runs it: (output, its text, the trace)."""
    import marimo as mo

    runner = app_state.Runner()
    output, defs = nb.advance.run(
        app_state=app_state, error_callout=error_callout, get_running=lambda: False, get_session=lambda: ("key", session),
        max_steps=ui(32), mo=mo, run_button=ui(False), runner=runner, set_running=lambda v: None,
        step8_button=ui(n == 8), step_button=ui(n == 1), stop_button=ui(False), thread_count=1, ticker=None,
        upload=ui(None))
    if n > 1:  # Step ×8 decodes in the runner's thread; the app redraws on the ticker, the test waits
        runner._thread.join()
        output, defs = nb.advance.run(
            app_state=app_state, error_callout=error_callout, get_running=lambda: True, get_session=lambda: ("key", session),
            max_steps=ui(32), mo=mo, run_button=ui(False), runner=runner, set_running=lambda v: None,
            step8_button=ui(False), step_button=ui(False), stop_button=ui(False), thread_count=1, ticker=None,
            upload=ui(None))
    return output, plain(output), defs["trace"]


def failing_sampling(monkeypatch, exc: BaseException, after: int = 0) -> None:
    """Sampling.choose raises `exc` once `after` calls have gone through: inside Session.step, after both
    paths' forward passes wrote the KV cache."""
    real, calls = Sampling.choose, {"n": 0}

    def choose(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > after:
            raise exc
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Sampling, "choose", choose)


def test_a_failing_step_is_a_callout_and_the_next_step_goes_on(nb, error_callout, tiny_model, monkeypatch):
    session = new_tiny_session(tiny_model)
    advance(nb, error_callout, session)
    before = (list(session.ids), session.trace().tokens.height)

    failing_sampling(monkeypatch, RuntimeError("the sampler broke"))
    output, text, trace = advance(nb, error_callout, session)
    assert callout_kinds(output) == ["danger"], output
    assert "RuntimeError: the sampler broke" in text, text
    assert (list(session.ids), trace.tokens.height) == before  # nothing of the failed step is left

    monkeypatch.undo()
    output, text, trace = advance(nb, error_callout, session)
    assert "danger" not in callout_kinds(output), text
    assert session.n_generated == 2 and trace.tokens["step"].n_unique() == 2
    clean = new_tiny_session(tiny_model)
    clean.step(), clean.step()
    assert session.ids == clean.ids  # the step after the failure is the step that would have come


def test_a_workbench_error_is_its_own_sentence(nb, error_callout, tiny_model, monkeypatch):
    session = new_tiny_session(tiny_model)
    failing_sampling(monkeypatch, InputError("the sampling settings leave no token to choose."))
    output, text, _ = advance(nb, error_callout, session)
    assert callout_kinds(output) == ["danger"]
    assert "The sampling settings leave no token to choose." in text and "InputError" not in text, text
    assert session.n_generated == 0


def test_step_x8_keeps_the_steps_before_the_failing_one(nb, error_callout, tiny_model, monkeypatch):
    session = new_tiny_session(tiny_model)
    failing_sampling(monkeypatch, MemoryError("no room for the logits"), after=3)
    output, text, trace = advance(nb, error_callout, session, n=8)
    assert "MemoryError: no room for the logits" in text and "keeps its 3 generated" in text, text
    assert session.n_generated == 3 and trace.tokens["step"].n_unique() == 3
    monkeypatch.undo()
    advance(nb, error_callout, session, n=8)
    assert session.n_generated == 11


def test_a_session_that_cannot_start_keeps_the_old_one(nb, error_callout, tiny_model):
    old = ("old key", new_tiny_session(tiny_model))
    applied = []

    def refuse(*args, **kwargs):
        raise ValueError("no session today")

    output, defs = nb.new_session.run(
        Sampling=Sampling, Session=refuse, app_state=app_state, breaks=ui("none"), error_callout=error_callout,
        get_session=lambda: old, model=tiny_model, path=ui("both"), prompt=ui("def f():"), reset_button=ui(True),
        runner=app_state.Runner(), seed=ui(0), set_session=applied.append, temperature=ui(0), top_k=ui(0), top_p=ui(1), use_reference=ui("off"))
    assert applied == [] and defs["session_error"] == "ValueError: no session today"
    assert callout_kinds(output) == ["danger"] and "The session so far is kept." in plain(output)


def test_a_failed_load_keeps_the_model(nb, tiny_model):
    import marimo as mo

    from workbench.loading import set_threads

    def broken(*args, **kwargs):
        raise OSError("the disk went away")

    kept = []
    shelf = SimpleNamespace(MODELS=app_state.ModelShelf(), model_key=app_state.model_key,
                            describe_error=app_state.describe_error, device_turn=app_state.device_turn)
    _, defs = nb.load_model.run(
        FILE="a GGUF file…", Model=SimpleNamespace(load=broken), app_state=shelf, device=ui("cpu"), dtype=ui("auto"),
        get_model=lambda: tiny_model, mo=mo, model_choice=ui("tiny-qwen3moe"), model_path=ui(None), set_model=kept.append, set_threads=set_threads, thread_count=1, weights=ui("auto"))
    assert defs["model"] is tiny_model and kept == []
    assert defs["load_error"] == "OSError: the disk went away"


@pytest.mark.parametrize("weights, says", [
    ("dequantized", "dequantized: float32 matrices, float32 activations (exact)"),
    ("quantized", "quantized: 4-bit planes with bfloat16 activations (fast, not exact: ~1e-2 of max |logit|)"),
])
def test_the_model_card_says_what_the_weights_are_and_the_threads(nb, tiny_paths, weights, says):
    from conftest import load_model

    model = load_model(tiny_paths["qwen3moe"], weights=weights)
    assert model.info.weights == weights
    output, defs = nb.model_card.run(model=model, load_error=None, thread_count=3)
    text = plain(defs["card_view"])
    assert f"weights {says} CPU threads 3 (this tab's loads and steps)" in text, text  # card rows, in order
    assert "CPU threads" in plain(output), plain(output)  # the control in the sidebar, beside device and dtype


def test_an_upload_that_is_not_a_trace_is_named(nb, error_callout):
    import marimo as mo

    from workbench.trace import Trace

    upload = SimpleNamespace(value=[object()], contents=lambda: b"just some text", name=lambda: "notes_v2.parquet")
    output, defs = nb.show_upload.run(Trace=Trace, app_state=app_state, error_callout=error_callout, html=html, io=io,
                                      mo=mo, trace=None, upload=upload)
    text = plain(output)
    assert callout_kinds(output) == ["danger"] and "notes_v2.parquet" in text, text
    assert "BytesIO" not in text and defs["shown"] is None


def test_an_empty_path_is_answered_not_ignored(nb, tiny_model):
    import marimo as mo

    from workbench.loading import set_threads

    _, defs = nb.load_model.run(
        FILE="a GGUF file…", Model=None, app_state=app_state, device=ui("cpu"), dtype=ui("auto"),
        get_model=lambda: tiny_model, mo=mo, model_choice=ui("a GGUF file…"), model_path=ui("   "),
        set_model=lambda m: None, set_threads=set_threads, thread_count=1, weights=ui("auto"))
    assert defs["model"] is tiny_model and "the path is empty" in defs["load_error"]


def test_run_goes_on_in_the_background_and_stop_ends_it(nb, error_callout, tiny_model):
    """Run hands its steps to the runner's thread: the cell returns at once, the trace grows while it goes,
    Stop (the same cell with stop_button set) ends it after the step in progress, and the session survives."""
    import marimo as mo

    session = Session(tiny_model, tiny_model.tokenizer.encode("def add(a, b):"), path="both", probes=True, context=500)
    runner = app_state.Runner()
    common = dict(app_state=app_state, error_callout=error_callout, get_session=lambda: ("key", session), mo=mo,
                  max_steps=ui(400), runner=runner, set_running=lambda v: None, step8_button=ui(False),
                  step_button=ui(False), thread_count=1, ticker=None, upload=ui(None))
    t0 = time.monotonic()
    nb.advance.run(get_running=lambda: False, run_button=ui(True), stop_button=ui(False), **common)
    assert time.monotonic() - t0 < 5 and runner.running
    deadline = time.monotonic() + 30
    while runner.done < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    output, defs = nb.advance.run(get_running=lambda: True, run_button=ui(False), stop_button=ui(False), **common)
    assert defs["trace"].tokens.height >= 3 and "Decoding: step" in plain(output)
    t0 = time.monotonic()
    nb.advance.run(get_running=lambda: True, run_button=ui(False), stop_button=ui(True), **common)
    assert not runner.running and time.monotonic() - t0 < 2 and runner.outcome == ("stopped", None)
    n = session.n_generated
    assert 3 <= n < 400
    session.step()  # the session survives and goes on
    assert session.n_generated == n + 1


def test_a_redraw_waits_for_one_step_at_most():
    """A run releases and re-takes the lock after every step; a redraw that asks for it gets it after the step
    in progress (threading.Lock alone let a run of fast steps starve the redraw until the run ended)."""
    import threading

    lock, steps, stop = app_state.StepLock(), [0], threading.Event()

    def run():
        while not stop.is_set():
            with lock.step():
                steps[0] += 1
                time.sleep(0.001)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    try:
        while steps[0] < 3:
            time.sleep(0.001)
        for _ in range(20):
            before = steps[0]
            with lock:
                assert steps[0] - before <= 1
                time.sleep(0.002)
    finally:
        stop.set()
        worker.join(5)


def test_describe_error():
    assert app_state.describe_error(InputError("the prompt is empty.")) == "the prompt is empty."
    assert app_state.describe_error(KeyError("x")) == "KeyError: 'x'"
    assert app_state.describe_error(RuntimeError("CUDA out of memory.\nmore")) == "RuntimeError: CUDA out of memory."
    assert app_state.describe_error(ValueError()) == "ValueError: (no message)"


# ---- the process-wide model shelf -------------------------------------------------------------------------

class Loaded:
    """Stands in for a Model (anything weak-referenceable)."""


def test_the_shelf_loads_once_for_tabs_asking_at_once():
    shelf, loads = app_state.ModelShelf(), []

    def slow():
        loads.append(1)
        time.sleep(0.3)
        return Loaded()

    got = []
    tabs = [threading.Thread(target=lambda: got.append(shelf.get(("m", "cpu", "auto", "auto"), slow))) for _ in range(3)]
    for t in tabs:
        t.start()
    for t in tabs:
        t.join()
    assert len(loads) == 1 and shelf.loads == 1 and len({id(m) for m in got}) == 1


def test_the_shelf_holds_one_and_never_a_second_copy():
    shelf = app_state.ModelShelf()
    a = shelf.get("a", Loaded)
    b = shelf.get("b", Loaded)
    assert shelf.held() == 1 and shelf.loads == 2
    assert shelf.get("a", Loaded) is a and shelf.loads == 2  # a tab still holds a: the same object, no reload
    del a, b
    gc.collect()
    assert shelf.alive() == 1  # the shelf's own one
    shelf.get("b", Loaded)
    assert shelf.loads == 3  # b was let go by the shelf and by every tab: loaded again


def test_a_failed_load_leaves_the_shelf_as_it_was():
    shelf = app_state.ModelShelf()
    a = shelf.get("a", Loaded)

    def broken():
        raise RuntimeError("no")

    with pytest.raises(RuntimeError):
        shelf.get("b", broken)
    assert shelf.held() == 1 and shelf.get("a", Loaded) is a and shelf.loads == 1


def test_tabs_take_turns_on_an_accelerator_only():
    import torch

    assert app_state.device_turn("cpu") is not app_state.device_turn("cuda")
    assert app_state.device_turn(torch.device("cuda", 0)) is app_state.device_turn("auto")
    held = threading.Event()

    def other_tab():
        with app_state.device_turn("cuda"):
            held.set()

    with app_state.device_turn(torch.device("cpu")), app_state.device_turn("cuda"):
        tab = threading.Thread(target=other_tab)
        tab.start()
        assert not held.wait(0.2)  # the other tab waits for its turn
    tab.join(5)
    assert held.is_set()


def test_a_model_key_follows_the_file(tmp_path):
    f = tmp_path / "m.gguf"
    f.write_bytes(b"x")
    key = app_state.model_key(str(f), "cpu", "auto", "auto")
    assert key == app_state.model_key(str(tmp_path / "." / "m.gguf"), "cpu", "auto", "auto")
    f.write_bytes(b"xy")
    assert app_state.model_key(str(f), "cpu", "auto", "auto") != key  # rewritten: another model
    assert app_state.model_key("tiny-qwen3moe", "cpu", "auto", "auto")[0] == "tiny-qwen3moe"


# ---- the server ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(request):
    srv = MarimoServer(NOTEBOOK, hooks=True)
    request.addfinalizer(srv.stop)  # registered first: runs even if start/wait fails
    srv.start(cwd=ROOT)
    srv.wait_ready(SERVER_START_S)
    return srv


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def _get(url: str) -> tuple[int, str, str]:
    """(status, Location, body) without following redirects."""
    opener = urllib.request.build_opener(_NoRedirect)
    try:
        with opener.open(url, timeout=10) as r:
            return r.status, r.headers.get("Location", ""), r.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Location", ""), exc.read().decode(errors="replace")


def _ws_status(url: str, origin: str | None = None) -> str:
    from websockets.asyncio.client import connect
    from websockets.exceptions import InvalidStatus

    async def probe():
        try:
            async with connect(url, origin=origin, open_timeout=10):
                return "open"
        except InvalidStatus as exc:
            return str(exc.response.status_code)

    return asyncio.run(probe())


def test_make_run_serves_on_loopback_behind_a_token():
    if shutil.which("make") is None:
        pytest.skip("no make")
    recipe = subprocess.run(["make", "-n", "run"], cwd=ROOT, capture_output=True, text=True, timeout=60).stdout
    line = next((ln for ln in recipe.splitlines() if "marimo run" in ln), "")
    assert "--host 127.0.0.1" in line and "--token" in line and "--no-token" not in line, recipe


def test_the_server_refuses_whoever_lacks_the_token(server):
    printed = server.printed_url()
    assert printed and f"access_token={server.token}" in printed, server.log_tail()

    for url in (server.base_url, server.base_url + "?access_token=wrong"):
        status, location, _ = _get(url)
        assert status in (401, 403) or (status in (302, 303, 307) and "/auth/login" in location), (url, status, location)
    status, location, _ = _get(server.url)  # the token buys a session cookie and a redirect to the bare URL
    assert status in (302, 303, 307) and "access_token" not in location, (status, location)
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    with opener.open(server.url, timeout=10) as r:
        body = r.read().decode(errors="replace")
        assert r.status == 200 and "/auth/login" not in r.url and "GGUF decode workbench" in body, (r.url, body[:300])

    ws = f"ws://127.0.0.1:{server.port}/ws?session_id=s-probe"
    assert _ws_status(ws) == "403"
    assert _ws_status(ws, origin="http://evil.example") == "403"


# ---- the app in a browser --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def app(server, request):
    sync_api = pytest.importorskip(
        "playwright.sync_api", exc_type=ImportError, reason="playwright is not installed (.ci/install-browser)")
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing (.ci/install-browser installs it)")
    pw = sync_api.sync_playwright().start()
    request.addfinalizer(pw.stop)
    ctx, profile = launch_chromium(pw, viewport=VIEWPORT)
    request.addfinalizer(lambda: shutil.rmtree(profile, ignore_errors=True))
    request.addfinalizer(ctx.close)
    page = ctx.new_page()
    page.set_default_timeout(30_000)
    a = AppPage(page, server)  # listening to the console before the page loads
    page.goto(server.url, wait_until="domcontentloaded")
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


def test_the_mission_panels_fit_the_first_screen(app):
    """At 1600×1000, scrolled to the top, each mission panel has a chart with data wholly inside the viewport."""
    app.page.evaluate("() => window.scrollTo(0, 0)")
    width, height = VIEWPORT
    charts = app.charts()
    inside = {p: [c for c in charts if c["heading"] and p.lower() in c["heading"].lower() and chart_has_data(c)
                  and c["top"] >= 0 and c["bottom"] <= height and c["right"] <= width] for p in PANELS}
    missing = [p for p, cs in inside.items() if not cs]
    assert not missing, (missing, [(c["heading"], round(c["top"]), round(c["bottom"]), round(c["right"])) for c in charts])


def test_run_streams_and_stop_ends_it(app):
    """Run with 256 steps: the token count grows while it goes (redrawn every second), Stop ends it within a
    couple of seconds, and the session goes on with Step."""
    slider = app.page.locator('[role="slider"][aria-valuemax="256"]:visible')
    slider.focus()
    slider.press("End")
    app.wait_idle(CLICK_S)
    start = app.token_count()
    app.button("Run").click()
    seen = [start]
    deadline = time.monotonic() + CLICK_S
    while len(set(seen)) < 3 and time.monotonic() < deadline:  # two redraws with more tokens, mid-run
        app.page.wait_for_timeout(250)
        seen.append(app.token_count())
    assert len(set(seen)) >= 3, f"the text did not stream: counts {seen}\n{app.diagnostics()}"
    app.button("Stop").click()
    t0 = time.monotonic()
    app.wait_until(lambda: not app.shows("Decoding: step"), 5, "the run to end after Stop")
    stopped_in = time.monotonic() - t0
    app.wait_idle(CLICK_S)
    after = app.token_count()
    app.page.wait_for_timeout(2500)
    assert app.token_count() == after < start + 256, (start, after, app.token_count())
    assert stopped_in < 3, stopped_in
    assert app.click_and_wait("Step", timeout=CLICK_S) == after + 1
    slider.focus()
    slider.press("Home")  # back to a short Run for the tests after this one
    app.button("Reset").click()
    app.wait_until(lambda: app.tokens()["generated"] == 0, CLICK_S, "Reset")
    app.wait_idle(CLICK_S)


def _open_tab(app, name: str) -> None:
    app.page.get_by_role("tab", name=name, exact=True).click()
    app.wait_idle(CLICK_S)


def _charts_under(app, heading_words: str) -> list[dict]:
    """The drawn charts with data whose titles mention heading_words (the tabs' charts have no h2 of their own)."""
    return [c for c in app.charts() if chart_has_data(c) and c["top"] >= 0 and c["bottom"] > 0 and c["width"] > 0
            and c.get("visible", True)]


def test_attention_and_lens_panels_draw(app):
    _open_tab(app, "Equivalence")
    app.click_and_wait("Step", timeout=CLICK_S)
    first_screen = sum(chart_has_data(c) for c in app.charts()) - 1  # less the Equivalence tab's one chart
    for tab, text, charts in (("Attention", "attention sink", 2), ("Logit lens", "final norm and the output head", 1)):
        _open_tab(app, tab)
        app.wait_until(lambda: app.shows(text), CLICK_S, f"the {tab} panel's text")
        app.wait_until(lambda: sum(chart_has_data(c) for c in app.charts()) >= first_screen + charts, CHARTS_S,  # noqa: B023
                       f"the {tab} panel's charts drawn with data")
    _open_tab(app, "Equivalence")


def test_a_click_on_a_head_picks_it(app):
    """The heads × keys chart of the Attention tab: a click on a head's row sets the head picker above it."""
    _open_tab(app, "Attention")
    app.wait_until(lambda: app.shows("click a head") or len(app.charts()) > 7, CHARTS_S, "the heads × keys chart")
    app.wait_idle(CLICK_S)
    heads = app.charts()[-1]  # the last chart on the page
    app.page.mouse.move(800, 500)
    app.page.mouse.wheel(0, heads["bottom"] - 900)  # the chart's bottom into the viewport
    app.wait_idle(CLICK_S)
    heads = app.charts()[-1]
    sliders = app.page.get_by_role("slider")
    before = [sliders.nth(i).get_attribute("aria-valuenow") for i in range(sliders.count())]
    # the last head's row: the plot's bottom row, above the x axis (its labels and title, ~35 px)
    app.page.mouse.click(heads["left"] + 0.4 * (heads["right"] - heads["left"]), heads["bottom"] - 45)

    def changed():
        now = [sliders.nth(i).get_attribute("aria-valuenow") for i in range(sliders.count())]
        return len(now) == len(before) and now != before

    app.wait_until(changed, CLICK_S, "the head picker to move to the clicked head")
    now = [sliders.nth(i).get_attribute("aria-valuenow") for i in range(sliders.count())]
    moved = [(a, b) for a, b in zip(before, now) if a != b]
    last = Model.load(models.resolve(models.DEFAULT_MODEL)).config.n_heads - 1
    assert moved == [("0", str(last))], moved
    _open_tab(app, "Equivalence")


def test_compare_panel_names_a_planted_break(app):
    _open_tab(app, "Compare")
    app.page.get_by_role("combobox", name="their numbers").select_option("our engine with a break")
    app.wait_idle(CLICK_S)
    app.button("Compare").click()
    app.wait_until(lambda: app.shows("Likeliest cause: rope-base-10k"), CLICK_S, "the comparison's sentence")
    assert app.shows("first diverges at step 0, blocks.0.attn.q_rope")
    app.page.get_by_role("combobox", name="their numbers").select_option("llama.cpp")
    app.wait_idle(CLICK_S)
    app.button("Compare").click()
    app.wait_until(lambda: app.shows("No divergence"), CLICK_S, "llama.cpp's clean comparison")
    _open_tab(app, "Equivalence")


def test_ab_runs_two_sessions_and_says_where_they_part(app):
    _open_tab(app, "A/B")
    app.wait_idle(CLICK_S)
    drawn = lambda: sum(chart_has_data(c) for c in app.charts())  # noqa: E731
    before = drawn()  # the first screen's (the A/B tab has none before its run)
    app.button("Run A and B").click()
    app.wait_until(lambda: app.shows("where B first parts from A, per frame"), CLICK_S, "the A/B table")
    app.wait_idle(CLICK_S)
    assert app.shows("B: break cache-off-by-one.")
    # a cache missing its own key shows from the first decode step (the table is in a shadow root: get_by_text)
    assert app.shows("step=1, path=cached"), app.diagnostics()
    assert not app.shows("step=0, path=cached: token_id")
    # A, B and B against A for QK norm, routing, latency and the KV cache, and the chosen tokens' probabilities
    assert app.page.get_by_text("B against A", exact=True).count() >= 4
    app.wait_until(lambda: drawn() - before >= 13, CHARTS_S, "the A/B panel's charts drawn with data")
    _open_tab(app, "Equivalence")


def test_a_second_tab_shares_the_model_but_not_the_session(app, server):
    loads = server.loads()
    assert len(loads) == 1, loads  # the first tab's load
    page = app.page.context.new_page()
    try:
        page.set_default_timeout(30_000)
        page.goto(server.url, wait_until="domcontentloaded")
        tab = AppPage(page, server)
        tab.wait_ready(APP_READY_S)
        assert server.loads() == loads, "the second tab loaded the model again"
        first = app.tokens()
        second = tab.tokens()
        assert second["generated"] == 0, second  # a session of its own, at the bare prompt
        assert tab.click_and_wait("Step", timeout=CLICK_S) == second["count"] + 1
        assert app.tokens() == first  # the first tab's session did not move
    finally:
        page.close()


def test_a_failing_step_leaves_a_callout_and_the_session(app, server):
    before = app.tokens()
    server.fail_next_sampling()
    app.button("Step").click()
    app.wait_until(lambda: app.shows(FAULT_MESSAGE), CLICK_S, "the failed step's callout")
    app.wait_idle(CLICK_S)
    assert app.shows(f"RuntimeError: {FAULT_MESSAGE}")
    assert app.tokens() == before  # the failed step left nothing
    assert "internal error" not in app.page.evaluate("() => document.body.innerText").lower()
    assert app.click_and_wait("Step", timeout=CLICK_S) == before["count"] + 1  # and the next one works
    assert not app.shows(FAULT_MESSAGE)


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


def test_a_shared_expert_shows_its_gate_under_routing(app):
    """After the tests that count loads: tiny-qwen2moe picked in the sidebar, one Step, and the routing panel
    draws a third chart beside the router's two, the shared expert's gate, with its sentence."""
    app.page.get_by_role("combobox", name="model").select_option("tiny-qwen2moe (random weights)")
    app.wait_until(lambda: app.shows("tiny-qwen2moe-"), APP_READY_S, "tiny-qwen2moe's file on the model card")
    app.wait_idle(CLICK_S)
    app.click_and_wait("Step", timeout=CLICK_S)
    app.wait_until(lambda: app.shows("scaled by this gate"), CLICK_S, "the shared expert's sentence")

    def drawn() -> int:
        return sum(chart_has_data(c) for c in app.charts() if c["heading"] and "expert routing" in c["heading"].lower())

    app.wait_until(lambda: drawn() >= 3, CHARTS_S, "the gate's chart drawn with data under Expert routing")


def test_an_mla_cache_is_set_beside_mha_in_the_kv_panel(app):
    """tiny-deepseek2 picked in the sidebar: the KV panel's sentence sets the latent cache's bytes per position and
    layer beside an MHA cache's, and after two Steps (an area over one step has no width) both its charts, the
    bytes with MHA's line and the positions, draw with data."""
    app.page.get_by_role("combobox", name="model").select_option("tiny-deepseek2 (random weights)")
    app.wait_until(lambda: app.shows("MLA caches one latent of 128") and app.shows("× more)"), APP_READY_S,
                   "the KV panel's MLA sentence, MHA's bytes beside the latent cache's")
    app.wait_idle(CLICK_S)
    app.click_and_wait("Step", timeout=CLICK_S)
    app.click_and_wait("Step", timeout=CLICK_S)

    def drawn() -> int:
        return sum(chart_has_data(c) for c in app.charts() if c["heading"] and "kv cache" in c["heading"].lower())

    app.wait_until(lambda: drawn() >= 2, CHARTS_S, "the KV panel's charts drawn with data")


def test_attention_sinks_show_each_heads_share(app):
    """tiny-gpt-oss picked in the sidebar, one Step: the Attention tab adds the sinks' layer × head chart and its
    sentence to its two charts."""
    app.page.get_by_role("combobox", name="model").select_option("tiny-gpt-oss (random weights)")
    app.wait_until(lambda: app.shows("tiny-gpt-oss-"), APP_READY_S, "tiny-gpt-oss's file on the model card")
    app.wait_idle(CLICK_S)
    _open_tab(app, "Equivalence")
    app.click_and_wait("Step", timeout=CLICK_S)
    first_screen = sum(chart_has_data(c) for c in app.charts()) - 1  # less the Equivalence tab's one chart
    _open_tab(app, "Attention")
    app.wait_until(lambda: app.shows("attention paid to nothing"), CLICK_S, "the sinks' sentence")
    app.wait_until(lambda: sum(chart_has_data(c) for c in app.charts()) >= first_screen + 3, CHARTS_S,
                   "the sinks' chart drawn with data beside the Attention tab's two")
    _open_tab(app, "Equivalence")


def test_the_server_log_has_no_traceback(app, server):
    """Last of the browser tests: nothing the tests did above left a traceback in the server's log."""
    log = server.log_path.read_text(errors="replace")
    assert "Traceback" not in log, server.log_tail()


def test_the_browser_console_has_no_error(app):
    """Last with the server log: no error in the page's console over the browser tests above (vega's
    "Unrecognized signal name" for a chart whose selection marimo could not find, ~2,400 of them once)."""
    assert app.console_errors == [], app.console_errors[:5]
