"""What the public endpoint tells a user while the model is not serving: a pure function of the state.

Public messages name no job, user, pid or path (the URL is on the internet); the admin API has the
detail. Retry-After is an honest estimate: the time left on the timer that ends this phase plus how
long a start takes here (measured; the first start uses a guess).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from watchdog_llm.policy import Phase, State

DEFAULT_START_S = 60.0  # before any start was measured
UNKNOWN_WAIT_S = 60.0  # yielded: nobody knows when the job ends; this is when asking again makes sense


@dataclass(frozen=True, slots=True)
class Availability:
    serving: bool
    phase: str
    code: str  # machine-readable, stable: "model_yielded", "model_starting", ...
    message: str  # for people, safe to publish
    retry_after: int  # seconds (Retry-After header)
    retryable: bool


def typical_start(samples: list[float], startup_timeout: float) -> float:
    """Median of the measured start times, or a guess bounded by STARTUP_TIMEOUT."""
    if not samples:
        return min(DEFAULT_START_S, startup_timeout)
    s = sorted(samples)
    return s[len(s) // 2]


def availability(
    state: State, now: float, *, timer_left: float | None, start_s: float, cooldown_s: float
) -> Availability:
    """`timer_left`: seconds until the timer of the current phase fires (cooldown, backoff), if any."""
    p = state.phase

    def out(code: str, message: str, wait: float, retryable: bool = True) -> Availability:
        return Availability(False, p.value, code, message, max(1, math.ceil(wait)), retryable)

    if p is Phase.SERVING:
        return Availability(True, p.value, "serving", "serving", 0, True)
    if p is Phase.STARTING:
        left = max(start_s - (now - state.started_at), 5.0)  # slower than usual: ask again soon
        return out("model_starting", f"the model is starting; it should be ready in about {math.ceil(left)} s", left)
    if p in (Phase.YIELDING, Phase.YIELDED):
        rec = state.last_yield
        if rec is not None and not rec.job and not state.jobs:
            who = "another program is using the GPUs"
        else:
            who = "GPUs reclaimed by a Slurm job"
        wait = cooldown_s + start_s if state.jobs or p is Phase.YIELDING else UNKNOWN_WAIT_S
        return out("model_yielded", f"{who}; the model returns when the node is idle", max(wait, UNKNOWN_WAIT_S))
    if p is Phase.SWAPPING:
        target = state.model.name or "another model"
        return out(
            "model_swapping", f"the model is being swapped to {target}; back in about {math.ceil(start_s)} s", start_s
        )
    if p is Phase.COOLDOWN:
        wait = (timer_left if timer_left is not None else cooldown_s) + start_s
        return out("model_cooldown", f"the node is idle again; the model returns in about {math.ceil(wait)} s", wait)
    if p is Phase.BACKOFF:
        wait = (timer_left or 0.0) + start_s
        return out(
            "model_restarting", f"the model stopped unexpectedly; it restarts in about {math.ceil(wait)} s", wait
        )
    if p is Phase.FAILED:
        msg = "the model failed repeatedly and stays offline until its operator restarts the service"
        return out("model_failed", msg, 600, retryable=False)
    if p is Phase.INIT:
        return out("starting_up", "the service is starting", start_s)
    return out("shutting_down", "the service is shutting down", UNKNOWN_WAIT_S)
