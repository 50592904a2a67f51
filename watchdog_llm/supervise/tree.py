"""Process trees we started: find every member (even ones that called setsid()), signal, wait, reap.

Ownership is by ancestry and by a per-spawn tag, never by name or user:
- the daemon is a child subreaper, so descendants orphaned by a dying parent re-parent to us
  instead of init and stay findable as our descendants;
- every child gets `WATCHDOG_LLM_TREE=<owner>.<child>-<random>` in its environment, inherited by
  its descendants, which attributes such orphans to the right tree, and lets the next daemon on the
  same STATE_DIR find what a killed one left even when children.json could not be written;
- members are remembered as psutil.Process objects (pid + create time) with a pidfd held open, so a
  recycled pid is never signalled, and a stop needs no new file descriptor.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import json
import logging
import os
import select
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import psutil

from watchdog_llm.base.failures import FailureNote

TAG_ENV = "WATCHDOG_LLM_TREE"
PR_SET_CHILD_SUBREAPER = 36
POLL_WAIT_INTERVAL = 0.01  # where pidfds are missing: how often a stop looks again


def set_child_subreaper() -> bool:
    """Make orphaned descendants re-parent to this process (Linux >= 3.4). False if unsupported."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        return bool(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def is_gone(p: psutil.Process) -> bool:
    """Exited (a zombie holds no memory or GPU context) or its pid now names another process."""
    try:
        return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
    except psutil.AccessDenied:
        return False


def _tag_of(p: psutil.Process) -> str | None:
    try:
        return p.environ().get(TAG_ENV)
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


class Member:
    """One process of a tree: its psutil handle (pid + create time) and, where the kernel has them,
    a pidfd opened when the process was found and held until it is seen gone.

    The pidfd is what makes a stop independent of file descriptors: seeing whether the process is
    still there (poll) and signalling it (pidfd_send_signal) need no new descriptor, so a yield works
    while something has exhausted the daemon's (a flood of connections). It also pins identity:
    while the pidfd is not readable, the pid still names this process."""

    __slots__ = ("_dead", "pidfd", "proc")

    def __init__(self, proc: psutil.Process) -> None:
        self.proc = proc
        self._dead = False
        self.pidfd: int | None = None
        try:
            self.pidfd = os.pidfd_open(proc.pid)
        except OSError:  # gone already, no pidfd support, or no descriptor left: psutil's way then
            return
        if not proc.is_running():  # the pid was recycled between psutil's look and pidfd_open
            self.close()
            self._dead = True

    @property
    def pid(self) -> int:
        return self.proc.pid

    def gone(self) -> bool:
        """Exited (a zombie holds no memory or GPU context) or its pid now names another process."""
        if self._dead:
            return True
        if self.pidfd is None:
            try:
                gone = is_gone(self.proc)
            except OSError:  # /proc unreadable (no descriptor left): count it as alive, keep trying
                return False
        else:
            poller = select.poll()  # a poll set is not a descriptor (epoll's would be)
            poller.register(self.pidfd, select.POLLIN)
            gone = bool(poller.poll(0))  # a pidfd is readable once its process has exited
        if gone:
            self._dead = True
            self.close()
        return gone

    def signal(self, sig: signal.Signals) -> bool:
        if self.gone():
            return False
        try:
            if self.pidfd is not None:
                signal.pidfd_send_signal(self.pidfd, sig)
            else:
                self.proc.send_signal(sig)  # psutil re-checks create time: a recycled pid is never hit
            return True
        except (ProcessLookupError, PermissionError, psutil.NoSuchProcess, psutil.AccessDenied):
            return False

    def close(self) -> None:
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


class Tree:
    """Every process of one spawn: the leader and each descendant seen since it started."""

    def __init__(self, leader_pid: int, tag: str) -> None:
        self.tag = tag
        self.pgid = leader_pid  # start_new_session=True: the leader leads its own session and group
        self.leader_pid = leader_pid
        self._members: dict[tuple[int, float], Member] = {}
        with contextlib.suppress(psutil.NoSuchProcess):
            self._add(psutil.Process(leader_pid))

    def _add(self, p: psutil.Process) -> None:
        with contextlib.suppress(psutil.NoSuchProcess):
            key = (p.pid, p.create_time())
            if key not in self._members:
                self._members[key] = Member(p)

    def scan(self) -> int:
        """Record descendants that appeared since the last scan. Returns how many are known alive.
        Reading /proc takes descriptors: with none left, the scan finds nothing new this time (the
        members already known are still stopped: they hold pidfds)."""
        try:
            self._scan()
        except OSError as e:
            if e.errno not in (errno.EMFILE, errno.ENFILE):
                raise
        return len(self.alive())

    def _scan(self) -> None:
        children = _children_reader()
        me = os.getpid()
        known = {pid for pid, _ in self._members}
        roots = [m.pid for m in self.alive()]
        # Orphans of this tree re-parented to us (subreaper): recognised by the inherited tag.
        for pid in children(me):
            if pid not in known:
                with contextlib.suppress(psutil.NoSuchProcess):
                    if _tag_of(psutil.Process(pid)) == self.tag:
                        roots.append(pid)
        seen: set[int] = set()
        while roots:
            pid = roots.pop()
            if pid in seen or pid == me:
                continue
            seen.add(pid)
            if pid not in known:
                with contextlib.suppress(psutil.NoSuchProcess):
                    self._add(psutil.Process(pid))
            roots.extend(children(pid))

    def alive(self) -> list[Member]:
        return [m for m in self._members.values() if not m.gone()]

    def records(self) -> list[dict[str, float]]:
        return [{"pid": m.pid, "create_time": ct} for (_, ct), m in self._members.items() if not m.gone()]

    def group_alive(self) -> bool:
        """True while a member still belongs to our process group, so killpg() cannot hit a stranger.

        The kernel keeps a pgid number reserved while any process is in that group.
        """
        for m in self.alive():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if os.getpgid(m.pid) == self.pgid:
                    return True
        return False

    def signal_group(self, sig: signal.Signals) -> bool:
        if not self.group_alive():
            return False
        try:
            os.killpg(self.pgid, sig)
            return True
        except (ProcessLookupError, PermissionError):
            return False

    def signal_each(self, sig: signal.Signals) -> int:
        """Signal every live member individually (those that left the group included)."""
        return sum(m.signal(sig) for m in self.alive())

    def reap(self, skip: Iterable[int] = ()) -> None:
        """Collect exit statuses of members that became our children (orphans), never `skip` pids
        (asyncio's child watcher owns those)."""
        me = os.getpid()
        skipped = set(skip)
        for m in list(self._members.values()):
            if m.pid in skipped:
                continue
            try:
                if m.proc.ppid() != me:
                    continue
            except (psutil.NoSuchProcess, OSError):
                continue
            with contextlib.suppress(ChildProcessError):
                os.waitpid(m.pid, os.WNOHANG)

    def close(self) -> None:
        """The run is over: its pidfds go (those of members still alive too)."""
        for m in self._members.values():
            m.close()


def _proc_children(pid: int) -> list[int]:
    """Children of `pid` from /proc/<pid>/task/*/children: reads only our own tree, where a
    parent map would read every process on the node (a busy node has thousands)."""
    out: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(x) for x in f.read().split())
        except (OSError, ValueError):
            continue
    return out


def _children_reader() -> Callable[[int], list[int]]:
    me = os.getpid()
    if os.path.exists(f"/proc/{me}/task/{me}/children"):
        return _proc_children
    # Kernels without CONFIG_PROC_CHILDREN: one pass over /proc builds the parent map.
    kids: dict[int, list[int]] = {}
    for p in psutil.process_iter(["ppid"]):
        kids.setdefault(p.info["ppid"], []).append(p.pid)
    return lambda pid: kids.get(pid, [])


def descendants(pid: int) -> set[int]:
    """Every process below `pid`, read through /proc/<pid>/task/*/children (our own tree only).
    Safe from any thread: it keeps no state."""
    children = _children_reader()
    out: set[int] = set()
    todo = children(pid)
    while todo:
        p = todo.pop()
        if p not in out:
            out.add(p)
            todo.extend(children(p))
    return out


async def wait_gone(members: list[Member], timeout: float) -> list[Member]:
    """Wait until every member has exited, up to `timeout`. Returns those still alive.

    Event-driven on the members' own pidfds (no new descriptor); members without one (no pidfd
    support, or none could be opened) are polled.
    """
    alive = [m for m in members if not m.gone()]
    if not alive or timeout <= 0:
        return alive
    if any(m.pidfd is None for m in alive):
        return await _poll_wait(alive, timeout)
    loop = asyncio.get_running_loop()
    fds: list[int] = []
    waits: list[asyncio.Future[None]] = []
    try:
        for m in alive:
            assert m.pidfd is not None
            fut: asyncio.Future[None] = loop.create_future()
            loop.add_reader(m.pidfd, _resolve, fut)
            fds.append(m.pidfd)
            waits.append(fut)
        await asyncio.wait(waits, timeout=timeout)
    finally:
        for fd in fds:
            loop.remove_reader(fd)
    return [m for m in alive if not m.gone()]


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def _poll_wait(members: list[Member], timeout: float) -> list[Member]:
    deadline = time.monotonic() + timeout
    while (alive := [m for m in members if not m.gone()]) and time.monotonic() < deadline:
        await asyncio.sleep(POLL_WAIT_INTERVAL)
    return alive


# ---- records of what we started, for leftovers after a crash of the daemon itself ------------


@dataclass(frozen=True, slots=True)
class Leftover:
    child: str
    pid: int
    name: str


class Records:
    """`STATE_DIR/children.json`: pid + create time of every process we started, per child name."""

    def __init__(self, path: Path, log: logging.Logger, owner: str = "") -> None:
        self.path = path
        self.log = log
        self.owner = owner  # the tag prefix of every tree this daemon starts (owner_id)
        self._data: dict[str, list[dict[str, float]]] = {}
        self._failures = FailureNote(log, f"cannot record child pids in {path}")

    def update(self, child: str, records: list[dict[str, float]]) -> bool:
        """Record `child`'s live processes; True if they changed."""
        if self._data.get(child) == records:
            return False
        self._data[child] = records
        self._write()
        return True

    def _write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps({"daemon_pid": os.getpid(), "children": self._data}))
            os.replace(tmp, self.path)
        except OSError as e:  # a full disk: the daemon keeps working; leftovers are found by tag
            with contextlib.suppress(OSError):
                tmp.unlink()
            self._failures.failed(e)
        else:
            self._failures.ok()

    def kill_leftovers(self) -> list[Leftover]:
        """SIGKILL what a previous run of this daemon left: processes recorded in the file that are
        still the same processes, and every process carrying one of our tags (what the file could
        not record: a full disk, a tree grown after its last record), each with all it started."""
        roots = {p.pid: (child, p) for child, p in self._recorded()}
        for child, p in tagged(self.owner) if self.owner else []:
            roots.setdefault(p.pid, (child, p))
        killed = _kill_trees(list(roots.values()))
        self._data = {}
        self._write()
        return killed

    def _recorded(self) -> list[tuple[str, psutil.Process]]:
        try:
            data = json.loads(self.path.read_text())
            children = data["children"]
        except FileNotFoundError:
            return []
        except (OSError, ValueError, KeyError, TypeError) as e:
            self.log.warning("ignoring unreadable %s: %s", self.path, e)
            return []
        roots: list[tuple[str, psutil.Process]] = []
        for child, recs in children.items():
            for rec in recs:
                try:
                    p = psutil.Process(int(rec["pid"]))
                    if abs(p.create_time() - float(rec["create_time"])) > 0.01:
                        continue  # the pid now names another process
                    roots.append((child, p))
                except (psutil.NoSuchProcess, psutil.AccessDenied, KeyError, TypeError, ValueError):
                    continue
        return roots


def owner_id(state_dir: Path) -> str:
    """The tag prefix of the trees one daemon starts: the same for every run on this STATE_DIR (at
    most one daemon runs on it), so a restart knows its predecessor's processes with no file."""
    return "wd" + hashlib.sha256(os.fsencode(state_dir.resolve())).hexdigest()[:16]


def tagged(owner: str) -> list[tuple[str, psutil.Process]]:
    """Processes whose inherited tag says this owner started them: (child name, process). Their
    environment is readable only by their user (or root), so this finds our own processes only."""
    me = os.getpid()
    found = []
    for p in psutil.process_iter():
        tag = _tag_of(p) if p.pid != me else None
        if tag and tag.startswith(owner + "."):
            found.append((tag[len(owner) + 1 :].rsplit("-", 1)[0], p))
    return found


def _kill_trees(roots: list[tuple[str, psutil.Process]]) -> list[Leftover]:
    """SIGKILL `roots`, their descendants, and the members of every session one of them leads
    (where a child that was forked while its parent died ends up). Rounds until no new process
    turns up: a process forking while we kill has its child found by the next round. Sessions only
    of a verified root: never the caller's own session, never anyone else's."""
    sids = set()
    for _, p in roots:
        with contextlib.suppress(OSError):
            if os.getsid(p.pid) == p.pid:
                sids.add(p.pid)
    owner = {p.pid: child for child, p in roots}
    live = [p for _, p in roots]
    done: dict[int, psutil.Process] = {}
    killed: list[Leftover] = []
    for _ in range(10):
        found: dict[int, psutil.Process] = {}
        for p in live:
            found[p.pid] = p
            with contextlib.suppress(psutil.Error):
                for c in p.children(recursive=True):
                    found.setdefault(c.pid, c)
                    owner.setdefault(c.pid, owner.get(p.pid, "?"))
        if sids:
            for q in psutil.process_iter():
                with contextlib.suppress(OSError, psutil.Error):
                    if q.pid not in found and os.getsid(q.pid) in sids:
                        found[q.pid] = q
                        owner.setdefault(q.pid, owner.get(os.getsid(q.pid), "?"))
        new = [p for pid, p in found.items() if pid not in done]
        if not new:
            break
        for p in new:
            done[p.pid] = p
            try:
                name = p.name()
                p.kill()  # psutil checks it is still the same process (pid and start time)
            except psutil.Error:
                continue
            killed.append(Leftover(owner.get(p.pid, "?"), p.pid, name))
        live = new
    psutil.wait_procs(list(done.values()), timeout=5)
    return killed
