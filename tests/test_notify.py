"""Notifier with real apprise over real HTTP, against a local server that reads requests the way ntfy does."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from watchdog_llm.notify import (
    BUFFER_LIMIT,
    Message,
    Notifier,
    NotifyConfigError,
    mask_url,
    parse_urls,
    send_once,
)

NODE = "node1"
LOG = logging.getLogger("test.notify")


@dataclass(frozen=True)
class Received:
    at: float  # time.monotonic() on arrival
    path: str
    headers: dict[str, str]
    topic: str
    title: str
    message: str
    priority: str  # as sent; "default" when the request names none (ntfy's default, 3)


class NtfyStub:
    """Records each POST as ntfy would read it.

    apprise's ntfy plugin POSTs JSON {"topic", "title", "message"} to the server root and puts the priority in
    an X-Priority header, left out for "default"; ntfy also takes POST /<topic> with Title headers. A
    `delay` holds every answer back (a hung server) until `release` is set."""

    def __init__(self, delay: float = 0.0) -> None:
        self.requests: list[Received] = []
        self.delay = delay
        self.release = threading.Event()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                at = time.monotonic()
                raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                path = self.path.split("?")[0]
                h = self.headers
                if h.get("Content-Type", "").startswith("application/json"):
                    data = json.loads(raw)
                    topic, priority = data.get("topic") or path.strip("/"), data.get("priority")
                    title, message = data.get("title", ""), data.get("message", "")
                else:
                    topic, message, priority = path.strip("/"), raw.decode(), None
                    title = h.get("X-Title") or h.get("Title") or ""
                priority = priority or h.get("X-Priority") or h.get("Priority") or "default"
                headers = dict(self.headers.items())
                stub.requests.append(Received(at, path, headers, topic, title, message, str(priority)))
                if stub.delay:
                    stub.release.wait(stub.delay)
                body = b'{"id":"stub"}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True  # a held-back answer must not hold up teardown
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def url(self, topic: str = "alerts", userinfo: str = "") -> str:
        return f"ntfy://{userinfo}127.0.0.1:{self.port}/{topic}"

    def stop(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


class Records(logging.Handler):
    """Stands in for the daemon's log handlers, which sit on the root logger.

    Not caplog: pytest also hooks its capture onto loggers that do not propagate, apprise's included, so
    caplog shows records that a daemon never sees."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    @property
    def text(self) -> str:
        return "\n".join(f"{r.levelname} {r.name} {r.getMessage()}" for r in self.records)


@pytest.fixture
def daemon_log() -> Iterator[Records]:
    handler, root = Records(), logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield handler
    root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture
def ntfy() -> Iterator[NtfyStub]:
    stub = NtfyStub()
    yield stub
    stub.stop()


@pytest.fixture
def hung() -> Iterator[NtfyStub]:
    stub = NtfyStub(delay=10.0)
    yield stub
    stub.stop()


def dead_url(scheme: str = "ntfy", userinfo: str = "") -> str:
    """A URL with nothing listening behind it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"{scheme}://{userinfo}127.0.0.1:{port}/alerts"


async def until(cond: Callable[[], bool], timeout: float = 3.0) -> bool:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            return False
        await asyncio.sleep(0.01)
    return True


def msg(n: int | str, kind: str = "yielded", priority: str = "default") -> Message:
    return Message(kind, f"event {n}", f"body {n}", priority)


def test_one_message_prefixed_with_node_and_priority(ntfy: NtfyStub) -> None:
    async def scenario() -> Notifier:
        n = Notifier([ntfy.url()], coalesce=0.4, node=NODE, log=LOG)
        task = asyncio.create_task(n.run())
        n.submit(Message("yielded", "GPUs yielded", "job 123 took GPU 0", priority="high"))
        assert await until(lambda: len(ntfy.requests) == 1)
        await n.close()
        await task
        return n

    n = asyncio.run(scenario())
    [r] = ntfy.requests
    assert (r.path, r.topic, r.title, r.message, r.priority) == (
        "/",
        "alerts",
        "[node1] GPUs yielded",
        "job 123 took GPU 0",
        "high",
    )
    assert r.headers["X-Priority"] == "high"
    assert (n.sent, n.failed, n.dropped) == (1, 0, 0)


def test_coalesce_zero_sends_each_message_with_its_priority(ntfy: NtfyStub) -> None:
    async def scenario() -> None:
        n = Notifier([ntfy.url()], coalesce=0, node=NODE, log=LOG)
        task = asyncio.create_task(n.run())
        for i, prio in enumerate(["min", "default", "max"]):
            n.submit(msg(i, priority=prio))
        assert await until(lambda: len(ntfy.requests) == 3)
        await n.close()
        await task

    asyncio.run(scenario())
    assert [r.title for r in ntfy.requests] == ["[node1] event 0", "[node1] event 1", "[node1] event 2"]
    assert [r.priority for r in ntfy.requests] == ["min", "default", "max"]
    assert "X-Priority" not in ntfy.requests[1].headers  # apprise leaves "default" to the server


def test_burst_is_one_immediate_message_then_one_coalesced(ntfy: NtfyStub) -> None:
    async def scenario() -> float:
        n = Notifier([ntfy.url()], coalesce=0.4, node=NODE, log=LOG)
        task = asyncio.create_task(n.run())
        start = time.monotonic()
        for i, prio in enumerate(["default", "low", "high", "default", "low"], 1):
            n.submit(msg(i, priority=prio))
        assert await until(lambda: len(ntfy.requests) == 2)
        await n.close()
        await task
        return start

    start = asyncio.run(scenario())
    assert len(ntfy.requests) == 2
    first, merged = ntfy.requests
    assert (first.title, first.message, first.priority) == ("[node1] event 1", "body 1", "default")
    assert first.at - start < 0.3
    assert merged.at - first.at >= 0.35  # held for the window
    assert merged.title == "[node1] 4 events"
    assert merged.message.splitlines() == [f"event {i}: body {i}" for i in range(2, 6)]
    assert merged.priority == "high"


def test_failed_flushes_the_buffer_at_once(ntfy: NtfyStub) -> None:
    async def scenario() -> None:
        n = Notifier([ntfy.url()], coalesce=30, node=NODE, log=LOG)
        task = asyncio.create_task(n.run())
        n.submit(msg(1))
        assert await until(lambda: len(ntfy.requests) == 1)
        n.submit(msg(2, kind="resumed"))
        n.submit(Message("failed", "vLLM failed", "5 fast failures\nlast exit 1", priority="max"))
        assert await until(lambda: len(ntfy.requests) == 2, timeout=2)  # far inside the 30 s window
        await n.close()
        await task

    asyncio.run(scenario())
    flushed = ntfy.requests[1]
    assert flushed.title == "[node1] 2 events"
    assert flushed.message.splitlines() == ["event 2: body 2", "vLLM failed: 5 fast failures last exit 1"]
    assert flushed.priority == "max"


def test_close_flushes_without_waiting_for_the_window(ntfy: NtfyStub) -> None:
    async def scenario() -> float:
        n = Notifier([ntfy.url()], coalesce=30, node=NODE, log=LOG)
        task = asyncio.create_task(n.run())
        n.submit(msg(1))
        assert await until(lambda: len(ntfy.requests) == 1)
        n.submit(msg(2))
        start = time.monotonic()
        await n.close(timeout=5)
        took = time.monotonic() - start
        await task
        n.submit(msg(3))  # after close: counted, not sent
        assert n.dropped == 1
        return took

    assert asyncio.run(scenario()) < 1.0
    assert [r.title for r in ntfy.requests] == ["[node1] event 1", "[node1] event 2"]


def test_close_drains_even_if_run_never_started(ntfy: NtfyStub) -> None:
    async def scenario() -> None:
        n = Notifier([ntfy.url()], coalesce=30, node=NODE, log=LOG)
        n.submit(Message("stopped", "watchdog stopped", "SIGTERM"))
        await n.close(timeout=5)
        assert n.sent == 1

    asyncio.run(scenario())
    assert [r.title for r in ntfy.requests] == ["[node1] watchdog stopped"]


def test_buffer_is_bounded(ntfy: NtfyStub) -> None:
    extra = 10

    async def scenario() -> Notifier:
        n = Notifier([ntfy.url()], coalesce=30, node=NODE, log=LOG)
        task = asyncio.create_task(n.run())
        n.submit(msg(0))
        assert await until(lambda: len(ntfy.requests) == 1)
        for i in range(1, BUFFER_LIMIT + extra + 1):
            n.submit(msg(i, priority="max" if i == 2 else "low"))  # event 2 is pushed out
        await n.close()
        await task
        return n

    n = asyncio.run(scenario())
    merged = ntfy.requests[1]
    lines = merged.message.splitlines()
    assert merged.title == f"[node1] {BUFFER_LIMIT + extra} events"
    assert lines[0] == f"event {extra + 1}: body {extra + 1}"
    assert lines[-1] == f"and {extra} more"
    assert len(lines) == BUFFER_LIMIT + 1
    assert merged.priority == "max"  # highest among all of them, the dropped ones included
    assert n.dropped == extra


def test_server_down_is_logged_and_counted(daemon_log: Records) -> None:
    url = dead_url()

    async def scenario() -> tuple[Notifier, float]:
        n = Notifier([url], coalesce=0.3, node=NODE, log=LOG)
        task = asyncio.create_task(n.run())
        start = time.monotonic()
        n.submit(msg(1, kind="failed", priority="max"))
        took = time.monotonic() - start
        assert await until(lambda: n.failed == 1)
        await n.close()
        await task
        return n, took

    n, took = asyncio.run(scenario())
    assert took < 0.05
    assert (n.sent, n.failed) == (0, 1)
    warnings = [r for r in daemon_log.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1  # ours, once; apprise's own record does not reach the daemon's handlers
    [w] = warnings
    assert w.name == LOG.name and w.exc_info is None
    assert url in w.getMessage() and "[node1] event 1" in w.getMessage()
    assert "Connection error" in w.getMessage()  # apprise's reason, carried over


def test_hung_server_never_blocks_submit_and_close_is_bounded(hung: NtfyStub) -> None:
    async def scenario() -> tuple[Notifier, float, float]:
        n = Notifier([hung.url()], coalesce=0.3, node=NODE, log=LOG)
        task = asyncio.create_task(n.run())
        start = time.monotonic()
        n.submit(msg(1))
        submit_took = time.monotonic() - start
        assert await until(lambda: len(hung.requests) == 1)  # in flight; the answer is 10 s away
        start = time.monotonic()
        n.submit(Message("stopped", "watchdog stopped", "SIGTERM", priority="high"))
        submit_took = max(submit_took, time.monotonic() - start)
        start = time.monotonic()
        await n.close(timeout=1)
        close_took = time.monotonic() - start
        assert task.done()
        hung.release.set()  # let the abandoned worker thread finish, so asyncio.run exits at once
        return n, submit_took, close_took

    n, submit_took, close_took = asyncio.run(scenario())
    assert submit_took < 0.05
    assert close_took < 1.5
    assert n.dropped == 1  # "stopped" never got its turn


def test_hung_url_does_not_hold_up_other_urls(ntfy: NtfyStub, hung: NtfyStub, daemon_log: Records) -> None:
    async def scenario() -> Notifier:
        n = Notifier([hung.url(), ntfy.url()], coalesce=0.3, node=NODE, log=LOG)
        task = asyncio.create_task(n.run())
        n.submit(msg(1))
        assert await until(lambda: len(ntfy.requests) == 1, timeout=1)  # while hung still holds its copy
        n.submit(msg(2))
        # apprise's 4 s read timeout frees the queue; then event 2 goes out.
        assert await until(lambda: len(ntfy.requests) == 2, timeout=8)
        hung.release.set()
        await n.close(timeout=2)
        await task
        return n

    n = asyncio.run(scenario())
    assert [r.title for r in ntfy.requests] == ["[node1] event 1", "[node1] event 2"]
    assert n.failed == 1 and n.sent >= 2
    assert any(hung.url() in r.getMessage() and r.levelno == logging.WARNING for r in daemon_log.records)


def test_bad_url_is_a_config_error_naming_it() -> None:
    with pytest.raises(NotifyConfigError, match="notaservice://x") as e:
        parse_urls(["ntfy://127.0.0.1/ok", "notaservice://x"])
    assert "\n" not in str(e.value)
    with pytest.raises(NotifyConfigError, match="notaservice://x"):
        Notifier(["notaservice://x"], coalesce=1, node=NODE, log=LOG)
    with pytest.raises(NotifyConfigError, match="no valid ntfy topic"):
        parse_urls(["ntfy://127.0.0.1:9/"])


def test_token_never_logged(ntfy: NtfyStub, daemon_log: Records, capfd: pytest.CaptureFixture[str]) -> None:
    secret = "SECRETTOKEN"
    down = dead_url("ntfys", f"{secret}@")  # fails: TLS to a closed port

    async def scenario() -> Notifier:
        n = Notifier([ntfy.url(userinfo=f"{secret}@"), down], coalesce=0.3, node=NODE, log=LOG)
        task = asyncio.create_task(n.run())
        n.submit(msg(1))
        assert await until(lambda: n.sent + n.failed == 2)
        await n.close()
        await task
        return n

    n = asyncio.run(scenario())
    assert (n.sent, n.failed) == (1, 1)
    # A lone user is a token (design doc): sent as a bearer token, not as basic auth "SECRETTOKEN:None".
    assert ntfy.requests[0].headers["Authorization"] == f"Bearer {secret}"
    assert down.replace(f"{secret}@", "***@") in daemon_log.text
    with pytest.raises(NotifyConfigError) as e:
        parse_urls([f"nfty://{secret}@ntfy.example.org/alerts"])  # typo in the scheme
    assert "nfty://***@" in str(e.value)
    out, err = capfd.readouterr()
    for text in (daemon_log.text, str(e.value), out, err):
        assert secret not in text


def test_mask_url() -> None:
    assert mask_url("ntfys://tk_abc123@ntfy.example.org/alerts") == "ntfys://***@ntfy.example.org/alerts"
    masked = mask_url("ntfy://me:pw@h:8080/t?token=abc&priority=max")
    assert masked == "ntfy://***@h:8080/t?token=***&priority=max"
    assert "SECRET" not in mask_url("tgram://123456789:SECRETBOT/12345")
    assert "SECRET" not in mask_url("discord://4174216298/SECRETWEBHOOK")


def test_url_priority_wins_over_message_priority(ntfy: NtfyStub) -> None:
    async def scenario() -> bool:
        return await send_once([ntfy.url() + "?priority=min"], msg(1, priority="max"), log=LOG, node=NODE)

    assert asyncio.run(scenario())
    assert ntfy.requests[0].priority == "min"


def test_send_once(ntfy: NtfyStub, daemon_log: Records) -> None:
    test = Message("test", "test notification", "from notify-test", priority="high")
    hook = f"json://127.0.0.1:{ntfy.port}/hook"  # another service: no priority parameter added

    assert asyncio.run(send_once([ntfy.url(), hook], test, log=LOG, node=NODE))
    by_path = {r.path: r for r in ntfy.requests}
    test_title = "[node1] test notification"
    assert (by_path["/"].title, by_path["/"].priority) == (test_title, "high")
    assert (by_path["/hook"].title, by_path["/hook"].message) == (test_title, "from notify-test")
    assert "X-Priority" not in by_path["/hook"].headers

    assert not asyncio.run(send_once([dead_url()], test, log=LOG))
    assert "failed" in daemon_log.text
    assert not asyncio.run(send_once([], test, log=LOG))


def test_no_urls_is_a_no_op(daemon_log: Records) -> None:

    async def scenario() -> Notifier:
        n = Notifier([], coalesce=0.3, node=NODE, log=LOG)
        task = asyncio.create_task(n.run())
        n.submit(msg(1, kind="failed"))
        await n.close(timeout=1)
        await task
        return n

    n = asyncio.run(scenario())
    assert not n.enabled
    assert (n.sent, n.failed, n.dropped) == (0, 0, 0)
    assert "none configured" in daemon_log.text


def test_message_priority_is_checked() -> None:
    with pytest.raises(ValueError, match="urgent"):
        Message("failed", "t", "b", priority="urgent")
