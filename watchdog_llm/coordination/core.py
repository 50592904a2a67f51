"""The coordination core as one object: the gate every swap passes, and the events it sends out.

An owner (the daemon, or another controller embedding this package) gives it the parts and one
callback, `start_swap`, that makes a recorded swap happen; it reports progress back through
`swap_update`. The gate resolves the model, checks the swap lock and opens the swap record in one
synchronous step under one mutex: nothing can slip between the lock check and the swap.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from watchdog_llm.base.vocab import SwapStage
from watchdog_llm.coordination.catalog import Catalog, ModelEntry
from watchdog_llm.coordination.events import EventBus
from watchdog_llm.coordination.health import HealthLog
from watchdog_llm.coordination.lock import LockError, LockInfo, SwapLock
from watchdog_llm.coordination.overrides import ModelSettings, Overrides, SettingsError
from watchdog_llm.coordination.schedule import Schedule
from watchdog_llm.coordination.swap import SwapBusy, SwapRecord, Swaps
from watchdog_llm.coordination.webhook import Webhooks


class CoordError(Exception):
    """An answer for the API: HTTP status, stable code, a message for people, and extra fields."""

    def __init__(self, status: int, code: str, message: str, *, retryable: bool = False, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retryable = retryable
        self.extra = extra


@dataclass
class Coordinator:
    catalog: Catalog
    lock: SwapLock
    swaps: Swaps
    schedule: Schedule
    health: HealthLog
    webhooks: Webhooks | None
    node: str
    log: logging.Logger
    start_swap: Callable[[SwapRecord, ModelEntry], None]  # the owner makes it happen (never blocks)
    active: Callable[[], str]  # the catalog name of the model now chosen
    refuse: Callable[[], str | None] = lambda: None  # why no swap can start now (e.g. shutting down)
    unfit: Callable[[ModelEntry], str | None] = lambda e: None  # why this model can never run here
    notify: Callable[[str, str, str], None] = lambda kind, title, body: None  # phone alerts
    bus: EventBus | None = None  # the live stream (GET /api/events): every event, and swap progress
    overrides: Overrides | None = None  # per-model settings that persist (None: not kept here)
    _mu: threading.Lock = field(default_factory=threading.Lock)

    # ---- swaps ---------------------------------------------------------------------------------

    def resolve(self, key: str) -> ModelEntry:
        entry = self.catalog.resolve(key) if isinstance(key, str) else None
        if entry is None:
            names = ", ".join(e.name for e in self.catalog.entries)
            raise CoordError(404, "unknown_model", f"no model {_shown(key)} in the catalog (models: {names})")
        return entry

    def swap(self, key: str, token: str | None) -> SwapRecord:
        """The gate: unknown model 404, lock held by someone else 423, a swap under way 409, the
        daemon unable to start anything 503; else the swap is recorded and handed to the owner."""
        entry = self.resolve(key)
        if entry.always_on:
            raise CoordError(
                409,
                "not_swappable",
                f"{entry.name} is an always-on service: start, stop or restart it at /api/services",
            )
        why_not = self.unfit(entry)
        if why_not is not None:  # it would wait for ever, deferred: say so now
            raise CoordError(409, "model_does_not_fit", why_not)
        with self._mu:
            why = self.refuse()
            if why is not None:
                raise CoordError(503, "unavailable", why, retryable=True)
            try:
                self.lock.check(token)
            except LockError as e:
                raise _lock_error(e) from None
            holder = self.lock.status()
            # A deferred swap being replaced never served: what comes back on failure is its own previous.
            cur = self.swaps.open()
            previous = cur.previous if cur is not None and cur.state is SwapStage.DEFERRED else self.active() or None
            try:
                rec = self.swaps.begin(entry.name, previous, holder.holder if holder else None)
            except SwapBusy as e:
                raise CoordError(409, "swap_in_progress", str(e), retryable=True, running=e.running.public()) from None
        self.log.info(
            "swap %s to %s requested%s", rec.id, entry.name, f" by {rec.requested_by}" if rec.requested_by else ""
        )
        self._progress(rec)
        self.start_swap(rec, entry)
        return rec

    def _progress(self, rec: SwapRecord) -> None:
        if self.bus is not None:
            self.bus.publish("swap", {k: v for k, v in rec.public().items() if k != "log_tail"})

    def swap_update(self, swap_id: str, stage: str, detail: str) -> None:
        """Progress from the owner; a swap that ends sends its webhook."""
        rec = self.swaps.update(swap_id, stage, detail)
        if rec is not None:
            self._progress(rec)
        if rec is None or rec.state not in (SwapStage.READY, SwapStage.FAILED):
            if rec is not None:
                self.log.info("swap %s: %s (%s)", rec.id, rec.state, detail)
            return
        took = (rec.finished_at or rec.updated_at) - rec.created_at
        data: dict[str, Any] = {
            "model": rec.model,
            "swap_id": rec.id,
            "previous": rec.previous,
            "detail": detail,
            "duration_s": round(took, 3),
        }
        if rec.state is SwapStage.READY:
            self.log.info("swap %s to %s complete in %.1f s", rec.id, rec.model, took)
            self._emit("swap_complete", data)
        else:
            self.log.warning("swap %s to %s failed: %s", rec.id, rec.model, detail)
            self._emit("swap_failed", {**data, "error": detail, "log_tail": rec.log_tail[-20:]})

    # ---- the lock ------------------------------------------------------------------------------

    def acquire_lock(self, holder: str, ttl_s: float, reason: str, token: str | None) -> tuple[str | None, LockInfo]:
        with self._mu:
            try:
                new, info = self.lock.acquire(holder, ttl_s, reason, token)
            except LockError as e:
                raise _lock_error(e) from None
        if new is not None:
            self._emit("lock_acquired", {"holder": info.holder, "reason": info.reason, "expires_at": info.expires_at})
        return new, info

    def release_lock(self, token: str | None, *, force: bool) -> LockInfo | None:
        """Release with the token; `force` is the human override for a lock whose holder is gone."""
        forced = False
        with self._mu:
            try:
                info = self.lock.release(token)
            except LockError as e:
                if not force:
                    raise _lock_error(e) from None
                info, forced = self.lock.release(None, force=True), True
        if info is None:
            return None
        data = {"holder": info.holder, "reason": info.reason, "acquired_at": info.acquired_at}
        if not forced:
            self._emit("lock_released", data)
            return info
        self._emit("lock_forced", data)
        body = f"the swap lock of {info.holder} was released by force" + (f" ({info.reason})" if info.reason else "")
        self.notify("lock_forced", "swap lock forced", body)
        return info

    # ---- per-model settings ------------------------------------------------------------------------

    def settings(self, key: str) -> dict[str, Any]:
        e = self.resolve(key)
        s = self.overrides.get(e.name) if self.overrides is not None else ModelSettings()
        return self._settings_view(e, s)

    def tune(self, key: str, patch: dict[str, Any]) -> dict[str, Any]:
        """Change some settings of a model (a None value clears one); they apply at its next start."""
        e = self.resolve(key)
        if self.overrides is None:
            raise CoordError(404, "not_found", "per-model settings are not kept by this controller")
        try:
            s = self.overrides.update(e, patch)
        except SettingsError as err:
            raise CoordError(422, "invalid_settings", f"model {e.name}: {err}", field=err.field) from None
        except OSError as err:
            msg = f"settings of model {e.name} not saved: {err.strerror or err}; nothing changed"
            raise CoordError(503, "settings_not_saved", msg, retryable=True) from None
        view = self._settings_view(e, s)
        self._emit("settings_changed", {"target": e.name, "settings": view["settings"], "args": view["args"]})
        return view

    def _settings_view(self, e: ModelEntry, s: ModelSettings) -> dict[str, Any]:
        applied = self.overrides.applied(e) if self.overrides is not None else e
        return {
            "model": e.name,
            "settings": s.public(),
            "args": list(applied.args),  # what its next start is given (the catalog's args, then these)
            "active": e.name == self.active(),
        }

    # ---- events --------------------------------------------------------------------------------

    def event(self, name: str, data: dict[str, Any]) -> None:
        """A daemon event (yielded, resumed, crashed) for the webhooks."""
        self._emit(name, data)

    def _emit(self, name: str, data: dict[str, Any]) -> None:
        full = {"model": self.active() or None, **data}
        if self.webhooks is not None:
            self.webhooks.emit(name, full)
        if self.bus is not None:
            self.bus.publish(name, full)


def _lock_error(e: LockError) -> CoordError:
    extra: dict[str, Any] = {}
    if e.info is not None:
        extra["lock"] = e.info.to_public()
    return CoordError(e.status, e.code, e.message, retryable=e.status == 423, **extra)


def _shown(key: object) -> str:
    text = str(key)
    return repr("".join(c if c.isprintable() else "?" for c in text[:80]) + ("…" if len(text) > 80 else ""))
