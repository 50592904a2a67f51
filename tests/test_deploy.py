"""The launch files people copy: the systemd unit, the fleet batch script and the tmux starter,
run (or read) against the real daemon and its real configuration layer."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_harness import env_with, gone
from helpers import wait_for

pytestmark = pytest.mark.timeout(90)
ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "watchdog_llm"]


def test_systemd_does_not_restart_a_configuration_error(daemon_env: dict[str, str]) -> None:
    unit = (ROOT / "systemd" / "watchdog-llm.service").read_text()
    assert re.search(r"^Restart=on-failure$", unit, re.M)
    prevent = re.search(r"^RestartPreventExitStatus=(.+)$", unit, re.M)
    assert prevent is not None, "a bad config would be restarted every RestartSec, for ever"
    # The code the daemon really exits with on a bad setting is the one systemd leaves failed.
    r = subprocess.run(
        [*CLI, "run"], env=env_with(daemon_env, RESUME_COOLDOWN="soon"), capture_output=True, text=True, timeout=30
    )
    assert "RESUME_COOLDOWN" in r.stderr and str(r.returncode) in prevent.group(1).split(), (r.returncode, r.stderr)


FAKE_DAEMON = """#!/bin/sh
# Stands in for `watchdog-llm --config FILE run`: records what fleet.sbatch exported, then loads the
# configuration with the real config layer (which refuses TUNNEL_TOKEN and TUNNEL_TOKEN_FILE together).
echo "TUNNEL_TOKEN_FILE=${{TUNNEL_TOKEN_FILE:-}}"
exec {python} -c 'import sys; from watchdog_llm import config; config.load(sys.argv[1]); print("config loaded")' "$2"
"""


@pytest.mark.parametrize("token_in", ["config", "environment", "nowhere"])
def test_fleet_sbatch_uses_the_default_token_file_only_when_no_token_is_set(tmp_path: Path, token_in: str) -> None:
    home = tmp_path / "home"
    (home / ".config" / "watchdog-llm").mkdir(parents=True)
    token_file = home / ".config" / "watchdog-llm" / "tunnel.token"
    token_file.write_text("eyJ-token-from-file\n")
    token_file.chmod(0o600)
    fake = tmp_path / "fake-daemon"
    fake.write_text(FAKE_DAEMON.format(python=sys.executable))
    fake.chmod(0o755)
    cfg = tmp_path / "config.env"
    cfg.write_text(
        "PUBLIC_API_KEYS=alice:alice-key-0123456789abcdef\n"
        + ("TUNNEL_TOKEN=eyJ-token-in-config\n" if token_in == "config" else "")
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TUNNEL_", "PUBLIC_"))}
    env.update(HOME=str(home), WATCHDOG_LLM=str(fake), WATCHDOG_LLM_CONFIG=str(cfg), FLEET_STATE_BASE=str(tmp_path))
    if token_in == "environment":
        env["TUNNEL_TOKEN"] = "eyJ-token-in-env"
    r = subprocess.run(
        ["bash", str(ROOT / "slurm" / "fleet.sbatch")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == 0 and "config loaded" in r.stdout, r.stdout + r.stderr
    exported = r.stdout.splitlines()[0]
    assert exported == f"TUNNEL_TOKEN_FILE={token_file if token_in == 'nowhere' else ''}", r.stdout


@pytest.fixture
def tmux_env(daemon_env: dict[str, str], tmp_path: Path) -> Iterator[dict[str, str]]:
    """A tmux server of the test's own (TMUX_TMPDIR), started with the test's environment."""
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed (.ci/run installs it)")
    sock_dir = tmp_path / "tmux"
    sock_dir.mkdir()
    env = env_with(
        daemon_env,
        TMUX_TMPDIR=str(sock_dir),
        WATCHDOG_LLM=str(Path(sys.executable).parent / "watchdog-llm"),
        WATCHDOG_LLM_SESSION="wd-test",
        WATCHDOG_LLM_START_CHECK="2",
    )
    env.pop("TMUX", None)
    yield env
    subprocess.run(["tmux", "kill-server"], env=env, capture_output=True, timeout=10)


def start_tmux(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    script = str(ROOT / "scripts" / "start-tmux.sh")
    return subprocess.run([script, env["WATCHDOG_LLM_CONFIG"]], env=env, capture_output=True, text=True, timeout=60)


def test_start_tmux_says_when_the_daemon_dies_at_start_and_where_its_log_is(tmux_env: dict[str, str]) -> None:
    with socket.socket() as taken:  # the gateway's port is someone else's: doctor warns, the daemon cannot start
        taken.bind(("127.0.0.1", int(tmux_env["PUBLIC_PORT"])))
        taken.listen()
        r = start_tmux(tmux_env)
    log = Path(tmux_env["STATE_DIR"]) / "logs" / "daemon.log"
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"the daemon exited at start; its log, {log}, says why" in r.stderr and "started in" not in r.stdout
    assert "cannot start" in log.read_text() and "cannot start" in r.stderr  # the log's tail is shown


def test_start_tmux_starts_a_daemon_that_logs_and_stops_with_its_session(tmux_env: dict[str, str]) -> None:
    r = start_tmux(tmux_env)
    log = Path(tmux_env["STATE_DIR"]) / "logs" / "daemon.log"
    assert r.returncode == 0 and "started in tmux session 'wd-test'" in r.stdout and str(log) in r.stdout, r.stderr

    def serving() -> dict[str, object] | None:
        out = subprocess.run([*CLI, "status", "--json"], env=tmux_env, capture_output=True, text=True).stdout
        doc = json.loads(out) if out.strip() else {}
        return doc if doc.get("state") == "serving" else None

    doc = wait_for(serving, 30, 0.2, "the daemon in tmux to serve")
    pids = [int(doc["daemon_pid"]), *(int(p) for p in doc["model_pids"])]  # type: ignore[call-overload]
    assert "serving" in log.read_text()
    subprocess.run(["tmux", "kill-session", "-t", "wd-test"], env=tmux_env, check=True, timeout=10)
    assert gone(pids, 20), "closing the session (SIGHUP) must stop the daemon and its model tree"
