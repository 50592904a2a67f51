"""Process trees we started: find every member (even ones that called setsid()), signal, wait, reap.

Ownership is by ancestry and by a per-spawn tag, never by name or user:
- the daemon is a child subreaper, so descendants orphaned by a dying parent re-parent to us
  instead of init and stay findable as our descendants;
- every child gets `WATCHDOG_LLM_TREE=<tag>` in its environment, inherited by its descendants, which
  attributes such orphans to the right tree;
- members are remembered as psutil.Process objects (pid + create time), so a recycled pid is never
  signalled.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import errno
import json
import logging
import os
import signal
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import psutil

TAG_ENV = "WATCHDOG_LLM_TREE"
PR_SET_CHILD_SUBREAPER = 36


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


class Tree:
    """Every process of one spawn: the leader and each descendant seen since it started."""

    def __init__(self, leader_pid: int, tag: str) -> None:
        self.tag = tag
        self.pgid = leader_pid  # start_new_session=True: the leader leads its own session and group
        self.leader_pid = leader_pid
        self._members: dict[tuple[int, float], psutil.Process] = {}
        with contextlib.suppress(psutil.NoSuchProcess):
            self._add(psutil.Process(leader_pid))

    def _add(self, p: psutil.Process) -> None:
        with contextlib.suppress(psutil.NoSuchProcess):
            self._members.setdefault((p.pid, p.create_time()), p)

    def scan(self) -> int:
        """Record descendants that appeared since the last scan. Returns how many are known alive."""
        children = _children_reader()
        me = os.getpid()
        known = {pid for pid, _ in self._members}
        roots = [p.pid for p in self.alive()]
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
        return len(self.alive())

    def alive(self) -> list[psutil.Process]:
        return [p for p in self._members.values() if not is_gone(p)]

    def records(self) -> list[dict[str, float]]:
        return [{"pid": p.pid, "create_time": ct} for (_, ct), p in self._members.items() if not is_gone(p)]

    def group_alive(self) -> bool:
        """True while a member still belongs to our process group, so killpg() cannot hit a stranger.

        The kernel keeps a pgid number reserved while any process is in that group.
        """
        for p in self.alive():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if os.getpgid(p.pid) == self.pgid:
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
        n = 0
        for p in self.alive():
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                p.send_signal(sig)  # psutil re-checks create time: a recycled pid is never hit
                n += 1
        return n

    def reap(self, skip: Iterable[int] = ()) -> None:
        """Collect exit statuses of members that became our children (orphans), never `skip` pids
        (asyncio's child watcher owns those)."""
        me = os.getpid()
        skipped = set(skip)
        for p in list(self._members.values()):
            if p.pid in skipped:
                continue
            try:
                if p.ppid() != me:
                    continue
            except psutil.NoSuchProcess:
                continue
            with contextlib.suppress(ChildProcessError):
                os.waitpid(p.pid, os.WNOHANG)


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


async def wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Wait until every process has exited, up to `timeout`. Returns those still alive.

    Event-driven: a pidfd becomes readable when its process exits, for any process, not only our
    children. Falls back to psutil's polling where pidfd_open is unavailable.
    """
    alive = [p for p in procs if not is_gone(p)]
    if not alive or timeout <= 0:
        return alive
    loop = asyncio.get_running_loop()
    fds: list[int] = []
    waits: list[asyncio.Future[None]] = []
    try:
        for p in alive:
            try:
                fd = os.pidfd_open(p.pid)
            except ProcessLookupError:
                continue
            except OSError as e:
                if e.errno in (errno.ENOSYS, errno.EPERM, errno.EINVAL):
                    return await asyncio.to_thread(_poll_wait, alive, timeout)
                raise
            fds.append(fd)
            if is_gone(p):  # exited (or pid recycled) between the check and pidfd_open
                continue
            fut: asyncio.Future[None] = loop.create_future()
            loop.add_reader(fd, _resolve, fut)
            waits.append(fut)
        if waits:
            await asyncio.wait(waits, timeout=timeout)
    finally:
        for fd in fds:
            loop.remove_reader(fd)
            os.close(fd)
    return [p for p in alive if not is_gone(p)]


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _poll_wait(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return [p for p in alive if not is_gone(p)]


# ---- records of what we started, for leftovers after a crash of the daemon itself ------------


@dataclass(frozen=True, slots=True)
class Leftover:
    child: str
    pid: int
    name: str


class Records:
    """`STATE_DIR/children.json`: pid + create time of every process we started, per child name."""

    def __init__(self, path: Path, log: logging.Logger) -> None:
        self.path = path
        self.log = log
        self._data: dict[str, list[dict[str, float]]] = {}
        self._warned = False

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
            tmp.write_text(json.dumps({"daemon_pid": os.getpid(), "children": self._data}))
            os.replace(tmp, self.path)
        except OSError as e:
            if not self._warned:  # once: the daemon keeps working, leftovers just can't be recorded
                self.log.warning("cannot record child pids in %s: %s", self.path, e.strerror)
                self._warned = True

    def kill_leftovers(self) -> list[Leftover]:
        """SIGKILL processes recorded by a previous run that are still the same processes, with
        everything they started since (a tree that grew after its last record: a killed daemon
        records nothing more)."""
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
        killed = _kill_trees(roots)
        self._data = {}
        self._write()
        return killed


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
