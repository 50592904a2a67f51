"""The state machine with GPU awareness: jobs judged by their GPUs, foreign GPU processes, GPU choice,
NVML release confirmation, preemption inside a Slurm job and idle release. Pure: no processes."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import replace

import pytest
from test_policy import LIMITS, Daemon, Seen, _check_step, notices, of

from watchdog_llm.base.vocab import YieldOn
from watchdog_llm.policy import (
    MODEL_RUNNING,
    AbortStreams,
    Activity,
    Decision,
    Event,
    Exit,
    GpuBusy,
    GpusReleased,
    JobGone,
    JobGpus,
    JobSeen,
    Limits,
    ModelExited,
    ModelReady,
    Phase,
    SetTimer,
    Shutdown,
    StartModel,
    Startup,
    State,
    StopDone,
    StopModel,
    TimerFired,
    WatchActivity,
    decide,
    plan_gpus,
)


@pytest.fixture(autouse=True)
def no_leftover_processes() -> Iterator[None]:
    yield  # pure tests: no process scan


FOUR = frozenset({0, 1, 2, 3})
OVERLAP = replace(LIMITS, yield_on=YieldOn.OVERLAP, num_gpus=2, all_gpus=FOUR)


def serving_on(limits: Limits = OVERLAP, jobs: frozenset[str] = frozenset(), known: dict | None = None) -> Daemon:
    dmn = Daemon(limits=limits)
    for job, gpus in (known or {}).items():  # as the app does: jobs seen and looked up before Startup
        dmn.feed(JobSeen(job), 0.0)
        dmn.feed(JobGpus(job, gpus), 0.0)
    d = dmn.feed(Startup(jobs), 0.0)
    assert dmn.phase() is Phase.STARTING, dmn.state.reason
    [start] = of(d, StartModel)
    dmn.feed(ModelReady(), 10.0)
    assert start.gpus == (dmn.state.gpus if limits.gpu_aware else None)
    return dmn


def test_start_picks_the_highest_free_gpus() -> None:
    dmn = serving_on()
    assert dmn.state.gpus == {2, 3}


def test_start_avoids_gpus_of_jobs_already_running() -> None:
    dmn = serving_on(jobs=frozenset({"job_1"}), known={"job_1": frozenset({2, 3})})
    assert dmn.state.gpus == {0, 1}


def test_a_job_on_other_gpus_is_no_conflict() -> None:
    dmn = serving_on()
    d = dmn.feed(JobSeen("job_5", detect_ms=0.3), 100.0)
    assert d.actions == () and dmn.phase() is Phase.SERVING  # looked up first
    d = dmn.feed(JobGpus("job_5", frozenset({0})), 100.02)
    assert d.actions == () and dmn.phase() is Phase.SERVING
    d = dmn.feed(JobGpus("job_6", frozenset({3})), 100.03)  # a job we never saw (or already gone)
    assert d.actions == ()


def test_a_job_without_gpus_never_forces_a_yield() -> None:
    dmn = serving_on()
    dmn.feed(JobSeen("job_5"), 100.0)
    assert dmn.feed(JobGpus("job_5", frozenset()), 100.01).actions == ()
    assert dmn.phase() is Phase.SERVING


def test_a_job_on_one_of_our_gpus_takes_them_back() -> None:
    dmn = serving_on()
    dmn.feed(JobSeen("job_5", detect_ms=0.3), 100.0)
    d = dmn.feed(JobGpus("job_5", frozenset({1, 2}), detect_ms=0.3), 100.02)
    assert d.actions == (StopModel("yield"), AbortStreams())
    rec = dmn.state.last_yield
    assert rec is not None and rec.job == "job_5" and rec.gpus == (2, 3) and rec.detect_ms == 0.3
    assert rec.cause == "Slurm job 5 on GPU 2" and "job 5 on GPU 2" in dmn.state.reason


def test_a_job_whose_gpus_cannot_be_known_takes_them_back() -> None:
    dmn = serving_on()
    dmn.feed(JobSeen("job_5"), 100.0)
    assert dmn.feed(JobGpus("job_5", None), 100.5).actions == (StopModel("yield"), AbortStreams())
    assert "cannot be known" in dmn.state.reason


def test_yield_on_any_ignores_gpus() -> None:
    dmn = serving_on(replace(OVERLAP, yield_on=YieldOn.ANY))
    assert dmn.feed(JobSeen("job_5"), 100.0).actions == (StopModel("yield"), AbortStreams())


def test_without_gpu_awareness_overlap_means_any() -> None:
    dmn = serving_on(replace(LIMITS, yield_on=YieldOn.OVERLAP))
    assert dmn.state.gpus == frozenset()
    assert dmn.feed(JobSeen("job_5"), 100.0).actions == (StopModel("yield"), AbortStreams())


def test_foreign_process_on_our_gpu_yields_and_its_end_resumes() -> None:
    dmn = serving_on()
    assert dmn.feed(GpuBusy(frozenset({0}), "pid 9 on GPU 0"), 50.0).actions == ()  # not ours
    d = dmn.feed(GpuBusy(frozenset({0, 3}), "pid 9 on GPU 0, pid 10 on GPU 3"), 60.0)
    assert d.actions == (StopModel("yield"), AbortStreams())
    assert dmn.state.last_yield is not None and dmn.state.last_yield.job == ""
    assert "foreign process on GPU 3" in dmn.state.reason
    dmn.feed(StopDone(30.0, 0), 60.1)
    # GPUs 1 and 2 are free: enough for NUM_GPUS=2, so after the cooldown it starts there.
    assert dmn.phase() is Phase.COOLDOWN
    [start] = of(dmn.feed(TimerFired("cooldown", dmn.state.timer_token), 121.0), StartModel)
    assert start.gpus == {1, 2}
    dmn.feed(ModelReady(), 130.0)
    assert dmn.feed(GpuBusy(frozenset({0, 2, 3}), "pid 11 on GPU 2"), 140.0).actions == (
        StopModel("yield"),
        AbortStreams(),
    )
    dmn.feed(StopDone(30.0, 0), 140.1)
    assert dmn.phase() is Phase.YIELDED and "1 free GPU(s), 2 needed" in dmn.state.reason
    dmn.feed(GpuBusy(frozenset(), ""), 150.0)  # every foreign process gone
    assert dmn.phase() is Phase.COOLDOWN


def test_too_few_free_gpus_blocks_a_start_until_one_frees() -> None:
    dmn = serving_on()
    dmn.feed(JobSeen("job_5"), 100.0)
    dmn.feed(JobGpus("job_5", frozenset({0, 1, 3})), 100.01)
    dmn.feed(StopDone(20.0, 0), 100.1)
    assert dmn.phase() is Phase.YIELDED and "1 free GPU(s), 2 needed" in dmn.state.reason
    d = dmn.feed(JobGone("job_5"), 200.0)
    assert dmn.phase() is Phase.COOLDOWN
    [timer] = of(d, SetTimer)
    d = dmn.feed(TimerFired("cooldown", timer.token), 260.0)
    [start] = of(d, StartModel)
    assert start.gpus == {2, 3}


def test_a_pending_lookup_blocks_a_start_but_not_a_running_model() -> None:
    dmn = Daemon(limits=OVERLAP)
    dmn.feed(Startup(frozenset()), 0.0)
    dmn.feed(ModelReady(), 1.0)
    dmn.feed(JobSeen("job_5"), 100.0)
    dmn.feed(JobGpus("job_5", frozenset({3})), 100.01)
    dmn.feed(StopDone(20.0, 0), 100.1)
    dmn.feed(JobGone("job_5"), 150.0)
    assert dmn.phase() is Phase.COOLDOWN
    token = dmn.state.timer_token
    assert dmn.feed(JobSeen("job_6"), 151.0).actions == ()  # arrives in the cooldown: it goes on
    assert dmn.phase() is Phase.COOLDOWN and dmn.state.timer_token == token
    dmn.feed(JobGpus("job_6", frozenset({0})), 151.1)  # on another GPU: the same cooldown goes on
    assert dmn.phase() is Phase.COOLDOWN and dmn.state.timer_token == token
    [start] = of(dmn.fire("cooldown", 210.0), StartModel)
    assert start.gpus == {2, 3}


def _cooldown_over_during_a_lookup() -> Daemon:
    """Yielded to job_5 on GPU 3, job_5 gone, and the cooldown runs out while job_6 is looked up."""
    dmn = serving_on()
    dmn.feed(JobSeen("job_5"), 100.0)
    dmn.feed(JobGpus("job_5", frozenset({3})), 100.01)
    dmn.feed(StopDone(20.0, 0), 100.1)
    dmn.feed(JobGone("job_5"), 150.0)
    dmn.feed(JobSeen("job_6"), 209.9)
    assert dmn.fire("cooldown", 210.0).actions == ()  # job_6's GPUs unknown yet: no start
    assert dmn.phase() is Phase.COOLDOWN and "looking up" in dmn.state.reason
    return dmn


def test_a_cooldown_that_ends_during_a_lookup_starts_when_it_answers() -> None:
    dmn = _cooldown_over_during_a_lookup()
    [start] = of(dmn.feed(JobGpus("job_6", frozenset({0})), 210.2), StartModel)  # at once, no new cooldown
    assert start.gpus == {2, 3}


def test_a_cooldown_that_ends_during_a_lookup_waits_if_the_job_takes_our_gpus() -> None:
    dmn = _cooldown_over_during_a_lookup()
    assert of(dmn.feed(JobGpus("job_6", frozenset({0, 1, 2})), 210.2), StartModel) == []  # one left: wait
    assert dmn.phase() is Phase.YIELDED and "1 free GPU(s), 2 needed" in dmn.state.reason


def test_hidden_jobs_do_not_take_gpus_slurm_allocated_to_us() -> None:
    lim = replace(LIMITS, yield_on=YieldOn.OVERLAP, num_gpus=2, fixed_gpus=frozenset({0, 1}), unknown_conflicts=False)
    dmn = serving_on(lim)
    dmn.feed(JobSeen("job_9"), 100.0)
    assert dmn.feed(JobGpus("job_9", None), 100.1).actions == ()  # PrivateData: Slurm can't give ours away
    assert dmn.phase() is Phase.SERVING


def test_a_late_confirmation_of_an_earlier_yield_is_not_this_one() -> None:
    dmn = serving_on(replace(OVERLAP, confirm_gpus=True, resume_cooldown=1.0))
    first_run = dmn.state.run
    dmn.feed(JobSeen("job_5"), 100.0)
    dmn.feed(JobGpus("job_5", frozenset({3})), 100.01)
    dmn.feed(StopDone(40.0, 0), 100.05)
    dmn.feed(JobGone("job_5"), 101.0)
    dmn.fire("cooldown", 102.0)
    dmn.feed(ModelReady(), 103.0)
    dmn.feed(JobSeen("job_6"), 104.0)
    d = dmn.feed(JobGpus("job_6", frozenset({2})), 104.01)
    assert d.actions == (StopModel("yield"), AbortStreams())  # no notice yet
    [first] = notices(dmn.feed(StopDone(30.0, 0), 104.05))  # the first yield's notice, unconfirmed
    assert "Slurm job 5" in first.body and "memory free" not in first.body
    assert notices(dmn.feed(GpusReleased(first_run, 5000.0, 0), 105.0)) == []  # late, about yield 1
    [second] = notices(dmn.feed(GpusReleased(dmn.state.run, 80.0, 0), 105.1))
    assert "Slurm job 6" in second.body and "memory free 80 ms" in second.body


def test_a_shutdown_before_the_confirmation_still_sends_the_yield_notice() -> None:
    dmn = serving_on(replace(OVERLAP, confirm_gpus=True))
    dmn.feed(JobSeen("job_5"), 100.0)
    dmn.feed(JobGpus("job_5", frozenset({3})), 100.01)
    dmn.feed(StopDone(40.0, 0), 100.05)
    d = dmn.feed(Shutdown("SIGTERM"), 100.1)
    kinds = [n.kind for n in notices(d)]
    assert kinds == ["yielded", "stopped"] and d.actions[-1] == Exit(0)


def test_fixed_gpus_are_used_as_given_and_block_when_taken() -> None:
    lim = replace(LIMITS, yield_on=YieldOn.OVERLAP, num_gpus=1, fixed_gpus=frozenset({1}))
    dmn = Daemon(limits=lim)
    dmn.feed(JobSeen("job_2"), 0.0)
    dmn.feed(JobGpus("job_2", frozenset({1})), 0.0)
    d = dmn.feed(Startup(frozenset()), 0.0)
    assert dmn.phase() is Phase.YIELDED and "our GPU 1 in use" in dmn.state.reason
    assert of(d, StartModel) == []
    dmn.feed(JobGone("job_2"), 5.0)
    [timer] = of(dmn.last, SetTimer)
    [start] = of(dmn.feed(TimerFired("cooldown", timer.token), 70.0), StartModel)
    assert start.gpus == {1}


def test_yield_notice_waits_for_nvml_confirmation() -> None:
    dmn = serving_on(replace(OVERLAP, confirm_gpus=True))
    dmn.feed(JobSeen("job_5", detect_ms=0.5), 100.0)
    dmn.feed(JobGpus("job_5", frozenset({3}), detect_ms=0.5, lookup_ms=10.0), 100.01)
    assert dmn.state.last_yield is not None and dmn.state.last_yield.detected_at == pytest.approx(100.0)
    assert notices(dmn.feed(StopDone(40.0, 0), 100.05)) == []
    assert dmn.state.awaiting_release
    [n] = notices(dmn.feed(GpusReleased(dmn.state.run, 95.0, 0), 100.1))
    assert n.kind == "yielded" and "GPU 2,3 memory free 95 ms after detection" in n.body
    assert "its GPUs read from scontrol in 10 ms" in n.body and "detected 0.5 ms" in n.body
    rec = dmn.state.last_yield
    assert rec is not None and rec.gpu_release_ms == 95.0
    assert notices(dmn.feed(GpusReleased(dmn.state.run, 99.0, 0), 100.2)) == []  # only once


def test_memory_still_held_after_a_yield_is_a_loud_notice() -> None:
    dmn = serving_on(replace(OVERLAP, confirm_gpus=True))
    dmn.feed(GpuBusy(frozenset({3}), "pid 7 on GPU 3"), 100.0)
    dmn.feed(StopDone(40.0, 0), 100.05)
    [n] = notices(dmn.feed(GpusReleased(dmn.state.run, 30_000.0, 2), 130.0))
    assert n.priority == "high" and "2 process(es) of ours still hold GPU memory" in n.body


def test_shutdown_inside_a_slurm_job_is_a_preemption_with_time_served() -> None:
    dmn = serving_on(replace(LIMITS, own_job="77"))
    d = dmn.feed(Shutdown("SIGTERM"), 10.0 + 7260.0)
    assert d.actions == (StopModel("shutdown"), AbortStreams())
    d = dmn.feed(StopDone(310.0, 0), 7270.5)
    [n] = notices(d)
    assert n.kind == "preempted" and "77" in n.title
    assert "served 2 h 01 min" in n.body and "310 ms" in n.body and "exiting 0" in n.body
    assert d.actions[-1] == Exit(0)


def test_shutdown_while_yielded_inside_a_job_still_says_preempted() -> None:
    dmn = Daemon(limits=replace(LIMITS, own_job="77"))
    dmn.feed(Startup(frozenset({"job_3"})), 0.0)
    d = dmn.feed(Shutdown("SIGTERM"), 5.0)
    [n] = notices(d)
    assert n.kind == "preempted" and "served 0 s" in n.body and d.actions[-1] == Exit(0)


def test_idle_release_stops_and_exits_after_the_quiet_period() -> None:
    lim = replace(LIMITS, idle_release_after=600.0, own_job="77")
    dmn = Daemon(limits=lim)
    dmn.feed(Startup(frozenset()), 0.0)
    d = dmn.feed(ModelReady(), 10.0)
    [timer] = of(d, SetTimer)
    assert timer.name == "idle" and timer.delay == 600.0
    dmn.feed(Activity(), 400.0)
    d = dmn.feed(TimerFired("idle", timer.token), 610.0)  # used at 400: look again at 1000
    [again] = of(d, SetTimer)
    assert again.delay == pytest.approx(390.0) and dmn.phase() is Phase.SERVING
    d = dmn.feed(TimerFired("idle", again.token), 1000.0)
    assert d.actions == (StopModel("idle"), AbortStreams(), WatchActivity(False)) and dmn.phase() is Phase.STOPPING
    d = dmn.feed(StopDone(200.0, 0), 1000.3)
    [n] = notices(d)
    assert n.kind == "released" and "no request for 10 min" in n.body and "served 16 min" in n.body
    assert d.actions[-1] == Exit(0)


def test_idle_timer_of_an_earlier_run_is_stale() -> None:
    lim = replace(LIMITS, idle_release_after=600.0)
    dmn = Daemon(limits=lim)
    dmn.feed(Startup(frozenset()), 0.0)
    [timer] = of(dmn.feed(ModelReady(), 10.0), SetTimer)
    dmn.feed(JobSeen("job_1"), 20.0)
    assert dmn.feed(TimerFired("idle", timer.token), 700.0).actions == ()


def test_signal_during_idle_release_ends_as_a_signal() -> None:
    dmn = Daemon(limits=replace(LIMITS, idle_release_after=60.0))
    dmn.feed(Startup(frozenset()), 0.0)
    [timer] = of(dmn.feed(ModelReady(), 1.0), SetTimer)
    dmn.feed(TimerFired("idle", timer.token), 61.0)
    assert dmn.feed(Shutdown("SIGTERM"), 61.1).actions == ()  # the stop already runs
    [n] = notices(dmn.feed(StopDone(100.0, 0), 61.2))
    assert n.kind == "stopped"


def test_plan_gpus_explains_what_blocks() -> None:
    st = State(jobs=frozenset({"a", "b"}), job_gpus={"a": frozenset({0, 1, 2})}, busy=frozenset({3}))
    assert "looking up" in str(plan_gpus(st, OVERLAP)) and "b" in str(plan_gpus(st, OVERLAP))
    st = replace(st, job_gpus={**st.job_gpus, "b": frozenset()})
    why = plan_gpus(st, OVERLAP)
    assert why == "0 free GPU(s), 2 needed: a on GPU 0,1,2; a foreign process on GPU 3"


# ---- random storms with GPU awareness -----------------------------------------------------------


def _event(rng: random.Random, state: State, stops: int) -> Event:
    r = rng.random()
    job = rng.choice(["j1", "j2", "j3"])
    if r < 0.0005:
        return Shutdown("SIGTERM")
    if r < 0.15:
        return JobSeen(job)
    if r < 0.25:
        return JobGone(job)
    if r < 0.40:
        return JobGpus(job, rng.choice([None, frozenset(), frozenset({0}), frozenset({3}), frozenset({1, 2})]))
    if r < 0.50:
        return GpuBusy(rng.choice([frozenset(), frozenset({0}), frozenset({2})]))
    if r < 0.60:
        return ModelReady()
    if r < 0.65:
        return ModelExited(1, state.run)
    if r < 0.80 and stops:
        return StopDone(10.0, 0)
    if r < 0.85:
        return GpusReleased(state.run - rng.choice([0, 0, 1]), 20.0)
    return TimerFired(rng.choice(["cooldown", "backoff", "startup"]), state.timer_token)


@pytest.mark.parametrize("seed", range(6))
def test_gpu_storms_never_run_the_model_on_a_taken_gpu(seed: int) -> None:
    """Under random jobs, lookups and foreign processes: every start uses NUM_GPUS GPUs that no known
    job and no foreign process holds, and a model never keeps running on a GPU somebody else holds."""
    rng = random.Random(seed)
    lim = replace(OVERLAP, resume_cooldown=5.0, restart_limit=1000, confirm_gpus=seed % 2 == 0, tunnel=seed % 3 != 0)
    state, now, stops = State(), 0.0, 0
    event: Event = Startup(frozenset())
    seen = Seen()
    starts = 0
    for _ in range(3000):
        d = decide(state, event, now, lim, rng.random())
        _check_step_gpu(state, event, d, lim, seen)
        stops += sum(isinstance(a, StopModel) for a in d.actions) - isinstance(event, StopDone)
        state = d.state
        for a in d.actions:
            if isinstance(a, StartModel):
                starts += 1
                assert a.gpus is not None and len(a.gpus) == 2
                taken = state.busy.union(*(g for j, g in state.job_gpus.items() if g and j in state.jobs))
                assert not (a.gpus & taken), (a, state)
                assert all(j in state.job_gpus for j in state.jobs), "started before a lookup finished"
                assert all(state.job_gpus[j] is not None for j in state.jobs)
        if state.phase in MODEL_RUNNING:
            for j in state.jobs:
                g = state.job_gpus.get(j, frozenset())
                assert g is not None and not (g & state.gpus), (j, g, state.gpus, event)
            assert not (state.busy & state.gpus)
        if state.phase is Phase.STOPPED:
            break
        now += rng.choice([0.01, 1.0, 10.0])
        event = _event(rng, state, stops)
    assert starts > 3


def _check_step_gpu(before: State, event: Event, d: Decision, lim: Limits, seen: Seen) -> None:
    _check_step(before, event, d, lim, seen)
    if before.phase is Phase.YIELDED and d.state.phase is Phase.COOLDOWN:
        assert not isinstance(plan_gpus(d.state, lim, ignore_pending=True), str), "a cooldown while blocked"
