"""The gateway's pure parts: what a user is told while the model is away, keys, settings, sockets."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import httpcore
import httpx
import pytest
from helpers import run_async

from watchdog_llm import config
from watchdog_llm.availability import availability, typical_start
from watchdog_llm.config import ConfigError
from watchdog_llm.http.keys import ANONYMOUS, KeyConfigError, KeyRing, Limiter, parse_entries
from watchdog_llm.http.server import ListenError, bind_tcp, bind_unix
from watchdog_llm.http.upstream import AsyncioBackend, AsyncioStream, Lanes
from watchdog_llm.policy import Phase, State, YieldRecord
from watchdog_llm.supervise.probes import Liveness, probe_client

KEY_A = "alice-key-0123456789"
KEY_B = "bob-key-0123456789abc"


def _state(phase: Phase, **kw: object) -> State:
    return replace(State(), phase=phase, **kw)  # type: ignore[arg-type]


def test_serving_is_available() -> None:
    a = availability(_state(Phase.SERVING), 100.0, timer_left=None, start_s=20, cooldown_s=60)
    assert a.serving and a.code == "serving"


def test_yielded_says_a_job_took_the_gpus_and_names_no_job() -> None:
    rec = YieldRecord(job="job_4242", detected_at=1.0, cause="Slurm job 4242 on GPU 3")
    st = _state(Phase.YIELDED, jobs=frozenset({"job_4242"}), last_yield=rec, reason="GPUs reclaimed by job 4242")
    a = availability(st, 100.0, timer_left=None, start_s=20, cooldown_s=60)
    assert not a.serving and a.code == "model_yielded" and a.retryable
    assert a.message == "GPUs reclaimed by a Slurm job; the model returns when the node is idle"
    assert "4242" not in a.message
    assert a.retry_after == 80  # at least the cooldown and a start, once the job ends


def test_yield_to_a_foreign_process_says_so() -> None:
    rec = YieldRecord(job="", detected_at=1.0, cause="a foreign process on GPU 3 (pid 4242)")
    a = availability(_state(Phase.YIELDED, last_yield=rec), 100.0, timer_left=None, start_s=20, cooldown_s=60)
    assert a.message.startswith("another program is using the GPUs") and "4242" not in a.message


def test_cooldown_and_backoff_count_their_timer_and_a_start() -> None:
    a = availability(_state(Phase.COOLDOWN), 100.0, timer_left=12.2, start_s=7.5, cooldown_s=60)
    assert a.code == "model_cooldown" and a.retry_after == 20 and "about 20 s" in a.message
    b = availability(_state(Phase.BACKOFF), 100.0, timer_left=3.0, start_s=7.0, cooldown_s=60)
    assert b.code == "model_restarting" and b.retry_after == 10


def test_starting_counts_down_and_never_says_zero() -> None:
    st = _state(Phase.STARTING, started_at=90.0)
    assert availability(st, 100.0, timer_left=None, start_s=30, cooldown_s=60).retry_after == 20
    late = availability(st, 200.0, timer_left=None, start_s=30, cooldown_s=60)
    assert late.retry_after == 5 and late.code == "model_starting"


def test_failed_is_not_retryable() -> None:
    a = availability(_state(Phase.FAILED), 1.0, timer_left=None, start_s=30, cooldown_s=60)
    assert a.code == "model_failed" and not a.retryable and a.retry_after >= 60


def test_typical_start_is_the_median_or_a_bounded_guess() -> None:
    assert typical_start([], 900) == 60 and typical_start([], 20) == 20
    assert typical_start([30.0, 5.0, 10.0], 900) == 10.0


def test_key_entries_named_or_bare() -> None:
    ring = KeyRing(parse_entries(f"alice:{KEY_A}, {KEY_B}", "PUBLIC_API_KEYS", lines=False))
    assert ring.consumer(KEY_A) == "alice" and ring.consumer(KEY_B) == "key-2"
    assert ring.consumer("nope-nope-nope-nope") is None and ring.consumer("") is None and ring.consumer(None) is None
    assert ring.consumer(KEY_A + "x") is None and ring.consumer(KEY_A[:-1]) is None
    assert len(ring) == 2 and not ring.open


def test_no_keys_is_open() -> None:
    ring = KeyRing([])
    assert ring.open and ring.consumer(None) == ANONYMOUS and ring.consumer("anything") == ANONYMOUS


def test_keys_file_with_comments_and_the_legacy_key(tmp_path: Path) -> None:
    f = tmp_path / "keys"
    f.write_text(f"# team\n\nalice:{KEY_A}\n  bob:{KEY_B}  \n")
    ring = KeyRing.from_settings("", str(f), "legacy-key-0123456789")
    assert ring.consumer(KEY_B) == "bob" and ring.consumer("legacy-key-0123456789") == "api-key"


@pytest.mark.parametrize(
    ("text", "msg"),
    [
        ("alice:short", "PUBLIC_API_KEYS entry 1: key too short (5 characters; at least 16)"),
        (f"alice:{KEY_A} bob:{KEY_A}", "key bob is the same key as alice"),
        (f"alice:{KEY_A} alice:{KEY_B}", "two keys are named alice"),
        ("alice:key\x01with-control-chars", "PUBLIC_API_KEYS entry 1: a key must be printable ASCII without spaces"),
    ],
)
def test_bad_keys_name_the_entry_and_never_echo_the_key(text: str, msg: str) -> None:
    with pytest.raises(KeyConfigError) as err:
        KeyRing(parse_entries(text, "PUBLIC_API_KEYS", lines=False))
    assert str(err.value) == msg and KEY_A not in str(err.value)


def test_bad_keys_file_names_file_and_line(tmp_path: Path) -> None:
    f = tmp_path / "keys"
    f.write_text(f"alice:{KEY_A}\n# x\nbob:short\n")
    with pytest.raises(KeyConfigError, match=r"PUBLIC_API_KEYS_FILE .*keys line 3: key too short"):
        KeyRing.from_settings("", str(f))
    with pytest.raises(KeyConfigError, match="cannot be read: No such file"):
        KeyRing.from_settings("", str(tmp_path / "missing"))


def test_limiter_counts_per_consumer() -> None:
    lim = Limiter(2)
    assert lim.acquire("a") and lim.acquire("a") and not lim.acquire("a") and lim.acquire("b")
    lim.release("a")
    assert lim.acquire("a") and lim.in_flight("a") == 2
    assert all(Limiter(0).acquire("x") for _ in range(1000))  # 0: no limit


def _load(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, **env: str) -> config.Settings:
    monkeypatch.chdir(tmp_path)
    for k in list(os.environ):
        if k.upper() in {n.upper() for n in config.Settings.model_fields}:
            monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return config.load()


def test_admin_over_tcp_needs_a_token(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="ADMIN_HOST needs ADMIN_TOKEN"):
        _load(monkeypatch, tmp_path, ADMIN_HOST="127.0.0.1")
    with pytest.raises(ConfigError, match="ADMIN_TOKEN is too short") as err:
        _load(monkeypatch, tmp_path, ADMIN_HOST="127.0.0.1", ADMIN_TOKEN="tiny-secret")
    assert "tiny-secret" not in str(err.value)
    s = _load(monkeypatch, tmp_path, ADMIN_HOST="127.0.0.1", ADMIN_TOKEN="a-long-enough-token-123")
    assert s.admin_port == 8081


def test_ports_must_differ(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="SERVER_PORT=9000, PUBLIC_PORT=9000: each needs its own port"):
        _load(monkeypatch, tmp_path, SERVER_PORT="9000", PUBLIC_PORT="9000", SERVER_SOCKET="off")
    # vLLM on its unix socket (the default) uses no port: SERVER_PORT is not in the way then.
    assert _load(monkeypatch, tmp_path, SERVER_PORT="9000", PUBLIC_PORT="9000").model_socket is not None


def test_server_socket_is_checked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    s = _load(monkeypatch, tmp_path, STATE_DIR=str(tmp_path / "st"))
    assert s.model_socket == tmp_path / "st" / "model.sock"
    assert _load(monkeypatch, tmp_path, SERVER_SOCKET="OFF").model_socket is None
    assert _load(monkeypatch, tmp_path, SERVER_SOCKET="/run/x/m.sock").model_socket == Path("/run/x/m.sock")
    with pytest.raises(ConfigError, match=r"SERVER_SOCKET='m.sock' .*: expected auto, off or an absolute path"):
        _load(monkeypatch, tmp_path, SERVER_SOCKET="m.sock")
    with pytest.raises(ConfigError, match=r"SERVER_SOCKET: .* is 1[0-9]{2} bytes, more than the 107") as err:
        _load(monkeypatch, tmp_path, STATE_DIR="/tmp/" + "d" * 100)
    assert len(str(err.value).splitlines()) == 1


def test_public_keys_are_hidden_in_errors(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / "config.env").write_text("PUBLIC_API_KEY=alice:secret-secret-secret\n")
    with pytest.raises(ConfigError) as err:
        _load(monkeypatch, tmp_path)
    assert "did you mean PUBLIC_API_KEYS" in str(err.value) and "secret-secret" not in str(err.value)


def test_unix_socket_is_0600_from_the_start_and_replaces_a_leftover(tmp_path: Path) -> None:
    path = tmp_path / "admin.sock"
    first = bind_unix(path, "admin socket")
    first.close()  # a crashed daemon's socket file stays behind
    sock = bind_unix(path, "admin socket")
    try:
        st = path.stat()
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert [p.name for p in tmp_path.iterdir()] == ["admin.sock"]  # no temporary name left
    finally:
        sock.close()


def test_unix_socket_path_too_long_names_the_fix(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 120)
    with pytest.raises(ListenError, match="longer than 107 bytes: use a shorter STATE_DIR, or ADMIN_HOST"):
        bind_unix(deep / "admin.sock", "admin socket")


def test_port_in_use_names_the_setting() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(ListenError, match=f"PUBLIC_HOST/PUBLIC_PORT: cannot listen on 127.0.0.1:{port}: already"):
            bind_tcp("127.0.0.1", port, "PUBLIC_HOST/PUBLIC_PORT")
    with pytest.raises(ListenError, match="cannot resolve host"):
        bind_tcp("no-such-host.invalid", 1, "PUBLIC_HOST/PUBLIC_PORT")


def test_accepted_connections_have_nagle_off() -> None:
    """With Nagle on, a response written as headers then body waits 40 ms for the client's delayed
    ACK on every kept-alive request: asyncio turns it off only for sockets that say IPPROTO_TCP."""
    import asyncio
    import socket

    from watchdog_llm.http.server import bind_tcp

    async def main() -> int:
        sock = bind_tcp("127.0.0.1", 0, "PUBLIC_HOST/PUBLIC_PORT")
        seen: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            s = w.get_extra_info("socket")
            seen.set_result(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            w.close()

        server = await asyncio.start_server(handle, sock=sock)
        _, w = await asyncio.open_connection(*sock.getsockname()[:2])
        value = await asyncio.wait_for(seen, 5)
        w.close()
        server.close()
        return value

    assert asyncio.run(main()) != 0


# ---------------------------------------------------------------------------------------------------
# The gateway's upstream connections (watchdog_llm/http/upstream.py), against small asyncio servers
# ---------------------------------------------------------------------------------------------------


class _KeepAliveServer:
    """HTTP/1.1 with keep-alive: answers `ok` to each request (head + Content-Length body); counts
    connections. `close_idle_after`: closes a connection that long after each answer. `stall_first`:
    the first request gets a response head and then nothing, until its client closes (`eof_seen`).
    `drop_second`: the second request on a connection is read and the connection closed unanswered,
    as a server does whose keep-alive timer ran out just as the request came."""

    def __init__(
        self, close_idle_after: float | None = None, stall_first: bool = False, drop_second: bool = False
    ) -> None:
        self.connections = 0
        self.drop_second = drop_second
        self.requests: list[bytes] = []
        self.first_reads: list[bytes] = []
        self.close_idle_after = close_idle_after
        self.stall_first = stall_first
        self.eof_seen = asyncio.Event()

    async def __aenter__(self) -> _KeepAliveServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.connections += 1
        first = True
        answered = 0
        try:
            while True:
                if first:
                    self.first_reads.append(await r.read(65536))
                    head, _, rest = self.first_reads[-1].partition(b"\r\n\r\n")
                    first = False
                    if not head:
                        break
                    head += b"\r\n\r\n" + rest
                else:
                    read = r.readuntil(b"\r\n\r\n")
                    head = await (asyncio.wait_for(read, self.close_idle_after) if self.close_idle_after else read)
                self.requests.append(head)
                if self.drop_second and answered == 1:
                    break
                answered += 1
                if self.stall_first and len(self.requests) == 1:
                    w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")  # the head, and then nothing
                    await w.drain()
                    if await r.read(1) == b"":
                        self.eof_seen.set()
                    break
                w.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-type: text/plain\r\n\r\nok")
                await w.drain()
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            pass
        finally:
            w.close()


def _request(url: str, body: bytes = b"{}") -> httpx.Request:
    return httpx.Request("POST", url + "/v1/x", content=body, extensions={"timeout": httpx.Timeout(5.0).as_dict()})


async def _ask(lanes: Lanes, url: str) -> bytes:
    resp = await lanes.handle_async_request(_request(url))
    try:
        return b"".join([c async for c in resp.aiter_raw()])
    finally:
        await resp.aclose()


@run_async
async def test_lanes_reuse_one_connection_for_requests_in_turn() -> None:
    async with _KeepAliveServer() as up:
        lanes = Lanes(keep=8, keepalive_expiry=30.0)
        for _ in range(5):
            assert await _ask(lanes, up.url) == b"ok"
        assert up.connections == 1 and lanes.idle == 1 and lanes.lent == 0
        await lanes.aclose()


@run_async
async def test_lanes_one_connection_per_request_in_flight_and_keep_bounds_the_idle() -> None:
    async with _KeepAliveServer() as up:
        lanes = Lanes(keep=3, keepalive_expiry=30.0)
        assert await asyncio.gather(*(_ask(lanes, up.url) for _ in range(6))) == [b"ok"] * 6
        assert up.connections == 6 and lanes.idle == 3 and lanes.lent == 0
        assert await asyncio.gather(*(_ask(lanes, up.url) for _ in range(3))) == [b"ok"] * 3
        assert up.connections == 6  # the three kept were used again
        await lanes.aclose()
        assert lanes.idle == 0


@run_async
async def test_lanes_idle_past_the_keepalive_expiry_are_closed_one_per_answer() -> None:
    async with _KeepAliveServer() as up:
        lanes = Lanes(keep=8, keepalive_expiry=0.2)
        await asyncio.gather(*(_ask(lanes, up.url) for _ in range(3)))
        assert lanes.idle == 3
        await asyncio.sleep(0.3)
        assert await _ask(lanes, up.url) == b"ok"  # takes the newest, gives it back, closes the oldest
        assert lanes.idle == 2
        await lanes.aclose()


@run_async
async def test_a_request_leaves_in_one_send_and_the_host_is_set() -> None:
    """httpcore writes head and body separately; the upstream's first read gets both."""
    async with _KeepAliveServer() as up:
        lanes = Lanes(keep=8, keepalive_expiry=30.0)
        body = b'{"model":"m","messages":[]}'
        resp = await lanes.handle_async_request(_request(up.url, body))
        await resp.aread()
        await resp.aclose()
        first = up.first_reads[0]
        assert first.startswith(b"POST /v1/x HTTP/1.1\r\n") and first.endswith(b"\r\n\r\n" + body)
        assert b"\r\nHost: 127.0.0.1:" in first and f"\r\nContent-Length: {len(body)}\r\n".encode() in first
        await lanes.aclose()


@run_async
async def test_a_connection_the_upstream_closed_while_idle_is_replaced_not_an_error() -> None:
    async with _KeepAliveServer(close_idle_after=0.05) as up:
        lanes = Lanes(keep=8, keepalive_expiry=30.0)
        assert await _ask(lanes, up.url) == b"ok"
        await asyncio.sleep(0.3)  # the server has closed the kept connection
        assert await _ask(lanes, up.url) == b"ok"
        assert up.connections == 2
        await lanes.aclose()


@run_async
async def test_a_kept_connection_closed_as_the_request_went_out_is_retried_once_on_a_new_one() -> None:
    async with _KeepAliveServer(drop_second=True) as up:
        lanes = Lanes(keep=8, keepalive_expiry=30.0)
        assert await _ask(lanes, up.url) == b"ok"
        assert await _ask(lanes, up.url) == b"ok"  # dropped on the kept connection, answered on a new one
        assert up.connections == 2 and len(up.requests) == 3 and lanes.lent == 0
        await lanes.aclose()


@run_async
async def test_a_streamed_body_on_a_dropped_connection_is_not_sent_twice() -> None:
    async with _KeepAliveServer(drop_second=True) as up:
        lanes = Lanes(keep=8, keepalive_expiry=30.0)
        assert await _ask(lanes, up.url) == b"ok"

        # A streamed body cannot be sent twice: the failure is the caller's, as it is on a new connection.
        async def body() -> AsyncIterator[bytes]:
            yield b"{}"

        req = httpx.Request(
            "POST", up.url + "/v1/x", content=body(), extensions={"timeout": httpx.Timeout(5.0).as_dict()}
        )
        with pytest.raises(httpx.RemoteProtocolError):
            await lanes.handle_async_request(req)
        assert up.connections == 1 and lanes.lent == 0
        await lanes.aclose()


@run_async
async def test_liveness_checks_on_a_new_connection_each_time() -> None:
    """vLLM closes an idle connection after 5 s, the order of the check interval: a check on a
    kept connection would now and then fail on a healthy server."""
    async with _KeepAliveServer(drop_second=True) as up:
        live = Liveness(up.url + "/health", interval=5.0, timeout=2.0, failures=3)
        async with probe_client(2.0) as client:
            assert [await live.check(client) for _ in range(3)] == [None, None, None]
        assert up.connections == 3


@run_async
async def test_a_response_closed_early_gives_its_lane_back_and_closes_the_connection() -> None:
    async with _KeepAliveServer(stall_first=True) as up:
        lanes = Lanes(keep=8, keepalive_expiry=30.0)
        resp = await lanes.handle_async_request(_request(up.url))
        assert lanes.lent == 1
        await resp.aclose()  # before its body: the client went away
        assert lanes.lent == 0 and lanes.idle == 1
        await asyncio.wait_for(up.eof_seen.wait(), 2.0)  # that connection was closed, not reused
        assert await _ask(lanes, up.url) == b"ok"
        assert up.connections == 2
        await lanes.aclose()


@run_async
async def test_lanes_after_close_refuse_and_https_uses_httpx_as_it_is() -> None:
    async with _KeepAliveServer() as up:
        lanes = Lanes(keep=8, keepalive_expiry=30.0)
        tls = up.url.replace("http://", "https://")
        with pytest.raises(httpx.ConnectError) as e:  # a TLS handshake with a plain HTTP server
            await lanes.handle_async_request(_request(tls))
        assert "not served by this backend" not in str(e.value) and lanes.lent == lanes.idle == 0
        await lanes.aclose()
        with pytest.raises(httpx.ConnectError, match="shutting down"):
            await lanes.handle_async_request(_request(up.url))


@run_async
async def test_asyncio_stream_errors_are_httpcores() -> None:
    backend = AsyncioBackend()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        with pytest.raises(httpcore.ConnectError):  # bound, not listening: refused
            await backend.connect_tcp("127.0.0.1", port, timeout=2.0)

    async def silent(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.read(65536)
        await asyncio.sleep(1.0)
        w.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        w.transport.abort()  # RST

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    async with server:
        stream = await backend.connect_tcp("127.0.0.1", server.sockets[0].getsockname()[1], timeout=2.0)
        await stream.write(b"GET / HTTP/1.1\r\n\r\n")
        t0 = time.monotonic()
        with pytest.raises(httpcore.ReadTimeout):
            await stream.read(100, timeout=0.1)
        assert time.monotonic() - t0 < 0.5
        assert stream.get_extra_info("is_readable") is False
        with pytest.raises(httpcore.ReadError):  # the reset
            await stream.read(100, timeout=5.0)
        assert stream.get_extra_info("is_readable") is True
        with pytest.raises(httpcore.WriteError):
            await stream.write(b"x" * 70_000)  # over the hold: sent at once, onto a closed connection
        await stream.aclose()


@run_async
async def test_asyncio_stream_stops_reading_the_socket_while_its_reader_lags() -> None:
    size = 4 * 1024 * 1024
    payload = bytes(range(256)) * (size // 256)

    async def flood(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.read(65536)
        w.write(payload)
        await w.drain()
        w.close()

    server = await asyncio.start_server(flood, "127.0.0.1", 0)
    async with server:
        stream = await AsyncioBackend().connect_tcp("127.0.0.1", server.sockets[0].getsockname()[1], timeout=2.0)
        assert isinstance(stream, AsyncioStream)
        await stream.write(b"go")
        got = [await stream.read(65536, timeout=5.0)]
        await asyncio.sleep(0.3)  # the server writes on; we read nothing
        assert not stream._transport.is_reading()  # type: ignore[attr-defined]
        assert stream._protocol.size <= 512 * 1024  # bounded, not the whole 4 MiB
        while chunk := await stream.read(65536, timeout=5.0):
            assert len(chunk) <= 65536
            got.append(chunk)
        assert b"".join(got) == payload
        await stream.aclose()
