"""LAN controller mode inside the real daemon: catalog entries that run on other hosts, driven over a
real OpenSSH server on loopback (tests/sshd_harness.py; two host entries, two names for it).

The "containers" are stand-in model servers started on the host by `tests/data/fake-docker` (run -d,
logs -f, rm -f with docker's behaviour; there is no Docker engine here) or in the foreground of the
SSH session, as `vllm serve` would be. What is checked is what a user sees: the swap's live log, the
model answering through the gateway with the openai client, processes on the host gone after a
stop, secrets absent from every command line, and failures that bring the previous model back.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import psutil
import pytest
from daemon_harness import DaemonProc, env_with, gone, start
from helpers import TEST_KEY, bin_path, free_port, wait_for
from sshd_harness import AVAILABLE, MISSING, REQUIRED, Sshd
from test_coordination_daemon import admin, read_stream, served_model, wait_swap

from watchdog_llm.coordination.hosts import Host
from watchdog_llm.remote.ssh import accept, asyncssh, ensure_key  # asyncssh imported quietly there

# Every test asks for `env` (which needs the sshd) before `daemons`: the daemons stop first, while
# their hosts are still up to run the stop commands.
pytestmark = [pytest.mark.skipif(not AVAILABLE and not REQUIRED, reason=MISSING), pytest.mark.timeout(120)]

FAKE_DOCKER = str(Path(__file__).parent / "data" / "fake-docker")


@pytest.fixture
def containers() -> Iterator[Path]:
    """fake-docker's state on the host: a directory the host's user (root here) reaches."""
    d = Path(tempfile.mkdtemp(prefix="wdl-containers-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def catalog(sshd: Sshd, containers: Path, port_a: int, port_b: int, hostile: str) -> str:
    standin = bin_path("vllm-standin")
    return f"""\
default: alpha
hosts:
  lab-a: {{address: 127.0.0.1, port: {sshd.port}, user: root}}
  lab-b: {{address: localhost, port: {sshd.port}, user: root, description: the same sshd by another name}}
  nowhere: {{address: 127.0.0.1, port: 1, user: root}}
models:
  - name: alpha
    model: standin/alpha
  - name: docker-a
    model: standin/remote-a
    host: lab-a
    base_url: http://127.0.0.1:{port_a}
    start: [{FAKE_DOCKER}, run, -d, --name, "wdl-{{name}}", -e, VLLM_API_KEY,
            {standin}, serve, "{{model}}", --host, 127.0.0.1, --port, "{port_a}", "{{args}}"]
    stop: [{FAKE_DOCKER}, rm, -f, "wdl-{{name}}"]
    logs: [{FAKE_DOCKER}, logs, -f, "wdl-{{name}}"]
    args: [--max-model-len, "4096"]
    env: {{FAKE_DOCKER_DIR: "{containers}", STANDIN_STARTUP_S: "0.5"}}
  - name: fg-b
    model: {hostile!r}
    host: lab-b
    base_url: http://127.0.0.1:{port_b}
    start: {standin} serve {{model}} --host 127.0.0.1 --port {port_b}
    env: {{STANDIN_STARTUP_S: "0.3"}}
  - name: never-ready
    model: standin/never
    host: lab-a
    base_url: http://127.0.0.1:{free_port()}
    start: [sh, -c, 'echo "loading weights for $0"; exec sleep 600', "{{model}}"]
    startup_timeout: 3
  - name: unreachable
    model: standin/x
    host: nowhere
    base_url: http://127.0.0.1:{free_port()}
    start: ["true"]
"""


@pytest.fixture
def env(daemon_env: dict[str, str], tmp_path: Path, sshd: Sshd, containers: Path) -> dict[str, Any]:
    port_a, port_b = free_port(), free_port()
    hostile = f"standin/b; touch {containers}/pwned-$(id -u) `touch {containers}/pwned2`"
    (tmp_path / "models.yaml").write_text(catalog(sshd, containers, port_a, port_b, hostile))
    state = Path(daemon_env["STATE_DIR"])
    state.mkdir(mode=0o700)
    _, public, _ = ensure_key(state, "watchdog-llm test controller")
    sshd.authorize(public)
    offered = asyncssh.read_public_key(str(sshd.host_key) + ".pub")
    for name, address in (("lab-a", "127.0.0.1"), ("lab-b", "localhost")):
        accept(state, Host(name, address, "root", sshd.port), offered)
    e = env_with(daemon_env, MODELS=str(tmp_path / "models.yaml"), MODEL_NAME="", STARTUP_TIMEOUT="20")
    return {"env": e, "port_a": port_a, "port_b": port_b, "hostile": hostile, "containers": containers}


def listener(port: int) -> psutil.Process | None:
    for c in psutil.net_connections("tcp"):
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port and c.pid:
            return psutil.Process(c.pid)
    return None


def in_tree_of(pid: int, proc: psutil.Process) -> bool:
    return any(p.pid == pid for p in proc.parents())


def test_a_docker_style_entry_on_another_host_is_swapped_to_with_its_log_live_served_and_stopped(
    env: dict[str, Any], daemons: list[DaemonProc]
) -> None:
    d = start(daemons, env["env"])
    d.wait_state("serving")
    with admin(d) as c:
        models = {m["name"]: m for m in c.get("/api/models").json()["models"]}
        assert models["docker-a"]["host"] == "lab-a" and models["alpha"]["host"] is None
        swap = c.post("/api/swap", json={"model": "docker-a"}).json()
        stream = read_stream(c, swap["id"])
        wait_swap(c, swap["id"], "ready")
    lines = [data["line"] for ev, data in stream if ev == "log"]
    joined = "\n".join(lines)
    assert "connected to lab-a (root@127.0.0.1:" in joined, joined[-2000:]
    assert "stop (before start)" in joined  # what an earlier run left goes first, as the Spark controller does
    assert any("standin/remote-a" in line for line in lines), joined[-2000:]  # the container's own log, live
    assert served_model(d) == "standin/remote-a"

    # Served through the gateway, with our envelope and keys, by a server that is not ours to kill.
    server = listener(env["port_a"])
    assert server is not None and not in_tree_of(d.proc.pid, server), "the model must run on the host, not here"
    client = openai.OpenAI(base_url=d.status()["public_url"] + "/v1", api_key=TEST_KEY, max_retries=0, timeout=10)
    answer = client.chat.completions.create(model="docker-a", messages=[{"role": "user", "content": "hi"}])
    assert answer.choices[0].message.content
    assert "--max-model-len" in server.cmdline() and "4096" in server.cmdline()  # {args} became words
    key = server.environ()["VLLM_API_KEY"]  # the internal key reached the host by stdin...
    for p in psutil.process_iter(["cmdline"]):  # ...and no command line anywhere holds it
        assert key not in " ".join(p.info["cmdline"] or []), p
    direct = httpx.post(f"http://127.0.0.1:{env['port_a']}/v1/chat/completions", json={"model": "x"})
    assert direct.status_code == 401  # the host's server wants that key: the LAN cannot skip the gateway
    st = d.status()
    assert st["model"] == "docker-a" and st["model_url"] == f"http://127.0.0.1:{env['port_a']}"
    runner = st["model_pids"]

    # Back to the local model: the stop command ran on the host, the container is gone, so is the runner.
    with admin(d) as c:
        swap = c.post("/api/swap", json={"model": "alpha"}).json()
        wait_swap(c, swap["id"], "ready")
    assert gone([server.pid]) and gone(runner)
    assert not (env["containers"] / "wdl-docker-a.pid").exists()
    assert served_model(d) == "standin/alpha"
    log = (d.state_dir / "logs" / "model.log").read_text()
    assert "stop (on stop)" in log and "wdl-docker-a" in log


def test_a_container_that_dies_on_its_host_is_started_again(env: dict[str, Any], daemons: list[DaemonProc]) -> None:
    d = start(daemons, env_with(env["env"], DEFAULT_MODEL="docker-a"))
    d.wait_state("serving")
    server = listener(env["port_a"])
    assert server is not None
    os.killpg(server.pid, signal.SIGKILL)  # the container dies, all of it: `docker logs -f` ends, so does the run
    st = wait_for(lambda: (s := d.status()).get("state") == "backoff" and s, 15, 0.02, "backoff")
    assert "exited with code 4" in st["reason"], st  # the runner's "connection or log stream lost"
    d.wait_state("serving", timeout=30)
    again = listener(env["port_a"])
    assert again is not None and again.pid != server.pid
    assert served_model(d) == "standin/remote-a"
    log = (d.state_dir / "logs" / "model.log").read_text()
    assert "log command ended (status 0): the server on lab-a has stopped" in log, log[-2000:]


def test_a_foreground_server_with_a_hostile_model_name_is_quoted_and_ended_over_the_channel(
    env: dict[str, Any], daemons: list[DaemonProc]
) -> None:
    d = start(daemons, env_with(env["env"], DEFAULT_MODEL="fg-b"))
    st = d.wait_state("serving")
    assert st["model"] == "fg-b"
    assert served_model(d) == env["hostile"]  # the whole name reached the server as one word
    assert not list(env["containers"].glob("pwned*")), "a model name was run by a shell"
    server = listener(env["port_b"])
    assert server is not None and not in_tree_of(d.proc.pid, server)
    assert d.terminate() == 0
    assert gone([server.pid])  # no stop command: TERM over the SSH channel ended it


def test_remote_starts_that_fail_bring_the_previous_model_back_with_the_reason(
    env: dict[str, Any], sshd: Sshd, daemons: list[DaemonProc]
) -> None:
    d = start(daemons, env["env"])
    d.wait_state("serving")
    with admin(d) as c:
        # A host that is down: the swap fails at once, naming it.
        swap = c.post("/api/swap", json={"model": "unreachable"}).json()
        failed = wait_swap(c, swap["id"], "failed")
        assert any(
            "cannot reach host nowhere (root@127.0.0.1:1): Connection refused" in line for line in failed["log_tail"]
        ), failed
        d.wait_state("serving")
        # A server that never gets ready: the startup timeout fails the swap with its log, and what
        # it started on the host is ended.
        swap = c.post("/api/swap", json={"model": "never-ready"}).json()
        wait_for(lambda: _sleeper(), 15, 0.05, "the never-ready server on the host")
        failed = wait_swap(c, swap["id"], "failed", timeout=30)
        assert any("loading weights for standin/never" in line for line in failed["log_tail"]), failed
        d.wait_state("serving")
        wait_for(lambda: _sleeper() is None, 10, 0.05, "the never-ready server gone from the host")
        # The host was reinstalled (a new host key): refused, and said so, with the way forward.
        sshd.stop()
        sshd.new_host_key()
        sshd.start()
        swap = c.post("/api/swap", json={"model": "docker-a"}).json()
        failed = wait_swap(c, swap["id"], "failed")
        tail = "\n".join(failed["log_tail"])
        assert "host key of lab-a (root@127.0.0.1" in tail and "changed since it was accepted" in tail, tail
        assert "watchdog-llm hosts accept lab-a" in tail
    st = d.wait_state("serving")
    assert st["model"] == "alpha" and served_model(d) == "standin/alpha"


def test_hosts_and_their_servers_are_watched_and_changes_are_logged_webhooked_and_told(
    env: dict[str, Any], sshd: Sshd, ntfy: Any, daemons: list[DaemonProc]
) -> None:
    from test_webhooks import Receiver

    hooks = Receiver()
    try:
        e = env_with(env["env"], HOST_CHECK_INTERVAL="0.3", HOST_CHECK_TIMEOUT="1", WEBHOOK_URLS=hooks.base + "/h")
        d = start(daemons, e)
        d.wait_state("serving")
        with admin(d) as c:

            def probed(kind: str, name: str) -> dict[str, Any]:
                got = [t for t in c.get("/api/endpoints").json()[kind] if t["name"] == name]
                return got[0] if got and got[0]["ok"] is not None else {}

            assert wait_for(lambda: probed("hosts", "lab-a").get("ok") is True, 10, 0.05, "lab-a up")
            gone = wait_for(lambda: probed("hosts", "nowhere"), 10, 0.05, "nowhere probed")
            assert gone["ok"] is False and "refused" in gone["detail"].lower(), gone
            server = wait_for(lambda: probed("services", f"http://127.0.0.1:{env['port_a']}"), 10, 0.05, "docker-a")
            assert server["ok"] is False and server["entries"] == ["docker-a"] and server["host"] == "lab-a"
            # Its server comes up with a swap; the host goes away when its sshd stops.
            wait_swap(c, c.post("/api/swap", json={"model": "docker-a"}).json()["id"], "ready")
            url = f"http://127.0.0.1:{env['port_a']}"
            assert wait_for(lambda: probed("services", url).get("ok") is True, 10, 0.05, "docker-a's server up")
            wait_swap(c, c.post("/api/swap", json={"model": "alpha"}).json()["id"], "ready")
            sshd.stop()
            down = wait_for(lambda: probed("hosts", "lab-a").get("ok") is False and probed("hosts", "lab-a"), 10, 0.05)
            assert down["since"] and down["detail"]
            log = c.get("/api/connectivity", params={"service": "host:lab-a"}).json()["events"]
            assert [r["ok"] for r in log] == [True, False] and log[-1]["source"] == "watchdog-llm"
        events = [r.headers.get("X-Spark-Event") for r in hooks.on("/h")]
        assert "host_down" in events and "service_up" in events and "service_down" in events, events
        told = wait_for(lambda: [t for t in ntfy.titles() if "host lab-a down" in t], 15, 0.05, "host lab-a down told")
        assert told and any("host nowhere down" in t for t in ntfy.titles()), ntfy.titles()
    finally:
        hooks.server.shutdown()
        hooks.server.server_close()


def test_an_always_on_service_runs_beside_the_model_is_restarted_and_reached_through_the_gateway(
    env: dict[str, Any], sshd: Sshd, daemons: list[DaemonProc], tmp_path: Path
) -> None:
    port = free_port()
    text = (tmp_path / "models.yaml").read_text() + (
        "  - name: speech\n"
        "    model: standin/speech\n"
        "    kind: [speech, transcription]\n"
        "    host: lab-a\n"
        "    always_on: true\n"
        f"    base_url: http://127.0.0.1:{port}\n"
        f"    start: [{bin_path('vllm-standin')}, serve, '{{model}}', --host, 127.0.0.1, --port, '{port}']\n"
        "    env: {STANDIN_STARTUP_S: '0.3'}\n"
    )
    (tmp_path / "models.yaml").write_text(text)
    d = start(daemons, env_with(env["env"], RESTART_BACKOFF_MAX="0.5"))
    d.wait_state("serving")
    base = d.status()["public_url"]
    with admin(d) as c:

        def state() -> str:
            return str(c.get("/api/services").json()["services"][0]["state"])

        wait_for(lambda: state() == "running", 20, 0.05, "speech running")
        svc = openai.OpenAI(base_url=f"{base}/services/speech/v1", api_key=TEST_KEY, max_retries=0, timeout=10)
        assert [m.id for m in svc.models.list().data] == ["standin/speech"]
        assert "speech" not in [m.id for m in openai.OpenAI(base_url=f"{base}/v1", api_key=TEST_KEY).models.list().data]
        assert httpx.get(f"{base}/services/speech/v1/models").status_code == 401  # our keys, as for the model
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 401  # and its own key on the LAN
        r = httpx.get(f"{base}/services/nope/v1/models", headers={"Authorization": f"Bearer {TEST_KEY}"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "service_not_found"
        refused = c.post("/api/swap", json={"model": "speech"})
        assert refused.status_code == 409 and refused.json()["error"] == "not_swappable"

        # A Slurm job here takes the model's GPUs: the service on its host keeps serving.
        d.start_job("job_77")
        d.wait_state("yielded")
        assert svc.chat.completions.create(model="standin/speech", messages=[{"role": "user", "content": "hi"}])
        d.end_job("job_77")

        # It dies on its host: restarted after the backoff, by itself.
        first = listener(port)
        assert first is not None
        os.killpg(os.getpgid(first.pid), signal.SIGKILL)
        wait_for(lambda: state() in ("backoff", "starting"), 15, 0.02, "speech noticed down")
        wait_for(lambda: state() == "running", 20, 0.05, "speech running again")
        again = listener(port)
        assert again is not None and again.pid != first.pid
        assert c.get("/api/services").json()["services"][0]["restarts"] == 1

        # Stopped on request: gone from its host, and the gateway says so; started again on request.
        assert c.post("/api/services/speech/stop").status_code == 202
        wait_for(lambda: state() == "stopped", 15, 0.05, "speech stopped")
        assert gone([again.pid])
        r = httpx.get(f"{base}/services/speech/v1/models", headers={"Authorization": f"Bearer {TEST_KEY}"})
        assert r.status_code == 503 and r.headers["retry-after"] and r.json()["error"]["code"] == "service_unavailable"
        assert c.post("/api/services/speech/start").status_code == 202
        wait_for(lambda: state() == "running", 20, 0.05, "speech started")
        assert c.post("/api/services/speech/start").status_code == 409
        out = subprocess.run(
            [sys.executable, "-m", "watchdog_llm", "service", "speech", "restart"],
            env=env["env"], capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert out.returncode == 0 and "speech" in out.stdout, out.stderr
        wait_for(lambda: state() == "running" and listener(port) is not None, 20, 0.05, "speech restarted")
    st = d.status()
    assert st["services"][0]["name"] == "speech" and st["services"][0]["host"] == "lab-a"
    assert d.terminate() == 0
    assert listener(port) is None  # the daemon's stop took its services with it


def test_a_host_that_goes_away_mid_swap_fails_it_and_the_previous_model_comes_back(
    env: dict[str, Any], sshd: Sshd, daemons: list[DaemonProc]
) -> None:
    d = start(daemons, env["env"])
    d.wait_state("serving")
    with admin(d) as c:
        swap = c.post("/api/swap", json={"model": "never-ready"}).json()
        wait_for(lambda: _sleeper(), 15, 0.05, "the server loading on the host")
        sshd.crash()  # the host loses power while its model loads
        failed = wait_swap(c, swap["id"], "failed", timeout=20)
        tail = "\n".join(failed["log_tail"])
        assert "connection to lab-a (root@127.0.0.1:" in tail and "lost" in tail, tail
        assert failed["finished_at"] - failed["created_at"] < 2.5  # the lost connection said so: no timeout waited
    st = d.wait_state("serving")
    assert st["model"] == "alpha" and served_model(d) == "standin/alpha"


def _sleeper() -> psutil.Process | None:
    for p in psutil.process_iter(["cmdline"]):
        if (p.info["cmdline"] or [])[:2] == ["sleep", "600"]:
            return p
    return None
