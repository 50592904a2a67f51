"""`watchdog-llm models|swap|lock|schedule|status` against a real daemon: the CLI runs as a subprocess
with the daemon's environment, and we read what people read (stdout, stderr, exit codes).

One daemon serves the whole module (a catalog of stand-in models; each serves the model id it is
given). Swaps replace its model tree from test to test, so this module checks for leftover processes
its own way: nothing but that daemon's tree may outlive a test, and the tree must go with the daemon.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import NtfySink, daemon_env_for
from daemon_harness import DaemonProc, env_with, gone
from helpers import alive, free_port, wait_for

pytestmark = pytest.mark.timeout(90)
CLI = [sys.executable, "-m", "watchdog_llm"]

CATALOG = """\
default: a
models:
  - name: a
    model: standin/a
    description: the first stand-in
  - name: b
    aliases: [bee]
    model: standin/b
  - name: broken
    model: standin/broken
    env:
      STANDIN_EXIT_AT_ONCE: "3"
  - name: slow
    model: standin/slow
    env:
      STANDIN_STARTUP_S: "3"
"""


@dataclass
class Node:
    env: dict[str, str]
    d: DaemonProc
    tmp: Path


def cli(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    r = subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert "Traceback" not in r.stderr, r.stderr
    return r


def status(env: dict[str, str]) -> dict[str, Any]:
    r = cli(env, "status", "--json")
    data: dict[str, Any] = json.loads(r.stdout)
    return data


def serving(node: Node, model: str, timeout: float = 20) -> dict[str, Any]:
    """Wait (on the daemon's status file: cheaper than a CLI per look) until `model` serves, no swap open."""

    def check() -> dict[str, Any] | None:
        st = node.d.status()
        return st if st.get("state") == "serving" and st.get("model") == model and not st.get("swap") else None

    result: dict[str, Any] = wait_for(check, timeout, 0.02, f"serving {model}")
    return result


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    tmp = tmp_path_factory.mktemp("cli")
    sink = NtfySink()
    env = daemon_env_for(tmp, sink)
    env.pop("WATCHDOG_LLM_LOCK_TOKEN", None)
    (tmp / "models.yaml").write_text(CATALOG)
    env = env_with(env, MODELS=str(tmp / "models.yaml"), STARTUP_TIMEOUT="20")
    n = Node(env, DaemonProc(env), tmp)
    try:
        n.d.wait_state("serving")
        yield n
    finally:
        pids = [n.d.proc.pid, *n.d.status().get("model_pids", [])]
        n.d.cleanup()
        gone(pids, 5)
        sink.close()
        assert n.d.proc.returncode == 0, n.d.log()[-3000:]


@pytest.fixture(autouse=True)
def no_leftover_processes(node: Node) -> Iterator[None]:
    """Overrides conftest's: the module's daemon and its model tree stay; anything else must go."""
    yield

    def strays() -> list[psutil.Process]:
        keep = {node.d.proc.pid}
        with contextlib.suppress(psutil.NoSuchProcess):
            keep |= {p.pid for p in psutil.Process(node.d.proc.pid).children(recursive=True)}
        return [p for p in psutil.Process().children(recursive=True) if p.pid not in keep and alive([p])]

    wait_for(lambda: not strays(), 5, 0.05, "processes other than the daemon's to exit")


# ---- without a daemon ------------------------------------------------------------------------------


def test_without_a_daemon_models_lists_the_config_catalog_and_others_say_not_running(node: Node) -> None:
    env = env_with(node.env, STATE_DIR=str(node.tmp / "elsewhere"))
    r = cli(env, "models")
    assert r.returncode == 3, r.stdout + r.stderr
    assert "daemon not running" in r.stdout and "a  " in r.stdout and "standin/b" in r.stdout
    assert "default a" in r.stdout and "* a" not in r.stdout  # nothing is active without a daemon
    r = cli(env, "models", "--json")
    data = json.loads(r.stdout)
    assert r.returncode == 3 and data["running"] is False and data["active"] is None
    assert [m["name"] for m in data["models"]] == ["a", "b", "broken", "slow"]
    for args in (["swap", "b"], ["lock", "status"], ["schedule", "list"]):
        r = cli(env, *args)
        assert r.returncode == 3 and "daemon not running" in r.stderr, (args, r.stderr)
        assert len(r.stderr.strip().splitlines()) == 1
    # Over TCP, nobody listening on the port is "not running" too.
    tcp = env_with(env, ADMIN_HOST="127.0.0.1", ADMIN_PORT=str(free_port()), ADMIN_TOKEN="t" * 24)
    r = cli(tcp, "lock", "status")
    assert r.returncode == 3 and "daemon not running (nothing answers on 127.0.0.1:" in r.stderr


def test_a_bad_catalog_is_one_config_error_line(node: Node) -> None:
    bad = node.tmp / "bad.yaml"
    bad.write_text("models:\n  - name: a\n    model: [oops\n")
    env = env_with(node.env, STATE_DIR=str(node.tmp / "elsewhere"), MODELS=str(bad))
    r = cli(env, "models")
    assert r.returncode == 2 and "not valid YAML" in r.stderr and str(bad) in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


# ---- with the daemon -------------------------------------------------------------------------------


def test_models_shows_the_catalog_and_the_active_one(node: Node) -> None:
    serving(node, "a")
    r = cli(node.env, "models")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert "default a" in lines[0] and str(node.tmp / "models.yaml") in lines[0]
    assert any(line.startswith("* a ") and "standin/a" in line and "the first stand-in" in line for line in lines)
    assert any(line.startswith("  b ") and "aliases bee" in line for line in lines)
    data = json.loads(cli(node.env, "models", "--json").stdout)
    assert data["running"] is True and data["active"] == "a" and data["default"] == "a"
    assert {m["name"]: m["active"] for m in data["models"]} == {"a": True, "b": False, "broken": False, "slow": False}


def test_swap_wait_prints_the_models_log_and_ends_ready(node: Node) -> None:
    r = cli(node.env, "swap", "bee", "--wait", "--timeout", "30")  # an alias
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    first = out.splitlines()[0]
    assert first.startswith("swap-") and "swap to b" in first
    assert "STAND-IN: this is watchdog-llm's vllm-standin" in out  # the model's own log lines
    assert "'model': 'standin/b'" in out
    assert "==> starting: starting b" in out and out.rstrip().splitlines()[-1].startswith("==> ready: b is serving")
    st = status(node.env)
    assert st["model"] == "b" and st["model_id"] == "standin/b" and st["swap"] is None
    human = cli(node.env, "status").stdout
    assert "model:   b (standin/b)" in human and "swap:" not in human and "lock:" not in human
    # Without --wait: the swap id, at once; --json gives the record.
    r = cli(node.env, "swap", "a", "--json")
    rec = json.loads(r.stdout)
    assert r.returncode == 0 and rec["id"].startswith("swap-") and rec["model"] == "a" and rec["previous"] == "b"
    serving(node, "a")


def test_swap_of_an_unknown_model_names_the_catalog(node: Node) -> None:
    r = cli(node.env, "swap", "no-such-model")
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.strip() == "watchdog-llm: no model 'no-such-model' in the catalog (models: a, b, broken, slow)"
    r = cli(node.env, "swap", "no-such-model", "--json")
    assert r.returncode == 1 and json.loads(r.stdout)["error"] == "unknown_model"


def test_a_failed_swap_prints_the_log_tail_and_the_old_model_comes_back(node: Node) -> None:
    before = serving(node, "a")["model"]
    r = cli(node.env, "swap", "broken", "--wait", "--timeout", "30")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "==> failed: model exited with code 3" in r.stdout
    tail = r.stdout.split("last lines of the model's output:", 1)[1]
    assert "stand-in fault: STANDIN_EXIT_AT_ONCE=3" in tail
    assert "swap to broken failed: model exited with code 3" in r.stderr
    serving(node, before)


def test_the_swap_lock_from_the_cli(node: Node) -> None:
    token_file = node.tmp / "lock.token"
    r = cli(node.env, "lock", "acquire", "--holder", "ci-bot", "--ttl", "300", "--reason", "nightly eval",
            "--token-file", str(token_file))  # fmt: skip
    assert r.returncode == 0, r.stderr
    token = token_file.read_text().strip()
    assert len(token) >= 32 and token not in r.stdout + r.stderr
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert f"token in {token_file} (mode 0600)" in r.stderr
    try:
        r = cli(node.env, "lock", "status")
        assert r.returncode == 0 and "held by 'ci-bot' until " in r.stdout and "nightly eval" in r.stdout
        assert "lock:    held by 'ci-bot'" in cli(node.env, "status").stdout
        # A second holder is refused, naming the first.
        r = cli(node.env, "lock", "acquire", "--holder", "someone-else", "--ttl", "60")
        assert r.returncode == 1 and "held by 'ci-bot'" in r.stderr and r.stdout == ""
        # A swap without the token: 423, named holder and expiry.
        r = cli(node.env, "swap", "b")
        assert r.returncode == 1
        assert "the swap lock is held by 'ci-bot' until 20" in r.stderr and "(nightly eval)" in r.stderr
        assert "--token-file" in r.stderr
        r = cli(node.env, "swap", "b", "--token", "not-the-token")
        assert r.returncode == 1 and "not this lock's token" in r.stderr
        # With the token from a file: it goes through.
        r = cli(node.env, "swap", "b", "--token-file", str(token_file))
        assert r.returncode == 0 and "swap to b stopping" in r.stdout, r.stdout + r.stderr
        serving(node, "b")
        # Extend with the token from the environment.
        r = cli(env_with(node.env, WATCHDOG_LLM_LOCK_TOKEN=token), "lock", "extend", "--ttl", "900")
        assert r.returncode == 0 and "swap lock extended: held by 'ci-bot'" in r.stdout, r.stderr
        r = cli(node.env, "lock", "extend", "--ttl", "900")
        assert r.returncode == 2 and "needs the lock's token" in r.stderr
        # Release without the token is refused; --force works and says so.
        r = cli(node.env, "lock", "release")
        assert r.returncode == 1 and "--force" in r.stderr
    finally:
        r = cli(node.env, "lock", "release", "--force")
    assert r.returncode == 0 and "swap lock of 'ci-bot' released by force" in r.stdout
    assert json.loads(cli(node.env, "lock", "status", "--json").stdout)["locked"] is False
    # Without --token-file the token is printed once, alone on stdout, with a hint to keep it private.
    r = cli(node.env, "lock", "acquire", "--holder", "me", "--ttl", "60")
    token = r.stdout.strip()
    assert r.returncode == 0 and len(token.split()) == 1 and "keep it private" in r.stderr
    r = cli(env_with(node.env, WATCHDOG_LLM_LOCK_TOKEN=token), "lock", "release")
    assert r.returncode == 0 and "swap lock of 'me' released" in r.stdout and "force" not in r.stdout
    r = cli(node.env, "lock", "release")
    assert r.returncode == 0 and "not held" in r.stdout
    serving(node, "b")


def test_schedule_list_on_an_empty_registry(node: Node) -> None:
    r = cli(node.env, "schedule", "list")
    assert r.returncode == 0 and r.stdout.startswith("no schedule entries")
    r = cli(node.env, "schedule", "list", "--json")
    assert r.returncode == 0 and json.loads(r.stdout) == {"entries": []}


def test_swap_wait_times_out_while_deferred_and_the_swap_goes_on(node: Node) -> None:
    target = "a" if node.d.status()["model"] != "a" else "b"
    node.d.start_job("job_31")
    try:
        node.d.wait_state("yielded")
        r = cli(node.env, "swap", target, "--wait", "--timeout", "1")
        assert r.returncode == 4, r.stdout + r.stderr
        # The daemon's stage from the first line on: deferred, and why (not "queued").
        first = r.stdout.splitlines()[0]
        assert f"swap to {target} deferred: waiting: " in first and "job_31" in first, r.stdout
        assert "is still deferred after 1 s; it goes on" in r.stderr
    finally:
        node.d.end_job("job_31")
    serving(node, target)  # on resume, the deferred swap's model


def test_swap_wait_rides_out_a_daemon_restart(node: Node) -> None:
    """The stream ends when the daemon stops; the CLI polls until the restarted daemon completes the swap."""
    p = subprocess.Popen(
        [*CLI, "swap", "slow", "--wait", "--timeout", "40"],
        env=node.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for(lambda: (node.d.status().get("swap") or {}).get("state") == "starting", 15, 0.02, "swap starting")
        human = cli(node.env, "status").stdout
        assert "swap:    swap-" in human and " to slow from " in human and ": starting (starting slow)" in human
        pids = node.d.status()["model_pids"]
        node.d.proc.send_signal(signal.SIGTERM)
        assert node.d.proc.wait(20) == 0
        gone(pids, 5)
        node.d = DaemonProc(node.env)
        out, err = p.communicate(timeout=40)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 0, out + err
    assert "the daemon is stopping; polling the swap every second" in out
    assert out.rstrip().splitlines()[-1].startswith("==> ready: slow is serving")
    assert serving(node, "slow")["model_id"] == "standin/slow"


def test_token_file_must_be_readable_and_not_empty(node: Node) -> None:
    empty = node.tmp / "empty.token"
    empty.write_text("\n")
    os.chmod(empty, 0o600)
    r = cli(node.env, "swap", "a", "--token-file", str(empty))
    assert r.returncode == 2 and "is empty" in r.stderr
    r = cli(node.env, "swap", "a", "--token-file", str(node.tmp / "missing.token"))
    assert r.returncode == 2 and "cannot be read" in r.stderr
