"""ON_DEMAND: a request that names another catalog model swaps to it and waits while it loads,
as llama-swap does, with the rules that keep it from hurting anyone:

- never while the serving model has requests in flight (they finish first), nor before it has
  served MIN_RESIDENCY seconds (a storm of requests for two models cannot thrash faster);
- never past the swap lock (its holder decides what serves: the request gets 409 saying so);
- at most ON_DEMAND_QUEUE requests wait for one model (503 above), each at most ON_DEMAND_WAIT s;
- a yield is not waited out: the waiting requests get the same 503 as everyone else;
- a model that fails to start is not tried again for the same requests: they get 503
  model_start_failed with its reason, and the model that served before serves again.

The waits are event-driven: every decision of the daemon and the end of the last request in
flight wake them (`pulse`); a timer covers the rest of a residency.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from watchdog_llm.availability import Availability
from watchdog_llm.base.vocab import SwapStage
from watchdog_llm.coordination.core import CoordError
from watchdog_llm.coordination.swap import SwapRecord
from watchdog_llm.http.gateway import Refusal
from watchdog_llm.metrics import Metrics
from watchdog_llm.policy import Phase, State

# While these last the model that will serve next is being decided or started: wait and see.
_UNDER_WAY = frozenset({Phase.STARTING, Phase.SWAPPING, Phase.INIT})


@dataclass(frozen=True, slots=True)
class _Wait:
    at_most: float = math.inf  # seconds: a decision or the end of the last request may come sooner


@dataclass(frozen=True, slots=True)
class OnDemandConfig:
    wait: float  # ON_DEMAND_WAIT
    queue: int  # ON_DEMAND_QUEUE
    min_residency: float  # MIN_RESIDENCY


class OnDemand:
    def __init__(
        self,
        cfg: OnDemandConfig,
        state: Callable[[], State],
        availability: Callable[[], Availability],
        in_flight: Callable[[], int],
        swap: Callable[[str], None],  # raises CoordError (the swap gate's answer)
        swaps: Callable[[], list[SwapRecord]],  # the recent swaps, oldest first
        metrics: Metrics,
        log: logging.Logger,
    ) -> None:
        self.cfg = cfg
        self.state = state
        self.availability = availability
        self.in_flight = in_flight
        self.swap = swap
        self.swaps = swaps
        self.metrics = metrics
        self.log = log
        self.waiting: dict[str, int] = {}
        self._changed = asyncio.Event()

    def pulse(self) -> None:
        """Something changed (a decision, the last request in flight ended): waiters look again."""
        if self.waiting:
            self._changed.set()
            self._changed = asyncio.Event()

    async def demand(self, entry: str, consumer: str) -> Refusal | None:
        queued = self.waiting.get(entry, 0)
        if queued >= self.cfg.queue:
            msg = f"{queued} requests already wait for model {entry} (ON_DEMAND_QUEUE); retry later"
            return Refusal(503, "queue_full", msg, retry_after=10)
        self.waiting[entry] = queued + 1
        self.metrics.demand_waiting.labels(entry).inc()
        t0 = time.monotonic()
        since = time.time()  # a swap to it that fails after this is this request's answer
        deadline = t0 + self.cfg.wait
        outcome: Refusal | _Wait | None = _Wait()
        try:
            while True:
                outcome = self._failed(entry, since) or self._step(entry, consumer)
                if not isinstance(outcome, _Wait):
                    return outcome
                left = deadline - time.monotonic()
                if left <= 0:
                    msg = f"model {entry} did not become ready within {self.cfg.wait:g} s (ON_DEMAND_WAIT)"
                    outcome = Refusal(503, "model_loading", msg, retry_after=30)
                    return outcome
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), min(left, outcome.at_most))
        finally:
            self.waiting[entry] -= 1
            if not self.waiting[entry]:
                del self.waiting[entry]
            self.metrics.demand_waiting.labels(entry).dec()
            how = "served" if outcome is None else outcome.code if isinstance(outcome, Refusal) else "gone"
            self.metrics.demand_wait.labels(entry, how).observe(time.monotonic() - t0)

    def _failed(self, entry: str, since: float) -> Refusal | None:
        """A swap to `entry` that failed while this request waited: the previous model serves
        again, and the request is told why rather than trying the same failure once more."""
        rec = next((r for r in reversed(self.swaps()) if r.model == entry and r.created_at >= since - 1), None)
        if rec is None or rec.state is not SwapStage.FAILED:
            return None
        why = rec.error or rec.detail
        return Refusal(503, "model_start_failed", f"model {entry} failed to start: {why}", retry_after=60)

    def _step(self, entry: str, consumer: str) -> Refusal | _Wait | None:
        """None: it serves; a Refusal; or wait."""
        st = self.state()
        if st.phase is Phase.SERVING and st.model.name == entry:
            return None
        if st.phase not in _UNDER_WAY and st.phase is not Phase.SERVING:
            a = self.availability()  # yielded, cooling down, failed, stopping: what everyone gets
            return Refusal(503, a.code, a.message, a.retry_after if a.retryable else None)
        if st.phase is not Phase.SERVING or st.swap is not None:
            return _Wait()  # a start or a swap is under way: its end is a decision
        if self.in_flight():
            return _Wait()  # the last one's end pulses
        served = time.monotonic() - (st.serving_since or time.monotonic())
        if served < self.cfg.min_residency:
            return _Wait(self.cfg.min_residency - served)
        try:
            self.swap(entry)
        except CoordError as e:
            if e.code == "swap_in_progress":
                return _Wait()
            if e.status == 423:
                lock = e.extra.get("lock") or {}
                holder = lock.get("holder", "someone")
                msg = f"model {entry} is not loaded, and the swap lock is held by {holder}: it decides what serves"
                return Refusal(409, "model_not_loaded", msg)
            return Refusal(e.status, e.code, e.message, 10 if e.retryable else None)
        self.metrics.demand_swaps.labels(entry).inc()
        self.log.info("on demand: swapping to %s for a request (consumer %s)", entry, consumer or "-")
        return _Wait()
