"""Slurm names and layouts: pure helpers of watchdog_llm.detect.slurm."""

from __future__ import annotations

from pathlib import Path

import pytest

from watchdog_llm.detect.slurm import (
    WATCHED,
    Kind,
    classify,
    is_job_dir,
    job_paths_in_cgroup_text,
    jobs_in_cgroup_text,
    own_jobs,
    root_kind,
)


@pytest.mark.parametrize(
    "name",
    ["job_1", "job_123456789", "s5K1KKYAYG5D00", "s0123456789ABC", "s" + "Z" * 13, "sVWXYZ00000000"],
)
def test_job_dir_names(name: str) -> None:
    assert is_job_dir(name)


@pytest.mark.parametrize(
    "name",
    [
        "job_",
        "job_12a",
        "job_-1",
        "Job_1",
        "job_1/",
        "step_0",
        "s5K1KKYAYG5D0",  # 12 chars after s
        "s5K1KKYAYG5D000",  # 14 chars after s
        "s5k1kkyayg5d00",  # lower case
        "S5K1KKYAYG5D00",  # upper-case prefix
        "s5K1KKYAYG5DI0",  # I
        "s5K1KKYAYG5DL0",  # L
        "s5K1KKYAYG5DO0",  # O
        "s5K1KKYAYG5DU0",  # U
        "system",
        "",
    ],
)
def test_not_job_dir_names(name: str) -> None:
    assert not is_job_dir(name)


@pytest.mark.parametrize(
    ("name", "parent", "kind"),
    [
        ("memory", Kind.ROOT, Kind.CONTROLLER),
        ("cpuset", Kind.ROOT, Kind.CONTROLLER),
        ("devices", Kind.ROOT, Kind.CONTROLLER),
        ("freezer", Kind.ROOT, Kind.CONTROLLER),
        ("unified", Kind.ROOT, Kind.CONTROLLER),
        ("cpu,cpuacct", Kind.ROOT, Kind.OTHER),
        ("pids", Kind.ROOT, Kind.OTHER),
        ("system.slice", Kind.ROOT, Kind.SLICE),
        ("system.slice", Kind.CONTROLLER, Kind.SLICE),
        ("slurm", Kind.CONTROLLER, Kind.SLURM_V1),
        ("slurm_node1", Kind.CONTROLLER, Kind.SLURM_V1),
        ("slurm_", Kind.CONTROLLER, Kind.OTHER),
        ("slurmd", Kind.CONTROLLER, Kind.OTHER),
        ("process_api", Kind.CONTROLLER, Kind.OTHER),
        ("slurm", Kind.SLICE, Kind.OTHER),
        ("slurmstepd.scope", Kind.SLICE, Kind.STEPD_SCOPE),
        ("node7_slurmstepd.scope", Kind.SLICE, Kind.STEPD_SCOPE),
        ("slurmstepd.scope", Kind.ROOT, Kind.OTHER),
        ("xslurmstepd.scope", Kind.SLICE, Kind.OTHER),
        ("user-1000.slice", Kind.SLICE, Kind.OTHER),
        ("uid_1000", Kind.SLURM_V1, Kind.UID),
        ("uid_x", Kind.SLURM_V1, Kind.OTHER),
        ("uid_0", Kind.CONTROLLER, Kind.OTHER),
        ("job_5", Kind.STEPD_SCOPE, Kind.JOB),
        ("s5K1KKYAYG5D00", Kind.STEPD_SCOPE, Kind.JOB),
        ("job_5", Kind.UID, Kind.JOB),
        ("system", Kind.STEPD_SCOPE, Kind.OTHER),
        ("job_5", Kind.SLURM_V1, Kind.OTHER),
        ("job_5", Kind.CONTROLLER, Kind.OTHER),
        ("step_0", Kind.JOB, Kind.OTHER),
        ("job_5", Kind.OTHER, Kind.OTHER),
    ],
)
def test_classify(name: str, parent: Kind, kind: Kind) -> None:
    assert classify(name, parent) is kind


def test_watched_kinds() -> None:
    assert {Kind.JOB, Kind.OTHER}.isdisjoint(WATCHED)
    assert root_kind(Path("/sys/fs/cgroup")) is Kind.ROOT
    assert root_kind(Path("/sys/fs/cgroup/memory")) is Kind.CONTROLLER


V2_TEXT = "0::/system.slice/slurmstepd.scope/job_42/step_0/user/task_0\n"
V2_SLUID_TEXT = "0::/system.slice/node3_slurmstepd.scope/s5K1KKYAYG5D00/step_batch/user/task_0\n"
V1_TEXT = """\
12:pids:/slurm_node1/uid_1000/job_7/step_batch
11:freezer:/slurm_node1/uid_1000/job_7/step_batch
9:memory:/slurm_node1/uid_1000/job_7/step_batch/task_0
6:devices:/slurm_node1/uid_1000/job_7/step_batch/task_0
4:cpuset:/slurm_node1/uid_1000/job_7/step_batch
3:cpu,cpuacct:/user.slice
1:name=systemd:/user.slice/user-1000.slice/session-3.scope
0::/user.slice/user-1000.slice/session-3.scope
"""
NON_JOB_TEXT = """\
4:memory:/process_api/94a0bb3135709a0dfa0df464f73b5266
0::/user.slice/user-1000.slice/session-3.scope
0::/home/job_1
0::/system.slice/slurmstepd.scope/system
0::/system.slice/other.scope/job_9
3:cpuset:/
garbage line
"""


def test_jobs_in_cgroup_text() -> None:
    assert jobs_in_cgroup_text(V2_TEXT) == {"job_42"}
    assert jobs_in_cgroup_text(V2_SLUID_TEXT) == {"s5K1KKYAYG5D00"}
    assert jobs_in_cgroup_text(V1_TEXT) == {"job_7"}
    assert jobs_in_cgroup_text("4:memory:/slurm/uid_0/job_3/step_extern\n") == {"job_3"}
    assert jobs_in_cgroup_text(NON_JOB_TEXT) == set()
    assert jobs_in_cgroup_text("") == set()
    assert job_paths_in_cgroup_text(V2_TEXT) == {"job_42": "/system.slice/slurmstepd.scope/job_42"}


def test_own_jobs() -> None:
    assert own_jobs({}, "") == frozenset()
    assert own_jobs({"SLURM_JOB_ID": "17"}, "") == {"job_17"}
    assert own_jobs({"SLURM_JOB_ID": "17"}, V1_TEXT) == {"job_17", "job_7"}
    assert own_jobs({}, V2_SLUID_TEXT) == {"s5K1KKYAYG5D00"}
    assert own_jobs({"SLURM_JOB_ID": "abc"}, NON_JOB_TEXT) == frozenset()
    # With no arguments it reads the real environment and /proc/self/cgroup without failing.
    assert isinstance(own_jobs(), frozenset)
