"""An ASGI middleware for the marimo server of the app: refuses foreign origins and non-loopback Host names.

Why: `make run` serves the app on 127.0.0.1 behind a random token; `?access_token=` sets a SameSite=Lax session
cookie. marimo checks neither the Origin of a request (its `--allow-origins` is CORS, for HTTP only, and not
for the websocket) nor the Host header. A page on another local port (http://localhost:8000) is the same
*site*, so the browser sends it the Lax cookie, and it could open `/ws` and drive the app (which loads any
file path); a page on a rebound DNS name (evil.example -> 127.0.0.1) is same-origin to the browser.

How marimo loads it: `marimo._server.main.create_starlette_app` (used by `marimo run` and `marimo edit` via
`marimo._server.start`, and by `marimo.create_asgi_app`) appends `MIDDLEWARE_REGISTRY.get_all()` to its
Starlette middleware list; that registry reads the entry-point group `marimo.server.asgi.middleware`, and
each entry point must be a `starlette.middleware.Middleware` *instance* (it goes straight into
`Starlette(middleware=[...])`). pyproject.toml names `workbench.app_guard:middleware` below. Being last in
that list, the guard sits inside marimo's session/auth/CORS middleware and before every route: a CORS
preflight (OPTIONS) is answered by Starlette's CORSMiddleware before it, which runs no app code.
(marimo's MARIMO_SERVER_ASGI_MIDDLEWARE_DENYLIST=workbench-app-guard turns it off, marimo's own switch.)

The rule, for every HTTP request and websocket connection, when enforced:
- the Host header must be a loopback name: `localhost`, or a loopback IP literal (127.0.0.0/8, `[::1]`),
  with an optional port; IP literals cannot be rebound and `localhost` is resolved by the browser itself;
- every Origin header present must be the server's own origin as the request names it: the scheme of the
  connection (http/ws -> http, https/wss -> https) and the Host header's host and port (default port when
  absent). No Origin (curl, a same-origin GET navigation) passes. `null` and anything else is refused.
Refused: HTTP 403 with a one-line text body; a websocket is refused before accept (403 with that body where
the server offers the `websocket.http.response` extension, as uvicorn does, else a plain close -> 403).

When enforced: only when marimo's own server is bound to loopback and not behind `--proxy`: marimo's
`start` puts its uvicorn server in `app.state.server` (`config.host` = the `--host` it binds, brackets
stripped) and the external host in `app.state.host` (`--proxy`'s host, else `--host`). Bound to 0.0.0.0, a
LAN address or with a non-loopback `--proxy`, the user serves the app to other names on purpose and the
guard stays out of the way; without `app.state.server` (create_asgi_app mounted in someone else's server)
the binding is not ours to know, so it stays out of the way too. marimo's default `--host` is 127.0.0.1, so
a hand-run `marimo run/edit` in this venv is guarded as `make run` is, with no variable to forget.
The port is not checked against the bound one: a tunnel (ssh -L 9000:localhost:2718) sends its own port
in Host and Origin alike.
"""

from __future__ import annotations

import ipaddress
import logging
import re
from typing import Any, Awaitable, Callable

from starlette.middleware import Middleware

LOGGER = logging.getLogger(__name__)

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# host[:port]: a bracketed IPv6 literal or a plain name / IPv4 literal (no userinfo, no path).
_HOSTPORT = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-]+)(?::([0-9]{1,5}))?")
_ORIGIN = re.compile(r"(https?)://(.+)")
_DEFAULT_PORT = {"http": 80, "https": 443}
_SCHEME = {"http": "http", "ws": "http", "https": "https", "wss": "https"}


def _is_loopback_ip(text: str) -> bool:
    """127.0.0.0/8 or ::1 (not an IPv4-mapped ::ffff:127.x, which Python versions judge differently)."""
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return False
    return ip.is_loopback if ip.version == 4 else ip == ipaddress.IPv6Address("::1")


def is_loopback_name(host: str) -> bool:
    """`localhost` or a loopback IP literal (IPv6 with or without brackets), case-insensitive."""
    host = host.lower()
    if host == "localhost":
        return True
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return _is_loopback_ip(host)


def _split_hostport(text: str) -> tuple[str, int | None] | None:
    m = _HOSTPORT.fullmatch(text)
    if m is None:
        return None
    port = int(m.group(2)) if m.group(2) is not None else None
    if port is not None and not 0 < port < 65536:
        return None
    return m.group(1).lower(), port


def enforced(scope: Scope) -> bool:
    """True when the Starlette app in scope["app"] is marimo's, served by the uvicorn server marimo started
    on a loopback address, and not behind a non-loopback --proxy."""
    state = getattr(scope.get("app"), "state", None)
    server = getattr(state, "server", None)
    bound = getattr(getattr(server, "config", None), "host", None)
    if not isinstance(bound, str) or not is_loopback_name(bound):
        return False
    external = getattr(state, "host", None)
    return not isinstance(external, str) or is_loopback_name(external)


def refusal(scope: Scope) -> str | None:
    """Why the request in this scope is refused (one sentence), or None when it may pass."""
    hosts, origins = [], []
    for name, value in scope.get("headers") or ():
        if name == b"host":
            hosts.append(value.decode("latin-1"))
        elif name == b"origin":
            origins.append(value.decode("latin-1"))
    if len(hosts) != 1:
        return "the request has no single Host header"
    own = _split_hostport(hosts[0])
    if own is None or not is_loopback_name(own[0]):
        return f"Host {hosts[0]!r} is not a loopback name (localhost, 127.0.0.1, [::1])"
    scheme = _SCHEME.get(scope.get("scheme", "http"), "http")
    own_origin = (scheme, own[0], own[1] if own[1] is not None else _DEFAULT_PORT[scheme])
    for origin in origins:
        m = _ORIGIN.fullmatch(origin.strip().lower())
        parts = _split_hostport(m.group(2)) if m else None
        theirs = None if parts is None else (
            m.group(1), parts[0], parts[1] if parts[1] is not None else _DEFAULT_PORT[m.group(1)])
        if theirs != own_origin:
            return f"Origin {origin!r} is not this server's own origin"
    return None


class LoopbackGuard:
    """ASGI middleware: see the module's docstring for the rule and when it applies."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope.get("type")
        if kind in ("http", "websocket") and enforced(scope):
            why = refusal(scope)
            if why is not None:
                LOGGER.warning("workbench.app_guard refused %s %s: %s", kind, scope.get("path"), why)
                body = f"Forbidden (workbench.app_guard): {why}.\n".encode()
                if kind == "http":
                    await _refuse_http(send, body)
                else:
                    await _refuse_websocket(scope, receive, send, body)
                return
        await self.app(scope, receive, send)


_TEXT_HEADERS = [(b"content-type", b"text/plain; charset=utf-8")]


async def _refuse_http(send: Send, body: bytes) -> None:
    headers = _TEXT_HEADERS + [(b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 403, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _refuse_websocket(scope: Scope, receive: Receive, send: Send, body: bytes) -> None:
    message = await receive()  # websocket.connect; the handshake is still open
    if message.get("type") != "websocket.connect":
        return  # the client left already
    if "websocket.http.response" in (scope.get("extensions") or {}):
        headers = _TEXT_HEADERS + [(b"content-length", str(len(body)).encode())]
        await send({"type": "websocket.http.response.start", "status": 403, "headers": headers})
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": 1008})  # before accept: the server answers 403


# The entry point (pyproject.toml, group marimo.server.asgi.middleware): a Middleware instance.
middleware = Middleware(LoopbackGuard)
