"""Job cgroup dirs that Slurm left behind: dirs with no process in them, long after the job ended.

slurmstepd removes a job's dirs 15-40 ms after its last process ends, but under load its cleanup can
fail (an rmdir that races with another step's), and then the dir stays for ever: the cgroup
detector, which sees jobs by their dirs, would hold the GPUs off for a job that no longer exists.

Whether a job still has a process is read from /proc/<pid>/cgroup (served under RCU, the safe thing
to poll), never from cgroupfs files. A job counts as stale once no process of it has been seen for
`grace` seconds, and comes back the moment a process appears in it again (a job id re-used after
the controller's state was wiped). Where /proc hides other users' processes (hidepid), every job
would look empty: the sweep is then off, and says so.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from watchdog_llm.detect.slurm import job_paths_in_cgroup_text


def jobs_with_processes(proc_root: Path, own: frozenset[str]) -> dict[str, str]:
    """Job -> its cgroup path, for every job some process on this node is in (own jobs left out)."""
    found: dict[str, str] = {}
    with os.scandir(proc_root) as it:
        for entry in it:
            if not (entry.name.isascii() and entry.name.isdigit()):
                continue
            try:
                with open(os.path.join(entry.path, "cgroup"), encoding="utf-8", errors="replace") as f:
                    text = f.read()
            except OSError:
                continue  # the process exited mid-scan, or hidepid hides it: both normal
            for job, path in job_paths_in_cgroup_text(text).items():
                if job not in own:
                    found.setdefault(job, path)
    return found


def hides_processes(proc_root: Path) -> str | None:
    """Why a /proc scan cannot see every job's processes, or None when it can.

    pid 1 belongs to root: if we cannot read its cgroup file, /proc hides other users' processes."""
    try:
        (proc_root / "1" / "cgroup").read_bytes()
    except OSError as e:
        return f"{proc_root}/1/cgroup is not readable ({e.strerror or e}): /proc hides other users' processes"
    return None


@dataclass
class StaleTracker:
    """Pure bookkeeping: which live jobs have gone without a process for `grace` seconds."""

    grace: float
    _empty_since: dict[str, float] = field(default_factory=dict)

    def update(self, now: float, live: Iterable[str], with_procs: Iterable[str]) -> list[str]:
        """The live jobs that are stale now. A job is first counted empty at the scan that finds it
        so, so a job must be seen empty by two scans at least `grace` apart."""
        busy = set(with_procs)
        live_set = set(live)
        for job in list(self._empty_since):
            if job not in live_set or job in busy:
                del self._empty_since[job]
        stale: list[str] = []
        for job in sorted(live_set - busy):
            since = self._empty_since.setdefault(job, now)
            if now - since >= self.grace:
                stale.append(job)
                del self._empty_since[job]
        return stale
