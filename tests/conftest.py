"""Shared fixtures: real processes, real HTTP, and a check that no process of ours outlives a test."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import psutil
import pytest
from helpers import TEST_KEY, alive, bin_path, free_port
from sshd_harness import AVAILABLE, MISSING, Sshd, ensure_user

from watchdog_llm.config import Settings
from watchdog_llm.supervise.tree import set_child_subreaper

MEMORY = Path("/sys/fs/cgroup/memory")  # cgroup v1: the real-cgroupfs tests make Slurm-shaped dirs here

# Orphans of anything a test starts (a SIGKILLed daemon's model tree, say) re-parent to pytest
# instead of init, so the leftover check below sees every process the test is responsible for.
SUBREAPER = set_child_subreaper()


def _descendants() -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True) if alive([p])]


@pytest.fixture(autouse=True)
def no_leftover_processes() -> Iterator[None]:
    """Every test must leave no process behind: the daemon's first promise."""
    before = {(p.pid, p.create_time()) for p in _descendants()}
    yield
    deadline = time.monotonic() + 5
    left: list[psutil.Process] = []
    while time.monotonic() < deadline:
        left = [p for p in _descendants() if (p.pid, p.create_time()) not in before]
        if not left:
            break
        time.sleep(0.05)
    for p in left:  # clean up so one failure does not cascade, then fail loudly
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    for p in psutil.Process().children():  # reap orphans that re-parented to us
        try:
            if p.status() == psutil.STATUS_ZOMBIE:
                os.waitpid(p.pid, os.WNOHANG)
        except (psutil.NoSuchProcess, ChildProcessError):
            pass
    names = []
    for p in left:
        try:
            names.append(f"{p.pid} {p.name()} {p.cmdline()[:4]}")
        except psutil.Error:
            names.append(str(p.pid))
    assert not left, f"processes left running after the test: {names}"


class NtfySink:
    """A local HTTP server that records what apprise's ntfy plugin sends."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.delay = 0.0
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if sink.delay:
                    time.sleep(sink.delay)
                try:
                    data = json.loads(body)
                except ValueError:
                    data = {"message": body.decode(errors="replace")}
                data["_path"] = self.path
                # apprise's ntfy plugin sends the priority as a header, and none for "default"
                data["_priority"] = self.headers.get("X-Priority") or "default"
                sink.received.append(data)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b'{"id":"x"}')

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"ntfy://127.0.0.1:{self.port}/wdtest"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def titles(self) -> list[str]:
        return [str(m.get("title", "")) for m in self.received]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def ntfy() -> Iterator[NtfySink]:
    sink = NtfySink()
    yield sink
    sink.close()


@pytest.fixture
def daemon_env(tmp_path: Path, ntfy: NtfySink) -> dict[str, str]:
    return daemon_env_for(tmp_path, ntfy)


def daemon_env_for(tmp_path: Path, ntfy: NtfySink) -> dict[str, str]:
    """Environment for a real daemon: stand-in model, scratch cgroup tree, local ntfy sink."""
    root = tmp_path / "cgroup"
    (root / "system.slice" / "slurmstepd.scope").mkdir(parents=True)
    names = {n.upper() for n in Settings.model_fields}
    env = {k: v for k, v in os.environ.items() if k.upper() not in names and not k.startswith(("SLURM_", "STANDIN_"))}
    env.update(
        LLM_BIN=bin_path("vllm-standin"),
        MODEL_NAME="standin/test",
        SERVER_PORT=str(free_port()),
        PUBLIC_PORT=str(free_port()),
        PUBLIC_API_KEYS=f"test:{TEST_KEY}",
        CGROUP_ROOT=str(root),
        STATE_DIR=str(tmp_path / "state"),
        RESUME_COOLDOWN="0.5",
        YIELD_GRACE="3",
        NOTIFY_URLS=ntfy.url,
        NOTIFY_COALESCE="0",
        NODE_NAME="testnode",
        STANDIN_STARTUP_S="0.3",
        RESTART_BACKOFF_MAX="0.5",
        MIN_UPTIME="5",
        STALE_JOB_GRACE="0",  # scratch job dirs hold no process; tests of stale dirs set it themselves
        WATCHDOG_LLM_CONFIG=str(tmp_path / "config.env"),
    )
    (tmp_path / "config.env").write_text("# test: settings come from the environment\n")
    return env


@pytest.fixture
def daemons() -> Iterator[list[Any]]:
    """Daemons a test started with daemon_harness.start: stopped afterwards, even when it fails."""
    started: list[Any] = []
    yield started
    for d in started:
        d.cleanup()


@pytest.fixture
def slurm() -> Iterator[Any]:
    """The real one-node Slurm (scripts/slurm-local.sh start), to ourselves; every job we submit is
    cancelled by id afterwards. Skips with the reason when it is not usable (fails under
    WATCHDOG_LLM_REQUIRE_SLURM=1, as in CI)."""
    from slurm_cluster import Slurm, not_usable, usable_reason

    reason = usable_reason()
    if reason:
        not_usable(reason)
    s = Slurm()
    # Jobs of an earlier test may still be completing; anything else on the node spoils the counts.
    deadline = time.monotonic() + 15
    while (busy := s.node_jobs()) and time.monotonic() < deadline:
        time.sleep(0.2)
    if busy:
        not_usable(f"node busy with jobs {busy} (these tests need it to themselves)")
    s.clear_leftovers()
    try:
        yield s
    finally:
        s.cleanup()
        s.clear_leftovers()


@pytest.fixture
def slurm_v1() -> Iterator[Path]:
    """`memory/slurm_wdtest<random>/uid_0`: Debian's v1 layout, removed afterwards (deepest first)."""
    if os.geteuid() != 0 or not MEMORY.is_dir():
        pytest.skip("needs root and a cgroup v1 memory controller")
    # The one-node Slurm shares this cgroupfs: a job an earlier test cancelled can keep its dirs for a
    # moment after Slurm says it ended (slower under load). These tests count jobs: wait them out.
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and [
        p for p in Path("/sys/fs/cgroup").glob("*/slurm*/uid_*/job_*") if "wdtest" not in str(p)
    ]:
        time.sleep(0.1)
    top = MEMORY / f"slurm_wdtest{uuid.uuid4().hex[:8]}"
    try:
        (top / "uid_0").mkdir(parents=True)
    except OSError as e:
        pytest.skip(f"cannot create cgroups here: {e.strerror}")
    yield top / "uid_0"
    for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        with contextlib.suppress(OSError):
            d.rmdir()
    top.rmdir()


@pytest.fixture
def browser() -> Iterator[Any]:
    """Debian's Chromium (tests/browser_harness.py), one per test: closing it ends every process it started."""
    from browser_harness import launch
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = launch(p)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def sshd() -> Iterator[Any]:
    """A real OpenSSH server on loopback (tests/sshd_harness.py), with its own host key and test user."""
    if not AVAILABLE:
        pytest.fail(MISSING)
    ensure_user()
    # sshd reads authorized_keys as the user: a directory it can reach (pytest's tmp_path is root's 0700).
    root = Path(tempfile.mkdtemp(prefix="wdl-sshd-"))
    server = Sshd(root)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
