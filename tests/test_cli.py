"""The command line and the launch contracts: systemd notifications, signals, doctor, notify-test, demo."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from daemon_harness import DaemonProc, env_with, gone
from helpers import alive, wait_for

pytestmark = pytest.mark.timeout(90)
CLI = [sys.executable, "-m", "watchdog_llm"]


def cli(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_systemd_ready_status_watchdog_and_stopping(daemon_env: dict[str, str], tmp_path: Path) -> None:
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(0.2)
    messages: list[str] = []

    def drain() -> list[str]:
        while True:
            try:
                messages.extend(sock.recv(4096).decode().splitlines())
            except TimeoutError:
                return messages

    d = DaemonProc(env_with(daemon_env, NOTIFY_SOCKET=str(sock_path), WATCHDOG_USEC="400000"))
    try:
        d.wait_state("serving")
        wait_for(lambda: "READY=1" in drain() and any(m.startswith("STATUS=serving") for m in messages), 10)
        pings = messages.count("WATCHDOG=1")
        wait_for(lambda: drain().count("WATCHDOG=1") >= pings + 2, 5, what="watchdog pings every WATCHDOG_USEC/2")
        assert d.terminate() == 0
        assert "STOPPING=1" in drain()
    finally:
        d.cleanup()
        sock.close()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP])
def test_sigint_and_sighup_stop_cleanly(daemon_env: dict[str, str], sig: signal.Signals) -> None:
    d = DaemonProc(daemon_env)
    try:
        pids = d.wait_state("serving")["model_pids"]
        d.proc.send_signal(sig)
        assert d.proc.wait(20) == 0
        gone(pids, 2)
        assert f"{sig.name} received" in d.log()
    finally:
        d.cleanup()


def test_a_second_signal_skips_the_grace_period(daemon_env: dict[str, str]) -> None:
    d = DaemonProc(env_with(daemon_env, STANDIN_IGNORE_SIGTERM="1", YIELD_GRACE="60"))
    try:
        pids = d.wait_state("serving")["model_pids"]
        d.proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)  # well apart: a repeat within DUPLICATE_SIGNAL_S counts as the same request
        assert d.proc.poll() is None, "still inside the 60 s grace"
        t0 = time.monotonic()
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(10) == 0
        assert time.monotonic() - t0 < 5
        gone(pids, 2)
    finally:
        d.cleanup()


def test_the_same_signal_twice_at_once_is_one_request(daemon_env: dict[str, str]) -> None:
    """A plain scancel under the srun launcher delivers SIGTERM twice within milliseconds: that must
    not cut the model's grace short; a later one still does."""
    d = DaemonProc(env_with(daemon_env, STANDIN_IGNORE_SIGTERM="1", YIELD_GRACE="60"))
    try:
        pids = d.wait_state("serving")["model_pids"]
        d.proc.send_signal(signal.SIGTERM)
        time.sleep(0.02)
        d.proc.send_signal(signal.SIGTERM)
        time.sleep(1.0)
        assert d.proc.poll() is None and alive(pids), "the duplicate skipped the grace period"
        assert "the same request, ignored" in d.log()
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(10) == 0
        gone(pids, 2)
    finally:
        d.cleanup()


@pytest.mark.parametrize("case", ["other-owner", "world-writable"])
def test_a_state_dir_others_control_is_refused(daemon_env: dict[str, str], tmp_path: Path, case: str) -> None:
    """Someone who made STATE_DIR first (a predictable /tmp name) could plant pid records for us to
    kill, or a symlink for us to write through: refuse, with one line."""
    state = tmp_path / "shared-state"
    state.mkdir()
    if case == "other-owner":
        os.chown(state, 65534, 65534)
    else:
        state.chmod(0o777)
    r = cli(env_with(daemon_env, STATE_DIR=str(state)), "run")
    assert r.returncode == 2 and "STATE_DIR" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert ("not to us" if case == "other-owner" else "writable by other users") in r.stderr
    assert not (state / "children.json").exists()


def test_doctor_reports_each_check(daemon_env: dict[str, str], ntfy) -> None:  # type: ignore[no-untyped-def]
    r = cli(daemon_env, "doctor", "--send")
    out = r.stdout
    assert "ok    config parsed" in out and "LLM_BIN" in out and "would run:" in out
    assert "detection (cgroup) works" in out and "cgroup v2" in out
    assert "notification URL(s) parse" in out and "test notification sent" in out
    assert "GPU" in out  # none here: a warning, not a failure
    assert "ok    1 public API key(s)" in out and "gateway would listen on http://127.0.0.1:" in out
    assert "admin API on " in out and "admin.sock (mode 0600)" in out
    assert r.returncode == 0, out + r.stderr
    wait_for(lambda: any("doctor" in t for t in ntfy.titles()), 5)


def test_doctor_fails_on_bad_keys_and_warns_when_open(daemon_env: dict[str, str]) -> None:
    r = cli(env_with(daemon_env, PUBLIC_API_KEYS="bob:tooshort"), "doctor")
    assert r.returncode == 1 and "FAIL  PUBLIC_API_KEYS entry 1: key too short" in r.stdout
    assert "tooshort" not in r.stdout
    env = dict(daemon_env)
    del env["PUBLIC_API_KEYS"]
    r = cli(env, "doctor")
    assert "public endpoint would be open to anyone" in r.stdout


def test_doctor_fails_on_a_missing_model_binary(daemon_env: dict[str, str], tmp_path: Path) -> None:
    r = cli(env_with(daemon_env, LLM_BIN=str(tmp_path / "nope")), "doctor")
    assert r.returncode == 1 and "FAIL  LLM_BIN=" in r.stdout and "Traceback" not in r.stderr


def test_notify_test_sends_and_reports(daemon_env: dict[str, str], ntfy) -> None:  # type: ignore[no-untyped-def]
    r = cli(daemon_env, "notify-test")
    assert r.returncode == 0 and "sent" in r.stdout
    assert ntfy.titles() == ["[testnode] watchdog-llm test"]
    r = cli(env_with(daemon_env, NOTIFY_URLS="notaservice://x"), "notify-test")
    assert r.returncode == 2 and "notaservice" in r.stderr and "Traceback" not in r.stderr


def test_bad_notification_url_stops_startup_with_one_line(daemon_env: dict[str, str]) -> None:
    r = cli(env_with(daemon_env, NOTIFY_URLS="notaservice://x"), "run")
    assert r.returncode == 2 and "NOTIFY_URLS" in r.stderr and "Traceback" not in r.stderr


def test_status_without_a_daemon(daemon_env: dict[str, str]) -> None:
    r = cli(daemon_env, "status")
    assert r.returncode == 3 and "not running" in r.stdout


def test_missing_config_file_named_explicitly(daemon_env: dict[str, str], tmp_path: Path) -> None:
    r = cli(daemon_env, "--config", str(tmp_path / "nope.env"), "run")
    assert r.returncode == 2 and "nope.env" in r.stderr and "not found" in r.stderr


def test_config_example_documents_every_setting() -> None:
    from watchdog_llm.config import Settings

    example = (Path(__file__).parent.parent / "config.env.example").read_text()
    names = {line.split("=", 1)[0] for line in example.splitlines() if line and not line.startswith("#")}
    assert names == {n.upper() for n in Settings.model_fields}


def test_demo_runs_and_leaves_nothing(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STANDIN_", "SLURM_"))}
    r = subprocess.run([*CLI, "demo"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    for needle in ("STAND-IN", "serving", "on GPUs 2,3 of 4", "still serving on GPUs 2,3", "yielded to job_4242",
                   "NVML: none of our processes left on GPUs 2,3", "serving again", "exited with code 0",
                   "processes of ours left running: 0", "GPUs yielded",
                   "stopping -> starting -> ready", "now serving small-chat", "model swapped"):  # fmt: skip
        assert needle in out, f"{needle!r} missing from the demo's output:\n{out}"


@pytest.mark.parametrize("args", ["--api_key secret", "--api-key=secret", "--api secret", "--port 9"])
def test_reserved_vllm_flags_are_refused(daemon_env: dict[str, str], tmp_path: Path, args: str) -> None:
    r = cli(env_with(daemon_env, VLLM_ARGS=args), "run")
    assert r.returncode == 2 and "VLLM_ARGS" in r.stderr and "not allowed" in r.stderr
    assert "Traceback" not in r.stderr
    assert "secret" not in r.stderr, "a key given by mistake must not be echoed back"


def test_config_file_that_is_not_utf8(daemon_env: dict[str, str], tmp_path: Path) -> None:
    cfg = tmp_path / "latin1.env"
    cfg.write_bytes("# caf\xe9\nMODEL_NAME=m\n".encode("latin-1"))
    r = cli(env_with(daemon_env, WATCHDOG_LLM_CONFIG=str(cfg)), "run")
    assert r.returncode == 2 and "not UTF-8" in r.stderr and "Traceback" not in r.stderr


def test_doctor_checks_the_model_catalog(daemon_env: dict[str, str], tmp_path: Path) -> None:
    local = tmp_path / "weights"
    local.mkdir()
    (tmp_path / "models.yaml").write_text(
        "default: b\n"
        "models:\n"
        "  - {name: a, model: standin/a}\n"
        f"  - {{name: b, aliases: [bee], model: {local}}}\n"
        f"  - {{name: gone, model: {tmp_path / 'no-such-dir'}}}\n"
        "  - {name: big, model: standin/big, gpus: 4}\n"
    )
    env = env_with(daemon_env, MODELS=str(tmp_path / "models.yaml"), GPU_IDS="2,3", NUM_GPUS="2")
    r = cli(env, "doctor")
    out = r.stdout
    assert f"ok    MODELS {tmp_path / 'models.yaml'}: 4 model(s), default b" in out
    assert "MODEL_NAME and VLLM_ARGS are not used" in out
    assert "ok    model 'a': standin/a (hub id" in out and "2 GPUs" in out
    assert f"ok    model 'b' (default): {local} exists, 2 GPUs, aliases bee" in out
    assert f"FAIL  model 'gone': local model path {tmp_path / 'no-such-dir'} does not exist" in out
    assert "FAIL  model 'big' needs 4 GPU(s); 2 can be ours (GPU 2,3)" in out
    assert "would run: " in out and "serve standin/big --tensor-parallel-size 4" in out
    assert r.returncode == 1 and "2 check(s) failed" in out and "Traceback" not in r.stderr


def test_doctor_reports_a_bad_catalog_in_one_line(daemon_env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "models.yaml").write_text("- {name: a, model: x}\n- {name: b, aliases: [a], model: y}\n")
    r = cli(env_with(daemon_env, MODELS=str(tmp_path / "models.yaml")), "doctor")
    fails = [line for line in r.stdout.splitlines() if line.startswith("FAIL")]
    assert fails == [f"FAIL  MODELS {tmp_path / 'models.yaml'}: model 'b': alias 'a' is already used by model 'a'"]
    assert r.returncode == 1 and "Traceback" not in r.stderr
    r = cli(daemon_env, "doctor")  # no MODELS: MODEL_NAME is the catalog
    assert "ok    model from MODEL_NAME: test (set MODELS for a catalog to swap between)" in r.stdout
    assert "models' GPU counts not checked" in r.stdout and r.returncode == 0, r.stdout


def test_status_after_a_failed_start_shows_real_times_and_the_config(
    daemon_env: dict[str, str], tmp_path: Path
) -> None:
    cfg = tmp_path / "site.env"
    cfg.write_text("RESUME_COOLDOWN=5\n")
    env = env_with(daemon_env, WATCHDOG_LLM_CONFIG=str(cfg), NOTIFY_URLS="notaservice://x")
    assert cli(env, "run").returncode == 2
    r = cli(env, "status")
    assert r.returncode == 3, r.stdout + r.stderr
    head = r.stdout.splitlines()[0]
    # "since 5.7 h ago" was the machine's uptime: the monotonic clock's zero taken for a time.
    assert "not running (last state: init since " in head and " s ago)" in head, head
    assert f"config:  {cfg.resolve()}" in r.stdout, r.stdout
    r = cli(env_with(daemon_env, STATE_DIR=str(tmp_path / "never")), "status")
    assert r.returncode == 3 and "no status in" in r.stdout and "; config: /" in r.stdout, r.stdout


@pytest.mark.parametrize("command", [["run"], ["doctor"], ["status"], ["lock", "status"], ["models"]])
def test_config_may_follow_the_command(daemon_env: dict[str, str], tmp_path: Path, command: list[str]) -> None:
    r = cli(daemon_env, *command, "--config", str(tmp_path / "nope.env"))
    assert r.returncode == 2 and "nope.env" in r.stderr and "not found" in r.stderr, r.stdout + r.stderr
    assert "unrecognized arguments" not in r.stderr


def test_ntfy_topic_is_checked_by_ntfys_rules(daemon_env: dict[str, str]) -> None:
    for command in ("doctor", "notify-test", "run"):
        r = cli(env_with(daemon_env, NTFY_TOPIC="my topic!"), command)
        assert r.returncode == 2 and "bad setting NTFY_TOPIC='<hidden>'" in r.stderr, r.stdout + r.stderr
        assert "letters, digits" in r.stderr and "my topic" not in r.stderr + r.stdout
    from watchdog_llm.config import ntfy_url

    assert ntfy_url("https://ntfy.example", "alerts_lab-3") == "ntfys://ntfy.example/alerts_lab-3"


def test_a_misspelled_setting_in_the_environment_is_named(daemon_env: dict[str, str]) -> None:
    r = cli(env_with(daemon_env, RESUME_COOLDOWM="5"), "doctor")
    assert "warn  RESUME_COOLDOWM in the environment is not a setting (did you mean RESUME_COOLDOWN?)" in r.stdout
    assert "HOME" not in r.stdout.replace("home", "")  # the environment's other variables are not ours
    assert r.returncode == 0, r.stdout


def test_doctor_reports_every_catalog_problem_at_once(daemon_env: dict[str, str], tmp_path: Path) -> None:
    (tmp_path / "models.yaml").write_text(
        "default: c\n"
        "models:\n"
        "  - {name: a, model: x, gpus: -1}\n"
        "  - {name: b, model: y, colour: red}\n"
        "  - {name: c, model: z}\n"
        "  - {name: d, aliases: [c], model: w}\n"
    )
    r = cli(env_with(daemon_env, MODELS=str(tmp_path / "models.yaml")), "doctor")
    fails = [line for line in r.stdout.splitlines() if line.startswith("FAIL")]
    assert len(fails) == 3, r.stdout
    assert "model 'a': gpus" in fails[0] and "model 'b': unknown field 'colour'" in fails[1]
    assert "model 'd': alias 'c' is already used by model 'c'" in fails[2]
    assert r.returncode == 1 and "Traceback" not in r.stderr


@pytest.mark.parametrize(
    ("args", "why"),
    [
        (["--real", "--vllm", "/nonexistent/vllm"], "--vllm /nonexistent/vllm: not an executable"),
        (["--model", "/"], "--model / has no config.json"),  # --model alone means --real
    ],
)
def test_demo_real_without_vllm_says_how_to_get_it(tmp_path: Path, args: list[str], why: str) -> None:
    r = subprocess.run([*CLI, "demo", *args], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == "", r.stdout + r.stderr
    assert "make real-vllm" in r.stderr and "pip install vllm" in r.stderr and why in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
