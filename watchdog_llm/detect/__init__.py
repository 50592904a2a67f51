"""Detection of Slurm jobs on this node: cgroup inotify (default) or a /proc scan."""

from __future__ import annotations

import logging
from pathlib import Path

from watchdog_llm.detect.procfs import ProcfsDetector
from watchdog_llm.detect.slurm import (
    DetectError,
    Detector,
    DetectorFailed,
    JobGone,
    JobSeen,
    Signal,
    Sink,
    is_job_dir,
    jobs_in_cgroup_text,
    own_jobs,
)
from watchdog_llm.detect.watcher import CgroupDetector

__all__ = [
    "CgroupDetector",
    "DetectError",
    "Detector",
    "DetectorFailed",
    "JobGone",
    "JobSeen",
    "ProcfsDetector",
    "Signal",
    "Sink",
    "is_job_dir",
    "jobs_in_cgroup_text",
    "make_detector",
    "own_jobs",
]


def make_detector(
    mode: str,
    *,
    cgroup_root: Path,
    poll_interval: float,
    own: frozenset[str],
    log: logging.Logger,
    stale_grace: float = 0.0,
    proc_root: Path = Path("/proc"),
) -> Detector:
    """`mode` is DETECTION_MODE: "cgroup" (inotify on cgroupfs) or "procfs" (scan /proc/<pid>/cgroup).
    `stale_grace` is STALE_JOB_GRACE (cgroup only: a procfs scan sees no job without a process)."""
    if mode == "cgroup":
        return CgroupDetector(cgroup_root, own, log, stale_grace=stale_grace, proc_root=proc_root)
    if mode == "procfs":
        return ProcfsDetector(poll_interval, own, log, proc_root)
    raise DetectError(f"unknown detection mode {mode!r}: expected cgroup or procfs")
