"""Slurm cgroup layouts, job names and the signals detectors send. Pure, except `own_jobs`."""

from __future__ import annotations

import enum
import logging
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeAlias

# --- signals shared by every detector ------------------------------------------------------------


class DetectError(Exception):
    """A detector cannot start; the message is one line (shown by `doctor` and at startup)."""


@dataclass(frozen=True, slots=True)
class JobSeen:
    job: str
    path: str
    at: float  # time.monotonic() when we saw it
    age_ms: float | None  # how old the job dir was when we saw it; None if unknown


@dataclass(frozen=True, slots=True)
class JobGone:
    job: str
    at: float


@dataclass(frozen=True, slots=True)
class DetectorFailed:
    """The detector cannot see jobs any more (its thread died, or it cannot rebuild its view).

    Sent once; no JobSeen/JobGone follows. The daemon must not keep GPUs it can no longer defend."""

    detail: str  # one line, for the log and the phone
    at: float


Signal: TypeAlias = JobSeen | JobGone | DetectorFailed
# Called from the detector's own thread: must be cheap and thread-safe.
Sink: TypeAlias = Callable[[Signal], None]


class Detector(Protocol):
    name: str

    def start(self, sink: Sink) -> frozenset[str]: ...
    def stop(self) -> None: ...
    def jobs(self) -> frozenset[str]: ...
    def describe(self) -> list[str]: ...


def emit(sink: Sink, signal: Signal, log: logging.Logger) -> None:
    # A raising sink must not kill the detector's thread: detection would silently stop.
    try:
        sink(signal)
    except Exception:
        log.exception("detect: sink failed on %r", signal)


def report_failure(sink: Sink | None, what: str, exc: BaseException | None, log: logging.Logger) -> None:
    """A detector thread ended, or cannot go on: say so loudly, once, and tell the daemon."""
    detail = f"{what}: {type(exc).__name__}: {exc}" if exc is not None else what
    if exc is not None:
        log.error("detect: %s; job detection has STOPPED", what, exc_info=exc)
    else:
        log.error("detect: %s; job detection has STOPPED", what)
    if sink is not None:
        emit(sink, DetectorFailed(detail, time.monotonic()), log)


# --- names --------------------------------------------------------------------------------------

_JOB_ID = re.compile(r"job_[0-9]+")
# Slurm 26.05 SLUID: "s" + 13 Crockford base32 characters (no I, L, O, U; upper case).
_SLUID = re.compile(r"s[0-9A-HJKMNP-TV-Z]{13}")
_UID = re.compile(r"uid_[0-9]+")
_SLURM_V1 = re.compile(r"slurm(_.+)?")
_STEPD_SCOPE = re.compile(r"(.+_)?slurmstepd\.scope")

# v1 controllers Slurm puts job dirs in, plus `unified` where hybrid mounts cgroup2.
CONTROLLERS = frozenset({"cpuset", "memory", "devices", "freezer", "unified"})


def is_job_dir(name: str) -> bool:
    return bool(_JOB_ID.fullmatch(name) or _SLUID.fullmatch(name))


def is_stepd_scope(name: str) -> bool:
    return bool(_STEPD_SCOPE.fullmatch(name))


def is_uid_dir(name: str) -> bool:
    return bool(_UID.fullmatch(name))


class Kind(enum.Enum):
    ROOT = "root"
    CONTROLLER = "controller"
    SLICE = "slice"
    STEPD_SCOPE = "stepd_scope"
    SLURM_V1 = "slurm_v1"
    UID = "uid"
    JOB = "job"
    OTHER = "other"


# Dirs we put an inotify watch on. Jobs are reported, never watched; nothing else is watched so
# that a busy cgroup tree (docker, user sessions) costs us nothing.
WATCHED = frozenset({Kind.ROOT, Kind.CONTROLLER, Kind.SLICE, Kind.STEPD_SCOPE, Kind.SLURM_V1, Kind.UID})


def root_kind(root: Path) -> Kind:
    """A root pointed straight at a controller mount (e.g. /sys/fs/cgroup/memory) acts as one."""
    return Kind.CONTROLLER if root.name in CONTROLLERS else Kind.ROOT


def classify(name: str, parent: Kind) -> Kind:
    """Kind of the directory `name` whose parent directory is of kind `parent`."""
    if parent is Kind.ROOT:
        if name in CONTROLLERS:
            return Kind.CONTROLLER
        if name.endswith(".slice"):
            return Kind.SLICE
    elif parent is Kind.CONTROLLER:
        if name.endswith(".slice"):
            return Kind.SLICE
        if _SLURM_V1.fullmatch(name):
            return Kind.SLURM_V1
    elif parent is Kind.SLICE:
        if is_stepd_scope(name):
            return Kind.STEPD_SCOPE
    elif parent is Kind.SLURM_V1:
        if is_uid_dir(name):
            return Kind.UID
    elif parent in (Kind.STEPD_SCOPE, Kind.UID) and is_job_dir(name):
        return Kind.JOB
    return Kind.OTHER


# --- /proc/<pid>/cgroup --------------------------------------------------------------------------


def job_paths_in_cgroup_text(text: str) -> dict[str, str]:
    """Job -> its cgroup path (up to the job dir) in a /proc/<pid>/cgroup file (`hier:ctrls:/path`).

    Only a job component directly under `uid_N` (v1) or `*slurmstepd.scope` (v2) counts, so a
    user's own `job_1` directory somewhere else is not mistaken for a Slurm job.
    """
    jobs: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        comps = parts[2].split("/")
        for i in range(1, len(comps)):
            comp, parent = comps[i], comps[i - 1]
            if is_job_dir(comp) and (is_uid_dir(parent) or is_stepd_scope(parent)):
                jobs.setdefault(comp, "/".join(comps[: i + 1]))
    return jobs


def jobs_in_cgroup_text(text: str) -> set[str]:
    """Jobs named in a /proc/<pid>/cgroup file; see `job_paths_in_cgroup_text`."""
    return set(job_paths_in_cgroup_text(text))


def own_jobs(environ: Mapping[str, str] | None = None, proc_self_cgroup_text: str | None = None) -> frozenset[str]:
    """The jobs we run in (under sbatch), which we must never yield to.

    `SLURM_JOB_ID` gives `job_<id>`; our own cgroup also covers SLUID-named job dirs.
    Defaults read os.environ and /proc/self/cgroup.
    """
    env = os.environ if environ is None else environ
    text = proc_self_cgroup_text
    if text is None:
        try:
            text = Path("/proc/self/cgroup").read_text()
        except OSError:
            text = ""
    own = jobs_in_cgroup_text(text)
    job_id = env.get("SLURM_JOB_ID", "").strip()
    if re.fullmatch(r"[0-9]+", job_id):
        own.add(f"job_{job_id}")
    return frozenset(own)
