"""The swap lock: a reservation so automation does not swap the model out from under someone.

Semantics follow the Spark controller's lock (POST/GET/DELETE /api/swap/lock, 423 when held), made durable:
the holder, expiry and a SHA-256 digest of the token are persisted on every change, so a daemon restart keeps
the lock and still accepts its token, while the token itself is never on disk. Times are wall-clock epoch
seconds (they are shown to people and must mean the same after a restart); the clock is injected for tests.

Every operation runs under one threading.Lock, so a check and the change it decides happen atomically even
for embedders calling from several threads: two clients racing for a free lock get exactly one token.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any

from watchdog_llm.coordination.schedule import printable
from watchdog_llm.coordination.store import JsonStore

HOLDER_MAX = 64
REASON_MAX = 500
TOKEN_MAX = 256  # longer than any token we issue (43 chars): hashing megabytes per request is not our job
STATE_VERSION = 1

FREE: Mapping[str, Any] = MappingProxyType(
    {"locked": False, "holder": None, "reason": None, "acquired_at": None, "expires_at": None}
)


class LockError(Exception):
    """`status` is the HTTP status to answer (400 bad input, 423 held by someone else); `info` the lock as it is.

    The admin API checks its input before it gets here (holder_problem, reason_problem, ttl_s within max_ttl)
    and answers 422 like for any other invalid request; 400 is for embedders calling this directly."""

    def __init__(self, status: int, code: str, message: str, info: LockInfo | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.info = info


@dataclass(frozen=True)
class LockInfo:
    holder: str
    reason: str
    acquired_at: float
    expires_at: float

    def to_public(self) -> dict[str, Any]:
        """What anyone may see: never the token."""
        return {
            "locked": True,
            "holder": self.holder,
            "reason": self.reason,
            "acquired_at": self.acquired_at,
            "expires_at": self.expires_at,
        }


def public(info: LockInfo | None) -> dict[str, Any]:
    """The GET /api/swap/lock body for a held (`info`) or free (None) lock."""
    return info.to_public() if info is not None else dict(FREE)


@dataclass(frozen=True)
class _Held:
    info: LockInfo
    digest: bytes  # SHA-256 of the token


class SwapLock:
    def __init__(
        self,
        store: JsonStore | None,
        *,
        clock: Callable[[], float] = time.time,
        max_ttl: float = 86400,
        log: logging.Logger,
    ) -> None:
        if not (isinstance(max_ttl, int | float) and math.isfinite(max_ttl) and max_ttl > 0):
            raise ValueError(f"max_ttl must be a finite number > 0, got {max_ttl!r}")
        self._store = store
        self._clock = clock
        self.max_ttl = float(max_ttl)
        self._log = log
        self._mu = threading.Lock()
        self._held: _Held | None = self._load()

    # --- the operations -------------------------------------------------------------------------------------

    def acquire(
        self, holder: str, ttl_s: float, reason: str = "", token: str | None = None
    ) -> tuple[str | None, LockInfo]:
        """Take a free (or expired) lock → (new token, info): the token is returned this once only.

        Held, and `token` is its token → extended to now + ttl_s (holder and acquired_at kept, reason replaced
        when a new one is given) → (None, info). Held by anyone else → LockError 423. Bad input → LockError 400.
        A stale token on a free lock is no error: the caller simply gets a new lock and a new token.
        """
        _check_holder(holder)
        _check_reason(reason)
        ttl = self._check_ttl(ttl_s)
        with self._mu:
            now = self._clock()
            held = self._current(now)
            if held is None:
                new_token = secrets.token_urlsafe(32)
                info = LockInfo(holder=holder, reason=reason, acquired_at=now, expires_at=now + ttl)
                self._set(_Held(info, _digest(new_token)))
                self._log.info("swap lock acquired by %r for %.0f s%s", holder, ttl, _why(reason))
                return new_token, info
            if not _matches(token, held.digest):
                raise _locked(held.info, now)
            info = replace(held.info, expires_at=now + ttl, reason=reason or held.info.reason)
            self._set(_Held(info, held.digest))
            self._log.info("swap lock of %r extended by %.0f s", info.holder, ttl)
            return None, info

    def status(self) -> LockInfo | None:
        """The lock, or None when it is free or has expired."""
        with self._mu:
            held = self._current(self._clock())
            return held.info if held is not None else None

    def release(self, token: str | None, *, force: bool = False) -> LockInfo | None:
        """Release with the lock's token, or with `force` whoever holds it; returns what was released.

        Not held → None (idempotent: answer 200 with locked false). Held and the token is wrong → LockError 423.
        A forced release is logged here at WARNING; notifying and the `lock_forced` webhook are the caller's.
        """
        with self._mu:
            now = self._clock()
            held = self._current(now)
            if held is None:
                return None
            if force:
                self._set(None)
                self._log.warning("swap lock of %r forcibly released%s", held.info.holder, _why(held.info.reason))
                return held.info
            if not _matches(token, held.digest):
                raise _locked(held.info, now)
            self._set(None)
            self._log.info("swap lock of %r released", held.info.holder)
            return held.info

    def check(self, token: str | None) -> None:
        """The gate for a swap: LockError 423 unless the lock is free or `token` is its token."""
        with self._mu:
            now = self._clock()
            held = self._current(now)
            if held is not None and not _matches(token, held.digest):
                raise _locked(held.info, now)

    # --- state ----------------------------------------------------------------------------------------------

    def _check_ttl(self, ttl_s: object) -> float:
        # bool is an int subclass: `true` in JSON must not become a 1-second lock.
        if isinstance(ttl_s, bool) or not isinstance(ttl_s, int | float):
            raise LockError(400, "invalid_request", f"ttl_s: must be a number of seconds, got {type(ttl_s).__name__}")
        ttl = float(ttl_s)
        if not (math.isfinite(ttl) and 0 < ttl <= self.max_ttl):
            raise LockError(400, "invalid_request", f"ttl_s: must be > 0 and <= {self.max_ttl:g} seconds, got {ttl_s}")
        return ttl

    def _current(self, now: float) -> _Held | None:
        """The live lock; an expired one is dropped (and the file updated) the first time anyone looks."""
        held = self._held
        if held is not None and now >= held.info.expires_at:
            self._log.info("swap lock of %r expired", held.info.holder)
            self._set(None)
            return None
        return held

    def _set(self, held: _Held | None) -> None:
        self._held = held
        if self._store is None:
            return
        lock = None
        if held is not None:
            i = held.info
            lock = {
                "holder": i.holder,
                "reason": i.reason,
                "acquired_at": i.acquired_at,
                "expires_at": i.expires_at,
                "token_sha256": held.digest.hex(),
            }
        try:
            self._store.save({"version": STATE_VERSION, "lock": lock})
        except (OSError, ValueError) as e:
            # The lock keeps working in memory; only its survival across a restart is lost, so say so loudly.
            self._log.error("swap lock state not saved to %s (%s): a restart would forget it", self._store.path, e)

    def _load(self) -> _Held | None:
        if self._store is None:
            return None
        doc = self._store.load(expect=dict)
        if doc is None:
            return None
        lock = doc.get("lock")
        if lock is None:
            return None
        try:
            held = _parse_held(lock)
        except (TypeError, ValueError, KeyError) as e:
            self._store.quarantine(f"lock entry invalid: {e}")
            return None
        if self._clock() >= held.info.expires_at:
            return None  # expired while we were down: simply free (the next change rewrites the file)
        self._log.info(
            "swap lock of %r restored from %s, expires %s",
            held.info.holder,
            self._store.path,
            _iso(held.info.expires_at),
        )
        return held


def _parse_held(lock: Any) -> _Held:
    if not isinstance(lock, dict):
        raise TypeError(f"expected an object, got {type(lock).__name__}")
    holder, reason = lock["holder"], lock.get("reason", "")
    _check_holder(holder)
    _check_reason(reason)
    times = []
    for key in ("acquired_at", "expires_at"):
        v = lock[key]
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise ValueError(f"{key} is not a finite number")
        times.append(float(v))
    digest = bytes.fromhex(lock["token_sha256"])
    if len(digest) != hashlib.sha256().digest_size:
        raise ValueError("token_sha256 is not a SHA-256 digest")
    return _Held(LockInfo(holder=holder, reason=reason, acquired_at=times[0], expires_at=times[1]), digest)


def holder_problem(holder: object) -> str | None:
    """What is wrong with this holder, for "holder: ..." (None: nothing). The HTTP layer reads it too."""
    if not isinstance(holder, str) or not 1 <= len(holder) <= HOLDER_MAX or not printable(holder) or not holder.strip():
        return f"must be 1-{HOLDER_MAX} printable characters, not blank"
    return None


def reason_problem(reason: object) -> str | None:
    """What is wrong with this reason (None: nothing)."""
    # Printable only: the reason goes into logs, notifications and dashboards, where a newline could forge lines.
    if not isinstance(reason, str) or len(reason) > REASON_MAX or not printable(reason):
        return f"must be at most {REASON_MAX} printable characters"
    return None


def _check_holder(holder: object) -> None:
    if (problem := holder_problem(holder)) is not None:
        raise LockError(400, "invalid_request", f"holder: {problem}")


def _check_reason(reason: object) -> None:
    if (problem := reason_problem(reason)) is not None:
        raise LockError(400, "invalid_request", f"reason: {problem}")


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def _matches(token: str | None, digest: bytes) -> bool:
    """Constant-time comparison of digests; anything malformed is simply a wrong token."""
    if not isinstance(token, str) or not token or len(token) > TOKEN_MAX or not token.isprintable():
        return False
    return hmac.compare_digest(_digest(token), digest)


def _locked(info: LockInfo, now: float) -> LockError:
    left = max(0, math.ceil(info.expires_at - now))
    return LockError(
        423,
        "locked",
        f"swap lock held by {info.holder!r} until {_iso(info.expires_at)} ({left} s left){_why(info.reason)}",
        info=info,
    )


def _why(reason: str) -> str:
    return f": {reason}" if reason else ""


def _iso(t: float) -> str:
    try:
        return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    except (OverflowError, ValueError, OSError):  # a hand-edited state file may hold any finite number
        return f"{t:.0f} (epoch s)"
