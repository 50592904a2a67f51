"""A method a path does not serve (TRACE, PUT, ...) is 405 with `Allow` naming every method the path does serve
(RFC 9110), and the listener's usual JSON error body: on the admin API and on the public gateway's own pages.
Raw HTTP against a real daemon's two listeners."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from daemon_harness import DaemonProc
from gateway_harness import RawResponse, raw_request
from helpers import free_port

TOKEN = "methods-test-token-0123456789"


@pytest.fixture
def ports(daemon_env: dict[str, str]) -> Iterator[tuple[int, int]]:
    """(admin port, gateway port) of a serving daemon."""
    admin = free_port()
    d = DaemonProc({**daemon_env, "ADMIN_HOST": "127.0.0.1", "ADMIN_PORT": str(admin), "ADMIN_TOKEN": TOKEN})
    try:
        d.wait_state("serving")
        yield admin, int(daemon_env["PUBLIC_PORT"])
    finally:
        d.cleanup()


def request(port: int, method: str, path: str, *headers: str) -> RawResponse:
    head = "".join(f"{h}\r\n" for h in ("Host: localhost", *headers, "Connection: close"))
    return raw_request(port, f"{method} {path} HTTP/1.1\r\n{head}\r\n".encode())


def not_allowed(r: RawResponse, allow: str) -> str:
    assert r.status == 405, r.raw[:500]
    assert r.headers.get("allow") == allow, r.headers
    assert r.headers.get("content-type", "").startswith("application/json"), r.headers
    body = json.loads(r.body)
    error = body["error"] if isinstance(body["error"], dict) else body  # the gateway's is OpenAI's envelope
    assert error["code" if "code" in error else "error"] == "method_not_allowed", body
    message: str = error["message"]
    assert "\n" not in message and allow in message, message
    return message


# (method, path, Allow) on the admin API. Three routes serve /api/swap/lock (and "lock" would fit
# /api/swap/{swap_id} too): Allow names every method of all of them.
ADMIN = [
    ("TRACE", "/api/status", "GET"),
    ("TRACE", "/healthz", "GET"),
    ("TRACE", "/metrics", "GET"),
    ("TRACE", "/openapi.json", "GET, HEAD"),
    ("TRACE", "/api/swap/lock", "DELETE, GET, POST"),
    ("PUT", "/api/swap/lock", "DELETE, GET, POST"),
    ("DELETE", "/api/schedule", "GET, POST"),
    ("TRACE", "/api/schedule/nightly", "DELETE"),
    ("GET", "/api/swap/qwen/validate", "POST"),
]
GATEWAY = [("TRACE", "/", "GET"), ("TRACE", "/health", "GET"), ("POST", "/health", "GET"), ("DELETE", "/", "GET")]


def test_trace_on_both_listeners_is_405_with_allow(ports: tuple[int, int]) -> None:
    admin, public = ports
    for method, path, allow in ADMIN:
        message = not_allowed(request(admin, method, path, f"Authorization: Bearer {TOKEN}"), allow)
        assert message.startswith(f"{method} is not allowed on {path}"), message
    for method, path, allow in GATEWAY:
        r = request(public, method, path)
        message = not_allowed(r, allow)
        assert message.startswith(f"{method} is not allowed on {path}"), message
        assert json.loads(r.body)["error"]["type"] == "invalid_request_error", r.body
    # A path nobody serves stays a 404, with no Allow; and the admin token is checked before any of this.
    missing = request(public, "TRACE", "/nowhere")
    assert missing.status == 404 and "allow" not in missing.headers, missing.raw[:300]
    assert request(admin, "TRACE", "/api/status").status == 401
