"""uvicorn servers embedded in the daemon's event loop.

The daemon owns signals (uvicorn's own handlers are switched off) and stops a server through its
`should_exit`. Sockets are bound by us before anything starts, so a port in use or a bad socket
path is a one-line start-up error naming the setting, not a traceback from inside uvicorn.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Generator
from pathlib import Path

import uvicorn
from starlette.types import ASGIApp

UNIX_PATH_MAX = 107  # sun_path is 108 bytes with the terminating NUL
MAX_HEAD_BYTES = 64 * 1024  # request line + headers, whichever HTTP parser reads them


class ListenError(Exception):
    """A listener cannot be opened; the message names the setting at fault."""


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


def _http_protocol() -> type[asyncio.Protocol] | str:
    """uvicorn's httptools protocol (llhttp, in C) with the limits its h11 protocol has; h11 where
    httptools is missing. httptools parses a request in a fraction of h11's time: measured with
    bench/gateway.py's load, the gateway's CPU per proxied request fell by ~15 % (docs/PERFORMANCE.md)."""
    try:
        import httptools
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # pragma: no cover - httptools is a dependency; a platform without its wheel
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

        def data_received(self, data: bytes) -> None:
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
    """One uvicorn server on one socket we bound."""

    def __init__(self, name: str, app: ASGIApp, sock: socket.socket, log: logging.Logger) -> None:
        self.name = name
        self.sock = sock
        self.log = log
        config = uvicorn.Config(
            app,
            lifespan="off",
            log_config=None,
            log_level="warning",
            access_log=False,
            server_header=False,
            timeout_graceful_shutdown=5,
            timeout_keep_alive=30,
            http=_http_protocol(),
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
