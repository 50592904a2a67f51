"""The gateway's connections to the model: httpx, with a pool and a network layer cut to what it needs.

Measured on the gateway's hot path (py-spy, and CPU per request under bench/gateway.py's load: 64
requests in flight, a model that answers at once; numbers in docs/PERFORMANCE.md):

- httpx's pool (httpcore's) walks every pooled connection whenever a request starts or ends
  (expired? idle? a poll() on each socket). With one shared client and 64 connections that walk
  was 40 % of the gateway's CPU, it grew with the number of connections, and requests queued behind
  it (p99 of seconds at c=64). `Lanes` lends each request a lane of its own, an httpx transport of
  one connection, from a LIFO free list: the walk is over one connection, and the connection used
  last (warm, least likely to have been closed by the model's keep-alive timeout) goes out first.
- httpcore reaches the socket through anyio: a cancel scope and a deadline per read and per write,
  typed-attribute lookups and a poll() to ask whether an idle socket is readable. `AsyncioBackend`
  is httpcore's network-backend interface on a plain asyncio protocol, with one timer per read.
- httpcore writes a request's head and its body in separate sends: the model's server wakes twice
  per request. `AsyncioStream` holds writes until the next read (or 64 KiB), so a request leaves in
  one send. This and the backend: ~20 % less gateway CPU per request.

httpx stays the client: requests and responses are httpx objects, and httpx's transport maps errors
to httpx's exceptions; only the pool size and the network backend (httpcore's documented
`network_backend`) differ from a default httpx transport. https upstreams use httpx's transport as it is.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ssl
import time
from collections.abc import AsyncIterator, Iterable
from typing import Any, cast

import httpcore
import httpx

_FLUSH_AT = 64 * 1024  # held writes larger than this go out at once
_READ_HIGH = 256 * 1024  # bytes received and not yet read: stop reading the socket above this
_READ_LOW = 64 * 1024  # ... and start again below this


class _Protocol(asyncio.Protocol):
    """The receiving half of one connection: what arrived, and who waits for it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.chunks: collections.deque[bytes] = collections.deque()
        self.size = 0
        self.eof = False
        self.error: BaseException | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.reading_paused = False
        self.writing_paused = False
        self.drained: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports do not subclass asyncio's

    def data_received(self, data: bytes) -> None:
        self.chunks.append(data)
        self.size += len(data)
        if self.size > _READ_HIGH and not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        self.error = exc
        self._wake()
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        if self.drained is not None and not self.drained.done():
            self.drained.set_result(None)

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)


def _expire(fut: asyncio.Future[None], exc: Exception) -> None:
    if not fut.done():
        fut.set_exception(exc)


class AsyncioStream(httpcore.AsyncNetworkStream):
    """httpcore's network stream on an asyncio transport. Writes are held until the next read (or
    until 64 KiB are held): httpcore writes a request as head, then body, then nothing."""

    def __init__(self, transport: asyncio.Transport, protocol: _Protocol) -> None:
        self._transport = transport
        self._protocol = protocol
        self._out: list[bytes] = []
        self._held = 0
        self._write_timeout: float | None = None

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        if self._out:
            # As httpcore does with a failed write: the server may have answered (an error) and closed.
            with contextlib.suppress(httpcore.WriteError):
                await self._flush()
        p = self._protocol
        while not p.chunks:
            if p.eof:
                if p.error is not None:
                    raise httpcore.ReadError(str(p.error) or type(p.error).__name__)
                return b""
            fut = p.loop.create_future()
            p.waiter = fut
            timer = p.loop.call_later(timeout, _expire, fut, httpcore.ReadTimeout()) if timeout is not None else None
            try:
                await fut
            finally:
                p.waiter = None
                if timer is not None:
                    timer.cancel()
        data = p.chunks.popleft()
        if len(data) > max_bytes:
            p.chunks.appendleft(data[max_bytes:])
            data = data[:max_bytes]
        p.size -= len(data)
        if p.reading_paused and p.size < _READ_LOW and not p.eof:
            p.reading_paused = False
            self._transport.resume_reading()
        return data

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        if not buffer:
            return
        self._out.append(buffer)
        self._held += len(buffer)
        self._write_timeout = timeout
        if self._held >= _FLUSH_AT:
            await self._flush()

    async def _flush(self) -> None:
        data = self._out[0] if len(self._out) == 1 else b"".join(self._out)
        self._out.clear()
        self._held = 0
        p = self._protocol
        if p.eof or self._transport.is_closing():
            raise httpcore.WriteError("the connection is closed")
        self._transport.write(data)
        if not p.writing_paused:
            return
        fut = p.loop.create_future()
        p.drained = fut
        timeout = self._write_timeout
        timer = p.loop.call_later(timeout, _expire, fut, httpcore.WriteTimeout()) if timeout is not None else None
        try:
            await fut
        finally:
            p.drained = None
            if timer is not None:
                timer.cancel()
        if p.error is not None or self._transport.is_closing():
            raise httpcore.WriteError("the connection was lost while writing")

    async def aclose(self) -> None:
        self._out.clear()
        self._transport.close()

    async def start_tls(
        self, ssl_context: ssl.SSLContext, server_hostname: str | None = None, timeout: float | None = None
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("TLS is not served by this backend (https upstreams use httpx's own)")

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable":  # an idle connection with something to read: the server closed it
            return self._protocol.eof or bool(self._protocol.chunks)
        if info == "socket":
            return self._transport.get_extra_info("socket")
        if info == "client_addr":
            return self._transport.get_extra_info("sockname")
        if info == "server_addr":
            return self._transport.get_extra_info("peername")
        return None


class AsyncioBackend(httpcore.AsyncNetworkBackend):
    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                transport, protocol = await loop.create_connection(
                    lambda: _Protocol(loop),
                    host,
                    port,
                    local_addr=(local_address, 0) if local_address else None,
                )
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"no connection to {host}:{port} within {timeout} s") from None
        except OSError as e:
            raise httpcore.ConnectError(str(e)) from None
        sock = transport.get_extra_info("socket")
        for option in socket_options or ():
            sock.setsockopt(*option)
        return AsyncioStream(transport, protocol)

    async def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.AsyncNetworkStream:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                transport, protocol = await loop.create_unix_connection(lambda: _Protocol(loop), path)
        except TimeoutError:
            raise httpcore.ConnectTimeout(f"no connection to {path} within {timeout} s") from None
        except OSError as e:
            raise httpcore.ConnectError(str(e)) from None
        return AsyncioStream(transport, protocol)

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


_BACKEND = AsyncioBackend()
_UNUSED_TLS = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies against no CA: could never connect


# How a kept connection fails when the model closed it just as a request went out on it.
_STALE = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)
# Below the model server's own keep-alive timeout (uvicorn's and so vLLM's default: 5 s), so that
# the gateway, not the model, is the side that ends an idle connection.
UPSTREAM_KEEPALIVE_EXPIRY = 4.0


class Lanes(httpx.AsyncBaseTransport):
    """The upstream transport: connections to the model, each lent to one request at a time. No
    limit on lanes in use (the per-key limiter bounds concurrency); `keep` bounds the idle ones."""

    def __init__(self, keep: int, keepalive_expiry: float, uds: str | None = None) -> None:
        self._keep = keep
        self._expiry = keepalive_expiry
        self._uds = uds  # every plain-http connection goes to this unix socket (the model's)
        self._https: httpx.AsyncHTTPTransport | None = None
        self._idle: collections.deque[tuple[float, httpx.AsyncHTTPTransport]] = collections.deque()  # (since, lane)
        self._lent: set[httpx.AsyncHTTPTransport] = set()
        self._closed = False

    def _new_lane(self) -> httpx.AsyncHTTPTransport:
        # The transport's own pool is replaced, and lanes carry plain http only: the TLS context it
        # is given is never used (httpx's default one takes ~25 ms to build, loading CA certificates).
        lane = httpx.AsyncHTTPTransport(verify=_UNUSED_TLS, trust_env=False)
        lane._pool = httpcore.AsyncConnectionPool(
            max_connections=1,
            max_keepalive_connections=1,
            keepalive_expiry=self._expiry,
            uds=self._uds,
            network_backend=_BACKEND,
        )
        return lane

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._closed:
            raise httpx.ConnectError("the gateway is shutting down", request=request)
        if request.url.scheme != "http":  # a model behind TLS: httpx's transport as it is
            if self._https is None:
                self._https = httpx.AsyncHTTPTransport(
                    trust_env=False,
                    limits=httpx.Limits(max_keepalive_connections=self._keep, keepalive_expiry=self._expiry),
                )
            return await self._https.handle_async_request(request)
        reused = bool(self._idle)
        lane = self._idle.pop()[1] if reused else self._new_lane()
        self._lent.add(lane)
        try:
            resp = await lane.handle_async_request(request)
        except _STALE:
            # A kept connection the model closed as we sent (its keep-alive timer ran out at that
            # moment): it read nothing of this request, so the request goes again, once, on a new one.
            await self._give(lane)
            if not reused or not isinstance(request.stream, httpx.ByteStream):
                raise
            lane = self._new_lane()
            self._lent.add(lane)
            try:
                resp = await lane.handle_async_request(request)
            except BaseException:
                await self._give(lane)
                raise
        except BaseException:
            await self._give(lane)
            raise
        assert isinstance(resp.stream, httpx.AsyncByteStream)
        resp.stream = _LentStream(resp.stream, lane, self)
        return resp

    async def _give(self, lane: httpx.AsyncHTTPTransport) -> None:
        self._lent.discard(lane)
        if not self._closed and len(self._idle) < self._keep:
            now = time.monotonic()
            self._idle.append((now, lane))
            if now - self._idle[0][0] > self._expiry:  # the longest idle, whose model may have closed it
                await self._idle.popleft()[1].aclose()
        else:
            await lane.aclose()

    @property
    def idle(self) -> int:
        return len(self._idle)

    @property
    def lent(self) -> int:
        return len(self._lent)

    async def aclose(self) -> None:
        self._closed = True
        lanes = [lane for _, lane in self._idle] + list(self._lent)
        self._idle.clear()
        self._lent.clear()
        for lane in lanes:
            await lane.aclose()
        if self._https is not None:
            await self._https.aclose()


class _LentStream(httpx.AsyncByteStream):
    """A response body read over a lent lane; closing it gives the lane back."""

    __slots__ = ("_lane", "_lanes", "_stream")

    def __init__(self, stream: httpx.AsyncByteStream, lane: httpx.AsyncHTTPTransport, lanes: Lanes) -> None:
        self._stream = stream
        self._lane: httpx.AsyncHTTPTransport | None = lane
        self._lanes = lanes

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._stream.__aiter__()

    async def aclose(self) -> None:
        try:
            await self._stream.aclose()
        finally:
            lane, self._lane = self._lane, None
            if lane is not None:
                await self._lanes._give(lane)
