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


class ListenError(Exception):
    """A listener cannot be opened; the message names the setting at fault."""


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
            h11_max_incomplete_event_size=64 * 1024,  # request line + headers
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
