"""The gateway and the admin API inside the real daemon: what a client, an admin and `status` see
through a start, a yield and a resume. (Faults of the proxy itself: test_gateway.py.)"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest
from daemon_harness import DaemonProc, env_with, start
from helpers import TEST_KEY, bin_path, free_port, wait_for


def _client(d: DaemonProc, key: str = TEST_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=d.status()["public_url"] + "/v1", api_key=key, max_retries=0, timeout=10)


def _chat(client: openai.OpenAI, text: str = "hello there") -> str:
    r = client.chat.completions.create(model="standin/test", messages=[{"role": "user", "content": text}])
    return r.choices[0].message.content or ""


def _internal_key(pid: int) -> str:
    """VLLM_API_KEY as the model process got it (we are its user: /proc/<pid>/environ is readable)."""
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return next(e.split(b"=", 1)[1].decode() for e in env if e.startswith(b"VLLM_API_KEY="))


def _admin(d: DaemonProc) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(uds=str(d.state_dir / "admin.sock")), base_url="http://admin")


def test_openai_client_through_the_gateway_and_never_straight_to_vllm(daemons, daemon_env) -> None:
    d = start(daemons, daemon_env)
    st = d.wait_state("serving")
    client = _client(d)
    assert _chat(client, "three small words") == "[stand-in] three small words"
    stream = client.chat.completions.create(
        model="standin/test", messages=[{"role": "user", "content": "one two three four"}], stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == "[stand-in] one two three four"
    assert [m.id for m in client.models.list()] == ["standin/test"]
    # vLLM listens on a unix socket in our 0700 STATE_DIR, on no TCP port at all.
    sock = st["model_url"].removeprefix("unix:")
    assert st["model_url"] == f"unix:{d.state_dir / 'model.sock'}" and stat.S_ISSOCK(os.stat(sock).st_mode)
    assert stat.S_IMODE(os.stat(d.state_dir).st_mode) == 0o700
    assert f"Starting vLLM server on unix:{sock}" in (d.state_dir / "logs" / "model.log").read_text()
    listening = [c for p in st["model_pids"] for c in psutil.Process(p).net_connections("inet") if c.status == "LISTEN"]
    assert listening == [], listening
    # Even we, with the public key instead of the run's internal key, get 401 there.
    direct = openai.OpenAI(
        base_url="http://localhost/v1",
        api_key=TEST_KEY,
        max_retries=0,
        http_client=httpx.Client(transport=httpx.HTTPTransport(uds=sock), timeout=5),
    )
    with pytest.raises(openai.AuthenticationError):
        _chat(direct)
    if os.geteuid() == 0 and os.access("/usr/bin/python3", os.X_OK):  # another user cannot even connect
        probe = "import socket; socket.socket(socket.AF_UNIX).connect(" + repr(sock) + ")"
        r = subprocess.run(
            ["/usr/bin/python3", "-c", probe], user="nobody", capture_output=True, text=True, timeout=30, cwd="/"
        )
        assert r.returncode != 0 and "PermissionError" in r.stderr, r.stderr
    with pytest.raises(openai.AuthenticationError) as err:
        _chat(_client(d, "not-a-key-of-ours-at-all"))
    assert "API key" in err.value.message
    # The internal key is in the model's environment, never on its command line.
    pid = min(st["model_pids"])
    key = _internal_key(pid)
    assert len(key) >= 32 and key not in " ".join(open(f"/proc/{pid}/cmdline").read().split("\0"))
    assert TEST_KEY not in Path(f"/proc/{pid}/environ").read_text(errors="replace")


def test_yield_mid_stream_ends_it_with_our_error_then_503_until_resumed(daemons, daemon_env) -> None:
    env = env_with(daemon_env, STANDIN_TOKEN_DELAY_MS="40", RESUME_COOLDOWN="1")
    d = start(daemons, env)
    st = d.wait_state("serving")
    old_key = _internal_key(min(st["model_pids"]))
    client = _client(d)
    words = " ".join(f"w{i}" for i in range(200))
    stream = client.chat.completions.create(
        model="standin/test", messages=[{"role": "user", "content": words}], stream=True, max_tokens=200
    )
    got: list[str] = []
    with pytest.raises(openai.APIError) as err:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                got.append(chunk.choices[0].delta.content)
            if len(got) == 5:
                d.start_job("job_77")  # a Slurm job takes the GPUs mid-answer
    assert 5 <= len(got) < 200
    assert "GPUs reclaimed by a Slurm job" in err.value.message and "incomplete" in err.value.message
    d.wait_state("yielded")
    with pytest.raises(openai.APIStatusError) as unavailable:
        _chat(client)
    e = unavailable.value
    assert e.status_code == 503 and "GPUs reclaimed by a Slurm job" in e.message
    assert int(e.response.headers["retry-after"]) >= 1
    body = e.response.json()["error"]
    assert body["code"] == "model_yielded" and body["retryable"] is True and body["consumer"] == "test"
    assert "77" not in e.message  # the public message names no job
    health = httpx.get(d.status()["public_url"] + "/health")
    assert health.status_code == 503 and "retry-after" in health.headers
    d.end_job("job_77")
    st = d.wait_state("serving")
    assert _chat(client, "back again") == "[stand-in] back again"
    assert httpx.get(st["public_url"] + "/health").status_code == 200
    # Each start has its own internal key: the previous run's key no longer opens vLLM.
    new_key = _internal_key(min(st["model_pids"]))
    assert new_key != old_key
    vllm = httpx.Client(transport=httpx.HTTPTransport(uds=st["model_url"].removeprefix("unix:")))
    r = vllm.get("http://localhost/v1/models", headers={"Authorization": f"Bearer {old_key}"})
    assert r.status_code == 401


def test_raw_stream_bytes_end_with_error_event_and_done(daemons, daemon_env) -> None:
    d = start(daemons, env_with(daemon_env, STANDIN_TOKEN_DELAY_MS="40"))
    st = d.wait_state("serving")
    body = {"model": "standin/test", "prompt": " ".join(["x"] * 300), "max_tokens": 300, "stream": True}
    headers = {"x-api-key": TEST_KEY}
    data = b""
    with httpx.stream("POST", st["public_url"] + "/v1/completions", json=body, headers=headers, timeout=10) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for chunk in r.iter_raw():
            data += chunk
            if data.count(b"data: ") == 3:
                d.start_job("job_78")
    events = [e for e in data.split(b"\n\n") if e.strip()]
    assert events[-1] == b"data: [DONE]"
    err = json.loads(events[-2].removeprefix(b"data: "))["error"]
    assert err["code"] == "model_yielded" and err["retryable"] is True
    assert data.count(b"[DONE]") == 1


def test_admin_socket_status_healthz_and_metrics(daemons, daemon_env) -> None:
    d = start(daemons, daemon_env)
    d.wait_state("serving")
    sock = d.state_dir / "admin.sock"
    mode = stat.S_IMODE(sock.stat().st_mode)
    assert stat.S_ISSOCK(sock.stat().st_mode) and mode == 0o600
    _chat(_client(d))
    with pytest.raises(openai.AuthenticationError):
        _chat(_client(d, "wrong-key-wrong-key-wrong"))
    with _admin(d) as admin:
        st = admin.get("/api/status").json()
        assert st["state"] == "serving" and st["daemon_pid"] == d.proc.pid
        assert admin.get("/healthz").json() == {"ok": True, "state": "serving", "serving": True}
        r = admin.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        m = r.text
        assert 'watchdog_llm_state{watchdog_llm_state="serving"} 1.0' in m
        assert 'watchdog_llm_requests_total{code="200",consumer="test",route="/v1/chat/completions"} 1.0' in m
        assert 'watchdog_llm_requests_total{code="401",consumer="",route="/v1/chat/completions"} 1.0' in m
        assert "watchdog_llm_upstream_latency_seconds_count" in m and "watchdog_llm_served_seconds" in m
        assert "watchdog_llm_model_starts_total 1.0" in m
        d.start_job("job_5")
        d.wait_state("yielded")
        m = admin.get("/metrics").text
        assert "watchdog_llm_yields_total 1.0" in m
        assert "watchdog_llm_yield_seconds_count 1.0" in m and "watchdog_llm_detection_seconds_count 1.0" in m
        assert admin.get("/api/nope").json()["error"] == "not_found"
    # The public listener serves none of it: the tunnel's origin must never expose the admin API.
    public = d.status()["public_url"]
    for path in ("/api/status", "/metrics", "/healthz", "/docs", "/openapi.json"):
        r = httpx.get(public + path, headers={"x-api-key": TEST_KEY})
        assert r.status_code == 404, path
        assert r.json()["error"]["code"] == "not_found"


def test_status_cli_asks_the_running_daemon(daemons, daemon_env) -> None:
    d = start(daemons, daemon_env)
    d.wait_state("serving")
    (d.state_dir / "status.json").unlink()  # the live answer comes from the admin socket
    cmd = [sys.executable, "-m", "watchdog_llm", "status", "--json"]
    out = subprocess.run(cmd, env=daemon_env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["running"] is True and data["state"] == "serving" and data["daemon_pid"] == d.proc.pid
    human = subprocess.run(cmd[:-1], env=daemon_env, capture_output=True, text=True, timeout=30)
    assert human.returncode == 0 and "serving since" in human.stdout and data["public_url"] in human.stdout
    assert d.terminate() == 0
    assert not (d.state_dir / "admin.sock").exists() and not (d.state_dir / "dashboard.sock").exists()
    after = subprocess.run(cmd, env=daemon_env, capture_output=True, text=True, timeout=30)
    assert after.returncode == 3 and json.loads(after.stdout)["state"] == "stopped"  # from the file


def test_admin_over_tcp_needs_the_token(daemons, daemon_env) -> None:
    token = "admin-token-0123456789"
    port = free_port()
    env = env_with(daemon_env, ADMIN_HOST="127.0.0.1", ADMIN_PORT=str(port), ADMIN_TOKEN=token)
    d = start(daemons, env)
    d.wait_state("serving")
    base = f"http://127.0.0.1:{port}"
    for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}, {"Authorization": token}):
        r = httpx.get(base + "/api/status", headers=headers)
        assert r.status_code == 401 and r.json()["error"] == "unauthorized"
    r = httpx.get(base + "/api/status", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200 and r.json()["state"] == "serving"
    assert not (d.state_dir / "admin.sock").exists()
    out = subprocess.run(
        [sys.executable, "-m", "watchdog_llm", "status", "--json"], env=env, capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0 and json.loads(out.stdout)["daemon_pid"] == d.proc.pid
    # The token is a secret: never on the daemon's or the model's command line.
    st = d.status()
    for pid in (d.proc.pid, *st["model_pids"]):
        assert token not in Path(f"/proc/{pid}/cmdline").read_text()


def test_public_port_in_use_is_one_line_and_starts_nothing(daemons, daemon_env) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", int(daemon_env["PUBLIC_PORT"])))
        s.listen()
        d = start(daemons, daemon_env)
        assert d.proc.wait(20) == 2
    lines = [ln for ln in d.log().splitlines() if "PUBLIC_PORT" in ln]
    assert lines and "in use" in lines[0] and "Traceback" not in d.log()
    assert "vllm-standin" not in d.log()


def test_no_keys_warns_loudly_and_serves_anyone(daemons, daemon_env) -> None:
    env = dict(daemon_env)
    del env["PUBLIC_API_KEYS"]
    d = start(daemons, env)
    d.wait_state("serving")
    assert "OPEN to anyone" in d.log()
    assert _chat(_client(d, "anything-at-all")) == "[stand-in] hello there"


def test_bad_key_settings_stop_the_start(daemons, daemon_env, tmp_path: Path) -> None:
    short = start(daemons, env_with(daemon_env, PUBLIC_API_KEYS="alice:short"))
    assert short.proc.wait(20) == 2
    assert "PUBLIC_API_KEYS entry 1: key too short" in short.log() and "short\n" not in short.log()
    missing = start(daemons, env_with(daemon_env, PUBLIC_API_KEYS_FILE=str(tmp_path / "nope")))
    assert missing.proc.wait(20) == 2 and "PUBLIC_API_KEYS_FILE" in missing.log()


def test_keys_file_names_consumers(daemons, daemon_env, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# people\nalice:alice-key-0123456789\nbob:bob-key-0123456789abc\n")
    env = env_with(daemon_env, PUBLIC_API_KEYS_FILE=str(keys), MAX_CONCURRENT_PER_KEY="1")
    env["STANDIN_TOKEN_DELAY_MS"] = "200"
    d = start(daemons, env)
    d.wait_state("serving")
    alice = _client(d, "alice-key-0123456789")
    errors: list[Any] = []

    def slow() -> None:
        try:
            _chat(alice, "a b c d e f")
        except Exception as e:  # collected: asserted below
            errors.append(e)

    t = threading.Thread(target=slow)
    t.start()
    wait_for(lambda: "requests_in_flight 1.0" in _admin(d).get("/metrics").text, 10, what="one request in flight")
    with pytest.raises(openai.RateLimitError) as err:
        _chat(alice)
    assert err.value.response.json()["error"]["consumer"] == "alice"
    assert "retry-after" in err.value.response.headers
    assert _chat(_client(d, "bob-key-0123456789abc"), "hi") == "[stand-in] hi"
    t.join(20)
    assert not errors


def test_tunnel_edge_reaches_the_gateway_and_gets_json_while_yielded(daemons, daemon_env, tmp_path: Path) -> None:
    """cloudflared's ingress points at the public listener: while yielded, a user behind the tunnel
    gets our JSON 503 with Retry-After, not Cloudflare's 502 page."""
    creds = tmp_path / "creds.json"
    creds.write_text('{"AccountTag":"a","TunnelSecret":"c2VjcmV0","TunnelID":"t"}')
    creds.chmod(0o600)
    edge = free_port()
    env = env_with(
        daemon_env,
        CLOUDFLARED_BIN=bin_path("cloudflared-standin"),
        TUNNEL_ID="6ff42ae2-765d-4adf-8112-31c55c1551ef",
        CLOUDFLARED_CREDS=str(creds),
        TUNNEL_HOSTNAME="llm.example.org",
        STANDIN_EDGE_LISTEN=f"127.0.0.1:{edge}",
    )
    d = start(daemons, env)
    d.wait_state("serving")
    wait_for(lambda: (d.status().get("tunnel") or {}).get("ready"), 20, what="tunnel ready")
    cfg = (d.state_dir / "cloudflared.yml").read_text()
    assert d.status()["public_url"] in cfg and d.status()["model_url"] not in cfg
    via_tunnel = openai.OpenAI(
        base_url=f"http://127.0.0.1:{edge}/v1",
        api_key=TEST_KEY,
        max_retries=0,
        timeout=10,
        default_headers={"Host": "llm.example.org"},
    )
    assert _chat(via_tunnel, "through the tunnel") == "[stand-in] through the tunnel"
    d.start_job("job_12")
    d.wait_state("yielded")
    with pytest.raises(openai.APIStatusError) as err:
        _chat(via_tunnel)
    assert err.value.status_code == 503 and "GPUs reclaimed" in err.value.message
    assert err.value.response.headers["content-type"] == "application/json"
    assert "retry-after" in err.value.response.headers


def test_cooldown_503_says_how_long_and_the_page_says_offline(daemons, daemon_env) -> None:
    """Retry-After while cooling down: the cooldown left plus a start as measured on this node."""
    d = start(daemons, env_with(daemon_env, RESUME_COOLDOWN="30"))
    d.wait_state("serving")
    d.start_job("job_3")
    d.wait_state("yielded")
    d.end_job("job_3")
    d.wait_state("cooldown")
    r = httpx.post(
        d.status()["public_url"] + "/v1/chat/completions",
        json={"model": "standin/test", "messages": [{"role": "user", "content": "hi"}]},
        headers={"Authorization": f"Bearer {TEST_KEY}"},
    )
    assert r.status_code == 503
    wait = int(r.headers["retry-after"])
    assert 25 <= wait <= 33, wait  # ~30 s of cooldown left + a measured start of the stand-in (< 1 s)
    assert r.json()["error"]["code"] == "model_cooldown"
    page = httpx.get(d.status()["public_url"] + "/")
    assert page.status_code == 200 and "offline" in page.text and "standin/test" in page.text
    assert TEST_KEY not in page.text and d.status()["model_url"] not in page.text


def _leader(pids: list[int]) -> int:
    """The API server: the one of the model's processes whose parent is not among them."""
    import psutil

    return next(p for p in pids if psutil.Process(p).ppid() not in pids)


def test_a_hung_model_is_noticed_restarted_and_its_waiting_clients_get_503(daemons, daemon_env) -> None:
    import os
    import signal
    import time

    env = env_with(
        daemon_env,
        LIVENESS_INTERVAL="0.5",
        LIVENESS_TIMEOUT="0.5",
        LIVENESS_FAILURES="3",
        RESTART_BACKOFF_MAX="2",
        RESTART_LIMIT="10",
        UPSTREAM_TIMEOUT="60",
    )
    d = start(daemons, env)
    st = d.wait_state("serving")
    pids = st["model_pids"]
    api = _leader(pids)
    client = _client(d)

    # A pause shorter than LIVENESS_FAILURES checks is not a hang: same run, still serving.
    os.kill(api, signal.SIGSTOP)
    time.sleep(0.9)
    os.kill(api, signal.SIGCONT)
    assert _chat(client, "still here") == "[stand-in] still here"
    assert d.status()["model_run"] == 1 and d.status()["state"] == "serving"

    # A stopped API server: the kernel still accepts connections, nothing ever answers.
    os.kill(api, signal.SIGSTOP)
    t0 = time.monotonic()
    waited: dict[str, Any] = {}

    def ask() -> None:
        t = time.monotonic()
        try:
            _client(d).with_options(timeout=60).chat.completions.create(
                model="standin/test", messages=[{"role": "user", "content": "anyone?"}]
            )
        except openai.APIStatusError as e:
            waited.update(status=e.status_code, code=e.body.get("code") if isinstance(e.body, dict) else None)
        waited["s"] = time.monotonic() - t

    asker = threading.Thread(target=ask)
    asker.start()
    st = d.wait_state("backoff", timeout=15)
    detected = time.monotonic() - t0
    health = httpx.get(st["public_url"] + "/health", timeout=5)
    assert health.status_code == 503 and health.json()["status"] != "ok", health.text
    asker.join(15)
    assert waited.get("status") == 503 and waited["s"] < 10, waited  # not UPSTREAM_TIMEOUT's 60 s
    # 3 failed checks 0.5 s apart, each up to 0.5 s: about 1.5-2 s, plus the stop of the tree.
    assert detected < 6, f"hang noticed after {detected:.1f} s"
    assert "stopped answering /health" in st["reason"], st["reason"]
    wait_for(lambda: not any(psutil_alive(p) for p in pids), 10, what="the hung tree gone")
    st = d.wait_state("serving", timeout=20)
    assert st["model_run"] == 2 and not set(st["model_pids"]) & set(pids)
    assert _chat(client, "back again") == "[stand-in] back again"


def psutil_alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(e.decode(errors="replace").split("=", 1) for e in raw if b"=" in e)


def test_dev_mode_in_our_environment_never_reaches_the_model(daemons, daemon_env) -> None:
    # A site (or a shell profile) exporting VLLM_SERVER_DEV_MODE=1 would give vLLM /sleep,
    # /wake_up, /collective_rpc, /reset_prefix_cache, without authentication.
    d = start(daemons, env_with(daemon_env, VLLM_SERVER_DEV_MODE="1"))
    st = d.wait_state("serving")
    for pid in st["model_pids"]:
        env = _environ(pid)
        assert "VLLM_SERVER_DEV_MODE" not in env, pid
        assert env["VLLM_RPC_BASE_PATH"] == str(d.state_dir)  # vLLM's engine sockets: in our 0700 dir
    vllm = httpx.Client(transport=httpx.HTTPTransport(uds=st["model_url"].removeprefix("unix:")))
    assert vllm.post("http://localhost/sleep").status_code == 404
    assert vllm.post("http://localhost/collective_rpc", json={"method": "x"}).status_code == 404
    assert "Development endpoints are enabled" not in d.log()


def test_a_socket_left_by_an_earlier_run_is_replaced(daemons, daemon_env) -> None:
    state = Path(daemon_env["STATE_DIR"])
    state.mkdir(mode=0o700)
    engine_ipc = state / "0dc9dc0e-c634-4140-a661-fbf106e7aedf"  # a ZMQ ipc socket vLLM 0.32 left behind
    for path in (state / "model.sock", engine_ipc):
        left = socket.socket(socket.AF_UNIX)
        left.bind(str(path))  # bound, never listened on: what a killed vLLM leaves
        left.close()
    (state / "notes.txt").write_text("not ours to remove")
    d = start(daemons, daemon_env)
    st = d.wait_state("serving")
    assert st["model_run"] == 1 and _chat(_client(d)) == "[stand-in] hello there"
    assert not engine_ipc.exists() and (state / "notes.txt").exists()


def test_a_port_squatter_moves_the_model_to_another_port_and_never_fails_it(daemons, daemon_env, ntfy) -> None:
    # Over TCP (SERVER_SOCKET=off), any user can listen on SERVER_PORT first. Before, each start
    # failed ("SERVER_PORT ... in use") and counted as a crash, until RESTART_LIMIT made it `failed`.
    port = int(daemon_env["SERVER_PORT"])
    squatter = socket.create_server(("127.0.0.1", port))
    try:
        d = start(daemons, env_with(daemon_env, SERVER_SOCKET="off", RESTART_LIMIT="2"))
        st = d.wait_state("serving")
        assert st["model_run"] == 1 and st["model_url"].startswith("http://127.0.0.1:")
        moved = int(st["model_url"].rsplit(":", 1)[1])
        assert moved != port
        assert _chat(_client(d), "moved") == "[stand-in] moved"
        wait_for(lambda: any("port taken" in t for t in ntfy.titles()), 10, what="the port notice")
        # A yield and a resume while it still squats: another free port, no second notice, no crash.
        d.start_job("job_5")
        d.wait_state("yielded")
        d.end_job("job_5")
        st = d.wait_state("serving")
        assert st["model_run"] == 2 and _chat(_client(d), "again") == "[stand-in] again"
    finally:
        squatter.close()
    d.start_job("job_6")
    d.wait_state("yielded")
    d.end_job("job_6")
    st = d.wait_state("serving")
    assert st["model_url"] == f"http://127.0.0.1:{port}"  # free again: back on SERVER_PORT
    assert _chat(_client(d), "home") == "[stand-in] home"
    assert sum("port taken" in t for t in ntfy.titles()) == 1, ntfy.titles()
    assert "crash" not in d.log().lower() and "failed" not in d.status()["state"]
