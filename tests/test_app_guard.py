"""workbench/app_guard.py: the ASGI middleware marimo loads from our `marimo.server.asgi.middleware` entry
point. It refuses a foreign Origin (another site, another local port: a page on http://localhost:8000 is
same-site for the SameSite=Lax token cookie) and a Host that is not a loopback name (DNS rebinding), on
HTTP and on the websocket, when marimo's own server is bound to loopback.

Two halves: the middleware on its own with a dummy ASGI app (scope dicts, fast), and the real server started
as `make run` starts it (`marimo run … --host 127.0.0.1 --token --token-password-file - --no-sandbox`,
tests/app_driver.py's MarimoServer) probed with http.client and a raw websocket Upgrade over a socket.
The server runs a one-cell notebook: the guard is the server's, not the notebook's, and a websocket that
opens starts a kernel that would otherwise load a model.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import os
import socket
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from workbench import app_guard  # noqa: E402
from workbench.app_guard import LoopbackGuard  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- the middleware alone, with scope dicts


def marimo_app(bound: str | None = "127.0.0.1", external: str | None = None):
    """What the middleware sees as scope["app"]: marimo's Starlette app, whose state holds the uvicorn
    server marimo started (config.host: the bound address) and the external host (--proxy's, else --host).
    bound=None: no server in the state (create_asgi_app, mounted in someone else's server)."""
    state = SimpleNamespace()
    if bound is not None:
        state.server = SimpleNamespace(config=SimpleNamespace(host=bound))
        state.host = external if external is not None else bound
    return SimpleNamespace(state=state)


def scope(kind="http", host="localhost:2718", origin=None, *, app=None, scheme=None, extra=(), ws_ext=True):
    headers = [] if host is None else [(b"host", host.encode("latin-1"))]
    if origin is not None:
        headers.append((b"origin", origin.encode("latin-1")))
    headers += [(k.encode(), v.encode()) for k, v in extra]
    s = {"type": kind, "headers": headers, "path": "/ws" if kind == "websocket" else "/",
         "scheme": scheme or ("ws" if kind == "websocket" else "http"),
         "app": marimo_app() if app is None else app}
    if kind == "websocket" and ws_ext:
        s["extensions"] = {"websocket.http.response": {}}
    return s


def call(s):
    """Runs LoopbackGuard(dummy) on one scope: (whether the dummy app ran, the messages sent)."""
    ran, sent = [], []

    async def dummy(scope, receive, send):
        ran.append(scope["type"])

    async def receive():
        return {"type": "websocket.connect"} if s["type"] == "websocket" else {"type": "http.request", "body": b""}

    async def send(message):
        sent.append(message)

    asyncio.run(LoopbackGuard(dummy)(s, receive, send))
    return bool(ran), sent


def refused_http(sent) -> bool:
    return bool(sent) and sent[0]["type"] == "http.response.start" and sent[0]["status"] == 403


def refused_ws(sent) -> bool:
    if not sent:
        return False
    first = sent[0]
    return first["type"] == "websocket.close" or (
        first["type"] == "websocket.http.response.start" and first["status"] == 403)


@pytest.mark.parametrize("host, origin", [
    ("localhost:2718", None),
    ("localhost:2718", "http://localhost:2718"),
    ("127.0.0.1:2718", "http://127.0.0.1:2718"),
    ("[::1]:2718", "http://[::1]:2718"),
    ("LocalHost:2718", "http://localhost:2718"),  # host names are case-insensitive
    ("localhost", "http://localhost"),
    ("localhost", "http://localhost:80"),  # the default port, spelled out
    ("127.0.0.1:9000", "http://127.0.0.1:9000"),  # a tunnel (ssh -L 9000:…): the origin is the Host's
])
@pytest.mark.parametrize("kind", ["http", "websocket"])
def test_own_origin_and_no_origin_pass(kind, host, origin):
    ran, sent = call(scope(kind, host, origin))
    assert ran and sent == []


@pytest.mark.parametrize("host, origin", [
    ("localhost:2718", "http://localhost:8000"),  # another local port: same site, other origin
    ("localhost:2718", "http://127.0.0.1:2718"),  # same server, other origin
    ("localhost:2718", "https://localhost:2718"),  # other scheme
    ("localhost:2718", "http://evil.example"),
    ("localhost:2718", "null"),  # sandboxed iframe, file://, data: URL
    ("localhost:2718", "http://localhost:2718/"),  # not an origin's serialization
    ("localhost:2718", "http://user@localhost:2718"),
    ("localhost:2718", "garbage"),
    ("evil.example:2718", None),  # DNS rebinding: the page's own origin, a foreign name
    ("evil.example:2718", "http://evil.example:2718"),
    ("localhost.evil.example:2718", None),
    ("127.0.0.1.nip.io:2718", None),
    ("10.0.0.5:2718", None),  # not loopback
    ("[::ffff:127.0.0.1]:2718", None),  # a mapped address is not a name this server is reached by
    ("evil@localhost:2718", None),
    ("localhost:27a8", None),
    ("localhost:2718:1", None),
    ("", None),
    (None, None),  # no Host at all
])
@pytest.mark.parametrize("kind", ["http", "websocket"])
def test_foreign_origin_or_host_is_refused(kind, host, origin):
    ran, sent = call(scope(kind, host, origin))
    assert not ran
    assert (refused_http if kind == "http" else refused_ws)(sent), sent


def test_refusal_bodies():
    _, sent = call(scope("http", "localhost:2718", "http://localhost:8000"))
    assert sent[0]["status"] == 403
    assert b"origin" in sent[1]["body"].lower() and b"app_guard" in sent[1]["body"]
    _, sent = call(scope("http", "evil.example:2718"))
    assert b"host" in sent[1]["body"].lower()


def test_websocket_refusal_is_before_accept():
    # With uvicorn's websocket.http.response extension: a 403 with a body; without it: close before accept
    # (which uvicorn answers with a bare 403). Never websocket.accept.
    _, sent = call(scope("websocket", "localhost:2718", "http://localhost:8000"))
    assert [m["type"] for m in sent] == ["websocket.http.response.start", "websocket.http.response.body"]
    assert sent[0]["status"] == 403
    _, sent = call(scope("websocket", "localhost:2718", "http://localhost:8000", ws_ext=False))
    assert [m["type"] for m in sent] == ["websocket.close"]


def test_wss_and_https_are_their_own_scheme():
    assert call(scope("websocket", "localhost:2718", "https://localhost:2718", scheme="wss"))[0]
    assert call(scope("http", "localhost:443", "https://localhost", scheme="https"))[0]
    assert not call(scope("websocket", "localhost:2718", "http://localhost:2718", scheme="wss"))[0]


def test_every_origin_header_must_be_ours():
    s = scope("http", "localhost:2718", "http://localhost:2718", extra=[("origin", "http://localhost:8000")])
    ran, sent = call(s)
    assert not ran and refused_http(sent)


@pytest.mark.parametrize("app", [
    marimo_app(bound="0.0.0.0"),  # --host 0.0.0.0: reached by other names on purpose
    marimo_app(bound="192.168.1.7"),
    marimo_app(bound="::"),
    marimo_app(bound="127.0.0.1", external="notebooks.example.com"),  # --proxy notebooks.example.com
    marimo_app(bound=None),  # create_asgi_app in someone else's server: its binding is not ours to know
    SimpleNamespace(),  # no state at all
])
def test_not_enforced_unless_marimo_is_bound_to_loopback(app):
    for kind in ("http", "websocket"):
        ran, sent = call(scope(kind, "evil.example:2718", "http://localhost:8000", app=app))
        assert ran and sent == []


@pytest.mark.parametrize("bound", ["127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"])
def test_enforced_for_every_loopback_binding(bound):
    ran, sent = call(scope("http", "evil.example:2718", app=marimo_app(bound=bound)))
    assert not ran and refused_http(sent)


def test_lifespan_passes_through():
    ran = []

    async def dummy(scope, receive, send):
        ran.append(scope["type"])

    async def nothing(*a):
        return {"type": "lifespan.startup"}

    asyncio.run(LoopbackGuard(dummy)({"type": "lifespan", "app": marimo_app()}, nothing, nothing))
    assert ran == ["lifespan"]


def test_the_entry_point_is_registered_and_marimo_picks_it_up():
    from importlib.metadata import entry_points

    from marimo._server.registry import MIDDLEWARE_REGISTRY
    from starlette.middleware import Middleware

    eps = [ep for ep in entry_points(group="marimo.server.asgi.middleware") if ep.value.startswith("workbench.")]
    assert [ep.value for ep in eps] == ["workbench.app_guard:middleware"], "reinstall: pip install --no-deps -e ."
    loaded = eps[0].load()
    assert isinstance(loaded, Middleware) and loaded.cls is LoopbackGuard
    assert any(getattr(m, "cls", None) is LoopbackGuard for m in MIDDLEWARE_REGISTRY.get_all())
    assert loaded is app_guard.middleware


# ---------------------------------------------------------------- the real server, as `make run` starts it

NOTEBOOK = '''import marimo

app = marimo.App()


@app.cell
def _():
    import marimo as mo
    mo.md("app guard test notebook")
    return


if __name__ == "__main__":
    app.run()
'''


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from app_driver import MarimoServer

    nb = tmp_path_factory.mktemp("guard") / "guard_nb.py"
    nb.write_text(NOTEBOOK)
    srv = MarimoServer(nb)
    srv.start(cwd=REPO)
    try:
        srv.wait_ready(timeout=90)
        yield srv
    finally:
        srv.stop()
        if srv.log_path is not None:
            srv.log_path.unlink(missing_ok=True)


def http_get(srv, path="/", host=None, origin=None, cookie=None, method="GET"):
    """(status, headers, body) of one request to the server, Host and Origin as given; no redirects."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=20)
    headers = {"Host": host or f"localhost:{srv.port}"}
    if origin is not None:
        headers["Origin"] = origin
    if cookie is not None:
        headers["Cookie"] = cookie
    try:
        conn.request(method, path, headers=headers)
        r = conn.getresponse()
        return r.status, r.getheaders(), r.read()
    finally:
        conn.close()


def ws_handshake(srv, path, host=None, origin=None, cookie=None) -> tuple[int, bytes]:
    """A raw websocket Upgrade over a socket: (status code of the answer, the answer's bytes so far)."""
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [f"GET {path} HTTP/1.1", f"Host: {host or f'localhost:{srv.port}'}", "Upgrade: websocket",
             "Connection: Upgrade", f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13"]
    if origin is not None:
        lines.append(f"Origin: {origin}")
    if cookie is not None:
        lines.append(f"Cookie: {cookie}")
    with socket.create_connection(("127.0.0.1", srv.port), timeout=20) as s:
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        if not data.startswith(b"HTTP/1.1 101"):
            s.settimeout(2)
            try:
                while chunk := s.recv(4096):  # a refusal's body, if it has one
                    data += chunk
            except (socket.timeout, OSError):
                pass
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0
    return status, data


def ws_path(srv, token=True, n=[0]) -> str:
    n[0] += 1
    q = f"/ws?session_id=s-guard-{os.getpid()}-{n[0]}"
    return q + (f"&access_token={srv.token}" if token else "")


def session_cookie(srv, host=None, origin=None) -> str:
    """GET /?access_token=…: marimo answers 303 to / and sets the session cookie (SameSite=Lax)."""
    status, headers, _ = http_get(srv, f"/?access_token={srv.token}", host=host, origin=origin)
    assert status == 303 and dict(headers).get("location") == "/", (status, headers)
    cookies = [v.split(";", 1)[0] for k, v in headers if k.lower() == "set-cookie"]
    assert cookies, headers
    return "; ".join(cookies)


def open_app(srv, host=None, origin=None) -> tuple[int, bytes]:
    """What a browser does with the token URL: the 303, then / with the cookie. (status, body) of the page."""
    cookie = session_cookie(srv, host=host, origin=origin)
    status, _, body = http_get(srv, "/", host=host, origin=origin, cookie=cookie)
    return status, body


def test_a_own_origin_gets_the_app_and_the_websocket(server):
    own = f"http://localhost:{server.port}"
    status, body = open_app(server, origin=own)
    assert status == 200 and b"<html" in body.lower()
    status, body = open_app(server, host=f"127.0.0.1:{server.port}", origin=f"http://127.0.0.1:{server.port}")
    assert status == 200 and b"<html" in body.lower()
    status, data = ws_handshake(server, ws_path(server), origin=own)
    assert status == 101, data
    status, data = ws_handshake(server, ws_path(server, token=False), origin=own, cookie=session_cookie(server))
    assert status == 101, data


def test_b_another_local_port_is_refused_even_with_the_token(server):
    foreign = "http://localhost:8000"
    cookie = session_cookie(server)
    status, _, body = http_get(server, f"/?access_token={server.token}", origin=foreign)
    assert status == 403 and b"app_guard" in body
    status, _, body = http_get(server, "/", origin=foreign, cookie=cookie)
    assert status == 403 and b"app_guard" in body
    # POSTs a cross-site form or fetch can send (both skip marimo's Marimo-Server-Token check).
    for path in ("/api/kernel/execute", "/auth/login"):
        status, _, body = http_get(server, path, origin=foreign, cookie=cookie, method="POST")
        assert status == 403 and b"app_guard" in body, (path, status, body)
    for path, c in ((ws_path(server), None), (ws_path(server, token=False), cookie)):
        status, data = ws_handshake(server, path, origin=foreign, cookie=c)
        assert status == 403 and b"app_guard" in data, data
    status, data = ws_handshake(server, ws_path(server), origin="null")
    assert status == 403, data


def test_c_a_foreign_host_is_refused(server):
    evil = f"evil.example:{server.port}"
    status, _, body = http_get(server, f"/?access_token={server.token}", host=evil)
    assert status == 403 and b"app_guard" in body
    status, _, body = http_get(server, f"/?access_token={server.token}", host=evil, origin=f"http://{evil}")
    assert status == 403 and b"app_guard" in body
    status, data = ws_handshake(server, ws_path(server), host=evil, origin=f"http://{evil}")
    assert status == 403 and b"app_guard" in data, data


def test_d_no_origin_with_the_token_works(server):
    status, body = open_app(server)
    assert status == 200 and b"<html" in body.lower()
    status, data = ws_handshake(server, ws_path(server))
    assert status == 101, data
    # …and the token is still required: the guard adds a check, it replaces none.
    status, _, _ = http_get(server, "/")
    assert status in (302, 303, 401)
    status, data = ws_handshake(server, ws_path(server, token=False))
    assert status != 101, data


# ---------------------------------------------------------------- in a real browser (skipped without one)

ATTACK_PAGE = """<!doctype html><title>attacker</title><script>
const ws = new WebSocket("ws://localhost:%(port)d/ws?session_id=s-attack");
ws.onopen = () => { document.title = "open"; ws.close(); };
ws.onclose = (e) => { if (document.title !== "open") document.title = "refused"; };
</script>"""


@pytest.fixture
def attacker_page(tmp_path, server):
    """An HTTP server on another local port serving a page that opens the app's websocket."""
    import functools
    import http.server
    import threading

    from app_driver import free_port

    (tmp_path / "index.html").write_text(ATTACK_PAGE % {"port": server.port})
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://localhost:{httpd.server_address[1]}/index.html"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_in_a_browser_the_app_works_and_another_port_cannot_open_its_websocket(server, attacker_page):
    from app_driver import CHROMIUM, launch_chromium

    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no browser at {CHROMIUM} (.ci/install-browser)")
    sync_api = pytest.importorskip("playwright.sync_api")
    import shutil

    with sync_api.sync_playwright() as pw:
        ctx, profile = launch_chromium(pw)
        try:
            page = ctx.new_page()
            # The app at its own origin: page, assets, API and websocket all pass; the cell's output renders.
            page.goto(f"http://localhost:{server.port}/?access_token={server.token}")
            page.get_by_text("app guard test notebook").wait_for(timeout=60_000)
            assert any(c["name"].startswith("session_") for c in ctx.cookies())  # the Lax cookie is set
            # A page on another local port, same site, cookie in the jar: its websocket is refused.
            attack = ctx.new_page()
            attack.goto(attacker_page)
            attack.wait_for_function("document.title !== 'attacker'", timeout=30_000)
            assert attack.title() == "refused"
        finally:
            ctx.close()
            shutil.rmtree(profile, ignore_errors=True)
