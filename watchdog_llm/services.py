"""Always-on services (mode C): entries with `always_on: true`, such as a speech server on a second
host, that run beside the model. Each has one supervised child (the remote runner, like a remote
model), its own state, and the model's restart rule: a crash restarts it after a capped, jittered
backoff, and `RESTART_LIMIT` fast failures in a row leave it failed until someone starts it again.

Requests reach a running one through the gateway at /services/NAME/... with a key of its own (fresh
at every start, given to it on stdin as VLLM_API_KEY).
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from watchdog_llm.base.backoff import backoff_delay
from watchdog_llm.coordination.catalog import ModelEntry
from watchdog_llm.supervise.child import (
    Child,
    ChildEvent,
    ChildExited,
    ChildHung,
    ChildReady,
    ChildSpec,
    ChildStopped,
)
from watchdog_llm.supervise.tree import Records


class ServiceState(StrEnum):
    STOPPED = "stopped"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    BACKOFF = "backoff"
    FAILED = "failed"


UP = frozenset({ServiceState.STARTING, ServiceState.RUNNING})
DOWN = frozenset({ServiceState.STOPPED, ServiceState.BACKOFF, ServiceState.FAILED})


class ServiceError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass(frozen=True, slots=True)
class Restarts:
    backoff_max: float
    limit: int  # fast failures in a row before it is left failed
    min_uptime: float  # a run shorter than this was a fast failure


@dataclass
class Service:
    entry: ModelEntry
    child: Child
    state: ServiceState = ServiceState.STOPPED
    since: float = field(default_factory=time.time)
    detail: str = "not started"
    run: int = 0
    failures: int = 0  # fast failures in a row
    restarts: int = 0
    started_at: float | None = None  # monotonic, of the current run
    key: str = ""  # the current run's key: the gateway sends it
    restart_after_stop: bool = False
    timer: asyncio.TimerHandle | None = None

    def public(self) -> dict[str, object]:
        r = self.entry.remote
        return {
            "name": self.entry.name,
            "host": self.entry.host,
            "base_url": r.base_url if r is not None else None,
            "kind": list(self.entry.kind),
            "state": self.state.value,
            "since": self.since,
            "detail": self.detail,
            "restarts": self.restarts,
            "path": f"/services/{self.entry.name}/",
        }


class Services:
    def __init__(
        self,
        spec: Callable[[ModelEntry, Callable[[], str]], ChildSpec],
        records: Records,
        log_dir: Path,
        restarts: Restarts,
        log: logging.Logger,
        *,
        grace: float,
        notify: Callable[[str, str, bool], None] = lambda title, body, urgent: None,
        on_change: Callable[[], None] = lambda: None,
        rng: random.Random | None = None,
    ) -> None:
        self._spec = spec
        self.records = records
        self.log_dir = log_dir
        self.limits = restarts
        self.log = log
        self.grace = grace
        self.notify = notify
        self.on_change = on_change
        self.rng = rng or random.Random()
        self.by_name: dict[str, Service] = {}

    # ---- the catalog's services ----------------------------------------------------------------

    def sync(self, entries: Iterable[ModelEntry]) -> None:
        """Services for the catalog's always-on entries: new ones start, removed ones stop."""
        wanted = {e.name: e for e in entries if e.always_on}
        for name in list(self.by_name):
            if name not in wanted:
                svc = self.by_name.pop(name)
                self._cancel_timer(svc)
                asyncio.get_running_loop().create_task(svc.child.close())
                self.log.info("service %s: removed from the catalog, stopped", name)
        for name, e in wanted.items():
            known = self.by_name.get(name)
            if known is not None:
                known.entry = e  # a changed definition applies at its next start
                continue
            svc = Service(e, self._child(e))
            self.by_name[name] = svc
            svc.child.launch()
            self._start(svc, "starting with the daemon")

    def _child(self, e: ModelEntry) -> Child:
        # The spec is given again at every start (the entry may have changed); this one names the log.
        return Child(
            self._spec(e, lambda: ""),
            grace=self.grace,
            log_dir=self.log_dir,
            records=self.records,
            post=self._on_child,
            log=self.log,
        )

    # ---- requests (admin API, CLI) ---------------------------------------------------------------

    def get(self, name: str) -> Service:
        svc = self.by_name.get(name)
        if svc is None:
            names = ", ".join(sorted(self.by_name)) or "none"
            raise ServiceError(404, "unknown_service", f"no always-on service {name[:64]!r} (services: {names})")
        return svc

    def start(self, name: str) -> Service:
        svc = self.get(name)
        if svc.state in UP:
            raise ServiceError(409, "service_running", f"service {name} is {svc.state.value} already")
        if svc.state is ServiceState.STOPPING:
            svc.restart_after_stop = True
            return svc
        svc.failures = 0  # someone asked: a failed one gets a fresh row of attempts
        self._start(svc, "started on request")
        return svc

    def stop(self, name: str) -> Service:
        svc = self.get(name)
        self._cancel_timer(svc)
        svc.restart_after_stop = False
        if svc.state in DOWN:
            self._to(svc, DOWN, ServiceState.STOPPED, "stopped on request")
            return svc
        if svc.state is not ServiceState.STOPPING:
            self._to(svc, UP, ServiceState.STOPPING, "stopping on request")
            svc.child.stop()
        return svc

    def restart(self, name: str) -> Service:
        svc = self.get(name)
        if svc.state in DOWN:
            return self.start(name) if svc.state is not ServiceState.BACKOFF else self._restart_now(svc)
        svc.restart_after_stop = True
        if svc.state is not ServiceState.STOPPING:
            self._to(svc, UP, ServiceState.STOPPING, "restarting on request")
            svc.child.stop()
        return svc

    def target(self, name: str) -> tuple[str, str] | str | None:
        """For the gateway: (base URL, key) of a running service; why not, while it is not running;
        None for a name that is no service."""
        svc = self.by_name.get(name)
        if svc is None:
            return None
        if svc.state is not ServiceState.RUNNING or svc.entry.remote is None:
            return f"service {name} is {svc.state.value}: {svc.detail}"
        return svc.entry.remote.base_url, svc.key

    def public(self) -> list[dict[str, object]]:
        return [self.by_name[n].public() for n in sorted(self.by_name)]

    async def close(self) -> None:
        for svc in self.by_name.values():
            self._cancel_timer(svc)
        await asyncio.gather(*(svc.child.close() for svc in self.by_name.values()), return_exceptions=True)

    # ---- the owner's side ----------------------------------------------------------------------

    def _restart_now(self, svc: Service) -> Service:
        self._cancel_timer(svc)
        self._start(svc, "restarted on request")
        return svc

    def _start(self, svc: Service, why: str) -> None:
        svc.run += 1
        svc.key = secrets.token_urlsafe(32)
        svc.started_at = time.monotonic()
        self._to(svc, DOWN, ServiceState.STARTING, why)
        svc.child.start(svc.run, {"VLLM_API_KEY": svc.key}, self._spec(svc.entry, lambda: svc.key))

    def _on_child(self, ev: ChildEvent) -> None:
        svc = self.by_name.get(ev.name.removeprefix("service-"))
        if svc is None:
            return
        match ev:
            case ChildReady(run=run) if run == svc.run and svc.state is ServiceState.STARTING:
                self._to(svc, frozenset({ServiceState.STARTING}), ServiceState.RUNNING, "running")
            case ChildExited(run=run, why=why, code=code, tail=tail) if run == svc.run:
                last = [t for t in tail if t.strip()]
                self._crashed(svc, why or f"exited with status {code}", last[-1] if last else "")
            case ChildHung(run=run, why=why) if run == svc.run and svc.state is ServiceState.RUNNING:
                svc.detail = f"hung ({why}): restarting"
                svc.restart_after_stop = True
                self._to(svc, UP, ServiceState.STOPPING, svc.detail)
                svc.child.stop()
            case ChildStopped():
                if svc.state is not ServiceState.STOPPING:
                    return
                if svc.restart_after_stop:
                    svc.restart_after_stop = False
                    self._to(svc, frozenset({ServiceState.STOPPING}), ServiceState.STOPPED, "stopped")
                    self._start(svc, "restarted")
                else:
                    self._to(svc, frozenset({ServiceState.STOPPING}), ServiceState.STOPPED, "stopped on request")

    def _crashed(self, svc: Service, why: str, last: str) -> None:
        if svc.state not in UP:
            return
        uptime = time.monotonic() - (svc.started_at or 0)
        fast = uptime < self.limits.min_uptime or svc.state is ServiceState.STARTING
        svc.failures = svc.failures + 1 if fast else 1
        what = f"service {svc.entry.name} {why}" + (f" ({last})" if last else "")
        if svc.failures >= self.limits.limit:
            body = f"{what}; {svc.failures} fast failures in a row: left stopped until started again"
            self._to(svc, UP, ServiceState.FAILED, body)
            self.notify(f"service {svc.entry.name} failed", body, True)
            return
        delay = backoff_delay(svc.failures - 1, cap=self.limits.backoff_max, jitter=self.rng.random())
        body = f"{what}; restarting in {delay:.1f} s (attempt {svc.failures} of {self.limits.limit})"
        self._to(svc, UP, ServiceState.BACKOFF, body)
        self.notify(f"service {svc.entry.name} crashed", body, False)
        svc.timer = asyncio.get_running_loop().call_later(delay, self._retry, svc)

    def _retry(self, svc: Service) -> None:
        svc.timer = None
        if svc.state is ServiceState.BACKOFF and self.by_name.get(svc.entry.name) is svc:
            svc.restarts += 1
            self._start(svc, "restarting after a crash")

    def _cancel_timer(self, svc: Service) -> None:
        if svc.timer is not None:
            svc.timer.cancel()
            svc.timer = None

    def _to(self, svc: Service, expected: frozenset[ServiceState], new: ServiceState, detail: str) -> None:
        """Every transition names the states it may leave (Supervisor's habit): a wrong one is a bug."""
        if svc.state not in expected:
            raise AssertionError(f"service {svc.entry.name}: {svc.state.value} -> {new.value} is not a transition")
        if new is not svc.state:
            svc.since = time.time()
        svc.state, svc.detail = new, detail
        (self.log.info if new in UP | {ServiceState.STOPPED} else self.log.warning)(
            "service %s: %s (%s)", svc.entry.name, new.value, detail
        )
        self.on_change()
