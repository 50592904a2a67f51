"""The operator dashboard on the admin listener: sign-in with `watchdog-llm dashboard`'s one-time
link, the session cookie and its CSRF token, the live event stream, and the page itself in a real
Chromium — against the real daemon (stand-in models), through the command's real TCP forward."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from browser_harness import needs_browser, screenshot
from daemon_harness import DaemonProc, env_with, start
from helpers import TEST_KEY, free_port, wait_for
from playwright.sync_api import Browser, expect

CATALOG = """\
default: alpha
models:
  - name: alpha
    model: standin/alpha
    description: the first stand-in
  - name: beta
    model: standin/beta
    env:
      STANDIN_STARTUP_S: "0.5"
"""


@pytest.fixture
def daemon(daemons: list[DaemonProc], daemon_env: dict[str, str], tmp_path: Path) -> DaemonProc:
    (tmp_path / "models.yaml").write_text(CATALOG)
    d = start(daemons, env_with(daemon_env, MODELS=str(tmp_path / "models.yaml"), MODEL_NAME="", RESUME_COOLDOWN="1"))
    d.wait_state("serving")
    return d


class Dashboard:
    """`watchdog-llm dashboard`, running: its printed lines, its sign-in link, its forward."""

    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "watchdog_llm", "dashboard", *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.lines: list[str] = []
        while not any(line.startswith(("Forwarding", "From a laptop")) for line in self.lines):
            line = self.proc.stdout.readline()
            assert line, f"dashboard exited {self.proc.wait()}: {self.lines} {self.proc.stderr.read()}"  # type: ignore[union-attr]
            self.lines.append(line.rstrip("\n"))
        self.link = next(line.split(" ", 1)[1] for line in self.lines if line.startswith("Dashboard: "))
        self.base = self.link.split("/login", 1)[0]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(10)


@pytest.fixture
def dashboard(daemon: DaemonProc) -> Iterator[Dashboard]:
    dash = Dashboard(daemon.env, "--port", "0")
    yield dash
    dash.stop()


def signed_in(dash: Dashboard) -> tuple[httpx.Client, str]:
    """A client with the session cookie, and the page's CSRF token."""
    c = httpx.Client(base_url=dash.base, timeout=10, trust_env=False)
    r = c.get(dash.link.removeprefix(dash.base))
    assert r.status_code == 303 and r.headers["location"] == "/", (r.status_code, r.text)
    page = c.get("/")
    assert page.status_code == 200
    m = re.search(r'<meta name="csrf-token" content="([^"]+)">', page.text)
    assert m, page.text[:500]
    return c, m.group(1)


def test_the_link_signs_in_once_and_the_session_needs_its_csrf_token(daemon: DaemonProc, dashboard: Dashboard) -> None:
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/login\?token=[\w-]{20,}", dashboard.link), dashboard.lines
    port = dashboard.base.rsplit(":", 1)[1]
    assert f"ssh -N -L {port}:127.0.0.1:{port} testnode" in "\n".join(dashboard.lines)
    # Through the forward, nothing without a session: other users of the node can reach 127.0.0.1.
    with httpx.Client(base_url=dashboard.base, timeout=10, trust_env=False) as anon:
        r = anon.get("/api/status")
        assert r.status_code == 401 and r.json()["error"] == "unauthorized"
        assert anon.post("/api/swap", json={"model": "beta"}).status_code == 401
        r = anon.get("/")
        assert r.status_code == 401 and "watchdog-llm dashboard" in r.text
    c, csrf = signed_in(dashboard)
    with contextlib.closing(c):
        set_cookie = list(c.cookies.jar)
        assert len(set_cookie) == 1 and set_cookie[0].name == "wdl_session"
        assert c.get("/api/status").json()["state"] == "serving"
        # The same link again, in another browser: refused, and the page says what to do.
        with httpx.Client(base_url=dashboard.base, timeout=10, trust_env=False) as other:
            r = other.get(dashboard.link.removeprefix(dashboard.base))
            assert r.status_code == 401 and "does not work" in r.text and "set-cookie" not in r.headers
            assert other.get("/login?token=made-up").status_code == 401
        # A state-changing request with the cookie alone (what a cross-site form could send): refused.
        lock = {"holder": "ops", "ttl_s": 60, "reason": "maintenance"}
        r = c.post("/api/swap/lock", json=lock)
        assert r.status_code == 403 and r.json()["error"] == "csrf_failed", r.text
        assert c.get("/api/swap/lock").json()["locked"] is False
        r = c.post("/api/swap/lock", json=lock, headers={"X-CSRF-Token": csrf})
        assert r.status_code == 200 and r.json()["holder"] == "ops"
        r = c.delete("/api/swap/lock", params={"force": "true"}, headers={"X-CSRF-Token": csrf})
        assert r.status_code == 200 and r.json()["locked"] is False
        # Signing out ends the session for good.
        assert c.post("/logout", headers={"X-CSRF-Token": csrf}).status_code == 200
        c.cookies.clear()
    log = daemon.log()
    assert "dashboard: signed in from" in log and "sign-in refused" in log and "no valid CSRF token" in log
    assert dashboard.link.split("token=")[1] not in log  # the token itself is never logged
    assert dashboard.stop() == 0


def test_the_cookie_does_not_open_the_public_listener(daemon: DaemonProc, dashboard: Dashboard) -> None:
    c, _ = signed_in(dashboard)
    public = daemon.status()["public_url"]
    with contextlib.closing(c), httpx.Client(base_url=public, timeout=10, trust_env=False, cookies=c.cookies) as pub:
        for path in ("/api/status", "/api/events", "/login", "/_dash/dashboard.js", "/docs"):
            assert pub.get(path).status_code == 404, path


def events(
    client: httpx.Client,
    url: str,
    want: int,
    headers: dict[str, str] | None = None,
    got: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """The first `want` server-sent events of the stream at `url`, into `got` as they come."""
    got = [] if got is None else got
    with client.stream("GET", url, headers=headers or {}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        ev: dict[str, Any] = {}
        for line in r.iter_lines():
            if line.startswith(("id: ", "event: ", "data: ")):
                k, _, v = line.partition(": ")
                ev[k] = json.loads(v) if k == "data" else v
            elif line == "" and "event" in ev:
                got.append(ev)
                ev = {}
                if len(got) == want:
                    break
    return got


def test_the_event_stream_tells_a_yield_as_it_happens_and_replays_after_a_reconnect(daemon: DaemonProc) -> None:
    sock = str(daemon.state_dir / "admin.sock")
    transport = httpx.HTTPTransport(uds=sock)
    with httpx.Client(transport=transport, base_url="http://admin", timeout=15, trust_env=False) as c:
        seen: list[dict[str, Any]] = []

        def read() -> None:
            with contextlib.suppress(httpx.HTTPError):  # the client closes under it at the end
                events(c, "/api/events", 40, got=seen)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        wait_for(lambda: seen or None, 5)  # subscribed: the first event, the whole picture, has come
        daemon.start_job("job_4242")
        daemon.wait_state("yielded")

        def names() -> list[str]:
            return [e["event"] for e in list(seen)]

        wait_for(lambda: "yielded" in names() or None, 10)
        first = seen[0]
        assert first["event"] == "status" and first["data"]["state"] == "serving" and "id" not in first
        yielded = next(e for e in seen if e["event"] == "yielded")
        assert yielded["data"]["job"] == "job_4242" and yielded["data"]["stop_ms"] is not None, yielded
        states = [e["data"]["state"] for e in seen if e["event"] == "status"]
        assert "yielding" in states or "yielded" in states, states
        notices = [e["data"]["kind"] for e in seen if e["event"] == "notice"]
        assert "yielded" in notices, notices
        # A reader that lost its connection comes back with Last-Event-ID: what it missed, in order.
        last = int(yielded["id"])
        before = [e for e in seen if "id" in e and int(e["id"]) > last - 3]
        replay = events(c, "/api/events", 3, {"Last-Event-ID": str(last - 3)})
        assert [e["id"] for e in replay] == [e["id"] for e in before[:3]]
        # A new reader may ask for what happened lately first (the dashboard's timeline): no status among it.
        fresh = events(c, "/api/events?history=2", 3)
        assert [e["event"] for e in fresh][-1] == "status" and "status" not in [e["event"] for e in fresh[:-1]]
        assert any(e["event"] == "notice" and e["data"]["kind"] == "yielded" for e in fresh[:-1]), fresh
        assert c.get("/api/events?history=201").status_code == 422


def test_logs_gpus_requests_and_the_api_reference_from_the_admin_socket(daemon: DaemonProc) -> None:
    public = daemon.status()["public_url"]
    body = {"model": "standin/alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    for key in (TEST_KEY, TEST_KEY, "not-a-key"):
        httpx.post(public + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, json=body)
    transport = httpx.HTTPTransport(uds=str(daemon.state_dir / "admin.sock"))
    with httpx.Client(transport=transport, base_url="http://admin", timeout=10, trust_env=False) as c:
        by = c.get("/api/requests").json()["consumers"]
        assert by["test"]["requests"] == 2 and by["test"]["by_class"] == {"2xx": 2}, by
        assert by["test"]["latency_count"] == 2 and by["test"]["latency_mean_ms"] > 0, by
        assert by[""]["by_class"] == {"4xx": 1} and by[""]["latency_count"] == 0, by  # refused: never sent on
        lines = c.get("/api/logs/daemon", params={"lines": 5}).json()["lines"]
        assert 1 <= len(lines) <= 5
        model = c.get("/api/logs/model").json()["lines"]
        assert any("standin" in line.lower() or "startup" in line.lower() for line in model), model[-5:]
        r = c.get("/api/logs/secrets")
        assert r.status_code == 404 and "daemon, model, tunnel" in r.json()["message"]
        assert c.get("/api/logs/daemon", params={"lines": 0}).status_code == 422
        gpus = c.get("/api/gpus").json()
        assert gpus["gpus"] == [] and gpus["error"]  # no GPU view in this test: said, not an error status
        docs = c.get("/docs")
        assert docs.status_code == 200 and "script-src 'self'" in docs.headers["content-security-policy"]
        assert "cdn" not in docs.text.lower() and "//" not in re.sub(r"<!doctype[^>]*>", "", docs.text).replace(
            "://", ""
        )
        paths = c.get("/openapi.json").json()["paths"]
        assert {"/api/events", "/api/logs/{name}", "/api/gpus", "/api/dashboard/login"} <= set(paths)
        assert c.get("/redoc").status_code == 404


def test_with_admin_host_the_command_prints_the_link_and_the_ssh_line(daemons, daemon_env) -> None:
    port = free_port()
    token = "admin-token-for-the-dashboard-test"
    env = env_with(daemon_env, ADMIN_HOST="127.0.0.1", ADMIN_PORT=str(port), ADMIN_TOKEN=token)
    d = start(daemons, env)
    d.wait_state("serving")
    dash = Dashboard(env)
    assert dash.proc.wait(10) == 0  # nothing to forward: it printed and ended
    assert dash.base == f"http://127.0.0.1:{port}"
    assert f"ssh -N -L {port}:127.0.0.1:{port} testnode" in "\n".join(dash.lines)
    c, _ = signed_in(dash)
    with contextlib.closing(c):
        assert c.get("/api/status").json()["state"] == "serving"
    # Scripts keep the bearer token; without either, 401.
    assert httpx.get(dash.base + "/api/status", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    assert httpx.get(dash.base + "/api/status").status_code == 401


def test_without_a_daemon_the_command_says_so(daemon_env) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "watchdog_llm", "dashboard"], env=daemon_env, capture_output=True, text=True
    )
    assert r.returncode == 3 and "daemon not running" in r.stderr and "Traceback" not in r.stderr


# ---- the page, in Chromium -----------------------------------------------------------------------


@needs_browser
def test_the_dashboard_shows_the_daemon_live_and_swaps_with_its_log(
    browser: Browser, daemon: DaemonProc, dashboard: Dashboard
) -> None:
    page = browser.new_context(viewport={"width": 1280, "height": 1000}).new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(dashboard.link)
    assert page.url == dashboard.base + "/"  # the token left the address bar
    phase = page.get_by_role("status", name="Phase")
    expect(phase).to_have_text("serving")
    expect(page.locator("#live")).to_have_text("live")
    expect(page.get_by_role("table", name="Models")).to_contain_text("standin/beta")

    # A job takes the GPUs: the page says so by itself (the event stream), and the yield's numbers.
    daemon.start_job("job_77")
    expect(phase).to_have_text(re.compile("yield"))
    expect(page.get_by_role("list", name="Recent events")).to_contain_text("job job_77")
    expect(page.locator("#yield-facts")).to_contain_text("77")
    daemon.end_job("job_77")
    expect(phase).to_have_text("serving", timeout=20_000)

    # A request through the gateway shows in the table by key.
    r = httpx.post(
        daemon.status()["public_url"] + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {TEST_KEY}"},
        json={"model": "standin/alpha", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
    )
    assert r.status_code == 200, r.text
    page.reload()  # the table is read on load and every 10 s
    expect(page.get_by_role("table", name="Requests by key")).to_contain_text("test")
    expect(page.get_by_role("list", name="Recent events")).to_contain_text("job job_77")  # history, on load

    # The dry run of a model, then the swap with the model's log until ready.
    page.get_by_role("button", name="Check beta").click()
    expect(page.locator("#check-title")).to_have_text("Check beta: can start")
    expect(page.get_by_label("Command")).to_contain_text("standin/beta")
    page.get_by_role("button", name="Swap to beta").click()
    log = page.get_by_role("log", name="Swap log")
    expect(page.locator("#swap-title")).to_contain_text("ready", timeout=20_000)
    expect(log).not_to_be_empty()
    expect(page.get_by_role("table", name="Models").locator("tr", has_text="beta")).to_contain_text("resident")
    assert daemon.status()["model"] == "beta"
    chat = browser.new_context().new_page()  # the chat page now offers the new model
    chat.goto(daemon.status()["public_url"] + "/")
    chat.get_by_label("API key").fill(TEST_KEY)
    chat.get_by_label("API key").dispatch_event("change")
    expect(chat.locator("#model")).to_have_value("standin/beta")
    expect(chat.locator("#model option")).to_have_text(["standin/beta", "standin/alpha (loads on request)"])
    # From the page itself, a request without the CSRF token is refused: the cookie alone changes nothing.
    status = page.evaluate("fetch('/api/swap/lock', {method: 'POST', headers: {'Content-Type': 'application/json'}, "
                           "body: JSON.stringify({holder: 'x', ttl_s: 60})}).then(r => r.status)")  # fmt: skip
    assert status == 403

    # Someone holds the swap lock: the banner says who; force release, after a confirmation.
    transport = httpx.HTTPTransport(uds=str(daemon.state_dir / "admin.sock"))
    with httpx.Client(transport=transport, base_url="http://admin", timeout=10) as admin:
        admin.post("/api/swap/lock", json={"holder": "nightly-eval", "ttl_s": 600, "reason": "benchmark run"})
        banner = page.get_by_role("alert").filter(has_text=re.compile(r"^\s*Swap lock held by"))
        expect(banner).to_contain_text("nightly-eval")
        expect(banner).to_contain_text("benchmark run")
        page.get_by_role("button", name="Swap to alpha").click()
        expect(page.locator("#notice")).to_contain_text("nightly-eval")  # 423, in words
        page.get_by_label("Log", exact=True).select_option("daemon")
        expect(page.get_by_label("Log tail")).to_contain_text("swap")
        screenshot(page, "dashboard.png")
        page.once("dialog", lambda dialog: dialog.accept())
        page.get_by_role("button", name="Force release").click()
        expect(banner).to_be_hidden()
        assert admin.get("/api/swap/lock").json()["locked"] is False
    assert errors == []


@needs_browser
def test_a_used_link_in_the_browser_says_what_to_do(browser: Browser, dashboard: Dashboard) -> None:
    first = browser.new_context().new_page()
    first.goto(dashboard.link)
    expect(first.get_by_role("status", name="Phase")).to_have_text("serving")
    second = browser.new_context().new_page()
    second.goto(dashboard.link)
    expect(second.get_by_role("heading")).to_have_text("This sign-in link does not work")
    expect(second.locator("body")).to_contain_text("watchdog-llm dashboard")


def test_the_forward_takes_admin_port_by_default_else_a_free_one(daemon: DaemonProc) -> None:
    port = free_port()
    env = env_with(daemon.env, ADMIN_PORT=str(port))
    first = Dashboard(env)
    try:
        assert first.base == f"http://127.0.0.1:{port}"
        second = Dashboard(env)  # ADMIN_PORT is taken now (by the first): another port, said as it is
        try:
            assert second.base != first.base and second.base.startswith("http://127.0.0.1:")
        finally:
            assert second.stop() == 0
    finally:
        assert first.stop() == 0
    r = subprocess.run(
        [sys.executable, "-m", "watchdog_llm", "dashboard", "--port", "70000"], env=env, capture_output=True, text=True
    )
    assert r.returncode == 2 and "--port 70000: must be 0-65535" in r.stderr
