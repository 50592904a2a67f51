"""Slurm jobs seen by scanning /proc/<pid>/cgroup, for sites that forbid touching cgroupfs.

/proc/<pid>/cgroup is served under RCU, so reading it often is safe, unlike cgroupfs files.
Slower than inotify (one `interval` of latency) and blind to jobs with no process yet.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from watchdog_llm.detect.slurm import (
    DetectError,
    JobGone,
    JobSeen,
    Sink,
    emit,
    report_failure,
)
from watchdog_llm.detect.stale import jobs_with_processes


class ProcfsDetector:
    name = "procfs"

    def __init__(
        self, interval: float, own: frozenset[str], log: logging.Logger, proc_root: Path = Path("/proc")
    ) -> None:
        self._interval = interval
        self._own = own
        self._log = log
        self._proc = proc_root
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._jobs: dict[str, str] = {}  # job -> cgroup path it was seen at
        self._failing = False  # log a failing scan once, not every interval

    def start(self, sink: Sink) -> frozenset[str]:
        if self._thread is not None or self._stop.is_set():
            raise RuntimeError("ProcfsDetector.start() called twice")
        try:
            jobs = self._scan()
        except OSError as e:
            raise DetectError(f"cannot list {self._proc}: {e.strerror or e}") from e
        with self._lock:
            self._jobs = jobs
        self._thread = threading.Thread(target=self._run, args=(sink,), name="detect-procfs", daemon=True)
        self._thread.start()
        return frozenset(jobs)

    def stop(self) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def jobs(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._jobs)

    def describe(self) -> list[str]:
        jobs = ", ".join(sorted(self.jobs())) or "none"
        return [f"procfs: reading {self._proc}/<pid>/cgroup every {self._interval:g} s", f"jobs now: {jobs}"]

    def _run(self, sink: Sink) -> None:
        try:
            self._loop(sink)
        except BaseException as e:  # a bug here must not leave the daemon blind without a word
            report_failure(sink, "the /proc scan thread failed", e, self._log)

    def _loop(self, sink: Sink) -> None:
        # Event.wait, not sleep: stop() must not wait out an interval.
        while not self._stop.wait(self._interval):
            try:
                now = self._scan()
            except Exception as e:  # keep the last known jobs: a failed scan is not "all jobs gone"
                if not self._failing:
                    self._log.warning("detect: scanning %s failed: %s", self._proc, e)
                self._failing = True
                continue
            self._failing = False
            with self._lock:
                old, self._jobs = self._jobs, now
            at = time.monotonic()
            for job in sorted(now.keys() - old.keys()):
                emit(sink, JobSeen(job, now[job], at, None), self._log)
            for job in sorted(old.keys() - now.keys()):
                emit(sink, JobGone(job, at), self._log)

    def _scan(self) -> dict[str, str]:
        return jobs_with_processes(self._proc, self._own)
