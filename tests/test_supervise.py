"""Supervision with real processes: one Child at a time, in-process, against the stand-in model."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import resource
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from helpers import alive, bin_path, free_port, run_async

from watchdog_llm.config import Settings
from watchdog_llm.supervise.child import Child, ChildEvent, ChildExited, ChildReady, ChildSpec, ChildStopped
from watchdog_llm.supervise.probes import HttpProbe
from watchdog_llm.supervise.specs import model_argv, model_spec, tunnel_config, tunnel_spec
from watchdog_llm.supervise.tree import TAG_ENV, Records, Tree, wait_gone

pytestmark = pytest.mark.timeout(60)
log = logging.getLogger("test")


class Harness:
    def __init__(self, spec: ChildSpec, tmp: Path, grace: float = 3.0) -> None:
        self.events: asyncio.Queue[ChildEvent] = asyncio.Queue()
        self.records = Records(tmp / "children.json", log)
        self.child = Child(
            spec, grace=grace, log_dir=tmp / "logs", records=self.records, post=self.events.put_nowait, log=log
        )
        self.child.launch()

    async def next(self, kind: type, timeout: float = 15) -> ChildEvent:
        while True:
            ev = await asyncio.wait_for(self.events.get(), timeout)
            if isinstance(ev, kind):
                return ev


def standin_spec(tmp: Path, *, tp: int = 2, key: str = "k", **fault: str) -> ChildSpec:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STANDIN_")}
    env.update({"VLLM_API_KEY": key, "STANDIN_STARTUP_S": "0.3", **fault})
    argv = (bin_path("vllm-standin"), "serve", "m", "--port", str(port), "--tensor-parallel-size", str(tp))
    base = f"http://127.0.0.1:{port}"
    probe = HttpProbe(base + "/health", base + "/v1/models", lambda: {"Authorization": f"Bearer {key}"})
    return ChildSpec("model", argv, env, probe)


@run_async
async def test_start_ready_stop_leaves_nothing(tmp_path: Path) -> None:
    h = Harness(standin_spec(tmp_path), tmp_path)
    h.child.start(1)
    assert isinstance(await h.next(ChildReady), ChildReady)
    await asyncio.sleep(0.6)  # one scan after ready
    pids = h.child.pids
    names = sorted(psutil.Process(p).name() for p in pids)
    assert names[:3] == ["VLLM::EngineCore", "VLLM::Worker_TP0", "VLLM::Worker_TP1"], names
    recorded = json.loads((tmp_path / "children.json").read_text())["children"]["model"]
    assert {r["pid"] for r in recorded} == set(pids)
    h.child.stop()
    stopped = await h.next(ChildStopped)
    assert isinstance(stopped, ChildStopped)
    assert stopped.result.survivors == 0 and stopped.result.killed == 0
    assert stopped.result.elapsed_ms < 2000
    assert not alive(pids)
    assert "Starting vLLM" in (tmp_path / "logs" / "model.log").read_text()
    assert any("Starting vLLM" in line for line in h.child.tail)
    await h.child.close()


@run_async
async def test_missing_binary_is_reported_not_raised(tmp_path: Path) -> None:
    spec = ChildSpec("model", (str(tmp_path / "nope"), "serve", "m"), dict(os.environ))
    h = Harness(spec, tmp_path)
    h.child.start(1)
    ev = await h.next(ChildExited)
    assert isinstance(ev, ChildExited) and ev.code is None and "cannot run" in ev.why and "nope" in ev.why
    await h.child.close()


@run_async
async def test_exit_at_once_is_reported_with_its_code_and_output(tmp_path: Path) -> None:
    h = Harness(standin_spec(tmp_path, STANDIN_EXIT_AT_ONCE="3"), tmp_path)
    h.child.start(1)
    ev = await h.next(ChildExited)
    assert isinstance(ev, ChildExited) and ev.code == 3 and "code 3" in ev.why
    assert any("stand-in fault" in line or "Error" in line for line in ev.tail), ev.tail
    await h.child.close()


@run_async
async def test_stop_while_starting_never_reports_ready(tmp_path: Path) -> None:
    spec = standin_spec(tmp_path, STANDIN_STARTUP_S="30")
    h = Harness(spec, tmp_path)
    h.child.start(1)
    await asyncio.sleep(0.8)
    pids = h.child.pids
    assert pids
    h.child.stop()
    stopped = await h.next(ChildStopped)
    assert isinstance(stopped, ChildStopped) and not alive(pids)
    assert all(not isinstance(e, ChildReady) for e in _drain(h.events))
    await h.child.close()


@run_async
async def test_hurry_skips_the_grace(tmp_path: Path) -> None:
    h = Harness(standin_spec(tmp_path, STANDIN_IGNORE_SIGTERM="1"), tmp_path, grace=30)
    h.child.start(1)
    await h.next(ChildReady)
    h.child.stop()
    await asyncio.sleep(0.2)
    t0 = time.monotonic()
    h.child.hurry()
    stopped = await h.next(ChildStopped, timeout=10)
    assert isinstance(stopped, ChildStopped) and time.monotonic() - t0 < 3 and stopped.result.killed >= 1
    await h.child.close()


@run_async
async def test_orphaned_setsid_grandchild_is_found_by_tag_and_killed(tmp_path: Path) -> None:
    """The classic daemonize: fork, setsid, parent exits. The orphan re-parents to the subreaper
    (pytest here, the daemon in production) and is attributed to its tree by the inherited tag."""
    script = tmp_path / "daemonize.py"
    script.write_text(
        textwrap.dedent(
            """
            import os, sys, time
            if os.fork() == 0:
                os.setsid()
                if os.fork() == 0:
                    open(sys.argv[1], "w").write(str(os.getpid()))
                    time.sleep(600)
                os._exit(0)
            time.sleep(0.3)
            """
        )
    )
    pidfile = tmp_path / "orphan.pid"
    spec = ChildSpec("model", (sys.executable, str(script), str(pidfile)), dict(os.environ))
    h = Harness(spec, tmp_path)
    h.child.start(1)
    await h.next(ChildReady)
    ev = await h.next(ChildExited)  # the leader exits after 0.3 s; its tree is cleaned up
    assert isinstance(ev, ChildExited) and ev.code == 0
    orphan = int(pidfile.read_text())
    assert not alive([orphan]), "the setsid()ed orphan must not outlive its tree"
    await h.child.close()


@run_async
async def test_tree_scan_and_tag_attribution_ignore_strangers(tmp_path: Path) -> None:
    """A process we started without the tag is not attributed to a tree, even as our child."""
    stranger = await asyncio.create_subprocess_exec(sys.executable, "-c", "import time; time.sleep(30)")
    tagged = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import time; time.sleep(30)", env={**os.environ, TAG_ENV: "t1"}, start_new_session=True
    )
    try:
        tree = Tree(tagged.pid, "t1")
        tree.scan()
        assert {p.pid for p in tree.alive()} == {tagged.pid}
        assert tree.signal_group(__import__("signal").SIGTERM)
        assert await wait_gone(tree.alive(), 5) == []
    finally:
        stranger.kill()
        await stranger.wait()
        await tagged.wait()


def test_leftovers_are_killed_only_if_pid_and_start_time_match(tmp_path: Path) -> None:
    import subprocess

    ours = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        recs = {
            "daemon_pid": 1,
            "children": {
                "model": [
                    {"pid": ours.pid, "create_time": psutil.Process(ours.pid).create_time()},
                    # Same pid as a live process but another start time: a recycled pid, not ours.
                    {"pid": other.pid, "create_time": psutil.Process(other.pid).create_time() - 100},
                ]
            },
        }
        (tmp_path / "children.json").write_text(json.dumps(recs))
        killed = Records(tmp_path / "children.json", log).kill_leftovers()
        assert [k.pid for k in killed] == [ours.pid]
        assert not alive([ours.pid])
        assert alive([other.pid])
    finally:
        for p in (ours, other):
            p.kill()
            p.wait()


def test_leftovers_take_what_their_tree_started_after_the_last_record(tmp_path: Path) -> None:
    """A daemon SIGKILLed while its model started: the tree grew after its last record. The next
    daemon kills the recorded leader, a child it forked since, and an orphan of it still in its
    session; a stranger in a session of its own lives."""
    import subprocess

    pidfile = tmp_path / "pids"
    code = (
        "import os, subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        # a grandchild whose parent exits at once: re-parented, outside the leader's descendants
        "mid = subprocess.Popen([sys.executable, '-c', "
        '\'import subprocess, sys; p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]);'
        " print(p.pid, flush=True)'], stdout=subprocess.PIPE, text=True)\n"
        "orphan = int(mid.stdout.readline()); mid.wait()\n"
        f"open({str(pidfile)!r}, 'w').write(f'{{child.pid}} {{orphan}}')\n"
        "time.sleep(60)\n"
    )
    leader = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    late: list[int] = []
    try:
        deadline = time.monotonic() + 20
        while not (pidfile.exists() and pidfile.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.05)
        late = [int(x) for x in pidfile.read_text().split()]
        assert alive(late) and late[1] not in {c.pid for c in psutil.Process(leader.pid).children(recursive=True)}
        recs = {
            "daemon_pid": 1,
            "children": {"model": [{"pid": leader.pid, "create_time": psutil.Process(leader.pid).create_time()}]},
        }
        (tmp_path / "children.json").write_text(json.dumps(recs))
        killed = Records(tmp_path / "children.json", log).kill_leftovers()
        assert {k.pid for k in killed} == {leader.pid, *late} and {k.child for k in killed} == {"model"}
        leader.wait(5)
        assert not alive(late)
        assert alive([stranger.pid, os.getpid()])
    finally:
        for pid in late:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        for p in (leader, stranger):
            p.kill()
            p.wait()


def test_model_argv_keeps_the_key_off_the_command_line(tmp_path: Path) -> None:
    s = Settings(
        model_name="org/m", vllm_args="--max-model-len 4096", num_gpus=2, server_port=8123, api_key="sekrit",
        server_socket="off",
    )  # fmt: skip
    spec = model_spec(s, "/usr/bin/vllm", lambda: "sekrit")
    assert spec.argv == (
        "/usr/bin/vllm", "serve", "org/m", "--tensor-parallel-size", "2", "--max-model-len", "4096",
        "--host", "127.0.0.1", "--port", "8123",
    )  # fmt: skip
    assert spec.uds is None
    # The default: vLLM on its unix socket in STATE_DIR, no --host/--port at all.
    on_socket = model_spec(Settings(model_name="org/m", state_dir=tmp_path), "/usr/bin/vllm", lambda: "k")
    assert on_socket.argv == ("/usr/bin/vllm", "serve", "org/m", "--uds", str(tmp_path / "model.sock"))
    assert on_socket.uds == str(tmp_path / "model.sock") and on_socket.env["VLLM_RPC_BASE_PATH"] == str(tmp_path)
    assert "sekrit" not in " ".join(spec.argv) and "VLLM_API_KEY" not in spec.env  # given per start
    assert isinstance(spec.probe, HttpProbe) and spec.probe.confirm_headers() == {"Authorization": "Bearer sekrit"}
    assert spec.env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    s2 = Settings(model_name="m", vllm_args="-tp 4", num_gpus=2)
    assert model_argv(s2, "vllm").count("-tp") == 1 and "--tensor-parallel-size" not in model_argv(s2, "vllm")


def test_tunnel_token_never_on_argv(tmp_path: Path) -> None:
    s = Settings(model_name="m", tunnel_token="tok-123")
    spec = tunnel_spec(s, "/bin/cloudflared", "127.0.0.1:2000", None)
    assert "tok-123" not in " ".join(spec.argv) and spec.env["TUNNEL_TOKEN"] == "tok-123"
    assert spec.argv[:5] == ("/bin/cloudflared", "tunnel", "--no-autoupdate", "--metrics", "127.0.0.1:2000")
    f = tmp_path / "token"
    spec = tunnel_spec(Settings(model_name="m", tunnel_token_file=str(f)), "cf", "127.0.0.1:1", None)
    assert spec.argv[-2:] == ("--token-file", str(f)) and "TUNNEL_TOKEN" not in spec.env
    named = Settings(model_name="m", tunnel_id="abc", cloudflared_creds="/c.json", tunnel_hostname="llm.example.org")
    cfg = tunnel_config(named)
    # The tunnel reaches the public gateway, never vLLM's port.
    assert cfg["ingress"][0] == {"hostname": "llm.example.org", "service": "http://127.0.0.1:8080"}
    assert cfg["ingress"][-1] == {"service": "http_status:404"}
    spec = tunnel_spec(named, "cf", "127.0.0.1:1", tmp_path / "cf.yml")
    assert spec.argv[-3:] == (str(tmp_path / "cf.yml"), "run", "abc")


def _drain(q: asyncio.Queue[ChildEvent]) -> list[ChildEvent]:
    out = []
    while not q.empty():
        out.append(q.get_nowait())
    return out


@run_async
async def test_a_child_forked_while_stopping_is_killed_too(tmp_path: Path) -> None:
    """SIGTERM during model load can start a worker after our scan: the stop must still get it."""
    script = tmp_path / "late_fork.py"
    pidfile = tmp_path / "late.pid"
    script.write_text(
        textwrap.dedent(
            f"""
            import os, signal, subprocess, sys, time
            def on_term(*_):
                p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
                open({str(pidfile)!r}, "w").write(str(p.pid))
                os._exit(0)
            signal.signal(signal.SIGTERM, on_term)
            time.sleep(600)
            """
        )
    )
    h = Harness(ChildSpec("model", (sys.executable, str(script)), dict(os.environ)), tmp_path)
    h.child.start(1)
    await h.next(ChildReady)
    await asyncio.sleep(0.3)
    h.child.stop()
    stopped = await h.next(ChildStopped)
    assert isinstance(stopped, ChildStopped) and stopped.result.survivors == 0
    assert not alive([int(pidfile.read_text())]), "the late child outlived the stop"
    await h.child.close()


@contextlib.contextmanager
def no_descriptor_left() -> Iterator[None]:
    """Every file descriptor of this process in use (what 2,000 idle connections did to the daemon)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = len(os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(soft, in_use + 64), hard))
    held: list[int] = []
    try:
        with contextlib.suppress(OSError):
            while True:
                held.append(os.open(os.devnull, os.O_RDONLY))
        with pytest.raises(OSError, match="Too many open files"):
            os.open(os.devnull, os.O_RDONLY)
        yield
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@run_async
async def test_a_stop_needs_no_new_file_descriptor(tmp_path: Path) -> None:
    """A yield while something has taken every descriptor: the tree's held pidfds signal and watch
    it, so the whole tree (setsid()ed workers too) is gone as fast as usual."""
    h = Harness(standin_spec(tmp_path, tp=2), tmp_path)
    h.child.start(1)
    await h.next(ChildReady)
    await asyncio.sleep(0.6)  # one scan after ready: every member known
    pids = h.child.pids
    assert len(pids) >= 4
    with no_descriptor_left():
        h.child.stop()
        stopped = await h.next(ChildStopped)
    assert not alive(pids), "processes of the tree outlived a stop without descriptors"
    assert isinstance(stopped, ChildStopped)
    assert stopped.result.survivors == 0 and stopped.result.killed == 0
    assert stopped.result.elapsed_ms < 2000
    await h.child.close()
