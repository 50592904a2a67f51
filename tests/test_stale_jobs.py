"""Job dirs Slurm left behind (no process in them): ignored after STALE_JOB_GRACE, back when a
process appears. Scratch trees with a scratch /proc for the bookkeeping; the real cgroupfs, real
processes and the real /proc for what a node does; the daemon end to end."""

from __future__ import annotations

import contextlib
import logging
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_harness import DaemonProc, env_with, gone
from helpers import wait_for
from test_detect import Recorder

from watchdog_llm.detect import CgroupDetector
from watchdog_llm.detect.stale import StaleTracker, hides_processes, jobs_with_processes

LOG = logging.getLogger("test.stale")


# --- the bookkeeping ------------------------------------------------------------------------------


def test_a_job_is_stale_only_after_grace_with_no_process() -> None:
    t = StaleTracker(grace=10)
    assert t.update(0, {"job_1", "job_2"}, {"job_2"}) == []
    assert t.update(9.9, {"job_1", "job_2"}, {"job_2"}) == []  # empty since 0: not yet
    assert t.update(10, {"job_1", "job_2"}, {"job_2"}) == ["job_1"]
    assert t.update(30, {"job_2"}, {"job_2"}) == []  # busy jobs never go stale


def test_a_process_seen_again_restarts_the_clock() -> None:
    t = StaleTracker(grace=10)
    assert t.update(0, {"job_1"}, set()) == []
    assert t.update(8, {"job_1"}, {"job_1"}) == []  # a process: not empty any more
    assert t.update(12, {"job_1"}, set()) == []  # empty again from 12
    assert t.update(21.9, {"job_1"}, set()) == []
    assert t.update(22, {"job_1"}, set()) == ["job_1"]


def test_a_job_that_ends_is_forgotten() -> None:
    t = StaleTracker(grace=10)
    t.update(0, {"job_1"}, set())
    t.update(5, set(), set())  # its dirs went: the normal end
    assert t.update(11, {"job_1"}, set()) == []  # a new job of that id starts its own clock


# --- the detector, with a scratch /proc --------------------------------------------------------


class FakeProc:
    """A /proc with one cgroup file per pid, as the kernel writes them (pid 1 is always there)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.put(1, "0::/init.scope")

    def put(self, pid: int, path: str) -> None:
        (self.root / str(pid)).mkdir(parents=True, exist_ok=True)
        (self.root / str(pid) / "cgroup").write_text(f"0::{path}\n")

    def drop(self, pid: int) -> None:
        (self.root / str(pid) / "cgroup").unlink()
        (self.root / str(pid)).rmdir()


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[tuple[Path, FakeProc, list[CgroupDetector]]]:
    scope = tmp_path / "cg" / "system.slice" / "slurmstepd.scope"
    scope.mkdir(parents=True)
    made: list[CgroupDetector] = []
    before = set(threading.enumerate())
    yield scope, FakeProc(tmp_path / "proc"), made
    for det in made:
        det.stop()
    assert set(threading.enumerate()) <= before, "the stale sweep thread survived stop()"


def start(scope: Path, proc: FakeProc, made: list[CgroupDetector], grace: float) -> tuple[CgroupDetector, Recorder]:
    det = CgroupDetector(scope.parent.parent, frozenset({"job_9"}), LOG, stale_grace=grace, proc_root=proc.root)
    made.append(det)
    rec = Recorder()
    det.start(rec)
    return det, rec


def test_an_empty_job_dir_is_reported_gone_after_grace_and_back_with_a_process(
    tree: tuple[Path, FakeProc, list[CgroupDetector]], caplog: pytest.LogCaptureFixture
) -> None:
    scope, proc, made = tree
    det, rec = start(scope, proc, made, grace=0.3)
    (scope / "job_7" / "step_extern").mkdir(parents=True)
    seen = rec.wait_seen("job_7")
    gone_ = rec.wait_gone("job_7", timeout=3)
    took = gone_.at - seen.at
    assert 0.3 <= took < 1.5, took  # two empty scans at least a grace apart
    assert det.jobs() == frozenset()
    assert any("job_7" in line and "left behind by Slurm" in line for line in det.describe())
    assert "job_7: no process in it for 0.3 s, but Slurm left its dirs" in caplog.text
    assert str(scope / "job_7") in caplog.text

    # A process in it again (an id re-used after the controller's state was wiped): a live job.
    proc.put(4242, "/system.slice/slurmstepd.scope/job_7/step_0/user/task_0")
    rec.wait_for(lambda: len(rec.seen("job_7")) == 2, "job_7 seen again", 3)
    assert det.jobs() == {"job_7"}
    proc.drop(4242)
    rec.wait_for(lambda: len(rec.gone("job_7")) == 2, "job_7 stale again", 3)

    # Its dirs going at last: nothing more to say, it was reported gone already.
    (scope / "job_7" / "step_extern").rmdir()
    (scope / "job_7").rmdir()
    time.sleep(0.5)
    assert len(rec.gone("job_7")) == 2 and len(rec.seen("job_7")) == 2
    assert det.jobs() == frozenset()
    assert not any("left behind" in line for line in det.describe())


def test_a_job_with_a_process_is_never_stale(tree: tuple[Path, FakeProc, list[CgroupDetector]]) -> None:
    scope, proc, made = tree
    det, rec = start(scope, proc, made, grace=0.2)
    proc.put(500, "/system.slice/slurmstepd.scope/job_8/step_batch/user/task_0")
    (scope / "job_8").mkdir()
    (scope / "job_5").mkdir()  # empty: the control that proves the sweep ran
    rec.wait_gone("job_5", timeout=3)
    time.sleep(0.6)  # three more grace periods
    assert rec.gone("job_8") == [] and det.jobs() == {"job_8"}


def test_a_new_dir_of_a_stale_job_brings_it_back_at_once(
    tree: tuple[Path, FakeProc, list[CgroupDetector]],
) -> None:
    """As in v1, where Slurm left job_7 in freezer and the id starts again: its memory dir appears."""
    scope, proc, made = tree
    scope2 = scope.parent / "x_slurmstepd.scope"
    scope2.mkdir()
    det, rec = start(scope, proc, made, grace=0.2)
    (scope / "job_7").mkdir()
    rec.wait_gone("job_7", timeout=3)
    (scope2 / "job_7").mkdir()
    rec.wait_for(lambda: len(rec.seen("job_7")) == 2, "job_7 seen again", 2)
    assert det.jobs() == {"job_7"}


def test_the_sweep_is_off_where_proc_hides_other_users(
    tree: tuple[Path, FakeProc, list[CgroupDetector]], caplog: pytest.LogCaptureFixture
) -> None:
    scope, proc, made = tree
    proc.drop(1)  # hidepid: root's pid 1 is not readable
    assert hides_processes(proc.root) is not None
    det, rec = start(scope, proc, made, grace=0.1)
    assert "/proc hides other users' processes; job dirs Slurm leaves behind are not spotted" in caplog.text
    (scope / "job_3").mkdir()
    rec.wait_seen("job_3")
    time.sleep(0.5)
    assert rec.gone("job_3") == [] and det.jobs() == {"job_3"}  # never guessed empty


def test_no_scan_while_no_job_is_known(
    tree: tuple[Path, FakeProc, list[CgroupDetector]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Idle costs nothing: with no job known, /proc is not read at all."""
    scope, proc, made = tree
    calls: list[float] = []

    def counting(root: Path, own: frozenset[str]) -> dict[str, str]:
        calls.append(time.monotonic())
        return jobs_with_processes(root, own)

    monkeypatch.setattr("watchdog_llm.detect.watcher.jobs_with_processes", counting)
    det, rec = start(scope, proc, made, grace=0.1)
    time.sleep(0.5)
    assert calls == []
    (scope / "job_4").mkdir()
    rec.wait_gone("job_4", timeout=3)
    assert len(calls) >= 2 and det.jobs() == frozenset()


# --- the real cgroupfs and the real /proc -----------------------------------------------------------


@contextlib.contextmanager
def process_in(cgroup: Path) -> Iterator[subprocess.Popen[bytes]]:
    p = subprocess.Popen(["sleep", "60"])
    try:
        (cgroup / "cgroup.procs").write_text(str(p.pid))
        yield p
    finally:
        p.kill()
        p.wait()


@pytest.mark.cgroupfs
def test_real_cgroupfs_empty_job_goes_stale_a_busy_one_does_not(slurm_v1: Path) -> None:
    made: list[CgroupDetector] = []
    try:
        busy = slurm_v1 / "job_717171"
        (busy / "step_batch").mkdir(parents=True)
        with process_in(busy / "step_batch") as p:
            det = CgroupDetector(Path("/sys/fs/cgroup"), frozenset(), LOG, stale_grace=0.3)
            made.append(det)
            rec = Recorder()
            assert "job_717171" in det.start(rec)
            empty = slurm_v1 / "job_727272"
            (empty / "step_extern").mkdir(parents=True)
            rec.wait_seen("job_727272")
            rec.wait_gone("job_727272", timeout=3)
            time.sleep(0.6)
            assert det.jobs() == {"job_717171"}, "a job with a real process in it was taken as stale"
            # A real process joins the stale job: it is live again.
            with process_in(empty / "step_extern"):
                rec.wait_for(lambda: len(rec.seen("job_727272")) == 2, "job_727272 back", 3)
                assert det.jobs() == {"job_717171", "job_727272"}
            assert p.poll() is None
    finally:
        for det in made:
            det.stop()


@pytest.mark.cgroupfs
@pytest.mark.timeout(90)
def test_daemon_resumes_past_a_job_dir_slurm_left_behind(daemon_env: dict[str, str], slurm_v1: Path) -> None:
    d = DaemonProc(env_with(daemon_env, CGROUP_ROOT="/sys/fs/cgroup", STALE_JOB_GRACE="1"))
    try:
        pids = d.wait_state("serving")["model_pids"]
        job = slurm_v1 / "job_737373"
        (job / "step_extern").mkdir(parents=True)
        st = d.wait_state("yielded")
        gone(pids)
        assert st["last_yield"]["job"] == "job_737373"
        st = d.wait_state("serving", 20)  # the dir is still there
        assert job.is_dir() and st["jobs"] == []
        assert "job_737373: no process in it for 1 s, but Slurm left its dirs" in d.log()
        wait_for(lambda: d.status().get("state") == "serving", 5)
        assert d.terminate() == 0
    finally:
        d.cleanup()
