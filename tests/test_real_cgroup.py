"""The daemon against the real cgroup filesystem (root, cgroup v1 memory controller): both detection
modes end to end. A real process in a real job cgroup is what the procfs scanner sees on a node."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from daemon_harness import DaemonProc, env_with, gone
from helpers import wait_for

pytestmark = [pytest.mark.cgroupfs, pytest.mark.timeout(90)]


def test_inotify_on_real_cgroupfs_yields_and_resumes(daemon_env: dict[str, str], slurm_v1: Path) -> None:
    d = DaemonProc(env_with(daemon_env, CGROUP_ROOT="/sys/fs/cgroup"))
    try:
        pids = d.wait_state("serving")["model_pids"]
        job = slurm_v1 / "job_424242"
        job.mkdir()
        (job / "step_extern").mkdir()
        st = d.wait_state("yielded")
        gone(pids)
        assert st["last_yield"]["job"] == "job_424242"
        (job / "step_extern").rmdir()
        job.rmdir()
        d.wait_state("serving")
        assert d.terminate() == 0
    finally:
        d.cleanup()


def test_procfs_mode_sees_a_process_in_a_job_cgroup(daemon_env: dict[str, str], slurm_v1: Path) -> None:
    job = slurm_v1 / "job_515151"
    job.mkdir()
    d = DaemonProc(env_with(daemon_env, DETECTION_MODE="procfs", POLL_INTERVAL="0.1"))
    task = None
    try:
        pids = d.wait_state("serving")["model_pids"]
        # The job dir alone is invisible to procfs mode: only processes inside a job count.
        task = subprocess.Popen(["sleep", "60"])
        (job / "cgroup.procs").write_text(str(task.pid))
        assert f"{job.parent.parent.name}/uid_0/job_515151" in Path(f"/proc/{task.pid}/cgroup").read_text()
        st = d.wait_state("yielded")
        gone(pids)
        assert st["jobs"] == ["job_515151"]
        task.kill()
        task.wait()
        d.wait_state("serving")
        wait_for(lambda: d.status().get("jobs") == [], 5)
        assert d.terminate() == 0
    finally:
        if task is not None and task.poll() is None:
            task.kill()
            task.wait()
        d.cleanup()
