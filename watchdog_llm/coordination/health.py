"""The connectivity log: controllers and probes report whether they could reach a service
(POST /api/health-event); the log is bounded (oldest dropped) and persisted, newest last."""

from __future__ import annotations

import builtins
import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from watchdog_llm.coordination.store import JsonStore

STATE_VERSION = 1
_log = logging.getLogger(__name__)


class HealthEventIn(BaseModel):
    """One report: could `source` reach `service`, and how long did it take (`ms`)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    service: str = Field(min_length=1, max_length=64)
    ok: bool
    source: str = Field(default="", max_length=64)
    error: str | None = Field(default=None, max_length=1000)
    ms: float | None = Field(default=None, ge=0)

    @field_validator("service", "source")
    @classmethod
    def _printable(cls, v: str) -> str:
        if not v.isprintable():
            raise ValueError("must be printable characters")
        return v


class HealthRecord(HealthEventIn):
    """A stored report: `at` is when it arrived (epoch seconds, server clock)."""

    model_config = ConfigDict(extra="ignore")  # a file written by a newer version still loads

    at: float


class HealthLog:
    def __init__(
        self,
        store: JsonStore | None,
        *,
        clock: Callable[[], float] = time.time,
        limit: int = 500,
        log: logging.Logger | None = None,
    ) -> None:
        if limit < 1:
            raise ValueError("limit must be >= 1")
        self._store = store
        self._clock = clock
        self.limit = limit
        self._log = log or _log
        self._mu = threading.Lock()
        self._records: deque[HealthRecord] = deque(maxlen=limit)
        records, rewrite = self._load()
        self._records.extend(records)  # a smaller limit than before keeps the newest
        if rewrite:
            self._save()

    def append(self, ev: HealthEventIn) -> HealthRecord:
        with self._mu:
            rec = HealthRecord.model_validate({**ev.model_dump(), "at": self._clock()})
            self._records.append(rec)
            self._save()
            return rec

    def list(self, limit: int | None = None, service: str | None = None) -> builtins.list[HealthRecord]:
        """Newest last: the last `limit` records (all when None), only `service`'s when given."""
        if limit is not None and limit < 0:
            raise ValueError("limit must be >= 0")
        with self._mu:
            recs = [r for r in self._records if service is None or r.service == service]
        if limit is not None:
            recs = recs[len(recs) - limit :] if limit else []
        return recs

    def _save(self) -> None:
        if self._store is None:
            return
        try:
            self._store.save({"version": STATE_VERSION, "records": [r.model_dump(mode="json") for r in self._records]})
        except (OSError, ValueError) as e:
            self._log.error("connectivity log not saved to %s (%s)", self._store.path, e)

    def _load(self) -> tuple[builtins.list[HealthRecord], bool]:
        """The stored records, and whether the file must be rewritten (some records were invalid)."""
        if self._store is None:
            return [], False
        doc = self._store.load(expect=dict)
        if doc is None:
            return [], False
        raw = doc.get("records", [])
        if not isinstance(raw, builtins.list):
            self._store.quarantine("'records' is not a list")
            return [], False
        recs: builtins.list[HealthRecord] = []
        bad = 0
        for item in raw:
            try:
                recs.append(HealthRecord.model_validate(item))
            except ValidationError:
                bad += 1
        if bad:
            # Keep the original for a human, and carry on with the records that are sound.
            self._store.quarantine(f"{bad} invalid connectivity records")
        return recs, bool(bad)
