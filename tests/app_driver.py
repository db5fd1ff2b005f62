"""Drives the marimo app (notebooks/workbench.py) in headless Debian chromium via Playwright.

Used by tests/test_app_browser.py. Facts about the DOM of `marimo run` (marimo 0.25) this relies on:

- The app is rendered into the page itself (no iframes). UI elements are custom elements with open shadow
  roots: `<marimo-ui-element><marimo-button>#shadow-root<button>Step</button>`, charts made with
  `mo.ui.altair_chart` are `<marimo-vega>#shadow-root<div class="vega-embed">…`, plain altair charts are
  `<marimo-mime-renderer>#shadow-root<div class="vega-embed">…`. Playwright's locators pierce open
  shadow roots; `document.querySelectorAll` does not, so the page-side scripts below walk them by hand.
- vega-embed draws with the canvas renderer (`canvas.marks`); `.vega-embed` also holds an `svg` (the "…"
  actions icon), so "has an svg" says nothing about the chart.
- While the kernel runs cells, marimo shows `[data-testid="loading-indicator"]`; it appears a few hundred
  ms after a click and disappears when every cell has finished. Buttons are visible before the initial
  run ends, so "ready" = Step visible + tokens on the page + kernel idle for a moment.
- A cell that raises shows only "An internal error occurred" in run mode; the traceback goes to the
  server's stderr (kept in a log file here and attached to failures).
- The page itself does not scroll (an inner `absolute inset-0` div does), so a full-page screenshot needs
  the viewport grown to the content's height first.

Facts about `marimo run` itself:

- With `--token` every HTTP request needs the token (`?access_token=…`, then a session cookie keyed by the
  port, SameSite=Lax): without it GET / answers 303 to /auth/login and the websocket /ws is refused (403).
  `--token` alone makes, in run mode, the token `hash("auth:" + source)` (64 bits, fixed by PYTHONHASHSEED):
  the Makefile and this driver pass a `secrets` token on stdin (`--token-password-file -`) instead. The URL
  marimo prints carries it (`➜  URL: http://localhost:PORT?access_token=…`), browser or `--headless`.
- marimo checks neither the Host header nor the Origin of a websocket upgrade; `--allow-origins` is CORS
  for HTTP only. The token is what keeps a foreign page out.
- Every tab's kernel is a thread of the server process (run mode), so a module imported in the server before
  the notebook runs is the one the notebook's cells see: MarimoServer(hooks=True) starts marimo in a Python
  that first installs install_test_hooks() (a sampling failure on demand, a log of Model.load calls).
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
LOADING = '[data-testid="loading-indicator"]'


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Env vars read by install_test_hooks() in the server process (paths of files in the server's scratch dir).
FAULT_ENV = "WORKBENCH_TEST_FAULT"  # while this file exists, sampling raises (once: the file is removed)
LOADS_ENV = "WORKBENCH_TEST_LOADS"  # every Model.load appends "pid source" to this file
FAULT_MESSAGE = "injected sampling failure (tests/app_driver.py)"


def install_test_hooks() -> None:
    """Test-only instrumentation, installed in the marimo server process before it starts: Sampling.choose
    raises RuntimeError(FAULT_MESSAGE) when the FAULT_ENV file exists (inside Session.step, after the forward
    passes have written the KV cache: what the step's all-or-nothing rule must undo), and Model.load logs."""
    from workbench.model import Model
    from workbench.session import Sampling

    fault, loads = os.environ.get(FAULT_ENV), os.environ.get(LOADS_ENV)
    choose, load = Sampling.choose, Model.load.__func__

    def failing_choose(self, *args, **kwargs):
        if fault and os.path.exists(fault):
            os.remove(fault)
            raise RuntimeError(FAULT_MESSAGE)
        return choose(self, *args, **kwargs)

    def logged_load(cls, source, *args, **kwargs):
        model = load(cls, source, *args, **kwargs)
        if loads:
            with open(loads, "a") as fh:
                fh.write(f"{os.getpid()} {source}\n")
        return model

    Sampling.choose = failing_choose
    Model.load = classmethod(logged_load)


# `python -c` for a hooked server: the hooks, then marimo's CLI as `python -m marimo` runs it.
_HOOKED = ("import runpy, sys; sys.path.insert(0, {tests!r}); import app_driver; app_driver.install_test_hooks(); "
           "sys.argv = ['marimo', *sys.argv[1:]]; runpy.run_module('marimo', run_name='__main__', alter_sys=True)")


@dataclass
class MarimoServer:
    """`marimo run NOTEBOOK --headless` behind a random access token (as `make run`), in its own process
    group, output to a log file. hooks=True: install_test_hooks() first (see fail_next_sampling, loads)."""

    notebook: Path
    port: int = field(default_factory=free_port)
    hooks: bool = False
    token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    proc: subprocess.Popen | None = None
    log_path: Path | None = None
    scratch: Path | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    @property
    def url(self) -> str:
        """The app's address with the token: what a browser opens."""
        return f"{self.base_url}?access_token={self.token}"

    def start(self, cwd: Path) -> None:
        env = dict(os.environ)
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", MARIMO_SKIP_UPDATE_CHECK="1")
        fd, log = tempfile.mkstemp(prefix="marimo-run-", suffix=".log")
        self.log_path = Path(log)
        self.scratch = Path(tempfile.mkdtemp(prefix="marimo-hooks-"))
        env[FAULT_ENV], env[LOADS_ENV] = str(self.scratch / "fail-next-sampling"), str(self.scratch / "loads.log")
        args = ["run", str(self.notebook), "--headless", "--host", "127.0.0.1", "--port", str(self.port),
                "--token", "--token-password-file", "-", "--no-sandbox"]
        head = [sys.executable, "-c", _HOOKED.format(tests=str(Path(__file__).resolve().parent))] if self.hooks \
            else [sys.executable, "-m", "marimo"]
        self.proc = subprocess.Popen(head + args, cwd=cwd, env=env, stdin=subprocess.PIPE, stdout=fd,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        os.close(fd)
        self.proc.stdin.write(f"{self.token}\n".encode())  # marimo reads stdin to its end: close it
        self.proc.stdin.close()

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"marimo exited with {self.proc.returncode}\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url, timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.25)
        raise TimeoutError(f"marimo did not answer on {self.base_url} within {timeout:.0f} s\n{self.log_tail()}")

    def printed_url(self) -> str | None:
        """The URL marimo printed at start (`➜  URL: …`), or None."""
        text = self.log_path.read_text(errors="replace") if self.log_path and self.log_path.exists() else ""
        found = re.search(r"URL:\s*(\S+)", text)
        return found.group(1) if found else None

    def fail_next_sampling(self) -> None:
        """hooks=True: the next sampling in any tab raises RuntimeError(FAULT_MESSAGE), once."""
        assert self.hooks, "start the server with hooks=True"
        (self.scratch / "fail-next-sampling").touch()

    def loads(self) -> list[str]:
        """hooks=True: one line ("pid source") per Model.load the server has run."""
        path = self.scratch / "loads.log"
        return path.read_text().splitlines() if path.exists() else []

    def stop(self) -> None:
        self._kill()
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)

    def _kill(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        pgid = self.proc.pid  # start_new_session: the group id is the server's pid
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def log_tail(self, n: int = 4000) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no server log)"
        text = self.log_path.read_text(errors="replace")
        return "--- marimo server log (tail) ---\n" + text[-n:]


def launch_chromium(playwright, viewport=(1400, 1000)):
    """A persistent context on a fresh profile dir (returned so the caller can delete it)."""
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    ctx = playwright.chromium.launch_persistent_context(
        profile, executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True,
        viewport={"width": viewport[0], "height": viewport[1]},
    )
    return ctx, profile


# Page-side helpers. walk() visits the DOM in document order, descending into open shadow roots
# (shadow content first, then light children), and hands each element to a visitor.
_JS_WALK = """
const walk = (root, visit) => {
  const kids = root.children || [];
  for (const el of kids) {
    visit(el);
    if (el.shadowRoot) walk(el.shadowRoot, visit);
    walk(el, visit);
  }
};
const norm = s => (s || '').replace(/\\s+/g, ' ').trim();
"""

_JS_TOKENS = """
() => {
""" + _JS_WALK + """
  // Contract: span.tok inside #token-view, else the span.tok under the "Generated text" h2.
  const isTok = el => el.tagName === 'SPAN' && el.classList.contains('tok');
  const inside = root => { const t = []; walk(root, el => { if (isTok(el)) t.push(el); }); return t; };
  const byId = []; const underHeading = []; const all = []; let heading = null; let sawHeading = false;
  walk(document, el => {
    if (el.id === 'token-view') byId.push(el);
    if (el.tagName === 'H2') {
      heading = norm(el.textContent);
      if (/generated text/i.test(heading)) sawHeading = true;
    }
    if (isTok(el)) {
      all.push(el);
      if (heading && /generated text/i.test(heading)) underHeading.push(el);
    }
  });
  let toks, source;
  if (byId.length) {
    toks = byId.map(inside).reduce((a, b) => (b.length > a.length ? b : a)); source = '#token-view';
  } else if (sawHeading) {
    toks = underHeading; source = 'h2 Generated text';
  } else {
    toks = all; source = 'whole page (no #token-view, no "Generated text" h2)';
  }
  return {
    count: toks.length,
    generated: toks.filter(t => t.classList.contains('gen')).length,
    text: toks.map(t => t.textContent).join(''),
    source,
  };
}
"""

_JS_CHARTS = """
() => {
""" + _JS_WALK + """
  // Every vega chart on the page, with the nearest h2 before it in document order (its panel).
  const out = []; let heading = null;
  walk(document, el => {
    if (el.tagName === 'H2') heading = norm(el.textContent);
    if (!(el.classList && el.classList.contains('vega-embed'))) return;
    const r = el.getBoundingClientRect();  // where it sits in the viewport (the page scrolled to its top)
    const info = {heading, kind: null, width: 0, height: 0, coloredPixels: 0, inkPixels: 0, markItems: 0,
                  top: r.top, bottom: r.bottom, left: r.left, right: r.right};
    const canvas = el.querySelector('canvas.marks') || el.querySelector('canvas');
    const svg = el.querySelector('svg.marks');
    if (canvas) {
      info.kind = 'canvas'; info.width = canvas.width; info.height = canvas.height;
      try {
        const ctx = canvas.getContext('2d');
        const d = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
        for (let i = 0; i < d.length; i += 4) {
          const [r, g, b, a] = [d[i], d[i + 1], d[i + 2], d[i + 3]];
          if (a < 32) continue;
          if (r < 245 || g < 245 || b < 245) info.inkPixels++;
          if (Math.max(r, g, b) - Math.min(r, g, b) > 40) info.coloredPixels++;  // axes/grid/text are grey
        }
      } catch (e) { info.error = String(e); }
    } else if (svg) {
      info.kind = 'svg';
      const box = svg.getBoundingClientRect(); info.width = box.width; info.height = box.height;
      info.markItems = Array.from(svg.querySelectorAll('g.role-mark'))
        .filter(g => !g.closest('.role-axis, .role-legend, .role-title'))
        .reduce((n, g) => n + g.children.length, 0);
    }
    out.push(info);
  });
  return out;
}
"""

_JS_CONTENT_HEIGHT = """
() => {
  let h = document.documentElement.scrollHeight;
  for (const el of document.querySelectorAll('*')) {
    if (el.scrollHeight > el.clientHeight + 1) {
      const oy = getComputedStyle(el).overflowY;
      if (oy === 'auto' || oy === 'scroll') h = Math.max(h, el.scrollHeight + el.getBoundingClientRect().top);
    }
  }
  return Math.ceil(h);
}
"""


def chart_has_data(c: dict) -> bool:
    """A drawn chart with data marks: canvas with saturated (non-grey) pixels, or svg with mark items."""
    if c["width"] <= 0 or c["height"] <= 0:
        return False
    if c["kind"] == "canvas":
        return c["coloredPixels"] >= 20
    if c["kind"] == "svg":
        return c["markItems"] > 0
    return False


class AppPage:
    def __init__(self, page, server: MarimoServer | None = None):
        self.page = page
        self.server = server
        self.console_errors: list[str] = []  # what the page logged as errors from now on (vega's included)
        page.on("console", lambda m: self.console_errors.append(m.text[:300]) if m.type == "error" else None)

    # ---- state -------------------------------------------------------------------------------------
    def tokens(self) -> dict:
        return self.page.evaluate(_JS_TOKENS)

    def token_count(self) -> int:
        return self.tokens()["count"]

    def charts(self) -> list[dict]:
        return self.page.evaluate(_JS_CHARTS)

    def busy(self) -> bool:
        return self.page.locator(LOADING).count() > 0

    def button(self, label: str):
        return self.page.get_by_role("button", name=label, exact=True)

    def shows(self, text: str) -> bool:
        """`text` is on the page, shadow roots included (a callout, a card row)."""
        return self.page.get_by_text(text).count() > 0

    def diagnostics(self) -> str:
        try:
            body = self.page.evaluate("() => document.body.innerText")[:1500]
        except Exception as exc:  # the page may be gone
            body = f"(no page text: {exc})"
        log = self.server.log_tail() if self.server else ""
        return f"--- page text (head) ---\n{body}\n{log}"

    # ---- waiting -----------------------------------------------------------------------------------
    def wait_until(self, pred, timeout: float, what: str, poll: float = 0.2):
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            last = pred()
            if last:
                return last
            self.page.wait_for_timeout(poll * 1000)
        raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}\n{self.diagnostics()}")

    def wait_idle(self, timeout: float, quiet: float = 1.0, poll: float = 0.1) -> None:
        """The kernel has had nothing running for `quiet` seconds (the indicator shows up with a delay)."""
        state = {"since": None}

        def idle():
            now = time.monotonic()
            if self.busy():
                state["since"] = None
                return False
            state["since"] = state["since"] or now
            return now - state["since"] >= quiet

        self.wait_until(idle, timeout, "the kernel to go idle", poll=poll)

    def wait_ready(self, timeout: float) -> None:
        """Initial run done: Step visible, tokens rendered, kernel idle."""
        t0 = time.monotonic()
        left = lambda: max(1.0, timeout - (time.monotonic() - t0))  # noqa: E731
        try:
            self.button("Step").wait_for(state="visible", timeout=left() * 1000)
        except Exception as exc:
            raise TimeoutError(f"no visible 'Step' button within {timeout:.0f} s: {exc}\n{self.diagnostics()}")
        self.wait_until(lambda: self.token_count() > 0, left(), "tokens (span.tok) in the generated text")
        self.wait_idle(left())

    def click_and_wait(self, label: str, expect_more_tokens: bool = True, timeout: float = 60) -> int:
        """Click a button; wait until the token count grows (if expected) and the kernel is idle again."""
        before = self.token_count()
        self.button(label).click()
        if expect_more_tokens:
            self.wait_until(lambda: self.token_count() > before, timeout,
                            f"the token count to grow past {before} after clicking {label!r}")
        self.wait_idle(timeout)
        return self.token_count()

    # ---- output ------------------------------------------------------------------------------------
    def full_page_screenshot(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        vp = self.page.viewport_size
        height = min(max(vp["height"], self.page.evaluate(_JS_CONTENT_HEIGHT)), 12000)
        self.page.set_viewport_size({"width": vp["width"], "height": height})
        self.page.wait_for_timeout(1000)  # let charts re-layout
        self.page.screenshot(path=str(path), full_page=True)
        self.page.set_viewport_size(vp)
