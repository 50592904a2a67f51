"""Dashboard sign-in, Jupyter's way: `watchdog-llm dashboard` asks the admin API for a one-time
login token and prints a URL with it; opening that URL trades the token for a session cookie
(HttpOnly, SameSite=Strict) and a CSRF token that every state-changing request must carry.

Everything is in memory: a daemon restart signs everyone out (run `watchdog-llm dashboard` again).
Only SHA-256 hashes of tokens are kept (looked up by hash: no timing tells anything of a token).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from dataclasses import dataclass

COOKIE = "wdl_session"
LOGIN_TTL = 300.0  # seconds a printed login URL works (once)
SESSION_TTL = 12 * 3600.0  # a signed-in browser stays signed in this long
MAX_PENDING = 32  # unused login tokens kept (the oldest goes first)
MAX_SESSIONS = 64


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


@dataclass(frozen=True, slots=True)
class Session:
    csrf: str
    expires: float  # monotonic


class Sessions:
    def __init__(self) -> None:
        self._mu = threading.Lock()
        self._pending: dict[bytes, float] = {}  # login token hash -> expiry
        self._sessions: dict[bytes, Session] = {}  # cookie hash -> session

    @staticmethod
    def _now() -> float:
        return time.monotonic()

    def login_token(self) -> str:
        """A new one-time login token, valid LOGIN_TTL seconds."""
        token = secrets.token_urlsafe(24)
        with self._mu:
            self._expire()
            while len(self._pending) >= MAX_PENDING:
                self._pending.pop(next(iter(self._pending)))
            self._pending[_digest(token)] = self._now() + LOGIN_TTL
        return token

    def redeem(self, token: str) -> tuple[str, Session] | None:
        """The cookie value and session for a login token used for the first time in time; else None."""
        d = _digest(token)
        with self._mu:
            self._expire()
            if self._pending.pop(d, None) is None:  # unknown, used already, or expired
                return None
            while len(self._sessions) >= MAX_SESSIONS:
                self._sessions.pop(next(iter(self._sessions)))
            cookie = secrets.token_urlsafe(32)
            session = Session(secrets.token_urlsafe(24), self._now() + SESSION_TTL)
            self._sessions[_digest(cookie)] = session
        return cookie, session

    def get(self, cookie: str) -> Session | None:
        d = _digest(cookie)
        with self._mu:
            self._expire()
            return self._sessions.get(d)

    def end(self, cookie: str) -> None:
        with self._mu:
            self._sessions.pop(_digest(cookie), None)

    def _expire(self) -> None:
        now = self._now()
        for k in [k for k, v in self._pending.items() if v <= now]:
            del self._pending[k]
        for k in [k for k, v in self._sessions.items() if v.expires <= now]:
            del self._sessions[k]


def csrf_ok(session: Session, presented: str) -> bool:
    return hmac.compare_digest(_digest(session.csrf), _digest(presented))
