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
  backoff     the model crashed, or hung (its tree is being stopped meanwhile); waiting before a restart
  failed      too many fast failures in a row; stays down until restarted by a person
  swapping    a swap asked for another model; the current model tree is being stopped
  stopping    the daemon is shutting down (a signal, or an idle release); the model tree is being stopped
  stopped     terminal

GPU awareness (optional: `Limits.all_gpus` or `Limits.fixed_gpus` set). GPUs are named by their
physical id, the number Slurm's GRES IDX uses (/dev/nvidia<N>). A job's GPUs come in after the job
(`JobGpus`, from scontrol); until then it is "pending" and blocks only a start. Under
`yield_on="overlap"` a running model yields only to a job whose GPUs overlap ours, to a job whose GPUs
cannot be known, or to a foreign compute process on one of our GPUs (`GpuBusy`). Without GPU
awareness, or under `yield_on="any"`, every job is a conflict, as before.

Swaps. `State.model` is the model every start uses. A swap (`SwapRequested`) while a model runs stops
it (phase swapping) and starts the target; while the model is down for a reason that is not ours
(yielded, cooldown, backoff, init) the target is recorded and starts when the node allows (the swap
is "deferred"). A job arriving mid-swap wins: the swap becomes deferred. A target that crashes or is
not ready in time fails the swap, and the model that served before it comes back. Progress goes out
as `SwapUpdate` actions (stopping, starting, deferred, ready, failed).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum

from watchdog_llm.base.backoff import backoff_delay
from watchdog_llm.base.ids import format_ids as _ids
from watchdog_llm.base.ids import job_id_of
from watchdog_llm.base.vocab import Ending, NotifyKind, StopReason, SwapStage, YieldOn


class Phase(StrEnum):
    INIT = "init"
    STARTING = "starting"
    SERVING = "serving"
    YIELDING = "yielding"
    YIELDED = "yielded"
    COOLDOWN = "cooldown"
    BACKOFF = "backoff"
    FAILED = "failed"
    SWAPPING = "swapping"
    STOPPING = "stopping"
    STOPPED = "stopped"


# Named groups (Supervisor-style): where a model process may exist, and where we are not serving.
MODEL_RUNNING = frozenset({Phase.STARTING, Phase.SERVING})
MODEL_STOPPING = frozenset({Phase.YIELDING, Phase.SWAPPING, Phase.STOPPING})
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
    yield_on: YieldOn = YieldOn.ANY  # effective: ANY or OVERLAP (AUTO is resolved before)
    num_gpus: int = 1
    all_gpus: frozenset[int] | None = None
    fixed_gpus: frozenset[int] | None = None
    confirm_gpus: bool = False  # a yield's notice waits for GpusReleased (NVML confirms our memory is freed)
    idle_release_after: float = 0.0  # serving with no request this long: stop and exit 0 (0: never)
    own_job: str | None = None  # we run inside this Slurm job: a shutdown signal is its end (preemption)
    # A job whose GPUs cannot be read: a conflict, to be safe, unless Slurm allocated ours to us (it
    # never gives them to another job then, and PrivateData hides every other user's job).
    unknown_conflicts: bool = True
    # The Cloudflare tunnel: kept up from the first decision to shutdown; with leaves_on_yield
    # (TUNNEL_ON_YIELD=stop) only while serving, so Cloudflare routes to replicas that can answer.
    tunnel: bool = False
    tunnel_leaves_on_yield: bool = False

    @property
    def gpu_aware(self) -> bool:
        return self.all_gpus is not None or self.fixed_gpus is not None


# ---- events (inputs) ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ModelChoice:
    """The model a start uses: its catalog name, and what it needs (None: the Limits' defaults)."""

    name: str = ""
    gpus: int | None = None
    startup_timeout: float | None = None
    remote: bool = False  # runs on another host (LAN controller mode): this node's jobs and GPUs are not its


@dataclass(frozen=True, slots=True)
class SwapRequested:
    id: str
    target: ModelChoice


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
class ModelHung:
    """The serving model failed its liveness checks: it runs, but answers nothing."""

    run: int
    why: str  # e.g. "stopped answering /health (3 checks over 10.0 s: no answer within 3 s)"


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


@dataclass(frozen=True, slots=True)
class DetectorFailed:
    detail: str  # one line: what broke; no job will be seen any more


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
    | ModelHung
    | StopDone
    | TimerFired
    | Shutdown
    | DetectorFailed
    | SwapRequested
)


# ---- actions (outputs) -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StartModel:
    run: int
    gpus: frozenset[int] | None = None  # physical GPU ids to use; None: leave the choice to the environment
    model: str = ""  # the catalog name of the model to start


@dataclass(frozen=True, slots=True)
class StopModel:
    reason: StopReason


@dataclass(frozen=True, slots=True)
class SetTimer:
    name: str
    delay: float
    token: int


@dataclass(frozen=True, slots=True)
class Notify:
    kind: NotifyKind
    title: str
    body: str
    priority: str = "default"


@dataclass(frozen=True, slots=True)
class Exit:
    code: int


@dataclass(frozen=True, slots=True)
class SwapUpdate:
    id: str
    stage: SwapStage
    detail: str


@dataclass(frozen=True, slots=True)
class AbortStreams:
    """Serving ended: the gateway ends its open streams now, each with an error event."""


@dataclass(frozen=True, slots=True)
class SetTunnel:
    """Connect (up) or disconnect the tunnel; its restarts after a crash are its owner's business."""

    up: bool


@dataclass(frozen=True, slots=True)
class ConfirmRelease:
    """A yield's stop is done: ask NVML until none of our processes is on `gpus` (answer: GpusReleased)."""

    run: int
    gpus: frozenset[int]


@dataclass(frozen=True, slots=True)
class WatchActivity:
    """Start (on) or stop the idle probe that reads the model's request counters (IDLE_RELEASE_AFTER)."""

    on: bool


Action = (
    StartModel
    | StopModel
    | SetTimer
    | Notify
    | Exit
    | SwapUpdate
    | AbortStreams
    | SetTunnel
    | ConfirmRelease
    | WatchActivity
)


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
class SwapCtx:
    id: str
    target: ModelChoice
    previous: ModelChoice | None  # what comes back if the target fails; None: nothing worth it
    stage: SwapStage = SwapStage.STOPPING  # the last stage reported


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
    ending: Ending = Ending.NONE  # why the daemon stops
    unsent: tuple[YieldRecord, ...] = ()  # yields whose confirmation a later yield overtook
    cooldown_over: bool = False  # the cooldown ran out while a job's GPUs were still being looked up
    model: ModelChoice = ModelChoice()  # what the next (or current) start uses
    swap: SwapCtx | None = None  # a swap not finished yet


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
    return limits.yield_on is YieldOn.OVERLAP and limits.gpu_aware


def _conflict(state: State, limits: Limits, trigger: str) -> tuple[str, str] | None:
    """(job, cause) when the running model must give its GPUs back now; None when nothing conflicts."""
    if state.model.remote:
        return None
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
    if state.model.remote:
        return frozenset()
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
    need = _need(state, limits)
    if len(free) < need:
        return f"{len(free)} free GPU(s), {need} needed: " + "; ".join(who)
    return frozenset(free[len(free) - need :])


def _need(state: State, limits: Limits) -> int:
    return limits.num_gpus if state.model.gpus is None else state.model.gpus


def _startup_timeout_of(state: State, limits: Limits) -> float:
    t = state.model.startup_timeout
    return limits.startup_timeout if t is None else t


def _start(state: State, now: float, limits: Limits, reason: str) -> Decision:
    gpus = plan_gpus(state, limits)
    if isinstance(gpus, str):  # something arrived that blocks a start: wait for it to go
        token = state.timer_token + 1  # any pending start timer is now stale
        new, progress = _swap_stage(state, SwapStage.DEFERRED, f"waiting: {gpus}")
        return Decision(_to(new, Phase.YIELDED, now, gpus, timer_token=token), progress)
    run = state.run + 1
    token = state.timer_token + 1
    state, progress = _swap_stage(state, SwapStage.STARTING, f"starting {state.model.name or 'the model'}")
    new = _to(state, Phase.STARTING, now, reason, run=run, started_at=now, timer_token=token, gpus=gpus)
    start = StartModel(run, gpus if limits.gpu_aware else None, state.model.name)
    return Decision(new, (start, SetTimer("startup", _startup_timeout_of(state, limits), token), *progress))


def _swap_stage(state: State, stage: SwapStage, detail: str) -> tuple[State, tuple[Action, ...]]:
    """Report a swap's new stage (once per stage: a deferred swap does not repeat itself)."""
    sw = state.swap
    if sw is None or sw.stage == stage:
        return state, ()
    return replace(state, swap=replace(sw, stage=stage)), (SwapUpdate(sw.id, stage, detail),)


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
    before = state
    d = _decide(state, event, now, limits, jitter)
    stops = sum(isinstance(a, StopModel) for a in d.actions)
    if stops:
        d = Decision(replace(d.state, stops_pending=d.state.stops_pending + stops), d.actions)
    return _follow_phase(before, d, limits)


def tunnel_wanted(state: State, limits: Limits) -> bool:
    """Should the tunnel be connected in this state?"""
    if not limits.tunnel or state.phase in (Phase.INIT, Phase.STOPPING, Phase.STOPPED):
        return False
    return state.phase is Phase.SERVING or not limits.tunnel_leaves_on_yield


def activity_wanted(state: State, limits: Limits) -> bool:
    """Should the idle probe run? While a model process may answer, and only with an idle release."""
    return limits.idle_release_after > 0 and state.phase in MODEL_RUNNING


def _follow_phase(before: State, d: Decision, limits: Limits) -> Decision:
    """Actions that follow from the phase change alone, added here so that no branch of _decide can
    forget them: streams end when serving does; the tunnel follows `tunnel_wanted`, the idle probe
    `activity_wanted`. After the decision's own actions (kills first), before its Exit (always last)."""
    extra: list[Action] = []
    if before.phase is Phase.SERVING and d.state.phase is not Phase.SERVING:
        extra.append(AbortStreams())
    if (up := tunnel_wanted(d.state, limits)) != tunnel_wanted(before, limits):
        extra.append(SetTunnel(up))
    if (on := activity_wanted(d.state, limits)) != activity_wanted(before, limits):
        extra.append(WatchActivity(on))
    if not extra:
        return d
    acts = d.actions
    if acts and isinstance(acts[-1], Exit):
        return Decision(d.state, (*acts[:-1], *extra, acts[-1]))
    return Decision(d.state, (*acts, *extra))


def _decide(state: State, event: Event, now: float, limits: Limits, jitter: float) -> Decision:
    p = state.phase
    match event:
        case Shutdown(reason=why):
            return _shutdown(state, now, f"{why} received", limits)
        case DetectorFailed(detail=detail):
            # Blind, the daemon cannot give GPUs back when a job comes: it must not hold them.
            return _shutdown(state, now, f"job detection failed: {detail}", limits, ending=Ending.BLIND)
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
        case ModelHung(run=run, why=why):
            if run != state.run or p is not Phase.SERVING:
                return Decision(state)
            # A crash whose tree still runs: stopped here (its StopDone in backoff is ignored, as a
            # timed-out start's is); clients get 503 from now on, not a wait until the stop ends.
            d = _crashed(state, None, why, now, limits, jitter)
            return Decision(d.state, (StopModel(StopReason.HUNG), *d.actions))
        case StopDone(elapsed_ms=ms, survivors=survivors):
            return _stop_done(state, ms, survivors, now, limits)
        case TimerFired(name=name, token=token):
            if token != state.timer_token:
                return Decision(state)  # superseded timer
            return _timer(state, name, now, limits, jitter)
        case SwapRequested(id=swap_id, target=target):
            return _swap(state, swap_id, target, now, limits)
    raise TransitionError(f"unhandled event {event!r}")  # pragma: no cover


def _ready(state: State, now: float, limits: Limits) -> Decision:
    was_down = state.down_since
    sw = state.swap
    new = _to(state, Phase.SERVING, now, "serving", serving_since=now, down_since=None, last_activity=now, swap=None)
    body = "model is online"
    if was_down is not None and state.last_yield is not None:
        body = f"resumed after {now - was_down:.0f} s down"
    kind = NotifyKind.RESUMED if state.last_yield is not None else NotifyKind.ONLINE
    actions: tuple[Action, ...] = (Notify(kind, "model online", body, "low"),)
    if sw is not None:
        took = f" ({now - was_down:.0f} s without a model)" if was_down is not None else ""
        done = f"{sw.target.name} is serving{took}"
        body = f"now serving {sw.target.name}{took}"
        actions = (SwapUpdate(sw.id, SwapStage.READY, done), Notify(NotifyKind.SWAPPED, "model swapped", body, "low"))
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
    if p in MODEL_RUNNING or p is Phase.SWAPPING:
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
        state, progress = _swap_stage(state, SwapStage.DEFERRED, f"waiting: {reason}")  # the yield wins
        new = _to(state, Phase.YIELDING, now, reason, last_yield=rec)
        if p is Phase.SERVING:
            new = replace(new, down_since=now)
        if p is Phase.SWAPPING:  # the swap's stop is already under way: it is the yield's now
            return Decision(new, progress)
        return Decision(new, (StopModel(StopReason.YIELD), *progress))
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
    what = f"model {why}" if why else (f"model exited with code {code}" if code is not None else "model exited")
    if state.swap is not None and state.phase is Phase.STARTING:
        return _swap_failed(replace(state, last_exit=code), what, now, limits, jitter, stop=False)
    fast = now - state.started_at < limits.min_uptime or state.phase is Phase.STARTING
    failures = state.fast_failures + 1 if fast else 1
    down = state.down_since if state.down_since is not None else now
    state = replace(state, last_exit=code, fast_failures=failures, down_since=down)
    if failures >= limits.restart_limit:
        body = f"{what}; {failures} fast failures in a row, giving up until restarted"
        new = _to(state, Phase.FAILED, now, body, serving_since=None)
        return Decision(new, (Notify(NotifyKind.FAILED, "model failed", body, "high"),))
    delay = backoff_delay(failures - 1, cap=limits.restart_backoff_max, jitter=jitter)
    token = state.timer_token + 1
    body = f"{what}; restarting in {delay:.1f} s (attempt {failures} of {limits.restart_limit})"
    new = _to(state, Phase.BACKOFF, now, body, timer_token=token, serving_since=None)
    return Decision(new, (Notify(NotifyKind.CRASHED, "model crashed", body, "high"), SetTimer("backoff", delay, token)))


def _stop_done(state: State, ms: float, survivors: int, now: float, limits: Limits) -> Decision:
    p = state.phase
    if p is Phase.STOPPING:
        code = _exit_code(state.ending)
        new = _to(state, Phase.STOPPED, now, state.reason, serving_since=None, exit_code=code)
        return Decision(new, (*_unconfirmed(state), _final_notice(state, now, limits, ms), Exit(code)))
    if p is Phase.YIELDING:
        rec = state.last_yield
        if rec is not None:
            rec = replace(rec, stop_ms=ms, survivors=survivors)
        earlier = tuple(_yield_notice(r) for r in state.unsent)
        state = replace(state, last_yield=rec, serving_since=None, awaiting_release=limits.confirm_gpus, unsent=())
        notices: tuple[Action, ...] = earlier if limits.confirm_gpus else (*earlier, _yield_notice(rec))
        if limits.confirm_gpus:
            notices += (ConfirmRelease(rec.run if rec else 0, frozenset(rec.gpus if rec else ())),)
        gpus = plan_gpus(state, limits)
        if isinstance(gpus, str):
            return Decision(_to(state, Phase.YIELDED, now, gpus), notices)
        # What we yielded to left while we were stopping.
        d = _cooldown(state, now, limits)
        return Decision(d.state, (*notices, *d.actions))
    if p is Phase.SWAPPING:
        name = state.model.name or "the model"
        return _start(replace(state, serving_since=None), now, limits, f"swapping to {name}")
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
        return Notify(NotifyKind.YIELDED, "GPUs yielded", "model stopped for a Slurm job", "default")
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
    return Notify(NotifyKind.YIELDED, "GPUs yielded", "; ".join(parts), priority)


def _final_notice(state: State, now: float, limits: Limits, ms: float | None) -> Notify:
    """The last word: stopped by a person, preempted by Slurm, or released for lack of use."""
    gone = f"; model tree gone in {ms:.0f} ms" if ms is not None else ""
    hours = _duration(served(state, now))
    if state.ending is Ending.BLIND:
        body = f"{state.reason}; model stopped{gone} because no job could be given its GPUs; exiting 1"
        return Notify(NotifyKind.FAILED, "job detection failed", body, "high")
    if state.ending is Ending.IDLE:
        body = f"{state.reason}; served {hours} in all{gone}; exiting"
        return Notify(NotifyKind.RELEASED, "GPUs released (idle)", body, "low")
    if limits.own_job:
        body = (
            f"Slurm job {limits.own_job} is ending ({state.reason}: preemption, scancel or time limit); "
            f"served {hours}{gone}; exiting 0 so a requeue starts it cleanly"
        )
        return Notify(NotifyKind.PREEMPTED, f"preempted: job {limits.own_job}", body, "default")
    return Notify(NotifyKind.STOPPED, "watchdog-llm stopped", f"stopped ({state.reason}){gone}", "low")


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
        body = f"model not ready after {_startup_timeout_of(state, limits):.0f} s"
        if state.swap is not None:
            return _swap_failed(state, body, now, limits, jitter, stop=True)
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
    new = _to(state, Phase.STOPPING, now, reason, timer_token=token, ending=Ending.IDLE)
    return Decision(new, (StopModel(StopReason.IDLE),))


def _startup_timeout(state: State, now: float, limits: Limits, body: str, jitter: float) -> Decision:
    failures = state.fast_failures + 1
    token = state.timer_token + 1
    state = replace(state, fast_failures=failures, timer_token=token)
    if failures >= limits.restart_limit:
        new = _to(state, Phase.FAILED, now, body + "; giving up until restarted")
        return Decision(
            new, (StopModel(StopReason.STARTUP_TIMEOUT), Notify(NotifyKind.FAILED, "model failed", new.reason, "high"))
        )
    delay = backoff_delay(failures - 1, cap=limits.restart_backoff_max, jitter=jitter)
    new = _to(state, Phase.BACKOFF, now, f"{body}; restarting in {delay:.1f} s")
    return Decision(
        new,
        (
            StopModel(StopReason.STARTUP_TIMEOUT),
            Notify(NotifyKind.CRASHED, "model start timed out", new.reason, "high"),
            SetTimer("backoff", delay, token),
        ),
    )


def _exit_code(ending: Ending) -> int:
    return 1 if ending is Ending.BLIND else 0


def _shutdown(state: State, now: float, reason: str, limits: Limits, ending: Ending = Ending.SIGNAL) -> Decision:
    p = state.phase
    if p is Phase.STOPPED or (p is Phase.STOPPING and state.ending not in (Ending.IDLE, ending)):
        return Decision(state)  # a stop already on its way ends as it began
    if p is Phase.STOPPING:
        if state.ending == ending:
            return Decision(state)
        # A signal during an idle release, or blindness during one: it ends as the later cause says.
        return Decision(_to(state, Phase.STOPPING, now, reason, ending=ending))
    token = state.timer_token + 1
    if p in MODEL_RUNNING or p in MODEL_STOPPING or state.stops_pending:
        # A stop in progress (a yield's, or a failed start's) still runs to completion: wait for it.
        new = _to(state, Phase.STOPPING, now, reason, timer_token=token, ending=ending)
        actions: tuple[Action, ...] = (StopModel(StopReason.SHUTDOWN),) if p in MODEL_RUNNING else ()
        return Decision(new, actions)
    code = _exit_code(ending)
    new = _to(state, Phase.STOPPED, now, reason, timer_token=token, exit_code=code, ending=ending)
    return Decision(new, (*_unconfirmed(state), _final_notice(new, now, limits, None), Exit(code)))


# ---- swaps -------------------------------------------------------------------------------------


def _swap(state: State, swap_id: str, target: ModelChoice, now: float, limits: Limits) -> Decision:
    p = state.phase
    if p in (Phase.STOPPING, Phase.STOPPED):  # an open swap stays open: the next start completes it
        return Decision(state, (SwapUpdate(swap_id, SwapStage.FAILED, "the daemon is stopping"),))
    actions: tuple[Action, ...] = ()
    previous: ModelChoice | None = state.model if state.model.name else None
    if state.swap is not None and state.swap.id != swap_id:  # a deferred swap, replaced by this one
        actions = (SwapUpdate(state.swap.id, SwapStage.FAILED, f"superseded by swap {swap_id}"),)
        previous = state.swap.previous
    if p is Phase.FAILED:
        previous = None  # it failed: bringing it back would not help
    if p is Phase.SERVING and target.name == state.model.name:
        return Decision(replace(state, swap=None), (*actions, SwapUpdate(swap_id, SwapStage.READY, "already serving")))
    if previous is not None and previous.name == target.name:
        previous = None
    same = target.name == state.model.name
    state = replace(state, model=target, swap=SwapCtx(swap_id, target, previous, stage=SwapStage.QUEUED))
    if p is Phase.STARTING and same:  # it is starting already: this swap completes with it
        state, progress = _swap_stage(state, SwapStage.STARTING, f"{target.name} is starting")
        return Decision(state, (*actions, *progress))
    if p in MODEL_RUNNING:
        if p is Phase.SERVING and now - state.started_at >= limits.min_uptime:
            state = replace(state, fast_failures=0)
        down = now if p is Phase.SERVING else state.down_since
        state, progress = _swap_stage(
            state, SwapStage.STOPPING, f"stopping {previous.name if previous else 'the model'}"
        )
        new = _to(state, Phase.SWAPPING, now, f"swapping to {target.name}", timer_token=state.timer_token + 1)
        return Decision(replace(new, down_since=down), (StopModel(StopReason.SWAP), *actions, *progress))
    if p is Phase.SWAPPING:  # the stop is under way; the new target starts after it
        return Decision(replace(state, reason=f"swapping to {target.name}"), actions)
    if p is Phase.FAILED:
        d = _start(replace(state, fast_failures=0), now, limits, f"swapping to {target.name}")
        return Decision(d.state, (*actions, *d.actions))
    why = {
        Phase.INIT: "the daemon is starting",
        Phase.COOLDOWN: "the node is idle again; it starts after the cooldown",
        Phase.BACKOFF: "it starts when the crashed model's restart is due",
    }.get(p, f"waiting: {state.reason}")
    state, progress = _swap_stage(state, SwapStage.DEFERRED, why)
    return Decision(state, (*actions, *progress))


def _swap_failed(state: State, what: str, now: float, limits: Limits, jitter: float, *, stop: bool) -> Decision:
    """The swap's target crashed or was not ready in time: the swap fails, and the model that served
    before it comes back at once (a failed swap is not the old model's failure: its count starts
    afresh). With nothing to go back to, the target is retried like any crashed model."""
    sw = state.swap
    assert sw is not None
    body = f"swap to {sw.target.name} failed: {what}"
    fail: tuple[Action, ...] = (
        SwapUpdate(sw.id, SwapStage.FAILED, what),
        Notify(NotifyKind.SWAP_FAILED, "model swap failed", body, "high"),
    )
    state = replace(state, swap=None)
    if sw.previous is None:
        if stop:
            d = _startup_timeout(state, now, limits, what, jitter)
        else:
            d = _crashed(state, state.last_exit, what.removeprefix("model "), now, limits, jitter)
        stops = tuple(a for a in d.actions if isinstance(a, StopModel))  # kills first, as always
        return Decision(d.state, (*stops, *fail, *(a for a in d.actions if not isinstance(a, StopModel))))
    state = replace(state, model=sw.previous, fast_failures=0, timer_token=state.timer_token + 1)
    d = _start(state, now, limits, f"{body}; bringing back {sw.previous.name}")
    return Decision(d.state, (*((StopModel(StopReason.STARTUP_TIMEOUT),) if stop else ()), *fail, *d.actions))
