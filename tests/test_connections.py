"""What a neighbour on the node can do with connections alone: hold many, send nothing, send a head
one byte at a time. Raw sockets against the real gateway listener (issue: hostile neighbour)."""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Callable, Iterator

import pytest
from gateway_harness import GatewayServer, read_response

from watchdog_llm.http.server import ACCEPT_BACKLOG, FD_RESERVE, ConnLimits, RateLimitedLog, fit_to_fds

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def gw_with() -> Iterator[Callable[[ConnLimits], GatewayServer]]:
    """Gateways with their own connection limits; /health is answered by the gateway itself."""
    made: list[GatewayServer] = []

    def make(limits: ConnLimits) -> GatewayServer:
        g = GatewayServer("http://127.0.0.1:9", limits=limits)
        made.append(g)
        return g

    yield make
    for g in made:
        g.close()


def connect(port: int, timeout: float = 5.0, source: str = "127.0.0.1") -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0))
    return s


def closed_by_server(s: socket.socket, within: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes, and how long that took."""
    s.settimeout(within)
    t0 = time.monotonic()
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data, time.monotonic() - t0


def health(port: int) -> int:
    with connect(port) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        return read_response(s).status


def test_connections_above_the_cap_get_503_and_are_closed_at_once(gw_with, caplog) -> None:
    g = gw_with(ConnLimits(max_connections=20, per_peer=20, head_timeout=30))
    held = [connect(g.port) for _ in range(20)]
    try:
        time.sleep(0.2)  # all accepted
        refused = [connect(g.port) for _ in range(30)]
        for s in refused:
            data, took = closed_by_server(s, 5)
            head, _, body = data.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 503"), data[:200]
            assert b"retry-after: 1" in head.lower()
            err = json.loads(body)["error"]
            assert err["code"] == "too_many_connections" and err["retryable"] is True
            assert took < 1.0
            s.close()
        lines = [r for r in caplog.records if "connection refused" in r.getMessage()]
        assert 1 <= len(lines) <= 2, "a flood of refusals is one log line, not one each"
    finally:
        for s in held:
            s.close()
    # Closed connections free their places: the gateway answers again.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and g.listener is not None and g.listener.guard.open:
        time.sleep(0.02)
    assert health(g.port) in (200, 503)


def test_one_address_cannot_take_every_place(gw_with) -> None:
    g = gw_with(ConnLimits(max_connections=50, per_peer=5, head_timeout=30))
    mine = [connect(g.port, source="127.0.0.2") for _ in range(5)]
    try:
        time.sleep(0.2)
        extra = connect(g.port, source="127.0.0.2")
        data, _ = closed_by_server(extra, 5)
        assert data.startswith(b"HTTP/1.1 503") and b"MAX_CONNECTIONS_PER_PEER" not in data  # no setting names leak
        extra.close()
        assert health(g.port) in (200, 503), "another address still gets in"
    finally:
        for s in mine:
            s.close()


def test_a_connection_that_sends_nothing_is_closed_after_head_timeout(gw_with) -> None:
    g = gw_with(ConnLimits(head_timeout=0.5))
    with connect(g.port) as s:
        data, took = closed_by_server(s, 5)
    assert data == b"" and 0.4 < took < 2.0, (data, took)


def test_a_head_sent_one_byte_at_a_time_gets_408(gw_with) -> None:
    g = gw_with(ConnLimits(head_timeout=1.0))
    head = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100
    with connect(g.port) as s:
        t0 = time.monotonic()
        got = b""
        s.settimeout(0.1)
        for i in range(len(head)):
            try:
                s.sendall(head[i : i + 1])
            except (BrokenPipeError, ConnectionResetError):
                break
            try:
                got += s.recv(65536)
                if got:
                    break
            except TimeoutError:
                continue
        data, _ = closed_by_server(s, 5)
        got += data
        took = time.monotonic() - t0
    assert got.startswith(b"HTTP/1.1 408"), got[:200]
    assert json.loads(got.partition(b"\r\n\r\n")[2])["error"]["code"] == "head_timeout"
    assert 0.9 < took < 3.0, took


def test_a_complete_request_is_not_cut_by_the_head_timeout(gw_with) -> None:
    """The head timeout is for heads only: a keep-alive connection carries requests after it."""
    g = gw_with(ConnLimits(head_timeout=0.5, keepalive_timeout=5))
    with connect(g.port) as s:
        for _ in range(3):
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_response(s).status in (200, 503)
            time.sleep(0.7)  # idle past HEAD_TIMEOUT between requests: keep-alive's business, not the head timeout's


def test_an_idle_keepalive_connection_is_closed(gw_with) -> None:
    g = gw_with(ConnLimits(keepalive_timeout=1))
    with connect(g.port) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        read_response(s)
        data, took = closed_by_server(s, 5)
    assert data == b"" and took < 2.5


def test_caps_are_lowered_to_what_the_file_limit_allows() -> None:
    limits, why = fit_to_fds(ConnLimits(max_connections=1024, per_peer=256), 1024)
    room = (1024 - FD_RESERVE - 2 * ACCEPT_BACKLOG) // 3
    assert limits.max_connections == room and limits.per_peer == room
    assert why is not None and "MAX_CONNECTIONS=1024" in why and "RLIMIT_NOFILE" in why
    same, why = fit_to_fds(ConnLimits(max_connections=1024), 1 << 20)
    assert same.max_connections == 1024 and why is None


def test_rate_limited_log_says_how_many_it_left_out(caplog) -> None:
    log = logging.getLogger("test.ratelimit")
    limited = RateLimitedLog(log, every=0.2)
    with caplog.at_level(logging.WARNING, "test.ratelimit"):
        for _ in range(1000):
            limited.warning("k", "refused")
        time.sleep(0.25)
        limited.warning("k", "refused")
    msgs = [r.getMessage() for r in caplog.records if r.name == "test.ratelimit"]
    assert msgs == ["refused", "refused (and 999 more like it in the last 0 s)"]
