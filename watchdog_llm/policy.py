"""The daemon's state machine, as a pure function: `decide(state, event, now) -> Decision`.

No I/O, no clocks, no randomness: the caller passes `now` and a jitter value, and carries out
the returned actions in order. Every transition is named in `decide` and tested without processes.

Phases
  init        before the first detector scan
  starting    model launched, waiting for readiness
  serving     model answers its health check
  yielding    a job (or a foreign GPU process) needs our GPUs; the model tree is being stopped
  yielded     stopped; what blocks a start is still there (jobs, busy GPUs, too few free GPUs)
  cooldown    no job any more; waiting RESUME_COOLDOWN before starting again
  backoff     the model crashed; waiting before a restart
  failed      too many fast failures in a row; stays down until restarted by a person
  stopping    the daemon is shutting down (a signal, or an idle release); the model tree is being stopped
  stopped     terminal

GPU awareness (optional: `Limits.all_gpus` or `Limits.fixed_gpus` set). GPUs are named by their
physical id, the number Slurm's GRES IDX uses (/dev/nvidia<N>). A job's GPUs come in after the job
(`JobGpus`, from scontrol); until then it is "pending" and blocks only a start. Under
`yield_on="overlap"` a running model yields only to a job whose GPUs overlap ours, to a job whose GPUs
cannot be known, or to a foreign compute process on one of our GPUs (`GpuBusy`). Without GPU
awareness, or under `yield_on="any"`, every job is a conflict, as before.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum

from watchdog_llm.config import format_ids as _ids
from watchdog_llm.detect.scontrol import job_id_of
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
    # GPU awareness. all_gpus: every GPU of the node we may choose from (None: unknown). fixed_gpus:
    # ours are given (Slurm allocated them, or GPU_IDS), never chosen. Neither: jobs always conflict.
    yield_on: str = "any"  # "any" | "overlap"
    num_gpus: int = 1
    all_gpus: frozenset[int] | None = None
    fixed_gpus: frozenset[int] | None = None
    confirm_gpus: bool = False  # a yield's notice waits for GpusReleased (NVML confirms our memory is freed)
    idle_release_after: float = 0.0  # serving with no request this long: stop and exit 0 (0: never)
    own_job: str | None = None  # we run inside this Slurm job: a shutdown signal is its end (preemption)
    # A job whose GPUs cannot be read: a conflict, to be safe, unless Slurm allocated ours to us (it
    # never gives them to another job then, and PrivateData hides every other user's job).
    unknown_conflicts: bool = True

    @property
    def gpu_aware(self) -> bool:
        return self.all_gpus is not None or self.fixed_gpus is not None


# ---- events (inputs) ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Startup:
    jobs: frozenset[str]  # jobs present when detection started (their GPUs come as JobGpus, before this)


@dataclass(frozen=True, slots=True)
class JobSeen:
    job: str
    detect_ms: float | None = None  # how long the job's cgroup existed before we saw it, if known


@dataclass(frozen=True, slots=True)
class JobGone:
    job: str


@dataclass(frozen=True, slots=True)
class JobGpus:
    job: str
    gpus: frozenset[int] | None  # Slurm's GRES IDX of the job on this node; None: cannot be known
    detect_ms: float | None = None  # the job's JobSeen.detect_ms, carried to the yield it may cause
    lookup_ms: float | None = None  # JobSeen -> this answer (scontrol's time, on the yield path)


@dataclass(frozen=True, slots=True)
class GpuBusy:
    gpus: frozenset[int]  # GPUs that hold a compute process not of our tree (all of them, not a delta)
    detail: str = ""  # e.g. "pid 4242 on GPU 3", for people


@dataclass(frozen=True, slots=True)
class GpusReleased:
    run: int  # the run that was yielded: a late answer about an earlier yield is not this one's
    ms: float | None  # yield detected -> NVML shows none of our processes on our GPUs; None: NVML failed
    holders: int = 0  # our processes still on the GPUs when the confirmation gave up


@dataclass(frozen=True, slots=True)
class Activity:
    pass  # the model served a request recently


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


Event = (
    Startup
    | JobSeen
    | JobGone
    | JobGpus
    | GpuBusy
    | GpusReleased
    | Activity
    | ModelReady
    | ModelExited
    | StopDone
    | TimerFired
    | Shutdown
)


# ---- actions (outputs) -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StartModel:
    run: int
    gpus: frozenset[int] | None = None  # physical GPU ids to use; None: leave the choice to the environment


@dataclass(frozen=True, slots=True)
class StopModel:
    reason: str  # "yield" | "shutdown" | "startup-timeout" | "idle"


@dataclass(frozen=True, slots=True)
class SetTimer:
    name: str
    delay: float
    token: int


@dataclass(frozen=True, slots=True)
class Notify:
    kind: str  # online | yielded | resumed | crashed | failed | stopped | preempted | released
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
    job: str  # the job we yielded to; "" when a foreign GPU process was the cause
    detected_at: float
    detect_ms: float | None = None
    stop_ms: float | None = None
    survivors: int = 0
    cause: str = ""  # for people: "Slurm job 7 on GPU 3", "a foreign process on GPU 3 (pid 4242 ...)"
    lookup_ms: float | None = None  # job seen -> its GPUs known (YIELD_ON=overlap)
    gpus: tuple[int, ...] = ()  # our GPUs that were given back
    gpu_release_ms: float | None = None  # detection -> NVML shows our GPU memory freed
    gpu_holders: int = 0  # our processes still on the GPUs when confirmation gave up
    run: int = 0  # the run that was stopped


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
    job_gpus: Mapping[str, frozenset[int] | None] = field(default_factory=dict)  # looked-up jobs only
    busy: frozenset[int] = frozenset()  # GPUs with a foreign compute process
    busy_detail: str = ""
    gpus: frozenset[int] = frozenset()  # ours: of the current run, or the last one
    served_s: float = 0.0  # total time serving, over all runs
    last_activity: float = 0.0
    awaiting_release: bool = False  # a yield's notice waits for GpusReleased
    ending: str = ""  # why the daemon stops: "signal" | "idle"
    unsent: tuple[YieldRecord, ...] = ()  # yields whose confirmation a later yield overtook
    cooldown_over: bool = False  # the cooldown ran out while a job's GPUs were still being looked up


@dataclass(frozen=True, slots=True)
class Decision:
    state: State
    actions: tuple[Action, ...] = ()


class TransitionError(RuntimeError):
    """An event arrived in a phase that cannot accept it (a bug, not a runtime condition)."""


def _to(state: State, phase: Phase, now: float, reason: str, **kw: object) -> State:
    if state.phase is Phase.SERVING and phase is not Phase.SERVING:
        kw.setdefault("served_s", served(state, now))
    return replace(state, phase=phase, since=now, reason=reason, **kw)  # type: ignore[arg-type]


def served(state: State, now: float) -> float:
    """Seconds spent serving over all runs, the current one included."""
    if state.phase is Phase.SERVING and state.serving_since is not None:
        return state.served_s + max(0.0, now - state.serving_since)
    return state.served_s


def _overlap(limits: Limits) -> bool:
    return limits.yield_on == "overlap" and limits.gpu_aware


def _conflict(state: State, limits: Limits, trigger: str) -> tuple[str, str] | None:
    """(job, cause) when the running model must give its GPUs back now; None when nothing conflicts."""
    if not _overlap(limits):
        if state.jobs:
            job = trigger if trigger in state.jobs else min(state.jobs)
            return job, f"job {job}"
    else:
        for job in sorted(state.jobs):
            if job not in state.job_gpus:
                continue  # being looked up: the model keeps serving until we know
            gpus = state.job_gpus[job]
            if gpus is None:
                if not limits.unknown_conflicts:
                    continue
                return job, f"Slurm job {job_id_of(job)} (its GPUs cannot be known)"
            if gpus & state.gpus:
                return job, f"Slurm job {job_id_of(job)} on GPU {_ids(gpus & state.gpus)}"
    if limits.gpu_aware and state.busy & state.gpus:
        detail = f" ({state.busy_detail})" if state.busy_detail else ""
        return "", f"a foreign process on GPU {_ids(state.busy & state.gpus)}{detail}"
    return None


def _pending(state: State) -> list[str]:
    """Jobs whose GPUs are still being looked up."""
    return sorted(state.jobs - state.job_gpus.keys())


def plan_gpus(state: State, limits: Limits, *, ignore_pending: bool = False) -> frozenset[int] | str:
    """The GPUs the next start uses (highest free ids first: Slurm allocates low ones first),
    or why the model cannot start now. `ignore_pending`: judge only the jobs already looked up."""
    if state.jobs and not _overlap(limits):
        return _blocked_reason(state.jobs)
    pending = _pending(state)
    if pending and not ignore_pending:
        return "looking up the GPUs of Slurm job(s) " + ", ".join(pending)
    state = replace(state, jobs=state.jobs - set(pending))
    unknown = sorted(j for j in state.jobs if state.job_gpus[j] is None) if limits.unknown_conflicts else []
    if unknown:
        return _blocked_reason(frozenset(unknown)) + " (their GPUs cannot be known)"
    if not limits.gpu_aware:
        return frozenset()
    users = {j: g for j in sorted(state.jobs) if (g := state.job_gpus[j])}
    taken = frozenset().union(*users.values()) | state.busy
    who = [f"{j} on GPU {_ids(g)}" for j, g in users.items()]
    if state.busy:
        who.append(f"a foreign process on GPU {_ids(state.busy)}")
    if limits.fixed_gpus is not None:
        if clash := limits.fixed_gpus & taken:
            return f"our GPU {_ids(clash)} in use: " + "; ".join(who)
        return limits.fixed_gpus
    assert limits.all_gpus is not None
    free = sorted(limits.all_gpus - taken)
    if len(free) < limits.num_gpus:
        return f"{len(free)} free GPU(s), {limits.num_gpus} needed: " + "; ".join(who)
    return frozenset(free[len(free) - limits.num_gpus :])


def _start(state: State, now: float, limits: Limits, reason: str) -> Decision:
    gpus = plan_gpus(state, limits)
    if isinstance(gpus, str):  # something arrived that blocks a start: wait for it to go
        token = state.timer_token + 1  # any pending start timer is now stale
        return Decision(_to(state, Phase.YIELDED, now, gpus, timer_token=token))
    run = state.run + 1
    token = state.timer_token + 1
    new = _to(state, Phase.STARTING, now, reason, run=run, started_at=now, timer_token=token, gpus=gpus)
    start = StartModel(run, gpus if limits.gpu_aware else None)
    return Decision(new, (start, SetTimer("startup", limits.startup_timeout, token)))


def _cooldown(state: State, now: float, limits: Limits) -> Decision:
    token = state.timer_token + 1
    reason = "node idle; waiting before serving again"
    new = _to(state, Phase.COOLDOWN, now, reason, timer_token=token, cooldown_over=False)
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
            return _shutdown(state, now, why, limits)
        case Startup(jobs=jobs):
            if p is not Phase.INIT:
                raise TransitionError(f"startup in {p}")
            state = replace(state, jobs=state.jobs | jobs, down_since=now)
            return _start(state, now, limits, "node idle at start-up")
        case JobSeen(job=job, detect_ms=detect_ms):
            return _reconcile(replace(state, jobs=state.jobs | {job}), now, limits, job, detect_ms)
        case JobGone(job=job):
            known = {j: g for j, g in state.job_gpus.items() if j != job}
            return _reconcile(replace(state, jobs=state.jobs - {job}, job_gpus=known), now, limits)
        case JobGpus(job=job, gpus=gpus, detect_ms=detect_ms, lookup_ms=lookup_ms):
            if job not in state.jobs:
                return Decision(state)  # the job ended before its lookup did
            state = replace(state, job_gpus={**state.job_gpus, job: gpus})
            return _reconcile(state, now, limits, job, detect_ms, lookup_ms)
        case GpuBusy(gpus=gpus, detail=detail):
            return _reconcile(replace(state, busy=gpus, busy_detail=detail), now, limits)
        case GpusReleased(run=run, ms=ms, holders=holders):
            return _released(state, run, ms, holders)
        case Activity():
            return Decision(replace(state, last_activity=now))
        case ModelReady():
            if p is not Phase.STARTING:
                return Decision(state)  # late readiness of a run we already stopped
            return _ready(state, now, limits)
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


def _ready(state: State, now: float, limits: Limits) -> Decision:
    was_down = state.down_since
    new = _to(state, Phase.SERVING, now, "serving", serving_since=now, down_since=None, last_activity=now)
    body = "model is online"
    if was_down is not None and state.last_yield is not None:
        body = f"resumed after {now - was_down:.0f} s down"
    kind = "resumed" if state.last_yield is not None else "online"
    actions: tuple[Action, ...] = (Notify(kind, "model online", body, "low"),)
    if limits.idle_release_after > 0:
        new = replace(new, timer_token=new.timer_token + 1)
        actions += (SetTimer("idle", limits.idle_release_after, new.timer_token),)
    return Decision(new, actions)


def _reconcile(
    state: State,
    now: float,
    limits: Limits,
    trigger: str = "",
    detect_ms: float | None = None,
    lookup_ms: float | None = None,
) -> Decision:
    """Facts changed (jobs, their GPUs, busy GPUs): yield, wait, or get ready to start again."""
    p = state.phase
    if p in MODEL_RUNNING:
        hit = _conflict(state, limits, trigger)
        if hit is None:
            return Decision(state)
        job, cause = hit
        if p is Phase.SERVING and now - state.started_at >= limits.min_uptime:
            state = replace(state, fast_failures=0)  # a healthy run ends the row of fast failures
        # A conflict during start-up yields too: the model may already hold GPU memory.
        ours = job == trigger  # the event that brought the conflict is about this job
        lookup = lookup_ms if ours else None
        rec = YieldRecord(
            job=job,
            detected_at=now - (lookup or 0.0) / 1000,  # when the job was seen, not when scontrol answered
            detect_ms=detect_ms if ours else None,
            cause=cause,
            gpus=tuple(sorted(state.gpus)),
            lookup_ms=lookup,
            run=state.run,
        )
        if state.awaiting_release and state.last_yield is not None:  # its notice goes out with this one's
            state = replace(state, unsent=(*state.unsent, state.last_yield), awaiting_release=False)
        reason = "GPUs reclaimed by " + cause if _overlap(limits) else _blocked_reason(state.jobs)
        new = _to(state, Phase.YIELDING, now, reason, last_yield=rec)
        if p is Phase.SERVING:
            new = replace(new, down_since=now)
        return Decision(new, (StopModel("yield"),))
    if p in (Phase.COOLDOWN, Phase.BACKOFF, Phase.YIELDED):
        # A job still being looked up does not interrupt a cooldown (it would restart it from
        # zero when its GPUs turn out to be others'): the start itself waits for the lookup.
        gpus = plan_gpus(state, limits, ignore_pending=True)
        if isinstance(gpus, str):
            if p is Phase.YIELDED:
                return Decision(replace(state, reason=gpus))
            # Cancels the pending start: bumping the token makes the old timer stale.
            return Decision(_to(state, Phase.YIELDED, now, gpus, timer_token=state.timer_token + 1))
        if p is Phase.YIELDED:
            return _cooldown(state, now, limits)
        if p is Phase.COOLDOWN and state.cooldown_over and not _pending(state):
            return _start(state, now, limits, "resuming after cooldown")
    return Decision(state)  # yielding/failed/stopping/init: just remember


def _crashed(state: State, code: int | None, why: str, now: float, limits: Limits, jitter: float) -> Decision:
    fast = now - state.started_at < limits.min_uptime or state.phase is Phase.STARTING
    failures = state.fast_failures + 1 if fast else 1
    down = state.down_since if state.down_since is not None else now
    state = replace(state, last_exit=code, fast_failures=failures, down_since=down)
    what = f"model {why}" if why else (f"model exited with code {code}" if code is not None else "model exited")
    if failures >= limits.restart_limit:
        body = f"{what}; {failures} fast failures in a row, giving up until restarted"
        new = _to(state, Phase.FAILED, now, body, serving_since=None)
        return Decision(new, (Notify("failed", "model failed", body, "high"),))
    delay = backoff_delay(failures - 1, cap=limits.restart_backoff_max, jitter=jitter)
    token = state.timer_token + 1
    body = f"{what}; restarting in {delay:.1f} s (attempt {failures} of {limits.restart_limit})"
    new = _to(state, Phase.BACKOFF, now, body, timer_token=token, serving_since=None)
    return Decision(new, (Notify("crashed", "model crashed", body, "high"), SetTimer("backoff", delay, token)))


def _stop_done(state: State, ms: float, survivors: int, now: float, limits: Limits) -> Decision:
    p = state.phase
    if p is Phase.STOPPING:
        new = _to(state, Phase.STOPPED, now, state.reason, serving_since=None, exit_code=0)
        return Decision(new, (*_unconfirmed(state), _final_notice(state, now, limits, ms), Exit(0)))
    if p is Phase.YIELDING:
        rec = state.last_yield
        if rec is not None:
            rec = replace(rec, stop_ms=ms, survivors=survivors)
        earlier = tuple(_yield_notice(r) for r in state.unsent)
        state = replace(state, last_yield=rec, serving_since=None, awaiting_release=limits.confirm_gpus, unsent=())
        notices: tuple[Action, ...] = earlier if limits.confirm_gpus else (*earlier, _yield_notice(rec))
        gpus = plan_gpus(state, limits)
        if isinstance(gpus, str):
            return Decision(_to(state, Phase.YIELDED, now, gpus), notices)
        # What we yielded to left while we were stopping.
        d = _cooldown(state, now, limits)
        return Decision(d.state, (*notices, *d.actions))
    return Decision(state)  # the stop of a failed start-up: nothing more to do


def _released(state: State, run: int, ms: float | None, holders: int) -> Decision:
    rec = state.last_yield
    if not state.awaiting_release or rec is None or rec.run != run:
        return Decision(state)  # not awaited, or about an earlier yield whose notice already went out
    rec = replace(rec, gpu_release_ms=ms, gpu_holders=holders)
    return Decision(replace(state, last_yield=rec, awaiting_release=False), (_yield_notice(rec),))


def _unconfirmed(state: State) -> tuple[Notify, ...]:
    """Yield notices still waiting for NVML when the daemon stops: sent as they are."""
    recs = (*state.unsent, *((state.last_yield,) if state.awaiting_release and state.last_yield else ()))
    return tuple(_yield_notice(r) for r in recs)


def _yield_notice(rec: YieldRecord | None) -> Notify:
    if rec is None:
        return Notify("yielded", "GPUs yielded", "model stopped for a Slurm job", "default")
    parts = [rec.cause or f"job {rec.job}"]
    if rec.detect_ms is not None:
        parts.append(f"detected {rec.detect_ms:.1f} ms after its cgroup appeared")
    if rec.lookup_ms is not None:
        parts.append(f"its GPUs read from scontrol in {rec.lookup_ms:.0f} ms")
    if rec.stop_ms is not None:
        parts.append(f"model tree gone {rec.stop_ms:.0f} ms after detection")
    if rec.gpu_release_ms is not None:
        parts.append(f"GPU {_ids(frozenset(rec.gpus))} memory free {rec.gpu_release_ms:.0f} ms after detection")
    if rec.survivors:
        parts.append(f"{rec.survivors} process(es) could not be killed")
    if rec.gpu_holders:
        parts.append(f"{rec.gpu_holders} process(es) of ours still hold GPU memory")
    priority = "high" if rec.survivors or rec.gpu_holders else "default"
    return Notify("yielded", "GPUs yielded", "; ".join(parts), priority)


def _final_notice(state: State, now: float, limits: Limits, ms: float | None) -> Notify:
    """The last word: stopped by a person, preempted by Slurm, or released for lack of use."""
    gone = f"; model tree gone in {ms:.0f} ms" if ms is not None else ""
    hours = _duration(served(state, now))
    if state.ending == "idle":
        body = f"{state.reason}; served {hours} in all{gone}; exiting"
        return Notify("released", "GPUs released (idle)", body, "low")
    if limits.own_job:
        body = (
            f"Slurm job {limits.own_job} is ending ({state.reason}: preemption, scancel or time limit); "
            f"served {hours}{gone}; exiting 0 so a requeue starts it cleanly"
        )
        return Notify("preempted", f"preempted: job {limits.own_job}", body, "default")
    return Notify("stopped", "watchdog-llm stopped", f"stopped ({state.reason}){gone}", "low")


def _duration(s: float) -> str:
    if s < 60:
        return f"{s:.0f} s"
    if s < 3600:
        return f"{s / 60:.0f} min"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def _timer(state: State, name: str, now: float, limits: Limits, jitter: float) -> Decision:
    p = state.phase
    if name == "cooldown" and p is Phase.COOLDOWN:
        if pending := _pending(state):  # start once the lookup answers (see _reconcile)
            reason = "looking up the GPUs of Slurm job(s) " + ", ".join(pending)
            return Decision(replace(state, cooldown_over=True, reason=reason))
        return _start(state, now, limits, "resuming after cooldown")
    if name == "backoff" and p is Phase.BACKOFF:
        return _start(state, now, limits, "restarting after crash")
    if name == "startup" and p is Phase.STARTING:
        # Never got ready: stop it and count a failure; the stop's ModelExited is ignored (not running).
        body = f"model not ready after {limits.startup_timeout:.0f} s"
        return _startup_timeout(state, now, limits, body, jitter)
    if name == "idle" and p is Phase.SERVING:
        return _idle(state, now, limits)
    return Decision(state)


def _idle(state: State, now: float, limits: Limits) -> Decision:
    left = state.last_activity + limits.idle_release_after - now
    token = state.timer_token + 1
    if left > 0:  # used since the timer was set: look again when the quiet period could end
        return Decision(replace(state, timer_token=token), (SetTimer("idle", left, token),))
    reason = f"no request for {_duration(limits.idle_release_after)}: releasing the GPUs"
    new = _to(state, Phase.STOPPING, now, reason, timer_token=token, ending="idle")
    return Decision(new, (StopModel("idle"),))


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


def _shutdown(state: State, now: float, why: str, limits: Limits) -> Decision:
    p = state.phase
    if p is Phase.STOPPED or (p is Phase.STOPPING and state.ending != "idle"):
        return Decision(state)
    token = state.timer_token + 1
    reason = f"{why} received"
    if p is Phase.STOPPING:  # a signal during an idle release: it ends as the signal says
        return Decision(_to(state, Phase.STOPPING, now, reason, ending="signal"))
    if p in MODEL_RUNNING or p in MODEL_STOPPING or state.stops_pending:
        # A stop in progress (a yield's, or a failed start's) still runs to completion: wait for it.
        new = _to(state, Phase.STOPPING, now, reason, timer_token=token, ending="signal")
        actions: tuple[Action, ...] = (StopModel("shutdown"),) if p in MODEL_RUNNING else ()
        return Decision(new, actions)
    new = _to(state, Phase.STOPPED, now, reason, timer_token=token, exit_code=0, ending="signal")
    return Decision(new, (*_unconfirmed(state), _final_notice(new, now, limits, None), Exit(0)))
