"""Webhook delivery against a real local HTTP receiver: signatures checked by an independent verifier, retries,
timeouts, a dead or slow receiver that must not hold up the others, and a bounded queue."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from helpers import free_port

from watchdog_llm.coordination.webhook import Webhooks, parse_urls

LOG = logging.getLogger("test.webhooks")
SECRET = "s3cret-shared-with-the-receiver"


@pytest.fixture(autouse=True)
def no_leftover_processes() -> Iterator[None]:
    """These tests start no process: skip conftest's per-test process scan."""
    yield


def verify(secret: str, body: bytes, header: str | None) -> bool:
    """What a receiver does: recompute the HMAC of the raw body and compare in constant time."""
    expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return header is not None and hmac.compare_digest(expected, header)


@dataclass
class Request:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float  # time.monotonic() when it arrived


class Receiver:
    """Records every POST; `script[path]` lists what to answer, in order (the last answer repeats):
    a status code, or ("sleep", seconds) to stall before answering 200."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self.script: dict[str, list[Any]] = {}
        self.mu = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver.mu:
                    receiver.requests.append(Request(self.path, dict(self.headers), body, time.monotonic()))
                    answers = receiver.script.get(self.path, [200])
                    answer = answers.pop(0) if len(answers) > 1 else answers[0]
                if isinstance(answer, tuple):
                    time.sleep(answer[1])
                    answer = 200
                with contextlib.suppress(OSError):  # the client may have given up already
                    self.send_response(answer)
                    self.send_header("Content-Length", "0")
                    self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.block_on_close = False  # a stalled handler must not hold up the end of the tests
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def on(self, path: str) -> list[Request]:
        with self.mu:
            return [r for r in self.requests if r.path == path]


@pytest.fixture(scope="module")
def server() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()
    r.server.server_close()


@pytest.fixture
def receiver(server: Receiver) -> Receiver:
    with server.mu:
        server.requests.clear()
        server.script.clear()
    return server


def hooks(urls: list[str], secret: str = SECRET, **kw: Any) -> Webhooks:
    opts: dict[str, Any] = {"timeout": 2.0, "attempts": 3, "backoff_base": 0.01, "backoff_max": 0.05}
    return Webhooks(urls, secret, "node-7", log=LOG, rng=random.Random(1), **(opts | kw))


def deliver(h: Webhooks, *events: tuple[str, dict[str, Any]], close_timeout: float = 10.0) -> None:
    """Start delivery, emit, then close (which flushes what is queued)."""

    async def main() -> None:
        task = asyncio.create_task(h.run())
        await asyncio.sleep(0)
        for name, data in events:
            h.emit(name, data)
        await h.close(close_timeout)
        await task

    asyncio.run(main())


def test_a_delivery_is_signed_and_carries_event_time_node_and_delivery_id(receiver: Receiver) -> None:
    outcomes: list[tuple[str, str]] = []
    h = hooks([receiver.base + "/hook"], on_result=lambda outcome, event: outcomes.append((outcome, event)))
    deliver(h, ("swap_complete", {"model": "qwen-7b", "swap_id": "abc", "event": "forged", "node": "forged"}))
    [req] = receiver.on("/hook")
    assert verify(SECRET, req.body, req.headers["X-Spark-Signature"])
    assert not verify(SECRET, req.body + b" ", req.headers["X-Spark-Signature"])  # the verifier does verify
    assert not verify("another secret", req.body, req.headers["X-Spark-Signature"])
    payload = json.loads(req.body)
    assert payload["event"] == "swap_complete" and payload["node"] == "node-7"  # data cannot override these
    assert (payload["model"], payload["swap_id"]) == ("qwen-7b", "abc")
    assert abs(datetime.fromisoformat(payload["time"]).timestamp() - time.time()) < 30
    assert datetime.fromisoformat(payload["time"]).utcoffset() == UTC.utcoffset(None)
    assert req.headers["X-Spark-Event"] == "swap_complete"
    assert req.headers["X-Spark-Delivery"] == payload["delivery"] and len(payload["delivery"]) == 32
    assert req.headers["Content-Type"] == "application/json"
    assert req.headers["User-Agent"] == "watchdog-llm"
    assert (h.delivered, h.failed, h.dropped, h.queued) == (1, 0, 0, 0)
    assert outcomes == [("delivered", "swap_complete")]


def test_without_a_secret_there_is_no_signature_header(receiver: Receiver) -> None:
    deliver(hooks([receiver.base + "/plain"], secret=""), ("resumed", {}))
    [req] = receiver.on("/plain")
    assert "X-Spark-Signature" not in req.headers and json.loads(req.body)["event"] == "resumed"


def test_a_receiver_answering_500_twice_gets_it_on_the_third_try_with_the_same_delivery_id(
    receiver: Receiver,
) -> None:
    receiver.script["/flaky"] = [500, 503, 200]
    h = hooks([receiver.base + "/flaky"], attempts=5)
    deliver(h, ("swap_failed", {"model": "m", "log_tail": ["oom"]}))
    tries = receiver.on("/flaky")
    assert len(tries) == 3
    assert len({r.headers["X-Spark-Delivery"] for r in tries}) == 1
    assert len({r.body for r in tries}) == 1
    assert all(verify(SECRET, r.body, r.headers["X-Spark-Signature"]) for r in tries)
    assert (h.delivered, h.failed) == (1, 0)


def test_429_and_408_are_retried(receiver: Receiver) -> None:
    receiver.script["/busy"] = [429, 408, 204]
    h = hooks([receiver.base + "/busy"], attempts=3)
    deliver(h, ("yielded", {}))
    assert len(receiver.on("/busy")) == 3 and h.delivered == 1


@pytest.mark.parametrize("status", [400, 401, 404, 410])
def test_a_4xx_is_not_retried(receiver: Receiver, status: int) -> None:
    receiver.script["/refuses"] = [status]
    h = hooks([receiver.base + "/refuses"], attempts=5)
    deliver(h, ("crashed", {}))
    assert len(receiver.on("/refuses")) == 1
    assert (h.delivered, h.failed) == (0, 1)


def test_a_receiver_that_is_down_is_retried_then_counted_as_failed(caplog: pytest.LogCaptureFixture) -> None:
    outcomes: list[str] = []
    h = hooks(
        [f"http://127.0.0.1:{free_port()}/x?token=SECRET-IN-URL"], attempts=3, on_result=lambda o, e: outcomes.append(o)
    )
    started = time.monotonic()
    deliver(h, ("lock_forced", {"holder": "alice"}))
    assert time.monotonic() - started < 5
    assert (h.delivered, h.failed, h.dropped) == (0, 1, 0)
    assert outcomes == ["failed"]
    failures = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("lock_forced" in m and "after 3 tries" in m for m in failures)
    assert not any("SECRET-IN-URL" in r.getMessage() for r in caplog.records)  # URLs are masked in logs


def test_a_slow_receiver_times_out_and_does_not_delay_another_url(receiver: Receiver) -> None:
    receiver.script["/slow"] = [("sleep", 1.5)]
    h = hooks([receiver.base + "/slow", receiver.base + "/fast"], timeout=0.4, attempts=2)
    emitted = 0.0

    async def main() -> None:
        nonlocal emitted
        task = asyncio.create_task(h.run())
        await asyncio.sleep(0)
        emitted = time.monotonic()
        h.emit("swap_complete", {"model": "m"})
        h.emit("resumed", {"model": "m"})
        await h.close(10)
        await task

    asyncio.run(main())
    fast = receiver.on("/fast")
    assert [json.loads(r.body)["event"] for r in fast] == ["swap_complete", "resumed"]
    # Both reached the healthy receiver while the slow one was still stalling its first try.
    assert fast[-1].at - emitted < 0.4
    slow = receiver.on("/slow")
    assert len(slow) == 4  # two events x two tries each, each cut off at the timeout
    assert (h.delivered, h.failed, h.dropped) == (2, 2, 0)


def test_a_full_queue_drops_and_counts_with_one_warning(receiver: Receiver, caplog: pytest.LogCaptureFixture) -> None:
    outcomes: list[str] = []
    h = hooks([receiver.base + "/q"], queue_size=2, on_result=lambda o, e: outcomes.append(o))
    for i in range(5):  # nothing delivers yet: the queue fills
        h.emit("yielded", {"n": i})
    assert (h.queued, h.dropped) == (2, 3)
    assert outcomes == ["dropped"] * 3
    drops = [r for r in caplog.records if "dropped" in r.getMessage()]
    assert len(drops) == 1 and "queue full (2)" in drops[0].getMessage()  # a flood of drops is one warning
    deliver(h)  # once delivery runs, what was queued goes out
    assert [json.loads(r.body)["n"] for r in receiver.on("/q")] == [0, 1]
    assert (h.delivered, h.dropped) == (2, 3)


def test_close_gives_up_on_a_stalled_receiver_within_its_timeout_and_counts_the_rest_dropped(
    receiver: Receiver,
) -> None:
    receiver.script["/stall"] = [("sleep", 3)]
    h = hooks([receiver.base + "/stall"], timeout=5.0)

    async def main() -> float:
        task = asyncio.create_task(h.run())
        for i in range(3):
            h.emit("crashed", {"n": i})
        await asyncio.sleep(0.2)  # the first is now in flight
        started = time.monotonic()
        await h.close(0.3)
        await task
        h.emit("too_late", {})  # after close: dropped, never raises
        return time.monotonic() - started

    assert asyncio.run(main()) < 1.5
    assert (h.delivered, h.failed, h.dropped, h.queued) == (0, 0, 4, 0)


def test_emit_from_another_thread_is_delivered(receiver: Receiver) -> None:
    h = hooks([receiver.base + "/thread"])

    async def main() -> None:
        task = asyncio.create_task(h.run())
        await asyncio.sleep(0.05)  # run() is waiting for work
        t = threading.Thread(target=h.emit, args=("resumed", {"from": "thread"}))
        t.start()
        t.join()
        for _ in range(200):
            if h.delivered:
                break
            await asyncio.sleep(0.01)
        await h.close(5)
        await task

    asyncio.run(main())
    assert h.delivered == 1 and json.loads(receiver.on("/thread")[0].body)["from"] == "thread"


def test_emit_never_raises_on_a_payload_that_is_not_json_or_a_bad_event_name(receiver: Receiver) -> None:
    h = hooks([receiver.base + "/j"])
    h.emit("crashed", {"ms": float("nan")})
    h.emit("crashed", {"when": datetime(2030, 1, 1, tzinfo=UTC)})  # stringified, not lost
    h.emit("bad\r\nX-Injected: 1", {})  # the event name goes into a header: refused
    assert (h.dropped, h.queued) == (2, 1)
    deliver(h)
    assert json.loads(receiver.on("/j")[0].body)["when"].startswith("2030-01-01")


@pytest.mark.parametrize(
    ("urls", "entry"),
    [(["ftp://host/x"], "entry 1"), (["http://ok/", "hooks.example.com/T/B/X"], "entry 2"),
     (["http:///path"], "entry 1"), (["http://host:99999/"], "entry 1")],
)  # fmt: skip
def test_bad_urls_are_refused_at_construction_naming_the_entry(urls: list[str], entry: str) -> None:
    with pytest.raises(ValueError, match=rf"^WEBHOOK_URLS: {entry} "):
        hooks(urls)


def test_parse_urls_splits_on_commas_and_whitespace() -> None:
    assert parse_urls(" http://a/x, https://b:8443/y\n http://c ,,") == ["http://a/x", "https://b:8443/y", "http://c"]
    assert parse_urls("") == []


def test_no_urls_means_emit_is_a_no_op_and_run_ends_on_close() -> None:
    h = hooks([])
    assert not h.enabled
    deliver(h, ("resumed", {}))
    assert (h.delivered, h.failed, h.dropped) == (0, 0, 0)
