"""The error bodies the daemon itself returns (README, "The public endpoint").

`/api/*`: {"error": code, "message": text, "consumer": name|null, "retryable": bool}.
`/v1/*`: the same fields inside OpenAI's envelope, so SDKs show the message; Retry-After on 503/429.
A 405 carries `Allow`: every method the path serves (RFC 9110), whichever listener answers it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from starlette.routing import BaseRoute, Match
from starlette.types import Scope

# OpenAI's error types, by status: what its SDKs map to exception classes.
_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    502: "server_error",
    503: "service_unavailable",
    504: "server_error",
}


def openai_body(
    status: int, code: str, message: str, *, consumer: str | None = None, retryable: bool = False
) -> dict[str, Any]:
    err = {
        "message": message,
        "type": _OPENAI_TYPES.get(status, "server_error"),
        "param": None,
        "code": code,
        "consumer": consumer,
        "retryable": retryable,
    }
    return {"error": err}


def api_body(code: str, message: str, *, consumer: str | None = None, retryable: bool = False) -> dict[str, Any]:
    return {"error": code, "message": message, "consumer": consumer, "retryable": retryable}


def encode(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":")).encode()


def headers(content: bytes, retry_after: int | None = None) -> list[tuple[bytes, bytes]]:
    """Raw ASGI headers of a JSON error response."""
    out = [(b"content-type", b"application/json"), (b"content-length", str(len(content)).encode())]
    if retry_after is not None:
        out.append((b"retry-after", str(retry_after).encode()))
    return out


# The methods RFC 9110 and 5789 define: what a 405's Allow may name.
_METHODS = ("CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE")


def allowed_methods(routes: Iterable[BaseRoute], scope: Scope) -> str:
    """The `Allow` header of a 405: every method some route serves at this path, sorted.

    Starlette's own names only the first route that matched the path, and a path several routes serve
    (GET, POST and DELETE /api/swap/lock are three) needs them all. Each method is asked of the routes as
    routing asks (FastAPI's included routers answer for their own routes), so nothing here knows their kinds."""
    return ", ".join(
        method
        for method in _METHODS
        if any(route.matches({**scope, "method": method})[0] is Match.FULL for route in routes)
    )
