"""The admin API: local control and observation, never reachable through the tunnel.

It listens on a unix socket in STATE_DIR (mode 0600: only our user can connect), or on
ADMIN_HOST:ADMIN_PORT, where every request needs `Authorization: Bearer <ADMIN_TOKEN>` or a signed-in
dashboard session (see `watchdog_llm.http.dashboard`). The coordination endpoints mount here too.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

from watchdog_llm import __version__
from watchdog_llm.http.errors import allowed_methods, api_body


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


def build_admin(
    status: Callable[[], dict[str, Any]],
    health: Callable[[], tuple[str, bool]],
    metrics: Callable[[], bytes],
    routers: Sequence[APIRouter] = (),
) -> FastAPI:
    """The admin app, ungated: the daemon puts `dashboard.Gate` in front of it where others can connect.
    No Swagger UI (it loads its scripts from a CDN): /docs is our own page, from /openapi.json."""
    app = FastAPI(title="watchdog-llm admin API", version=__version__, responses=_ERRORS, docs_url=None, redoc_url=None)
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

    return app


def _printable(text: str) -> str:
    """One line for people: a path or a field name may hold any character a client sent."""
    return "".join(c if c.isprintable() else "?" for c in text)[:300]
