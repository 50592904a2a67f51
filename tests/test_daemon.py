"""The real daemon, end to end: stand-in model tree, scratch cgroup tree (real inotify), local ntfy.

Each test starts `python -m watchdog_llm run` as a user would and checks what a user would notice:
states in status.json, processes gone, notifications received, exit codes, log lines.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from daemon_harness import env_with, gone, start, tree_names
from helpers import alive, wait_for

pytestmark = pytest.mark.timeout(90)


def test_yield_and_resume_cycle(daemons, daemon_env, ntfy) -> None:
    d = start(daemons, env_with(daemon_env, NUM_GPUS="2"))
    st = d.wait_state("serving")
    pids = st["model_pids"]
    assert (
        tree_names(pids) == ["VLLM::EngineCore", "VLLM::Worker_TP0", "VLLM::Worker_TP1", "vllm-standin"]
        or len(pids) == 4
    )

    t0 = time.monotonic()
    d.start_job("job_101")
    gone(pids)
    took = time.monotonic() - t0
    st = d.wait_state("yielded")
    y = st["last_yield"]
    assert y["job"] == "job_101" and st["jobs"] == ["job_101"]
    assert y["detect_ms"] is not None and y["stop_ms"] is not None and y["survivors"] == 0
    assert took < 3.0, f"model tree took {took:.2f} s to go"

    d.end_job("job_101")
    st = d.wait_state("serving")
    assert st["model_run"] == 2 and not set(st["model_pids"]) & set(pids)

    assert d.terminate() == 0
    gone(st["model_pids"])
    wait_for(lambda: any("stopped" in t for t in ntfy.titles()), 10, what="stopped notification")
    titles = ntfy.titles()
    assert any("model online" in t for t in titles), titles
    assert any("GPUs yielded" in t for t in titles), titles
    yielded = next(m for m in ntfy.received if "yielded" in str(m.get("title")))
    assert "job_101" in yielded["message"] and "ms" in yielded["message"]
    resumed = [m for m in ntfy.received if "online" in str(m.get("title"))][-1]
    assert "resumed after" in resumed["message"]
    assert all(str(m.get("title", "")).startswith("[testnode]") for m in ntfy.received)
    assert json.loads((d.state_dir / "status.json").read_text())["state"] == "stopped"


def test_jobs_present_at_startup_wait(daemons, daemon_env) -> None:
    root = Path(daemon_env["CGROUP_ROOT"])
    job = root / "system.slice" / "slurmstepd.scope" / "job_7"
    job.mkdir()
    d = start(daemons, daemon_env)
    st = d.wait_state("yielded")
    assert st["jobs"] == ["job_7"] and st["model_pids"] == [] and st["model_run"] == 0
    job.rmdir()
    d.wait_state("serving")


def test_job_arriving_during_startup_still_yields(daemons, daemon_env) -> None:
    d = start(daemons, env_with(daemon_env, STANDIN_STARTUP_S="5"))
    st = wait_for(lambda: (s := d.status()).get("state") == "starting" and len(s["model_pids"]) >= 2 and s, 20)
    # Give the tree time to be recorded, then a job arrives before the model is ready.
    time.sleep(0.6)
    pids = [p for p in d.status()["model_pids"]] or st["model_pids"]
    d.start_job("job_202")
    st = d.wait_state("yielded")
    gone(pids)
    assert st["last_yield"]["job"] == "job_202"


def test_job_inside_cooldown_keeps_us_yielded(daemons, daemon_env) -> None:
    d = start(daemons, env_with(daemon_env, RESUME_COOLDOWN="1.5"))
    d.wait_state("serving")
    d.start_job("job_1")
    d.wait_state("yielded")
    d.end_job("job_1")
    d.wait_state("cooldown")
    d.start_job("job_2")
    st = d.wait_state("yielded")
    time.sleep(2.0)  # longer than the cooldown: the stale timer must not start the model
    st = d.status()
    assert st["state"] == "yielded" and st["model_run"] == 1 and st["jobs"] == ["job_2"]


def test_own_job_is_never_a_reason_to_yield(daemons, daemon_env) -> None:
    d = start(daemons, env_with(daemon_env, SLURM_JOB_ID="77"))
    d.wait_state("serving")
    d.start_job("job_77")
    time.sleep(0.5)
    assert d.status()["state"] == "serving"
    d.start_job("job_78")
    d.wait_state("yielded")


def test_sigterm_ignoring_tree_is_killed_within_grace(daemons, daemon_env) -> None:
    d = start(daemons, env_with(daemon_env, STANDIN_IGNORE_SIGTERM="1", YIELD_GRACE="1", NUM_GPUS="2"))
    pids = d.wait_state("serving")["model_pids"]
    t0 = time.monotonic()
    d.start_job("job_3")
    gone(pids, timeout=5)
    took = time.monotonic() - t0
    assert 0.9 < took < 3.0, f"tree gone after {took:.2f} s with YIELD_GRACE=1"
    st = d.wait_state("yielded")
    assert st["last_yield"]["survivors"] == 0
    assert "SIGKILL" in d.log()


def test_setsid_workers_are_killed_too(daemons, daemon_env) -> None:
    env = env_with(daemon_env, STANDIN_SETSID_WORKER="1", STANDIN_IGNORE_SIGTERM="1", YIELD_GRACE="0.5", NUM_GPUS="2")
    d = start(daemons, env)
    d.wait_state("serving")
    time.sleep(0.3)
    pids = d.status()["model_pids"]
    sids = {os.getsid(p) for p in alive(pids)}
    assert len(sids) > 1, "the stand-in's workers should have left the session"
    d.start_job("job_4")
    d.wait_state("yielded")
    gone(pids, timeout=3)


def test_model_exiting_at_once_ends_in_failed_not_a_hot_loop(daemons, daemon_env, ntfy) -> None:
    env = env_with(daemon_env, STANDIN_EXIT_AT_ONCE="3", RESTART_LIMIT="3", RESTART_BACKOFF_MAX="0.3")
    d = start(daemons, env)
    st = d.wait_state("failed", timeout=30)
    assert st["model_run"] == 3 and st["last_exit"] == 3 and st["model_pids"] == []
    wait_for(lambda: any("failed" in t for t in ntfy.titles()), 10, what="failed notification")
    time.sleep(1.0)
    assert d.status()["model_run"] == 3, "no restart after failed"
    assert d.terminate() == 0


def test_crash_while_serving_restarts_and_cleans_the_orphaned_engine(daemons, daemon_env, ntfy) -> None:
    d = start(daemons, env_with(daemon_env, STANDIN_CRASH_AFTER_S="1.0", RESTART_LIMIT="10"))
    st = d.wait_state("serving")
    first = st["model_pids"]
    d.wait_state("backoff")
    gone(first, timeout=5)  # the API server died; its engine and workers must not be left behind
    st = wait_for(lambda: (s := d.status()).get("model_run", 0) >= 2 and s, 20)
    wait_for(lambda: any("crashed" in t for t in ntfy.titles()), 10, what="crash notification")


def test_sigterm_during_model_startup(daemons, daemon_env) -> None:
    d = start(daemons, env_with(daemon_env, STANDIN_STARTUP_S="30"))
    st = wait_for(lambda: (s := d.status()).get("state") == "starting" and s.get("model_pids") and s, 20)
    time.sleep(0.6)
    pids = d.status()["model_pids"]
    t0 = time.monotonic()
    assert d.terminate() == 0
    assert time.monotonic() - t0 < 5
    gone(pids, timeout=2)
    assert st


def test_llm_bin_missing_is_one_clear_line(daemon_env, tmp_path) -> None:
    env = env_with(daemon_env, LLM_BIN=str(tmp_path / "no-such-vllm"))
    r = subprocess.run(
        [sys.executable, "-m", "watchdog_llm", "run"], env=env, capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 2
    assert "LLM_BIN" in r.stderr and "no-such-vllm" in r.stderr and "Traceback" not in r.stderr


def test_bad_settings_are_one_line_each(daemon_env, tmp_path) -> None:
    cfg = tmp_path / "bad.env"
    cfg.write_text("YIELD_GRACE=soon\nSERVER_PORT=99999\nMODLE_NAME=x\n")
    env = env_with(daemon_env, WATCHDOG_LLM_CONFIG=str(cfg))
    del env["YIELD_GRACE"], env["SERVER_PORT"]  # the environment would override the file
    r = subprocess.run(
        [sys.executable, "-m", "watchdog_llm", "run"], env=env, capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 3, lines
    assert any("YIELD_GRACE='soon'" in line for line in lines)
    assert any("SERVER_PORT=" in line and "99999" in line for line in lines)
    assert any("MODLE_NAME" in line and "did you mean MODEL_NAME" in line for line in lines)


def test_state_dir_not_writable(daemon_env, tmp_path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    env = env_with(daemon_env, STATE_DIR=str(blocker / "state"))
    r = subprocess.run(
        [sys.executable, "-m", "watchdog_llm", "run"], env=env, capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 2 and "STATE_DIR" in r.stderr and "not writable" in r.stderr
    assert "Traceback" not in r.stderr


def test_cgroup_root_missing_at_start_then_created(daemons, daemon_env, tmp_path) -> None:
    root = tmp_path / "later-cgroup"
    d = start(daemons, env_with(daemon_env, CGROUP_ROOT=str(root)))
    pids = d.wait_state("serving")["model_pids"]
    (root / "system.slice" / "slurmstepd.scope" / "job_9").mkdir(parents=True)
    d.wait_state("yielded")
    gone(pids)


def test_slow_ntfy_never_delays_a_yield(daemons, daemon_env, ntfy) -> None:
    ntfy.delay = 10.0
    d = start(daemons, daemon_env)
    pids = d.wait_state("serving")["model_pids"]
    t0 = time.monotonic()
    d.start_job("job_5")
    gone(pids)
    assert time.monotonic() - t0 < 5.0
    assert d.wait_state("yielded")["last_yield"]["stop_ms"] < 5000
    t1 = time.monotonic()
    assert d.terminate() == 0
    assert time.monotonic() - t1 < 15  # the final flush is bounded


def test_ntfy_down_is_logged_and_harmless(daemons, daemon_env) -> None:
    from helpers import free_port

    d = start(daemons, env_with(daemon_env, NOTIFY_URLS=f"ntfy://127.0.0.1:{free_port()}/x"))
    d.wait_state("serving")
    d.start_job("job_6")
    d.wait_state("yielded")
    wait_for(lambda: (d.status().get("notifications") or {}).get("failed", 0) >= 1, 15, what="a failed send")
    assert d.terminate() == 0


def test_leftovers_of_a_killed_daemon_are_cleaned_up(daemons, daemon_env) -> None:
    d = start(daemons, env_with(daemon_env, NUM_GPUS="2"))
    d.wait_state("serving")
    time.sleep(0.3)
    pids = d.status()["model_pids"]
    d.kill_hard()
    time.sleep(0.3)
    assert alive(pids), "the model tree survives a SIGKILLed daemon (that is the point)"
    d2 = start(daemons, daemon_env)
    # Leftovers are killed before the new model starts on the same port.
    d2.wait_state("serving")
    gone(pids, timeout=5)
    assert "leftover" in d2.log()


def test_second_daemon_on_the_same_state_dir_is_refused(daemons, daemon_env) -> None:
    d = start(daemons, daemon_env)
    d.wait_state("serving")
    r = subprocess.run(
        [sys.executable, "-m", "watchdog_llm", "run"], env=daemon_env, capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 2 and "another watchdog-llm" in r.stderr
    assert d.status()["state"] == "serving" and alive(d.status()["model_pids"])


def test_port_taken_by_someone_else_is_not_mistaken_for_our_model(daemons, daemon_env, ntfy) -> None:
    # Another user's server on SERVER_PORT answers /health, but cannot know our internal key; and with
    # vLLM on its unix socket (the default) the port is not ours to need at all. (Over TCP, see
    # test_gateway_daemon.py: the model moves to another port.)
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", int(daemon_env["SERVER_PORT"])))
    s.listen()
    try:
        d = start(daemons, env_with(daemon_env, RESTART_LIMIT="2"))
        st = d.wait_state("serving", timeout=20)
        assert st["model_run"] == 1 and st["model_url"].startswith("unix:")
        assert not any("port taken" in t for t in ntfy.titles())
    finally:
        s.close()


def test_status_command(daemons, daemon_env) -> None:
    d = start(daemons, daemon_env)
    d.wait_state("serving")
    r = subprocess.run(
        [sys.executable, "-m", "watchdog_llm", "status", "--json"], env=daemon_env, capture_output=True, text=True
    )
    assert r.returncode == 0
    data = json.loads(r.stdout)
    assert data["running"] is True and data["state"] == "serving"
    r = subprocess.run([sys.executable, "-m", "watchdog_llm", "status"], env=daemon_env, capture_output=True, text=True)
    assert r.returncode == 0 and "serving" in r.stdout
    d.terminate()
    r = subprocess.run([sys.executable, "-m", "watchdog_llm", "status"], env=daemon_env, capture_output=True, text=True)
    assert r.returncode == 3 and "not running" in r.stdout


def test_tunnel_crash_is_restarted_and_never_orphaned(daemons, daemon_env, ntfy, tmp_path) -> None:
    from helpers import bin_path

    # Only the tunnel crashes: a wrapper sets the stand-in's fault knob for cloudflared alone.
    wrapper = tmp_path / "cloudflared"
    wrapper.write_text(f'#!/bin/sh\nSTANDIN_CRASH_AFTER_S=0.8 exec {bin_path("cloudflared-standin")} "$@"\n')
    wrapper.chmod(0o755)
    env = env_with(daemon_env, CLOUDFLARED_BIN=str(wrapper), TUNNEL_TOKEN="secret-token-value")
    d = start(daemons, env)
    d.wait_state("serving")
    wait_for(lambda: (d.status().get("tunnel") or {}).get("ready"), 10, what="tunnel ready")
    wait_for(lambda: any("tunnel down" in t for t in ntfy.titles()), 15, what="tunnel down notification")
    wait_for(lambda: (d.status().get("tunnel") or {}).get("ready"), 15, what="tunnel ready again")
    # The token reached cloudflared by environment, never by argv.
    for pid in (d.status()["tunnel"] or {}).get("pids", []):
        assert "secret-token-value" not in " ".join(psutil.Process(pid).cmdline())
    assert d.terminate() == 0


def test_no_secret_setting_reaches_any_child(daemons, daemon_env, ntfy) -> None:
    """Every setting config.py marks secret, set to a recognisable value: none is in the environment or
    argv of any process of the model's tree or the tunnel's (other users can read argv; a model's
    environment ends up in crash dumps). cloudflared gets its own TUNNEL_TOKEN, by environment only."""
    from watchdog_llm.config import SECRET_SETTINGS

    values = {
        "API_KEY": "sk-old-secret-0001",
        "PUBLIC_API_KEYS": f"test:{daemon_env['PUBLIC_API_KEYS'].split(':', 1)[1]},b:sk-pub-secret-0002",
        "ADMIN_TOKEN": "admin-secret-0003-long-enough",
        "WEBHOOK_SECRET": "hmac-secret-0004",
        "WEBHOOK_URLS": "http://127.0.0.1:9/hook/url-secret-0005",
        "NTFY_TOPIC": "topic-secret-0006",
        "NOTIFY_URLS": ntfy.url + "?tag=url-secret-0007",
        "TUNNEL_TOKEN": "tunnel-secret-0008",
    }
    assert set(values) == SECRET_SETTINGS, "a new secret setting needs a value here"
    from helpers import bin_path

    cf = bin_path("cloudflared-standin")
    d = start(daemons, env_with(daemon_env, NTFY_SERVER=f"http://127.0.0.1:{ntfy.port}", CLOUDFLARED_BIN=cf, **values))
    st = d.wait_state("serving")
    tunnel = wait_for(lambda: (t := d.status().get("tunnel") or {}).get("ready") and t, 10, what="tunnel ready")
    needles = [v.split(":", 1)[-1] for v in values.values()] + [v.rsplit("/", 1)[-1] for v in values.values()]
    checked = 0
    for pid in [*st["model_pids"], *tunnel["pids"]]:
        proc = psutil.Process(pid)
        environ = proc.environ()
        argv = " ".join(proc.cmdline())
        for name, value in environ.items():
            if pid in tunnel["pids"] and name == "TUNNEL_TOKEN":
                assert value == values["TUNNEL_TOKEN"]
                continue
            leaked = [n for n in needles if n in value]
            assert not leaked, f"{proc.name()} ({pid}) has {name} carrying a secret"
        assert not [n for n in needles if n in argv], f"a secret on the command line of {proc.name()}"
        checked += 1
    assert tunnel["pids"] and checked == len(st["model_pids"]) + len(tunnel["pids"]) >= 3
    assert d.terminate() == 0


def test_a_flood_of_idle_connections_never_stops_a_yield(daemons, daemon_env) -> None:
    """What a neighbour did to the daemon with 2,000 idle connections under a 1,024-file limit:
    here the daemon caps connections below its limit, refuses the rest at once, and yields as fast."""
    d = start(daemons, env_with(daemon_env, NUM_GPUS="2", HEAD_TIMEOUT="60"), nofile=512)
    pids = d.wait_state("serving")["model_pids"]
    port = int(daemon_env["PUBLIC_PORT"])
    held, refused = [], 0
    try:
        for _ in range(600):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            held.append(s)
        waiting, deadline = set(held), time.monotonic() + 10
        while waiting and time.monotonic() < deadline and len(waiting) > 42:
            ready, _, _ = select.select(list(waiting)[:500], [], [], 0.2)
            for s in ready:
                with contextlib.suppress(OSError):
                    refused += s.recv(12).startswith(b"HTTP/1.1 503")
                waiting.discard(s)
        assert refused >= len(held) - 42, f"only {refused} of {len(held)} connections refused"
        t0 = time.monotonic()
        d.start_job("job_77")
        gone(pids, timeout=5)
        took = time.monotonic() - t0
        st = d.wait_state("yielded")
    finally:
        for s in held:
            s.close()
    assert took < 3.0, f"model tree took {took:.2f} s to go under a connection flood"
    assert st["last_yield"]["survivors"] == 0
    log = d.log()
    assert "MAX_CONNECTIONS=1024 lowered to 42" in log
    assert "Too many open files" not in log
    assert log.count("connection refused") <= 3, "one refusal line per 10 s, not one per connection"
    assert d.terminate() == 0


def test_state_dir_and_its_files_are_ours_alone(daemons, daemon_env) -> None:
    """A STATE_DIR made 0755 beforehand (mkdir under a 022 umask) is closed to other users, and the
    files that name jobs, pids and paths are 0600."""
    state = Path(daemon_env["STATE_DIR"])
    state.mkdir(parents=True, exist_ok=True)
    (state / "logs").mkdir(exist_ok=True)
    os.chmod(state, 0o755)
    os.chmod(state / "logs", 0o755)
    d = start(daemons, daemon_env)
    d.wait_state("serving")
    for p in (state, state / "logs"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o700, p
    for name in ("status.json", "children.json"):
        assert stat.S_IMODE((state / name).stat().st_mode) == 0o600, name
    assert "readable by other users (mode 0755): made it 0700" in d.log()
    assert d.terminate() == 0


def _fill(directory: Path) -> None:
    """Write until the filesystem has not one byte left."""
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (65536, 1):
            with contextlib.suppress(OSError):
                while os.write(fd, b"\0" * size):
                    pass
    finally:
        os.close(fd)


def _admin_status(state: Path) -> dict:
    import httpx

    with httpx.Client(transport=httpx.HTTPTransport(uds=str(state / "admin.sock")), timeout=5) as c:
        try:
            return dict(c.get("http://admin/api/status").json())
        except httpx.TransportError:  # not listening yet (a daemon starting)
            return {}


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_a_full_disk_loses_no_process(daemons, daemon_env, tmp_path) -> None:
    state = Path(daemon_env["STATE_DIR"])
    state.mkdir(mode=0o700)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(state)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        env = env_with(daemon_env, NUM_GPUS="2")
        d = start(daemons, env)
        first = d.wait_state("serving")["model_pids"]
        _fill(state)
        # A yield and a resume with STATE_DIR full: status.json, children.json and the model's
        # output log can no longer be written.
        d.start_job("job_81")
        gone(first)
        wait_for(lambda: _admin_status(state).get("state") == "yielded", 10, what="yielded")
        d.end_job("job_81")
        st = wait_for(lambda: (s := _admin_status(state)).get("state") == "serving" and s, 20, what="serving again")
        second = st["model_pids"]
        assert st["model_run"] == 2 and len(second) == 4 and not set(second) & set(first)
        assert not (state / "children.json").read_text().count(str(second[0]))  # unrecorded: the disk is full
        log = d.log()
        assert log.count("cannot record child pids") == 1, log
        assert log.count("cannot write the output log") == 1, log
        assert log.count("status.json") <= 2 and "Traceback" not in log and "Logging error" not in log, log
        # The daemon dies without a word: its model tree lives on, orphaned.
        d.kill_hard()
        time.sleep(0.3)
        assert alive(second)
        d2 = start(daemons, env)  # on the same, still full, STATE_DIR: the tag finds them
        gone(second, timeout=10)
        wait_for(lambda: _admin_status(state).get("state") == "serving", 20, what="the new daemon serving")
        assert "leftover" in d2.log()
        d2.terminate()
    finally:
        for d in daemons:
            d.cleanup()
        subprocess.run(["umount", "-l", str(state)], check=False)


def test_a_vllm_without_uds_is_told_how_to_go_on(daemons, daemon_env, tmp_path) -> None:
    old = tmp_path / "old-vllm"
    # What argparse prints for a flag it does not know, as a vLLM older than --uds would.
    old.write_text(
        "#!/bin/sh\necho 'usage: vllm serve [-h] [--host HOST] [--port PORT] ...' >&2\n"
        'echo "vllm serve: error: unrecognized arguments: $3 $4" >&2\nexit 2\n'
    )
    old.chmod(0o755)
    d = start(daemons, env_with(daemon_env, LLM_BIN=str(old), RESTART_LIMIT="1"))
    st = d.wait_state("failed")
    assert "no --uds" in st["reason"] and "SERVER_SOCKET=off" in st["reason"], st["reason"]


def test_a_catalog_models_refusal_names_the_entry_and_its_file(daemons, daemon_env, ntfy, tmp_path) -> None:
    refusing = tmp_path / "refusing-vllm"
    # argparse's last words, as vLLM prints them for a flag it does not know
    refusing.write_text(
        '#!/bin/sh\necho "usage: api_server.py [-h] ..." >&2\n'
        'echo "api_server.py: error: unrecognized arguments: --bogus" >&2\nexit 2\n'
    )
    refusing.chmod(0o755)
    models = tmp_path / "models.yaml"
    models.write_text("models:\n  - {name: chat, model: org/chat, args: [--bogus]}\n")
    d = start(daemons, env_with(daemon_env, LLM_BIN=str(refusing), MODELS=str(models), RESTART_LIMIT="1"))
    st = d.wait_state("failed")
    said = f"vLLM refused its arguments: unrecognized arguments: --bogus (check 'chat' in {models})"
    assert said in st["reason"], st["reason"]
    failed = wait_for(lambda: [m for m in ntfy.received if str(m.get("title")).endswith("model failed")], 10)
    assert said in failed[0]["message"]
