"""Model swaps in the pure state machine: what a swap stops, starts, reports and gives way to.

No processes, no clocks: times are plain numbers in seconds (see test_policy.py for the helpers).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from test_policy import LIMITS, Daemon, cooldown, limits, notices, of, serving, starting, yielded

from watchdog_llm.base.vocab import YieldOn
from watchdog_llm.policy import (
    JobGone,
    JobSeen,
    ModelChoice,
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
    SwapRequested,
    SwapUpdate,
)

OLD = ModelChoice("old")
NEW = ModelChoice("new", startup_timeout=120.0)


@pytest.fixture(autouse=True)
def no_leftover_processes() -> Iterator[None]:
    yield  # pure: no process scan


def updates(d: object) -> list[tuple[str, str]]:
    return [(a.id, a.stage) for a in d.actions if isinstance(a, SwapUpdate)]  # type: ignore[attr-defined]


def serving_old() -> Daemon:
    dmn = Daemon(state=State(model=OLD))
    dmn.feed(Startup(frozenset()), 0.0)
    dmn.feed(ModelReady(), 10.0)
    assert dmn.phase() is Phase.SERVING
    return dmn


def test_swap_while_serving_stops_first_then_starts_the_target_then_reports_ready() -> None:
    dmn = serving_old()
    d = dmn.feed(SwapRequested("s1", NEW), 100.0)
    assert isinstance(d.actions[0], StopModel) and d.actions[0].reason == "swap"  # the stop goes out first
    assert dmn.phase() is Phase.SWAPPING
    assert updates(d) == [("s1", "stopping")]
    assert not of(d, StartModel)  # never two models at once

    d = dmn.feed(StopDone(800.0, 0), 101.0)
    assert of(d, StartModel) == [StartModel(2, None, "new")]
    assert next(t for t in of(d, SetTimer) if t.name == "startup").delay == 120.0  # the target's own timeout
    assert updates(d) == [("s1", "starting")]
    assert dmn.phase() is Phase.STARTING

    d = dmn.feed(ModelReady(), 130.0)
    assert updates(d) == [("s1", "ready")]
    assert [n.kind for n in notices(d)] == ["swapped"]
    assert "new" in notices(d)[0].body
    assert dmn.state.swap is None and dmn.state.model == NEW


def test_swap_to_the_model_already_serving_is_ready_at_once_without_a_restart() -> None:
    dmn = serving_old()
    d = dmn.feed(SwapRequested("s1", OLD), 100.0)
    assert updates(d) == [("s1", "ready")]
    assert not of(d, StopModel) and dmn.phase() is Phase.SERVING


def test_swap_while_yielded_is_deferred_and_happens_on_resume() -> None:
    dmn = yielded()
    d = dmn.feed(SwapRequested("s1", NEW), 150.0)
    assert updates(d) == [("s1", "deferred")]
    assert not of(d, StartModel) and not of(d, StopModel)
    assert dmn.phase() is Phase.YIELDED
    dmn.feed(JobGone("4242"), 200.0)
    d = dmn.fire("cooldown", 260.0)
    assert of(d, StartModel) == [StartModel(2, None, "new")]
    assert updates(d) == [("s1", "starting")]
    d = dmn.feed(ModelReady(), 280.0)
    assert updates(d) == [("s1", "ready")]


def test_swap_during_cooldown_is_deferred_until_the_cooldown_ends() -> None:
    dmn = cooldown()
    d = dmn.feed(SwapRequested("s1", NEW), 210.0)
    assert updates(d) == [("s1", "deferred")]
    assert "cooldown" in d.actions[0].detail  # type: ignore[union-attr]
    d = dmn.fire("cooldown", 260.0)
    assert of(d, StartModel)[0].model == "new"


def test_a_job_arriving_mid_swap_wins_and_the_swap_is_deferred() -> None:
    dmn = serving_old()
    dmn.feed(SwapRequested("s1", NEW), 100.0)
    d = dmn.feed(JobSeen("77", detect_ms=0.2), 100.5)
    assert dmn.phase() is Phase.YIELDING
    assert not of(d, StopModel)  # the swap's stop is already killing the tree: no second one
    assert updates(d) == [("s1", "deferred")]
    d = dmn.feed(StopDone(900.0, 0), 101.0)
    assert dmn.phase() is Phase.YIELDED and not of(d, StartModel)
    assert [n.kind for n in notices(d)] == ["yielded"]
    dmn.feed(JobGone("77"), 200.0)
    d = dmn.fire("cooldown", 260.0)
    assert of(d, StartModel)[0].model == "new"
    assert updates(d) == [("s1", "starting")]


def test_a_job_arriving_while_the_target_starts_yields_and_defers_the_swap() -> None:
    dmn = serving_old()
    dmn.feed(SwapRequested("s1", NEW), 100.0)
    dmn.feed(StopDone(800.0, 0), 101.0)
    d = dmn.feed(JobSeen("77"), 105.0)
    assert of(d, StopModel) == [StopModel("yield")]
    assert updates(d) == [("s1", "deferred")]


def test_target_crashing_while_starting_fails_the_swap_and_brings_back_the_previous_model() -> None:
    dmn = serving_old()
    dmn.feed(SwapRequested("s1", NEW), 100.0)
    dmn.feed(StopDone(800.0, 0), 101.0)
    d = dmn.feed(ModelExited(1, run=dmn.state.run, why="exited with code 1"), 105.0)
    assert updates(d) == [("s1", "failed")]
    assert [n.kind for n in notices(d)] == ["swap_failed"]
    assert of(d, StartModel) == [StartModel(3, None, "old")]
    assert dmn.state.model == OLD and dmn.state.swap is None
    assert dmn.state.fast_failures == 0  # the old model did nothing wrong
    d = dmn.feed(ModelReady(), 120.0)
    assert not updates(d) and dmn.phase() is Phase.SERVING


def test_target_not_ready_in_time_is_stopped_and_the_previous_model_comes_back() -> None:
    dmn = serving_old()
    dmn.feed(SwapRequested("s1", NEW), 100.0)
    dmn.feed(StopDone(800.0, 0), 101.0)
    d = dmn.fire("startup", 221.0)
    assert d.actions[0] == StopModel("startup-timeout")  # the hung target dies before the old one starts
    assert updates(d) == [("s1", "failed")]
    assert "not ready after 120 s" in next(a for a in d.actions if isinstance(a, SwapUpdate)).detail
    assert of(d, StartModel) == [StartModel(3, None, "old")]
    assert [t.delay for t in of(d, SetTimer)] == [LIMITS.startup_timeout]  # the old model's own timeout


def test_a_new_swap_replaces_a_deferred_one() -> None:
    dmn = yielded()
    dmn.feed(SwapRequested("s1", NEW), 150.0)
    d = dmn.feed(SwapRequested("s2", ModelChoice("third")), 151.0)
    assert updates(d) == [("s1", "failed"), ("s2", "deferred")]
    assert dmn.state.model.name == "third"


def test_swap_after_the_model_failed_starts_the_target_at_once() -> None:
    dmn = starting(limits(restart_limit=1))
    dmn.feed(ModelExited(1, run=1), 1.0)
    assert dmn.phase() is Phase.FAILED
    d = dmn.feed(SwapRequested("s1", NEW), 5.0)
    assert of(d, StartModel)[0].model == "new"
    assert updates(d) == [("s1", "starting")]
    # With nothing to go back to, a failing target counts like any crash.
    d = dmn.feed(ModelExited(1, run=dmn.state.run), 6.0)
    assert updates(d) == [("s1", "failed")]
    assert dmn.phase() is Phase.FAILED


def test_swap_while_shutting_down_fails_at_once() -> None:
    dmn = serving()
    dmn.feed(Shutdown("SIGTERM"), 50.0)
    d = dmn.feed(SwapRequested("s1", NEW), 51.0)
    assert d.actions == (SwapUpdate("s1", "failed", "the daemon is stopping"),)


def test_shutdown_mid_swap_waits_for_the_stop_and_leaves_the_swap_open_for_the_next_start() -> None:
    dmn = serving_old()
    dmn.feed(SwapRequested("s1", NEW), 100.0)
    d = dmn.feed(Shutdown("SIGTERM"), 100.2)
    assert not of(d, StopModel)  # the swap's stop is already running
    d = dmn.feed(StopDone(500.0, 0), 100.7)
    assert dmn.phase() is Phase.STOPPED
    assert dmn.state.swap is not None and dmn.state.model == NEW  # what the app persists


def test_target_gpu_count_decides_the_gpus_chosen() -> None:
    lim = limits(yield_on=YieldOn.OVERLAP, all_gpus=frozenset({0, 1, 2, 3}), num_gpus=1)
    dmn = Daemon(limits=lim, state=State(model=OLD))
    d = dmn.feed(Startup(frozenset()), 0.0)
    assert of(d, StartModel)[0].gpus == frozenset({3})
    dmn.feed(ModelReady(), 5.0)
    dmn.feed(SwapRequested("s1", ModelChoice("big", gpus=3)), 10.0)
    d = dmn.feed(StopDone(100.0, 0), 11.0)
    assert of(d, StartModel)[0].gpus == frozenset({1, 2, 3})  # highest free first
