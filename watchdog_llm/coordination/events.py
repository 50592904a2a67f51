"""The live event stream (`GET /api/events`): state changes, yields, swaps and lock changes, as
they happen, for the dashboard and for automation.

One bus per daemon. Publishing never blocks and may come from any thread (the lock's endpoints
run in FastAPI's thread pool): events hop onto the loop. Each subscriber has a bounded queue; one
that falls that far behind is dropped (its stream ends, and an EventSource reconnects with
`Last-Event-ID`, replayed from the last few events kept), so a stalled reader never grows memory.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

KEPT = 200  # recent events kept for a reconnecting reader (Last-Event-ID)
QUEUE = 500  # events one reader may lag behind before it is dropped


@dataclass(frozen=True, slots=True)
class Event:
    id: int
    name: str
    data: dict[str, Any]
    at: float  # wall clock

    def sse(self) -> bytes:
        payload = json.dumps({**self.data, "at": self.at}, separators=(",", ":"), default=str)
        return f"id: {self.id}\nevent: {self.name}\ndata: {payload}\n\n".encode()


_END = object()


class EventBus:
    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop
        self._ids = itertools.count(1)
        self._mu = threading.Lock()
        self._recent: collections.deque[Event] = collections.deque(maxlen=KEPT)
        self._readers: set[asyncio.Queue[Event | object]] = set()
        self._closed = False

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def publish(self, name: str, data: dict[str, Any]) -> None:
        """From any thread; never blocks."""
        with self._mu:  # ids in the order events are kept
            ev = Event(next(self._ids), name, data, time.time())
            self._recent.append(ev)
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._fan_out(ev)
        else:
            loop.call_soon_threadsafe(self._fan_out, ev)

    def _fan_out(self, ev: Event) -> None:
        for q in list(self._readers):
            try:
                q.put_nowait(ev)
            except asyncio.QueueFull:  # too far behind: dropped, it may reconnect and catch up
                self._readers.discard(q)
                q.get_nowait()
                q.put_nowait(_END)

    def recent(self, after: int = 0) -> list[Event]:
        with self._mu:
            return [e for e in self._recent if e.id > after]

    async def stream(self, after: int | None = None) -> AsyncIterator[Event]:
        """Events from now on (after `after`'s id, replayed from those kept, when given)."""
        q: asyncio.Queue[Event | object] = asyncio.Queue(QUEUE)
        if self._closed:
            return
        self._readers.add(q)
        try:
            last = 0
            if after is not None:
                for ev in self.recent(after):
                    last = ev.id
                    yield ev
            while True:
                item = await q.get()
                if item is _END:
                    return
                assert isinstance(item, Event)
                if item.id > last:
                    yield item
        finally:
            self._readers.discard(q)

    def close(self) -> None:
        """Every stream ends (the daemon is stopping: listeners close after their streams)."""
        self._closed = True
        for q in list(self._readers):
            self._readers.discard(q)
            while not q.empty():
                q.get_nowait()
            q.put_nowait(_END)
