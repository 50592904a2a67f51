"""The tunnel's one owner: cloudflared up while the policy wants it (SetTunnel), restarted with
jittered, bounded backoff when it exits on its own.

The policy decides *whether* the tunnel should be connected; this adapter makes it so and keeps it
so. A run that lasted `min_uptime` resets the backoff; a run that did not grows it.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable

from watchdog_llm.base.backoff import backoff_delay
from watchdog_llm.supervise.child import Child, ChildEvent, ChildExited, ChildReady
from watchdog_llm.supervise.states import ChildState


class TunnelKeeper:
    def __init__(
        self,
        child: Child,
        *,
        url: str,
        backoff_max: float,
        min_uptime: float,
        on_down: Callable[[str], None],  # a one-line notice: "tunnel exited with 1; restarting in 1.2 s"
        on_change: Callable[[], None],  # its state changed (status)
        log: logging.Logger,
        rng: random.Random | None = None,
    ) -> None:
        self.child = child
        self.url = url
        self._backoff_max = backoff_max
        self._min_uptime = min_uptime
        self._on_down = on_down
        self._on_change = on_change
        self._log = log
        self._rng = rng or random.Random()
        self._wanted = False  # the policy's last SetTunnel
        self._running = False  # a start is asked for and no exit or stop came since
        self._runs = 0
        self._failures = 0
        self._retry: asyncio.TimerHandle | None = None

    @property
    def ready(self) -> bool:
        return self.child.state is ChildState.RUNNING

    def want(self, up: bool) -> None:
        """Carry out SetTunnel: connect now (unless connecting already), or disconnect."""
        self._wanted = up
        if up:
            self._connect()
            return
        self._cancel_retry()
        if self._running:
            self._running = False
            self.child.stop()

    def on_event(self, ev: ChildEvent) -> None:
        if isinstance(ev, ChildReady):
            self._log.info("tunnel connected%s", f": {self.url}" if self.url else "")
            self._on_change()
        elif isinstance(ev, ChildExited) and self._wanted:
            self._running = False
            started = self.child.run_started_at
            ran = time.monotonic() - started if started is not None else 0.0
            self._failures = 1 if ran >= self._min_uptime else self._failures + 1
            delay = backoff_delay(min(self._failures - 1, 30), cap=self._backoff_max, jitter=self._rng.random())
            body = f"tunnel {ev.why}; restarting in {delay:.1f} s"
            self._log.warning("%s", body)
            self._on_down(body)
            self._cancel_retry()
            self._retry = asyncio.get_running_loop().call_later(delay, self._connect)
            self._on_change()
        elif isinstance(ev, ChildExited):
            self._running = False

    def hurry(self) -> None:
        self.child.hurry()

    async def close(self) -> None:
        self._wanted = False
        self._cancel_retry()
        await self.child.close()

    def _connect(self) -> None:
        self._retry = None
        if not self._wanted or self._running:
            return
        self._running = True
        self._runs += 1
        self.child.start(self._runs)

    def _cancel_retry(self) -> None:
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
