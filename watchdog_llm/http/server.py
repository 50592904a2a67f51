"""uvicorn servers embedded in the daemon's event loop.

The daemon owns signals (uvicorn's own handlers are switched off) and stops a server through its
`should_exit`. Sockets are bound by us before anything starts, so a port in use or a bad socket
path is a one-line start-up error naming the setting, not a traceback from inside uvicorn.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import resource
import socket
import time
from collections import Counter
from collections.abc import Generator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import uvicorn
from starlette.types import ASGIApp

from watchdog_llm.http.errors import encode, openai_body

UNIX_PATH_MAX = 107  # sun_path is 108 bytes with the terminating NUL
MAX_HEAD_BYTES = 64 * 1024  # request line + headers, whichever HTTP parser reads them


class ListenError(Exception):
    """A listener cannot be opened; the message names the setting at fault."""


@dataclass(frozen=True, slots=True)
class ConnLimits:
    """What one connection may hold, so that nobody can take the daemon's descriptors or its time."""

    max_connections: int = 1024  # open connections of this listener; refused (503) above
    per_peer: int = 256  # of those, from one address (everyone behind the tunnel shares one)
    head_timeout: float = 10.0  # seconds from a request head's first byte (or the connect) to its end
    keepalive_timeout: float = 20.0  # an idle keep-alive connection is closed after this


FD_RESERVE = 256  # descriptors kept for the daemon's own use: logs, pidfds, inotify, NVML, files
FDS_PER_CONNECTION = 3  # a proxied request holds its client's and its upstream's; the admin listener too
# listen() backlog, which is also how many connections asyncio accepts in one go before any of them
# reaches our cap (uvicorn's 2048 would take 2048 descriptors in one burst). A full backlog makes the
# kernel hold further connects back, which costs the daemon nothing.
ACCEPT_BACKLOG = 64


def raise_fd_limit() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard limit (a login shell's 1024 is what 2,000 idle connections
    exhausted). Returns (before, now)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        try:
            target = int(Path("/proc/sys/fs/nr_open").read_text())
        except (OSError, ValueError):
            return soft, soft
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError):
            return soft, soft
    return soft, max(soft, target)


def fit_to_fds(limits: ConnLimits, nofile: int) -> tuple[ConnLimits, str | None]:
    """MAX_CONNECTIONS lowered where two listeners full of connections would leave the daemon less
    than FD_RESERVE descriptors: caps, not the kernel's EMFILE, must be what refuses connections.
    Returns the limits to use and, if lowered, a warning naming the setting."""
    room = max(16, (nofile - FD_RESERVE - 2 * ACCEPT_BACKLOG) // FDS_PER_CONNECTION)
    if limits.max_connections <= room:
        return limits, None
    why = (
        f"MAX_CONNECTIONS={limits.max_connections} lowered to {room}: this process may open {nofile} files "
        f"(RLIMIT_NOFILE), {FD_RESERVE} are kept for the daemon and a proxied request holds {FDS_PER_CONNECTION}"
    )
    return replace(limits, max_connections=room, per_peer=min(limits.per_peer, room)), why


class RateLimitedLog:
    """One warning, then at most one summary per `every` seconds with how many were left unsaid:
    a flood of refusals must not become a flood of log lines (or a full disk)."""

    def __init__(self, log: logging.Logger, every: float = 10.0) -> None:
        self.log = log
        self.every = every
        self._last: dict[str, float] = {}
        self._quiet: Counter[str] = Counter()

    def warning(self, key: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.every:
            self._quiet[key] += 1
            return
        self._last[key] = now
        quiet = self._quiet.pop(key, 0)
        suffix = f" (and {quiet} more like it in the last {now - last:.0f} s)" if quiet and last else ""
        self.log.warning(msg + suffix, *args)


_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def rate_limit_resource_errors(loop: asyncio.AbstractEventLoop, log: logging.Logger) -> None:
    """asyncio reports every failed accept() (out of descriptors, buffers or memory) through the
    loop's exception handler, with a traceback each time: one warning per 10 s instead, with a count.
    Every other error still goes to asyncio's default handler."""
    limited = RateLimitedLog(log)

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in _RESOURCE_ERRNOS:
            message = context.get("message", "")
            limited.warning(message, "event loop: %s: %s", message, exc.strerror or exc)
            return
        loop.default_exception_handler(context)

    loop.set_exception_handler(handler)


@dataclass
class _Guard:
    """Connection counts of one listener, shared by its connections' protocols."""

    limits: ConnLimits
    name: str
    log: RateLimitedLog
    open: int = 0
    peers: Counter[str] = field(default_factory=Counter)

    def admit(self, peer: str) -> str | None:
        """None if the connection may stay; else why not (for the 503 and the log)."""
        lim = self.limits
        if self.open >= lim.max_connections:
            return f"{self.open} connections are open (MAX_CONNECTIONS={lim.max_connections})"
        if self.peers[peer] >= lim.per_peer:
            who = peer or "one peer"
            return f"{self.peers[peer]} connections are open from {who} (MAX_CONNECTIONS_PER_PEER={lim.per_peer})"
        self.open += 1
        self.peers[peer] += 1
        return None

    def release(self, peer: str) -> None:
        self.open -= 1
        self.peers[peer] -= 1
        if self.peers[peer] <= 0:
            del self.peers[peer]


def _raw_response(status: int, reason: str, code: str, message: str, retry_after: int | None = None) -> bytes:
    body = encode(openai_body(status, code, message, retryable=retry_after is not None))
    head = [f"HTTP/1.1 {status} {reason}", "content-type: application/json", f"content-length: {len(body)}"]
    if retry_after is not None:
        head.append(f"retry-after: {retry_after}")
    head.append("connection: close")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def _peer_of(transport: asyncio.BaseTransport) -> str:
    addr = transport.get_extra_info("peername")
    return addr[0] if isinstance(addr, tuple) and addr else ""


_FLUSH_AT = 64 * 1024
_CHUNKED = b"\r\ntransfer-encoding: chunked\r\n"
_LAST_CHUNK = b"0\r\n\r\n"


class _Coalesce:
    """The transport of one response: writes made in one event-loop turn leave in one send.

    uvicorn writes a response's status line and headers, then each body part, as separate sends.
    For a small answer that is two sends, and two wake-ups of its client; for a stream, one send per
    SSE event although the model's events often arrive (and are relayed) many in one turn. Here:
    - the head is held until the first body part (or the end of the turn);
    - a content-length body goes out with the head and at once: nothing is held once it is complete;
    - a chunked body (a stream) is held until the end of the turn, or 64 KiB, or its last chunk.
    Every hold ends by the end of the turn that made it (loop.call_soon); `close()` sends what is held."""

    __slots__ = ("_chunked", "_held", "_size", "_started", "_transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._held: list[bytes] = []
        self._size = 0
        self._started = False
        self._chunked = False

    def write(self, data: bytes) -> None:
        if not self._started:  # the head (or a "100 Continue" before it)
            self._started = True
            self._chunked = _CHUNKED in data
            self._hold(data)
            return
        if not self._chunked:
            if self._held and len(data) < _FLUSH_AT:
                self._held.append(data)
                self.flush()
            else:  # a large body is not copied to join it to its head
                self.flush()
                self._transport.write(data)
            return
        self._hold(data)
        if self._size >= _FLUSH_AT or data.endswith(_LAST_CHUNK):
            self.flush()

    def _hold(self, data: bytes) -> None:
        if not self._held:
            asyncio.get_running_loop().call_soon(self.flush)
        self._held.append(data)
        self._size += len(data)

    def flush(self) -> None:
        if not self._held:
            return
        data = self._held[0] if len(self._held) == 1 else b"".join(self._held)
        self._held.clear()
        self._size = 0
        if not self._transport.is_closing():
            self._transport.write(data)

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def close(self) -> None:
        self.flush()
        self._transport.close()


def _http_protocol(guard: _Guard) -> type[asyncio.Protocol] | str:
    """uvicorn's httptools protocol (llhttp, in C) with the limits its h11 protocol has, and this
    listener's connection caps and head timeout; h11 where httptools is missing. httptools parses a
    request in a fraction of h11's time: measured with bench/gateway.py's load, the gateway's CPU per
    proxied request fell by ~15 % (docs/PERFORMANCE.md)."""
    try:
        import httptools
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # pragma: no cover - httptools is a dependency; a platform without its wheel
        guard.log.log.warning("%s listener: httptools missing: no connection caps or head timeout", guard.name)
        return "h11"

    class StrictHttpTools(HttpToolsProtocol):
        """Two things h11 refuses and llhttp does not:
        - a request head (request line and headers) of any size: h11 stops at MAX_HEAD_BYTES (uvicorn's
          h11_max_incomplete_event_size), httptools at nothing; here it is MAX_HEAD_BYTES as well;
        - versions other than HTTP/1.0 and 1.1: llhttp reads `GET /path` with no version as HTTP/0.9
          and then parses header lines after it, so `GET /x` CRLF `X-Injected: 1 HTTP/1.1` would carry a
          header that h11 (and a proxy in front) sees as part of a malformed request line.
        Both answer 400 and close the connection, as uvicorn does for any request it cannot parse."""

        _head_left: int | None = MAX_HEAD_BYTES  # bytes the current head may still take; None: reading a body
        _heads = 0  # heads read on this connection
        _peer: str | None = None  # set once admitted: its count is released when the connection ends
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            peer = _peer_of(transport)
            why = guard.admit(peer)
            if why is not None:  # refused before uvicorn sees it: its descriptor is freed at once
                guard.log.warning(guard.name, "%s listener: connection refused: %s", guard.name, why)
                transport.write(
                    _raw_response(503, "Service Unavailable", "too_many_connections", "too many connections", 1)
                )
                transport.close()
                return
            self._peer = peer
            super().connection_made(transport)
            self._arm_head_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._peer is None:  # refused in connection_made: uvicorn never knew it
                return
            guard.release(self._peer)
            self._peer = None
            self._cancel_head_timer()
            super().connection_lost(exc)

        def _arm_head_timer(self) -> None:
            if self._head_timer is None:
                self._head_timer = self.loop.call_later(guard.limits.head_timeout, self._head_timed_out)

        def _cancel_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            """No complete request head within HEAD_TIMEOUT of its first byte (or of the connect)."""
            self._head_timer = None
            if self.transport.is_closing():
                return
            if self._heads == 0 and self._head_left == MAX_HEAD_BYTES:  # connected, never said a word
                self.transport.close()
                return
            t = guard.limits.head_timeout
            msg = f"request head not complete within {t:g} s (HEAD_TIMEOUT)"
            self.transport.write(_raw_response(408, "Request Timeout", "head_timeout", msg))
            self.transport.close()

        def data_received(self, data: bytes) -> None:
            if self._head_left is not None:  # a head is being read: it has HEAD_TIMEOUT from here
                self._arm_head_timer()
            left = self._head_left
            if left is None or len(data) <= left:
                if left is not None:
                    self._head_left = left - len(data)
                super().data_received(data)
                return
            # This chunk would take the head past the limit: read as much as is allowed, then see
            # whether the head ended within it.
            self._head_left = 0
            heads = self._heads
            super().data_received(data[:left])
            if self.transport.is_closing():
                return
            if self._heads != heads:  # it did: the rest is body (or the next request)
                super().data_received(data[left:])
                return
            self.logger.warning("Request head larger than %d bytes: refused.", MAX_HEAD_BYTES)
            self.send_400_response("Invalid HTTP request received.")

        def on_headers_complete(self) -> None:
            self._cancel_head_timer()
            self._head_left = None
            self._heads += 1
            if self.parser.get_http_version() not in ("1.0", "1.1"):
                # Raised inside a parser callback: feed_data raises HttpParserError, uvicorn answers 400.
                raise httptools.HttpParserError(f"HTTP/{self.parser.get_http_version()} is not served")
            before = self.cycle
            super().on_headers_complete()
            if self.cycle is not before and self.cycle is not None:
                self.cycle.transport = _Coalesce(self.transport)  # type: ignore[assignment]

        def on_message_complete(self) -> None:
            self._head_left = MAX_HEAD_BYTES
            super().on_message_complete()

    return StrictHttpTools


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield  # the daemon's signal handlers stay in charge


def bind_tcp(host: str, port: int, setting: str) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ListenError(f"{setting}: cannot resolve host {host!r}: {e.strerror}") from None
    family, _, _, _, addr = infos[0]
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on connections whose socket says TCP. With
    # Nagle on, a response written as headers then body waits for the client's delayed ACK (40 ms).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as e:
        sock.close()
        why = "already in use by another process" if e.errno == 98 else (e.strerror or str(e))
        raise ListenError(f"{setting}: cannot listen on {host}:{port}: {why}") from None
    sock.set_inheritable(False)
    return sock


def bind_unix(path: Path, setting: str) -> socket.socket:
    """A unix socket only its owner can connect to: made under a 0177 umask (mode 0600 from the start,
    no window in which others could connect), then renamed into place."""
    if len(os.fsencode(path)) > UNIX_PATH_MAX:
        raise ListenError(
            f"{setting}: socket path {str(path)!r} is longer than {UNIX_PATH_MAX} bytes: "
            "use a shorter STATE_DIR, or ADMIN_HOST/ADMIN_PORT"
        )
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        sock.bind(str(tmp))
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)  # a leftover socket of our previous run (we hold STATE_DIR's lock)
    except OSError as e:
        sock.close()
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise ListenError(f"{setting}: cannot create socket {str(path)!r}: {e.strerror or e}") from None
    finally:
        os.umask(old)
    return sock


class Listener:
    """One uvicorn server on one socket we bound, with its connection caps and timeouts."""

    def __init__(
        self, name: str, app: ASGIApp, sock: socket.socket, log: logging.Logger, limits: ConnLimits | None = None
    ) -> None:
        self.name = name
        self.sock = sock
        self.log = log
        self.guard = _Guard(limits or ConnLimits(), name, RateLimitedLog(log))
        config = uvicorn.Config(
            app,
            lifespan="off",
            log_config=None,
            log_level="warning",
            access_log=False,
            server_header=False,
            # Never take X-Forwarded-For/-Proto for the client's address or scheme: on a shared node
            # any user reaches 127.0.0.1, so "from the proxy's address" proves nothing.
            proxy_headers=False,
            timeout_graceful_shutdown=5,
            timeout_keep_alive=max(1, round(self.guard.limits.keepalive_timeout)),
            http=_http_protocol(self.guard),
            backlog=ACCEPT_BACKLOG,
            h11_max_incomplete_event_size=MAX_HEAD_BYTES,  # where httptools is missing
        )
        self.server = _Server(config)
        self._task: asyncio.Task[None] | None = None

    @property
    def address(self) -> str:
        addr = self.sock.getsockname()
        if isinstance(addr, str):
            return addr
        host, port = addr[0], addr[1]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    async def start(self) -> None:
        self._task = asyncio.create_task(self.server.serve(sockets=[self.sock]), name=f"http-{self.name}")
        while not self.server.started:
            if self._task.done():
                self._task.result()  # raises what stopped it
                raise ListenError(f"{self.name} listener stopped during start-up")
            await asyncio.sleep(0.005)

    async def stop(self) -> None:
        if self._task is None:
            self.sock.close()
            return
        self.server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self._task), 8.0)
        except TimeoutError:
            self.server.force_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, 2.0)
        except Exception as e:  # a failed server must not stop the daemon's shutdown
            self.log.warning("%s listener: %s", self.name, e)
        self.sock.close()
