"""The daemon's state machine (`watchdog_llm.policy.decide`), transition by transition.

Pure: no processes, no clocks, no sleeps. Times are plain numbers in seconds.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from watchdog_llm.base.backoff import backoff_delay
from watchdog_llm.base.vocab import StopReason, YieldOn
from watchdog_llm.policy import (
    MODEL_DOWN,
    MODEL_RUNNING,
    MODEL_STOPPING,
    AbortStreams,
    Action,
    Activity,
    ConfirmRelease,
    Decision,
    DetectorFailed,
    Event,
    Exit,
    GpuBusy,
    JobGone,
    JobSeen,
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
    TransitionError,
    WatchActivity,
    activity_wanted,
    decide,
    tunnel_wanted,
)


@pytest.fixture(autouse=True)
def no_leftover_processes() -> Iterator[None]:
    """These tests are pure and start no process: skip conftest's per-test process scan (~20 ms each)."""
    yield


LIMITS = Limits(
    resume_cooldown=60.0,
    restart_backoff_max=60.0,
    restart_limit=3,
    min_uptime=60.0,
    startup_timeout=900.0,
)
NO_JOBS: frozenset[str] = frozenset()


# ---- helpers -----------------------------------------------------------------------------------


@dataclass
class Daemon:
    """Feeds events through `decide` and remembers what came out (a tiny stand-in for app.py)."""

    limits: Limits = LIMITS
    jitter: float = 0.5
    state: State = field(default_factory=State)
    last: Decision = field(default_factory=lambda: Decision(State()))

    def feed(self, event: Event, now: float) -> Decision:
        self.last = decide(self.state, event, now, self.limits, self.jitter)
        self.state = self.last.state
        return self.last

    def phase(self) -> Phase:  # a method, not a property: mypy would narrow a property across feed()
        return self.state.phase

    def fire(self, name: str, now: float, token: int | None = None) -> Decision:
        """Fire timer `name` with the live token (or the given one)."""
        return self.feed(TimerFired(name, self.state.timer_token if token is None else token), now)


def of(d: Decision, kind: type) -> list[Action]:
    return [a for a in d.actions if isinstance(a, kind)]


def notices(d: Decision) -> list[Notify]:
    return [a for a in d.actions if isinstance(a, Notify)]


def only_timer(d: Decision) -> SetTimer:
    timers = [a for a in d.actions if isinstance(a, SetTimer)]
    assert len(timers) == 1, d.actions
    return timers[0]


def starting(limits: Limits = LIMITS, now: float = 0.0) -> Daemon:
    dmn = Daemon(limits=limits)
    dmn.feed(Startup(NO_JOBS), now)
    assert dmn.phase() is Phase.STARTING
    return dmn


def serving(limits: Limits = LIMITS, ready_at: float = 10.0) -> Daemon:
    dmn = starting(limits)
    dmn.feed(ModelReady(), ready_at)
    assert dmn.phase() is Phase.SERVING
    return dmn


def yielding(job: str = "4242", at: float = 100.0) -> Daemon:
    dmn = serving()
    dmn.feed(JobSeen(job, detect_ms=0.4), at)
    assert dmn.phase() is Phase.YIELDING
    return dmn


def yielded(job: str = "4242", at: float = 100.0) -> Daemon:
    dmn = yielding(job, at)
    dmn.feed(StopDone(elapsed_ms=41.0, survivors=0), at + 0.05)
    assert dmn.phase() is Phase.YIELDED
    return dmn


def cooldown(at: float = 200.0) -> Daemon:
    dmn = yielded()
    dmn.feed(JobGone("4242"), at)
    assert dmn.phase() is Phase.COOLDOWN
    return dmn


def backoff() -> Daemon:
    dmn = serving()
    dmn.feed(ModelExited(code=1, run=dmn.state.run), 10_000.0)
    assert dmn.phase() is Phase.BACKOFF
    return dmn


def failed() -> Daemon:
    dmn = starting(limits(restart_limit=1))
    dmn.feed(ModelExited(code=1, run=1), 1.0)
    assert dmn.phase() is Phase.FAILED
    return dmn


def limits(**kw: Any) -> Limits:
    return replace(LIMITS, **kw)


def assert_ignored(dmn: Daemon, event: Event, now: float) -> None:
    before = dmn.state
    d = dmn.feed(event, now)
    assert d.actions == ()
    assert d.state == before


# ---- start-up ----------------------------------------------------------------------------------


def test_startup_on_an_idle_node_starts_the_model_and_arms_a_startup_timer() -> None:
    d = decide(State(), Startup(NO_JOBS), 5.0, LIMITS)
    assert d.state.phase is Phase.STARTING
    assert d.state.run == 1
    assert d.state.started_at == 5.0
    assert d.actions == (StartModel(1), SetTimer("startup", LIMITS.startup_timeout, d.state.timer_token))
    assert d.state.timer_token > State().timer_token


def test_startup_while_jobs_are_present_waits_yielded_without_starting() -> None:
    d = decide(State(), Startup(frozenset({"77", "78"})), 5.0, LIMITS)
    assert d.state.phase is Phase.YIELDED
    assert d.state.jobs == {"77", "78"}
    assert d.actions == ()
    assert d.state.run == 0
    assert "77" in d.state.reason and "78" in d.state.reason


def test_the_waiting_start_up_begins_serving_once_the_jobs_leave_and_the_cooldown_passes() -> None:
    dmn = Daemon()
    dmn.feed(Startup(frozenset({"77"})), 0.0)
    d = dmn.feed(JobGone("77"), 30.0)
    assert dmn.phase() is Phase.COOLDOWN
    assert only_timer(d).name == "cooldown"
    d = dmn.fire("cooldown", 90.0)
    assert of(d, StartModel) == [StartModel(1)]
    d = dmn.feed(ModelReady(), 100.0)
    assert [n.kind for n in notices(d)] == ["online"]  # we never yielded anything ourselves


def test_a_second_startup_event_is_a_bug_not_a_transition() -> None:
    dmn = starting()
    with pytest.raises(TransitionError):
        dmn.feed(Startup(NO_JOBS), 1.0)


# ---- ready / online / resumed ------------------------------------------------------------------


def test_model_ready_goes_serving_with_an_online_notification() -> None:
    dmn = starting()
    d = dmn.feed(ModelReady(), 42.0)
    assert dmn.phase() is Phase.SERVING
    assert dmn.state.serving_since == 42.0
    assert dmn.state.down_since is None
    assert d.actions == (Notify("online", "model online", "model is online", "low"),)


def test_ready_after_a_yield_says_resumed_with_the_downtime_in_the_body() -> None:
    dmn = serving()
    dmn.feed(JobSeen("4242"), 100.0)  # serving ended here
    dmn.feed(StopDone(40.0, 0), 100.04)
    dmn.feed(JobGone("4242"), 200.0)
    d = dmn.fire("cooldown", 260.0)
    assert of(d, StartModel) == [StartModel(2)]
    d = dmn.feed(ModelReady(), 290.0)
    assert dmn.phase() is Phase.SERVING
    [n] = notices(d)
    assert n.kind == "resumed"
    assert "190 s" in n.body  # 290 - 100
    assert d.actions == (n,)


def test_ready_after_a_crash_restart_without_any_yield_is_plain_online() -> None:
    dmn = backoff()
    dmn.fire("backoff", 10_001.0)
    d = dmn.feed(ModelReady(), 10_010.0)
    assert [n.kind for n in notices(d)] == ["online"]


@pytest.mark.parametrize("make", [yielding, yielded, cooldown, backoff, failed])
def test_late_model_ready_after_we_stopped_is_ignored(make: Callable[[], Daemon]) -> None:
    dmn = make()
    assert_ignored(dmn, ModelReady(), 5000.0)


def test_late_model_ready_after_shutdown_is_ignored() -> None:
    dmn = starting()
    dmn.feed(Shutdown("SIGTERM"), 1.0)
    assert_ignored(dmn, ModelReady(), 2.0)
    dmn.feed(StopDone(10.0, 0), 3.0)
    assert_ignored(dmn, ModelReady(), 4.0)


def test_second_model_ready_while_serving_changes_nothing() -> None:
    dmn = serving()
    assert_ignored(dmn, ModelReady(), 20.0)


# ---- yield -------------------------------------------------------------------------------------


def test_job_arriving_while_serving_yields_and_stops_the_model_with_no_notification_yet() -> None:
    dmn = serving()
    d = dmn.feed(JobSeen("4242", detect_ms=0.4), 100.0)
    assert dmn.phase() is Phase.YIELDING
    assert d.actions == (StopModel("yield"), AbortStreams())  # kill first; nothing is told before the stop is done
    assert dmn.state.jobs == {"4242"}
    assert dmn.state.down_since == 100.0
    assert dmn.state.last_yield is not None
    assert dmn.state.last_yield.job == "4242"
    assert dmn.state.last_yield.detected_at == 100.0
    assert dmn.state.last_yield.detect_ms == 0.4
    assert "4242" in dmn.state.reason


def test_stop_done_after_a_yield_notifies_yielded_naming_the_job_and_both_timings() -> None:
    dmn = yielding("4242")
    d = dmn.feed(StopDone(elapsed_ms=41.0, survivors=0), 100.05)
    assert dmn.phase() is Phase.YIELDED
    assert dmn.state.serving_since is None
    [n] = notices(d)
    assert d.actions == (n,)  # nothing is started or timed while the job is there
    assert n.kind == "yielded"
    assert "4242" in n.body
    assert "0.4 ms" in n.body  # detection latency
    assert "41 ms" in n.body  # stop latency
    assert "could not be killed" not in n.body
    assert dmn.state.last_yield is not None
    assert dmn.state.last_yield.stop_ms == 41.0


def test_yielded_notification_reports_processes_that_survived_the_kill() -> None:
    dmn = yielding()
    d = dmn.feed(StopDone(elapsed_ms=10_000.0, survivors=2), 110.0)
    [n] = notices(d)
    assert "2 process(es) could not be killed" in n.body
    assert dmn.state.last_yield is not None
    assert dmn.state.last_yield.survivors == 2


def test_yielded_notification_without_a_known_detection_time_still_names_the_job() -> None:
    dmn = serving()
    dmn.feed(JobSeen("9"), 100.0)
    [n] = notices(dmn.feed(StopDone(12.0, 0), 100.1))
    assert "job 9" in n.body and "12 ms" in n.body and "detected" not in n.body


def test_job_arriving_during_startup_still_yields() -> None:
    dmn = starting()
    d = dmn.feed(JobSeen("4242", detect_ms=1.0), 5.0)
    assert dmn.phase() is Phase.YIELDING
    assert d.actions == (StopModel("yield"),)
    d = dmn.feed(StopDone(30.0, 0), 5.1)
    assert dmn.phase() is Phase.YIELDED
    assert [n.kind for n in notices(d)] == ["yielded"]


def test_startup_timer_of_a_run_yielded_during_startup_does_nothing() -> None:
    dmn = starting()
    dmn.feed(JobSeen("4242"), 5.0)
    assert_ignored(dmn, TimerFired("startup", dmn.state.timer_token), 900.0)
    dmn.feed(StopDone(30.0, 0), 901.0)
    assert_ignored(dmn, TimerFired("startup", dmn.state.timer_token), 902.0)


@pytest.mark.parametrize("make", [starting, serving])
def test_yield_never_notifies_in_the_same_decision_as_the_stop(make: Callable[[], Daemon]) -> None:
    dmn = make()
    d = dmn.feed(JobSeen("1", detect_ms=0.1), 50.0)
    assert StopModel("yield") in d.actions
    assert notices(d) == []


def test_second_job_while_yielding_is_remembered_without_a_second_stop() -> None:
    dmn = yielding("a")
    d = dmn.feed(JobSeen("b"), 100.01)
    assert d.actions == ()
    assert dmn.phase() is Phase.YIELDING
    assert dmn.state.jobs == {"a", "b"}
    [n] = notices(dmn.feed(StopDone(40.0, 0), 100.05))
    assert "job a" in n.body  # the job that made us yield
    assert dmn.phase() is Phase.YIELDED


def test_crash_of_the_model_we_are_stopping_for_a_yield_is_ignored() -> None:
    dmn = yielding()
    assert_ignored(dmn, ModelExited(code=-15, run=dmn.state.run), 100.02)
    d = dmn.feed(StopDone(40.0, 0), 100.05)
    assert dmn.phase() is Phase.YIELDED
    assert of(d, SetTimer) == []


# ---- cooldown ----------------------------------------------------------------------------------


def test_last_job_leaving_starts_the_cooldown_timer_and_nothing_else() -> None:
    dmn = yielded()
    token = dmn.state.timer_token
    d = dmn.feed(JobGone("4242"), 200.0)
    assert dmn.phase() is Phase.COOLDOWN
    assert dmn.state.jobs == frozenset()
    assert d.actions == (SetTimer("cooldown", LIMITS.resume_cooldown, dmn.state.timer_token),)
    assert dmn.state.timer_token > token


def test_job_leaving_and_another_arriving_inside_the_cooldown_stays_yielded_and_the_old_timer_goes_stale() -> None:
    dmn = cooldown(at=200.0)
    old = dmn.state.timer_token
    d = dmn.feed(JobSeen("5000"), 230.0)
    assert d.actions == ()  # nothing runs, so nothing to stop
    assert dmn.phase() is Phase.YIELDED
    assert dmn.state.jobs == {"5000"}
    assert dmn.state.timer_token != old
    assert_ignored(dmn, TimerFired("cooldown", old), 260.0)  # the old cooldown fires: nothing
    assert dmn.phase() is Phase.YIELDED


def test_a_fresh_cooldown_after_a_cancelled_one_uses_its_own_timer() -> None:
    dmn = cooldown(at=200.0)
    first = dmn.state.timer_token
    dmn.feed(JobSeen("5000"), 230.0)
    d = dmn.feed(JobGone("5000"), 240.0)
    second = only_timer(d).token
    assert second > first
    assert_ignored(dmn, TimerFired("cooldown", first), 260.0)
    assert dmn.phase() is Phase.COOLDOWN
    d = dmn.feed(TimerFired("cooldown", second), 300.0)
    assert dmn.phase() is Phase.STARTING
    assert of(d, StartModel) == [StartModel(2)]


def test_last_job_leaving_while_we_are_still_stopping_goes_to_cooldown_after_stop_done() -> None:
    dmn = yielding("4242", at=100.0)
    d = dmn.feed(JobGone("4242"), 100.01)
    assert d.actions == ()
    assert dmn.phase() is Phase.YIELDING  # the stop still has to finish
    d = dmn.feed(StopDone(45.0, 0), 100.05)
    assert dmn.phase() is Phase.COOLDOWN
    assert [type(a) for a in d.actions] == [Notify, SetTimer]
    assert d.actions[0].kind == "yielded"  # type: ignore[union-attr]
    assert d.actions[1] == SetTimer("cooldown", LIMITS.resume_cooldown, dmn.state.timer_token)


def test_cooldown_timer_starts_the_model_with_a_new_run_number() -> None:
    dmn = cooldown(at=200.0)
    run_before = dmn.state.run
    d = dmn.fire("cooldown", 260.0)
    assert dmn.phase() is Phase.STARTING
    assert dmn.state.run == run_before + 1
    assert dmn.state.started_at == 260.0
    assert d.actions == (
        StartModel(run_before + 1),
        SetTimer("startup", LIMITS.startup_timeout, dmn.state.timer_token),
    )


def test_second_job_seen_while_yielded_then_one_leaving_keeps_us_yielded() -> None:
    dmn = yielded("a")
    assert dmn.feed(JobSeen("b"), 110.0).actions == ()
    d = dmn.feed(JobGone("a"), 120.0)
    assert d.actions == ()
    assert dmn.phase() is Phase.YIELDED
    assert dmn.state.jobs == {"b"}
    assert "b" in dmn.state.reason and "a," not in dmn.state.reason
    d = dmn.feed(JobGone("b"), 130.0)
    assert dmn.phase() is Phase.COOLDOWN


def test_gone_event_for_an_unknown_job_while_yielded_keeps_us_yielded() -> None:
    dmn = yielded("a")
    d = dmn.feed(JobGone("never-seen"), 120.0)
    assert d.actions == ()
    assert dmn.phase() is Phase.YIELDED
    assert dmn.state.jobs == {"a"}


def test_job_gone_while_serving_changes_nothing() -> None:
    dmn = serving()
    assert_ignored(dmn, JobGone("x"), 50.0)


def test_job_arriving_during_a_crash_backoff_cancels_the_restart() -> None:
    dmn = backoff()
    old = dmn.state.timer_token
    d = dmn.feed(JobSeen("7"), 10_000.5)
    assert d.actions == ()
    assert dmn.phase() is Phase.YIELDED
    assert_ignored(dmn, TimerFired("backoff", old), 10_001.0)
    d = dmn.feed(JobGone("7"), 10_100.0)
    assert dmn.phase() is Phase.COOLDOWN
    d = dmn.fire("cooldown", 10_160.0)
    assert of(d, StartModel) == [StartModel(dmn.state.run)]


# ---- crashes and restarts ----------------------------------------------------------------------


@pytest.mark.parametrize("jitter", [0.0, 0.5, 0.999])
def test_crash_while_serving_after_min_uptime_backs_off_with_a_crashed_notification(jitter: float) -> None:
    dmn = serving()  # started at 0, ready at 10
    dmn.jitter = jitter
    d = dmn.feed(ModelExited(code=1, run=1), 3600.0)
    assert dmn.phase() is Phase.BACKOFF
    assert dmn.state.fast_failures == 1
    assert dmn.state.last_exit == 1
    assert dmn.state.serving_since is None
    assert dmn.state.down_since == 3600.0
    assert [type(a) for a in d.actions] == [Notify, SetTimer, AbortStreams]
    [n] = notices(d)
    assert n.kind == "crashed" and n.priority == "high"
    assert "code 1" in n.body
    timer = only_timer(d)
    assert timer.name == "backoff" and timer.token == dmn.state.timer_token
    assert 0.5 <= timer.delay <= 1.0  # first restart: half to all of BASE * 2**0
    assert timer.delay == backoff_delay(0, cap=LIMITS.restart_backoff_max, jitter=jitter)
    assert of(d, StartModel) == [] and of(d, StopModel) == []


def test_a_hung_model_is_stopped_and_restarted_like_a_crash() -> None:
    dmn = serving()  # started at 0, ready at 10
    why = "stopped answering /health (3 checks over 10.0 s: no answer within 3 s)"
    d = dmn.feed(ModelHung(run=1, why=why), 3600.0)
    assert dmn.phase() is Phase.BACKOFF and dmn.state.fast_failures == 1
    # The stop first (the tree still runs), streams end at once (clients get 503 from now on).
    assert [type(a) for a in d.actions] == [StopModel, Notify, SetTimer, AbortStreams]
    assert of(d, StopModel) == [StopModel(StopReason.HUNG)]
    [n] = notices(d)
    assert n.kind == "crashed" and why in n.body and "restarting in" in n.body
    assert why in dmn.state.reason
    # Its stop ends in backoff: nothing more to do; the backoff timer restarts it.
    assert dmn.state.stops_pending == 1
    d = dmn.feed(StopDone(1200.0, 0), 3601.0)
    assert dmn.phase() is Phase.BACKOFF and d.actions == () and dmn.state.stops_pending == 0
    d = dmn.feed(TimerFired("backoff", dmn.state.timer_token), 3610.0)
    assert dmn.phase() is Phase.STARTING and of(d, StartModel) == [StartModel(2)]


def test_hangs_of_other_runs_or_phases_are_ignored() -> None:
    dmn = serving()
    assert_ignored(dmn, ModelHung(run=0, why="old run"), 100.0)
    dmn = starting()
    assert_ignored(dmn, ModelHung(run=dmn.state.run, why="not ready yet: the startup timer decides"), 1.0)


def test_hung_again_and_again_gives_up_after_the_restart_limit() -> None:
    dmn = serving()
    now = 20.0
    for _ in range(LIMITS.restart_limit - 1):
        dmn.feed(ModelHung(run=dmn.state.run, why="stopped answering /health"), now)
        assert dmn.phase() is Phase.BACKOFF
        dmn.feed(TimerFired("backoff", dmn.state.timer_token), now + 1)
        dmn.feed(ModelReady(), now + 2)
        now += 3
    d = dmn.feed(ModelHung(run=dmn.state.run, why="stopped answering /health"), now)
    assert dmn.phase() is Phase.FAILED
    assert of(d, StopModel) == [StopModel(StopReason.HUNG)]  # given up on, and still stopped


def test_crash_notification_uses_the_exit_reason_when_known() -> None:
    dmn = serving()
    d = dmn.feed(ModelExited(code=None, run=1, why="killed by SIGSEGV"), 3600.0)
    [n] = notices(d)
    assert "killed by SIGSEGV" in n.body


def test_crash_without_an_exit_code_still_notifies() -> None:
    dmn = serving()
    [n] = notices(dmn.feed(ModelExited(code=None, run=1), 3600.0))
    assert n.kind == "crashed" and "model exited" in n.body


def test_crash_exactly_at_min_uptime_is_not_a_fast_failure() -> None:
    dmn = serving()
    dmn.state = replace(dmn.state, fast_failures=2)
    dmn.feed(ModelExited(code=1, run=1), LIMITS.min_uptime)  # started at 0
    assert dmn.phase() is Phase.BACKOFF
    assert dmn.state.fast_failures == 1


def test_crash_while_starting_is_fast_even_after_min_uptime() -> None:
    dmn = starting()
    dmn.feed(ModelExited(code=1, run=1), LIMITS.min_uptime + 100)
    assert dmn.state.fast_failures == 1
    dmn.fire("backoff", 200.0)
    dmn.feed(ModelExited(code=1, run=2), 200.0 + LIMITS.min_uptime + 100)
    assert dmn.state.fast_failures == 2


def test_backoff_timer_restarts_the_model_with_a_new_run_number() -> None:
    dmn = backoff()
    d = dmn.fire("backoff", 10_001.0)
    assert dmn.phase() is Phase.STARTING
    assert dmn.state.run == 2
    assert d.actions == (StartModel(2), SetTimer("startup", LIMITS.startup_timeout, dmn.state.timer_token))


@pytest.mark.parametrize("restart_limit", [1, 2, 3, 5, 8])
def test_repeated_fast_failures_end_in_failed_after_restart_limit(restart_limit: int) -> None:
    lim = limits(restart_limit=restart_limit, restart_backoff_max=20.0)
    dmn = starting(lim)
    now = 0.0
    for attempt in range(restart_limit - 1):
        now += 1.0
        d = dmn.feed(ModelExited(code=1, run=dmn.state.run), now)
        assert dmn.phase() is Phase.BACKOFF
        assert dmn.state.fast_failures == attempt + 1
        timer = only_timer(d)
        raw = min(lim.restart_backoff_max, 2.0**attempt)
        assert raw / 2 <= timer.delay <= raw
        [n] = notices(d)
        assert n.kind == "crashed" and f"attempt {attempt + 1} of {restart_limit}" in n.body
        now += timer.delay
        d = dmn.feed(TimerFired("backoff", timer.token), now)
        assert of(d, StartModel) == [StartModel(attempt + 2)]
    now += 1.0
    d = dmn.feed(ModelExited(code=1, run=dmn.state.run), now)
    assert dmn.phase() is Phase.FAILED
    assert dmn.state.fast_failures == restart_limit
    [n] = notices(d)
    assert n.kind == "failed" and n.priority == "high"
    assert f"{restart_limit} fast failures" in n.body
    assert d.actions == (n,)  # no timer, no restart


def test_backoff_delays_grow_and_stay_under_the_cap() -> None:
    lim = limits(restart_limit=30, restart_backoff_max=10.0)
    dmn = starting(lim)
    dmn.jitter = 0.999
    now, delays = 0.0, []
    for _ in range(25):
        now += 1.0
        timer = only_timer(dmn.feed(ModelExited(code=1, run=dmn.state.run), now))
        delays.append(timer.delay)
        now += timer.delay
        dmn.feed(TimerFired("backoff", timer.token), now)
    assert delays == sorted(delays)
    assert max(delays) <= lim.restart_backoff_max
    assert delays[-1] >= lim.restart_backoff_max / 2


def test_failed_stays_failed_when_jobs_come_and_go() -> None:
    dmn = failed()
    events: list[Event] = [
        JobSeen("1"),
        JobSeen("2"),
        JobGone("1"),
        JobGone("2"),
        JobGone("3"),
        ModelReady(),
        StopDone(1.0, 0),
    ]
    for i, event in enumerate(events):
        d = dmn.feed(event, 10.0 + i)
        assert dmn.phase() is Phase.FAILED
        assert d.actions == ()
    for name in ("cooldown", "backoff", "startup"):
        for token in range(dmn.state.timer_token + 2):
            d = dmn.feed(TimerFired(name, token), 100.0)
            assert d.actions == () and dmn.phase() is Phase.FAILED
    assert dmn.state.jobs == frozenset()


def test_slow_crash_resets_the_fast_failure_count() -> None:
    dmn = starting()
    dmn.feed(ModelExited(code=1, run=1), 1.0)
    dmn.fire("backoff", 2.0)
    dmn.feed(ModelExited(code=1, run=2), 3.0)
    assert dmn.state.fast_failures == 2
    dmn.fire("backoff", 5.0)
    dmn.feed(ModelReady(), 10.0)
    d = dmn.feed(ModelExited(code=1, run=3), 5.0 + LIMITS.min_uptime + 1)
    assert dmn.phase() is Phase.BACKOFF
    assert dmn.state.fast_failures == 1
    assert "attempt 1 of" in notices(d)[0].body


def test_a_healthy_run_that_ends_in_a_yield_breaks_the_row_of_fast_failures() -> None:
    dmn = starting()  # restart_limit = 3
    dmn.feed(ModelExited(code=1, run=1), 1.0)  # fast failure 1
    dmn.fire("backoff", 2.0)
    dmn.feed(ModelExited(code=1, run=2), 3.0)  # fast failure 2
    dmn.fire("backoff", 5.0)
    dmn.feed(ModelReady(), 10.0)  # run 3 serves for an hour: not a failure
    dmn.feed(JobSeen("4242"), 3600.0)
    dmn.feed(StopDone(40.0, 0), 3600.1)
    dmn.feed(JobGone("4242"), 7200.0)
    dmn.fire("cooldown", 7260.0)
    dmn.feed(ModelExited(code=1, run=4), 7261.0)  # the first fast failure of a new row
    assert dmn.phase() is Phase.BACKOFF
    assert dmn.state.fast_failures == 1


def test_exit_of_an_older_run_is_ignored() -> None:
    dmn = backoff()
    dmn.fire("backoff", 10_001.0)
    assert dmn.state.run == 2
    assert_ignored(dmn, ModelExited(code=1, run=1), 10_002.0)
    dmn.feed(ModelReady(), 10_003.0)
    assert_ignored(dmn, ModelExited(code=1, run=1), 10_004.0)
    assert_ignored(dmn, ModelExited(code=1, run=0), 10_005.0)


@pytest.mark.parametrize("make", [yielded, cooldown, backoff, failed])
def test_exit_while_no_model_should_run_is_ignored(make: Callable[[], Daemon]) -> None:
    dmn = make()
    assert_ignored(dmn, ModelExited(code=1, run=dmn.state.run), 20_000.0)


def test_exit_during_a_shutdown_stop_is_ignored() -> None:
    dmn = serving()
    dmn.feed(Shutdown("SIGTERM"), 50.0)
    assert_ignored(dmn, ModelExited(code=-15, run=1), 50.1)
    assert dmn.phase() is Phase.STOPPING


# ---- startup timeout ---------------------------------------------------------------------------


def test_startup_timeout_stops_the_model_and_backs_off() -> None:
    dmn = starting()
    d = dmn.fire("startup", LIMITS.startup_timeout)
    assert dmn.phase() is Phase.BACKOFF
    assert dmn.state.fast_failures == 1
    assert [type(a) for a in d.actions] == [StopModel, Notify, SetTimer]  # kill first
    assert d.actions[0] == StopModel("startup-timeout")
    [n] = notices(d)
    assert n.kind == "crashed" and "900 s" in n.body
    timer = only_timer(d)
    assert timer.name == "backoff" and timer.token == dmn.state.timer_token
    assert 0.5 <= timer.delay <= 1.0


def test_exit_of_the_model_stopped_for_a_startup_timeout_is_ignored() -> None:
    dmn = starting()
    dmn.fire("startup", LIMITS.startup_timeout)
    assert_ignored(dmn, ModelExited(code=-9, run=1), LIMITS.startup_timeout + 0.1)
    assert dmn.state.stops_pending == 1
    d = dmn.feed(StopDone(10_000.0, 0), LIMITS.startup_timeout + 0.2)
    assert d.actions == () and dmn.phase() is Phase.BACKOFF and dmn.state.stops_pending == 0
    d = dmn.fire("backoff", LIMITS.startup_timeout + 11)
    assert of(d, StartModel) == [StartModel(2)]


def test_repeated_startup_timeouts_end_in_failed_at_the_limit() -> None:
    dmn = starting()
    now = 0.0
    for _ in range(LIMITS.restart_limit - 1):
        now += LIMITS.startup_timeout
        dmn.fire("startup", now)
        assert dmn.phase() is Phase.BACKOFF
        now += 1.0
        dmn.fire("backoff", now)
    now += LIMITS.startup_timeout
    d = dmn.fire("startup", now)
    assert dmn.phase() is Phase.FAILED
    assert [type(a) for a in d.actions] == [StopModel, Notify]
    assert d.actions[0] == StopModel("startup-timeout")
    assert notices(d)[0].kind == "failed"
    assert of(d, SetTimer) == [] and of(d, StartModel) == []
    for name in ("backoff", "startup", "cooldown"):
        assert_ignored(dmn, TimerFired(name, dmn.state.timer_token), now + 100)


def test_startup_timeouts_and_crashes_count_towards_the_same_limit() -> None:
    dmn = starting()
    dmn.fire("startup", 900.0)
    dmn.fire("backoff", 901.0)
    d = dmn.feed(ModelExited(code=1, run=2), 902.0)
    assert dmn.state.fast_failures == 2
    assert dmn.phase() is Phase.BACKOFF
    dmn.fire("backoff", 905.0)
    d = dmn.fire("startup", 905.0 + 900)
    assert dmn.phase() is Phase.FAILED
    assert notices(d)[0].kind == "failed"


def test_startup_timer_after_the_model_became_ready_is_ignored() -> None:
    dmn = serving()
    # ModelReady does not bump the token; the phase check alone must keep the model running.
    assert_ignored(dmn, TimerFired("startup", dmn.state.timer_token), LIMITS.startup_timeout)


# ---- stale timers ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cooldown", "backoff", "startup"])
@pytest.mark.parametrize("make", [starting, serving, yielding, yielded, cooldown, backoff])
def test_stale_timer_tokens_are_ignored(name: str, make: Callable[[], Daemon]) -> None:
    dmn = make()
    for token in range(dmn.state.timer_token):
        assert_ignored(dmn, TimerFired(name, token), 50_000.0)
    assert_ignored(dmn, TimerFired(name, dmn.state.timer_token + 1), 50_000.0)


@pytest.mark.parametrize(
    ("make", "wrong"),
    [(cooldown, "backoff"), (cooldown, "startup"), (backoff, "cooldown"), (backoff, "startup")],
)
def test_timer_with_the_live_token_but_the_wrong_name_is_ignored(make: Callable[[], Daemon], wrong: str) -> None:
    dmn = make()
    assert_ignored(dmn, TimerFired(wrong, dmn.state.timer_token), 50_000.0)


def test_a_stale_crash_backoff_timer_cannot_restart_a_serving_model() -> None:
    dmn = backoff()
    old = dmn.state.timer_token
    dmn.fire("backoff", 10_001.0)
    dmn.feed(ModelReady(), 10_002.0)
    assert_ignored(dmn, TimerFired("backoff", old), 10_003.0)
    assert dmn.phase() is Phase.SERVING


# ---- shutdown ----------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [starting, serving])
def test_shutdown_while_a_model_runs_stops_it_then_exits_after_stop_done(make: Callable[[], Daemon]) -> None:
    dmn = make()
    was_serving = dmn.phase() is Phase.SERVING
    d = dmn.feed(Shutdown("SIGTERM"), 500.0)
    assert dmn.phase() is Phase.STOPPING
    assert d.actions == (StopModel("shutdown"), *((AbortStreams(),) if was_serving else ()))
    assert "SIGTERM" in dmn.state.reason
    d = dmn.feed(StopDone(elapsed_ms=120.0, survivors=0), 500.2)
    assert dmn.phase() is Phase.STOPPED
    assert dmn.state.exit_code == 0
    assert [type(a) for a in d.actions] == [Notify, Exit]
    [n] = notices(d)
    assert n.kind == "stopped" and "120 ms" in n.body and "SIGTERM" in n.body
    assert d.actions[-1] == Exit(0)


@pytest.mark.parametrize("make", [starting, serving])
def test_detection_failing_while_a_model_runs_stops_it_and_exits_1(make: Callable[[], Daemon]) -> None:
    dmn = make()
    streams = (AbortStreams(),) if dmn.phase() is Phase.SERVING else ()
    d = dmn.feed(DetectorFailed("the inotify reader thread ended: AttributeError: x"), 500.0)
    assert dmn.phase() is Phase.STOPPING and d.actions == (StopModel("shutdown"), *streams)
    assert_ignored(dmn, DetectorFailed("again"), 500.1)
    assert_ignored(dmn, Shutdown("SIGTERM"), 500.1)  # a signal now does not hide the failure
    d = dmn.feed(StopDone(elapsed_ms=80.0, survivors=0), 500.2)
    assert dmn.phase() is Phase.STOPPED and dmn.state.exit_code == 1
    [n] = notices(d)
    assert n.kind == "failed" and n.priority == "high" and "AttributeError" in n.body and "80 ms" in n.body
    assert d.actions[-1] == Exit(1)


@pytest.mark.parametrize("make", [Daemon, yielded, cooldown, backoff, failed])
def test_detection_failing_while_no_model_runs_exits_1_at_once(make: Callable[[], Daemon]) -> None:
    dmn = make()
    d = dmn.feed(DetectorFailed("the /proc scan thread failed"), 60_000.0)
    assert dmn.phase() is Phase.STOPPED and dmn.state.exit_code == 1
    assert of(d, StartModel) == [] and d.actions[-1] == Exit(1)
    assert notices(d)[-1].kind == "failed"


def test_detection_failing_during_a_signal_stop_keeps_exit_0() -> None:
    """Stopping anyway for Slurm's SIGTERM: exit 0 is what a requeue needs; the failure is only logged."""
    dmn = serving()
    dmn.feed(Shutdown("SIGTERM"), 500.0)
    assert_ignored(dmn, DetectorFailed("x"), 500.1)
    assert dmn.feed(StopDone(10.0, 0), 500.2).actions[-1] == Exit(0)


def test_detection_failing_during_an_idle_release_exits_1() -> None:
    dmn = serving(limits(idle_release_after=60.0))
    dmn.feed(TimerFired("idle", dmn.state.timer_token), 1000.0)
    assert dmn.phase() is Phase.STOPPING
    d = dmn.feed(DetectorFailed("x"), 1000.1)
    assert d.actions == () and dmn.phase() is Phase.STOPPING
    assert dmn.feed(StopDone(10.0, 0), 1000.2).actions[-1] == Exit(1)


def test_shutdown_while_yielding_does_not_stop_the_model_twice() -> None:
    dmn = yielding()
    d = dmn.feed(Shutdown("SIGINT"), 100.01)
    assert dmn.phase() is Phase.STOPPING
    assert d.actions == ()  # the yield's stop is already on its way
    d = dmn.feed(StopDone(40.0, 0), 100.05)
    assert dmn.phase() is Phase.STOPPED
    assert [n.kind for n in notices(d)] == ["stopped"]  # no "yielded" any more
    assert d.actions[-1] == Exit(0)


@pytest.mark.parametrize("make", [Daemon, yielded, cooldown, backoff, failed])
def test_shutdown_while_no_model_runs_exits_at_once(make: Callable[[], Daemon]) -> None:
    dmn = make()
    d = dmn.feed(Shutdown("SIGTERM"), 60_000.0)
    assert dmn.phase() is Phase.STOPPED
    assert dmn.state.exit_code == 0
    assert of(d, StopModel) == [] and of(d, StartModel) == []
    assert [type(a) for a in d.actions] == [Notify, Exit]
    assert notices(d)[0].kind == "stopped"
    assert d.actions[-1] == Exit(0)


@pytest.mark.parametrize("make", [starting, serving, yielding, Daemon, yielded, cooldown, backoff, failed])
def test_shutdown_twice_is_harmless(make: Callable[[], Daemon]) -> None:
    dmn = make()
    dmn.feed(Shutdown("SIGTERM"), 60_000.0)
    assert_ignored(dmn, Shutdown("SIGTERM"), 60_000.1)
    assert_ignored(dmn, Shutdown("SIGINT"), 60_000.2)
    if dmn.phase() is Phase.STOPPING:
        d = dmn.feed(StopDone(10.0, 0), 60_000.3)
        assert d.actions[-1] == Exit(0)
    assert dmn.phase() is Phase.STOPPED
    assert_ignored(dmn, Shutdown("SIGHUP"), 60_001.0)


@pytest.mark.parametrize("make", [cooldown, backoff])
def test_timers_armed_before_shutdown_never_restart_the_model(make: Callable[[], Daemon]) -> None:
    dmn = make()
    token = dmn.state.timer_token
    dmn.feed(Shutdown("SIGTERM"), 60_000.0)
    for name in ("cooldown", "backoff", "startup"):
        assert_ignored(dmn, TimerFired(name, token), 60_100.0)


def test_startup_timer_during_a_shutdown_stop_is_ignored() -> None:
    dmn = starting()
    token = dmn.state.timer_token
    dmn.feed(Shutdown("SIGTERM"), 5.0)
    assert_ignored(dmn, TimerFired("startup", token), LIMITS.startup_timeout)


def test_jobs_arriving_during_a_shutdown_stop_do_not_stop_again() -> None:
    dmn = serving()
    dmn.feed(Shutdown("SIGTERM"), 50.0)
    d = dmn.feed(JobSeen("1"), 50.01)
    assert d.actions == ()
    assert dmn.phase() is Phase.STOPPING


def test_nothing_happens_after_stopped() -> None:
    dmn = cooldown()
    dmn.feed(Shutdown("SIGTERM"), 300.0)
    events: list[Event] = [
        JobSeen("1"),
        JobGone("1"),
        ModelReady(),
        ModelExited(code=1, run=dmn.state.run),
        StopDone(1.0, 0),
        TimerFired("cooldown", dmn.state.timer_token),
        TimerFired("backoff", dmn.state.timer_token),
        TimerFired("startup", dmn.state.timer_token),
        Shutdown("SIGTERM"),
    ]
    for event in events:
        d = dmn.feed(event, 301.0)
        assert d.actions == ()
        assert dmn.phase() is Phase.STOPPED


# ---- a realistic race the policy gets wrong ----------------------------------------------------


def test_yielded_is_only_reported_once_every_requested_stop_has_finished() -> None:
    dmn = starting()
    stops = done = 0
    LIVE = -1  # replaced by the live timer token when fed
    events: list[tuple[Event, float]] = [
        (TimerFired("startup", LIVE), 900.0),  # -> backoff + StopModel("startup-timeout"), stop takes ~10 s
        (TimerFired("backoff", LIVE), 901.0),  # backoff (0.5..1 s) is shorter than the SIGTERM grace
        (JobSeen("4242", detect_ms=0.3), 902.0),  # run 2 is starting -> StopModel("yield")
        (StopDone(10_000.0, 0), 910.0),  # ... the *first* stop finishes
    ]
    for event, now in events:
        if isinstance(event, TimerFired) and event.token == LIVE:
            event = TimerFired(event.name, dmn.state.timer_token)
        done += isinstance(event, StopDone)
        d = dmn.feed(event, now)
        stops += len(of(d, StopModel))
        if any(n.kind == "yielded" for n in notices(d)):
            assert done >= stops, "yielded reported while a requested stop is still running"
    assert dmn.phase() is not Phase.YIELDED or done >= stops


# ---- property: long random runs ----------------------------------------------------------------


@dataclass
class World:
    """The outside world of one daemon life: which jobs, stops, runs and timers are out there."""

    rng: random.Random
    jobs: set[str] = field(default_factory=set)
    pending_stops: int = 0
    runs_started: int = 0
    swaps: int = 0
    tokens: dict[str, list[int]] = field(
        default_factory=lambda: {"cooldown": [], "backoff": [], "startup": [], "idle": []}
    )

    def next_event(self, state: State) -> Event:
        """Mostly what could really happen next, plus stale and duplicate events."""
        rng = self.rng
        r = rng.random()
        if r < 0.01:
            return Shutdown(rng.choice(["SIGTERM", "SIGINT", "SIGHUP"]))
        if r < 0.015:
            return DetectorFailed("the inotify reader thread ended")
        if r < 0.12:
            return JobSeen(rng.choice(["a", "b", "c"]), rng.choice([None, rng.uniform(0.05, 5.0)]))
        if r < 0.30:
            present = sorted(self.jobs)
            return JobGone(rng.choice(present) if present and rng.random() < 0.9 else rng.choice(["a", "b", "z"]))
        if r < 0.42:
            return ModelReady()
        if r < 0.52:
            run = state.run if rng.random() < 0.7 else rng.randint(0, max(state.run, 1))
            if rng.random() < 0.25:
                return ModelHung(run, "stopped answering /health")
            return ModelExited(code=rng.choice([None, 0, 1, -9, -15]), run=run)
        if r < 0.70 and self.pending_stops:
            return StopDone(rng.uniform(1, 12_000), rng.choice([0, 0, 0, 1]))
        if r < 0.76:
            self.swaps += 1
            target = ModelChoice(rng.choice(["m1", "m2", "m3"]), None, rng.choice([None, 5.0, 30.0]))
            return SwapRequested(f"swap-{self.swaps}", target)
        if r < 0.79:
            return Activity()
        name = rng.choice(list(self.tokens))
        issued = self.tokens[name]
        if issued and rng.random() < 0.8:
            token = issued[-1] if rng.random() < 0.7 else rng.choice(issued)
        else:
            token = rng.randint(0, state.timer_token + 1)
        return TimerFired(name, token)

    def react(self, event: Event, d: Decision) -> None:
        if isinstance(event, JobSeen):
            self.jobs.add(event.job)
        elif isinstance(event, JobGone):
            self.jobs.discard(event.job)
        elif isinstance(event, StopDone):
            self.pending_stops -= 1
        for a in d.actions:
            if isinstance(a, StopModel):
                self.pending_stops += 1
            elif isinstance(a, SetTimer):
                self.tokens[a.name].append(a.token)
            elif isinstance(a, StartModel):
                self.runs_started += 1


@dataclass
class Seen:
    """What the invariants need to remember across steps."""

    model_live: bool = False  # a StartModel has not yet been followed by a stop, an exit or a crash
    swaps_ended: set[str] = field(default_factory=set)  # swap ids that reported ready or failed
    exits: int = 0
    max_token: int = -1
    tunnel_up: bool = False  # what the SetTunnel actions so far asked for
    probing: bool = False  # what the WatchActivity actions so far asked for


def _check_step(before: State, event: Event, d: Decision, lim: Limits, seen: Seen) -> None:
    """Invariants of every step. With GPU awareness, a model may run beside a job on other GPUs and
    a foreign GPU process can be what we yield to: those two are checked by test_policy_gpus."""
    after, actions = d.state, d.actions
    starts = [a for a in actions if isinstance(a, StartModel)]
    stop_reasons = [a.reason for a in actions if isinstance(a, StopModel)]
    exits = [a for a in actions if isinstance(a, Exit)]
    timers = [a for a in actions if isinstance(a, SetTimer)]

    # StartModel only from a phase without a model (or with its stop asked for first in the same
    # decision: a swap's target that timed out, replaced by the model before it), only once per
    # decision, and run numbers count up. From failed only for a swap: a person asked for a model.
    if stop_reasons:
        assert len(stop_reasons) == 1
        seen.model_live = False
    exited = isinstance(event, ModelExited) and event.run == before.run  # its tree is gone already
    if exited:
        seen.model_live = False
    if starts:
        assert len(starts) == 1, actions
        if before.phase is Phase.SWAPPING:  # the swap's stop finished: its target starts
            assert isinstance(event, StopDone) and before.stops_pending == 1, (before, event)
        elif exited:  # a swap's target crashed while starting: the model before it comes back
            assert before.swap is not None and before.phase is Phase.STARTING, (before, event)
        elif not stop_reasons:
            assert before.phase not in MODEL_RUNNING and before.phase not in MODEL_STOPPING, (before.phase, event)
        else:
            assert before.phase is Phase.STARTING and stop_reasons == ["startup-timeout"], (before.phase, event)
            assert actions.index(starts[0]) > 0 and isinstance(actions[0], StopModel)
        assert before.phase not in (Phase.STOPPED, Phase.STOPPING), before.phase
        if before.phase is Phase.FAILED:
            assert isinstance(event, SwapRequested), event
        assert starts[0].run == before.run + 1 == after.run
        assert starts[0].model == after.model.name
        assert after.phase is Phase.STARTING
        assert not seen.model_live, f"second StartModel without a stop/exit/crash in between ({event})"
        seen.model_live = True
    else:
        assert after.run == before.run

    # Swaps: each one ends once (ready or failed) and says nothing after; one is open while State.swap says so.
    for u in (a for a in actions if isinstance(a, SwapUpdate)):
        assert u.id not in seen.swaps_ended, f"{u} after the swap ended"
        assert u.stage in ("stopping", "starting", "deferred", "ready", "failed"), u
        if u.stage in ("ready", "failed"):
            seen.swaps_ended.add(u.id)
    if after.swap is not None:
        assert after.swap.id not in seen.swaps_ended
        assert after.model == after.swap.target
    if isinstance(event, SwapRequested):
        updates = [a for a in actions if isinstance(a, SwapUpdate) and a.id == event.id]
        assert updates or (after.swap is not None and after.swap.id == event.id), (before.phase, actions)
    if after.phase is Phase.SWAPPING:
        assert after.swap is not None

    # Kill first, tell later: a yield's stop never comes with a notification.
    if "yield" in stop_reasons:
        assert not any(isinstance(a, Notify) for a in actions), actions
        assert before.phase in MODEL_RUNNING and after.phase is Phase.YIELDING
    # Stop actions go first in a decision.
    if stop_reasons:
        assert isinstance(actions[0], StopModel), actions

    # Exit: once, last, only into stopped; code 1 only when job detection failed (the daemon is blind).
    if isinstance(event, DetectorFailed) and before.phase not in (Phase.STOPPING, Phase.STOPPED):
        assert after.phase in (Phase.STOPPING, Phase.STOPPED), after.phase
        assert after.phase is Phase.STOPPED or before.phase in MODEL_RUNNING | MODEL_STOPPING or before.stops_pending
    if after.phase in MODEL_RUNNING:
        assert after.ending != "blind", "a model runs while job detection is down"
    if exits:
        code = 1 if after.ending == "blind" else 0
        assert exits == [Exit(code)] and actions[-1] == Exit(code)
        assert after.phase is Phase.STOPPED and after.exit_code == code
        seen.exits += 1
    assert seen.exits <= 1
    if after.phase is Phase.STOPPED:
        assert seen.exits == 1
    if before.phase is Phase.STOPPED:
        assert after.phase is Phase.STOPPED
        if isinstance(event, SwapRequested):  # refused, and said so
            assert actions == (SwapUpdate(event.id, "failed", "the daemon is stopping"),)
        else:
            assert actions == ()

    # Timer tokens: never go back; every SetTimer carries a fresh, strictly larger token.
    assert after.timer_token >= before.timer_token
    for t in timers:
        assert t.token > seen.max_token, (t, seen.max_token)
        assert t.token == after.timer_token
        seen.max_token = t.token
        if t.name == "startup":
            want = lim.startup_timeout if after.model.startup_timeout is None else after.model.startup_timeout
            assert t.delay == want and after.phase is Phase.STARTING
        elif t.name == "cooldown":
            assert t.delay == lim.resume_cooldown and after.phase is Phase.COOLDOWN
        elif t.name == "idle":
            assert after.phase is Phase.SERVING and lim.idle_release_after > 0
        else:
            assert t.name == "backoff" and after.phase is Phase.BACKOFF
            assert 0 < t.delay <= lim.restart_backoff_max

    # Outputs that follow the phase: open streams end exactly when serving does; the tunnel is up
    # exactly while tunnel_wanted says so (under TUNNEL_ON_YIELD=stop: only while serving).
    aborts = [a for a in actions if isinstance(a, AbortStreams)]
    left_serving = before.phase is Phase.SERVING and after.phase is not Phase.SERVING
    assert len(aborts) == (1 if left_serving else 0), (before.phase, after.phase, actions)
    for t in (a for a in actions if isinstance(a, SetTunnel)):
        assert t.up != seen.tunnel_up, f"{t} twice in a row"
        seen.tunnel_up = t.up
    assert seen.tunnel_up == tunnel_wanted(after, lim)
    if seen.tunnel_up:
        assert lim.tunnel and after.phase not in (Phase.INIT, Phase.STOPPING, Phase.STOPPED)
        assert after.phase is Phase.SERVING or not lim.tunnel_leaves_on_yield
    # The idle probe runs exactly while a model process may answer, and only with an idle release.
    for w in (a for a in actions if isinstance(a, WatchActivity)):
        assert w.on != seen.probing, f"{w} twice in a row"
        seen.probing = w.on
    assert seen.probing == activity_wanted(after, lim)
    if seen.probing:
        assert lim.idle_release_after > 0 and after.phase in MODEL_RUNNING
    # GPU release is confirmed once per finished yield, and only where NVML can say.
    confirms = [a for a in actions if isinstance(a, ConfirmRelease)]
    if confirms:
        assert lim.confirm_gpus and isinstance(event, StopDone) and before.phase is Phase.YIELDING
        assert len(confirms) == 1 and after.awaiting_release and after.last_yield is not None
        assert confirms[0].run == after.last_yield.run and confirms[0].gpus == frozenset(after.last_yield.gpus)

    # Phase bookkeeping people read in status.json.
    if after.phase is Phase.YIELDED and not lim.gpu_aware:
        assert after.jobs, "yielded with no job to yield to"
    if after.phase in MODEL_RUNNING and not lim.gpu_aware:
        assert not after.jobs, "a model runs while a job holds the node"
    if after.phase is Phase.FAILED:
        assert not starts and after.fast_failures >= lim.restart_limit
    if after.phase is Phase.SERVING:
        assert after.serving_since is not None
    assert after.phase in MODEL_RUNNING | MODEL_STOPPING | MODEL_DOWN


@pytest.mark.parametrize("seed", range(8))
def test_random_event_storms_keep_every_invariant(seed: int) -> None:
    """Many daemon lives under seeded random events; every invariant is checked after every step."""
    rng = random.Random(seed)
    visited: set[Phase] = set()
    lives = 0
    steps = 0
    while steps < 3000:
        lives += 1
        lim = limits(
            resume_cooldown=rng.choice([0.0, 5.0, 60.0]),
            restart_backoff_max=rng.choice([1.0, 8.0, 60.0]),
            restart_limit=rng.choice([1, 2, 3, 5, 10]),
            min_uptime=rng.choice([0.0, 10.0, 60.0]),
            startup_timeout=rng.choice([5.0, 900.0]),
            tunnel=rng.random() < 0.7,
            tunnel_leaves_on_yield=rng.random() < 0.5,
            idle_release_after=rng.choice([0.0, 0.0, 0.0, 600.0]),
        )
        initial = frozenset(rng.sample(["a", "b", "c"], rng.choice([0, 0, 1, 2])))
        world, seen = World(rng, jobs=set(initial)), Seen()
        state, now = State(), 0.0
        event: Event = Startup(initial)
        stuck = 0
        while steps < 3000 and stuck < 40:  # a new life once stopped or failed for a while
            steps += 1
            d = decide(state, event, now, lim, rng.random())
            _check_step(state, event, d, lim, seen)
            world.react(event, d)
            assert d.state.jobs == world.jobs, "the policy lost track of a job"
            assert d.state.run == world.runs_started
            state = d.state
            visited.add(state.phase)
            stuck = stuck + 1 if state.phase in (Phase.STOPPED, Phase.FAILED) else 0
            now += rng.choice([0.001, 0.5, 5.0, 70.0, 1000.0])
            event = world.next_event(state)
    assert lives > 3
    assert visited >= set(Phase) - {Phase.INIT}, set(Phase) - visited


# ---- a model on another host (LAN controller mode) ----------------------------------------------


def test_a_model_on_another_host_starts_and_keeps_serving_whatever_jobs_this_node_has() -> None:
    """This node's Slurm jobs and foreign GPU processes are not its host's: no yield, no wait."""
    remote = State(model=ModelChoice("spark", gpus=2, remote=True))
    dmn = Daemon(limits=limits(all_gpus=frozenset({0}), yield_on=YieldOn.ANY), state=remote)
    d = dmn.feed(Startup(frozenset({"4242"})), 0.0)
    assert dmn.phase() is Phase.STARTING and of(d, StartModel) == [StartModel(1, frozenset(), "spark")]
    dmn.feed(ModelReady(), 1.0)
    for event in (JobSeen("4243", detect_ms=0.4), GpuBusy(frozenset({0}), "pid 7 on GPU 0")):
        d = dmn.feed(event, 2.0)
        assert dmn.phase() is Phase.SERVING and not of(d, StopModel), d.actions
    # The same facts do stop a model of this node.
    local = Daemon(limits=dmn.limits, state=replace(dmn.state, model=ModelChoice("here", gpus=1)))
    d = local.feed(JobSeen("4244", detect_ms=0.4), 3.0)
    assert local.phase() is Phase.YIELDING and of(d, StopModel) == [StopModel("yield")]
