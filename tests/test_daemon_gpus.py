"""The real daemon with GPU awareness, end to end.

No GPU here, so NVML is the JSON stand-in view (GPU_STANDIN; four H100s recorded from a real node's
layout) that the stand-in model's workers announce their GPU contexts to, and `scontrol` is a small
executable that prints recorded `scontrol show job -d` text. Everything else is real: the daemon,
its model tree, inotify on a scratch cgroup tree, notifications to a local ntfy sink, the openai client.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from daemon_harness import env_with, gone, start
from helpers import TEST_KEY, wait_for

from watchdog_llm.detect.gpu import StandinView

pytestmark = pytest.mark.timeout(90)

DATA = Path(__file__).parent / "data"
NODE = socket.gethostname().split(".")[0]


class FakeSlurm:
    """`scontrol show job -d <id>` answered from files: a job without a file is hidden (PrivateData)."""

    def __init__(self, tmp: Path) -> None:
        self.dir = tmp / "jobs"
        self.dir.mkdir()
        self.bin = tmp / "scontrol"
        self.bin.write_text(
            "#!/bin/sh\n"
            f'f="{self.dir}/$4.txt"\n'
            '[ -f "$f" ] && exec cat "$f"\n'
            'echo "slurm_load_jobs error: Invalid job id specified" >&2\nexit 1\n'
        )
        self.bin.chmod(0o755)
        self.reference = (DATA / "scontrol" / "reference-22.05.txt").read_text()

    def job(self, job_id: int, idx: str | None) -> None:
        """Job `job_id` runs on this node with GPUs `idx` (Slurm's IDX syntax), or none."""
        gres = f"GRES=gpu:{idx.count(',') + 1}(IDX:{idx})" if idx else "GRES="
        text = self.reference.replace("JobId=7", f"JobId={job_id}").replace("Nodes=H ", f"Nodes={NODE} ")
        text = text.replace("GRES=gpu:2(IDX:0-1)", gres).replace("NodeList=H", f"NodeList={NODE}")
        (self.dir / f"{job_id}.txt").write_text(text)


@pytest.fixture
def fake_slurm(tmp_path: Path) -> FakeSlurm:
    return FakeSlurm(tmp_path)


@pytest.fixture
def gpus(tmp_path: Path) -> Path:
    path = tmp_path / "gpus.json"
    shutil.copy(DATA / "gpu" / "h100x4.json", path)
    return path


def set_processes(path: Path, procs: list[dict[str, int]]) -> None:
    data = json.loads(path.read_text())
    data["processes"] = procs
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)  # atomically, as the stand-in view re-reads it on every query


def gpu_env(daemon_env: dict[str, str], gpus: Path, slurm: FakeSlurm, **kw: str) -> dict[str, str]:
    settings = {
        "GPU_STANDIN": str(gpus),
        "NUM_GPUS": "2",
        "SCONTROL_BIN": str(slurm.bin),
        "DETECTION_MODE": "hybrid",
        "GPU_POLL_INTERVAL": "0.1",
        "GPU_RELEASE_TIMEOUT": "5",
    }
    env = env_with(daemon_env, **{**settings, **kw})
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def on_gpus(gpus: Path, pids: list[int]) -> dict[int, set[int]]:
    """Which GPUs (minor) each of `pids` holds a context on, per the stand-in NVML."""
    view = StandinView(gpus, 5.0, logging.getLogger("test"))
    try:
        out: dict[int, set[int]] = {}
        for p in view.processes():
            if p.pid in pids:
                out.setdefault(p.pid, set()).add(p.minor)
        return out
    finally:
        view.close()


def test_overlap_yields_only_to_jobs_on_our_gpus(daemons, daemon_env, gpus, fake_slurm, ntfy) -> None:
    d = start(daemons, gpu_env(daemon_env, gpus, fake_slurm))
    st = d.wait_state("serving")
    assert st["gpus"]["ours"] == [2, 3] and st["gpus"]["yield_on"] == "overlap"
    pids = st["model_pids"]
    # The workers really got GPUs 2 and 3 (CUDA_VISIBLE_DEVICES=2,3): one context each.
    held = wait_for(lambda: on_gpus(gpus, pids) if len(on_gpus(gpus, pids)) == 2 else None, 10, what="contexts")
    assert sorted(m for ms in held.values() for m in ms) == [2, 3]
    # The dashboard's GPU table (GET /api/gpus): each GPU's memory and whose processes hold it.
    transport = httpx.HTTPTransport(uds=str(d.state_dir / "admin.sock"))
    with httpx.Client(transport=transport, base_url="http://admin", timeout=10) as admin:
        table = admin.get("/api/gpus").json()
    assert table["error"] is None and table["view"].startswith("standin:")
    rows = {g["minor"]: g for g in table["gpus"]}
    assert sorted(rows) == [0, 1, 2, 3] and rows[0]["memory_total"] == 85520809984
    assert [m for m, g in rows.items() if g["ours"]] == [2, 3]
    for m in (2, 3):
        assert rows[m]["memory_used"] > 0 and all(p["ours"] for p in rows[m]["processes"]), rows[m]
    assert rows[0]["processes"] == [] and rows[0]["memory_used"] == 0

    fake_slurm.job(11, "0")  # a job on GPU 0: no conflict
    d.start_job("job_11")
    wait_for(lambda: d.status().get("gpus", {}).get("job_gpus", {}).get("job_11") == [0], 10, what="job_11 looked up")
    fake_slurm.job(12, None)  # a job without GPUs: no conflict either
    d.start_job("job_12")
    wait_for(lambda: d.status().get("gpus", {}).get("job_gpus", {}).get("job_12") == [], 10, what="job_12 looked up")
    assert d.status()["state"] == "serving" and sorted(d.status()["model_pids"]) == sorted(pids)
    out = subprocess.run(
        [sys.executable, "-m", "watchdog_llm", "status"], env=d.env, capture_output=True, text=True, timeout=30
    ).stdout
    assert "job_11 (GPU 0), job_12 (no GPUs)" in out and "ours 2,3 (yield on overlap" in out, out

    fake_slurm.job(13, "1-2")  # overlaps GPU 2: yield
    d.start_job("job_13")
    st = d.wait_state("yielded")
    gone(pids)
    y = st["last_yield"]
    assert y["job"] == "job_13" and y["gpus"] == [2, 3] and "GPU 2" in y["cause"]
    # NVML confirmation: none of our processes is left on GPUs 2 and 3.
    wait_for(lambda: any("GPUs yielded" in t for t in ntfy.titles()), 10, what="yield notice")
    notice = next(m for m in ntfy.received if "GPUs yielded" in str(m.get("title")))
    assert "Slurm job 13 on GPU 2" in notice["message"] and "GPU 2,3 memory free" in notice["message"]
    assert d.status()["last_yield"]["gpu_release_ms"] is not None
    # GPUs 0 (job_11), 1 and 2 (job_13) are taken: one free GPU, two needed.
    assert "1 free GPU(s), 2 needed" in d.status()["reason"]

    d.end_job("job_13")
    st = d.wait_state("serving")
    assert st["gpus"]["ours"] == [2, 3]  # job_11 still holds 0

    d.start_job("job_14")  # scontrol cannot tell (hidden, or an error): yield, to be safe
    st = d.wait_state("yielded")
    assert "cannot be known" in st["reason"]
    assert d.terminate() == 0


def test_foreign_gpu_process_takes_our_gpu_back(daemons, daemon_env, gpus, fake_slurm) -> None:
    d = start(daemons, gpu_env(daemon_env, gpus, fake_slurm))
    pids = d.wait_state("serving")["model_pids"]
    intruder = subprocess.Popen(["sleep", "60"])
    try:
        set_processes(gpus, [{"minor": 0, "pid": intruder.pid, "used_memory": 1 << 30}])  # not our GPU
        wait_for(lambda: d.status()["gpus"]["busy"] == [0], 10, what="GPU 0 busy")
        assert d.status()["state"] == "serving"
        set_processes(gpus, [{"minor": 3, "pid": intruder.pid, "used_memory": 1 << 30}])
        gone(pids)
        # GPU 3 is busy now (GPU 0 no longer): after the cooldown the model comes back on the highest free.
        st = wait_for(lambda: (st := d.status()).get("model_run") == 2 and st["state"] == "serving" and st, 20)
        assert st["gpus"]["ours"] == [1, 2] and st["gpus"]["busy"] == [3]
        y = st["last_yield"]
        assert y["job"] == "" and f"pid {intruder.pid} on GPU 3" in y["cause"] and y["gpus"] == [2, 3]
        held = wait_for(lambda: (h := on_gpus(gpus, st["model_pids"])) and len(h) == 2 and h, 10, what="contexts")
        assert sorted(m for ms in held.values() for m in ms) == [1, 2]
        # Now every GPU but one is busy: the model yields and waits for two free GPUs.
        set_processes(gpus, [{"minor": m, "pid": intruder.pid, "used_memory": 1 << 30} for m in (0, 1, 3)])
        st = d.wait_state("yielded")
        assert "1 free GPU(s), 2 needed" in st["reason"]
        intruder.kill()  # the driver drops a dead process's context: so does the stand-in view
        intruder.wait()
        st = d.wait_state("serving")
        assert st["gpus"]["ours"] == [2, 3] and st["gpus"]["busy"] == []
    finally:
        if intruder.poll() is None:
            intruder.kill()
            intruder.wait()
    assert d.terminate() == 0


def test_inside_a_slurm_job_sigterm_is_a_preemption(daemons, daemon_env, gpus, fake_slurm, ntfy) -> None:
    env = gpu_env(daemon_env, gpus, fake_slurm, NUM_GPUS="1", DETECTION_MODE="cgroup")
    env.update(SLURM_JOB_ID="4242", SLURM_JOB_GPUS="1")
    d = start(daemons, env)
    st = d.wait_state("serving")
    assert st["gpus"]["fixed"] == [1] and st["gpus"]["ours"] == [1]
    d.start_job("job_4242")  # our own job's cgroup: never a reason to yield
    time.sleep(0.5)
    assert d.status()["state"] == "serving"
    pids = d.status()["model_pids"]
    d.proc.send_signal(signal.SIGTERM)  # what Slurm sends at preemption, scancel or the time limit
    assert d.proc.wait(20) == 0
    gone(pids)
    wait_for(lambda: any("preempted" in t for t in ntfy.titles()), 10, what="preempted notice")
    msg = next(m for m in ntfy.received if "preempted" in str(m.get("title")))
    assert "4242" in msg["title"] and "served" in msg["message"] and "exiting 0" in msg["message"]


def test_idle_release_exits_0_after_no_requests(daemons, daemon_env, ntfy) -> None:
    import openai

    d = start(daemons, env_with(daemon_env, IDLE_RELEASE_AFTER="6"))
    st = d.wait_state("serving")
    pids = st["model_pids"]
    client = openai.OpenAI(base_url=st["public_url"] + "/v1", api_key=TEST_KEY)
    last = time.monotonic()
    for _ in range(8):  # used every second: still serving after more than IDLE_RELEASE_AFTER
        time.sleep(1.0)
        r = client.chat.completions.create(model="standin/test", messages=[{"role": "user", "content": "hi"}])
        assert r.choices[0].message.content
        last = time.monotonic()
    assert d.status()["state"] == "serving"
    assert d.proc.wait(20) == 0
    quiet = time.monotonic() - last
    assert quiet >= 6.0, f"released {quiet:.1f} s after the last request"
    gone(pids)
    wait_for(lambda: any("released" in t for t in ntfy.titles()), 10, what="released notice")


def test_tunnel_on_yield_stop_drops_out_and_comes_back(daemons, daemon_env, tmp_path) -> None:
    from helpers import bin_path

    env = env_with(
        daemon_env,
        CLOUDFLARED_BIN=bin_path("cloudflared-standin"),
        TUNNEL_TOKEN="secret-token-value",
        TUNNEL_ON_YIELD="stop",
    )
    first = Path(env["CGROUP_ROOT"]) / "system.slice" / "slurmstepd.scope" / "job_20"
    first.mkdir()  # a job before start-up: no model, so no tunnel either
    d = start(daemons, env)
    d.wait_state("yielded")
    time.sleep(1.0)
    assert (d.status().get("tunnel") or {}).get("pids") == [] and "tunnel started" not in d.log()
    first.rmdir()
    d.wait_state("serving")
    tunnel = wait_for(lambda: (d.status().get("tunnel") or {}).get("ready") and d.status()["tunnel"], 10)
    d.start_job("job_21")
    d.wait_state("yielded")
    gone(tunnel["pids"])
    assert not (d.status()["tunnel"] or {}).get("ready")
    d.end_job("job_21")
    d.wait_state("serving")
    wait_for(lambda: (d.status().get("tunnel") or {}).get("ready"), 10, what="tunnel back")
    assert d.terminate() == 0


def test_stuck_nvml_turns_gpu_features_off_instead_of_hanging(daemons, daemon_env, gpus, fake_slurm) -> None:
    data = json.loads(gpus.read_text())
    data["fault"] = {"hang_s": 30}
    gpus.write_text(json.dumps(data))
    env = gpu_env(daemon_env, gpus, fake_slurm, DETECTION_MODE="cgroup", NVML_TIMEOUT="0.5")
    t0 = time.monotonic()
    d = start(daemons, env)
    st = d.wait_state("serving")
    assert time.monotonic() - t0 < 15
    assert st["gpus"]["view"] is None and st["gpus"]["yield_on"] == "any"
    assert "GPU features off" in d.log()
    assert d.terminate() == 0


def test_gpu_settings_at_fault_are_named(daemon_env, gpus, fake_slurm) -> None:
    import sys

    cases = {
        "GPU_IDS=7": ("GPU_IDS", "no GPU 7"),
        "GPU_IDS=1,2,3": ("GPU_IDS", "NUM_GPUS=2"),
        "NUM_GPUS=5": ("NUM_GPUS=5", "4 GPU(s)"),
        "GPU_IDS=x": ("GPU_IDS", "not a number"),
    }
    for setting, (name, what) in cases.items():
        k, v = setting.split("=")
        env = gpu_env(daemon_env, gpus, fake_slurm, DETECTION_MODE="cgroup")
        env[k] = v
        r = subprocess.run(
            [sys.executable, "-m", "watchdog_llm", "run"], env=env, capture_output=True, text=True, timeout=30
        )
        assert r.returncode == 2, (setting, r.stdout, r.stderr)
        assert name in r.stderr and what in r.stderr and "Traceback" not in r.stderr, (setting, r.stderr)


def test_nvml_mode_without_nvml_is_a_clear_startup_error(daemon_env) -> None:
    import sys

    env = env_with(daemon_env, DETECTION_MODE="nvml")
    env.pop("GPU_STANDIN", None)
    r = subprocess.run(
        [sys.executable, "-m", "watchdog_llm", "run"], env=env, capture_output=True, text=True, timeout=30
    )
    assert r.returncode == 2 and "DETECTION_MODE=nvml needs NVML" in r.stderr, r.stderr
    assert os.environ.get("WATCHDOG_LLM_NOT_A_SETTING") is None


def test_doctor_shows_gpus_and_how_jobs_are_judged(daemon_env, gpus, fake_slurm) -> None:
    env = gpu_env(daemon_env, gpus, fake_slurm, DETECTION_MODE="hybrid")
    r = subprocess.run([sys.executable, "-m", "watchdog_llm", "doctor"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "4 GPU(s) visible through standin:" in r.stdout
    assert "2 chosen at each start" in r.stdout and "YIELD_ON=overlap" in r.stdout and str(fake_slurm.bin) in r.stdout
    env = env_with(env, DETECTION_MODE="nvml")
    env.pop("GPU_STANDIN")
    r = subprocess.run([sys.executable, "-m", "watchdog_llm", "doctor"], env=env, capture_output=True, text=True)
    assert r.returncode == 1 and "FAIL  DETECTION_MODE=nvml needs NVML" in r.stdout, r.stdout


def test_swaps_take_each_models_gpu_count_and_a_model_that_cannot_fit_is_refused(
    daemons, daemon_env, gpus, fake_slurm, tmp_path
) -> None:
    import httpx

    catalog = tmp_path / "models.yaml"
    catalog.write_text(
        "default: pair\nmodels:\n"
        "  - {name: pair, model: standin/pair, gpus: 2}\n"
        "  - {name: one, model: standin/one, gpus: 1}\n"
        "  - {name: huge, model: standin/huge, gpus: 8}\n"
    )
    d = start(daemons, gpu_env(daemon_env, gpus, fake_slurm, MODELS=str(catalog), MODEL_NAME=""))
    st = d.wait_state("serving")
    assert st["gpus"]["ours"] == [2, 3]
    uds = httpx.HTTPTransport(uds=str(d.state_dir / "admin.sock"))
    with httpx.Client(transport=uds, base_url="http://admin", timeout=10) as c:
        r = c.post("/api/swap", json={"model": "huge"})
        assert r.status_code == 409 and r.json()["error"] == "model_does_not_fit"
        assert "needs 8 GPUs; at most 4" in r.json()["message"]
        check = c.post("/api/swap/huge/validate").json()
        assert check["ok"] is False and [x["check"] for x in check["checks"] if not x["ok"]] == ["gpus"]
        swap = c.post("/api/swap", json={"model": "one"}).json()
        wait_for(lambda: c.get(f"/api/swap/{swap['id']}").json()["state"] == "ready", 30, 0.05, "swap ready")
    st = d.wait_state("serving")
    assert st["model"] == "one" and st["gpus"]["ours"] == [3]  # the highest free GPU, as always
    assert set().union(*on_gpus(gpus, st["model_pids"]).values()) == {3}
