"""Health of the model hosts and of the servers on them (mode C), each probed on its own task.

- A host is up when its SSH port answers with an SSH banner (no login: cheap, and it needs no key).
- A service (a remote entry's base_url, shared by the entries that use it) is ready when its
  health path answers 200.

Each probe is bounded by a timeout. A target that is up is probed every `interval`; one that is down
backs off (capped exponential with jitter, as model restarts) so a dead host costs nearly nothing.
Only changes are reported (`on_change`), the first result included; the daemon sends them to the
connectivity log, webhooks and, for hosts, the phone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import httpx

from watchdog_llm.base.backoff import backoff_delay
from watchdog_llm.coordination.catalog import ModelEntry
from watchdog_llm.coordination.hosts import Host
from watchdog_llm.remote.ssh import os_reason

DOWN_CAP = 300.0  # the longest wait between probes of a target that is down


@dataclass(frozen=True, slots=True)
class Target:
    key: str  # "host:NAME" or "service:BASE_URL": unique, and what the connectivity log records
    kind: str  # "host" | "service"
    name: str  # the host's name, or the base URL
    host: str  # the host it is on
    url: str = ""  # a service's health URL
    entries: tuple[str, ...] = ()  # the catalog entries a service serves


@dataclass(slots=True)
class Health:
    ok: bool | None = None  # None: not probed yet
    since: float | None = None  # wall clock of the last change
    checked_at: float | None = None
    detail: str = ""
    ms: float | None = None
    failures: int = 0

    def public(self) -> dict[str, object]:
        return {"ok": self.ok, "since": self.since, "checked_at": self.checked_at, "detail": self.detail, "ms": self.ms}


Change = Callable[[Target, Health, bool], None]  # (target, its health now, whether this is its first result)


def targets(hosts: Iterable[Host], entries: Iterable[ModelEntry]) -> list[Target]:
    out = [Target(f"host:{h.name}", "host", h.name, h.name) for h in hosts]
    services: dict[str, Target] = {}
    for e in entries:
        if e.remote is None:
            continue
        url = e.remote.base_url + e.health_path
        t = services.get(url)
        names = (*t.entries, e.name) if t is not None else (e.name,)
        services[url] = Target(f"service:{e.remote.base_url}", "service", e.remote.base_url, e.remote.host, url, names)
    return out + list(services.values())


async def ssh_banner(host: Host, timeout: float) -> str | None:
    """None when the host's SSH server answers with its banner; else why not, in a few words."""
    writer = None
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host.address, host.port), timeout)
        line = await asyncio.wait_for(reader.readline(), timeout)
    except TimeoutError:
        return f"no answer within {timeout:g} s"
    except OSError as e:
        return os_reason(e)
    finally:
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
    return None if line.startswith(b"SSH-") else "not an SSH server"


async def http_ready(client: httpx.AsyncClient, url: str) -> str | None:
    try:
        r = await client.get(url)
    except httpx.TimeoutException:
        return "no answer in time"
    except (httpx.HTTPError, OSError) as e:
        return str(e) or type(e).__name__
    return None if r.status_code == 200 else f"HTTP {r.status_code}"


@dataclass
class Watch:
    hosts: dict[str, Host]
    interval: float
    timeout: float
    on_change: Change
    log: logging.Logger
    rng: random.Random = field(default_factory=random.Random)
    health: dict[str, Health] = field(default_factory=dict)
    _tasks: dict[Target, asyncio.Task[None]] = field(default_factory=dict)
    _client: httpx.AsyncClient | None = None

    def set_targets(self, hosts: dict[str, Host], wanted: list[Target]) -> None:
        """Probe these from now on (after a catalog reload, say): new ones start, gone ones stop."""
        self.hosts = hosts
        if self._client is None:  # trust_env=False: a node's HTTP(S)_PROXY must never see LAN probes
            self._client = httpx.AsyncClient(timeout=self.timeout, trust_env=False)
        for t in list(self._tasks):
            if t not in wanted:
                self._tasks.pop(t).cancel()
                self.health.pop(t.key, None)
        for t in wanted:
            if t not in self._tasks:
                self._tasks[t] = asyncio.create_task(self._watch(t), name=f"watch {t.key}")

    @property
    def targets(self) -> list[Target]:
        return list(self._tasks)

    async def close(self) -> None:
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)
        self._tasks.clear()
        if self._client is not None:
            await self._client.aclose()

    async def _probe(self, t: Target) -> str | None:
        if t.kind == "host":
            return await ssh_banner(self.hosts[t.name], self.timeout)
        assert self._client is not None
        return await http_ready(self._client, t.url)

    async def _watch(self, t: Target) -> None:
        h = self.health.setdefault(t.key, Health())
        while True:
            t0 = time.monotonic()
            try:
                why = await asyncio.wait_for(self._probe(t), self.timeout * 2)
            except TimeoutError:
                why = f"no answer within {self.timeout * 2:g} s"
            except Exception as e:  # a probe's bug must not end the watch
                self.log.exception("watch %s: probe failed", t.key)
                why = f"probe failed: {type(e).__name__}"
            ok = why is None
            first = h.ok is None
            h.ms = (time.monotonic() - t0) * 1000
            h.checked_at = time.time()
            h.detail = why or ""
            h.failures = 0 if ok else h.failures + 1
            if ok is not h.ok:
                h.ok = ok
                h.since = h.checked_at
                self.on_change(t, h, first)
            if ok:
                delay = self.interval
            else:
                delay = backoff_delay(h.failures - 1, cap=DOWN_CAP, jitter=self.rng.random(), base=self.interval)
            await asyncio.sleep(delay)

    def public(self) -> list[dict[str, object]]:
        return [
            {"kind": t.kind, "name": t.name, "host": t.host, "entries": list(t.entries),
             **self.health.get(t.key, Health()).public()}
            for t in self._tasks
        ]  # fmt: skip
