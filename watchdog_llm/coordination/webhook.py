"""Signed webhook delivery: bounded queues, timeouts, retries with backoff, never in the caller's way.

`emit` only appends to a queue (it never blocks, never raises, and may be called from any thread), so events
can be raised from the yield path or from under a lock. `run` delivers: one worker per URL, so a slow or dead
receiver only delays its own deliveries. Each URL's queue is bounded; what does not fit is dropped and counted.

Wire format (the Spark controller's, plus idempotency): POST of the raw JSON body with
`X-Spark-Signature: sha256=<hex HMAC-SHA256(secret, body)>` (only when a secret is set), `X-Spark-Event`, and
`X-Spark-Delivery` (a uuid4 hex, also in the body as "delivery", the same across retries of one delivery, so
receivers can drop duplicates).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import random
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import httpx

from watchdog_llm.base.backoff import backoff_delay

SIGNATURE_HEADER = "X-Spark-Signature"
EVENT_HEADER = "X-Spark-Event"
DELIVERY_HEADER = "X-Spark-Delivery"
USER_AGENT = "watchdog-llm"
EVENT_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")  # it goes into a header: no spaces, no line breaks
DROP_WARN_INTERVAL = 60.0  # at most one "dropped" warning per this many seconds (a dead receiver must not flood)

Outcome = Callable[[str, str], None]  # (outcome: "delivered" | "failed" | "dropped", event)


def sign(secret: str | bytes, body: bytes) -> str:
    """`sha256=` + hex HMAC-SHA256 of the raw body: the X-Spark-Signature value."""
    key = secret.encode() if isinstance(secret, str) else secret
    return "sha256=" + hmac.new(key, body, hashlib.sha256).hexdigest()


def parse_urls(text: str) -> list[str]:
    """WEBHOOK_URLS as written in config.env: separated by commas and/or whitespace."""
    return [u for u in text.replace(",", " ").split() if u]


def mask_url(url: str) -> str:
    """A URL fit for a log: webhook URLs often carry their secret in the path or query (Slack, Discord), so
    only the scheme, host and port are kept."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return url[:12] + "…"
    if not parts.scheme or not host:
        return url[:12] + "…"
    rest = "/…" if parts.path.strip("/") or parts.query else ""
    return f"{parts.scheme}://{host}{port}{rest}"


def validate_url(url: str, n: int = 1) -> None:
    """ValueError("WEBHOOK_URLS: ...") unless `url` is an http(s) URL with a host; `n` numbers the entry."""
    problem = ""
    try:
        parts = urlsplit(url)
        if parts.scheme.lower() not in ("http", "https"):
            problem = "needs http:// or https://"
        elif not parts.hostname:
            problem = "has no host"
        elif any(c.isspace() or not c.isprintable() for c in url):
            problem = "contains spaces or control characters"
        else:
            _ = parts.port  # raises ValueError on a bad port
            httpx.URL(url)
    except (ValueError, httpx.InvalidURL) as e:
        problem = problem or f"is not a valid URL ({e})"
    if problem:
        raise ValueError(f"WEBHOOK_URLS: entry {n} ({mask_url(url)}) {problem}")


@dataclass
class _Delivery:
    event: str
    delivery_id: str
    body: bytes


@dataclass
class _Target:
    url: str
    label: str  # masked, for logs
    queue: deque[_Delivery] = field(default_factory=deque)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    busy: bool = False


class Webhooks:
    """Fan-out of events to every URL in `urls`, signed with `secret` ("" → unsigned)."""

    def __init__(
        self,
        urls: list[str],
        secret: str,
        node: str,
        *,
        log: logging.Logger,
        queue_size: int = 256,
        timeout: float = 5.0,
        attempts: int = 5,
        backoff_max: float = 30.0,
        backoff_base: float = 0.5,
        rng: random.Random | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        on_result: Outcome | None = None,
    ) -> None:
        for n, url in enumerate(urls, 1):
            validate_url(url, n)
        if queue_size < 1 or attempts < 1 or timeout <= 0 or backoff_max < 0 or backoff_base < 0:
            raise ValueError("Webhooks: queue_size and attempts must be >= 1, timeout > 0, backoff values >= 0")
        self._targets = [_Target(url, mask_url(url)) for url in urls]
        self._secret = secret.encode()
        self.node = node
        self._log = log
        self._queue_size = queue_size
        self._timeout = timeout
        self._attempts = attempts
        self._backoff_max = backoff_max
        self._backoff_base = backoff_base
        self._rng = rng or random.Random()
        self._transport = transport
        self.on_result = on_result
        self.delivered = 0
        self.failed = 0
        self.dropped = 0
        self._mu = threading.Lock()  # emit may come from any thread; queues and counters are shared with run()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self._stop = asyncio.Event()
        self._finished = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._drops_unreported = 0
        self._last_drop_warning = -DROP_WARN_INTERVAL

    @property
    def enabled(self) -> bool:
        return bool(self._targets)

    @property
    def queued(self) -> int:
        """Deliveries not finished yet: waiting in a queue or being tried now."""
        with self._mu:
            return sum(len(t.queue) + t.busy for t in self._targets)

    # --- producer side ----------------------------------------------------------------------------------------

    def emit(self, event: str, data: dict[str, Any]) -> None:
        """Queue `event` for every URL. Never blocks, never raises. `data` adds to event/time/node/delivery
        (which it cannot override): "model" and the event's details."""
        try:
            self._emit(event, data)
        except Exception:  # an event lost is better than a caller (the yield path) crashed
            self._log.exception("webhook %s could not be queued", event)

    def _emit(self, event: str, data: dict[str, Any]) -> None:
        if not self._targets:
            return
        if not isinstance(event, str) or not EVENT_NAME.match(event):
            self._log.error("webhook event name %r refused: 1-64 letters, digits, '_', '.', ':', '-'", event)
            self._count_drop(str(event)[:64], "", "bad event name")
            return
        now = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        extra = {k: v for k, v in data.items() if k not in ("event", "time", "node", "delivery")}
        wake: list[_Target] = []
        for t in self._targets:
            delivery_id = uuid.uuid4().hex
            payload = {"event": event, "time": now, "node": self.node, "delivery": delivery_id, **extra}
            try:
                # default=str: a datetime or Path in the details must not cost the event; NaN is not JSON.
                body = json.dumps(payload, default=str, allow_nan=False, separators=(",", ":")).encode()
            except ValueError as e:
                self._log.error("webhook %s not sent: payload is not JSON (%s)", event, e)
                self._count_drop(event, "", "payload is not JSON")
                continue
            with self._mu:
                closing, full = self._closing, len(t.queue) >= self._queue_size
                if not (closing or full):
                    t.queue.append(_Delivery(event, delivery_id, body))
                    wake.append(t)
            if closing or full:
                self._count_drop(event, t.label, "shutting down" if closing else f"queue full ({self._queue_size})")
        self._wake(wake)

    def _wake(self, targets: list[_Target]) -> None:
        loop = self._loop
        if loop is None or not targets:
            return  # run() has not started: it looks at the queues first thing
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        for t in targets:
            if running is loop:
                t.wake.set()
            else:  # asyncio.Event is not thread-safe: have the loop set it
                with contextlib.suppress(RuntimeError):  # loop closed: nothing left to wake
                    loop.call_soon_threadsafe(t.wake.set)

    def _count_drop(self, event: str, label: str, why: str) -> None:
        with self._mu:
            self.dropped += 1
            self._drops_unreported += 1
            now = time.monotonic()
            report = now - self._last_drop_warning >= DROP_WARN_INTERVAL
            if report:
                n, self._drops_unreported = self._drops_unreported, 0
                self._last_drop_warning = now
        if report:
            self._log.warning(
                "webhook %s to %s dropped: %s; %d dropped since the last warning, %d in all",
                event, label or "receiver", why, n, self.dropped,
            )  # fmt: skip
        self._result("dropped", event)

    def _result(self, outcome: str, event: str) -> None:
        if self.on_result is None:
            return
        try:
            self.on_result(outcome, event)
        except Exception:  # a metrics hook must not stop deliveries
            self._log.exception("webhook on_result hook failed")

    # --- delivery side ----------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Deliver until `close`; the owner starts this as a task (cancelling it drops what is queued)."""
        if self._loop is not None:
            raise RuntimeError("Webhooks.run() is already running (or has run)")
        self._loop = asyncio.get_running_loop()
        client = httpx.AsyncClient(
            transport=self._transport,
            timeout=self._timeout,
            trust_env=False,  # no proxy from the environment: receivers are usually on the LAN
            follow_redirects=False,  # a redirect would re-send a signed body somewhere we were not told about
            headers={"User-Agent": USER_AGENT},
        )
        try:
            self._tasks = [
                asyncio.create_task(self._worker(t, client), name=f"webhook {t.label}") for t in self._targets
            ]
            if self._tasks:
                # asyncio.wait, not gather: a worker cancelled by close() must not raise CancelledError in run().
                await asyncio.wait(self._tasks)
            else:
                await self._stop.wait()
        finally:
            for task in self._tasks:
                task.cancel()
            if self._tasks:
                await asyncio.wait(self._tasks)
            for task in self._tasks:
                if not task.cancelled() and task.exception() is not None:
                    self._log.error("webhook worker crashed", exc_info=task.exception())
            self._drop_queued()
            await client.aclose()
            self._finished.set()

    async def close(self, timeout: float) -> None:
        """Stop accepting events, deliver what is queued within `timeout` seconds, then give up (counted as
        dropped)."""
        with self._mu:
            self._closing = True
        self._stop.set()
        for t in self._targets:
            t.wake.set()
        if self._loop is None:
            self._drop_queued()  # run() never started: nothing will deliver these
            return
        try:
            await asyncio.wait_for(self._finished.wait(), timeout)
        except TimeoutError:
            for task in self._tasks:
                task.cancel()
            await self._finished.wait()

    async def _worker(self, t: _Target, client: httpx.AsyncClient) -> None:
        while True:
            with self._mu:
                d = t.queue.popleft() if t.queue else None
                t.busy = d is not None
                if d is None and self._closing:
                    return
            if d is None:
                t.wake.clear()
                with self._mu:
                    pending = bool(t.queue) or self._closing
                if not pending:
                    await t.wake.wait()
                continue
            try:
                ok = await self._deliver(client, t, d)
            except asyncio.CancelledError:
                self._count_drop(d.event, t.label, "stopped before it was delivered")
                raise
            except Exception:  # a bug here must cost one delivery, not this URL's worker
                self._log.exception("webhook %s to %s failed", d.event, t.label)
                ok = False
            finally:
                with self._mu:
                    t.busy = False
            with self._mu:
                if ok:
                    self.delivered += 1
                else:
                    self.failed += 1
            self._result("delivered" if ok else "failed", d.event)

    async def _deliver(self, client: httpx.AsyncClient, t: _Target, d: _Delivery) -> bool:
        """Try one delivery up to `attempts` times; True when the receiver answered 2xx."""
        headers = {"Content-Type": "application/json", EVENT_HEADER: d.event, DELIVERY_HEADER: d.delivery_id}
        if self._secret:
            headers[SIGNATURE_HEADER] = sign(self._secret, d.body)
        why = ""
        for attempt in range(self._attempts):
            if attempt:
                delay = backoff_delay(
                    attempt - 1, cap=self._backoff_max, base=self._backoff_base, jitter=self._rng.random()
                )
                self._log.debug("webhook %s to %s: try %d in %.2f s (%s)", d.event, t.label, attempt + 1, delay, why)
                await asyncio.sleep(delay)
            try:
                # A total deadline as well: httpx's timeouts are per read, and a receiver trickling bytes
                # would otherwise hold this URL's queue forever. The body is never read: the status is enough.
                async with (
                    asyncio.timeout(self._timeout),
                    client.stream("POST", t.url, content=d.body, headers=headers) as resp,
                ):
                    status = resp.status_code
            except TimeoutError:
                why = f"no answer within {self._timeout:g} s"
                continue
            except httpx.HTTPError as e:
                why = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
                continue
            if 200 <= status < 300:
                self._log.debug("webhook %s delivered to %s (%d)", d.event, t.label, status)
                return True
            why = f"HTTP {status}"
            if not (status >= 500 or status in (408, 429)):
                break  # the receiver refused this request; sending it again will not change its mind
        self._log.warning("webhook %s to %s failed after %d tries: %s", d.event, t.label, attempt + 1, why)
        return False

    def _drop_queued(self) -> None:
        for t in self._targets:
            with self._mu:
                left = list(t.queue)
                t.queue.clear()
            for d in left:
                self._count_drop(d.event, t.label, "stopped before it was delivered")
