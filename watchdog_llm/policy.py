"""The daemon's state machine, as a pure function: `decide(state, event, now) -> Decision`.

No I/O, no clocks, no randomness: the caller passes `now` and a jitter value, and carries out
the returned actions in order. Every transition is named in `decide` and tested without processes.

Phases
  init        before the first detector scan
  starting    model launched, waiting for readiness
  serving     model answers its health check
  yielding    a job appeared; the model tree is being stopped
  yielded     stopped, jobs present
  cooldown    no job any more; waiting RESUME_COOLDOWN before starting again
  backoff     the model crashed; waiting before a restart
  failed      too many fast failures in a row; stays down until restarted by a person
  stopping    the daemon is shutting down; the model tree is being stopped
  stopped     terminal
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum

from watchdog_llm.supervise.backoff import backoff_delay


class Phase(StrEnum):
    INIT = "init"
    STARTING = "starting"
    SERVING = "serving"
    YIELDING = "yielding"
    YIELDED = "yielded"
    COOLDOWN = "cooldown"
    BACKOFF = "backoff"
    FAILED = "failed"
    STOPPING = "stopping"
    STOPPED = "stopped"


# Named groups (Supervisor-style): where a model process may exist, and where we are not serving.
MODEL_RUNNING = frozenset({Phase.STARTING, Phase.SERVING})
MODEL_STOPPING = frozenset({Phase.YIELDING, Phase.STOPPING})
MODEL_DOWN = frozenset({Phase.INIT, Phase.YIELDED, Phase.COOLDOWN, Phase.BACKOFF, Phase.FAILED, Phase.STOPPED})


@dataclass(frozen=True, slots=True)
class Limits:
    resume_cooldown: float
    restart_backoff_max: float
    restart_limit: int
    min_uptime: float
    startup_timeout: float


# ---- events (inputs) ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Startup:
    jobs: frozenset[str]  # jobs present when detection started


@dataclass(frozen=True, slots=True)
class JobSeen:
    job: str
    detect_ms: float | None = None  # how long the job's cgroup existed before we saw it, if known


@dataclass(frozen=True, slots=True)
class JobGone:
    job: str


@dataclass(frozen=True, slots=True)
class ModelReady:
    pass


@dataclass(frozen=True, slots=True)
class ModelExited:
    code: int | None
    run: int  # which start this exit belongs to (ignore stale ones)
    why: str = ""  # e.g. "killed by SIGSEGV", "cannot run vllm: No such file or directory"


@dataclass(frozen=True, slots=True)
class StopDone:
    elapsed_ms: float  # stop request -> whole tree gone
    survivors: int  # processes that could not be killed (should be 0)


@dataclass(frozen=True, slots=True)
class TimerFired:
    name: str  # "cooldown" | "backoff" | "startup"
    token: int


@dataclass(frozen=True, slots=True)
class Shutdown:
    reason: str  # e.g. "SIGTERM"


Event = Startup | JobSeen | JobGone | ModelReady | ModelExited | StopDone | TimerFired | Shutdown


# ---- actions (outputs) -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StartModel:
    run: int


@dataclass(frozen=True, slots=True)
class StopModel:
    reason: str  # "yield" | "shutdown" | "startup-timeout"


@dataclass(frozen=True, slots=True)
class SetTimer:
    name: str
    delay: float
    token: int


@dataclass(frozen=True, slots=True)
class Notify:
    kind: str  # online | yielded | resumed | crashed | failed | stopped
    title: str
    body: str
    priority: str = "default"


@dataclass(frozen=True, slots=True)
class Exit:
    code: int


Action = StartModel | StopModel | SetTimer | Notify | Exit


# ---- state -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class YieldRecord:
    job: str
    detected_at: float
    detect_ms: float | None = None
    stop_ms: float | None = None
    survivors: int = 0


@dataclass(frozen=True, slots=True)
class State:
    phase: Phase = Phase.INIT
    since: float = 0.0
    jobs: frozenset[str] = frozenset()
    run: int = 0  # incremented on every model start
    started_at: float = 0.0  # when the current run was started
    serving_since: float | None = None
    down_since: float | None = None  # when serving ended (for "resumed after ...")
    timer_token: int = 0  # a timer is live only while its token matches
    fast_failures: int = 0
    last_exit: int | None = None
    last_yield: YieldRecord | None = None
    reason: str = ""  # why we are in this phase, for people
    exit_code: int | None = None
    stops_pending: int = 0  # StopModel actions whose StopDone has not arrived (they finish in order)


@dataclass(frozen=True, slots=True)
class Decision:
    state: State
    actions: tuple[Action, ...] = ()


class TransitionError(RuntimeError):
    """An event arrived in a phase that cannot accept it (a bug, not a runtime condition)."""


def _to(state: State, phase: Phase, now: float, reason: str, **kw: object) -> State:
    return replace(state, phase=phase, since=now, reason=reason, **kw)  # type: ignore[arg-type]


def _start(state: State, now: float, limits: Limits, reason: str) -> Decision:
    run = state.run + 1
    token = state.timer_token + 1
    new = _to(state, Phase.STARTING, now, reason, run=run, started_at=now, timer_token=token)
    return Decision(new, (StartModel(run), SetTimer("startup", limits.startup_timeout, token)))


def _cooldown(state: State, now: float, limits: Limits) -> Decision:
    token = state.timer_token + 1
    new = _to(state, Phase.COOLDOWN, now, "node idle; waiting before serving again", timer_token=token)
    return Decision(new, (SetTimer("cooldown", limits.resume_cooldown, token),))


def _blocked_reason(jobs: frozenset[str]) -> str:
    return "GPUs reclaimed by Slurm job(s) " + ", ".join(sorted(jobs))


def decide(state: State, event: Event, now: float, limits: Limits, jitter: float = 0.5) -> Decision:
    """Pure transition function. `jitter` in [0, 1) spreads restart backoff."""
    if isinstance(event, StopDone):
        # Stops complete in the order they were asked for: only the last one ends a yield/shutdown.
        state = replace(state, stops_pending=max(0, state.stops_pending - 1))
        if state.stops_pending:
            return Decision(state)
    d = _decide(state, event, now, limits, jitter)
    stops = sum(isinstance(a, StopModel) for a in d.actions)
    return Decision(replace(d.state, stops_pending=d.state.stops_pending + stops), d.actions) if stops else d


def _decide(state: State, event: Event, now: float, limits: Limits, jitter: float) -> Decision:
    p = state.phase
    match event:
        case Shutdown(reason=why):
            return _shutdown(state, now, why)
        case Startup(jobs=jobs):
            if p is not Phase.INIT:
                raise TransitionError(f"startup in {p}")
            jobs = state.jobs | jobs
            state = replace(state, jobs=jobs, down_since=now)
            if jobs:  # start-up while jobs are present waits
                return Decision(_to(state, Phase.YIELDED, now, _blocked_reason(jobs)))
            return _start(state, now, limits, "node idle at start-up")
        case JobSeen(job=job, detect_ms=detect_ms):
            return _job_seen(state, job, detect_ms, now, limits)
        case JobGone(job=job):
            return _job_gone(state, job, now, limits)
        case ModelReady():
            if p is not Phase.STARTING:
                return Decision(state)  # late readiness of a run we already stopped
            was_down = state.down_since
            new = _to(state, Phase.SERVING, now, "serving", serving_since=now, down_since=None)
            body = "model is online"
            if was_down is not None and state.last_yield is not None:
                body = f"resumed after {now - was_down:.0f} s down"
            kind = "resumed" if state.last_yield is not None else "online"
            return Decision(new, (Notify(kind, "model online", body, "low"),))
        case ModelExited(code=code, run=run, why=why):
            if run != state.run or p not in MODEL_RUNNING:
                return Decision(state)  # exit during a stop we asked for, or of an older run
            return _crashed(state, code, why, now, limits, jitter)
        case StopDone(elapsed_ms=ms, survivors=survivors):
            return _stop_done(state, ms, survivors, now, limits)
        case TimerFired(name=name, token=token):
            if token != state.timer_token:
                return Decision(state)  # superseded timer
            return _timer(state, name, now, limits, jitter)
    raise TransitionError(f"unhandled event {event!r}")  # pragma: no cover


def _job_seen(state: State, job: str, detect_ms: float | None, now: float, limits: Limits) -> Decision:
    jobs = state.jobs | {job}
    p = state.phase
    if p is Phase.SERVING and now - state.started_at >= limits.min_uptime:
        state = replace(state, fast_failures=0)  # a healthy run ends the row of fast failures
    if p in MODEL_RUNNING:
        # A job arriving during start-up yields too: the model may already hold GPU memory.
        rec = YieldRecord(job=job, detected_at=now, detect_ms=detect_ms)
        new = _to(state, Phase.YIELDING, now, _blocked_reason(jobs), jobs=jobs, last_yield=rec)
        if p is Phase.SERVING:
            new = replace(new, down_since=now)
        return Decision(new, (StopModel("yield"),))
    if p in (Phase.COOLDOWN, Phase.BACKOFF):
        # Cancels the pending start: bumping the token makes the old timer stale.
        new = _to(state, Phase.YIELDED, now, _blocked_reason(jobs), jobs=jobs, timer_token=state.timer_token + 1)
        return Decision(new)
    return Decision(replace(state, jobs=jobs))  # yielding/yielded/failed/stopping/init: just remember


def _job_gone(state: State, job: str, now: float, limits: Limits) -> Decision:
    jobs = state.jobs - {job}
    state = replace(state, jobs=jobs)
    if state.phase is Phase.YIELDED and not jobs:
        return _cooldown(state, now, limits)
    if state.phase is Phase.YIELDED:
        return Decision(replace(state, reason=_blocked_reason(jobs)))
    return Decision(state)


def _crashed(state: State, code: int | None, why: str, now: float, limits: Limits, jitter: float) -> Decision:
    fast = now - state.started_at < limits.min_uptime or state.phase is Phase.STARTING
    failures = state.fast_failures + 1 if fast else 1
    down = state.down_since if state.down_since is not None else now
    state = replace(state, last_exit=code, fast_failures=failures, serving_since=None, down_since=down)
    what = f"model {why}" if why else (f"model exited with code {code}" if code is not None else "model exited")
    if failures >= limits.restart_limit:
        body = f"{what}; {failures} fast failures in a row, giving up until restarted"
        new = _to(state, Phase.FAILED, now, body)
        return Decision(new, (Notify("failed", "model failed", body, "high"),))
    delay = backoff_delay(failures - 1, cap=limits.restart_backoff_max, jitter=jitter)
    token = state.timer_token + 1
    body = f"{what}; restarting in {delay:.1f} s (attempt {failures} of {limits.restart_limit})"
    new = _to(state, Phase.BACKOFF, now, body, timer_token=token)
    return Decision(new, (Notify("crashed", "model crashed", body, "high"), SetTimer("backoff", delay, token)))


def _stop_done(state: State, ms: float, survivors: int, now: float, limits: Limits) -> Decision:
    p = state.phase
    if p is Phase.STOPPING:
        new = _to(state, Phase.STOPPED, now, state.reason, serving_since=None, exit_code=0)
        body = f"stopped ({state.reason}); model tree gone in {ms:.0f} ms"
        return Decision(new, (Notify("stopped", "watchdog-llm stopped", body, "low"), Exit(0)))
    if p is Phase.YIELDING:
        rec = state.last_yield
        if rec is not None:
            rec = replace(rec, stop_ms=ms, survivors=survivors)
        state = replace(state, last_yield=rec, serving_since=None)
        notify = _yield_notice(rec)
        if state.jobs:
            return Decision(_to(state, Phase.YIELDED, now, _blocked_reason(state.jobs)), (notify,))
        # The job(s) left while we were stopping.
        d = _cooldown(state, now, limits)
        return Decision(d.state, (notify, *d.actions))
    return Decision(state)  # the stop of a failed start-up: nothing more to do


def _yield_notice(rec: YieldRecord | None) -> Notify:
    if rec is None:
        return Notify("yielded", "GPUs yielded", "model stopped for a Slurm job", "default")
    parts = [f"job {rec.job}"]
    if rec.detect_ms is not None:
        parts.append(f"detected {rec.detect_ms:.1f} ms after its cgroup appeared")
    if rec.stop_ms is not None:
        parts.append(f"model tree gone {rec.stop_ms:.0f} ms after detection")
    if rec.survivors:
        parts.append(f"{rec.survivors} process(es) could not be killed")
    return Notify("yielded", "GPUs yielded", "; ".join(parts), "default")


def _timer(state: State, name: str, now: float, limits: Limits, jitter: float) -> Decision:
    p = state.phase
    if name == "cooldown" and p is Phase.COOLDOWN:
        return _start(state, now, limits, "resuming after cooldown")
    if name == "backoff" and p is Phase.BACKOFF:
        return _start(state, now, limits, "restarting after crash")
    if name == "startup" and p is Phase.STARTING:
        # Never got ready: stop it and count a failure; the stop's ModelExited is ignored (not running).
        body = f"model not ready after {limits.startup_timeout:.0f} s"
        return _startup_timeout(state, now, limits, body, jitter)
    return Decision(state)


def _startup_timeout(state: State, now: float, limits: Limits, body: str, jitter: float) -> Decision:
    failures = state.fast_failures + 1
    token = state.timer_token + 1
    state = replace(state, fast_failures=failures, timer_token=token)
    if failures >= limits.restart_limit:
        new = _to(state, Phase.FAILED, now, body + "; giving up until restarted")
        return Decision(new, (StopModel("startup-timeout"), Notify("failed", "model failed", new.reason, "high")))
    delay = backoff_delay(failures - 1, cap=limits.restart_backoff_max, jitter=jitter)
    new = _to(state, Phase.BACKOFF, now, f"{body}; restarting in {delay:.1f} s")
    return Decision(
        new,
        (
            StopModel("startup-timeout"),
            Notify("crashed", "model start timed out", new.reason, "high"),
            SetTimer("backoff", delay, token),
        ),
    )


def _shutdown(state: State, now: float, why: str) -> Decision:
    p = state.phase
    if p in (Phase.STOPPING, Phase.STOPPED):
        return Decision(state)
    token = state.timer_token + 1
    reason = f"{why} received"
    if p in MODEL_RUNNING or p in MODEL_STOPPING or state.stops_pending:
        # A stop in progress (a yield's, or a failed start's) still runs to completion: wait for it.
        new = _to(state, Phase.STOPPING, now, reason, timer_token=token)
        actions: tuple[Action, ...] = (StopModel("shutdown"),) if p in MODEL_RUNNING else ()
        return Decision(new, actions)
    new = _to(state, Phase.STOPPED, now, reason, timer_token=token, exit_code=0)
    return Decision(new, (Notify("stopped", "watchdog-llm stopped", reason, "low"), Exit(0)))
