"""The public gateway on bad input and faults: every test is a real HTTP exchange over real sockets.

The gateway runs in-process (uvicorn on a real port, its own event loop in a thread); upstreams are
the stand-in model server (a real process tree, once per module) for the happy paths and streaming,
and raw-socket servers for the faults (a reset, silence, a slow stream, a partial event).
What is asserted is what a user sees: status, the OpenAI error envelope, headers, bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest
from gateway_harness import (
    HALF_EVENT,
    INTERNAL_KEY,
    KEY_A,
    KEY_B,
    MODEL,
    SERVING,
    SSE_HEAD,
    YIELDED,
    GatewayServer,
    RawResponse,
    RawUpstream,
    Reader,
    StandIn,
    Upstreamed,
    canned,
    hang,
    json_ok,
    raw_request,
    read_response,
    read_responses,
    reset,
    slow_sse,
)
from helpers import free_port, wait_for

from watchdog_llm.http.gateway import GatewayConfig, relative_location

CHAT = "/v1/chat/completions"
YIELD_MSG = YIELDED.message + "; this response is incomplete"
TOKEN_DELAY_MS = 10  # the stand-in's time per token: a 60-word answer streams for ~0.6 s


# ---------------------------------------------------------------------------------------------------
# Fixtures and helpers
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StandIn]:
    s = StandIn(tmp_path_factory.mktemp("standin"), INTERNAL_KEY, TOKEN_DELAY_MS)
    yield s
    s.close()


@pytest.fixture(scope="module")
def shared_gw(standin: StandIn) -> Iterator[GatewayServer]:
    cfg = GatewayConfig(max_body_bytes=64 * 1024, body_timeout=5.0, read_timeout=10.0)
    g = GatewayServer(standin.url, cfg=cfg)
    yield g
    g.close()


@pytest.fixture
def gw(shared_gw: GatewayServer) -> Iterator[GatewayServer]:
    """The gateway in front of the stand-in, serving; fails the test on any ERROR logged meanwhile."""
    shared_gw.set(SERVING)
    shared_gw.errors.records.clear()
    yield shared_gw
    shared_gw.set(SERVING)
    assert not shared_gw.errors.lines(), "errors logged while serving this test"


@pytest.fixture
def make_gw() -> Iterator[Callable[..., GatewayServer]]:
    """Gateways with their own config (timeouts, limits) in front of any upstream; each must log no ERROR."""
    made: list[GatewayServer] = []

    def make(upstream_url: str, **kw: Any) -> GatewayServer:
        g = GatewayServer(upstream_url, **kw)
        made.append(g)
        return g

    yield make
    lines = [line for g in made for line in g.errors.lines()]
    for g in made:
        g.close()
    assert not lines, f"errors logged by a gateway: {lines}"


@pytest.fixture
def make_upstream() -> Iterator[Callable[..., RawUpstream]]:
    made: list[RawUpstream] = []

    def make(behave: Any, **kw: Any) -> RawUpstream:
        u = RawUpstream(behave, **kw)
        made.append(u)
        return u

    yield make
    for u in made:
        u.close()


def auth(key: str = KEY_A) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def chat_body(text: str = "hello there", stream: bool = False, **kw: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], "stream": stream, **kw}


def words(n: int) -> str:
    return " ".join(f"w{i}" for i in range(n))


def clean(data: bytes | str) -> None:
    """No response body ever shows a traceback or an exception's internals."""
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    assert "Traceback" not in text
    assert 'File "' not in text
    assert INTERNAL_KEY not in text


def envelope(r: httpx.Response | RawResponse, status: int, code: str, consumer: str | None = None) -> dict[str, Any]:
    """The OpenAI error envelope with our fields; returns the inner object."""
    body = r.content if isinstance(r, httpx.Response) else r.body
    status_code = r.status_code if isinstance(r, httpx.Response) else r.status
    clean(body)
    assert status_code == status, body
    assert r.headers["content-type"] == "application/json"
    doc = json.loads(body)
    assert list(doc) == ["error"], doc
    err = doc["error"]
    assert {"message", "type", "code", "consumer", "retryable"} <= set(err), err
    assert err["code"] == code, err
    assert err["consumer"] == consumer, err
    assert isinstance(err["message"], str) and err["message"], err
    assert isinstance(err["retryable"], bool)
    return dict(err)


def post(url: str, body: Any = None, *, headers: dict[str, str] | None = None, **kw: Any) -> httpx.Response:
    with httpx.Client(trust_env=False, timeout=10.0) as c:
        if body is not None and isinstance(body, dict | list):
            return c.post(url, json=body, headers=headers, **kw)
        return c.post(url, content=body, headers=headers, **kw)


def get(url: str, *, headers: dict[str, str] | None = None) -> httpx.Response:
    with httpx.Client(trust_env=False, timeout=10.0) as c:
        return c.get(url, headers=headers)


def sse_events(raw: bytes) -> list[str]:
    """The data of each SSE event, in order (`data: [DONE]` included as "[DONE]")."""
    assert raw.endswith(b"\n\n"), raw[-200:]
    out = []
    for block in raw.decode().split("\n\n")[:-1]:
        lines = [line[len("data: ") :] for line in block.split("\n") if line.startswith("data: ")]
        assert lines, f"an event without data: {block!r}"
        out.append("\n".join(lines))
    return out


def client(g: GatewayServer, key: str = KEY_A) -> openai.OpenAI:
    return openai.OpenAI(base_url=g.url + "/v1", api_key=key, max_retries=0, timeout=10.0)


def request_bytes(method: str, path: str, *, headers: dict[str, str] | None = None, body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: gateway"]
    for k, v in (headers or {}).items():
        lines.append(f"{k}: {v}")
    if body or method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(body)}")
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def not_asleep(standin: StandIn) -> None:
    assert standin.get("/is_sleeping").json() == {"is_sleeping": False}


# ---------------------------------------------------------------------------------------------------
# The official openai client
# ---------------------------------------------------------------------------------------------------


def test_openai_chat_completion(gw: GatewayServer) -> None:
    out = client(gw).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello there"}])
    assert out.choices[0].message.content == "[stand-in] hello there"
    assert out.model == MODEL


def test_openai_chat_completion_stream(gw: GatewayServer) -> None:
    stream = client(gw, KEY_B).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "one two three"}], stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == "[stand-in] one two three"


def test_openai_wrong_key_is_authentication_error(gw: GatewayServer) -> None:
    with pytest.raises(openai.AuthenticationError) as info:
        client(gw, "not-a-key-0123456789abcdef").chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}]
        )
    e = info.value
    assert e.status_code == 401
    assert isinstance(e.body, dict)
    assert e.body["message"].startswith("missing or unknown API key")
    assert e.body["code"] == "invalid_api_key" and e.code == "invalid_api_key"
    assert e.body["consumer"] is None and e.body["retryable"] is False
    assert "missing or unknown API key" in str(e)


@pytest.mark.parametrize("stream", [False, True])
def test_openai_not_serving_is_503_with_retry_after(gw: GatewayServer, stream: bool) -> None:
    gw.set(YIELDED)
    with pytest.raises(openai.InternalServerError) as info:
        client(gw).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=stream)
    e = info.value
    assert isinstance(e, openai.APIStatusError)
    assert e.status_code == 503
    assert e.response.headers["retry-after"] == "60"
    assert isinstance(e.body, dict)
    assert e.body["message"] == YIELDED.message
    assert e.body["code"] == "model_yielded" and e.body["type"] == "service_unavailable"
    assert e.body["consumer"] == "alice" and e.body["retryable"] is True
    assert YIELDED.message in str(e)


def test_openai_stream_ends_with_our_error_on_yield(gw: GatewayServer) -> None:
    stream = client(gw).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": words(80)}], stream=True
    )
    got: list[str] = []
    with pytest.raises(openai.APIError) as info:
        for chunk in stream:
            if chunk.choices:
                got.append(chunk.choices[0].delta.content or "")
            if len(got) == 3:
                gw.set(YIELDED)
                gw.model_down()
    e = info.value
    assert not isinstance(e, openai.APIStatusError)  # the stream had started: 200, then the error event
    assert e.message == YIELD_MSG
    assert e.code == "model_yielded"
    assert isinstance(e.body, dict) and e.body["consumer"] == "alice" and e.body["retryable"] is True
    text = "".join(got)
    assert 3 <= len(got) < 80 and ("[stand-in] " + words(80)).startswith(text)


def test_stream_yield_raw_bytes_end_with_error_event_and_done(gw: GatewayServer) -> None:
    with (
        httpx.Client(trust_env=False, timeout=10.0) as c,
        c.stream("POST", gw.url + CHAT, json=chat_body(words(80), stream=True), headers=auth()) as r,
    ):
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        data = b""
        it = r.iter_raw()
        while data.count(b"data: ") < 3:
            data += next(it)
        gw.set(YIELDED)
        gw.model_down()
        t0 = time.monotonic()
        for chunk in it:
            data += chunk
        took = time.monotonic() - t0
    clean(data)
    assert took < 1.0, f"the stream took {took:.2f} s to end after the yield"
    assert data.endswith(b"\n\ndata: [DONE]\n\n")
    events = sse_events(data)
    assert events[-1] == "[DONE]"
    err = json.loads(events[-2])["error"]
    assert err["code"] == "model_yielded" and err["message"] == YIELD_MSG
    assert err["consumer"] == "alice" and err["retryable"] is True and err["type"] == "service_unavailable"
    for e in events[:-2]:  # everything before is the model's own, whole chunks
        assert json.loads(e)["object"] == "chat.completion.chunk"
    assert 3 <= len(events) - 2 < 80


# ---------------------------------------------------------------------------------------------------
# Keys
# ---------------------------------------------------------------------------------------------------

BAD_AUTH = {
    "missing": "",
    "wrong": "Authorization: Bearer not-a-key-0123456789abcdef\r\n",
    "empty bearer": "Authorization: Bearer \r\n",
    "bearer only": "Authorization: Bearer\r\n",
    "basic scheme": f"Authorization: Basic {KEY_A}\r\n",
    "key without scheme": f"Authorization: {KEY_A}\r\n",
    "empty x-api-key": "x-api-key: \r\n",
    "wrong x-api-key": "x-api-key: not-a-key-0123456789abcdef\r\n",
    "prefix of a key": f"Authorization: Bearer {KEY_A[:-1]}\r\n",
    "key plus junk": f"Authorization: Bearer {KEY_A}x\r\n",
}


@pytest.mark.parametrize("header", list(BAD_AUTH.values()), ids=list(BAD_AUTH))
def test_bad_keys_are_401(gw: GatewayServer, header: str) -> None:
    body = json.dumps(chat_body()).encode()
    req = (
        f"POST {CHAT} HTTP/1.1\r\nHost: g\r\n{header}Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body
    r = raw_request(gw.port, req)
    err = envelope(r, 401, "invalid_api_key")
    assert err["type"] == "authentication_error" and err["retryable"] is False
    assert "retry-after" not in r.headers


@pytest.mark.parametrize(
    "headers",
    [{"x-api-key": KEY_A}, {"authorization": f"bearer {KEY_A}"}, {"Authorization": f"BEARER {KEY_B}"}],
    ids=["x-api-key", "lowercase bearer", "uppercase bearer"],
)
def test_accepted_key_forms(gw: GatewayServer, headers: dict[str, str]) -> None:
    r = get(gw.url + "/v1/models", headers=headers)
    assert r.status_code == 200, r.text
    assert [m["id"] for m in r.json()["data"]] == [MODEL]


def test_stand_in_refuses_the_public_key_the_gateway_sends_the_internal_one(
    gw: GatewayServer, standin: StandIn
) -> None:
    direct = post(standin.url + CHAT, chat_body(), headers=auth(KEY_A))
    assert direct.status_code == 401  # the model's own port does not know the public keys
    through = post(gw.url + CHAT, chat_body(), headers=auth(KEY_A))
    assert through.status_code == 200, through.text
    assert through.json()["choices"][0]["message"]["content"] == "[stand-in] hello there"


def test_upstream_gets_the_internal_key_never_the_clients(make_gw: Any, make_upstream: Any) -> None:
    up = make_upstream(json_ok)
    g = make_gw(up.url)
    headers = {
        **auth(KEY_A),
        "x-api-key": KEY_A,
        "Cookie": f"session={KEY_A}",
        "Proxy-Authorization": f"Basic {KEY_A}",
        "X-Custom": "kept",
    }
    r = post(g.url + CHAT + "?a=1", chat_body(), headers=headers)
    assert r.status_code == 200, r.text
    (req,) = up.requests
    assert req.request_line == f"POST {CHAT}?a=1 HTTP/1.1"
    assert req.header("authorization") == [f"Bearer {INTERNAL_KEY}"]
    assert req.header("x-api-key") == [] and req.header("cookie") == [] and req.header("proxy-authorization") == []
    assert req.header("x-custom") == ["kept"]
    assert req.header("host") == [f"127.0.0.1:{up.port}"]
    assert KEY_A.encode() not in req.head + req.body
    assert json.loads(req.body) == chat_body()


# ---------------------------------------------------------------------------------------------------
# Bodies
# ---------------------------------------------------------------------------------------------------

JSON = {"Content-Type": "application/json"}


@pytest.mark.parametrize(
    ("body", "what"),
    [
        (b'{"model": "m", "messages": [', "not valid JSON"),
        (b"{'model': 'm'}", "not valid JSON"),
        (b'{"model": "m"} trailing', "not valid JSON"),
        (b'{"model": "\xff\xfe"}', "not valid JSON"),
        (b'[{"model": "m"}]', "must be a JSON object"),
        (b'"just a string"', "must be a JSON object"),
        (b"null", "must be a JSON object"),
    ],
    ids=["truncated", "single quotes", "trailing junk", "invalid utf-8", "array", "string", "null"],
)
def test_bad_json_is_400(gw: GatewayServer, body: bytes, what: str) -> None:
    r = post(gw.url + CHAT, body, headers={**auth(), **JSON})
    err = envelope(r, 400, "invalid_json", "alice")
    assert what in err["message"] and err["type"] == "invalid_request_error"


def test_deeply_nested_json_is_400_not_502(gw: GatewayServer) -> None:
    body = b'{"model": "m", "x": ' + b"[" * 30_000 + b"]" * 30_000 + b"}"  # 60 kB: within this gateway's 64 KiB
    try:
        r = post(gw.url + CHAT, body, headers={**auth(), **JSON})
        clean(r.content)
        assert r.status_code == 400, r.text
        envelope(r, 400, "invalid_json", "alice")
    finally:
        logged = gw.errors.lines()  # the bug also logs an internal error: report it here, not at teardown
        gw.errors.records.clear()
    assert not logged


@pytest.mark.parametrize("ctype", ["text/plain", "application/xml", None])
def test_wrong_content_type_is_415(gw: GatewayServer, ctype: str | None) -> None:
    headers = auth() | ({"Content-Type": ctype} if ctype else {})
    r = post(gw.url + CHAT, json.dumps(chat_body()).encode(), headers=headers)
    err = envelope(r, 415, "unsupported_media_type", "alice")
    assert "application/json" in err["message"]


def test_content_type_parameters_are_fine(gw: GatewayServer) -> None:
    r = post(
        gw.url + CHAT, json.dumps(chat_body()), headers={**auth(), "Content-Type": "Application/JSON; charset=utf-8"}
    )
    assert r.status_code == 200, r.text


def test_declared_length_over_the_limit_is_413_without_the_body(gw: GatewayServer) -> None:
    head = (
        f"POST {CHAT} HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer {KEY_A}\r\n"
        "Content-Type: application/json\r\nContent-Length: 1000000000000\r\n\r\n"
    ).encode()
    t0 = time.monotonic()
    r = raw_request(gw.port, head)  # not one byte of the body is sent
    assert time.monotonic() - t0 < 1.0
    err = envelope(r, 413, "request_too_large", "alice")
    assert str(64 * 1024) in err["message"]


def test_expect_continue_over_the_limit_gets_413_not_100(gw: GatewayServer) -> None:
    head = (
        f"POST {CHAT} HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer {KEY_A}\r\nExpect: 100-continue\r\n"
        "Content-Type: application/json\r\nContent-Length: 70000\r\n\r\n"
    ).encode()
    r = raw_request(gw.port, head)
    assert not r.raw.startswith(b"HTTP/1.1 100")
    envelope(r, 413, "request_too_large", "alice")


def test_body_at_the_limit_passes_one_byte_more_is_413(gw: GatewayServer) -> None:
    limit = 64 * 1024
    base = json.dumps(chat_body()).encode()
    exact = base[:-1] + b" " * (limit - len(base)) + b"}"
    assert len(exact) == limit
    r = post(gw.url + CHAT, exact, headers={**auth(), **JSON})
    assert r.status_code == 200, r.text
    over = base[:-1] + b" " * (limit + 1 - len(base)) + b"}"
    envelope(post(gw.url + CHAT, over, headers={**auth(), **JSON}), 413, "request_too_large", "alice")


def test_chunked_body_over_the_limit_is_413(make_gw: Any, make_upstream: Any) -> None:
    up = make_upstream(json_ok)
    g = make_gw(up.url, cfg=GatewayConfig(max_body_bytes=4096))
    head = (
        f"POST {CHAT} HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer {KEY_A}\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", g.port), timeout=5) as s:
        s.sendall(head)
        for _ in range(8):  # 8 KiB in 1 KiB chunks, never finished
            s.sendall(b"400\r\n" + b" " * 1024 + b"\r\n")
        r = read_response(s)
    envelope(r, 413, "request_too_large", "alice")
    assert up.requests == []  # nothing reached the model


def test_chunked_body_within_the_limit_is_forwarded(make_gw: Any, make_upstream: Any) -> None:
    up = make_upstream(json_ok)
    g = make_gw(up.url, cfg=GatewayConfig(max_body_bytes=4096))

    def parts() -> Iterator[bytes]:
        doc = json.dumps(chat_body()).encode()
        for i in range(0, len(doc), 7):
            yield doc[i : i + 7]

    r = post(g.url + CHAT, parts(), headers={**auth(), **JSON})  # type: ignore[arg-type]
    assert r.status_code == 200, r.text
    assert json.loads(up.requests[0].body) == chat_body()


# ---------------------------------------------------------------------------------------------------
# Routes that are never forwarded
# ---------------------------------------------------------------------------------------------------

NOT_SERVED = [
    ("POST", "/sleep"),
    ("POST", "/sleep?level=1"),
    ("POST", "/wake_up"),
    ("GET", "/is_sleeping"),
    ("POST", "/collective_rpc"),
    ("POST", "/reset_prefix_cache"),
    ("GET", "/metrics"),
    ("GET", "/docs"),
    ("GET", "/redoc"),
    ("GET", "/openapi.json"),
    ("GET", "/version"),
    ("GET", "/ping"),
    ("POST", "/v1/load_lora_adapter"),
    ("POST", "/v1/unload_lora_adapter"),
    ("POST", "/v1/load%5Flora%5Fadapter"),
    ("GET", "/V1/models"),
    ("GET", "/api/status"),
]


@pytest.mark.parametrize(("method", "path"), NOT_SERVED, ids=[f"{m} {p}" for m, p in NOT_SERVED])
def test_unknown_routes_are_404_and_never_forwarded(
    gw: GatewayServer, standin: StandIn, method: str, path: str
) -> None:
    body = b'{"method": "sleep", "lora_name": "x", "lora_path": "/tmp/x"}' if method == "POST" else b""
    r = raw_request(gw.port, request_bytes(method, path, headers={**auth(), **JSON}, body=body))
    err = envelope(r, 404, "not_found")
    assert "is not served here" in err["message"]
    not_asleep(standin)


def test_post_sleep_through_the_gateway_does_not_put_the_model_to_sleep(gw: GatewayServer, standin: StandIn) -> None:
    for key in (KEY_A, "nobody-0123456789abcdef"):
        r = post(gw.url + "/sleep", {}, headers=auth(key))
        envelope(r, 404, "not_found")
    not_asleep(standin)
    # the stand-in does honour /sleep when reached directly: the check above means something
    assert post(standin.url + "/sleep", b"").status_code == 200
    try:
        assert standin.get("/is_sleeping").json() == {"is_sleeping": True}
    finally:
        post(standin.url + "/wake_up", b"")
    not_asleep(standin)


RAW_PATHS = [
    "/v1/../sleep",
    "/v1/./models",
    "/v1//models",
    "/v1/models/..",
    "/v1/%2e%2e/sleep",
    "/v1/%2E%2E/%2E%2E/sleep",
    "/v1/..%2fsleep",
    "/v1%2f..%2fsleep",
    "/v1/..%5csleep",
    "/v1/%00",
    "/v1/models%00",
    "/v1/models%0d%0aX-Injected:%201",
    "/v1/models%20x",
    "/v1/%c3%a9",
    "/v1/%ff",
    "/v1/models%3fx=1",
    "/v1/models%23frag",
    "/v1\\..\\sleep",
    "/v1/..\\sleep",
    "//v1/models",
    "/v1/load_lora_adapter/..",
]


@pytest.mark.parametrize("path", RAW_PATHS)
def test_odd_raw_paths_are_404(gw: GatewayServer, standin: StandIn, path: str) -> None:
    r = raw_request(gw.port, request_bytes("POST", path, headers={**auth(), **JSON}, body=b"{}"))
    envelope(r, 404, "not_found")
    assert "x-injected" not in r.headers
    not_asleep(standin)


def test_refused_paths_never_reach_the_upstream(make_gw: Any, make_upstream: Any) -> None:
    up = make_upstream(json_ok)
    g = make_gw(up.url)
    for method, path in [*NOT_SERVED, *(("POST", p) for p in RAW_PATHS)]:
        r = raw_request(g.port, request_bytes(method, path, headers={**auth(), **JSON}, body=b"{}"))
        envelope(r, 404, "not_found")
    assert up.requests == []
    assert post(g.url + CHAT, chat_body(), headers=auth()).status_code == 200  # the recorder does record
    assert [r.request_line for r in up.requests] == [f"POST {CHAT} HTTP/1.1"]


FORGED = {
    "X-Forwarded-Proto": "https",  # cloudflared sends this on every request
    "X-Forwarded-Host": "evil.example",
    "X-Forwarded-For": "203.0.113.7",
    "X-Real-IP": "203.0.113.7",
    "Forwarded": "for=203.0.113.7;proto=https;host=evil.example",
}


@pytest.mark.parametrize("forwarded", [{}, FORGED], ids=["plain", "forwarded headers"])
def test_trailing_slash_does_not_expose_the_internal_address(
    gw: GatewayServer, standin: StandIn, forwarded: dict[str, str]
) -> None:
    # Before: with X-Forwarded-Proto: https, vLLM's 307 said location: https://127.0.0.1:SERVER_PORT/...
    r = raw_request(gw.port, request_bytes("GET", "/v1/models/", headers={**auth(), **forwarded}))
    clean(r.raw + r.body)
    assert r.status == 307 and r.headers["location"] == "/v1/models", (r.status, r.headers)
    for where in (f"127.0.0.1:{standin.port}", str(standin.port), "evil.example"):
        assert where.encode() not in r.raw + r.body, (where, r.headers)


@pytest.mark.parametrize("forwarded", [{}, FORGED], ids=["plain", "forwarded headers"])
def test_our_own_redirects_are_paths(gw: GatewayServer, forwarded: dict[str, str]) -> None:
    r = raw_request(gw.port, request_bytes("GET", "/health/", headers=forwarded))
    assert r.status == 307 and r.headers["location"] == "/health", (r.status, r.headers)
    assert b"evil.example" not in r.raw and b"https" not in r.raw


def test_forwarding_headers_never_reach_the_model(make_gw: Any, make_upstream: Any) -> None:
    up = make_upstream(json_ok)
    g = make_gw(up.url)
    r = post(g.url + CHAT, chat_body(), headers={**auth(KEY_A), **FORGED, "CF-Connecting-IP": "203.0.113.7"})
    assert r.status_code == 200, r.text
    (req,) = up.requests
    for name in (*FORGED, "CF-Connecting-IP"):
        assert req.header(name.lower()) == [], name
    assert b"203.0.113.7" not in req.head and b"evil.example" not in req.head


@pytest.mark.parametrize(
    ("location", "expected"),
    [
        (b"https://127.0.0.1:8000/v1/models", b"/v1/models"),
        (b"http://localhost/v1/models?x=1", b"/v1/models?x=1"),
        (b"http://[::1]:9/a#b", b"/a#b"),
        (b"https://gpu.example.org/v1", b"/v1"),  # the request's own Host
        (b"http://127.0.0.1:8000", b"/"),
        (b"http://user@127.0.0.1:8000/x", b"/x"),
        (b"/already/relative", b"/already/relative"),
        (b"https://elsewhere.example/login", b"https://elsewhere.example/login"),
    ],
)
def test_relative_location(location: bytes, expected: bytes) -> None:
    assert relative_location(location, b"gpu.example.org") == expected


def test_method_not_allowed_on_site_routes(gw: GatewayServer) -> None:
    err = envelope(post(gw.url + "/health", {}), 405, "method_not_allowed")
    assert "POST" in err["message"]


SMUGGLED = b"GET /health?smuggled HTTP/1.1\r\nHost: g\r\n\r\n"
EARLY = {
    "401": ("/v1/chat/completions", "nobody-0123456789abcdef", len(SMUGGLED), 401, "invalid_api_key", None),
    "404 site": ("/sleep", KEY_A, len(SMUGGLED), 404, "not_found", None),
    "404 blocked": ("/v1/load_lora_adapter", KEY_A, len(SMUGGLED), 404, "not_found", None),
    "413": ("/v1/chat/completions", KEY_A, 70_000, 413, "request_too_large", "alice"),
    "503": ("/v1/chat/completions", KEY_A, len(SMUGGLED), 503, "model_yielded", "alice"),
}


@pytest.mark.parametrize("case", list(EARLY.values()), ids=list(EARLY))
def test_refusal_before_the_body_never_runs_the_body_as_a_request(gw: GatewayServer, case: tuple[Any, ...]) -> None:
    """Refused before its body is read, a request's body (here: another request) must be skipped or the
    connection closed; never parsed as the next request (a desync behind a keep-alive proxy)."""
    path, key, length, status, code, consumer = case
    if status == 503:
        gw.set(YIELDED)
    body = SMUGGLED + b" " * (length - len(SMUGGLED))
    first = (
        f"POST {path} HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    ).encode() + body
    follow = f"GET /v1/models HTTP/1.1\r\nHost: g\r\nx-api-key: {KEY_A}\r\nConnection: close\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", gw.port), timeout=3) as s:
        with contextlib.suppress(OSError):  # the server may close while we send: what it answered is read below
            s.sendall(first + follow)
        responses = read_responses(s)
    assert responses, "no answer at all"
    envelope(responses[0], status, code, consumer)
    for r in responses:
        clean(r.body)
        assert b'"status":"ok"' not in r.body, "the body ran as a request"
    assert len(responses) <= 2, [r.status for r in responses]
    if len(responses) == 2:  # the follow-up was served, as the follow-up
        if status == 503:
            envelope(responses[1], 503, "model_yielded", "alice")
        else:
            assert responses[1].status == 200, responses[1].body[:200]
            assert json.loads(responses[1].body)["data"][0]["id"] == MODEL


def test_head_through_the_proxy_does_not_hang(gw: GatewayServer) -> None:
    t0 = time.monotonic()
    with httpx.Client(trust_env=False, timeout=5.0) as c:
        r = c.head(gw.url + "/v1/models", headers=auth())
    assert r.status_code < 500 and time.monotonic() - t0 < 2.0
    assert r.content == b""


# ---------------------------------------------------------------------------------------------------
# Malformed requests on the wire
# ---------------------------------------------------------------------------------------------------

MALFORMED = {
    "CR in header value": b"GET /health HTTP/1.1\r\nHost: g\r\nX-A: a\rX-Injected: 1\r\n\r\n",
    "CRLF in request line": b"GET /health\r\nX-Injected: 1 HTTP/1.1\r\nHost: g\r\n\r\n",
    "HTTP/0.9 request line": b"GET /health\r\nX-Injected: 1\r\n\r\n",
    "HTTP/2.0 in an HTTP/1 request line": b"GET /health HTTP/2.0\r\nHost: g\r\nX-Injected: 1\r\n\r\n",
    "NUL in header value": b"GET /health HTTP/1.1\r\nHost: g\r\nX-A: a\x00b\r\n\r\n",
    "space in header name": b"GET /health HTTP/1.1\r\nHost: g\r\nX A: b\r\n\r\n",
    "no colon": b"GET /health HTTP/1.1\r\nHost: g\r\nnot a header\r\n\r\n",
    "CR in auth": b"GET /v1/models HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer " + KEY_A.encode() + b"\rX: 1\r\n\r\n",
    "two lengths": b"POST /v1/models HTTP/1.1\r\nHost: g\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
    "length and chunked": (
        b"POST " + CHAT.encode() + b" HTTP/1.1\r\nHost: g\r\nContent-Length: 2\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    ),
    "bad length": b"POST /v1/models HTTP/1.1\r\nHost: g\r\nContent-Length: 1e3\r\n\r\n",
    "negative length": b"POST /v1/models HTTP/1.1\r\nHost: g\r\nContent-Length: -1\r\n\r\n",
    "HTTP/2 preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    "garbage": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(256)) + b"\r\n\r\n",
    "huge header": b"GET /health HTTP/1.1\r\nHost: g\r\nX-Big: " + b"a" * 1_000_000 + b"\r\n\r\n",
    "many headers": b"GET /health HTTP/1.1\r\nHost: g\r\n" + b"X-A: b\r\n" * 200_000 + b"\r\n",
}


@pytest.mark.parametrize("data", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_requests_get_4xx_and_the_server_goes_on(gw: GatewayServer, data: bytes) -> None:
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:
        try:
            s.sendall(data)
            r: RawResponse | None = read_response(s)
        except (ConnectionError, OSError):
            r = None  # closing the connection without an answer is fine too
    if r is not None:
        clean(r.body)
        assert 400 <= r.status < 500, (r.status, r.body)
        assert "x-injected" not in r.headers
    assert get(gw.url + "/health").status_code == 200
    assert get(gw.url + "/v1/models", headers=auth()).status_code == 200


@pytest.mark.parametrize(("size", "status"), [(60_000, 200), (70_000, 400)])
def test_request_head_up_to_64_kib_is_served_larger_is_400(gw: GatewayServer, size: int, status: int) -> None:
    """The same bound whichever parser uvicorn uses (h11's h11_max_incomplete_event_size; a limit of
    ours with httptools, which has none)."""
    data = request_bytes("GET", "/health", headers={"X-Big": "a" * size})
    r = raw_request(gw.port, data)
    assert r.status == status, r.body[:200]


def test_large_body_arriving_with_its_head_is_not_taken_for_a_large_head(make_gw: Any, make_upstream: Any) -> None:
    up = make_upstream(json_ok)
    g = make_gw(up.url, cfg=GatewayConfig(max_body_bytes=4 * 1024 * 1024))
    body = json.dumps(chat_body("x" * 1_000_000)).encode()
    r = raw_request(
        g.port, request_bytes("POST", CHAT, headers={**auth(), "Content-Type": "application/json"}, body=body)
    )
    assert r.status == 200, r.body[:200]
    assert up.requests[0].body == body


def test_pipelined_requests_with_large_bodies_in_one_send(make_gw: Any, make_upstream: Any) -> None:
    up = make_upstream(json_ok)
    g = make_gw(up.url, cfg=GatewayConfig(max_body_bytes=1024 * 1024))
    bodies = [json.dumps(chat_body(c * 100_000)).encode() for c in "ab"]
    data = b""
    for i, body in enumerate(bodies):
        last = "Connection: close\r\n" if i == len(bodies) - 1 else ""
        head = f"POST {CHAT} HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer {KEY_A}\r\n"
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{last}\r\n"
        data += head.encode() + body
    with socket.create_connection(("127.0.0.1", g.port), timeout=10) as s:
        s.sendall(data)
        responses = read_responses(s)
    assert [r.status for r in responses] == [200, 200]
    assert sorted(r.body for r in up.requests) == sorted(bodies)


def test_a_stream_head_goes_out_before_its_first_event(make_gw: Any, make_upstream: Any) -> None:
    """Response writes are held to the end of an event-loop turn (one send for a small answer, one per
    batch of events): a head with no event behind it yet must not wait for one."""
    up = make_upstream(canned(SSE_HEAD, then="hang"))
    g = make_gw(up.url)
    with socket.create_connection(("127.0.0.1", g.port), timeout=2.0) as s:
        s.sendall(request_bytes("POST", CHAT, headers={**auth(), "Content-Type": "application/json"}, body=b"{}"))
        head = Reader(s).until(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"text/event-stream" in head


def test_answers_in_turn_reuse_one_upstream_connection(make_gw: Any, standin: StandIn) -> None:
    g = make_gw(standin.url)
    with httpx.Client(trust_env=False, timeout=10.0) as c:
        for _ in range(5):
            assert c.get(g.url + "/v1/models", headers=auth()).status_code == 200
    assert g.upstream_lanes() == (0, 1)  # (lent, idle): one connection, kept for the next request


def test_bare_lf_header_does_not_smuggle_a_key(gw: GatewayServer) -> None:
    """A bare LF inside a header value either is refused or splits it; it never authenticates someone."""
    data = b"GET /v1/models HTTP/1.1\r\nHost: g\r\nX-Note: a\nAuthorization: Bearer nope-0123456789abcdef\r\n\r\n"
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as s:
        s.sendall(data)
        r = read_response(s)
    clean(r.body)
    assert r.status in (400, 401), r.status


# ---------------------------------------------------------------------------------------------------
# Upstream faults
# ---------------------------------------------------------------------------------------------------


def test_upstream_reset_is_502(make_gw: Any, make_upstream: Any) -> None:
    up = make_upstream(reset)
    g = make_gw(up.url)
    r = post(g.url + CHAT, chat_body(), headers=auth())
    err = envelope(r, 502, "upstream_error", "alice")
    assert err["type"] == "server_error" and err["retryable"] is True
    assert r.headers["retry-after"] == "1"
    assert up.url not in r.text and str(up.port) not in r.text
    assert len(up.requests) == 1


def test_upstream_reset_while_the_model_leaves_is_503(make_gw: Any, make_upstream: Any) -> None:
    holder: list[GatewayServer] = []

    def leaving(_: Upstreamed) -> None:
        holder[0].set(YIELDED)  # the yield lands between the gateway's check and the model's answer

    up = make_upstream(reset, on_request=leaving)
    g = make_gw(up.url)
    holder.append(g)
    r = post(g.url + CHAT, chat_body(), headers=auth(KEY_B))
    err = envelope(r, 503, "model_yielded", "bob")
    assert err["message"] == YIELDED.message and err["retryable"] is True
    assert r.headers["retry-after"] == "60"


def test_upstream_refusing_connections_is_502(make_gw: Any) -> None:
    g = make_gw(f"http://127.0.0.1:{free_port()}")
    r = post(g.url + CHAT, chat_body(), headers=auth())
    envelope(r, 502, "upstream_error", "alice")


BROKEN = {
    "garbage": (b"this is not HTTP at all\r\n\r\n", "close"),
    "truncated body": (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n" + b'{"id":"x","cho',
        "close",
    ),
    "truncated then reset": (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n" + b'{"id":"x","cho',
        "reset",
    ),
    "bad chunking": (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n{}\r\n",
        "close",
    ),
    "header without end": (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n", "close"),
    "bad status line": (b"HTTP/1.1 OK OK\r\ncontent-length: 0\r\n\r\n", "close"),
}


@pytest.mark.parametrize("case", list(BROKEN.values()), ids=list(BROKEN))
def test_broken_upstream_responses_are_502_never_a_truncated_200(
    make_gw: Any, make_upstream: Any, case: tuple[bytes, str]
) -> None:
    data, then = case
    up = make_upstream(canned(data, then))
    g = make_gw(up.url)
    r = post(g.url + CHAT, chat_body(), headers=auth())
    envelope(r, 502, "upstream_error", "alice")


def test_upstream_silent_mid_body_is_504(make_gw: Any, make_upstream: Any) -> None:
    head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n"
    up = make_upstream(canned(head + b'{"id":"x","cho', "hang"))
    g = make_gw(up.url, cfg=GatewayConfig(read_timeout=0.5))
    t0 = time.monotonic()
    r = post(g.url + CHAT, chat_body(), headers=auth())
    err = envelope(r, 504, "upstream_timeout", "alice")
    assert "mid-response" in err["message"] and 0.4 <= time.monotonic() - t0 < 3.0


def test_upstream_that_never_answers_is_504(make_gw: Any, make_upstream: Any) -> None:
    up = make_upstream(hang)
    g = make_gw(up.url, cfg=GatewayConfig(read_timeout=0.5))
    t0 = time.monotonic()
    r = post(g.url + CHAT, chat_body(), headers=auth())
    took = time.monotonic() - t0
    err = envelope(r, 504, "upstream_timeout", "alice")
    assert err["type"] == "server_error" and err["retryable"] is True
    assert r.headers["retry-after"] == "5"
    assert 0.4 <= took < 3.0, took
    wait_for(lambda: up.disconnected_at, 2.0, what="the gateway to close its connection to the silent upstream")


def stream_through(g: GatewayServer, key: str = KEY_A) -> tuple[int, bytes]:
    with (
        httpx.Client(trust_env=False, timeout=10.0) as c,
        c.stream("POST", g.url + CHAT, json=chat_body(stream=True), headers=auth(key)) as r,
    ):
        return r.status_code, b"".join(r.iter_raw())


def test_upstream_silent_mid_stream_ends_with_timeout_event(make_gw: Any, make_upstream: Any) -> None:
    up = make_upstream(slow_sse(events=2, interval=0.01, then="hang"))
    g = make_gw(up.url, cfg=GatewayConfig(read_timeout=0.5))
    status, data = stream_through(g)
    clean(data)
    assert status == 200
    events = sse_events(data)
    assert events[-1] == "[DONE]" and len(events) == 4
    err = json.loads(events[-2])["error"]
    assert err["code"] == "upstream_timeout" and "incomplete" in err["message"] and err["consumer"] == "alice"


def test_upstream_reset_mid_stream_ends_with_error_event(make_gw: Any, make_upstream: Any) -> None:
    up = make_upstream(slow_sse(events=3, interval=0.01, then="reset"))
    g = make_gw(up.url)
    status, data = stream_through(g)
    clean(data)
    assert status == 200
    events = sse_events(data)
    assert events[-1] == "[DONE]" and len(events) == 5
    err = json.loads(events[-2])["error"]
    assert err["code"] == "upstream_error" and err["message"].startswith("the connection to the model was lost")
    # and the openai SDK shows that message
    stream = client(g).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], stream=True)
    with pytest.raises(openai.APIError, match="the connection to the model was lost"):
        for _ in stream:
            pass


def test_stream_ending_without_done_while_the_model_left_gets_an_error_event(make_gw: Any, make_upstream: Any) -> None:
    holder: list[GatewayServer] = []

    def leaving(_: Upstreamed) -> None:
        holder[0].set(YIELDED)  # vLLM shut down gracefully: it closes the stream cleanly, without [DONE]

    up = make_upstream(slow_sse(events=3, interval=0.01, then="eof"), on_request=leaving)
    g = make_gw(up.url)
    holder.append(g)
    status, data = stream_through(g)
    assert status == 200
    events = sse_events(data)
    assert events[-1] == "[DONE]" and len(events) == 5
    assert json.loads(events[-2])["error"]["code"] == "model_yielded"


def test_stream_ending_without_done_while_serving_is_passed_through(make_gw: Any, make_upstream: Any) -> None:
    up = make_upstream(slow_sse(events=3, interval=0.01, then="eof"))
    g = make_gw(up.url)
    status, data = stream_through(g)
    assert status == 200
    assert [json.loads(e)["object"] for e in sse_events(data)] == ["chat.completion.chunk"] * 3


def test_yield_after_half_an_event_still_gives_our_error(make_gw: Any, make_upstream: Any) -> None:
    up = make_upstream(slow_sse(events=2, interval=0.01, then="partial"))
    g = make_gw(up.url)
    stream = client(g).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], stream=True)
    got = 0

    def down_once_partial_sent() -> None:
        time.sleep(0.3)  # the half event is out (2 events at 10 ms, then the half one)
        g.set(YIELDED)
        g.model_down()

    threading.Thread(target=down_once_partial_sent, daemon=True).start()
    with pytest.raises(openai.APIError) as info:
        for _ in stream:
            got += 1
    assert got == 2
    assert info.value.message == YIELD_MSG


def test_half_event_never_reaches_the_client_as_an_event(make_gw: Any, make_upstream: Any) -> None:
    """What the client gets when the model leaves mid-event: every event it can parse is whole JSON."""
    up = make_upstream(slow_sse(events=2, interval=0.01, then="partial"))
    g = make_gw(up.url)
    with (
        httpx.Client(trust_env=False, timeout=10.0) as c,
        c.stream("POST", g.url + CHAT, json=chat_body(stream=True), headers=auth()) as r,
    ):
        it = r.iter_raw()
        data = b""
        while data.count(b"\n\n") < 2:  # the two whole events
            data += next(it)
        wait_for(lambda: up.half_sent, 5.0)  # the model has sent half of the third
        time.sleep(0.1)  # and the gateway has read it
        g.set(YIELDED)
        g.model_down()
        data += b"".join(it)
    assert data.endswith(b"data: [DONE]\n\n")
    bad = []
    for e in sse_events(data)[:-1]:
        try:
            json.loads(e)
        except ValueError:
            bad.append(e)
    assert not bad, f"truncated events reached the client: {bad}"
    assert HALF_EVENT not in data


# ---------------------------------------------------------------------------------------------------
# Slow clients
# ---------------------------------------------------------------------------------------------------


def test_slowloris_clients_do_not_block_others(make_gw: Any, make_upstream: Any) -> None:
    up = make_upstream(json_ok)
    g = make_gw(up.url, cfg=GatewayConfig(body_timeout=30.0))
    stop = threading.Event()
    body = json.dumps(chat_body()).encode()
    slow_head = (
        f"POST {CHAT} HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer {KEY_A}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    sent = [0] * 8

    def trickle(i: int) -> None:
        # half of them dribble the head, half send the head at once and dribble the body
        data = slow_head + body
        with socket.create_connection(("127.0.0.1", g.port), timeout=5) as s:
            if i % 2:
                s.sendall(slow_head)
                data = body
            for b in data:
                if stop.wait(0.02):
                    return
                s.sendall(bytes([b]))
                sent[i] += 1

    threads = [threading.Thread(target=trickle, args=(i,), daemon=True) for i in range(8)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: min(sent) >= 5, 5.0, what="every slow client to be sending")
        for key in (KEY_A, KEY_B):
            t0 = time.monotonic()
            r = post(g.url + CHAT, chat_body(), headers=auth(key))
            assert r.status_code == 200, r.text
            assert time.monotonic() - t0 < 1.0
        t0 = time.monotonic()
        assert get(g.url + "/health").status_code == 200
        assert time.monotonic() - t0 < 1.0
        assert all(t.is_alive() for t in threads)  # they were all still dribbling meanwhile
    finally:
        stop.set()
        for t in threads:
            t.join(5)


def test_body_that_never_completes_is_408(make_gw: Any, make_upstream: Any) -> None:
    up = make_upstream(json_ok)
    g = make_gw(up.url, cfg=GatewayConfig(body_timeout=0.5))
    head = (
        f"POST {CHAT} HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer {KEY_A}\r\n"
        "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    ).encode()
    t0 = time.monotonic()
    r = raw_request(g.port, head + b'{"model": ')
    took = time.monotonic() - t0
    err = envelope(r, 408, "request_timeout", "alice")
    assert "did not arrive within" in err["message"]
    assert 0.4 <= took < 2.0, took
    assert up.requests == []
    assert g.in_flight("alice") == 0


def test_body_trickling_past_the_deadline_is_408(make_gw: Any, make_upstream: Any) -> None:
    up = make_upstream(json_ok)
    g = make_gw(up.url, cfg=GatewayConfig(body_timeout=0.5))
    body = json.dumps(chat_body()).encode()
    head = (
        f"POST {CHAT} HTTP/1.1\r\nHost: g\r\nx-api-key: {KEY_B}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", g.port), timeout=5) as s:
        s.sendall(head)
        t0 = time.monotonic()
        for b in body[:20]:  # a byte every 50 ms: never silent for long, but the whole body is late
            s.sendall(bytes([b]))
            time.sleep(0.05)
        r = read_response(s)
    took = time.monotonic() - t0
    envelope(r, 408, "request_timeout", "bob")
    assert 0.4 <= took < 2.0, took
    assert up.requests == []


def test_408_message_names_the_real_timeout(make_gw: Any, make_upstream: Any) -> None:
    up = make_upstream(json_ok)
    g = make_gw(up.url, cfg=GatewayConfig(body_timeout=0.5))
    head = (
        f"POST {CHAT} HTTP/1.1\r\nHost: g\r\nAuthorization: Bearer {KEY_A}\r\n"
        "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    ).encode()
    err = envelope(raw_request(g.port, head), 408, "request_timeout", "alice")
    assert "within 0 s" not in err["message"], err["message"]


# ---------------------------------------------------------------------------------------------------
# Client disconnects
# ---------------------------------------------------------------------------------------------------


def test_client_gone_mid_stream_closes_the_upstream_promptly(make_gw: Any, make_upstream: Any) -> None:
    up = make_upstream(slow_sse(events=200, interval=0.05))
    g = make_gw(up.url)
    body = json.dumps(chat_body(stream=True)).encode()
    with socket.create_connection(("127.0.0.1", g.port), timeout=5) as s:
        s.sendall(request_bytes("POST", CHAT, headers={**auth(), **JSON}, body=body))
        got = b""
        while got.count(b"data: ") < 2:
            got += s.recv(65536)
        assert got.startswith(b"HTTP/1.1 200")
    gone = time.monotonic()
    wait_for(lambda: up.disconnected_at, 2.0, what="the upstream to see its connection closed")
    assert up.disconnected_at[0] - gone < 1.0
    assert up.events_sent < 60  # it did not stream on for long into the void
    wait_for(lambda: g.in_flight("alice") == 0, 2.0, what="alice's slot to be freed")


def test_client_gone_while_waiting_closes_the_upstream_promptly(make_gw: Any, make_upstream: Any) -> None:
    up = make_upstream(hang)
    g = make_gw(up.url)
    body = json.dumps(chat_body()).encode()
    with socket.create_connection(("127.0.0.1", g.port), timeout=5) as s:
        s.sendall(request_bytes("POST", CHAT, headers={**auth(), **JSON}, body=body))
        wait_for(lambda: up.requests, 2.0, what="the request to reach the upstream")
    gone = time.monotonic()
    wait_for(lambda: up.disconnected_at, 2.0, what="the upstream to see its connection closed")
    assert up.disconnected_at[0] - gone < 1.0
    wait_for(lambda: g.in_flight("alice") == 0, 2.0, what="alice's slot to be freed")


# ---------------------------------------------------------------------------------------------------
# Per-key concurrency
# ---------------------------------------------------------------------------------------------------


def test_per_key_limit_is_429_for_that_key_only(make_gw: Any, make_upstream: Any) -> None:
    up = make_upstream(json_ok)
    g = make_gw(up.url, limit=2)
    held: list[httpx.Response] = []

    def hold() -> None:
        held.append(post(g.url + CHAT, chat_body(hold="hold"), headers=auth(KEY_A)))

    threads = [threading.Thread(target=hold, daemon=True) for _ in range(2)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: up.in_flight == 2, 5.0, what="two held requests at the upstream")
        r = post(g.url + CHAT, chat_body(), headers=auth(KEY_A))
        err = envelope(r, 429, "too_many_requests", "alice")
        assert err["type"] == "rate_limit_error" and err["retryable"] is True and "at most 2" in err["message"]
        assert r.headers["retry-after"] == "1"
        with pytest.raises(openai.RateLimitError):
            client(g).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
        other = post(g.url + CHAT, chat_body(), headers=auth(KEY_B))
        assert other.status_code == 200, other.text
        assert len(up.requests) == 3  # the refused ones never reached the model
    finally:
        up.release.set()
        for t in threads:
            t.join(10)
    assert [r.status_code for r in held] == [200, 200]
    assert g.in_flight("alice") == 0
    again = post(g.url + CHAT, chat_body(), headers=auth(KEY_A))
    assert again.status_code == 200


# ---------------------------------------------------------------------------------------------------
# Many requests across a yield
# ---------------------------------------------------------------------------------------------------


def test_many_requests_across_a_yield(gw: GatewayServer) -> None:
    rng = random.Random(7)
    results: list[tuple[bool, int, bytes]] = []

    streaming = asyncio.Event()  # a stream has begun: the yield below cuts it (on a slow machine too)

    async def one(c: httpx.AsyncClient, i: int, stream: bool) -> None:
        await asyncio.sleep(rng.uniform(0, 0.5))
        body = chat_body(words(rng.randint(20, 60)), stream=stream)
        key = KEY_A if i % 2 else KEY_B
        async with c.stream("POST", gw.url + CHAT, json=body, headers=auth(key)) as r:
            chunks = []
            async for chunk in r.aiter_raw():
                chunks.append(chunk)
                if stream and r.status_code == 200:
                    streaming.set()
            data = b"".join(chunks)
            results.append((stream, r.status_code, data))
            if r.status_code == 503:
                assert r.headers["retry-after"] == "60"

    async def flip() -> None:
        await asyncio.sleep(0.3)
        await asyncio.wait_for(streaming.wait(), 10)
        gw.set(YIELDED)
        gw.model_down()

    async def main() -> None:
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(trust_env=False, timeout=10.0, limits=limits) as c:
            jobs = [one(c, i, stream=i % 2 == 0) for i in range(40)]
            await asyncio.wait_for(asyncio.gather(flip(), *jobs), 20.0)

    t0 = time.monotonic()
    asyncio.run(main())
    assert time.monotonic() - t0 < 15.0
    assert len(results) == 40
    kinds: dict[str, int] = {}
    for stream, status, data in results:
        clean(data)
        assert status in (200, 503), (status, data[:300])
        if status == 503:
            err = json.loads(data)["error"]
            assert err["code"] == "model_yielded" and err["consumer"] in ("alice", "bob")
            kind = "503"
        elif not stream:
            assert json.loads(data)["choices"][0]["message"]["content"].startswith("[stand-in]")
            kind = "200 json"
        else:
            events = sse_events(data)
            assert events[-1] == "[DONE]"
            if '"error"' in events[-2]:
                assert json.loads(events[-2])["error"]["code"] == "model_yielded"
                body_events = events[:-2]
                kind = "200 stream cut"
            else:
                body_events = events[:-1]
                kind = "200 stream whole"
            for e in body_events:
                assert json.loads(e)["object"] == "chat.completion.chunk"
        kinds[kind] = kinds.get(kind, 0) + 1
    # the yield landed in the middle: some were refused, some streams were cut
    assert kinds.get("503", 0) >= 1 and kinds.get("200 stream cut", 0) >= 1, kinds


# ---------------------------------------------------------------------------------------------------
# /health and /
# ---------------------------------------------------------------------------------------------------


def test_health(gw: GatewayServer) -> None:
    r = get(gw.url + "/health")
    assert r.status_code == 200 and r.json() == {"status": "ok", "message": "serving", "model": MODEL}
    assert "retry-after" not in r.headers
    gw.set(YIELDED)
    r = get(gw.url + "/health")
    assert r.status_code == 503
    assert r.headers["retry-after"] == "60"
    assert r.json() == {"status": "model_yielded", "message": YIELDED.message, "model": MODEL}


@pytest.mark.parametrize("chat_page", [True, False], ids=["chat-page", "CHAT_PAGE=off"])
def test_home_page(make_gw: Any, standin: StandIn, chat_page: bool) -> None:
    g = make_gw(standin.url, cfg=GatewayConfig(chat_page=chat_page))
    secrets_ = [KEY_A, KEY_B, INTERNAL_KEY, standin.url, f":{standin.port}", "alice", "bob"]
    r = get(g.url + "/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert MODEL in r.text and "class='online'>online<" in r.text.replace('"', "'") and YIELDED.message not in r.text
    assert ('aria-label="Conversation"' in r.text) is chat_page and ("/_chat/chat.js" in r.text) is chat_page
    # No inline script or style, nothing from another host: the page runs only its own files.
    csp = r.headers["content-security-policy"]
    assert "script-src 'self';" in csp and "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    assert "<script>" not in r.text and "style=" not in r.text and "://" not in r.text.replace("http://", "")
    for s in secrets_:
        assert s not in r.text
    g.set(YIELDED)
    r = get(g.url + "/")
    assert r.status_code == 200
    assert MODEL in r.text and "class='offline'>offline<" in r.text.replace('"', "'") and YIELDED.message in r.text
    for s in secrets_:
        assert s not in r.text


def test_chat_page_files_are_ours_and_nothing_else_is_served(gw: GatewayServer) -> None:
    for name, kind in (("chat.js", "text/javascript"), ("markdown.js", "text/javascript"), ("chat.css", "text/css")):
        r = get(f"{gw.url}/_chat/{name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(kind) and len(r.content) > 1000, name
        assert r.headers["x-content-type-options"] == "nosniff"
    for bad in ("chat.html", "..%2Fgateway.py", "%2e%2e/pages.py", "nope.js"):
        r = get(f"{gw.url}/_chat/{bad}")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", bad


def test_metrics_count_what_was_refused(make_gw: Any, make_upstream: Any) -> None:
    up = make_upstream(reset)
    g = make_gw(up.url)
    post(g.url + CHAT, chat_body(), headers=auth("nobody-0123456789abcdef"))
    post(g.url + CHAT, chat_body(), headers=auth())
    want = [
        'watchdog_llm_requests_rejected_total{reason="auth"} 1.0',
        'watchdog_llm_requests_rejected_total{reason="upstream"} 1.0',
        # Who asked is a label: the key's consumer, empty for a request without a valid key.
        'watchdog_llm_requests_total{code="502",consumer="alice",route="/v1/chat/completions"} 1.0',
        'watchdog_llm_requests_total{code="401",consumer="",route="/v1/chat/completions"} 1.0',
    ]

    # A request is counted once its answer has gone out: the client can read it a moment earlier.
    def counted() -> str | None:
        text = g.metrics.render().decode()
        return text if all(w in text for w in want) else None

    text = wait_for(counted, 2.0, what="the refused requests to be counted")
    assert KEY_A not in text


def test_access_log_names_the_consumer(make_gw: Any, make_upstream: Any, caplog: pytest.LogCaptureFixture) -> None:
    up = make_upstream(json_ok)
    g = make_gw(up.url)
    with caplog.at_level(logging.INFO, logger="watchdog_llm.access"):
        assert post(g.url + CHAT, chat_body(), headers=auth()).status_code == 200
        assert post(g.url + CHAT, chat_body(), headers=auth("nobody-0123456789abcdef")).status_code == 401

        def lines() -> list[str] | None:
            got = [r.getMessage() for r in caplog.records if r.name == "watchdog_llm.access"]
            return got if len(got) == 2 else None

        ok, refused = wait_for(lines, 2.0, what="two access log lines")
    assert '"POST /v1/chat/completions" 200 ' in ok and ok.endswith("consumer=alice"), ok
    assert '"POST /v1/chat/completions" 401 ' in refused and refused.endswith("consumer=-"), refused
    assert KEY_A not in ok + refused
