"""Model downloads (POST /api/downloads, `watchdog-llm download`): one supervised job per download.

The job is `watchdog_llm.download_job`: here, a child process in its own group (cancelled by
stopping its tree, like a model); on a host, the same file run by the host's Python over SSH through
the remote runner (cancelled by closing its channel). Its JSON lines become the record's progress:
bytes, total, percent, rate and ETA, streamed as server-sent events. The hub's client resumes by
file: files a cancelled or interrupted download finished stay in the cache and are not fetched
again (huggingface_hub 2.x keeps no partial files).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import os
import re
import secrets
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from watchdog_llm.coordination.hosts import Host
from watchdog_llm.supervise.child import Child, ChildEvent, ChildExited, ChildSpec, ChildStopped
from watchdog_llm.supervise.tree import Records

# The API's schema states these (http/downloads_api.py): what it allows is what is accepted.
REPO_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$"
# A branch, tag or commit; its parts never "." or "..": the hub's client files it under refs/REVISION.
REVISION_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.-]*(/[A-Za-z0-9_][A-Za-z0-9_.-]*)*$"
REPO = re.compile(REPO_PATTERN)
REVISION = re.compile(REVISION_PATTERN)
ENDED = frozenset({"done", "failed", "cancelled"})
KEEP = 50  # finished downloads remembered
RATE_WINDOW_S = 5.0
_HF_ENV = ("HF_TOKEN", "HF_ENDPOINT", "HF_HOME", "HF_HUB_CACHE", "HF_HUB_DISABLE_PROGRESS_BARS")
_SUB_QUEUE = 256


class DownloadError(Exception):
    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.extra = status, code, message, extra


@dataclass
class Download:
    id: str
    repo: str
    revision: str | None
    host: str | None
    state: str = "starting"  # starting, downloading, done, failed, cancelling, cancelled
    bytes: int = 0
    total: int | None = None
    have: int = 0  # bytes already in the cache when it started (a resumed download)
    files: int | None = None
    rate: float | None = None  # bytes per second, over the last few seconds
    eta_s: float | None = None
    path: str | None = None
    error: str | None = None  # a stable code: repo_not_found, gated, disk_full, hub_error, ...
    message: str = ""
    created_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    samples: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=64))

    @property
    def percent(self) -> float | None:
        if not self.total:
            return 100.0 if self.state == "done" else None
        return round(100.0 * self.bytes / self.total, 1)

    def public(self) -> dict[str, Any]:
        done = self.state == "done"
        return {
            "id": self.id,
            "repo": self.repo,
            "revision": self.revision,
            "host": self.host,
            "state": self.state,
            "bytes": self.bytes,
            "total": self.total,
            "have": self.have,
            "files": self.files,
            "percent": self.percent,
            "rate": None if self.rate is None else round(self.rate),
            "eta_s": None if self.eta_s is None else round(self.eta_s, 1),
            "path": self.path,
            "error": self.error,
            "message": self.message,
            "created_at": self.created_at,
            "finished_at": self.finished_at,
            # What POST /api/models would add: the hub id, which vLLM finds in the cache it was put in.
            "entry": {"name": _name_of(self.repo), "model": self.repo, "host": self.host} if done else None,
        }

    def progress(self, n: int, now: float) -> None:
        self.bytes = n
        self.samples.append((now, n))
        while len(self.samples) > 2 and now - self.samples[0][0] > RATE_WINDOW_S:
            self.samples.popleft()
        t0, b0 = self.samples[0]
        if now - t0 >= 0.4:
            self.rate = max(0.0, (n - b0) / (now - t0))
            left = (self.total or 0) - n
            self.eta_s = left / self.rate if self.rate > 0 and self.total else None


def _name_of(repo: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_.:+-]", "-", repo.rsplit("/", 1)[-1])[:64]
    return name if name[:1].isalnum() else "m" + name[:63]


@dataclass
class _Job:
    rec: Download
    child: Child
    subs: set[asyncio.Queue[dict[str, Any] | None]] = field(default_factory=set)


class Downloads:
    def __init__(
        self,
        state_dir: Path,
        records: Records,
        hosts: Callable[[], Mapping[str, Host]],
        log: logging.Logger,
        grace: float = 10.0,
    ) -> None:
        self.state_dir = state_dir
        self.records = records
        self.hosts = hosts
        self.log = log
        self.grace = grace
        self.jobs: dict[str, _Job] = {}
        self.order: deque[str] = deque()
        (state_dir / "logs" / "downloads").mkdir(parents=True, exist_ok=True, mode=0o700)

    # ---- requests ------------------------------------------------------------------------------

    def start(self, repo: str, revision: str | None = None, host: str | None = None) -> Download:
        if not isinstance(repo, str) or not REPO.match(repo):
            raise DownloadError(422, "invalid_request", "repo: expected ORG/NAME (letters, digits, _.-)", field="repo")
        if revision is not None and (len(revision) > 128 or not REVISION.match(revision)):
            raise DownloadError(422, "invalid_request", "revision: expected a branch, tag or commit", field="revision")
        target: Host | None = None
        if host is not None:
            known = self.hosts()
            target = known.get(host)
            if target is None:
                names = ", ".join(known) or "none"
                raise DownloadError(404, "unknown_host", f"host {host!r} is not in the catalog's hosts: ({names})")
        for j in self.jobs.values():
            r = j.rec
            if r.repo == repo and r.host == host and r.state not in ENDED:
                where = f"on {host}" if host else "here"
                raise DownloadError(
                    409, "download_in_progress", f"{repo} is already downloading {where}: {r.id}", running=r.public()
                )
        rec = Download(f"dl-{secrets.token_hex(6)}", repo, revision, host)
        child = Child(
            self._spec(rec, target),
            grace=self.grace,
            log_dir=self.state_dir / "logs" / "downloads",
            records=self.records,
            post=self._on_child,
            log=self.log,
            on_line=functools.partial(self._line, rec),
        )
        self.jobs[rec.id] = _Job(rec, child)
        self.order.append(rec.id)
        self._forget_old()
        child.launch()
        child.start(1)
        self.log.info(
            "download %s: %s%s%s", rec.id, repo, f"@{revision}" if revision else "", f" on {host}" if host else ""
        )
        return rec

    def cancel(self, download_id: str) -> Download:
        j = self.jobs.get(download_id)
        if j is None:
            raise DownloadError(404, "unknown_download", f"no download {download_id[:40]!r}")
        if j.rec.state in ENDED:
            raise DownloadError(409, "download_finished", f"download {download_id} is {j.rec.state} already")
        j.rec.state = "cancelling"
        self._publish(j)
        j.child.stop()
        return j.rec

    def get(self, download_id: str) -> Download | None:
        j = self.jobs.get(download_id)
        return j.rec if j is not None else None

    def list(self) -> list[Download]:
        return [self.jobs[i].rec for i in self.order if i in self.jobs]

    async def stream(self, download_id: str) -> AsyncIterator[dict[str, Any]]:
        """Its record now, then at every change, until it ends."""
        j = self.jobs.get(download_id)
        if j is None:
            return
        q: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(_SUB_QUEUE)
        j.subs.add(q)
        try:
            yield {"event": "progress", "data": j.rec.public()}
            if j.rec.state in ENDED:
                return
            while (ev := await q.get()) is not None:
                yield ev
        finally:
            j.subs.discard(q)

    async def close(self) -> None:
        """Stop every running download (the daemon stops) and end the owner tasks."""
        for j in self.jobs.values():
            await j.child.close()
            for q in list(j.subs):
                with contextlib.suppress(asyncio.QueueFull):
                    q.put_nowait(None)

    # ---- the jobs ------------------------------------------------------------------------------

    def _spec(self, rec: Download, host: Host | None) -> ChildSpec:
        env = {k: v for k, v in os.environ.items() if not k.startswith("WATCHDOG_LLM_")}
        env["PYTHONUNBUFFERED"] = "1"
        env["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        args = [rec.repo, rec.revision or ""]
        name = f"download-{rec.id}"
        if host is None:
            return ChildSpec(name, (sys.executable, "-m", "watchdog_llm.download_job", *args), env)
        from watchdog_llm.remote.runner import SPEC_ENV, Job

        source = Path(__file__).with_name("download_job.py").read_text()
        job = Job(
            host=host,
            state_dir=self.state_dir,
            start=[host.python, "-c", source, *args],
            stop=[],
            logs=[],
            forward=[k for k in _HF_ENV if k in env],  # HF_TOKEN on stdin, never on a command line
            stop_timeout=10.0,
            once=True,
        )
        env[SPEC_ENV] = job.to_env()
        return ChildSpec(name, (sys.executable, "-m", "watchdog_llm.remote.runner", rec.repo, host.name), env)

    def _line(self, rec: Download, line: str) -> None:
        if not line.startswith("{"):
            if line.startswith("[watchdog-llm] ") and rec.state not in ENDED:
                rec.message = line.removeprefix("[watchdog-llm] ")  # the runner: connected, unreachable, ...
            return
        try:
            ev = json.loads(line)
        except ValueError:
            return
        kind = ev.get("event")
        now = time.monotonic()
        if kind == "plan":
            rec.total, rec.have, rec.files = int(ev["total"]), int(ev["have"]), int(ev["files"])
            rec.state = "downloading"
            rec.message = f"{rec.files} files, {rec.total} bytes" + (
                f" ({rec.have} cached already)" if rec.have else ""
            )
            rec.progress(rec.have, now)
        elif kind == "progress":
            rec.progress(int(ev["bytes"]), now)
        elif kind == "done":
            rec.path = str(ev["path"])
        elif kind == "error":
            rec.error, rec.message = str(ev.get("code")), str(ev.get("message"))
        else:
            return
        self._publish(self.jobs[rec.id])

    def _on_child(self, ev: ChildEvent) -> None:
        j = self.jobs.get(ev.name.removeprefix("download-"))
        if j is None:
            return
        rec = j.rec
        if isinstance(ev, ChildStopped):
            rec.state = "cancelled"
            rec.message = rec.message or "cancelled"
            self.log.info("download %s cancelled at %s of %s bytes", rec.id, rec.bytes, rec.total)
        elif isinstance(ev, ChildExited):
            for t in ev.tail:  # its last lines may be read after its exit was: the tail has them
                if rec.path is None and rec.error is None and t.startswith('{"event": "') and '"progress"' not in t:
                    self._line(rec, t)
            if ev.code == 0 and rec.path:
                rec.state, rec.rate, rec.eta_s = "done", None, 0.0
                rec.bytes = rec.total or rec.bytes
                self.log.info("download %s done: %s", rec.id, rec.path)
            else:
                rec.state = "failed"
                if rec.error is None:  # it died without saying why: its last words, or its exit
                    rec.error = "download_failed"
                    last = [t for t in ev.tail if t.strip()]
                    rec.message = rec.message or (last[-1] if last else ev.why or f"exit status {ev.code}")
                self.log.warning("download %s failed (%s): %s", rec.id, rec.error, rec.message)
        else:
            return
        rec.finished_at = time.time()
        self._publish(j, end=True)
        asyncio.get_running_loop().create_task(j.child.close())

    def _publish(self, j: _Job, *, end: bool = False) -> None:
        ev = {"event": "progress", "data": j.rec.public()}
        for q in list(j.subs):
            with contextlib.suppress(asyncio.QueueFull):
                q.put_nowait(ev)
            if end:
                with contextlib.suppress(asyncio.QueueFull):
                    q.put_nowait(None)

    def _forget_old(self) -> None:
        ended = [i for i in self.order if self.jobs[i].rec.state in ENDED]
        for i in ended[: max(0, len(ended) - KEEP)]:
            self.order.remove(i)
            self.jobs.pop(i, None)
