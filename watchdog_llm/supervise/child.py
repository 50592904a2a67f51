"""One supervised child (the model server, or the tunnel): one owner task, fed by requests.

Everything that touches the child's processes happens in the owner task, in request order, so a
start never overlaps a stop and an exit is never handled twice. The owner reports what happened
through `post` (ChildReady, ChildExited, ChildStopped); it never decides what to do next.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import logging.handlers
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx
import psutil

from watchdog_llm.base.failures import FailureNote
from watchdog_llm.supervise.probes import Liveness, probe_client
from watchdog_llm.supervise.states import DOWN, SIGNALLABLE, ChildState, describe_exit, transition
from watchdog_llm.supervise.tree import TAG_ENV, Member, Records, Tree, wait_gone

Probe = Callable[[httpx.AsyncClient], Awaitable[bool]]
LOG_TAIL_LINES = 200
EXIT_TAIL_LINES = 60  # sent with an exit: enough to reach a root cause printed above vLLM's wrapper error
PROBE_INTERVAL = 0.5
STARTING_SCAN_INTERVAL = 0.5
KILL_WAIT = 2.0  # after SIGKILL: only an uninterruptible (D-state) process takes longer


@dataclass(frozen=True, slots=True)
class ChildSpec:
    name: str  # "model" | "tunnel": used in logs, file names and records
    argv: tuple[str, ...]
    env: dict[str, str]  # the child's whole environment (secrets go here, never in argv)
    probe: Probe | None = None  # readiness; None: ready once spawned
    preflight: Callable[[], str | None] | None = None  # returns why it must not start now
    cwd: str | None = None
    liveness: Liveness | None = None  # once ready: checked until it stops; None: never
    uds: str | None = None  # the probes connect to this unix socket (the child's server listens there)
    grace: float | None = None  # SIGTERM to SIGKILL for this child; None: the supervisor's (YIELD_GRACE)


@dataclass(frozen=True, slots=True)
class StopResult:
    requested_at: float  # time.monotonic()
    finished_at: float
    survivors: int  # processes still alive after SIGKILL (uninterruptible sleep)
    killed: int  # processes that needed SIGKILL

    @property
    def elapsed_ms(self) -> float:
        return (self.finished_at - self.requested_at) * 1000


@dataclass(frozen=True, slots=True)
class ChildReady:
    name: str
    run: int


@dataclass(frozen=True, slots=True)
class ChildExited:
    """The child ended without being asked to (or never started). Its tree is already gone."""

    name: str
    run: int
    code: int | None
    why: str
    tail: tuple[str, ...] = ()
    cleanup: StopResult | None = None


@dataclass(frozen=True, slots=True)
class ChildStopped:
    name: str
    run: int
    result: StopResult


@dataclass(frozen=True, slots=True)
class ChildHung:
    """A ready child failed its liveness checks: it runs, but answers nothing. Nothing is done to it."""

    name: str
    run: int
    why: str


@dataclass(frozen=True, slots=True)
class ChildChanged:
    """The set of live processes changed (the tree grew while starting, say): for status only."""

    name: str


ChildEvent = ChildReady | ChildExited | ChildStopped | ChildChanged | ChildHung


@dataclass(slots=True)
class _Run:
    run: int
    proc: subprocess.Popen[bytes]
    exited: asyncio.Future[int]  # resolves with the leader's exit status as soon as it exits
    tree: Tree
    started_at: float
    helpers: list[asyncio.Task[None]] = field(default_factory=list)  # scanner, probes: end with the run


class Child:
    def __init__(
        self,
        spec: ChildSpec,
        *,
        grace: float,
        log_dir: Path,
        records: Records,
        post: Callable[[ChildEvent], None],
        log: logging.Logger,
        scan_interval: float = 30.0,
        on_line: Callable[[str], None] | None = None,
    ) -> None:
        self.owner = records.owner  # our trees' tag prefix (supervise.tree.owner_id)
        self.spec = spec
        self.on_line = on_line  # each line of output, as it arrives (a swap's live log)
        self.grace = grace
        self.records = records
        self.post = post
        self.log = log
        self.scan_interval = scan_interval
        self.state = ChildState.STOPPED
        self.tail: deque[str] = deque(maxlen=LOG_TAIL_LINES)
        self.log_path = log_dir / f"{spec.name}.log"
        self._output = _output_logger(spec.name, self.log_path, log)
        self._requests: asyncio.Queue[tuple[str, int, dict[str, str], ChildSpec | None]] = asyncio.Queue()
        self._current: _Run | None = None
        self._hurry = asyncio.Event()
        self._owner: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Future[None]] = set()

    # ---- requests (any task may call these; they never block) --------------------------------

    def start(self, run: int, env: dict[str, str] | None = None, spec: ChildSpec | None = None) -> None:
        """Start run `run`; `env` adds to (or overrides) the spec's environment for this run only.
        `spec` replaces the spec from this run on (a swap to another model); same name, same log."""
        self._requests.put_nowait(("start", run, env or {}, spec))

    def stop(self) -> None:
        self._requests.put_nowait(("stop", 0, {}, None))

    def hurry(self) -> None:
        """Cut the SIGTERM grace short (a second Ctrl-C): SIGKILL now."""
        self._hurry.set()

    async def close(self) -> None:
        """Stop whatever runs and end the owner task."""
        self._requests.put_nowait(("close", 0, {}, None))
        if self._owner is not None and not self._owner.done():
            with contextlib.suppress(Exception):  # a crashed owner was reported by its callback
                await self._owner
        for h in self._output.handlers:
            h.close()

    def launch(self, on_crash: Callable[[BaseException], None] | None = None) -> asyncio.Task[None]:
        """Start the owner task. If it ever dies of a bug, kill what it owned and tell `on_crash`."""
        self._owner = asyncio.create_task(self._own(), name=f"child-{self.spec.name}")

        def done(task: asyncio.Task[None]) -> None:
            if task.cancelled() or task.exception() is None:
                return
            exc = task.exception()
            assert exc is not None
            self.log.error("%s supervisor failed: %r; killing its processes", self.spec.name, exc)
            if self._current is not None:
                self._current.tree.signal_group(signal.SIGKILL)
                self._current.tree.signal_each(signal.SIGKILL)
            if on_crash is not None:
                on_crash(exc)

        self._owner.add_done_callback(done)
        return self._owner

    # ---- what status shows ---------------------------------------------------------------------

    @property
    def pids(self) -> list[int]:
        return [] if self._current is None else [p.pid for p in self._current.tree.alive()]

    @property
    def run_started_at(self) -> float | None:
        return None if self._current is None else self._current.started_at

    # ---- the owner -----------------------------------------------------------------------------

    async def _own(self) -> None:
        while True:
            what, run, env, spec = await self._requests.get()
            if what == "start":
                if spec is not None:
                    assert spec.name == self.spec.name, (spec.name, self.spec.name)
                    self.spec = spec
                await self._spawn(run, env)
            elif what == "stop":
                await self._stop(post=True)
            elif what == "ready":
                self._ready(run)
            elif what == "exited":
                await self._exited(run)
            elif what == "close":
                await self._stop(post=False)
                return

    def _set(self, expected: frozenset[ChildState], new: ChildState) -> None:
        self.state = transition(self.state, expected, new)

    async def _spawn(self, run: int, env: dict[str, str]) -> None:
        spec = self.spec
        why = spec.preflight() if spec.preflight else None
        if why is not None:
            self.log.error("%s not started: %s", spec.name, why)
            self._current = None
            self._set(DOWN, ChildState.EXITED)
            self.post(ChildExited(spec.name, run, None, why))
            return
        self._set(DOWN, ChildState.STARTING)
        tag = f"{self.owner}.{spec.name}-{uuid.uuid4().hex[:16]}".lstrip(".")
        self._hurry.clear()
        try:
            # Popen, not asyncio's subprocess: asyncio's wait() only returns once every pipe is
            # closed, and vLLM's engine keeps the API server's stdout open after the server dies.
            proc = subprocess.Popen(
                spec.argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env={**spec.env, **env, TAG_ENV: tag},
                cwd=spec.cwd,
                start_new_session=True,  # own session and group: signalled as a group, never by name
            )
        except OSError as e:
            why = f"cannot run {spec.argv[0]}: {e.strerror or e}"
            self.log.error("%s not started: %s", spec.name, why)
            self._current = None
            self._set(frozenset({ChildState.STARTING}), ChildState.EXITED)
            self.post(ChildExited(spec.name, run, None, why))
            return
        if self._current is not None:  # pidfds of a tree that survived SIGKILL (uninterruptible sleep)
            self._current.tree.close()
        cur = _Run(run, proc, _watch_exit(proc), Tree(proc.pid, tag), time.monotonic())
        self._current = cur
        self._output.info("---- %s run %d started: pid %d: %s", spec.name, run, proc.pid, " ".join(spec.argv))
        self.log.info("%s started (run %d, pid %d)", spec.name, run, proc.pid)
        self.records.update(spec.name, cur.tree.records())
        assert proc.stdout is not None
        self._read_output(proc.stdout)
        self._background(self._wait_exit(cur))
        cur.helpers.append(asyncio.create_task(self._scan(cur)))
        if spec.probe is None:
            self._ready(run)
        else:
            cur.helpers.append(asyncio.create_task(self._probe(cur, spec.probe)))

    def _ready(self, run: int) -> None:
        if self._current is None or self._current.run != run or self.state is not ChildState.STARTING:
            return  # readiness of a run that has since been stopped
        self._set(frozenset({ChildState.STARTING}), ChildState.RUNNING)
        self.log.info(
            "%s ready (run %d) after %.1f s", self.spec.name, run, time.monotonic() - self._current.started_at
        )
        self._current.tree.scan()
        self.records.update(self.spec.name, self._current.tree.records())
        if self.spec.liveness is not None:
            self._current.helpers.append(asyncio.create_task(self._watch(self._current, self.spec.liveness)))
        self.post(ChildReady(self.spec.name, run))

    async def _exited(self, run: int) -> None:
        cur = self._current
        if cur is None or cur.run != run or self.state not in (ChildState.STARTING, ChildState.RUNNING):
            return  # we stopped it ourselves; the stop already reported
        code = cur.proc.returncode
        self.log.warning(
            "%s %s (run %d); cleaning up what is left of its tree", self.spec.name, describe_exit(code), run
        )
        self._set(SIGNALLABLE, ChildState.STOPPING)
        result = await self._kill_tree(cur)
        self._set(frozenset({ChildState.STOPPING}), ChildState.EXITED)
        tail = tuple(list(self.tail)[-EXIT_TAIL_LINES:])
        self.post(ChildExited(self.spec.name, run, code, describe_exit(code), tail, result))

    async def _stop(self, *, post: bool) -> None:
        cur = self._current
        now = time.monotonic()
        if cur is None or self.state in DOWN:
            if post:  # nothing to stop: report at once so the caller's state machine moves on
                self.post(ChildStopped(self.spec.name, cur.run if cur else 0, StopResult(now, now, 0, 0)))
            return
        self._set(SIGNALLABLE, ChildState.STOPPING)
        result = await self._kill_tree(cur)
        self._set(frozenset({ChildState.STOPPING}), ChildState.STOPPED)
        if post:
            self.post(ChildStopped(self.spec.name, cur.run, result))

    async def _kill_tree(self, cur: _Run) -> StopResult:
        """SIGTERM the group, wait up to the grace, SIGKILL the group and every member that left it."""
        t0 = time.monotonic()
        tree = cur.tree
        tree.signal_group(signal.SIGTERM)  # first, before anything that takes time
        tree.signal_group(signal.SIGCONT)  # a stopped (SIGSTOPped) member only acts on SIGTERM once continued
        for t in cur.helpers:
            t.cancel()
        tree.scan()  # members that appeared since the last scan, setsid()ed ones included
        grace = self.grace if self.spec.grace is None else self.spec.grace
        alive = await self._wait_or_hurry(tree, grace)
        killed = 0
        for _ in range(3):
            # A member may have forked after the scan above (a worker started while the model was
            # loading): it never got SIGTERM. Rescan; only an empty rescan ends the stop.
            tree.scan()
            alive = tree.alive()
            if not alive:
                break
            killed += len(alive)
            self.log.warning(
                "%s: %d process(es) still alive after %.1f s, sending SIGKILL: %s",
                self.spec.name,
                len(alive),
                time.monotonic() - t0,
                _describe(alive),
            )
            tree.signal_group(signal.SIGKILL)
            tree.scan()
            tree.signal_each(signal.SIGKILL)
            alive = await wait_gone(tree.alive(), KILL_WAIT)
        tree.reap(skip=[cur.proc.pid])
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(cur.exited), KILL_WAIT)
        done = time.monotonic()
        if alive:
            self.log.error("%s: %d process(es) survived SIGKILL: %s", self.spec.name, len(alive), _describe(alive))
        self.records.update(self.spec.name, tree.records())
        return StopResult(t0, done, len(alive), killed)

    async def _wait_or_hurry(self, tree: Tree, grace: float) -> list[Member]:
        gone = asyncio.create_task(wait_gone(tree.alive(), grace))
        hurry = asyncio.create_task(self._hurry.wait())
        await asyncio.wait({gone, hurry}, return_when=asyncio.FIRST_COMPLETED)
        hurry.cancel()
        if gone.done():
            return gone.result()
        gone.cancel()
        return tree.alive()

    # ---- helper tasks of one run ---------------------------------------------------------------

    def _background(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)  # keep a reference: the loop holds tasks only weakly
        task.add_done_callback(self._tasks.discard)

    async def _wait_exit(self, cur: _Run) -> None:
        await cur.exited
        self._requests.put_nowait(("exited", cur.run, {}, None))

    async def _probe(self, cur: _Run, probe: Probe) -> None:
        async with probe_client(uds=self.spec.uds) as client:
            while self.state is ChildState.STARTING and cur.proc.returncode is None:
                if await probe(client) and cur.proc.returncode is None:
                    self._requests.put_nowait(("ready", cur.run, {}, None))
                    return
                await asyncio.sleep(PROBE_INTERVAL)

    async def _watch(self, cur: _Run, lv: Liveness) -> None:
        """While running: `lv.failures` failed checks in a row report the run as hung, once. What to
        do about it is the caller's decision (the policy stops it and counts a crash)."""
        misses: list[str] = []
        first = 0.0
        async with probe_client(lv.timeout, self.spec.uds) as client:
            while self.state is ChildState.RUNNING and cur.proc.returncode is None:
                t = time.monotonic()
                why = await lv.check(client)
                if why is None:
                    if misses:
                        self.log.info("%s answers its liveness check again", self.spec.name)
                    misses = []
                else:
                    first = first if misses else t
                    misses.append(why)
                    self.log.warning(
                        "%s liveness check %d of %d failed: %s", self.spec.name, len(misses), lv.failures, why
                    )
                    if len(misses) >= lv.failures:
                        span = time.monotonic() - first
                        path = httpx.URL(lv.url).path  # not the address: the reason reaches clients
                        what = f"stopped answering {path} ({len(misses)} checks over {span:.1f} s: {why})"
                        self.log.warning("%s %s (run %d)", self.spec.name, what, cur.run)
                        self.post(ChildHung(self.spec.name, cur.run, what))
                        return
                await asyncio.sleep(max(0.0, lv.interval - (time.monotonic() - t)))

    async def _scan(self, cur: _Run) -> None:
        """Record the tree as it grows (fast while starting), so a crash of the daemon itself
        leaves a list of what to clean up; the subreaper covers the time in between."""
        while True:
            fast = self.state is ChildState.STARTING
            await asyncio.sleep(STARTING_SCAN_INTERVAL if fast else self.scan_interval)
            cur.tree.scan()
            if self.records.update(self.spec.name, cur.tree.records()):
                self.post(ChildChanged(self.spec.name))

    def _read_output(self, stream: IO[bytes]) -> None:
        """Child output -> rotating log file + bounded tail, read as it arrives (any line length).

        Reading continues after the leader exits: its descendants may still be writing."""
        loop = asyncio.get_running_loop()
        fd = stream.fileno()
        os.set_blocking(fd, False)
        partial = b""

        def readable() -> None:
            nonlocal partial
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            if not chunk:  # every writer has exited
                loop.remove_reader(fd)
                stream.close()  # the file object owns the fd
                if partial:
                    self._line(partial)
                return
            *lines, partial = (partial + chunk).split(b"\n")
            for raw in lines:
                self._line(raw)

        loop.add_reader(fd, readable)

    def _line(self, raw: bytes) -> None:
        line = raw.decode("utf-8", "replace").rstrip("\r")
        self.tail.append(line)
        self._output.info("%s", line)
        if self.on_line is not None:
            self.on_line(line)


def _watch_exit(proc: subprocess.Popen[bytes]) -> asyncio.Future[int]:
    """A future for the leader's exit status: a pidfd wakes the loop the moment it exits, and
    poll() reaps it. Without pidfd_open (Linux < 5.3), a thread waits instead."""
    loop = asyncio.get_running_loop()
    try:
        pidfd = os.pidfd_open(proc.pid)
    except OSError:
        return asyncio.ensure_future(asyncio.to_thread(proc.wait))
    fut: asyncio.Future[int] = loop.create_future()

    def exited() -> None:
        code = proc.poll()
        if code is None:
            return
        loop.remove_reader(pidfd)
        os.close(pidfd)
        if not fut.done():
            fut.set_result(code)

    loop.add_reader(pidfd, exited)
    return fut


def _describe(members: list[Member]) -> str:
    out = []
    for m in members[:8]:
        try:
            out.append(f"{m.pid} ({m.proc.name()}, {m.proc.status()})")
        except (psutil.Error, OSError):  # gone meanwhile, or /proc unreadable (no descriptor left)
            out.append(str(m.pid))
    return ", ".join(out)


class _OutputFile(logging.handlers.RotatingFileHandler):
    """The child's output log, size-capped (rotation by the stdlib). A write that fails (a full
    disk) is one warning in the daemon's log and a count of lost lines, not logging's traceback on
    stderr for every line the model prints."""

    def __init__(self, path: Path, daemon_log: logging.Logger) -> None:
        super().__init__(path, maxBytes=20 << 20, backupCount=2, delay=True)
        self.lost = FailureNote(daemon_log, f"cannot write the output log {path}; lines are lost")
        self._failed = False

    def emit(self, record: logging.LogRecord) -> None:
        self._failed = False
        super().emit(record)
        if not self._failed:
            self.lost.ok()

    def handleError(self, record: logging.LogRecord) -> None:
        self._failed = True
        self.lost.failed(sys.exc_info()[1] or "write failed")


def _output_logger(name: str, path: Path, daemon_log: logging.Logger) -> logging.Logger:
    """A logger writing the child's raw output to a size-capped file."""
    logger = logging.getLogger(f"watchdog_llm.output.{name}.{os.getpid()}.{id(path)}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    if not logger.handlers:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = _OutputFile(path, daemon_log)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
    return logger
