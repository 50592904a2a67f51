"""End to end against a real Slurm on this node (scripts/slurm-local.sh start; root; cgroup v1).

Mode B: the daemon outside Slurm watches the real /sys/fs/cgroup and yields to a real sbatch job.
Mode A: the daemon runs *as* a Slurm job (slurm/watchdog.sbatch), ignores its own job, yields to
another, and on scancel / preemption stops its model tree and exits 0.

Skips with the reason when Slurm is not usable, fails instead under WATCHDOG_LLM_REQUIRE_SLURM=1.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from daemon_harness import DaemonProc, env_with, gone
from helpers import alive, bin_path
from slurm_cluster import REAL_NODE, REPO, Slurm, read_status, run, wait_status

pytestmark = [pytest.mark.cgroupfs, pytest.mark.timeout(120)]

SBATCH = REPO / "slurm" / "watchdog.sbatch"


def final_notice(ntfy: Any, job: str) -> dict[str, Any] | None:
    """The daemon's last word as Slurm job `job`: "preempted: job N", with the time it served."""
    for m in ntfy.received:
        if f"preempted: job {job}" in str(m.get("title", "")) and "served" in str(m.get("message", "")):
            return dict(m)
    return None


# ---- mode B: watch and yield ------------------------------------------------------------------


def test_mode_b_yields_to_a_real_sbatch_job_and_resumes(daemon_env: dict[str, str], slurm: Slurm) -> None:
    d = DaemonProc(env_with(daemon_env, **REAL_NODE, YIELD_ON="any"))
    try:
        pids = d.wait_state("serving")["model_pids"]
        t0 = time.monotonic()
        job = slurm.sbatch("--wrap", "sleep 20", "-o", "/dev/null", "-J", "wdtest-modeb")
        st = d.wait_state("yielded", 30)
        gone(pids)
        took = time.monotonic() - t0
        ly = st["last_yield"]
        assert ly["job"] == f"job_{job}", ly
        # Detection is the age of the job's cgroup dir when the daemon saw it: milliseconds, not
        # the polling interval of the predecessor (generous bound: behaviour, not performance).
        assert ly.get("detect_ms") is not None and ly["detect_ms"] < 250, ly
        assert slurm.state(job) == "RUNNING"
        print(f"sbatch -> model tree gone: {took * 1000:.0f} ms; detect_ms {ly['detect_ms']:.1f}")

        slurm.cancel(job)
        slurm.wait_ended(job)
        st = d.wait_state("serving", 30)
        assert st["model_pids"] and not set(st["model_pids"]) & set(pids)
        assert d.terminate() == 0
    finally:
        d.cleanup()


# ---- mode A: the daemon is the job --------------------------------------------------------------


class ModeA:
    """The daemon submitted with slurm/watchdog.sbatch, settings from the exported environment."""

    def __init__(self, slurm: Slurm, env: dict[str, str], tmp: Path, *opts: str, **extra: str) -> None:
        self.slurm = slurm
        self.state_dir = Path(env["STATE_DIR"])
        self.log = tmp / "job.log"
        self.env = env_with(
            env,
            **REAL_NODE,
            WATCHDOG_LLM=bin_path("watchdog-llm"),
            YIELD_GRACE="2",  # well under KillWait (5 s in scripts/slurm-local.sh)
            **extra,
        )
        self.job = slurm.sbatch(
            "-p", "debug", "-c", "1", "--mem=500M", "--gres=gpu:1", "--time=10",
            "-J", "wdtest-modea", "-o", str(self.log), *opts, str(SBATCH),
            env=self.env, cwd=tmp,
        )  # fmt: skip

    def wait(self, pred: Any, what: str, timeout: float = 30.0) -> dict[str, Any]:
        return wait_status(self.state_dir, pred, timeout, what, self.log)

    def serving(self) -> dict[str, Any]:
        self.slurm.wait_running(self.job)
        return self.wait(lambda s: s.get("state") == "serving", "serving")

    def stopped_cleanly(self, pids: list[int], ntfy: Any) -> dict[str, Any]:
        st = self.wait(lambda s: s.get("state") == "stopped", "stopped", 20)
        gone(pids, 10)
        final = self.slurm.wait_ended(self.job, 20)
        log = self.log.read_text(errors="replace")
        assert alive([st["daemon_pid"]]) == [], "daemon still running"
        assert "Traceback" not in log, log
        assert _wait_notice(ntfy, self.job), ntfy.titles()
        st["slurm_state"] = final
        st["slurm_exit"] = self.slurm.info(self.job).get("ExitCode")
        return st


@pytest.mark.parametrize("launch", ["exec", "srun"])
def test_mode_a_ignores_own_job_yields_to_another_stops_on_batch_sigterm(
    daemon_env: dict[str, str], slurm: Slurm, tmp_path: Path, ntfy: Any, launch: str
) -> None:
    a = ModeA(slurm, daemon_env, tmp_path, YIELD_ON="any", WATCHDOG_LLM_LAUNCH=launch)
    st = a.serving()
    pids = st["model_pids"]
    assert f"job_{a.job}" not in st["jobs"], st["jobs"]
    time.sleep(1.0)  # its own job's cgroups exist all along: still serving
    assert read_status(a.state_dir)["state"] == "serving"

    other = slurm.sbatch("-p", "debug", "-c", "1", "--wrap", "sleep 30", "-o", "/dev/null", "-J", "wdtest-other")
    st = a.wait(lambda s: s.get("state") == "yielded", f"yield to job {other}")
    assert st["last_yield"]["job"] == f"job_{other}"
    gone(pids)
    slurm.cancel(other)
    slurm.wait_ended(other)
    st = a.wait(lambda s: s.get("state") == "serving", "serving again")
    pids = st["model_pids"]

    slurm.cancel(a.job, "--signal=TERM", "--batch")
    st = a.stopped_cleanly(pids, ntfy)
    # The daemon exited 0, so the job completed (scancel --batch --signal does not cancel a job).
    assert st["slurm_state"] == "COMPLETED" and st["slurm_exit"] == "0:0", st


def test_mode_a_plain_scancel_stops_the_tree_and_exits_0(
    daemon_env: dict[str, str], slurm: Slurm, tmp_path: Path, ntfy: Any
) -> None:
    a = ModeA(slurm, daemon_env, tmp_path)
    pids = a.serving()["model_pids"]
    slurm.cancel(a.job)  # SIGCONT + SIGTERM to the batch shell (the daemon); SIGKILL after KillWait
    st = a.stopped_cleanly(pids, ntfy)
    # A cancelled job stays CANCELLED; its ExitCode is the batch shell's (the daemon's) status.
    assert st["slurm_state"] == "CANCELLED" and st["slurm_exit"] == "0:0", st


def test_mode_a_preempted_by_partition_priority_is_requeued(
    daemon_env: dict[str, str], slurm: Slurm, tmp_path: Path, ntfy: Any
) -> None:
    """standby (PriorityTier=1, GraceTime=0) preempted by a debug job that needs both CPUs."""
    if "standby" not in run("sinfo", "-h", "-o", "%R").stdout.split():
        pytest.skip("no standby partition (scripts/slurm-local.sh configures one)")
    t0 = time.monotonic()
    a = ModeA(slurm, daemon_env, tmp_path, "-p", "standby")
    pids = a.serving()["model_pids"]
    t1 = time.monotonic()
    big = slurm.sbatch("-p", "debug", "-c", "2", "--wrap", "sleep 30", "-o", "/dev/null", "-J", "wdtest-preemptor")
    st = a.wait(lambda s: s.get("state") == "stopped", "stopped after preemption", 30)
    gone(pids, 10)
    t2 = time.monotonic()
    slurm.wait_running(big, 30)
    print(
        f"serving after {t1 - t0:.1f} s; stopped {t2 - t1:.1f} s after the preemptor's sbatch; "
        f"preemptor running after {time.monotonic() - t1:.1f} s; notices {ntfy.titles()}"
    )
    job = slurm.info(a.job)
    assert job.get("JobState") in {"PENDING", "REQUEUED", "REQUEUE_HOLD"}, job.get("JobState")
    assert int(job.get("Restarts", "0")) >= 1, job
    assert _wait_notice(ntfy, a.job), ntfy.titles()
    assert st["daemon_pid"] and not alive([st["daemon_pid"]])


def _wait_notice(ntfy: Any, job: str, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if final_notice(ntfy, job):
            return True
        time.sleep(0.05)
    return False
