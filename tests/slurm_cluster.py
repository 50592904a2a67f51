"""Helpers for tests against a real Slurm on this node (scripts/slurm-local.sh start).

Every Slurm command runs with a timeout; every job a test submits is cancelled by its id (never by
user or name) and waited for. If Slurm is not usable the tests skip with the reason, or fail with it
when WATCHDOG_LLM_REQUIRE_SLURM=1 (CI, where scripts/slurm-local.sh ran first).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
import warnings
from pathlib import Path
from typing import Any

import pytest

CMD_TIMEOUT = 15.0
REQUIRED = os.environ.get("WATCHDOG_LLM_REQUIRE_SLURM") == "1"
# "planned": idle, but reserved by the backfill scheduler for a pending job; the flag lingers
# until the next backfill pass (bf_interval, 30 s) after that job is gone.
USABLE_STATES = {"idle", "mixed", "allocated", "completing", "planned"}
HOST = socket.gethostname().split(".")[0]
REPO = Path(__file__).resolve().parent.parent
# A daemon on this node: the real cgroupfs, and job dirs Slurm leaves behind ignored after 3 s (a
# real job has a process in its dir within milliseconds of creating it).
REAL_NODE = {"CGROUP_ROOT": "/sys/fs/cgroup", "STALE_JOB_GRACE": "3"}
CGROUP = Path("/sys/fs/cgroup")
SUBMITTED: set[str] = set()  # every job id this test session submitted


def not_usable(reason: str) -> None:
    msg = f"real Slurm not usable: {reason} (run: scripts/slurm-local.sh start)"
    if REQUIRED:
        pytest.fail(f"{msg}; WATCHDOG_LLM_REQUIRE_SLURM=1", pytrace=False)
    pytest.skip(msg)


def run(*args: str, timeout: float = CMD_TIMEOUT, check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
    try:
        p = subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kw)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{' '.join(args)}: no answer in {timeout} s (is slurmctld up?)") from None
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {p.returncode}: {p.stderr.strip() or p.stdout.strip()}")
    return p


def usable_reason() -> str | None:
    """None if Slurm on this node can run our tests, else why not (one line)."""
    if os.geteuid() != 0:
        return "not root (jobs must be able to watch /sys/fs/cgroup and the daemon runs as root)"
    missing = [c for c in ("sbatch", "srun", "scancel", "squeue", "sinfo", "scontrol") if not shutil.which(c)]
    if missing:
        return f"missing {', '.join(missing)}"
    try:
        p = subprocess.run(["sinfo", "-h", "-n", HOST, "-o", "%T"], capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer in 10 s"
    state = p.stdout.strip().splitlines()[0] if p.stdout.strip() else ""
    if p.returncode != 0 or state not in USABLE_STATES:
        why = p.stderr.strip() or f"node {HOST} is {state or 'not in sinfo'}"
        return why.splitlines()[0]
    if not Path("/sys/fs/cgroup/memory").is_dir():
        return "no cgroup v1 memory controller (these tests expect Slurm's cgroup/v1 layout)"
    return None


class Slurm:
    """Submit, observe and always clean up jobs, by id."""

    def __init__(self) -> None:
        self.jobs: list[str] = []

    def sbatch(self, *args: str, env: dict[str, str] | None = None, cwd: str | Path | None = None) -> str:
        p = run("sbatch", "--parsable", *args, env=env, cwd=cwd)
        job = p.stdout.strip().split(";")[0]
        assert job.isdigit(), f"sbatch printed {p.stdout!r}"
        self.jobs.append(job)
        SUBMITTED.add(job)
        return job

    def info(self, job: str) -> dict[str, str]:
        """`scontrol show job -o` as a dict ({} once Slurm has forgotten the job)."""
        p = run("scontrol", "show", "job", "-o", job, check=False)
        out: dict[str, str] = {}
        for word in p.stdout.split():
            k, sep, v = word.partition("=")
            if sep and k not in out:
                out[k] = v
        return out

    def state(self, job: str) -> str:
        return self.info(job).get("JobState", "")

    def wait_state(self, job: str, states: set[str], timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        st = ""
        while time.monotonic() < deadline:
            st = self.state(job)
            if st in states:
                return st
            time.sleep(0.1)
        raise AssertionError(f"job {job}: state {st or 'unknown'} after {timeout} s, expected {sorted(states)}")

    def wait_running(self, job: str, timeout: float = 30.0) -> None:
        st = self.wait_state(job, {"RUNNING", "FAILED", "CANCELLED", "COMPLETED"}, timeout)
        assert st == "RUNNING", f"job {job} is {st}: {self.info(job).get('Reason')}"

    def wait_ended(self, job: str, timeout: float = 30.0) -> str:
        """Until the job no longer runs (nor completes); its final state."""
        return self.wait_state(job, {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "PENDING", "NODE_FAIL"}, timeout)

    def cancel(self, job: str, *opts: str) -> None:
        run("scancel", *opts, job)

    def cleanup(self, timeout: float = 30.0) -> None:
        live = {"RUNNING", "PENDING", "COMPLETING", "CONFIGURING", "REQUEUED", "SUSPENDED", "REQUEUE_HOLD"}
        for job in self.jobs:
            with contextlib.suppress(AssertionError):
                run("scancel", job, check=False)
        deadline = time.monotonic() + timeout
        left = list(self.jobs)
        while left and time.monotonic() < deadline:
            left = [j for j in left if self.state(j) in live]
            if left:
                time.sleep(0.1)
        assert not left, f"jobs {left} still in Slurm {timeout} s after scancel"

    def clear_leftovers(self, timeout: float = 10.0) -> None:
        """Wait for the cgroup dirs of ended jobs to go. Under load slurmstepd sometimes fails to
        remove one (seen in CI: freezer's job_N stayed); an empty one of a job this session
        submitted is removed here, with a warning, so the next test starts on a clean node. A dir
        with a process in it, or of a job not ours, is a failure that says what is there."""
        deadline = time.monotonic() + timeout
        while (left := job_cgroup_dirs()) and time.monotonic() < deadline:
            time.sleep(0.1)
        problems: list[str] = []
        for d in left:
            job = d.name.removeprefix("job_")
            procs = cgroup_procs(d)
            if job not in SUBMITTED or procs:
                freezer = _read(d / "freezer.state")
                problems.append(f"{d} (job {job}; processes {procs or 'none'}; freezer {freezer or '-'})")
                continue
            for sub in sorted((p for p in d.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                with contextlib.suppress(OSError):
                    sub.rmdir()
            with contextlib.suppress(OSError):
                d.rmdir()
            warnings.warn(f"Slurm left {d} behind {timeout:g} s after job {job} ended; removed it", stacklevel=1)
        if problems:
            not_usable("job cgroup dirs left on the node: " + "; ".join(problems))

    def node_jobs(self) -> list[str]:
        p = run("squeue", "-h", "-w", HOST, "-t", "RUNNING,COMPLETING", "-o", "%i", check=False)
        return p.stdout.split()


def job_cgroup_dirs() -> list[Path]:
    """Slurm's job dirs on this node, v1 (`<ctrl>/slurm*/uid_*/job_*`) and v2 layouts."""
    found = [*CGROUP.glob("*/slurm*/uid_*/job_*"), *CGROUP.glob("system.slice/*slurmstepd.scope/job_*")]
    return sorted(p for p in found if p.is_dir())


def cgroup_procs(d: Path) -> list[int]:
    """Every process in `d` and beneath it (tests may read cgroupfs; the daemon never does)."""
    pids: list[int] = []
    for f in d.rglob("cgroup.procs"):
        pids += [int(x) for x in _read(f).split()]
    return pids


def _read(p: Path) -> str:
    try:
        return p.read_text().strip()
    except OSError:
        return ""


def read_status(state_dir: Path) -> dict[str, Any]:
    try:
        return dict(json.loads((state_dir / "status.json").read_text()))
    except (OSError, ValueError):
        return {}


def wait_status(
    state_dir: Path, pred: Any, timeout: float = 30.0, what: str = "", log: Path | None = None
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    st: dict[str, Any] = {}
    while time.monotonic() < deadline:
        st = read_status(state_dir)
        if st and pred(st):
            return st
        time.sleep(0.02)
    tail = ""
    if log is not None and log.exists():
        tail = "\n" + log.read_text(errors="replace")[-3000:]
    raise AssertionError(f"timed out after {timeout} s waiting for {what}; last state {st.get('state')}{tail}")
