"""The admin API: local control and observation, never reachable through the tunnel.

It listens on a unix socket in STATE_DIR (mode 0600: only our user can connect), or on
ADMIN_HOST:ADMIN_PORT, where every request needs `Authorization: Bearer <ADMIN_TOKEN>`. The next
issue's coordination endpoints (swap, lock, schedule) mount here too.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Sequence
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from watchdog_llm import __version__
from watchdog_llm.http.errors import allowed_methods, api_body, encode, headers


class ApiError(BaseModel):
    error: str
    message: str
    consumer: str | None = None
    retryable: bool = False


class Health(BaseModel):
    ok: bool
    state: str
    serving: bool


class Status(BaseModel):
    """What `watchdog-llm status --json` shows (the fields tools rely on; more may follow)."""

    model_config = ConfigDict(extra="allow")
    version: str
    daemon_pid: int
    node: str
    state: str
    reason: str
    since: float
    model: str
    jobs: list[str]
    served_s: float


_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ApiError, "description": "missing or wrong admin token (TCP listener only)"},
    404: {"model": ApiError, "description": "no such endpoint"},
    # Every invalid request, in this shape (not FastAPI's `detail` list): one line that names the field.
    422: {"model": ApiError, "description": "invalid request: the message names the field"},
}


class _TokenGate:
    """ASGI middleware: every request carries the admin token (constant-time check)."""

    def __init__(self, app: ASGIApp, token: str) -> None:
        self.app = app
        self.digest = hashlib.sha256(token.encode()).digest()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        auth = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = auth.partition(" ")
        presented = hashlib.sha256(token.strip().encode()).digest()
        if scheme.lower() == "bearer" and hmac.compare_digest(presented, self.digest):
            await self.app(scope, receive, send)
            return
        body = encode(api_body("unauthorized", "admin API: send 'Authorization: Bearer <ADMIN_TOKEN>'"))
        await send({"type": "http.response.start", "status": 401, "headers": headers(body)})
        await send({"type": "http.response.body", "body": body})


def build_admin(
    status: Callable[[], dict[str, Any]],
    health: Callable[[], tuple[str, bool]],
    metrics: Callable[[], bytes],
    token: str = "",
    routers: Sequence[APIRouter] = (),
) -> ASGIApp:
    app = FastAPI(title="watchdog-llm admin API", version=__version__, responses=_ERRORS)
    for router in routers:
        app.include_router(router)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        path = _printable(request.url.path)
        if exc.status_code == 400:
            # FastAPI's one 400: a body it could not read at all (not UTF-8, say). That is an invalid
            # request like any other (invalid JSON is already 422): one status for one kind of error.
            return JSONResponse(api_body("invalid_request", "body: could not be read as JSON"), 422)
        if exc.status_code == 405:
            allow = allowed_methods(request.app.router.routes, request.scope)
            text = f"{request.method} is not allowed on {path} (allowed: {allow})"
            return JSONResponse(api_body("method_not_allowed", text), 405, headers={"Allow": allow})
        code = {404: "not_found"}.get(exc.status_code, "bad_request")
        return JSONResponse(api_body(code, f"{request.method} {path}: {exc.detail}"), exc.status_code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":  # its loc is ("body", offset)
            why = (first.get("ctx") or {}).get("error", "JSON decode error")
            return JSONResponse(api_body("invalid_request", _printable(f"body: not valid JSON: {why}")), 422)
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        msg = str(first.get("msg", "invalid")).removeprefix("Value error, ")
        return JSONResponse(api_body("invalid_request", _printable(f"{where}: {msg}")), 422)

    @app.get("/api/status", response_model=Status, summary="The daemon's state, live")
    async def get_status() -> dict[str, Any]:
        return status()

    @app.get("/healthz", response_model=Health, summary="Liveness: the daemon answers")
    async def healthz() -> Health:
        state, serving = health()
        return Health(ok=True, state=state, serving=serving)

    @app.get(
        "/metrics",
        summary="Prometheus metrics",
        response_class=Response,
        responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}},
    )
    async def get_metrics() -> Response:
        return Response(metrics(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return _TokenGate(app, token) if token else app


def _printable(text: str) -> str:
    """One line for people: a path or a field name may hold any character a client sent."""
    return "".join(c if c.isprintable() else "?" for c in text)[:300]
