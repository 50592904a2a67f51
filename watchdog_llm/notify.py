"""Phone alerts through apprise (ntfy first), without ever holding up the daemon.

The state machine calls `Notifier.submit()`, which only appends to a buffer; one task, `Notifier.run()`,
drains it and sends from worker threads, one URL per thread, so a dead or slow server costs at most
apprise's timeouts and never the caller's time. Bursts are coalesced so a flapping node does not spam a phone.

Priority: ntfy takes it from its URL (`?priority=`), so each send builds the URL for that message's priority;
an ntfy URL that sets `priority=` itself keeps it (the owner pinned that channel), other services have none.

Secrets: apprise logs whole URLs, tokens included (at DEBUG, and at ERROR for a URL it cannot parse), so its
logger is cut off from the daemon's handlers; this module reports failures itself, with URLs masked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from dataclasses import dataclass

import apprise

from watchdog_llm.base.vocab import URGENT_KINDS, NotifyKind

PRIORITIES = ("min", "low", "default", "high", "max")  # ntfy's names, lowest first
BUFFER_LIMIT = 50  # messages kept per coalesced send; older ones are counted as dropped
SEND_TIMEOUT = 15.0  # limit of one apprise call; its own HTTP timeouts (4 s connect, 4 s read) come first

_NTFY_SCHEMES = ("ntfy", "ntfys")
_SECRET_PARAMS = ("token", "pass", "key", "secret")
_NOTIFY_TYPE = {
    "min": apprise.NotifyType.INFO,
    "low": apprise.NotifyType.INFO,
    "default": apprise.NotifyType.INFO,
    "high": apprise.NotifyType.WARNING,
    "max": apprise.NotifyType.FAILURE,
}


@dataclass(frozen=True, slots=True)
class Message:
    kind: NotifyKind
    title: str
    body: str
    priority: str = "default"  # min | low | default | high | max

    def __post_init__(self) -> None:
        if self.priority not in PRIORITIES:
            raise ValueError(f"priority {self.priority!r}: expected one of {', '.join(PRIORITIES)}")


class NotifyConfigError(Exception):
    """A notification URL apprise cannot use; the message is one line naming it, masked."""


@dataclass(frozen=True, slots=True)
class Target:
    """One validated notification URL."""

    url: str  # as configured (plus auth=token, see parse_urls): may hold credentials, never log it
    masked: str  # for logs and messages
    secrets: tuple[str, ...]  # pieces of `url` to blank out of apprise's failure reasons
    takes_priority: bool  # an ntfy URL without its own priority=

    def url_for(self, priority: str) -> str:
        if not self.takes_priority:
            return self.url
        return f"{self.url}{'&' if '?' in self.url else '?'}priority={priority}"


# --- URLs ---------------------------------------------------------------------------------------------------


def _split(url: str) -> tuple[str, str, str, str, str]:
    """scheme, userinfo, host[:port], path, query; scheme is "" when `url` has no "://"."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "", "", "", url, ""
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    userinfo, _, hostport = netloc.rpartition("@")
    return scheme.lower(), userinfo, hostport, path, query


def _params(query: str) -> list[tuple[str, str]]:
    return [(k, v) for k, _, v in (p.partition("=") for p in query.split("&") if p)]


def _is_secret_param(key: str) -> bool:
    return any(word in key.lower() for word in _SECRET_PARAMS)


def mask_url(url: str) -> str:
    """`url` fit for a log: credentials become ***. For ntfy the host and topic stay (they say which URL it
    is); other services keep tokens in the host and path (tgram://BOTTOKEN/..., discord://ID/TOKEN), so only
    the scheme and the first characters of the host are kept."""
    scheme, userinfo, hostport, path, query = _split(url)
    if not scheme:
        return _clip(url)
    cred = "***@" if userinfo else ""
    if scheme not in _NTFY_SCHEMES:
        return f"{scheme}://{cred}{_clip(hostport)}"
    params = "&".join(f"{k}={'***' if _is_secret_param(k) else v}" for k, v in _params(query))
    return f"{scheme}://{cred}{hostport}{'/' + path if path else ''}{'?' + params if params else ''}"


def _clip(text: str, keep: int = 4) -> str:
    return text if len(text) <= keep else text[:keep] + "…"


def _secrets(url: str) -> tuple[str, ...]:
    scheme, userinfo, hostport, path, query = _split(url)
    found = [part for part in userinfo.split(":") if part]
    found += [v for k, v in _params(query) if _is_secret_param(k) and v]
    if scheme not in _NTFY_SCHEMES:
        found += [hostport, *path.split("/")]
    # Longest first, so a token is blanked whole before any shorter piece of it.
    return tuple(sorted({s for s in found if len(s) >= 3}, key=len, reverse=True))


def _scrub(text: str, secrets: tuple[str, ...]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return " ".join(text.split())  # one log line


def _ntfy_token_auth(url: str) -> str:
    """ntfys://TOKEN@host/topic means token auth (design doc), but apprise reads a lone user as a token only
    when it starts with tk_; anything else it sends as basic auth with the password "None"."""
    scheme, userinfo, _, _, query = _split(url)
    if scheme not in _NTFY_SCHEMES or not userinfo or ":" in userinfo:
        return url
    if any(k.lower() in ("auth", "token") for k, _ in _params(query)):
        return url
    return f"{url}{'&' if '?' in url else '?'}auth=token"


def _isolate_apprise_log() -> None:
    """Keep apprise's own records (whole URLs, tokens included) away from the daemon's handlers.

    Failures still reach the daemon's log, masked, through this module; apprise's per-call capture
    (AppriseResult.logs()) hangs off its own logger and keeps working."""
    logger = logging.getLogger("apprise")
    logger.propagate = False
    logger.setLevel(logging.WARNING)  # no DEBUG records (payloads, Authorization headers) are even built
    if not any(isinstance(h, logging.NullHandler) for h in logger.handlers):
        logger.addHandler(logging.NullHandler())  # else logging's last-resort handler prints to stderr


def parse_urls(urls: list[str]) -> list[Target]:
    """Validate each URL with apprise (parsing only, no network). Raises NotifyConfigError for the first bad
    one. Empty entries are skipped."""
    _isolate_apprise_log()
    targets = []
    for raw in urls:
        url = _ntfy_token_auth(raw.strip())
        if not url:
            continue
        masked = mask_url(raw.strip())
        probe = apprise.Apprise()
        # add() also accepts several URLs in one string; one entry must be one service.
        if not probe.add(url) or len(probe) != 1:
            why = "not a URL apprise can use (check the scheme and the service's fields)"
            raise NotifyConfigError(f"notification URL {masked}: {why}")
        plugin = probe[0]
        ntfy = getattr(plugin, "secure_protocol", None) == "ntfys"
        if ntfy and not getattr(plugin, "topics", None):
            # apprise accepts it but every send would fail ("no ntfy topics").
            why = "no valid ntfy topic (letters, digits, _ and -, at most 64)"
            raise NotifyConfigError(f"notification URL {masked}: {why}")
        pinned = any(k.lower() == "priority" for k, _ in _params(_split(url)[4]))
        targets.append(Target(url, masked, _secrets(url), takes_priority=ntfy and not pinned))
    return targets


# --- Sending ------------------------------------------------------------------------------------------------


def _deliver(target: Target, title: str, body: str, priority: str) -> str | None:
    """Send to one URL; blocking, so it runs in a worker thread. Returns None, or why it failed (masked)."""
    try:
        # A fresh Apprise per send: a reused plugin throttles (sleeps until 5.5 s after its previous send).
        ap = apprise.Apprise()
        if not ap.add(target.url_for(priority)):
            return "apprise rejected the URL"
        result = ap.notify(body=body, title=title, notify_type=_NOTIFY_TYPE[priority], timeout=SEND_TIMEOUT)
        if result:
            return None
        reasons = list(dict.fromkeys(entry.message for entry in result.logs()))
        reason = "; ".join(reasons) or f"apprise status {result.status.name}"
    except Exception as e:  # apprise promises not to raise; if it does, that is one failed send all the same
        reason = f"{type(e).__name__}: {e}"
    return _scrub(reason, target.secrets)


async def _deliver_all(targets: list[Target], title: str, body: str, prio: str, log: logging.Logger) -> int:
    """Send to every URL at once (a slow one does not delay the others); log each failure once. Returns the
    number of URLs that took the message."""
    outcomes = await asyncio.gather(
        *(asyncio.to_thread(_deliver, t, title, body, prio) for t in targets), return_exceptions=True
    )
    ok = 0
    for target, outcome in zip(targets, outcomes, strict=True):
        if outcome is None:
            ok += 1
            log.debug("notification %r sent to %s", title, target.masked)
            continue
        if isinstance(outcome, BaseException):  # to_thread itself failed (executor shut down)
            outcome = _scrub(f"{type(outcome).__name__}: {outcome}", target.secrets)
        log.warning("notification %r to %s failed: %s", title, target.masked, outcome)
    return ok


async def send_once(urls: list[str], msg: Message, *, log: logging.Logger, node: str = "") -> bool:
    """Send one message now, no coalescing (`notify-test`, `doctor --send`). True when every URL took it.
    Raises NotifyConfigError for a bad URL."""
    targets = parse_urls(urls)
    if not targets:
        log.warning("no notification URLs configured (NTFY_TOPIC, NOTIFY_URLS)")
        return False
    title = f"[{node}] {msg.title}" if node else msg.title
    return await _deliver_all(targets, title, msg.body, msg.priority, log) == len(targets)


class Notifier:
    """Buffers messages from the daemon and sends them, coalesced, from `run()`."""

    def __init__(self, urls: list[str], *, coalesce: float, node: str, log: logging.Logger) -> None:
        self._targets = parse_urls(urls)
        self._coalesce = max(0.0, coalesce)
        self._node = node
        self._log = log
        self._buffer: deque[Message] = deque()
        self._urgent = False  # a "failed"/"stopped" is buffered: send without waiting for the window
        self._lead = False  # the buffer starts with a message from a quiet period: it goes out alone, at once
        self._overflow = 0  # messages pushed out of the full buffer since the last send
        self._overflow_priority = PRIORITIES[0]
        self._last_send = -math.inf
        self._wake = asyncio.Event()
        self._closing = False
        self._done = False
        self._runner: asyncio.Task[None] | None = None
        self._sent = self._failed = self._dropped = 0
        for target in self._targets:
            log.debug("notifications go to %s", target.masked)

    @property
    def enabled(self) -> bool:
        return bool(self._targets)

    @property
    def sent(self) -> int:
        """Messages taken by a URL (one per URL; a coalesced message counts once)."""
        return self._sent

    @property
    def failed(self) -> int:
        """Messages a URL did not take (one per URL)."""
        return self._failed

    @property
    def dropped(self) -> int:
        """Messages never sent: pushed out of a full buffer, left when close() gave up, or submitted after."""
        return self._dropped

    def submit(self, msg: Message) -> None:
        """Queue `msg`; returns at once. Call from the event-loop thread."""
        if not self._targets:
            self._log.debug("notification not sent (none configured): %s", msg.title)
            return
        if self._done:
            self._dropped += 1
            self._log.debug("notification not sent (notifier closed): %s", msg.title)
            return
        if not self._buffer and time.monotonic() >= self._last_send + self._coalesce:
            self._lead = True
        self._buffer.append(msg)
        if len(self._buffer) > BUFFER_LIMIT:
            old = self._buffer.popleft()
            self._overflow += 1
            self._dropped += 1
            self._overflow_priority = max(self._overflow_priority, old.priority, key=PRIORITIES.index)
        if msg.kind in URGENT_KINDS:
            self._urgent = True
        self._wake.set()

    async def run(self) -> None:
        """The owner task: sends what submit() buffers until close(). Run it once."""
        if self._runner is not None and not self._runner.done():
            raise RuntimeError("Notifier.run() is already running")
        self._runner = asyncio.current_task()
        try:
            while True:
                wait: float | None = None
                if self._buffer:
                    due = 0.0 if self._closing or self._urgent else self._last_send + self._coalesce
                    wait = due - time.monotonic()
                    if wait <= 0:
                        await self._send()
                        continue
                elif self._closing:
                    return
                # No await since the checks above, so no submit() can slip in between them and clear().
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), wait)
        finally:
            self._done = True
            if self._buffer:  # only when cancelled: close() ran out of time, or the owner stopped us
                self._dropped += len(self._buffer)
                self._log.warning("%d notification(s) not sent: gave up at shutdown", len(self._buffer))
                self._buffer.clear()

    async def close(self, timeout: float = 8.0) -> None:
        """Send what is buffered now (no waiting for the window), then stop run(). Returns within `timeout`
        even when a server hangs: what is still unsent then is dropped, the worker thread finishes alone."""
        self._closing = True
        self._wake.set()
        runner = self._runner
        if runner is None:  # run() never started: drain here
            if not self._buffer:
                self._done = True
                return
            runner = asyncio.create_task(self.run())
        if runner.done():
            return
        done, _ = await asyncio.wait({runner}, timeout=timeout)
        if not done:
            runner.cancel()
            await asyncio.wait({runner})  # prompt: cancellation only has to unwind run()

    def _take(self) -> tuple[list[Message], int, str]:
        """The next batch, how many older messages were pushed out before it, and their highest priority."""
        # Urgent or closing: everything in one message. Else a quiet-period lead goes alone, and the rest
        # waits for the window it opens, even when it arrived in the same tick.
        if self._coalesce <= 0 or (self._lead and not self._urgent and not self._closing):
            batch = [self._buffer.popleft()]
        else:
            batch = list(self._buffer)
            self._buffer.clear()
        self._lead = False
        overflow, overflow_priority = self._overflow, self._overflow_priority
        self._overflow, self._overflow_priority = 0, PRIORITIES[0]
        self._urgent = any(m.kind in URGENT_KINDS for m in self._buffer)
        if overflow:
            self._log.warning("%d notification(s) dropped: over %d in one window", overflow, BUFFER_LIMIT)
        return batch, overflow, overflow_priority

    def _compose(self, batch: list[Message], overflow: int, overflow_priority: str) -> tuple[str, str, str]:
        if len(batch) == 1 and not overflow:
            m = batch[0]
            return f"[{self._node}] {m.title}", m.body, m.priority
        lines = [" ".join(f"{m.title}: {m.body}".split()) if m.body else m.title for m in batch]
        priorities = [m.priority for m in batch]
        if overflow:
            lines.append(f"and {overflow} more")
            priorities.append(overflow_priority)
        title = f"[{self._node}] {len(batch) + overflow} events"
        return title, "\n".join(lines), max(priorities, key=PRIORITIES.index)

    async def _send(self) -> None:
        title, body, priority = self._compose(*self._take())
        self._last_send = time.monotonic()
        ok = await _deliver_all(self._targets, title, body, priority, self._log)
        self._sent += ok
        self._failed += len(self._targets) - ok
