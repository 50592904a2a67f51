"""GPU-aware decisions against a real Slurm (scripts/slurm-local.sh start: four fake GPUs, /dev
minors 0-3, ConstrainDevices). Real jobs, real `scontrol show job -d`, real cgroups; NVML is the
stand-in view (GPU_STANDIN) of four GPUs whose minors match Slurm's GRES IDX, as on a real node.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from daemon_harness import DaemonProc, env_with, gone
from slurm_cluster import REAL_NODE, Slurm, read_status, run
from test_slurm_real import ModeA, final_notice

pytestmark = [pytest.mark.cgroupfs, pytest.mark.timeout(120)]

GPUS = Path(__file__).parent / "data" / "gpu" / "h100x4.json"


def job_idx(job: str) -> str:
    """What Slurm itself says the job got on this node: the text after IDX:."""
    out = run("scontrol", "show", "job", "-d", job).stdout
    return out.split("IDX:", 1)[1].split(")", 1)[0] if "IDX:" in out else ""


def wait_job_gpus(d: DaemonProc, job: str, timeout: float = 20.0) -> list[int] | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        known = (d.status().get("gpus") or {}).get("job_gpus") or {}
        if f"job_{job}" in known:
            gpus: list[int] | None = known[f"job_{job}"]
            return gpus
        time.sleep(0.02)
    raise AssertionError(f"the daemon never looked up job {job}'s GPUs:\n{d.log()[-2000:]}")


def test_mode_b_overlap_with_real_jobs(daemon_env: dict[str, str], slurm: Slurm, tmp_path: Path) -> None:
    gpus = tmp_path / "gpus.json"
    shutil.copy(GPUS, gpus)
    env = env_with(daemon_env, **REAL_NODE, GPU_STANDIN=str(gpus), NUM_GPUS="2")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    d = DaemonProc(env)
    try:
        st = d.wait_state("serving")
        assert st["gpus"]["ours"] == [2, 3] and st["gpus"]["yield_on"] == "overlap"
        pids = st["model_pids"]

        # Slurm hands out the lowest free GPU: IDX 0, not ours. The model keeps serving.
        low = slurm.sbatch("--gres=gpu:1", "-c", "1", "--mem=100M", "--wrap", "sleep 60", "-o", "/dev/null")
        slurm.wait_running(low)
        assert job_idx(low) == "0"
        assert wait_job_gpus(d, low) == [0]
        time.sleep(0.3)
        st = d.status()
        assert st["state"] == "serving" and sorted(st["model_pids"]) == sorted(pids), st["reason"]

        # Two more GPUs: Slurm gives IDX 1-2, and 2 is ours.
        mid = slurm.sbatch("--gres=gpu:2", "-c", "1", "--mem=100M", "--wrap", "sleep 60", "-o", "/dev/null")
        st = d.wait_state("yielded", 30)
        gone(pids)
        assert job_idx(mid) == "1-2"
        y = st["last_yield"]
        assert y["job"] == f"job_{mid}" and "on GPU 2" in y["cause"], y
        assert "1 free GPU(s), 2 needed" in st["reason"]

        slurm.cancel(mid)
        slurm.wait_ended(mid)
        st = d.wait_state("serving", 30)
        assert st["gpus"]["ours"] == [2, 3] and f"job_{low}" in st["jobs"]  # the GPU-0 job still runs
        slurm.cancel(low)
        assert d.terminate() == 0
    finally:
        d.cleanup()


def test_mode_a_keeps_serving_beside_a_job_on_other_gpus(
    daemon_env: dict[str, str], slurm: Slurm, tmp_path: Path, ntfy: Any
) -> None:
    """The daemon as a job with two GPUs (IDX 0-1, from SLURM_JOB_GPUS) and the default YIELD_ON:
    a job on GPU 2 is no conflict; scancel ends it as a preemption, with exit 0."""
    a = ModeA(slurm, daemon_env, tmp_path, "--gres=gpu:2")
    st = a.serving()
    assert st["gpus"]["fixed"] == [0, 1] and st["gpus"]["yield_on"] == "overlap", st["gpus"]
    pids = st["model_pids"]
    other = slurm.sbatch("--gres=gpu:1", "-c", "1", "--mem=100M", "--wrap", "sleep 60", "-o", "/dev/null")
    slurm.wait_running(other)
    assert job_idx(other) == "2"
    st = a.wait(lambda s: f"job_{other}" in ((s.get("gpus") or {}).get("job_gpus") or {}), "lookup")
    assert st["gpus"]["job_gpus"][f"job_{other}"] == [2]
    time.sleep(0.3)
    st = read_status(a.state_dir)
    assert st["state"] == "serving" and sorted(st["model_pids"]) == sorted(pids), st["reason"]

    slurm.cancel(a.job)
    a.stopped_cleanly(pids, ntfy)
    notice = final_notice(ntfy, a.job)
    assert notice is not None and "exiting 0" in notice["message"]
