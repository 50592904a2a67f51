"""Restart backoff: capped exponential with "equal jitter" (pure, no clocks)."""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator

import pytest

from watchdog_llm.base.backoff import BASE_DELAY, backoff_delay


@pytest.fixture(autouse=True)
def no_leftover_processes() -> Iterator[None]:
    """These tests are pure and start no process: skip conftest's per-test process scan (~20 ms each)."""
    yield


CAP = 60.0
JITTERS = (0.0, 0.25, 0.5, 0.75, 1.0 - 1e-12, math.nextafter(1.0, 0.0))


def exponential(attempt: int, cap: float = CAP, base: float = BASE_DELAY) -> float:
    return min(cap, base * 2.0**attempt)


@pytest.mark.parametrize("jitter", JITTERS)
def test_delay_stays_between_half_the_capped_exponential_and_the_cap(jitter: float) -> None:
    for attempt in range(21):
        raw = exponential(attempt)
        delay = backoff_delay(attempt, cap=CAP, jitter=jitter)
        assert delay <= CAP, attempt
        assert raw / 2 <= delay <= raw, attempt


def test_no_jitter_gives_exactly_half_and_the_delay_grows_with_jitter() -> None:
    for attempt in range(21):
        raw = exponential(attempt)
        assert backoff_delay(attempt, cap=CAP, jitter=0.0) == raw / 2, attempt
        delays = [backoff_delay(attempt, cap=CAP, jitter=j) for j in JITTERS]
        assert delays == sorted(delays), attempt
        assert delays[-1] < raw or math.isclose(delays[-1], raw), attempt


def test_first_restart_waits_between_half_a_second_and_a_second() -> None:
    assert backoff_delay(0, cap=CAP, jitter=0.0) == 0.5
    assert 0.5 <= backoff_delay(0, cap=CAP, jitter=0.999) <= 1.0


@pytest.mark.parametrize("jitter", JITTERS)
def test_delay_never_shrinks_as_failures_pile_up(jitter: float) -> None:
    delays = [backoff_delay(n, cap=CAP, jitter=jitter) for n in range(40)]
    assert delays == sorted(delays)
    upper = [backoff_delay(n, cap=CAP, jitter=JITTERS[-1]) for n in range(40)]
    assert upper == sorted(upper)
    assert max(upper) <= CAP


def test_delay_reaches_the_cap_and_stays_there() -> None:
    # 2**6 = 64 > 60: from attempt 6 on the exponential is capped.
    for n in range(6, 60):
        assert backoff_delay(n, cap=CAP, jitter=0.0) == CAP / 2
        assert CAP / 2 <= backoff_delay(n, cap=CAP, jitter=0.999) <= CAP


def test_cap_below_the_base_delay_caps_the_very_first_restart() -> None:
    assert backoff_delay(0, cap=0.2, jitter=0.0) == pytest.approx(0.1)
    assert backoff_delay(10, cap=0.2, jitter=0.5) <= 0.2


def test_custom_base_scales_the_exponential() -> None:
    assert backoff_delay(3, cap=CAP, jitter=0.0, base=0.1) == pytest.approx(0.4)
    assert backoff_delay(2, cap=CAP, jitter=0.0, base=10.0) == 20.0  # 10 * 2**2 / 2
    assert backoff_delay(3, cap=CAP, jitter=0.0, base=10.0) == CAP / 2  # 80 capped to 60


def test_different_jitter_spreads_nodes_apart() -> None:
    a = backoff_delay(4, cap=CAP, jitter=0.1)
    b = backoff_delay(4, cap=CAP, jitter=0.9)
    assert a < b


@pytest.mark.parametrize("attempt", [61, 1000, 10**6, 2**63, sys.maxsize, 10**400])
def test_huge_attempt_numbers_do_not_overflow(attempt: int) -> None:
    delay = backoff_delay(attempt, cap=CAP, jitter=0.5)
    assert math.isfinite(delay)
    assert CAP / 2 <= delay <= CAP


def test_huge_attempt_with_an_infinite_cap_stays_finite() -> None:
    delay = backoff_delay(10**9, cap=math.inf, jitter=0.5)
    assert math.isfinite(delay)
    assert delay > 0


@pytest.mark.parametrize("jitter", [-1e-9, -0.5, 1.0, 1.5, math.inf, -math.inf, math.nan])
def test_jitter_outside_zero_to_one_is_rejected(jitter: float) -> None:
    with pytest.raises(ValueError, match="jitter"):
        backoff_delay(0, cap=CAP, jitter=jitter)


@pytest.mark.parametrize("attempt", [-1, -100])
def test_negative_attempt_is_rejected(attempt: int) -> None:
    with pytest.raises(ValueError, match="attempt"):
        backoff_delay(attempt, cap=CAP, jitter=0.5)
