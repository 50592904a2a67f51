"""Is anyone using the model? Read from vLLM's own Prometheus counters (for IDLE_RELEASE_AFTER).

vLLM serves `/metrics` without the API key: `vllm:num_requests_running`, `vllm:num_requests_waiting`
and `vllm:request_success_total`. A request in flight, or a finished-request count that moved since
the last look, is activity. Our own model on loopback, a few times a minute: nothing like polling
cgroupfs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import httpx
from prometheus_client.parser import text_string_to_metric_families

from watchdog_llm.supervise.probes import Address, probe_client

IN_FLIGHT = ("vllm:num_requests_running", "vllm:num_requests_waiting")
FINISHED = "vllm:request_success_total"


def read_counters(text: str) -> tuple[float, float]:
    """(requests in flight, requests finished) from a Prometheus text exposition."""
    in_flight = finished = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in IN_FLIGHT:
                in_flight += sample.value
            elif sample.name == FINISHED:
                finished += sample.value
    return in_flight, finished


def probe_interval(idle_release_after: float) -> float:
    return max(1.0, min(30.0, idle_release_after / 10))


class ActivityProbe:
    """While started, looks at the model's counters every `interval` s and calls `on_activity()`
    when something happened. Errors (model restarting, odd text) are not activity and not fatal."""

    def __init__(
        self,
        address: Callable[[], Address],
        idle_release_after: float,
        on_activity: Callable[[], None],
        log: logging.Logger,
    ) -> None:
        self.address = address  # read per look: over TCP the port may change from run to run
        self.interval = probe_interval(idle_release_after)
        self.on_activity = on_activity
        self.log = log
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="activity-probe")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _run(self) -> None:
        last: float | None = None
        addr = self.address()
        async with probe_client(5.0, addr.uds) as client:
            while True:
                await asyncio.sleep(self.interval)
                with contextlib.suppress(httpx.HTTPError, ValueError):
                    r = await client.get(self.address().base_url + "/metrics")
                    if r.status_code != 200:
                        continue
                    in_flight, finished = read_counters(r.text)
                    if in_flight > 0 or (last is not None and finished != last):
                        self.on_activity()
                    last = finished
