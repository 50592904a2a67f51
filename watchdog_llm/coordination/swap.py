"""Swap records: what was asked, where each swap stands, and the model's log lines while it runs.

The owner (the daemon) decides what happens and calls `update`/`log_line`; this module keeps the
records, persists them, and feeds live subscribers (`GET /api/swap/{id}/stream`). One swap is open
at a time: a second request while one is stopping or starting is refused (`SwapBusy`, HTTP 409);
a deferred one (waiting for the node) is superseded by a newer request.

Persisted (STATE_DIR/swaps.json): the last records, and the model the last swap chose, so that a
daemon restarted mid-swap (even by SIGKILL) starts that model and completes the swap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from watchdog_llm.base.vocab import SWAP_ENDED, SwapStage
from watchdog_llm.coordination.store import JsonStore

KEEP = 50  # records kept (and persisted)
LOG_LINES = 200  # a swap's log lines kept for late subscribers and the failure's tail
FAIL_TAIL = 40  # lines of the model's output a failed swap carries
_SUB_QUEUE = 1000  # a subscriber this far behind loses lines (but never the end): it never blocks the daemon


class SwapBusy(Exception):
    def __init__(self, running: SwapRecord) -> None:
        super().__init__(f"swap {running.id} to {running.model} is {running.state}: one swap at a time")
        self.running = running


@dataclass(slots=True)
class SwapRecord:
    id: str
    model: str  # the catalog name of the target
    previous: str | None
    state: SwapStage
    detail: str
    created_at: float
    updated_at: float
    requested_by: str | None = None  # the lock holder, when the lock was held by the requester
    finished_at: float | None = None
    error: str | None = None
    log_tail: list[str] = field(default_factory=list)  # on failure: the model's last lines
    history: list[dict[str, Any]] = field(default_factory=list)  # [{state, detail, at}]

    def public(self) -> dict[str, Any]:
        d = asdict(self)
        d["state"] = self.state.value
        return d

    @classmethod
    def from_doc(cls, d: dict[str, Any]) -> SwapRecord:
        return cls(
            id=str(d["id"]),
            model=str(d["model"]),
            previous=d.get("previous"),
            state=SwapStage(d["state"]),
            detail=str(d.get("detail", "")),
            created_at=float(d["created_at"]),
            updated_at=float(d["updated_at"]),
            requested_by=d.get("requested_by"),
            finished_at=d.get("finished_at"),
            error=d.get("error"),
            log_tail=[str(x) for x in d.get("log_tail", [])][-FAIL_TAIL:],
            history=list(d.get("history", []))[-50:],
        )


class Swaps:
    def __init__(self, store: JsonStore | None, *, log: logging.Logger, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._log = log
        self._clock = clock
        self._records: dict[str, SwapRecord] = {}
        self._lines: dict[str, deque[str]] = {}
        self._subs: dict[str, set[asyncio.Queue[dict[str, Any] | None]]] = {}
        self.chosen: str | None = None  # the model the last swap chose: what a restart serves
        self._load()

    # ---- reading -------------------------------------------------------------------------------

    def get(self, swap_id: str) -> SwapRecord | None:
        return self._records.get(swap_id)

    def recent(self, n: int = 20) -> list[SwapRecord]:
        return list(self._records.values())[-n:]

    def open(self) -> SwapRecord | None:
        """The swap not finished yet, if any (at most one)."""
        for r in reversed(self._records.values()):
            if r.state not in SWAP_ENDED:
                return r
        return None

    # ---- changes (the owner's) -----------------------------------------------------------------

    def begin(self, model: str, previous: str | None, requested_by: str | None = None) -> SwapRecord:
        """Record a new swap (queued). Raises SwapBusy while another one is stopping or starting."""
        cur = self.open()
        if cur is not None and cur.state is not SwapStage.DEFERRED:
            raise SwapBusy(cur)
        now = self._clock()
        rec = SwapRecord(
            id="swap-" + secrets.token_hex(6),
            model=model,
            previous=previous,
            state=SwapStage.QUEUED,
            detail="queued",
            created_at=now,
            updated_at=now,
            requested_by=requested_by,
            history=[{"state": "queued", "detail": "queued", "at": now}],
        )
        self._records[rec.id] = rec
        self._lines[rec.id] = deque(maxlen=LOG_LINES)
        while len(self._records) > KEEP:
            old = next(iter(self._records))
            self._records.pop(old)
            self._lines.pop(old, None)
        self.chosen = model
        self._save()
        return rec

    def update(self, swap_id: str, state: str, detail: str) -> SwapRecord | None:
        """A stage the daemon reached; a terminal one closes the stream of every subscriber."""
        rec = self._records.get(swap_id)
        if rec is None or rec.state in SWAP_ENDED:
            return None
        now = self._clock()
        rec.state = SwapStage(state)
        rec.detail = detail
        rec.updated_at = now
        rec.history.append({"state": rec.state.value, "detail": detail, "at": now})
        if rec.state is SwapStage.FAILED:
            rec.error = detail
            rec.log_tail = list(self._lines.get(swap_id, ()))[-FAIL_TAIL:]
        if rec.state in SWAP_ENDED:
            rec.finished_at = now
            if rec.state is SwapStage.FAILED and rec.previous is not None and self.chosen == rec.model:
                self.chosen = rec.previous  # the previous model comes back: a restart serves it too
        self._save()
        data: dict[str, Any] = {"id": rec.id, "state": rec.state.value, "detail": detail, "at": now}
        if rec.state is SwapStage.FAILED:
            data["log_tail"] = rec.log_tail
        event = {"event": "state", "data": data}
        self._publish(swap_id, event, end=rec.state in SWAP_ENDED)
        return rec

    def log_line(self, line: str) -> None:
        """A line of the model's output: it belongs to the open swap while that one is under way."""
        rec = self.open()
        if rec is None or rec.state is SwapStage.DEFERRED:
            return
        self._lines.setdefault(rec.id, deque(maxlen=LOG_LINES)).append(line)
        self._publish(rec.id, {"event": "log", "data": {"line": line}})

    def recover(self) -> SwapRecord | None:
        """At start-up: a swap left open by the previous daemon (stopped, crashed, SIGKILLed) is
        deferred now and completes with this start; returns it."""
        rec = self.open()
        if rec is not None:
            self.update(rec.id, SwapStage.DEFERRED, "the daemon restarted mid-swap; the swap completes on this start")
        return rec

    # ---- live streams --------------------------------------------------------------------------

    async def stream(self, swap_id: str) -> AsyncIterator[dict[str, Any]]:
        """The swap's state and the lines logged so far, then live events until it ends."""
        rec = self._records.get(swap_id)
        if rec is None:
            return
        q: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(_SUB_QUEUE)
        self._subs.setdefault(swap_id, set()).add(q)
        try:
            snapshot: dict[str, Any] = {
                "id": rec.id,
                "state": rec.state.value,
                "detail": rec.detail,
                "at": rec.updated_at,
            }
            if rec.state is SwapStage.FAILED:
                snapshot["log_tail"] = rec.log_tail
            for line in list(self._lines.get(swap_id, ())):
                yield {"event": "log", "data": {"line": line}}
            yield {"event": "state", "data": snapshot}
            if rec.state in SWAP_ENDED:
                return
            while (ev := await q.get()) is not None:
                yield ev
        finally:
            self._subs.get(swap_id, set()).discard(q)

    def _publish(self, swap_id: str, event: dict[str, Any], *, end: bool = False) -> None:
        for q in list(self._subs.get(swap_id, ())):
            with contextlib.suppress(asyncio.QueueFull):
                q.put_nowait(event)
            if end:
                try:
                    q.put_nowait(None)
                except asyncio.QueueFull:  # a reader that far behind still has to learn the end
                    with contextlib.suppress(asyncio.QueueEmpty):
                        q.get_nowait()
                    q.put_nowait(None)

    def close(self) -> None:
        """End every live stream (daemon shutdown)."""
        for swap_id in list(self._subs):
            self._publish(swap_id, {"event": "end", "data": {"detail": "the daemon is stopping"}}, end=True)

    # ---- persistence ---------------------------------------------------------------------------

    def _load(self) -> None:
        if self._store is None:
            return
        doc = self._store.load(expect=dict)
        if doc is None:
            return
        try:
            records = [SwapRecord.from_doc(d) for d in doc.get("swaps", [])]
            chosen = doc.get("chosen")
            if chosen is not None and not isinstance(chosen, str):
                raise ValueError("chosen: expected a model name")
        except (KeyError, TypeError, ValueError) as e:
            self._store.quarantine(f"not a swap record file: {e}")
            return
        self._records = {r.id: r for r in records[-KEEP:]}
        self._lines = {r.id: deque(maxlen=LOG_LINES) for r in records}
        self.chosen = chosen

    def _save(self) -> None:
        if self._store is None:
            return
        doc = {"version": 1, "chosen": self.chosen, "swaps": [r.public() for r in self._records.values()]}
        try:
            self._store.save(doc)
        except OSError as e:
            self._log.warning("cannot save swap records to %s: %s", self._store.path, e.strerror or e)
