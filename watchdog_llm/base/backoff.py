"""Capped exponential backoff with jitter (pure).

Full jitter would let a restart happen almost at once; "equal jitter" keeps at least half of the
exponential delay so a crash loop always slows down, and the random half spreads nodes apart.
"""

from __future__ import annotations

BASE_DELAY = 1.0


def backoff_delay(attempt: int, *, cap: float, jitter: float, base: float = BASE_DELAY) -> float:
    """Delay before restart number `attempt` (0-based). `jitter` in [0, 1) comes from the caller."""
    if attempt < 0:
        raise ValueError("attempt must be >= 0")
    if not 0.0 <= jitter < 1.0:
        raise ValueError("jitter must be in [0, 1)")
    # min() before the power would overflow for large attempts; 2**60 is already beyond any cap.
    raw = min(cap, base * 2.0 ** min(attempt, 60))
    return raw / 2 + raw / 2 * jitter
