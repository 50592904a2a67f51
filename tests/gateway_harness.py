"""Hosting the public gateway in a test, and the upstreams it talks to.

- `GatewayServer`: the real `Gateway` behind a real uvicorn `Listener` on a real port, on its own event
  loop in a background thread; its availability is a switch the test flips, `model_down()` runs on
  the gateway's loop (as the daemon calls it on a yield).
- `StandIn`: the stand-in model server (`vllm-standin serve`) as a real process tree, guarded by an
  internal key (VLLM_API_KEY), killed with its whole process group at the end.
- `RawUpstream`: a tiny HTTP server on a raw socket whose behaviour per request is a function
  (reset the connection, never answer, stream SSE slowly, ...): the faults a real model server has.
- `raw_request()`: one HTTP exchange over a raw socket, bytes exactly as given (paths and headers
  no client library would send).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import select
import signal
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
from helpers import bin_path, free_port, wait_for

from watchdog_llm.availability import Availability
from watchdog_llm.http.gateway import Gateway, GatewayConfig
from watchdog_llm.http.keys import KeyRing, Limiter
from watchdog_llm.http.server import ConnLimits, Listener, bind_tcp
from watchdog_llm.metrics import Metrics

KEY_A = "alice-key-0123456789abcdef"
KEY_B = "bob-key-fedcba9876543210xyz"
INTERNAL_KEY = "internal-key-" + os.urandom(8).hex()
MODEL = "standin/test"

SERVING = Availability(serving=True, phase="serving", code="serving", message="serving", retry_after=0, retryable=True)
YIELDED = Availability(
    serving=False,
    phase="yielded",
    code="model_yielded",
    message="GPUs reclaimed by a Slurm job; the model returns when the node is idle",
    retry_after=60,
    retryable=True,
)


class Switch:
    """The availability the gateway reads per request; the test flips it (one attribute: atomic enough)."""

    def __init__(self, value: Availability = SERVING) -> None:
        self.value = value

    def __call__(self) -> Availability:
        return self.value


class ErrorLog(logging.Handler):
    """Every ERROR (or worse) logged anywhere in the process while a gateway runs: an unhandled
    exception in the gateway or uvicorn ("Exception in ASGI application") shows up here."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def lines(self) -> list[str]:
        return [f"{r.name}: {r.getMessage()}" for r in self.records]


class GatewayServer:
    def __init__(
        self,
        upstream_url: str,
        *,
        cfg: GatewayConfig | None = None,
        limit: int = 0,
        internal_key: str = INTERNAL_KEY,
        model: str = MODEL,
        limits: ConnLimits | None = None,
    ) -> None:
        self.conn_limits = limits
        self.avail = Switch()
        self.upstream_url = upstream_url
        self.internal_key = internal_key
        self.cfg = cfg or GatewayConfig()
        self.keys = KeyRing([("alice", KEY_A), ("bob", KEY_B)])
        self.limiter = Limiter(limit)
        self.metrics = Metrics()
        self.model = model
        self.errors = ErrorLog()
        logging.getLogger().addHandler(self.errors)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="gateway-loop", daemon=True)
        self.thread.start()
        self.gw: Gateway | None = None
        self.listener: Listener | None = None
        try:
            self._call(self._start(), 10)
        except BaseException:
            self.close()
            raise
        assert self.listener is not None
        self.port = int(self.listener.sock.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"

    def _call(self, coro: Any, timeout: float) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self) -> None:
        self.gw = Gateway(
            self.cfg,
            self.keys,
            self.limiter,
            self.metrics,
            self.avail,
            lambda: (self.upstream_url, self.internal_key, False),
            lambda: {"model": self.model, "since": time.time() - 3600},
        )
        sock = bind_tcp("127.0.0.1", 0, "PUBLIC_PORT")
        self.listener = Listener("public", self.gw, sock, logging.getLogger("test.gateway"), self.conn_limits)
        await self.listener.start()

    async def _stop(self) -> None:
        if self.listener is not None:
            await self.listener.stop()
        if self.gw is not None:
            await self.gw.aclose()

    def set(self, avail: Availability) -> None:
        self.avail.value = avail

    def model_down(self) -> None:
        """What the daemon does when the model leaves serving: end every stream, on the gateway's loop."""
        assert self.gw is not None
        self.loop.call_soon_threadsafe(self.gw.model_down)

    def upstream_lanes(self) -> tuple[int, int]:
        """(lent, idle): the gateway's connections to the upstream in use, and kept for reuse."""
        assert self.gw is not None
        lanes = self.gw.upstream_client
        return tuple(self._call(_get(lambda: (lanes.lent, lanes.idle)), 5))  # type: ignore[return-value]

    def in_flight(self, consumer: str) -> int:
        return int(self._call(_get(lambda: self.limiter.in_flight(consumer)), 5))

    def close(self) -> None:
        try:
            if self.loop.is_running():
                self._call(self._stop(), 20)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            if not self.loop.is_running():
                self.loop.close()
            logging.getLogger().removeHandler(self.errors)


async def _get(fn: Callable[[], Any]) -> Any:
    return fn()


# ---------------------------------------------------------------------------------------------------
# The stand-in model server, as a process tree
# ---------------------------------------------------------------------------------------------------


class StandIn:
    def __init__(self, tmp: Path, key: str, token_delay_ms: float) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("STANDIN_", "VLLM_"))}
        env.update(
            VLLM_API_KEY=key,
            VLLM_SERVER_DEV_MODE="1",  # its dev routes exist: the gateway must still never reach them
            STANDIN_STARTUP_S="0.1",
            STANDIN_TOKEN_DELAY_MS=str(token_delay_ms),
            PYTHONUNBUFFERED="1",
        )
        self.log = tmp / "standin.log"
        argv = [bin_path("vllm-standin"), "serve", MODEL, "--port", str(self.port), "--disable-uvicorn-access-log"]
        with self.log.open("wb") as out:  # a file, never a pipe: a full pipe would block it
            self.proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.tree: list[psutil.Process] = [psutil.Process(self.proc.pid)]
        try:
            wait_for(self._healthy, timeout=30, interval=0.05, what=f"the stand-in on {self.url}")
        except BaseException:
            self.close()
            raise
        self.tree += psutil.Process(self.proc.pid).children(recursive=True)

    def _healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"the stand-in exited {self.proc.returncode}: {self.log.read_text()[-2000:]}")
        try:
            return httpx.get(self.url + "/health", timeout=1.0, trust_env=False).status_code == 200
        except httpx.HTTPError:
            return False

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.url + path, timeout=5.0, trust_env=False)

    def close(self) -> None:
        """SIGKILL the whole process group (it runs in its own session), then reap every member: they
        re-parent to pytest, the tests' child subreaper."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        for p in self.tree:  # anything that left the group
            with contextlib.suppress(psutil.Error):
                p.kill()
        self.proc.wait(10)
        deadline = time.monotonic() + 5
        for p in self.tree[1:]:
            while time.monotonic() < deadline:
                try:
                    if os.waitpid(p.pid, os.WNOHANG) != (0, 0):
                        break
                except ChildProcessError:  # not (yet) ours, or already reaped
                    if not psutil.pid_exists(p.pid) or _zombie_of_other(p):
                        break
                time.sleep(0.01)


def _zombie_of_other(p: psutil.Process) -> bool:
    try:
        return p.status() == psutil.STATUS_ZOMBIE and p.ppid() != os.getpid()
    except psutil.Error:
        return True


# ---------------------------------------------------------------------------------------------------
# Fault upstreams on raw sockets
# ---------------------------------------------------------------------------------------------------


@dataclass
class Upstreamed:
    """One request as the upstream received it."""

    head: bytes
    body: bytes

    @property
    def request_line(self) -> str:
        return self.head.split(b"\r\n", 1)[0].decode("latin-1")

    def header(self, name: str) -> list[str]:
        out = []
        for line in self.head.split(b"\r\n")[1:]:
            k, _, v = line.partition(b":")
            if k.strip().lower() == name.lower().encode():
                out.append(v.strip().decode("latin-1"))
        return out


Behaviour = Callable[["RawUpstream", socket.socket, Upstreamed], None]


@dataclass
class RawUpstream:
    """Accepts connections; reads each request (head + Content-Length body); runs `behave` in a thread."""

    behave: Behaviour
    on_request: Callable[[Upstreamed], None] | None = None
    requests: list[Upstreamed] = field(default_factory=list)
    events_sent: int = 0
    half_sent: bool = False
    disconnected_at: list[float] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    stopping: threading.Event = field(default_factory=threading.Event)
    in_flight: int = 0

    def __post_init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.sock.settimeout(0.05)
        self.port = int(self.sock.getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._conns: list[socket.socket] = []
        self._acceptor = threading.Thread(target=self._accept, name="raw-upstream", daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(10.0)
            with self._lock:
                self._conns.append(conn)
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            req = _read_request(conn)
            if req is None:
                return
            with self._lock:
                self.requests.append(req)
                self.in_flight += 1
            try:
                if self.on_request is not None:
                    self.on_request(req)
                self.behave(self, conn, req)
            finally:
                with self._lock:
                    self.in_flight -= 1
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                conn.close()

    def close(self) -> None:
        self.stopping.set()
        self.release.set()
        self._acceptor.join(5)
        self.sock.close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
        for t in self._threads:
            t.join(5)

    def wait_closed_by_peer(self, conn: socket.socket, timeout: float) -> bool:
        """Block until the peer closes (EOF or reset) or `timeout`; True if it closed."""
        r, _, _ = select.select([conn], [], [], timeout)
        if not r:
            return False
        try:
            return conn.recv(65536) == b""
        except OSError:
            return True


def _read_request(conn: socket.socket) -> Upstreamed | None:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    req = Upstreamed(head, body)
    length = int((req.header("content-length") or ["0"])[0])
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            break
        body += chunk
    req.body = body
    return req


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
)


HALF_EVENT = b'data: {"id":"chatcmpl-x","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":" hal'


def sse_event(i: int) -> bytes:
    return (
        b'data: {"id":"chatcmpl-x","object":"chat.completion.chunk","model":"m","choices":[{"index":0,'
        b'"delta":{"content":" w' + str(i).encode() + b'"},"finish_reason":null}]}\n\n'
    )


def reset(up: RawUpstream, conn: socket.socket, req: Upstreamed) -> None:
    """Accept the request, then reset the connection (SO_LINGER 0: RST, not FIN)."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


def hang(up: RawUpstream, conn: socket.socket, req: Upstreamed) -> None:
    """Accept the request and never answer (until the peer gives up or the test ends)."""
    while not up.stopping.is_set():
        if up.wait_closed_by_peer(conn, 0.05):
            up.disconnected_at.append(time.monotonic())
            return


def json_ok(up: RawUpstream, conn: socket.socket, req: Upstreamed) -> None:
    """200 with a small JSON body; a request whose body holds "hold" waits for `up.release` first."""
    if b'"hold"' in req.body:
        up.release.wait(15)
    body = (
        b'{"id":"x","object":"chat.completion","choices":[{"index":0,"message":{"role":"assistant","content":"ok"}}]}'
    )
    head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nconnection: close\r\n"
    head += f"content-length: {len(body)}\r\n\r\n".encode()
    conn.sendall(head + body)
    up.wait_closed_by_peer(conn, 0.5)


def canned(data: bytes, then: str = "close") -> Behaviour:
    """Send `data` as it is (a broken response, say), then "close" (FIN), "reset" (RST) or "hang"."""

    def behave(up: RawUpstream, conn: socket.socket, req: Upstreamed) -> None:
        conn.sendall(data)
        if then == "reset":
            reset(up, conn, req)
        elif then == "hang":
            hang(up, conn, req)

    return behave


def slow_sse(events: int = 200, interval: float = 0.05, then: str = "done") -> Behaviour:
    """Stream `events` SSE events, one per `interval`, recording when the client went away.
    `then`: "done" (a clean `data: [DONE]`), "eof" (the body ends without it), "reset" (RST after the
    events), "hang" (silence), "partial" (half an event, then silence)."""

    def behave(up: RawUpstream, conn: socket.socket, req: Upstreamed) -> None:
        try:
            conn.sendall(SSE_HEAD)
            for i in range(events):
                conn.sendall(_chunk(sse_event(i)))
                up.events_sent += 1
                if up.wait_closed_by_peer(conn, interval):
                    up.disconnected_at.append(time.monotonic())
                    return
            if then == "done":
                conn.sendall(_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
            elif then == "reset":
                reset(up, conn, req)
                return
            elif then == "eof":  # a clean end of the body, without [DONE]
                conn.sendall(b"0\r\n\r\n")
            elif then == "partial":
                conn.sendall(_chunk(HALF_EVENT))
                up.half_sent = True
            while not up.stopping.is_set():
                if up.wait_closed_by_peer(conn, 0.05):
                    up.disconnected_at.append(time.monotonic())
                    return
        except OSError:
            up.disconnected_at.append(time.monotonic())

    return behave


# ---------------------------------------------------------------------------------------------------
# Raw HTTP exchanges
# ---------------------------------------------------------------------------------------------------


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes
    raw: bytes


class Reader:
    """Buffered reads from a socket (with a timeout set): responses one after another on one connection."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""
        self.eof = False

    def _more(self) -> bool:
        chunk = self.sock.recv(65536)
        if not chunk:
            self.eof = True
        self.buf += chunk
        return bool(chunk)

    def until(self, marker: bytes) -> bytes:
        while marker not in self.buf:
            if not self._more():
                raise ConnectionError(f"connection closed before {marker!r}: {self.buf[:300]!r}")
        out, _, self.buf = self.buf.partition(marker)
        return out + marker

    def exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._more():
                raise ConnectionError(f"connection closed {n - len(self.buf)} bytes short")
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def rest(self) -> bytes:
        while self._more():
            pass
        out, self.buf = self.buf, b""
        return out

    def at_eof(self) -> bool:
        return not self.buf and (self.eof or not self._more())

    def response(self) -> RawResponse:
        """One HTTP/1.1 response: Content-Length, chunked, or until EOF."""
        head = self.until(b"\r\n\r\n")
        lines = head[:-4].decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        if 100 <= status < 200:
            return RawResponse(status, headers, b"", head)
        if "content-length" in headers:
            body = self.exactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while True:
                size = int(self.until(b"\r\n")[:-2].split(b";")[0], 16)
                if size == 0:
                    self.until(b"\r\n")
                    break
                body += self.exactly(size + 2)[:-2]
        else:
            body = self.rest()
        return RawResponse(status, headers, body, head + body)


def read_response(sock: socket.socket) -> RawResponse:
    return Reader(sock).response()


def read_responses(sock: socket.socket) -> list[RawResponse]:
    """Every response on the connection until the server closes it (or goes quiet for the timeout)."""
    r = Reader(sock)
    out = []
    try:
        while not r.at_eof():
            out.append(r.response())
    except (TimeoutError, ConnectionError, OSError):
        pass
    return out


def raw_request(port: int, data: bytes, timeout: float = 5.0) -> RawResponse:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        return read_response(s)
