"""Slurm job cgroups seen through inotify (watchdog's low-level InotifyFD).

Never reads cgroupfs files and never polls it: a predecessor that did contended on kernfs locks and
hung prologs. We put watches on the few directories where job dirs can appear (see
`slurm.WATCHED`) and list a directory only when we add its watch or after a queue overflow.
While jobs are known, a sweep of /proc (see `stale`) finds the dirs Slurm failed to remove.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from watchdog.observers import inotify_c
from watchdog.observers.inotify_c import (
    CallbackId,
    InotifyConstants,
    InotifyEvent,
    InotifyFD,
    Mask,
    WatchDescriptor,
)

from watchdog_llm.detect.slurm import (
    WATCHED,
    DetectError,
    JobGone,
    JobSeen,
    Kind,
    Signal,
    Sink,
    classify,
    emit,
    report_failure,
    root_kind,
)
from watchdog_llm.detect.stale import StaleTracker, hides_processes, jobs_with_processes

_C = InotifyConstants
# Directory entries only. Never watchdog's default mask: IN_OPEN/IN_CLOSE would report our own reads.
# No IN_DELETE_SELF: kernfs never sends it; on other filesystems IN_IGNORED (always sent) covers it.
MASK = Mask(_C.IN_CREATE | _C.IN_DELETE | _C.IN_MOVED_FROM | _C.IN_MOVED_TO | _C.IN_ONLYDIR)
# While the root is missing we only care about the next path component appearing.
ANCESTOR_MASK = Mask(_C.IN_CREATE | _C.IN_MOVED_TO | _C.IN_ONLYDIR)
_QUIET_ERRNOS = (errno.ENOENT, errno.ENOTDIR)  # the dir vanished (or is not one): normal on a busy node
# watchdog >= 7.1.1 calls on_events_lost once every callback's on_queue_overflow has returned (and
# raises AttributeError on its reader thread if it is missing); older releases call only the latter.
_EVENTS_LOST_HOOK = hasattr(getattr(inotify_c, "WatchCallback", None), "on_events_lost")


@dataclass(eq=False)
class _Dir:
    path: Path
    kind: Kind
    wd: int
    cid: int
    parent: _Dir | None
    children: dict[str, _Dir] = field(default_factory=dict)  # watched subdirs
    jobs: set[str] = field(default_factory=set)  # job dirs directly in here


@dataclass(frozen=True)
class _Ancestor:
    path: Path
    wd: int
    cid: int


class _Callback:
    """InotifyFD calls these on its reader thread; one object so an overflow is reported once."""

    __slots__ = ("_det",)

    def __init__(self, det: CgroupDetector) -> None:
        self._det = det

    def on_event(self, event: InotifyEvent) -> None:
        self._det._on_event(event)

    def on_watch_deleted(self, wd: WatchDescriptor) -> None:
        self._det._on_watch_deleted(wd)

    def on_queue_overflow(self) -> None:
        if not _EVENTS_LOST_HOOK:
            self._det._on_overflow()

    def on_events_lost(self) -> None:
        self._det._on_overflow()


class _Reader(InotifyFD):
    """InotifyFD whose thread says when it ends. watchdog ends it on any exception while reading or
    dispatching (7.1.1 stores the exception and stops); after that no event ever comes again."""

    def __init__(self, on_end: Callable[[BaseException | None], None]) -> None:
        super().__init__()
        self._on_end = on_end

    def run(self) -> None:
        try:
            super().run()
        except BaseException as e:
            self._on_end(e)  # reported there, with its traceback: not printed again by threading
        else:
            self._on_end(None)


class CgroupDetector:
    name = "cgroup"

    def __init__(
        self,
        root: Path,
        own: frozenset[str],
        log: logging.Logger,
        *,
        stale_grace: float = 0.0,
        proc_root: Path = Path("/proc"),
    ) -> None:
        self._root = Path(os.path.abspath(root))
        self._own = own
        self._log = log
        self._stale_grace = stale_grace  # 0: every job dir counts for as long as it exists
        self._proc = proc_root
        # RLock: handlers nest (a create lists a dir, which may drop it again).
        self._lock = threading.RLock()
        self._callback = _Callback(self)
        self._cids = itertools.count(1)
        self._ino: InotifyFD | None = None
        self._sink: Sink | None = None  # None while start() runs: jobs found then are returned, not sent
        # Signals made under the lock, sent after it is released: a slow sink never blocks jobs().
        self._pending: list[Signal] = []
        self._stopped = False
        self._failed = False  # DetectorFailed sent: nothing more is reported
        self._root_dir: _Dir | None = None
        self._anc: _Ancestor | None = None
        self._dirs: dict[Path, _Dir] = {}
        self._by_wd: dict[int, _Dir] = {}
        self._where: dict[str, set[Path]] = {}  # job -> every job dir of it we know (v1: one per controller)
        self._stale: dict[str, set[Path]] = {}  # jobs whose dirs Slurm left behind: reported gone
        self._sweep: threading.Thread | None = None
        self._sweep_wake = threading.Event()  # a job appeared, or stop(): ends the sweep's idle wait
        self._sweep_stop = threading.Event()  # ends its wait between scans (new jobs do not: no extra scans)
        self.overflows = 0

    # --- Detector API ------------------------------------------------------------------------

    def start(self, sink: Sink) -> frozenset[str]:
        if self._ino is not None or self._stopped:
            raise RuntimeError("CgroupDetector.start() called twice")
        if self._root.exists() and not self._root.is_dir():
            raise DetectError(f"cgroup root {self._root} is not a directory")
        try:
            with self._lock:
                try:
                    ino = _Reader(self._reader_ended)
                except OSError as e:
                    raise DetectError(f"inotify unavailable: {e.strerror or e}") from e
                # Start the reader at once: stop() relies on it to close the inotify fds.
                ino.start()
                self._ino = ino
                self._attach_root(fatal=True)
                self._sink = sink
                self._start_sweep()
                return frozenset(self._where)
        except BaseException:
            # Outside the lock: stop() joins the reader thread, which may be waiting for it.
            self.stop()
            raise

    def stop(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            self._sink = None
            self._pending.clear()
            ino, self._ino = self._ino, None
            self._dirs.clear()
            self._by_wd.clear()
            self._where.clear()
            self._stale.clear()
            self._root_dir = self._anc = None
            sweep, self._sweep = self._sweep, None
        self._sweep_stop.set()
        self._sweep_wake.set()
        if ino is not None:
            ino.stop()  # closes the fd and every watch; the kernel drops them all at once
            if threading.current_thread() is not ino:
                ino.join()
        if sweep is not None and threading.current_thread() is not sweep:
            sweep.join()

    def jobs(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._where)

    def describe(self) -> list[str]:
        with self._lock:
            if self._ino is None:
                return [f"cgroup detector not running (root {self._root})"]
            lines: list[str] = []
            if self._failed:
                lines.append("job detection FAILED: no new job is seen (see the error above)")
            if self._anc is not None:
                lines.append(f"{self._root} does not exist yet; watching {self._anc.path} for it")
            found = False
            for d in sorted(self._dirs.values(), key=lambda d: d.path):
                if d.kind is Kind.SLURM_V1:
                    found = True
                    ctrl = d.path.parent.name
                    n = sum(1 for c in d.children.values() if c.kind is Kind.UID)
                    lines.append(f"cgroup v1 {ctrl}: {d.path} ({n} uid dir{'' if n == 1 else 's'})")
                elif d.kind is Kind.STEPD_SCOPE:
                    found = True
                    lines.append(f"cgroup v2: {d.path}")
            if not found and self._root_dir is not None:
                lines.append(f"no Slurm cgroup dirs yet; watching {self._root} for them")
            lines.append(f"watching {len(self._dirs) + (self._anc is not None)} dirs")
            lines.append(f"jobs now: {', '.join(sorted(self._where)) or 'none'}")
            if self._stale:
                lines.append(f"ignored, left behind by Slurm with no process: {', '.join(sorted(self._stale))}")
            return lines

    # --- inotify callbacks (reader thread) ----------------------------------------------------

    def _on_event(self, event: InotifyEvent) -> None:
        self._guarded(lambda: self._handle(event), event)

    def _on_watch_deleted(self, wd: WatchDescriptor) -> None:
        self._guarded(lambda: self._watch_lost(wd), f"watch {wd} deleted")

    def _on_overflow(self) -> None:
        self._guarded(self._overflowed, "queue overflow")

    def _guarded(self, fn: Callable[[], None], what: object) -> None:
        broken: Exception | None = None
        with self._lock:
            if self._stopped or self._failed:
                return
            try:
                fn()
            except Exception:
                # Never let an exception end InotifyFD's thread: detection would stop silently.
                self._log.exception("detect: failed on %s; rescanning", what)
                try:
                    self._rescan()
                except Exception as e:
                    broken = e
            out = self._take_pending()
        self._send(out)
        if broken is not None:
            self._fail(f"cannot rebuild the view of {self._root} after a failure on {what}", broken)

    def _reader_ended(self, exc: BaseException | None) -> None:
        with self._lock:
            if self._stopped:
                return  # stop() ended it
        self._fail("the inotify reader thread ended", exc)

    def _fail(self, what: str, exc: BaseException | None) -> None:
        with self._lock:
            if self._stopped or self._failed:
                return
            self._failed = True
            sink = self._sink
        report_failure(sink, what, exc, self._log)

    def _watch_lost(self, wd: int) -> None:
        # tmpfs/ext4 drop a watch when its dir is removed (kernfs never does): the dir is gone.
        if self._anc is not None and wd == self._anc.wd:
            self._anc = None
            self._attach_root(fatal=False)
        elif (d := self._by_wd.get(wd)) is not None:
            self._drop(d)
            if self._root_dir is None:
                self._attach_root(fatal=False)

    def _overflowed(self) -> None:
        self.overflows += 1
        self._log.warning("detect: inotify queue overflowed; rescanning watched cgroup dirs")
        self._rescan()

    def _take_pending(self) -> tuple[Sink | None, list[Signal]]:
        out, self._pending = self._pending, []
        return self._sink, out

    def _send(self, out: tuple[Sink | None, list[Signal]]) -> None:
        sink, signals = out
        if sink is not None:
            for signal in signals:
                emit(sink, signal, self._log)

    def _handle(self, event: InotifyEvent) -> None:
        if self._anc is not None and event.wd == self._anc.wd:
            self._attach_root(fatal=False)
            return
        d = self._by_wd.get(event.wd)
        if d is None or not event.name:
            return  # a late event for a watch we already dropped
        name = os.fsdecode(event.name)
        if event.is_create or event.is_moved_to:
            self._appeared(d, name, is_dir=event.is_directory)
        elif event.is_delete or event.is_moved_from:
            self._vanished(d, name)

    # --- the tree ------------------------------------------------------------------------------

    def _attach_root(self, *, fatal: bool) -> None:
        """Watch the root; while it is missing, watch its nearest existing ancestor instead."""
        try:
            while not self._stopped and self._root_dir is None:
                if self._watch(self._root, root_kind(self._root), None, strict=True):
                    if self._anc is not None:
                        self._log.info("detect: %s appeared; watching it", self._root)
                        self._unwatch(self._anc.wd, self._anc.cid)
                        self._anc = None
                    return
                anc = self._root.parent
                while not anc.is_dir():
                    anc = anc.parent
                if self._anc is None or self._anc.path != anc:
                    got = self._add_watch(anc, ANCESTOR_MASK, strict=True)
                    if got is None:
                        continue  # it vanished too: look again
                    if self._anc is not None:
                        self._unwatch(self._anc.wd, self._anc.cid)
                    self._anc = _Ancestor(anc, *got)
                    self._log.warning("detect: %s does not exist; watching %s until it does", self._root, anc)
                # The watch is in place; the next component may have appeared just before it.
                if not (anc / self._root.relative_to(anc).parts[0]).is_dir():
                    return
        except OSError as e:
            msg = f"cannot watch cgroup root {self._root}: {e.strerror or e}"
            if fatal:
                raise DetectError(msg) from e
            self._log.error("detect: %s", msg)

    def _add_watch(self, path: Path, mask: Mask, *, strict: bool) -> tuple[int, int] | None:
        """(wd, callback id), or None when the dir is gone. Other errors raise if strict, else log."""
        assert self._ino is not None
        cid = next(self._cids)
        try:
            wd = self._ino.add_callback(os.fsencode(path), mask, self._callback, CallbackId(cid))
            if wd < 0:  # watchdog swallows EACCES and hands back -1
                self._ino.remove_callbacks([(wd, CallbackId(cid))])
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        except OSError as e:
            if e.errno in _QUIET_ERRNOS:
                self._log.debug("detect: %s gone before its watch was added", path)
                return None
            if strict:
                raise
            self._log.error("detect: cannot watch %s: %s; jobs under it will be missed", path, e.strerror)
            return None
        return wd, cid

    def _unwatch(self, wd: int, cid: int) -> None:
        if self._ino is None:
            return
        try:
            self._ino.remove_callbacks([(WatchDescriptor(wd), CallbackId(cid))])
        except OSError as e:
            self._log.debug("detect: removing watch %d: %s", wd, e)

    def _watch(self, path: Path, kind: Kind, parent: _Dir | None, *, strict: bool = False) -> bool:
        """Watch `path` first, then list it, so nothing created in between is missed.

        Watches are added by path, and a path can lead to a newer dir than the one we watch (uid_N and
        slurm_<host> go and come back, faster than we read events on a busy node). So the listing must
        be of the dir now watched, and the parent must still be the one we watch: otherwise the new
        dir would be filed under a dead one and dropped with it, and its jobs reported twice.
        Whenever that check fails, an event for the newer dir is already queued and brings it in.
        """
        if path in self._dirs:
            return True
        got = self._add_watch(path, MASK, strict=strict)
        if got is None:
            return False
        wd, cid = got
        if wd in self._by_wd:  # same inode reachable by another path we already watch
            self._unwatch(wd, cid)
            self._log.debug("detect: %s is %s; not watched twice", path, self._by_wd[wd].path)
            return False
        try:
            with os.scandir(path) as it:
                entries = {e.name: _is_dir(e) for e in it}
        except OSError as e:
            self._unwatch(wd, cid)
            if e.errno in _QUIET_ERRNOS:
                return False
            if strict:
                raise
            self._log.error("detect: cannot list %s: %s", path, e.strerror)
            return False
        same = self._watches(path, wd) and (parent is None or self._watches(parent.path, parent.wd))
        if not same:
            self._unwatch(wd, cid)
            self._log.debug("detect: %s changed while being watched; its new dir's event is queued", path)
            return False
        d = _Dir(path, kind, wd, cid, parent)
        self._dirs[path] = d
        self._by_wd[wd] = d
        if parent is None:
            self._root_dir = d
        else:
            parent.children[path.name] = d
        for name, is_dir in entries.items():
            if is_dir:
                self._appeared(d, name, is_dir=True)
        return self._dirs.get(path) is d

    def _scan(self, d: _Dir) -> dict[str, bool] | None:
        """name -> is a dir; None (and `d` dropped if it vanished) when it cannot be listed."""
        try:
            with os.scandir(d.path) as it:
                return {e.name: _is_dir(e) for e in it}
        except OSError as e:
            if e.errno in _QUIET_ERRNOS:
                self._drop(d)
            else:
                self._log.error("detect: cannot list %s: %s", d.path, e.strerror)
            return None

    def _appeared(self, parent: _Dir, name: str, *, is_dir: bool) -> None:
        kind = classify(name, parent.kind)
        if kind in WATCHED:
            self._watch(parent.path / name, kind, parent)
        elif kind is Kind.JOB and is_dir and name not in self._own:
            self._job_seen(parent, name)

    def _vanished(self, parent: _Dir, name: str) -> None:
        child = parent.children.get(name)
        if child is not None:
            # A late event about an earlier dir of that name (uid_N goes and comes back) must not drop
            # our watch on the one there now, which we may have added while handling its creation.
            if not self._still_watched(child):
                # kernfs sends no IN_DELETE_SELF/IN_IGNORED: the parent's IN_DELETE is our only cue.
                self._drop(child)
        elif name in parent.jobs:
            parent.jobs.discard(name)
            self._job_path_gone(name, parent.path / name)

    def _drop(self, d: _Dir) -> None:
        """Forget `d` and everything beneath it; report jobs seen only there as gone."""
        for child in list(d.children.values()):
            self._drop(child)
        for job in sorted(d.jobs):
            self._job_path_gone(job, d.path / job)
        d.jobs.clear()
        if self._dirs.get(d.path) is d:
            del self._dirs[d.path]
        if self._by_wd.get(d.wd) is d:
            del self._by_wd[d.wd]
        if d.parent is not None:
            if d.parent.children.get(d.path.name) is d:
                del d.parent.children[d.path.name]
        elif self._root_dir is d:
            self._root_dir = None
        self._unwatch(d.wd, d.cid)

    def _job_seen(self, parent: _Dir, job: str) -> None:
        if job in parent.jobs:
            return
        parent.jobs.add(job)
        path = parent.path / job
        places = self._where.get(job)
        if places:
            places.add(path)
            return
        stale = self._stale.pop(job, None)
        if stale is not None:  # a new dir of it: Slurm runs a job of that id again
            self._log.info("detect: %s has a new dir %s: no longer taken as left behind", job, path)
        self._where[job] = {path} | (stale or set())
        self._sweep_wake.set()
        if self._sink is not None:
            at = time.monotonic()
            self._pending.append(JobSeen(job, str(path), at, _age_ms(path)))

    def _job_path_gone(self, job: str, path: Path) -> None:
        if (stale := self._stale.get(job)) is not None:  # already reported gone
            stale.discard(path)
            if not stale:
                del self._stale[job]
            return
        places = self._where.get(job)
        if not places or path not in places:
            return
        places.discard(path)
        if places:
            return
        del self._where[job]
        if self._sink is not None:
            self._pending.append(JobGone(job, time.monotonic()))

    def _watches(self, path: Path, wd: int) -> bool:
        """Does watch `wd` sit on the dir now at `path`? Adding a watch again gives the same wd for the
        same inode, so this holds even where inode numbers are reused (ext4)."""
        got = self._add_watch(path, MASK, strict=False)
        if got is None:
            return False
        self._unwatch(*got)  # same wd: drops only this extra callback; else the new watch
        return got[0] == wd

    def _still_watched(self, d: _Dir) -> bool:
        return self._watches(d.path, d.wd)

    # --- jobs Slurm left behind (sweep thread) --------------------------------------------------

    def _start_sweep(self) -> None:
        if self._stale_grace <= 0:
            return
        why = hides_processes(self._proc)
        if why is not None:
            self._log.warning("detect: %s; job dirs Slurm leaves behind are not spotted", why)
            return
        self._sweep = threading.Thread(target=self._sweep_run, name="detect-stale", daemon=True)
        self._sweep.start()

    def _sweep_run(self) -> None:
        try:
            self._sweep_loop()
        except BaseException as e:  # a bug here must not end the sweep without a word
            self._fail("the stale-job sweep failed", e)

    def _sweep_loop(self) -> None:
        tracker = StaleTracker(self._stale_grace)
        interval = max(self._stale_grace / 2, 0.05)  # stale after grace..1.5 grace with no process
        failing = False
        while True:
            # Idle while no job is known: _job_seen wakes us (cleared first, so no wake is lost).
            self._sweep_wake.clear()
            with self._lock:
                if self._stopped or self._failed:
                    return
                idle = not self._where and not self._stale
            if idle:
                self._sweep_wake.wait()
                continue
            if self._sweep_stop.wait(interval):
                return
            try:
                busy = jobs_with_processes(self._proc, self._own)
            except OSError as e:  # keep what we know: a failed scan is not "every job is empty"
                if not failing:
                    self._log.warning("detect: scanning %s for stale jobs failed: %s", self._proc, e)
                failing = True
                continue
            failing = False
            with self._lock:
                if self._stopped or self._failed:
                    return
                self._sweep_update(tracker, busy, time.monotonic())
                out = self._take_pending()
            self._send(out)

    def _sweep_update(self, tracker: StaleTracker, busy: dict[str, str], now: float) -> None:
        for job in sorted(self._stale.keys() & busy.keys()):  # a process in it again: a live job
            self._where[job] = self._stale.pop(job)
            self._log.info("detect: %s has a process again (%s): a live job", job, busy[job])
            if self._sink is not None:
                self._pending.append(JobSeen(job, busy[job], now, None))
        for job in tracker.update(now, self._where, busy):
            paths = self._where.pop(job)
            self._stale[job] = paths
            self._log.warning(
                "detect: %s: no process in it for %g s, but Slurm left its dirs (%s); taking it as ended",
                job,
                self._stale_grace,
                ", ".join(str(p) for p in sorted(paths)),
            )
            if self._sink is not None:
                self._pending.append(JobGone(job, now))

    def _rescan(self) -> None:
        """After lost events: re-list every watched dir and reconcile, parents before children."""
        if self._root_dir is None:
            self._attach_root(fatal=False)
            return
        for d in sorted(self._dirs.values(), key=lambda d: len(d.path.parts)):
            if self._dirs.get(d.path) is not d:
                continue  # dropped with its parent
            entries = self._scan(d)
            if entries is None:
                continue
            for name, child in list(d.children.items()):
                if not entries.get(name) or not self._still_watched(child):
                    self._drop(child)  # gone, or removed and re-created (our watch is on the dead one)
            for job in sorted(d.jobs):
                if not entries.get(job):
                    d.jobs.discard(job)
                    self._job_path_gone(job, d.path / job)
            for name, is_dir in entries.items():
                if is_dir and name not in d.children and name not in d.jobs:
                    self._appeared(d, name, is_dir=True)
        if self._root_dir is None:
            self._attach_root(fatal=False)


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _age_ms(path: Path) -> float | None:
    # An estimate of how late we are. kernfs stamps ctime from the coarse clock, so this reads a few ms
    # high (3-7 ms measured at HZ=250). kernfs also sets ctime when the inode is first looked up, not at
    # mkdir: slurmstepd does that itself when it creates step_extern; a job dir nobody touched yet
    # would look younger than it is.
    now = time.time()
    try:
        ctime = os.stat(path).st_ctime
    except OSError:
        return None
    return max(0.0, (now - ctime) * 1000.0)
