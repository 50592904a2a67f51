"""Composition root: builds the parts once, runs them on one event loop, shuts them down in order.

Lifecycle (uvicorn-style named phases):
  startup   state dir, lock, leftovers of a previous run, detector, notifier, children, signals
  main      every input (detector signal, child report, timer, OS signal) goes through `_handle`,
            which asks the pure policy what to do and carries it out: kills first, then the rest
  shutdown  children stopped, final notification flushed, detector closed, lock released

Signal handlers only feed a Shutdown event in; nothing exits from deep inside.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import logging
import os
import random
import secrets
import signal
import socket
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import sdnotify
import yaml

from watchdog_llm import views
from watchdog_llm.activity import ActivityProbe
from watchdog_llm.announce import Announcer
from watchdog_llm.availability import Availability, availability, typical_start
from watchdog_llm.base.ids import format_ids as _ids
from watchdog_llm.base.vocab import NotifyKind, YieldOn
from watchdog_llm.config import Settings, TunnelOnYield
from watchdog_llm.coordination.catalog import Catalog, CatalogError, ModelEntry, add_to_file
from watchdog_llm.coordination.core import CoordError, Coordinator
from watchdog_llm.coordination.events import EventBus
from watchdog_llm.coordination.health import HealthEventIn, HealthLog
from watchdog_llm.coordination.lock import SwapLock
from watchdog_llm.coordination.overrides import Overrides
from watchdog_llm.coordination.schedule import Schedule
from watchdog_llm.coordination.store import JsonStore
from watchdog_llm.coordination.swap import SwapRecord, Swaps
from watchdog_llm.coordination.webhook import Webhooks, parse_urls
from watchdog_llm.detect import DetectError, Detector, DetectorFailed, JobGone, JobSeen, Signal, make_detector
from watchdog_llm.detect.gpu import GpuError, GpuProcess, GpuView, GpuWatch, open_gpu_view, wait_released
from watchdog_llm.detect.scontrol import Scontrol
from watchdog_llm.detect.slurm import own_jobs
from watchdog_llm.downloads import Downloads
from watchdog_llm.gpus import GpuPlan, GpuSetupError
from watchdog_llm.gpus import plan as plan_gpus
from watchdog_llm.http.api import build_admin
from watchdog_llm.http.coord_api import coordination_router
from watchdog_llm.http.dashboard import Gate, dashboard_router
from watchdog_llm.http.downloads_api import downloads_router
from watchdog_llm.http.gateway import Gateway, GatewayConfig, ModelNames, model_names
from watchdog_llm.http.keys import KeyConfigError, KeyRing, Limiter
from watchdog_llm.http.server import (
    ConnLimits,
    Listener,
    ListenError,
    bind_tcp,
    bind_unix,
    fit_to_fds,
    raise_fd_limit,
    rate_limit_resource_errors,
)
from watchdog_llm.http.services_api import services_router
from watchdog_llm.http.session import Sessions
from watchdog_llm.metrics import Metrics
from watchdog_llm.notify import Notifier, NotifyConfigError
from watchdog_llm.ondemand import OnDemand, OnDemandConfig
from watchdog_llm.policy import (
    AbortStreams,
    Activity,
    ConfirmRelease,
    Decision,
    Event,
    Exit,
    GpuBusy,
    GpusReleased,
    JobGpus,
    Limits,
    ModelChoice,
    ModelExited,
    ModelHung,
    ModelReady,
    Notify,
    Phase,
    SetTimer,
    SetTunnel,
    Shutdown,
    StartModel,
    Startup,
    State,
    StopDone,
    StopModel,
    SwapRequested,
    SwapUpdate,
    TimerFired,
    WatchActivity,
    decide,
    served,
)
from watchdog_llm.policy import DetectorFailed as PolicyDetectorFailed
from watchdog_llm.policy import JobGone as PolicyJobGone
from watchdog_llm.policy import JobSeen as PolicyJobSeen
from watchdog_llm.remote.watch import Health, Target, Watch, targets
from watchdog_llm.services import Restarts, Services
from watchdog_llm.status import STATUS_FILE
from watchdog_llm.supervise.child import (
    Child,
    ChildChanged,
    ChildEvent,
    ChildExited,
    ChildHung,
    ChildReady,
    ChildStopped,
)
from watchdog_llm.supervise.output import cause
from watchdog_llm.supervise.probes import free_port, port_in_use
from watchdog_llm.supervise.specs import (
    catalog_defaults,
    load_catalog,
    model_address,
    model_spec,
    remote_address,
    remote_spec,
    resolve_bin,
    tunnel_config,
    tunnel_spec,
)
from watchdog_llm.supervise.tree import Records, descendants, owner_id, set_child_subreaper
from watchdog_llm.supervise.tunnel import TunnelKeeper
from watchdog_llm.timers import Timers

log = logging.getLogger("watchdog_llm")

SHUTDOWN_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)  # SIGHUP: tmux session closed
NOTIFY_FLUSH_TIMEOUT = 8.0
DUPLICATE_SIGNAL_S = 0.25  # a second stop signal sooner than this is the same request, not "hurry"
KILL_WAIT_DEFAULT = 30  # slurm.conf KillWait: SIGTERM -> SIGKILL of a job's processes
WEBHOOK_FLUSH_TIMEOUT = 5.0


class StartupError(Exception):
    """The daemon cannot start; the message is one line that says what to fix."""


def prepare_state_dir(path: Path) -> None:
    """STATE_DIR must be ours alone: it holds the pid records we kill by at start-up, the API key
    and the tunnel's config. A directory someone else made first (a predictable name under /tmp)
    or can write to would let them steer what we kill or overwrite."""
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        st = path.stat()
        if st.st_uid != os.geteuid():
            raise StartupError(f"STATE_DIR={str(path)!r} belongs to uid {st.st_uid}, not to us: use one of ours")
        if st.st_mode & 0o022:
            raise StartupError(f"STATE_DIR={str(path)!r} is writable by other users: chmod go-w it, or use another")
        for d in (path, path / "logs"):
            d.mkdir(exist_ok=True, mode=0o700)
            if (mode := d.stat().st_mode & 0o777) & 0o077:  # ours: logs and status name jobs, pids, paths
                log.warning("%s was readable by other users (mode %04o): made it 0700", d, mode)
                os.chmod(d, 0o700)
        probe = path / f".write-test.{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise StartupError(f"STATE_DIR={str(path)!r} is not writable: {e.strerror or e}") from None


def load_keys(s: Settings) -> KeyRing:
    try:
        keys = KeyRing.from_settings(
            s.public_api_keys.get_secret_value(), s.public_api_keys_file, s.api_key.get_secret_value()
        )
    except KeyConfigError as e:
        raise StartupError(str(e)) from None
    if keys.open:
        log.warning(
            "NO PUBLIC_API_KEYS: the public endpoint %s is OPEN to anyone who can reach it%s; "
            "set PUBLIC_API_KEYS or PUBLIC_API_KEYS_FILE",
            s.public_base_url,
            " (and through the tunnel, to the whole internet)" if s.tunnel_enabled else "",
        )
    return keys


class Daemon:
    def __init__(self, settings: Settings) -> None:
        self.s = settings
        self.limits = Limits(
            resume_cooldown=settings.resume_cooldown,
            restart_backoff_max=settings.restart_backoff_max,
            restart_limit=settings.restart_limit,
            min_uptime=settings.min_uptime,
            startup_timeout=settings.startup_timeout,
            tunnel=settings.tunnel_enabled,
            tunnel_leaves_on_yield=settings.tunnel_on_yield is TunnelOnYield.STOP,
        )
        # since: now, not the monotonic clock's zero (status would say 'init since <uptime> ago').
        self.state = State(since=time.monotonic())
        self.sd = sdnotify.SystemdNotifier()
        self.rng = random.Random()
        self.started_wall = time.time()
        self._exit = asyncio.Event()
        self._exit_code = 0
        self.timers = Timers()
        self._yield_detected_at: float | None = None  # monotonic time the yielding job was seen
        self._shutdown_signals = 0
        self._first_signal_at = 0.0
        self._release_since = 0.0  # monotonic: the finished yield's detection (or stop request)
        self._lock_fd: int | None = None
        self._stack = contextlib.AsyncExitStack()  # replaced by run()'s: what starts registers its cleanup
        self.detector: Detector | None = None
        self.model: Child | None = None
        self.tunnel: TunnelKeeper | None = None
        self.notifier: Notifier | None = None
        self.gpu: GpuView | None = None
        self.gpu_plan = GpuPlan()
        self.gpu_watch: GpuWatch | None = None
        self.scontrol: Scontrol | None = None
        self.activity: ActivityProbe | None = None
        self._seen: dict[str, tuple[float, float | None]] = {}  # job -> (monotonic seen, cgroup age ms)
        # The model tree when its last stop was asked for: NVML may still list those pids a moment
        # after they died, and they are ours, not foreign. Replaced whole: the GPU watch thread reads it.
        self._recent_pids: frozenset[int] = frozenset()
        self._exiting = threading.Event()  # ends a release confirmation's NVML wait at shutdown
        self._tasks: set[asyncio.Task[None]] = set()
        self._internal_key = secrets.token_urlsafe(32)  # replaced at every model start
        self.model_addr = model_address(settings)  # where the model listens (SERVER_PORT may be taken)
        self.model_remote = False  # model_addr is on another host (a remote entry's base_url)
        self._port_taken = False  # SERVER_PORT was in use at the last start (told once, until free again)
        self.metrics = Metrics(served_seconds=lambda: served(self.state, time.monotonic()))
        self.announce = Announcer(
            settings.state_dir / STATUS_FILE,
            lambda: views.status(self),
            lambda: self.state,
            lambda: (self.tunnel.url if self.tunnel else "") or settings.public_base_url,
            settings.num_gpus,
            self.metrics,
            self.sd,
            log,
        )
        self.gateway: Gateway | None = None
        self.listeners: list[Listener] = []
        self.catalog: Catalog | None = None
        self.coord: Coordinator | None = None
        self.webhooks: Webhooks | None = None
        self.events = EventBus()  # GET /api/events
        self.sessions = Sessions()  # dashboard sign-ins
        self._names: tuple[str, ModelNames] | None = None  # the gateway's model names, for one model
        self.on_demand: OnDemand | None = None  # with the listeners
        self.watch: Watch | None = None  # mode C: hosts and their servers, probed
        self.records: Records | None = None  # the pids of our children, by child (killed as leftovers)
        self.downloads: Downloads | None = None  # with the listeners
        self.services: Services | None = None  # mode C: always-on services beside the model
        self.llm_bin = ""
        self._catalog_mu = asyncio.Lock()  # one catalog file rewrite at a time

    # ---- lifecycle -----------------------------------------------------------------------------

    async def run(self) -> int:
        """Run until shut down. Raises StartupError (after undoing what had started); never leaves
        a child running when it returns.

        Shutdown is ordered by construction: each part registers its cleanup on the exit stack as
        it starts, so parts stop in the reverse order of their start (the detector and timers
        before the children, the children before the listeners, notifications last but the lock)."""
        async with contextlib.AsyncExitStack() as stack:
            self._stack = stack
            await self._startup()
            try:
                await self._exit.wait()
            except BaseException:
                log.exception("internal error; stopping everything")
                self._exit_code = 1
        return self._exit_code

    async def _startup(self) -> None:
        """State dir and lock, catalog, coordination, leftovers, notifier, GPUs, listeners,
        children, detection, signals, then the first decision. Each step that can fail does so
        with a StartupError before the next one starts."""
        s = self.s
        prepare_state_dir(s.state_dir)
        self._lock()
        try:
            self.catalog = load_catalog(s)
        except CatalogError as e:
            raise StartupError(str(e)) from None
        llm_bin = resolve_bin(s.llm_bin)
        if llm_bin is None and any(e.remote is None for e in self.catalog.entries):
            raise StartupError(f"LLM_BIN={s.llm_bin!r} not found or not executable (is vLLM installed?)")
        self.llm_bin = llm_bin or ""  # a controller whose models all run on other hosts needs none
        pending = self._setup_coordination()
        records = self.records = Records(s.state_dir / "children.json", log, owner_id(s.state_dir))
        for left in records.kill_leftovers():
            log.warning("killed leftover %s process %d (%s) of a previous run", left.child, left.pid, left.name)
        if not set_child_subreaper():
            log.warning("cannot become a child subreaper: orphans of the model re-parent to init")
        loop = asyncio.get_running_loop()
        try:
            self.notifier = Notifier(s.notify_url_list, coalesce=s.notify_coalesce, node=s.node_name, log=log)
        except NotifyConfigError as e:
            raise StartupError(f"NOTIFY_URLS/NTFY_TOPIC: {e}") from None
        self.announce.notifier = self.notifier
        notifying = asyncio.create_task(self.notifier.run(), name="notifier")
        self._stack.push_async_callback(self._close_notifier, self.notifier, notifying)
        self._setup_gpus()
        rate_limit_resource_errors(loop, log)
        self._stack.callback(loop.set_exception_handler, None)
        # Removed only once the children are closed: a second Ctrl-C while they stop means "hurry".
        self._stack.callback(self._remove_signal_handlers, loop)
        self._make_services(records)
        await self._open_listeners(load_keys(s))
        self._start_watch()
        self._start_children(records)
        assert self.services is not None and self.catalog is not None
        self.services.sync(self.catalog.entries)  # mode C: the always-on services start with the daemon
        jobs = self._start_detection(loop)
        for sig in SHUTDOWN_SIGNALS:
            loop.add_signal_handler(sig, self._on_signal, sig)
        loop.add_signal_handler(signal.SIGUSR1, self._reload_on_signal)
        await self._first_decision(pending, jobs)
        self.sd.notify("READY=1")
        if usec := os.environ.get("WATCHDOG_USEC"):
            pinger = asyncio.create_task(self._watchdog_pings(int(usec) / 1e6), name="sd-watchdog")
            self._stack.callback(pinger.cancel)

    def _start_children(self, records: Records) -> None:
        """The model's owner (started by the policy's StartModel), the tunnel's, the idle probe."""
        s = self.s
        logs = s.state_dir / "logs"
        self.model = Child(
            self._model_spec(self.state.model.name),
            grace=s.yield_grace,
            log_dir=logs,
            records=records,
            post=self._on_child,
            log=log,
            scan_interval=s.tree_scan_interval,
            on_line=self.coord.swaps.log_line if self.coord is not None else None,
        )
        self.model.launch(self._on_supervisor_crash)
        # Children last stopped by the policy are already down; close() stops anything left (after
        # an internal error, everything) and ends their owner tasks.
        self._stack.push_async_callback(self.model.close)
        if s.tunnel_enabled:  # connected by the policy's SetTunnel, from the first decision on
            self.tunnel = self._make_tunnel(records, logs)
            self.tunnel.child.launch(self._on_supervisor_crash)
            self._stack.push_async_callback(self.tunnel.close)
        if s.idle_release_after > 0:
            self.activity = ActivityProbe(lambda: self.model_addr, s.idle_release_after, self._on_activity, log)
            self._stack.callback(self.activity.stop)
        self._stack.callback(self._cancel_pending)  # before the children close: no timer restarts one

    def _make_services(self, records: Records) -> None:
        """Mode C: the owner of the catalog's always-on services (they start after the model's owner)."""
        s = self.s

        def spec(e: ModelEntry, key: Any) -> Any:
            assert e.remote is not None and self.catalog is not None
            return remote_spec(s, key, self.next_start(e.name), self.catalog.hosts[e.remote.host], f"service-{e.name}")

        def notify(title: str, body: str, urgent: bool) -> None:
            self.announce.submit(Notify(NotifyKind.SERVICE, title, body, "high" if urgent else "default"))

        restarts = Restarts(s.restart_backoff_max, s.restart_limit, s.min_uptime)
        self.services = Services(
            spec, records, s.state_dir / "logs", restarts, log, grace=s.yield_grace, notify=notify,
            on_change=self.announce.publish_status, rng=self.rng,
        )  # fmt: skip
        self._stack.push_async_callback(self.services.close)

    def _start_watch(self) -> None:
        """Mode C: each host's SSH port and each remote server's health, probed on their own tasks."""
        s, cat = self.s, self.catalog
        if s.host_check_interval <= 0 or cat is None:
            return
        self.watch = Watch(dict(cat.hosts), s.host_check_interval, s.host_check_timeout, self._on_health, log, self.rng)
        self.watch.set_targets(dict(cat.hosts), targets(cat.hosts.values(), cat.entries))
        self._stack.push_async_callback(self.watch.close)

    def _on_health(self, t: Target, h: Health, first: bool) -> None:
        up = "up" if h.ok else "down"
        what = f"host {t.name}" if t.kind == "host" else f"{', '.join(t.entries)} at {t.name} (on {t.host})"
        body = f"{what} is {up}" + (f": {h.detail}" if h.detail else "")
        (log.info if h.ok else log.warning)("watch: %s", body)
        if self.coord is None:
            return
        rec = HealthEventIn(
            service=t.key[:64], ok=bool(h.ok), source="watchdog-llm", error=h.detail[:1000] or None, ms=h.ms
        )
        self._background(asyncio.to_thread(self.coord.health.append, rec))  # the log fsyncs: never on the loop
        if first and (h.ok or t.kind == "service"):
            return  # a first "up" is no news, nor a server of a model that is not running
        detail = {"target": t.name, "host": t.host, "entries": list(t.entries), "detail": h.detail}
        self.coord.event(f"{t.kind}_{up}", detail)
        if t.kind == "host":
            self.announce.submit(Notify(NotifyKind.HOST, f"host {t.name} {up}", body, "default" if h.ok else "high"))

    def _start_detection(self, loop: asyncio.AbstractEventLoop) -> frozenset[str]:
        """Slurm jobs (cgroup or procfs) and foreign GPU processes; returns the jobs already running."""
        s = self.s
        own = own_jobs(dict(os.environ), _read(Path("/proc/self/cgroup")))
        jobs: frozenset[str] = frozenset()
        if (job_mode := s.detection_mode.jobs) is not None:
            try:
                self.detector = make_detector(
                    job_mode,
                    cgroup_root=s.cgroup_root,
                    poll_interval=s.poll_interval,
                    own=own,
                    log=log,
                    stale_grace=s.stale_job_grace,
                )
                jobs = self.detector.start(lambda sig: _discard(loop.call_soon_threadsafe(self._on_detect, sig)))
                self._stack.callback(self.detector.stop)
            except DetectError as e:
                raise StartupError(f"DETECTION_MODE={s.detection_mode.value}: {e}") from None
            for line in self.detector.describe():
                log.info("detect: %s", line)
        if own:
            log.info("running inside Slurm job(s) %s: never yielding to them", ", ".join(sorted(own)))
            if s.yield_grace > KILL_WAIT_DEFAULT - 5:
                log.warning(
                    "YIELD_GRACE=%.0f s: Slurm sends SIGKILL %d s after SIGTERM by default (KillWait); "
                    "a shorter grace lets the daemon stop its tree and report before that",
                    s.yield_grace,
                    KILL_WAIT_DEFAULT,
                )
        if s.detection_mode.watches_gpus:
            assert self.gpu is not None  # _setup_gpus refuses nvml/hybrid without a GPU view
            self.gpu_watch = GpuWatch(
                self.gpu,
                s.gpu_poll_interval,
                lambda: descendants(os.getpid()) | self._recent_pids,
                lambda: self.limits.all_gpus or self.limits.fixed_gpus or frozenset(),
                lambda busy, procs: _discard(loop.call_soon_threadsafe(self._on_gpu_busy, busy, procs)),
                log,
            )
            self.gpu_watch.start()
            self._stack.push_async_callback(asyncio.to_thread, self.gpu_watch.stop)
        return jobs

    async def _first_decision(self, pending: tuple[SwapRecord, ModelEntry] | None, jobs: frozenset[str]) -> None:
        # Jobs already running are looked up before the first decision (no start on a job's GPUs).
        # Meanwhile the detector and signals may already speak: each event goes through the policy
        # (in phase init it just remembers), and a signal in that window ends the daemon here.
        if pending is not None:  # a swap the previous daemon left open: it completes with this start
            rec, entry = pending
            self._handle(SwapRequested(rec.id, self._choice(entry)))
        for job in sorted(jobs):
            self._handle(PolicyJobSeen(job))
        lookups = [self._lookup(job) for job in sorted(jobs)] if self.scontrol is not None else []
        await asyncio.gather(*lookups)
        if self.state.phase is Phase.INIT:
            self._handle(Startup(frozenset()))

    def _setup_coordination(self) -> tuple[SwapRecord, ModelEntry] | None:
        """Lock, swaps, schedule, connectivity log and webhooks, from their files in STATE_DIR.
        Picks the model this start serves; returns a swap left open by the previous daemon."""
        s, cat = self.s, self.catalog
        assert cat is not None
        swaps = Swaps(JsonStore(s.state_dir / "swaps.json", log), log=log)
        entry = cat.default_entry
        if swaps.chosen and swaps.chosen != entry.name:
            chosen = cat.resolve(swaps.chosen)
            if chosen is None:
                log.warning(
                    "model %r, chosen by the last swap, is not in the catalog any more: serving %s",
                    swaps.chosen,
                    entry.name,
                )
            else:
                entry = chosen
        pending: tuple[SwapRecord, ModelEntry] | None = None
        rec = swaps.recover()
        if rec is not None:
            target = cat.resolve(rec.model)
            if target is None:
                swaps.update(rec.id, "failed", f"model {rec.model!r} is not in the catalog any more")
            else:
                before = cat.resolve(rec.previous) if rec.previous else None
                entry = before or entry  # what comes back if the target fails
                pending = (rec, target)
        self.state = replace(self.state, model=self._choice(entry))
        loop = asyncio.get_running_loop()  # the lock's endpoints run in threads: notices hop back here
        self.events.bind(loop)
        urls = parse_urls(s.webhook_urls)
        if urls:
            self.webhooks = Webhooks(
                urls,
                s.webhook_secret.get_secret_value(),
                s.node_name,
                log=log,
                on_result=lambda outcome, _event: self.metrics.webhooks.labels(outcome).inc(),
            )
            sending = asyncio.create_task(self.webhooks.run(), name="webhooks")
            self._stack.push_async_callback(self._close_webhooks, self.webhooks, sending)
        self.coord = Coordinator(
            catalog=cat,
            lock=SwapLock(JsonStore(s.state_dir / "lock.json", log), max_ttl=s.swap_lock_max_ttl, log=log),
            swaps=swaps,
            schedule=Schedule(JsonStore(s.state_dir / "schedule.json", log), log=log),
            health=HealthLog(JsonStore(s.state_dir / "connectivity.json", log), log=log),
            webhooks=self.webhooks,
            node=s.node_name,
            log=log,
            start_swap=lambda rec, e: self._handle(SwapRequested(rec.id, self._choice(e))),
            active=lambda: self.state.model.name,
            refuse=self._refuse_swap,
            unfit=self._unfit,
            bus=self.events,
            overrides=Overrides(JsonStore(s.state_dir / "overrides.json", log), log),
            notify=lambda kind, title, body: _discard(
                loop.call_soon_threadsafe(self.announce.submit, Notify(NotifyKind(kind), title, body, "high"))
            ),
        )
        self.announce.coord = self.coord
        return pending

    @staticmethod
    def _choice(e: ModelEntry) -> ModelChoice:
        return ModelChoice(e.name, e.gpus, e.startup_timeout, remote=e.remote is not None)

    def entry(self, name: str) -> ModelEntry:
        assert self.catalog is not None
        return self.catalog.resolve(name) or self.catalog.default_entry

    def next_start(self, name: str) -> ModelEntry:
        """The entry as its next start runs it: the catalog's, with the settings that persist."""
        e = self.entry(name)
        if self.coord is not None and self.coord.overrides is not None:
            return self.coord.overrides.applied(e)
        return e

    def _model_spec(self, name: str) -> Any:
        e = self.next_start(name)
        if e.remote is not None:
            assert self.catalog is not None  # the catalog checked that the host is in it
            return remote_spec(self.s, lambda: self._internal_key, e, self.catalog.hosts[e.remote.host])
        return model_spec(self.s, self.llm_bin, lambda: self._internal_key, e, self.model_addr)

    def _choose_address(self, name: str) -> None:
        """Before each start, over TCP: SERVER_PORT, or another free port while something else holds
        it (another user's server must not make our model fail; told once, until it is free again).
        A remote entry is reached at its base_url."""
        s = self.s
        self.model_remote = (e := self.entry(name)).remote is not None
        if e.remote is not None:
            self.model_addr = remote_address(e)
            return
        if s.model_socket is not None:
            self.model_addr = model_address(s)  # after a remote entry, this node's socket again
            return
        if not port_in_use(s.server_host, s.server_port):
            self._port_taken = False
            self.model_addr = model_address(s)
            return
        port = free_port(s.server_host)
        self.model_addr = model_address(s, port)
        body = f"SERVER_PORT {s.server_port} is in use by another process; the model listens on port {port} instead"
        if self._port_taken:
            log.info("%s", body)
            return
        self._port_taken = True
        log.warning("%s", body)
        self.announce.submit(Notify(NotifyKind.PORT_TAKEN, "model port taken", body, "default"))

    def _exit_why(self, why: str, code: int | None, tail: tuple[str, ...]) -> str:
        """How the model ended, with the line of its own output that says why and the setting to
        look at: it goes into status, the notification and the swap's result, not only the log."""
        e = self.entry(self.state.model.name)
        src = self.catalog.source if self.catalog is not None else "MODEL_NAME"
        model, args = ("MODEL_NAME", "VLLM_ARGS") if src == "MODEL_NAME" else (f"{e.name!r} in {src}",) * 2
        if (path := e.local_path) is not None and not path.is_dir():
            return f"{why}: model directory {path} does not exist (check {model})"
        # After a signal its output says nothing about the signal, at best about what followed it.
        c = cause(tail) if code is not None and code > 0 else None
        if c is None:
            return why
        if c.usage and "--uds" in c.line:
            return f"{why}: {c.line} (this vLLM has no --uds: upgrade it, or set SERVER_SOCKET=off)"
        if c.usage:
            return f"{why}: vLLM refused its arguments: {c.line} (check {args})"
        return f"{why}: {c.line}"

    def _public_model_name(self) -> str:
        """What the public page and /health call the model: its hub id, or its catalog name when it
        is a local path (a path names a user's directory; the page is on the internet)."""
        e = self.entry(self.state.model.name)
        return e.model if e.local_path is None else e.name

    def _model_names(self) -> ModelNames | None:
        """The gateway's view of the catalog while the current model serves (built once per model)."""
        if self.catalog is None:
            return None
        name = self.state.model.name
        if self._names is None or self._names[0] != name:
            self._names = (name, model_names(self.catalog.entries, self.entry(name), self._public_model_name()))
        return self._names[1]

    def our_gpus(self) -> frozenset[int] | None:
        """Every GPU that can be ours (given, or to choose from); None: unknown (no NVML)."""
        return self.limits.fixed_gpus if self.limits.fixed_gpus is not None else self.limits.all_gpus

    def _unfit(self, e: ModelEntry) -> str | None:
        if e.remote is not None:
            return None  # its GPUs are its host's
        gpus = self.our_gpus()
        if gpus is not None and e.gpus > len(gpus):
            return f"model {e.name} needs {e.gpus} GPUs; at most {len(gpus)} can be ours here ({_ids(gpus)})"
        return None

    def _swap_on_demand(self, name: str) -> None:
        assert self.coord is not None
        self.coord.swap(name, None)

    def _refuse_swap(self) -> str | None:
        if self.state.phase in (Phase.STOPPING, Phase.STOPPED):
            return "the daemon is stopping"
        return None

    async def _open_listeners(self, keys: KeyRing) -> None:
        """The public gateway and the admin API. Both sockets are bound before either serves, so a
        port in use stops the start-up before any model process exists."""
        s = self.s
        self.on_demand = OnDemand(
            OnDemandConfig(s.on_demand_wait, s.on_demand_queue, s.min_residency),
            lambda: self.state,
            self.availability,
            lambda: self.gateway.in_flight if self.gateway is not None else 0,
            self._swap_on_demand,
            lambda: self.coord.swaps.recent() if self.coord is not None else [],
            self.metrics,
            log,
        )
        cfg = GatewayConfig(
            max_body_bytes=s.max_body_bytes,
            body_timeout=s.body_timeout,
            read_timeout=s.upstream_timeout,
            upstream_uds=self.model_addr.uds,
            chat_page=s.chat_page,
        )
        self.gateway = Gateway(
            cfg,
            keys,
            Limiter(s.max_concurrent_per_key),
            self.metrics,
            self.availability,
            lambda: (self.model_addr.base_url, self._internal_key, self.model_remote),
            lambda: {"model": self._public_model_name(), "since": self._wall(self.state.since)},
            self._model_names,
            self.on_demand.demand if s.on_demand else None,  # off: 409 model_not_loaded
            self.on_demand.pulse,
            lambda name: self.services.target(name) if self.services is not None else None,
        )
        self._stack.push_async_callback(self.gateway.aclose)  # after its listener: it answered until then
        assert self.coord is not None and self.records is not None and self.services is not None
        self.downloads = Downloads(s.state_dir, self.records, lambda: self.catalog.hosts if self.catalog else {}, log)
        self._stack.push_async_callback(self.downloads.close)  # after the listeners: nobody asks for more
        status = functools.partial(views.status, self)
        admin = build_admin(
            status,
            self._health,
            self.metrics.render,
            [
                coordination_router(
                    self.coord,
                    lambda: views.endpoints(self),
                    lambda key: views.validate(self, key),
                    self.reload_catalog,
                    self.add_model,
                ),
                downloads_router(self.downloads),
                services_router(self.services),
                dashboard_router(
                    self.sessions,
                    self.events,
                    status,
                    lambda: views.gpu_table(self),
                    self.metrics.by_consumer,
                    s.state_dir / "logs",
                    log,
                ),
            ],
        )
        # Where others can connect (TCP, or the dashboard's socket that `watchdog-llm dashboard`
        # forwards a local port to), the gate wants the admin token or a signed-in session.
        gated = Gate(admin, s.admin_token.get_secret_value(), self.sessions, log)
        socks = []
        try:
            socks.append(bind_tcp(s.public_host, s.public_port, "PUBLIC_HOST/PUBLIC_PORT"))
            if s.admin_host:
                socks.append(bind_tcp(s.admin_host, s.admin_port, "ADMIN_HOST/ADMIN_PORT"))
            else:
                socks.append(bind_unix(s.admin_socket, "admin socket"))
                socks.append(bind_unix(s.dashboard_socket, "dashboard socket"))
        except ListenError as e:
            for sock in socks:
                sock.close()
            raise StartupError(str(e)) from None
        limits = self._conn_limits()
        self.listeners = [
            Listener("public", self.gateway, socks[0], log, limits),
            Listener("admin", gated if s.admin_host else admin, socks[1], log, limits),
        ]
        if not s.admin_host:
            self.listeners.append(Listener("dashboard", gated, socks[2], log, limits))
            self._stack.callback(_unlink, s.admin_socket)
            self._stack.callback(_unlink, s.dashboard_socket)
        for listener in self.listeners:
            self._stack.push_async_callback(listener.stop)
            await listener.start()
        # Live streams end first, so that the admin listener can close at once.
        self._stack.callback(self.coord.swaps.close)
        self._stack.callback(self.events.close)
        where = f"{s.admin_host}:{s.admin_port} (token required)" if s.admin_host else str(s.admin_socket)
        log.info("gateway on %s (%d key(s)); admin API on %s", s.public_base_url, len(keys), where)

    def _conn_limits(self) -> ConnLimits:
        """Connection caps and timeouts, with the file limit raised first so that caps, not EMFILE,
        refuse connections (a yield needs no new descriptor either way: see supervise.tree.Member)."""
        s = self.s
        before, nofile = raise_fd_limit()
        if nofile != before:
            log.info("file descriptors: RLIMIT_NOFILE raised from %d to %d", before, nofile)
        wanted = ConnLimits(s.max_connections, s.max_connections_per_peer, s.head_timeout, s.keepalive_timeout)
        limits, why = fit_to_fds(wanted, nofile)
        if why is not None:
            log.warning("%s", why)
        return limits

    def availability(self) -> Availability:
        now = time.monotonic()
        timer = {Phase.COOLDOWN: "cooldown", Phase.BACKOFF: "backoff"}.get(self.state.phase)
        return availability(
            self.state,
            now,
            timer_left=self.timers.left(timer, now) if timer else None,
            start_s=typical_start(self.announce.start_times, self.s.startup_timeout),
            cooldown_s=self.s.resume_cooldown,
        )

    def _health(self) -> tuple[str, bool]:
        return self.state.phase.value, self.state.phase is Phase.SERVING

    def _setup_gpus(self) -> None:
        """NVML (or its stand-in), which GPUs are ours, and how jobs are judged against them."""
        s = self.s
        self.gpu = open_gpu_view(s.gpu_standin, s.nvml_timeout, log)
        self._stack.callback(self._close_gpu)
        try:
            self.gpu_plan = plan_gpus(s, self.gpu, os.environ, log)
        except GpuSetupError as e:
            raise StartupError(str(e)) from None
        for note in self.gpu_plan.notes:
            log.info("%s", note)
        if self.gpu is not None and not self.gpu_plan.index_of:  # no GPU listed (or listing failed)
            self.gpu.close()
            self.gpu = None
        if s.detection_mode.watches_gpus and (self.gpu is None or not self.gpu_plan.aware):
            why = "NVML is unavailable" if self.gpu is None else "our GPUs are unknown (CUDA_VISIBLE_DEVICES set?)"
            raise StartupError(f"DETECTION_MODE={s.detection_mode.value} needs NVML and known GPUs: {why}")
        gp = self.gpu_plan
        if gp.yield_on is YieldOn.OVERLAP:
            scontrol = resolve_bin(s.scontrol_bin)
            if scontrol is None and s.detection_mode.jobs is not None:
                log.warning("SCONTROL_BIN=%r not found: jobs' GPUs are unknown; yielding to every job", s.scontrol_bin)
                gp = replace(gp, yield_on=YieldOn.ANY)
            elif scontrol is not None:
                node = os.environ.get("SLURMD_NODENAME") or socket.gethostname().split(".")[0]
                self.scontrol = Scontrol(scontrol, s.scontrol_timeout, node, log)
        self.gpu_plan = gp
        self.limits = replace(
            self.limits,
            yield_on=gp.yield_on,
            num_gpus=s.num_gpus,
            all_gpus=gp.all_gpus,
            fixed_gpus=gp.fixed_gpus,
            confirm_gpus=self.gpu is not None and gp.aware and s.gpu_release_timeout > 0,
            idle_release_after=s.idle_release_after,
            own_job=os.environ.get("SLURM_JOB_ID") or None,
            unknown_conflicts=not gp.allocated,
        )
        if gp.aware:
            which = "chosen from " + _ids(gp.all_gpus) if gp.all_gpus is not None else _ids(gp.fixed_gpus)
            log.info("GPUs: %s (%s); yield on %s", which, self.gpu.name if self.gpu else "no NVML", gp.yield_on)

    def _make_tunnel(self, records: Records, logs: Path) -> TunnelKeeper:
        s = self.s
        cloudflared = resolve_bin(s.cloudflared_bin)
        if cloudflared is None:
            raise StartupError(f"CLOUDFLARED_BIN={s.cloudflared_bin!r} not found or not executable")
        host, _, port = s.tunnel_metrics.rpartition(":")
        metrics = f"{host}:{free_port() if port == '0' else port}"
        config_file = None
        if s.tunnel_id and s.cloudflared_creds:
            config_file = s.state_dir / "cloudflared.yml"
            config_file.write_text(yaml.safe_dump(tunnel_config(s), sort_keys=False))
            config_file.chmod(0o600)
        spec = tunnel_spec(s, cloudflared, metrics, config_file)
        child = Child(spec, grace=min(s.yield_grace, 5.0), log_dir=logs, records=records, post=self._on_child, log=log)
        return TunnelKeeper(
            child,
            url=f"https://{s.tunnel_hostname}" if s.tunnel_hostname else "",
            backoff_max=s.restart_backoff_max,
            min_uptime=s.min_uptime,
            on_down=lambda body: self.announce.submit(Notify(NotifyKind.TUNNEL, "tunnel down", body, "default")),
            on_change=self.announce.publish_status,
            log=log,
            rng=self.rng,
        )

    def _lock(self) -> None:
        """One daemon per STATE_DIR: a second one would kill the first one's children as leftovers."""
        path = self.s.state_dir / "daemon.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise StartupError(
                f"another watchdog-llm (pid {other}) is running with STATE_DIR={str(self.s.state_dir)!r}"
            ) from None
        except OSError as e:  # e.g. a cluster filesystem mounted without flock support
            os.close(fd)
            raise StartupError(
                f"STATE_DIR={str(self.s.state_dir)!r} cannot be locked ({e.strerror}): use a local directory"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd
        self._stack.callback(self._unlock)

    # ---- cleanups, registered on the exit stack as their parts start ---------------------------

    def _unlock(self) -> None:
        """Last: we own STATE_DIR until here, so the final state is ours to record."""
        self.announce.publish_status()
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _close_gpu(self) -> None:
        if self.gpu is not None:  # None again when no GPU was listed
            self.gpu.close()

    def _cancel_pending(self) -> None:
        """Timers, release confirmations (their NVML wait ends on _exiting) and background lookups."""
        self.timers.cancel_all()
        self._exiting.set()
        for task in list(self._tasks):
            task.cancel()

    @staticmethod
    def _remove_signal_handlers(loop: asyncio.AbstractEventLoop) -> None:
        for sig in (*SHUTDOWN_SIGNALS, signal.SIGUSR1):
            loop.remove_signal_handler(sig)

    @staticmethod
    async def _close_notifier(notifier: Notifier, task: asyncio.Task[None]) -> None:
        await notifier.close(NOTIFY_FLUSH_TIMEOUT)
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(task, 1.0)

    @staticmethod
    async def _close_webhooks(webhooks: Webhooks, task: asyncio.Task[None]) -> None:
        await webhooks.close(WEBHOOK_FLUSH_TIMEOUT)
        with contextlib.suppress(asyncio.CancelledError, TimeoutError, Exception):
            await asyncio.wait_for(task, 1.0)

    def _on_supervisor_crash(self, exc: BaseException) -> None:
        # A bug in supervision: its processes were SIGKILLed; stop the daemon rather than pretend.
        self._exit_code = 1
        self._exit.set()

    async def _watchdog_pings(self, usec: float) -> None:
        while True:  # runs on the event loop, so a stuck loop stops the pings and systemd notices
            self.sd.notify("WATCHDOG=1")
            await asyncio.sleep(usec / 2)

    # ---- inputs --------------------------------------------------------------------------------

    async def reload_catalog(self) -> dict[str, Any]:
        """Read MODELS again and use it from now on. The serving model keeps running (a changed
        definition applies at its next start). On any problem the old catalog stays: CatalogError.
        The file is read in a thread: a slow filesystem never stalls the loop that carries out yields."""
        new = await asyncio.to_thread(load_catalog, self.s)
        old = self.catalog
        active = self.state.model.name
        kept = new.resolve(active)
        if kept is None or kept.name != active:
            raise CatalogError(
                f"MODELS {new.source}: model {active!r} serves now and is not in it: swap to another model first"
            )
        self.catalog = new
        if self.coord is not None:
            self.coord.catalog = new
        self._names = None  # the gateway's names are made again from the new catalog
        if self.watch is not None:
            self.watch.set_targets(dict(new.hosts), targets(new.hosts.values(), new.entries))
        if self.services is not None:
            self.services.sync(new.entries)
        before = {e.name: e for e in old.entries} if old is not None else {}
        after = {e.name: e for e in new.entries}
        summary = {
            "source": new.source,
            "models": list(after),
            "added": sorted(set(after) - set(before)),
            "removed": sorted(set(before) - set(after)),
            "changed": sorted(n for n in set(after) & set(before) if after[n] != before[n]),
            "hosts": list(new.hosts),
        }
        log.info(
            "catalog reloaded from %s: %d model(s); added %s; removed %s; changed %s",
            new.source,
            len(after),
            ", ".join(summary["added"]) or "none",
            ", ".join(summary["removed"]) or "none",
            ", ".join(summary["changed"]) or "none",
        )
        asyncio.get_running_loop().call_soon(self.announce.publish_status)
        return summary

    async def add_model(self, item: dict[str, Any]) -> dict[str, Any]:
        """POST /api/models: the entry goes into MODELS (a YAML file), then the catalog is reloaded."""
        path = Path(self.s.models).expanduser() if self.s.models else None
        if path is None or not path.is_file():
            where = f"MODELS={self.s.models!r} is a directory of profiles" if path else "there is no MODELS file"
            raise CoordError(409, "catalog_not_writable", f"{where}: add the model to the catalog by hand")
        assert self.catalog is not None
        name = item.get("name")
        if isinstance(name, str) and self.catalog.resolve(name) is not None:
            raise CoordError(409, "model_exists", f"{name!r} is a name (or alias) in the catalog already")
        async with self._catalog_mu:
            await asyncio.to_thread(add_to_file, path, item, catalog_defaults(self.s))
            summary = await self.reload_catalog()
        e = self.entry(str(name))
        log.info("model %s added to %s (the previous file is %s.bak)", e.name, path, path.name)
        return {"added": e.name, "entry": e.public(), "reload": summary, "backup": str(path) + ".bak"}

    def _reload_on_signal(self) -> None:
        log.info("SIGUSR1 received: reloading the catalog")
        self._background(self._reload_logged())

    async def _reload_logged(self) -> None:
        try:
            await self.reload_catalog()
        except CatalogError as e:
            for line in str(e).splitlines():
                log.error("catalog not reloaded: %s", line)

    def _on_signal(self, sig: signal.Signals) -> None:
        now = time.monotonic()
        if self._shutdown_signals and now - self._first_signal_at < DUPLICATE_SIGNAL_S:
            # One event delivered twice (a plain scancel signals the batch shell, whose trap has
            # Slurm signal the step too): not a person asking to hurry.
            log.info(
                "%s again %.0f ms later: the same request, ignored", sig.name, (now - self._first_signal_at) * 1000
            )
            return
        self._shutdown_signals += 1
        if self._shutdown_signals > 1:
            log.warning("%s again: skipping the grace period, killing now", sig.name)
            for child in (self.model, self.tunnel):
                if child is not None:
                    child.hurry()
            for svc in self.services.by_name.values() if self.services is not None else ():
                svc.child.hurry()
            return
        self._first_signal_at = now
        log.info("%s received: stopping", sig.name)
        self.sd.notify("STOPPING=1")
        self._handle(Shutdown(sig.name))

    def _on_detect(self, sig: Signal) -> None:
        if isinstance(sig, JobSeen):
            self._handle(PolicyJobSeen(sig.job, sig.age_ms), detected_at=sig.at)
            if self.scontrol is not None:  # under YIELD_ON=overlap the job's GPUs decide
                self._seen[sig.job] = (sig.at, sig.age_ms)
                self._background(self._lookup(sig.job))
            # Logged after the kill: a slow log sink (a full pipe, journald) must never delay a yield.
            age = f"{sig.age_ms:.1f} ms after its cgroup appeared" if sig.age_ms is not None else "(age unknown)"
            asyncio.get_running_loop().call_soon(log.info, "job %s seen %s", sig.job, age)
        elif isinstance(sig, DetectorFailed):
            self._handle(PolicyDetectorFailed(sig.detail))
        elif isinstance(sig, JobGone):
            log.info("job %s gone", sig.job)
            self._seen.pop(sig.job, None)
            if self.scontrol is not None:
                self.scontrol.forget(sig.job)
            self._handle(PolicyJobGone(sig.job))

    async def _lookup(self, job: str) -> None:
        assert self.scontrol is not None
        try:
            gpus = await self.scontrol.job_gpus(job)
        except Exception:  # a bug in parsing must not leave the job "being looked up" for ever
            log.exception("job %s: looking up its GPUs failed; counting them as unknown", job)
            gpus = None
        at, age = self._seen.get(job, (None, None))
        lookup_ms = (time.monotonic() - at) * 1000 if at is not None else None
        self._handle(JobGpus(job, gpus, age, lookup_ms), detected_at=at)
        where = "GPUs unknown" if gpus is None else f"GPU {_ids(gpus)}" if gpus else "no GPUs"
        log.info("job %s: %s (ours: %s)", job, where, _ids(self.state.gpus))

    def _on_gpu_busy(self, busy: frozenset[int], procs: list[GpuProcess]) -> None:
        detail = ", ".join(f"pid {p.pid} on GPU {p.minor}" for p in procs[:4])
        self._handle(GpuBusy(busy, detail))
        if busy:
            log.info("foreign GPU process(es): %s", detail)
        else:
            log.info("no foreign GPU processes on GPUs we watch")

    def _on_activity(self) -> None:
        self._handle(Activity())

    def _background(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _confirm_released(self, run: int, gpus: frozenset[int], pids: set[int], since: float) -> None:
        """After a yield: NVML must show none of our processes on our GPUs (the driver frees a dead
        process's memory asynchronously, and an orphan outside our tree would hold it forever)."""
        assert self.gpu is not None
        timeout = self.s.gpu_release_timeout
        try:
            _, still = await asyncio.to_thread(wait_released, self.gpu, pids, gpus, timeout, cancel=self._exiting)
        except GpuError as e:
            log.warning("GPU: cannot confirm that our GPU memory is free: %s", e)
            self._handle(GpusReleased(run, None))
            return
        ms = (time.monotonic() - since) * 1000
        if still:
            log.error("GPU memory still held by our process(es) %s", ", ".join(str(p.pid) for p in still))
        else:
            log.info("GPU %s: none of our processes left (%.0f ms after detection)", _ids(gpus), ms)
        self._handle(GpusReleased(run, ms, len(still)))

    def _on_child(self, ev: ChildEvent) -> None:
        if ev.name == "model" and isinstance(ev, ChildChanged | ChildReady) and self.model is not None:
            self._recent_pids = frozenset(self.model.pids)  # if it crashes, these were ours
        if isinstance(ev, ChildChanged):
            self.announce.publish_status()
            return
        if ev.name == "tunnel":
            if self.tunnel is not None:
                self.tunnel.on_event(ev)
            return
        match ev:
            case ChildReady(run=run) if run == self.state.run:
                self._handle(ModelReady())
            case ChildExited(code=code, run=run, why=why, tail=tail):
                if tail:
                    log.warning("last lines of the model's output:\n  %s", "\n  ".join(tail[-8:]))
                self._handle(ModelExited(code, run, self._exit_why(why, code, tail)))
            case ChildHung(run=run, why=why):
                self._handle(ModelHung(run, why))
            case ChildStopped(result=r):
                start = self._release_since = self._yield_detected_at or r.requested_at
                self._handle(StopDone((r.finished_at - start) * 1000, r.survivors))
                if self.state.phase is not Phase.YIELDING:  # that was the yield's own stop
                    self._yield_detected_at = None

    # ---- the one place decisions are made and carried out --------------------------------------

    def _handle(self, event: Event, *, detected_at: float | None = None) -> None:
        before = self.state
        d: Decision = decide(before, event, time.monotonic(), self.limits, self.rng.random())
        self.state = d.state
        notices: list[Notify] = []
        updates: list[SwapUpdate] = []
        for action in d.actions:  # kills and starts first: everything else is after the fact
            match action:
                case StopModel(reason=reason):
                    if reason == "yield":
                        self._yield_detected_at = detected_at
                    assert self.model is not None
                    self.model.stop()
                    self._recent_pids = frozenset(self.model.pids)  # asked after the stop: costs the kill nothing
                case StartModel(run=run, gpus=gpus, model=name):
                    assert self.model is not None
                    self._internal_key = secrets.token_urlsafe(32)  # a fresh key for every run
                    env = {"VLLM_API_KEY": self._internal_key}
                    if self.entry(name).remote is None:
                        env.update(self.gpu_plan.cuda_env(gpus))
                    self._choose_address(name)
                    self.model.start(run, env, self._model_spec(name))
                case SetTimer(name=name, delay=delay, token=token):
                    self.timers.arm(name, delay, functools.partial(self._handle, TimerFired(name, token)))
                case Notify():
                    notices.append(action)
                case SwapUpdate():
                    updates.append(action)
                case AbortStreams():  # open streams end now, with an error event
                    if self.gateway is not None:
                        self.gateway.model_down()
                case SetTunnel(up=up):
                    if self.tunnel is not None:
                        self.tunnel.want(up)
                case WatchActivity(on=True) if self.activity is not None:
                    self.activity.start()
                case WatchActivity(on=False) if self.activity is not None:
                    self.activity.stop()
                case ConfirmRelease(run=run, gpus=gpus):
                    since, pids = self._release_since, set(self._recent_pids)
                    self._background(self._confirm_released(run, gpus, pids, since))
                case Exit(code=code):
                    self._exit_code = code
                    self._exit.set()
        # call_soon: runs after the child owner's wake-up that was queued above, so logs, status
        # files and notifications never delay a kill.
        loop = asyncio.get_running_loop()
        if updates:
            loop.call_soon(self.announce.swap_updates, updates)
        if d.state != before or notices:
            loop.call_soon(self.announce.decided, before, d, notices)
            if self.on_demand is not None:
                loop.call_soon(self.on_demand.pulse)

    @staticmethod
    def _wall(mono: float) -> float:
        return mono + time.time() - time.monotonic()


def _unlink(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def _discard(_: object) -> None:
    return None


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


async def serve(settings: Settings) -> int:
    return await Daemon(settings).run()
