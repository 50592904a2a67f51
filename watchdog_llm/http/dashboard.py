"""The operator dashboard on the admin listener (never on the public one): its page and assets,
sign-in with a one-time token, the live event stream, log tails and a local API reference.

Who may reach the admin listener is decided by `Gate` (below), once, for every route: on the
unix socket STATE_DIR/admin.sock only our user can connect; elsewhere (ADMIN_HOST, or the
dashboard's socket that `watchdog-llm dashboard` forwards a local port to) a request needs the
admin bearer token or a signed-in session, and a session's state-changing requests its CSRF token.
"""

from __future__ import annotations

import hashlib
import hmac
import html
import json
import logging
from collections.abc import Callable
from http.cookies import CookieError, SimpleCookie
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from watchdog_llm.coordination.events import KEPT, EventBus
from watchdog_llm.http.errors import api_body, encode, headers
from watchdog_llm.http.pages import SECURITY_HEADERS, asset
from watchdog_llm.http.session import COOKIE, SESSION_TTL, Sessions, csrf_ok

DASH_ASSETS = {"dashboard.js": "text/javascript", "dashboard.css": "text/css", "apidocs.js": "text/javascript"}
LOGS = ("daemon", "model", "tunnel")  # STATE_DIR/logs/NAME.log
LOG_LINES_MAX = 2000
_LOG_READ = 512 * 1024  # bytes read from a log's end at most
_SAFE = frozenset({"GET", "HEAD", "OPTIONS"})
# Reachable before sign-in: the login checks its own token; the assets are the sign-in pages' own.
_LOGIN, _ASSETS = "/login", "/_dash/"


class Gate:
    """ASGI middleware for a listener others can reach: bearer token (constant-time) or session."""

    def __init__(self, app: ASGIApp, token: str, sessions: Sessions, log: logging.Logger) -> None:
        self.app = app
        self.digest = hashlib.sha256(token.encode()).digest() if token else None
        self.sessions = sessions
        self.log = log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        hdrs = dict(scope["headers"])
        auth = hdrs.get(b"authorization", b"").decode("latin-1")
        scheme, _, token = auth.partition(" ")
        presented = hashlib.sha256(token.strip().encode()).digest()
        if self.digest is not None and scheme.lower() == "bearer" and hmac.compare_digest(presented, self.digest):
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if path == _LOGIN or path.startswith(_ASSETS):
            await self.app(scope, receive, send)
            return
        cookie = _cookie(hdrs.get(b"cookie", b""))
        session = self.sessions.get(cookie) if cookie else None
        if session is not None:
            if scope["method"] not in _SAFE:
                sent = hdrs.get(b"x-csrf-token", b"").decode("latin-1")
                if not csrf_ok(session, sent):
                    self.log.warning("dashboard: %s %s refused: no valid CSRF token", scope["method"], path[:80])
                    msg = "this request needs the dashboard's X-CSRF-Token header (reload the page)"
                    await _json(send, 403, api_body("csrf_failed", msg))
                    return
            scope.setdefault("state", {})["csrf"] = session.csrf
            await self.app(scope, receive, send)
            return
        if path == "/" and scope["method"] in ("GET", "HEAD"):
            await _html(send, 401, _SIGN_IN)
            return
        why = "admin API: send 'Authorization: Bearer <ADMIN_TOKEN>', or sign in with `watchdog-llm dashboard`"
        await _json(send, 401, api_body("unauthorized", why))


def _cookie(raw: bytes) -> str | None:
    try:
        jar: SimpleCookie = SimpleCookie(raw.decode("latin-1"))
    except CookieError:
        return None
    morsel = jar.get(COOKIE)
    return morsel.value if morsel is not None else None


async def _json(send: Send, status: int, body: dict[str, Any]) -> None:
    content = encode(body)
    await send({"type": "http.response.start", "status": status, "headers": headers(content)})
    await send({"type": "http.response.body", "body": content})


async def _html(send: Send, status: int, page: str) -> None:
    content = page.encode()
    hdrs = [(b"content-type", b"text/html; charset=utf-8"), (b"content-length", str(len(content)).encode())]
    hdrs += [(k.lower().encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]
    await send({"type": "http.response.start", "status": status, "headers": hdrs})
    await send({"type": "http.response.body", "body": content})


def _page(title: str, body: str) -> str:
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><meta name='viewport' content='width=device-width'>"
        "<link rel='stylesheet' href='/_dash/dashboard.css'></head>"
        f"<body class='notice'><main>{body}</main></body></html>"
    )


_SIGN_IN = _page(
    "watchdog-llm: sign in",
    "<h1>Sign in</h1><p>This is the operator dashboard of a watchdog-llm daemon. Run "
    "<code>watchdog-llm dashboard</code> on its node: it prints a sign-in link that works once.</p>",
)
_LINK_SPENT = _page(
    "watchdog-llm: sign-in link not valid",
    "<h1>This sign-in link does not work</h1><p>It was used already, has expired (links work once, "
    "for 5 minutes), or the daemon restarted since. Run <code>watchdog-llm dashboard</code> on the "
    "node for a new one.</p>",
)


def _tail(path: Path, lines: int) -> list[str]:
    try:
        with path.open("rb") as f:
            size = f.seek(0, 2)
            f.seek(max(0, size - _LOG_READ))
            data = f.read()
    except FileNotFoundError:
        return []
    text = data.decode("utf-8", "replace").splitlines()
    if len(data) == _LOG_READ and text:
        text = text[1:]  # the first one is cut
    return text[-lines:]


def dashboard_router(
    sessions: Sessions,
    events: EventBus,
    status: Callable[[], dict[str, Any]],
    gpus: Callable[[], dict[str, Any]],
    requests: Callable[[], dict[str, Any]],
    logs_dir: Path,
    log: logging.Logger,
) -> APIRouter:
    r = APIRouter()

    @r.get("/", include_in_schema=False)
    async def page(request: Request) -> Response:
        csrf = html.escape(getattr(request.state, "csrf", ""), quote=True)
        body = asset("dashboard.html").decode().replace("{{csrf}}", csrf)
        return HTMLResponse(body, headers=SECURITY_HEADERS)

    @r.get("/_dash/{name}", include_in_schema=False)
    async def dash_asset(name: str) -> Response:
        kind = DASH_ASSETS.get(name)
        if kind is None:
            return JSONResponse(api_body("not_found", f"no asset {name[:80]!r}"), 404)
        return Response(asset(name), media_type=kind, headers=SECURITY_HEADERS)

    @r.get("/login", include_in_schema=False)
    async def login(request: Request, token: Annotated[str, Query(max_length=200)] = "") -> Response:
        peer = request.client.host if request.client else "unix socket"
        got = sessions.redeem(token) if token else None
        if got is None:
            log.warning("dashboard: sign-in refused (link used, expired or unknown) from %s", peer)
            return HTMLResponse(_LINK_SPENT, 401, headers=SECURITY_HEADERS)
        cookie, _ = got
        log.info("dashboard: signed in from %s", peer)
        resp = RedirectResponse("/", 303, headers=SECURITY_HEADERS)
        resp.set_cookie(COOKIE, cookie, max_age=int(SESSION_TTL), httponly=True, samesite="strict", path="/")
        return resp

    @r.post("/logout", include_in_schema=False)
    async def logout(request: Request) -> Response:
        cookie = _cookie(request.headers.get("cookie", "").encode("latin-1"))
        if cookie:
            sessions.end(cookie)
        resp = JSONResponse({"signed_out": True})
        resp.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
        return resp

    @r.post("/api/dashboard/login", summary="A one-time sign-in link for the dashboard (`watchdog-llm dashboard`)")
    async def login_token() -> dict[str, Any]:
        token = sessions.login_token()
        return {"token": token, "path": f"/login?token={token}", "expires_in": 300}

    @r.get(
        "/api/events",
        summary="Server-sent events: status, swap progress, yields, notices and lock changes, as they happen",
        response_class=StreamingResponse,
        responses={200: {"content": {"text/event-stream": {}}}},
    )
    async def get_events(
        last_event_id: Annotated[str | None, Header(max_length=20)] = None,
        history: Annotated[int, Query(ge=0, le=KEPT, description="first, up to N recent events but status")] = 0,
    ) -> Response:
        after = int(last_event_id) if last_event_id and last_event_id.isdigit() else None

        async def stream() -> Any:
            yield b"retry: 2000\n\n"
            if after is None:  # a new reader: what happened lately, if asked, then the whole picture
                if history:
                    for ev in [e for e in events.recent() if e.name != "status"][-history:]:
                        yield ev.sse()
                yield f"event: status\ndata: {_dumps(status())}\n\n".encode()
            async for ev in events.stream(after):
                yield ev.sse()

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )

    @r.get("/api/requests", summary="Public requests by consumer: counts by status class, the model's latency")
    def get_requests() -> dict[str, Any]:
        return {"consumers": requests()}

    @r.get("/api/gpus", summary="Each GPU with its memory and its processes (NVML, asked now)")
    def get_gpus() -> dict[str, Any]:
        return gpus()

    @r.get("/api/logs/{name}", summary="The last lines of the daemon's, the model's or the tunnel's log")
    def get_log(name: str, lines: Annotated[int, Query(ge=1, le=LOG_LINES_MAX)] = 200) -> Any:
        if name not in LOGS:
            return JSONResponse(api_body("not_found", f"no log {name[:40]!r} (logs: {', '.join(LOGS)})"), 404)
        return {"name": name, "lines": _tail(logs_dir / f"{name}.log", lines)}

    @r.get("/docs", include_in_schema=False)
    async def docs() -> Response:
        return HTMLResponse(asset("apidocs.html").decode(), headers=SECURITY_HEADERS)

    return r


def _dumps(data: Any) -> str:
    return json.dumps(data, separators=(",", ":"), default=str)
