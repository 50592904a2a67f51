"""Detectors against real inotify on scratch trees, a fake /proc, the real /proc and (marked) real cgroupfs."""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from watchdog.observers.inotify_c import InotifyEvent, InotifyFD

from watchdog_llm.detect import (
    CgroupDetector,
    DetectError,
    DetectorFailed,
    JobGone,
    JobSeen,
    ProcfsDetector,
    Signal,
    make_detector,
)

LOG = logging.getLogger("test.detect")
V1_CONTROLLERS = ("cpuset", "memory", "devices", "freezer")
_sentinel_ids = itertools.count(900_000)
SENTINELS: set[str] = set()


class Recorder:
    """A thread-safe sink; tests wait on it with a deadline instead of sleeping."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.signals: list[Signal] = []
        self.called_at: list[float] = []  # time.perf_counter() per call, for latency prints

    def __call__(self, signal: Signal) -> None:
        with self._cond:
            self.signals.append(signal)
            self.called_at.append(time.perf_counter())
            self._cond.notify_all()

    def seen(self, job: str) -> list[JobSeen]:
        with self._cond:
            return [s for s in self.signals if isinstance(s, JobSeen) and s.job == job]

    def gone(self, job: str) -> list[JobGone]:
        with self._cond:
            return [s for s in self.signals if isinstance(s, JobGone) and s.job == job]

    def jobs_signalled(self) -> set[str]:
        """Jobs with any signal, flush() sentinels left out."""
        with self._cond:
            return {s.job for s in self.signals} - SENTINELS

    def wait_for(self, pred: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
        """Wait until pred() holds; woken by each signal, and re-checked every 5 ms for other state."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not pred():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"timed out waiting for {what}; signals: {self.signals}")
                self._cond.wait(min(left, 0.005))

    def wait_seen(self, job: str, timeout: float = 5.0) -> JobSeen:
        self.wait_for(lambda: bool(self.seen(job)), f"JobSeen({job})", timeout)
        return self.seen(job)[0]

    def wait_gone(self, job: str, timeout: float = 5.0) -> JobGone:
        self.wait_for(lambda: bool(self.gone(job)), f"JobGone({job})", timeout)
        return self.gone(job)[0]


def flush(rec: Recorder, scope: Path) -> None:
    """Wait until the detector has handled every earlier event: one inotify queue is read in order,
    so once a sentinel job made now has come and gone, everything before it has been handled."""
    job = f"job_{next(_sentinel_ids)}"
    SENTINELS.add(job)
    (scope / job).mkdir()
    rec.wait_seen(job)
    (scope / job).rmdir()
    rec.wait_gone(job)


def rmtree_dirs(path: Path) -> None:
    """rmdir deepest first, like Slurm (cgroupfs only knows rmdir)."""
    for sub in sorted(path.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        sub.rmdir()
    path.rmdir()


@contextlib.contextmanager
def small_inotify_queue(size: int) -> Iterator[None]:
    """fs.inotify.max_queued_events lowered to `size` for inotify instances created inside (root only)."""
    knob = Path("/proc/sys/fs/inotify/max_queued_events")
    limit = int(knob.read_text())
    try:
        knob.write_text(f"{size}\n")
    except OSError as e:
        pytest.skip(f"cannot lower {knob} (needs root): {e.strerror}")
    try:
        yield
    finally:
        knob.write_text(f"{limit}\n")
    assert int(knob.read_text()) == limit


def v2_scope(root: Path) -> Path:
    scope = root / "system.slice" / "slurmstepd.scope"
    scope.mkdir(parents=True, exist_ok=True)
    return scope


@pytest.fixture
def make(request: pytest.FixtureRequest) -> Iterator[Callable[..., CgroupDetector]]:
    """Builds CgroupDetectors and checks that stop() leaves no thread behind."""
    before = set(threading.enumerate())
    made: list[CgroupDetector] = []

    def _make(root: Path, own: frozenset[str] = frozenset()) -> CgroupDetector:
        det = CgroupDetector(root, own, LOG)
        made.append(det)
        return det

    yield _make
    for det in made:
        det.stop()
        det.stop()  # idempotent
    assert set(threading.enumerate()) <= before, "a detector thread survived stop()"


# --- cgroup v2 layout ---------------------------------------------------------------------------


def test_v2_job_seen_once_then_gone(tmp_path: Path, make: Callable[..., CgroupDetector]) -> None:
    scope = v2_scope(tmp_path)
    det = make(tmp_path)
    rec = Recorder()
    assert det.start(rec) == frozenset()
    assert any(line == f"cgroup v2: {scope}" for line in det.describe())

    t0 = time.perf_counter()
    (scope / "job_5").mkdir()
    (scope / "job_5" / "step_extern").mkdir()  # slurmstepd does this within ~0.1 ms
    seen = rec.wait_seen("job_5")
    print(f"\nscratch v2: mkdir -> JobSeen {(rec.called_at[0] - t0) * 1000:.2f} ms, age_ms={seen.age_ms}")
    assert seen.path == str(scope / "job_5")
    assert seen.age_ms is not None and seen.age_ms >= 0
    assert det.jobs() == {"job_5"}

    (scope / "job_5" / "step_extern").rmdir()
    (scope / "job_5").rmdir()
    gone = rec.wait_gone("job_5")
    assert gone.at >= seen.at
    flush(rec, scope)
    assert len(rec.seen("job_5")) == 1 and len(rec.gone("job_5")) == 1
    assert det.jobs() == frozenset()


def test_multi_slurmd_scope_and_sluid(tmp_path: Path, make: Callable[..., CgroupDetector]) -> None:
    scope = tmp_path / "system.slice" / "node7_slurmstepd.scope"
    scope.mkdir(parents=True)
    det = make(tmp_path)
    rec = Recorder()
    det.start(rec)
    sluid = "s5K1KKYAYG5D00"
    (scope / sluid / "step_batch").mkdir(parents=True)
    assert rec.wait_seen(sluid).path == str(scope / sluid)
    rmtree_dirs(scope / sluid)
    rec.wait_gone(sluid)


def test_non_job_dirs_ignored(tmp_path: Path, make: Callable[..., CgroupDetector]) -> None:
    scope = v2_scope(tmp_path)
    det = make(tmp_path)
    rec = Recorder()
    det.start(rec)
    (scope / "system").mkdir()  # slurmstepd's own processes
    (scope / "step_0").mkdir()  # a step name at job level is not a job
    (scope / "s5k1kkyayg5d00").mkdir()  # not a SLUID: lower case
    (scope / "job_5" / "step_0" / "job_6").mkdir(parents=True)  # job_6 is below a job, not a job
    (tmp_path / "system.slice" / "job_7").mkdir()  # not under the scope
    (tmp_path / "job_8").mkdir()
    (tmp_path / "user.slice" / "slurmstepd.scope" / "job_9").mkdir(parents=True)  # any slice (CgroupSlice)
    (tmp_path / "memory" / "slurm" / "job_10").mkdir(parents=True)  # v1 job without uid_N
    (scope / "job_11").touch()  # a file, not a dir
    flush(rec, scope)
    assert rec.jobs_signalled() == {"job_5", "job_9"}
    assert det.jobs() == {"job_5", "job_9"}


def test_jobs_present_at_start_are_returned_not_sent(tmp_path: Path, make: Callable[..., CgroupDetector]) -> None:
    scope = v2_scope(tmp_path)
    (scope / "job_1" / "step_extern").mkdir(parents=True)
    (tmp_path / "memory" / "slurm" / "uid_0" / "job_2" / "step_batch").mkdir(parents=True)
    det = make(tmp_path)
    rec = Recorder()
    assert det.start(rec) == {"job_1", "job_2"}
    flush(rec, scope)
    assert not rec.seen("job_1") and not rec.seen("job_2")
    rmtree_dirs(scope / "job_1")
    rec.wait_gone("job_1")
    assert det.jobs() == {"job_2"}
    lines = det.describe()
    assert f"cgroup v1 memory: {tmp_path / 'memory' / 'slurm'} (1 uid dir)" in lines


def test_own_job_ignored(tmp_path: Path, make: Callable[..., CgroupDetector]) -> None:
    scope = v2_scope(tmp_path)
    (scope / "job_9").mkdir()
    det = make(tmp_path, own=frozenset({"job_9", "job_10"}))
    rec = Recorder()
    assert det.start(rec) == frozenset()
    (scope / "job_10" / "step_extern").mkdir(parents=True)
    (scope / "job_11" / "step_extern").mkdir(parents=True)
    rec.wait_seen("job_11")
    rmtree_dirs(scope / "job_9")
    flush(rec, scope)
    assert not rec.seen("job_10") and not rec.gone("job_9")
    assert det.jobs() == {"job_11"}


# --- cgroup v1 layout ---------------------------------------------------------------------------


def test_v1_job_in_four_controllers(tmp_path: Path, make: Callable[..., CgroupDetector]) -> None:
    """Debian's `slurm_<host>`; freezer's exists from slurmd start, the others come with the first job."""
    for ctrl in (*V1_CONTROLLERS, "cpu,cpuacct", "pids", "unified"):
        (tmp_path / ctrl).mkdir()
    (tmp_path / "freezer" / "slurm_host").mkdir()
    scope = v2_scope(tmp_path / "unified")
    det = make(tmp_path)
    rec = Recorder()
    assert det.start(rec) == frozenset()
    assert f"cgroup v1 freezer: {tmp_path / 'freezer' / 'slurm_host'} (0 uid dirs)" in det.describe()

    for ctrl in V1_CONTROLLERS:
        (tmp_path / ctrl / "slurm_host" / "uid_1000" / "job_7" / "step_extern").mkdir(parents=True)
    # Noise that must not count: other controllers, and the VM's process_api cgroups.
    (tmp_path / "pids" / "slurm_host" / "uid_1000" / "job_8").mkdir(parents=True)
    (tmp_path / "memory" / "process_api" / "abc").mkdir(parents=True)
    seen = rec.wait_seen("job_7")
    assert seen.age_ms is not None
    flush(rec, scope)
    assert det.jobs() == {"job_7"}
    assert sum(1 for line in det.describe() if line.startswith("cgroup v1 ")) == 4

    for ctrl in V1_CONTROLLERS[:-1]:
        rmtree_dirs(tmp_path / ctrl / "slurm_host" / "uid_1000" / "job_7")
    flush(rec, scope)
    assert not rec.gone("job_7"), "gone while still present in freezer"
    assert det.jobs() == {"job_7"}
    rmtree_dirs(tmp_path / "freezer" / "slurm_host" / "uid_1000")  # the uid dir goes with the last job
    rec.wait_gone("job_7")
    flush(rec, scope)
    assert len(rec.seen("job_7")) == 1 and len(rec.gone("job_7")) == 1
    assert rec.jobs_signalled() & {"job_8"} == set()


def test_uid_dir_created_with_job_inside(tmp_path: Path, make: Callable[..., CgroupDetector]) -> None:
    """The race: `uid_N` appears with its first job already inside; the job has no event of its own."""
    (tmp_path / "memory" / "slurm_host").mkdir(parents=True)
    scope = v2_scope(tmp_path)
    det = make(tmp_path)
    rec = Recorder()
    det.start(rec)
    jobs = [f"job_{100 + i}" for i in range(20)]
    for i, job in enumerate(jobs):
        os.makedirs(tmp_path / "memory" / "slurm_host" / f"uid_{1000 + i}" / job / "step_extern")
    for job in jobs:
        rec.wait_seen(job)
    # Deeper still: the controller dir and everything below it in one go.
    os.makedirs(tmp_path / "devices" / "slurm_host" / "uid_5" / "job_200" / "step_extern")
    rec.wait_seen("job_200")
    flush(rec, scope)
    assert det.jobs() == {*jobs, "job_200"}


def test_slurm_dir_absent_then_created(tmp_path: Path, make: Callable[..., CgroupDetector]) -> None:
    (tmp_path / "cpuset").mkdir()
    det = make(tmp_path)
    rec = Recorder()
    det.start(rec)
    assert f"no Slurm cgroup dirs yet; watching {tmp_path} for them" in det.describe()
    (tmp_path / "cpuset" / "slurm").mkdir()
    (tmp_path / "cpuset" / "slurm" / "uid_0").mkdir()
    (tmp_path / "cpuset" / "slurm" / "uid_0" / "job_3").mkdir()
    rec.wait_seen("job_3")
    assert f"cgroup v1 cpuset: {tmp_path / 'cpuset' / 'slurm'} (1 uid dir)" in det.describe()


def test_cgroup_root_missing_at_start(
    tmp_path: Path, make: Callable[..., CgroupDetector], caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "a" / "b" / "cgroup"
    det = make(root)
    rec = Recorder()
    with caplog.at_level(logging.INFO, logger=LOG.name):
        assert det.start(rec) == frozenset()
        assert f"{root} does not exist yet; watching {tmp_path} for it" in det.describe()
        (tmp_path / "a").mkdir()  # one component at a time ...
        (tmp_path / "a" / "b").mkdir()
        rec.wait_for(lambda: f"watching {tmp_path / 'a' / 'b'}" in det.describe()[0], "ancestor moves down")
        # ... and the rest in one go, job included
        os.makedirs(root / "system.slice" / "slurmstepd.scope" / "job_8" / "step_extern")
        rec.wait_seen("job_8")
    # Logged once the root's tree is listed, so possibly just after job_8's JobSeen.
    rec.wait_for(lambda: any("appeared" in r.getMessage() for r in caplog.records), "pick-up logged")
    assert det.jobs() == {"job_8"}
    assert not any("does not exist" in line for line in det.describe())


def test_root_unusable_raises(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    det = CgroupDetector(tmp_path / "file", frozenset(), LOG)
    with pytest.raises(DetectError, match="not a directory"):
        det.start(Recorder())
    det.stop()
    with pytest.raises(DetectError, match="unknown detection mode"):
        make_detector("nvml", cgroup_root=tmp_path, poll_interval=1, own=frozenset(), log=LOG)


def test_inotify_unavailable_raises(tmp_path: Path) -> None:
    """A real EMFILE from inotify_init: the per-user instance limit lowered to 0 for a moment (root)."""
    knob = Path("/proc/sys/fs/inotify/max_user_instances")
    limit = int(knob.read_text())
    try:
        knob.write_text("0\n")
    except OSError as e:
        pytest.skip(f"cannot lower {knob} (needs root): {e.strerror}")
    try:
        with pytest.raises(DetectError, match="inotify unavailable: inotify instance limit reached"):
            CgroupDetector(tmp_path, frozenset(), LOG).start(Recorder())
    finally:
        knob.write_text(f"{limit}\n")


def test_root_removed_then_back(tmp_path: Path, make: Callable[..., CgroupDetector]) -> None:
    """Not on kernfs (a mount point), but tmpfs/ext4 drop the root's watch: wait for it again."""
    root = tmp_path / "cg"
    (v2_scope(root) / "job_1").mkdir()
    det = make(root)
    rec = Recorder()
    assert det.start(rec) == {"job_1"}
    rmtree_dirs(root)
    rec.wait_gone("job_1")
    rec.wait_for(lambda: "does not exist yet" in det.describe()[0], "back to watching the parent")
    os.makedirs(root / "system.slice" / "slurmstepd.scope" / "job_2")
    rec.wait_seen("job_2")
    assert det.jobs() == {"job_2"}


@pytest.mark.skipif(os.geteuid() == 0, reason="root can list any directory")
def test_root_unreadable_raises(tmp_path: Path) -> None:
    root = tmp_path / "locked"
    root.mkdir(mode=0)
    try:
        with pytest.raises(DetectError):
            CgroupDetector(root, frozenset(), LOG).start(Recorder())
    finally:
        root.chmod(0o755)


def test_dirs_vanishing_before_their_watch(
    tmp_path: Path, make: Callable[..., CgroupDetector], caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "memory").mkdir()
    scope = v2_scope(tmp_path)
    det = make(tmp_path)
    rec = Recorder()
    det.start(rec)
    watching = [line for line in det.describe() if line.startswith("watching")]
    with caplog.at_level(logging.DEBUG, logger=LOG.name):
        for i in range(300):
            top = tmp_path / "memory" / "slurm_host"
            os.makedirs(top / "uid_0" / f"job_{i}" / "step_extern")
            rmtree_dirs(top)
            (scope / f"job_{1000 + i}").mkdir()
            (scope / f"job_{1000 + i}").rmdir()
        flush(rec, scope)
    assert det.jobs() == frozenset()
    for job in rec.jobs_signalled():  # whatever was seen is gone again, each once
        assert len(rec.seen(job)) == len(rec.gone(job)) == 1, job
    assert [line for line in det.describe() if line.startswith("watching")] == watching
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_queue_overflow_rescans(tmp_path: Path, make: Callable[..., CgroupDetector]) -> None:
    """A real kernel IN_Q_OVERFLOW under watchdog's own reader thread, then a rescan that makes up for
    every lost event. The queue is small because fs.inotify.max_queued_events is lowered while the
    detector's inotify instance is created (the kernel reads it once, at inotify_init). watchdog >= 7.1.1
    drains the kernel queue on its own thread, so blocking the sink no longer overflows anything: the
    reader is held at its lock instead, between two reads, while more events are made than fit."""
    (tmp_path / "memory" / "slurm_host" / "uid_5" / "job_50").mkdir(parents=True)
    scope = v2_scope(tmp_path)
    (scope / "job_0").mkdir()
    det = make(tmp_path)
    rec = Recorder()
    small = 16
    with small_inotify_queue(small):
        assert det.start(rec) == {"job_0", "job_50"}
    flush(rec, scope)
    ino = det._ino
    assert ino is not None

    with ino._lock:  # watchdog's reader takes it around every read: at most one more read happens
        for _ in range(small + 4):  # 2 events each: more than twice the queue, so it overflows
            (scope / "x").mkdir()
            (scope / "x").rmdir()
        # Lost events, which only the rescan can make up for:
        (scope / "job_0").rmdir()
        (scope / "job_2").mkdir()
        # uid_5 removed and re-created: the old watch is dead; the rescan must watch the new dir.
        rmtree_dirs(tmp_path / "memory" / "slurm_host" / "uid_5")
        (tmp_path / "memory" / "slurm_host" / "uid_5" / "job_51").mkdir(parents=True)
    rec.wait_gone("job_0")
    rec.wait_seen("job_2")
    rec.wait_gone("job_50")
    rec.wait_seen("job_51")
    assert det.overflows >= 1
    assert ino.is_alive(), "watchdog's reader thread died on the overflow"
    # Events after the rescan still arrive, including in the re-created uid dir.
    (tmp_path / "memory" / "slurm_host" / "uid_5" / "job_52").mkdir()
    rec.wait_seen("job_52")
    flush(rec, scope)
    assert det.jobs() == {"job_2", "job_51", "job_52"}
    assert not [s for s in rec.signals if isinstance(s, DetectorFailed)]


def test_reader_thread_dying_is_reported_not_silent(
    tmp_path: Path,
    make: Callable[..., CgroupDetector],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An exception inside watchdog's dispatch (as 7.1.1's call of a handler method we lacked was) ends
    its thread: the detector says so once, loudly, and sends DetectorFailed instead of going blind."""
    scope = v2_scope(tmp_path)
    det = make(tmp_path)
    rec = Recorder()
    det.start(rec)
    real = InotifyFD.handle_event

    def broken(self: InotifyFD, event: InotifyEvent) -> None:
        if event.name == b"job_boom":
            raise AttributeError("'_Callback' object has no attribute 'on_something_new'")
        real(self, event)

    monkeypatch.setattr(InotifyFD, "handle_event", broken)
    with caplog.at_level(logging.ERROR, logger=LOG.name):
        (scope / "job_boom").mkdir()
        rec.wait_for(lambda: any(isinstance(s, DetectorFailed) for s in rec.signals), "DetectorFailed")
    failed = [s for s in rec.signals if isinstance(s, DetectorFailed)]
    assert len(failed) == 1 and "on_something_new" in failed[0].detail
    assert "job detection has STOPPED" in caplog.text
    assert any("FAILED" in line for line in det.describe())
    det.stop()  # still stops cleanly (the fixture checks that no thread is left)


def test_failed_rescan_after_a_handler_error_is_reported(
    tmp_path: Path, make: Callable[..., CgroupDetector], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A handler error is survived by a rescan; when the rescan fails too, the view cannot be trusted."""
    scope = v2_scope(tmp_path)
    det = make(tmp_path)
    rec = Recorder()
    det.start(rec)

    def boom(*_: object, **__: object) -> None:
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(det, "_handle", boom)
    monkeypatch.setattr(det, "_rescan", boom)
    (scope / "job_1").mkdir()
    rec.wait_for(lambda: any(isinstance(s, DetectorFailed) for s in rec.signals), "DetectorFailed")
    (scope / "job_2").mkdir()
    time.sleep(0.1)
    assert sum(isinstance(s, DetectorFailed) for s in rec.signals) == 1  # once, and nothing after it


def test_procfs_thread_failure_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "cgroup").write_text("0::/\n")
    det = ProcfsDetector(0.01, frozenset(), LOG, tmp_path)
    rec = Recorder()
    det.start(rec)
    try:
        monkeypatch.setattr(det, "_scan", lambda: {"job_1": "/x"})
        monkeypatch.setattr("watchdog_llm.detect.procfs.emit", lambda *_: 1 / 0)
        rec.wait_for(lambda: any(isinstance(s, DetectorFailed) for s in rec.signals), "DetectorFailed")
    finally:
        det.stop()
    assert "ZeroDivisionError" in next(s for s in rec.signals if isinstance(s, DetectorFailed)).detail


def test_overflow_handler_reconciles(tmp_path: Path, make: Callable[..., CgroupDetector]) -> None:
    """The rescan called directly (in addition to the real overflow above): no changes, no signals."""
    scope = v2_scope(tmp_path)
    (scope / "job_1").mkdir()
    det = make(tmp_path)
    rec = Recorder()
    det.start(rec)
    det._on_overflow()
    flush(rec, scope)
    assert rec.jobs_signalled() == set()
    assert det.jobs() == {"job_1"}


def test_moves(tmp_path: Path, make: Callable[..., CgroupDetector]) -> None:
    """v1 cgroups can be renamed: IN_MOVED_TO counts as a creation, IN_MOVED_FROM as a removal."""
    scope = v2_scope(tmp_path)
    slurm = tmp_path / "memory" / "slurm"
    slurm.mkdir(parents=True)
    staging = tmp_path / "staging"
    (staging / "uid_0" / "job_3" / "step_extern").mkdir(parents=True)
    det = make(tmp_path)
    rec = Recorder()
    det.start(rec)
    (staging / "uid_0").rename(slurm / "uid_0")
    rec.wait_seen("job_3")
    (slurm / "uid_0" / "job_3").rename(slurm / "uid_0" / "job_4")
    rec.wait_gone("job_3")
    rec.wait_seen("job_4")
    (slurm / "uid_0").rename(staging / "uid_0")
    rec.wait_gone("job_4")
    flush(rec, scope)
    assert det.jobs() == frozenset()


def test_start_stop(tmp_path: Path) -> None:
    before = set(threading.enumerate())
    det = make_detector("cgroup", cgroup_root=tmp_path, poll_interval=1, own=frozenset(), log=LOG)
    assert det.name == "cgroup"
    det.start(Recorder())
    assert set(threading.enumerate()) > before
    det.stop()
    det.stop()
    assert set(threading.enumerate()) <= before
    assert det.jobs() == frozenset()
    with pytest.raises(RuntimeError):
        det.start(Recorder())


def test_raising_sink_does_not_stop_detection(tmp_path: Path, make: Callable[..., CgroupDetector]) -> None:
    scope = v2_scope(tmp_path)
    det = make(tmp_path)
    rec = Recorder()

    def sink(signal: Signal) -> None:
        rec(signal)
        raise ValueError("boom")

    det.start(sink)
    (scope / "job_1").mkdir()
    (scope / "job_2").mkdir()
    rec.wait_seen("job_2")


# --- procfs -------------------------------------------------------------------------------------


def write_proc(proc: Path, pid: int, text: str) -> None:
    (proc / str(pid)).mkdir(exist_ok=True)
    (proc / str(pid) / "cgroup").write_text(text)


def test_procfs_fake_proc(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    proc.mkdir()
    (proc / "self").mkdir()
    (proc / "sys").mkdir()
    write_proc(proc, 1, "0::/init.scope\n")
    write_proc(proc, 10, "0::/system.slice/slurmstepd.scope/job_1/step_0/user/task_0\n")
    write_proc(proc, 11, "0::/system.slice/slurmstepd.scope/job_99/step_batch/user/task_0\n")  # own
    (proc / "12").mkdir()  # a process that exited between listing and reading
    det = make_detector(
        "procfs", cgroup_root=tmp_path, poll_interval=0.01, own=frozenset({"job_99"}), log=LOG, proc_root=proc
    )
    assert det.name == "procfs"
    rec = Recorder()
    try:
        assert det.start(rec) == {"job_1"}
        write_proc(proc, 20, "9:memory:/slurm_node1/uid_1000/job_7/step_batch/task_0\n0::/\n")
        seen = rec.wait_seen("job_7")
        assert seen.age_ms is None and seen.path == "/slurm_node1/uid_1000/job_7"
        assert det.jobs() == {"job_1", "job_7"}
        (proc / "10" / "cgroup").unlink()
        (proc / "10").rmdir()
        rec.wait_gone("job_1")
        assert not rec.seen("job_1") and not rec.seen("job_99")
        assert "every 0.01 s" in det.describe()[0]
    finally:
        t = time.monotonic()
        det.stop()
        det.stop()
    assert time.monotonic() - t < 1.0


def test_procfs_slow_interval_stops_at_once(tmp_path: Path) -> None:
    det = ProcfsDetector(60.0, frozenset(), LOG, proc_root=tmp_path)
    det.start(Recorder())
    t = time.monotonic()
    det.stop()
    assert time.monotonic() - t < 1.0
    with pytest.raises(DetectError):
        ProcfsDetector(1.0, frozenset(), LOG, proc_root=tmp_path / "missing").start(Recorder())


def test_procfs_real_proc() -> None:
    """This machine runs no Slurm job: the real /proc scans cleanly and finds none."""
    det = ProcfsDetector(0.01, frozenset(), LOG)
    rec = Recorder()
    try:
        assert det.start(rec) == frozenset()
        time.sleep(0.1)  # let it scan a few times; the assertion is on what it found, not on timing
        assert det.jobs() == frozenset() and rec.signals == []
    finally:
        det.stop()


# --- real cgroupfs ------------------------------------------------------------------------------


def _can_mkdir_cgroup(path: Path) -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    probe = path / f"wdtest_probe{secrets.token_hex(4)}"
    try:
        probe.mkdir()
    except OSError as e:
        return f"cannot mkdir under {path}: {e.strerror}"
    probe.rmdir()
    return None


@pytest.mark.cgroupfs
def test_real_cgroupfs_v1(make: Callable[..., CgroupDetector]) -> None:
    memory = Path("/sys/fs/cgroup/memory")
    reason = _can_mkdir_cgroup(memory)
    if reason:
        pytest.skip(f"real cgroupfs test skipped: {reason}")
    top = memory / f"slurm_wdtest{secrets.token_hex(4)}"
    job = f"job_{secrets.randbelow(10**9)}"
    det = make(Path("/sys/fs/cgroup"))
    rec = Recorder()
    made: list[Path] = []
    try:
        det.start(rec)
        t0 = time.perf_counter()
        for p in (top, top / "uid_0", top / "uid_0" / job, top / "uid_0" / job / "step_extern"):
            p.mkdir()  # one by one, as slurmstepd does, recording each for cleanup
            made.append(p)
        seen = rec.wait_seen(job)
        latency = (rec.called_at[0] - t0) * 1000
        print(f"\nreal cgroupfs v1: mkdir -> JobSeen {latency:.2f} ms, age_ms={seen.age_ms}")
        assert seen.path == str(top / "uid_0" / job)
        assert seen.age_ms is not None and seen.age_ms < 1000
        assert any(line.startswith(f"cgroup v1 memory: {top}") for line in det.describe())
        for p in reversed(made):
            p.rmdir()
        made.clear()
        rec.wait_gone(job)
        assert len(rec.seen(job)) == 1
        rec.wait_for(lambda: not any(str(top) in line for line in det.describe()), "slurm dir dropped")
    finally:
        for p in reversed(made):
            with contextlib.suppress(OSError):
                p.rmdir()
