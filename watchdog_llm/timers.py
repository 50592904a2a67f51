"""The policy's named timers on the event loop: arming one replaces the one of the same name.

A timer's firing is only a hint: the policy checks its token, so a stale one is ignored there.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class Timers:
    def __init__(self) -> None:
        self._handles: dict[str, asyncio.TimerHandle] = {}
        self._due: dict[str, float] = {}  # monotonic time each armed timer fires

    def arm(self, name: str, delay: float, fn: Callable[[], None]) -> None:
        if (old := self._handles.pop(name, None)) is not None:
            old.cancel()
        self._handles[name] = asyncio.get_running_loop().call_later(delay, fn)
        self._due[name] = time.monotonic() + delay

    def left(self, name: str, now: float) -> float | None:
        """Seconds until `name` fires (0 once due); None if it was never armed."""
        due = self._due.get(name)
        return None if due is None else max(0.0, due - now)

    def cancel_all(self) -> None:
        for handle in self._handles.values():
            handle.cancel()
        self._handles.clear()
