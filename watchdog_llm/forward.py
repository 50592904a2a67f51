"""`watchdog-llm dashboard`'s local TCP forward: 127.0.0.1:PORT to the daemon's dashboard socket,
byte for byte, while the command runs (Jupyter's way of reaching a web app on a compute node).

The forward itself trusts no one: other users of the node can connect to 127.0.0.1 too, so it
leads to the dashboard socket, where every request needs a signed-in session or the admin token
(never to admin.sock, which trusts whoever can connect).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable
from pathlib import Path

_CHUNK = 65536


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(_CHUNK):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(OSError, RuntimeError):
            if writer.can_write_eof():
                writer.write_eof()


async def _serve_one(target: Path, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    try:
        ur, uw = await asyncio.open_unix_connection(str(target))
    except OSError:
        w.close()
        return
    try:
        await asyncio.gather(_pipe(r, uw), _pipe(ur, w))
    finally:
        for x in (w, uw):
            x.close()


async def forward(host: str, port: int, target: Path, ready: Callable[[int], None]) -> None:
    """Serve until SIGINT or SIGTERM; `ready(port)` once listening (the port chosen when 0)."""
    conns: set[asyncio.Task[None]] = set()

    def accepted(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        t = asyncio.current_task()
        if t is not None:
            conns.add(t)
            t.add_done_callback(conns.discard)

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        accepted(r, w)
        await _serve_one(target, r, w)

    server = await asyncio.start_server(handle, host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        ready(server.sockets[0].getsockname()[1])
        await stop.wait()
    for t in list(conns):
        t.cancel()
    await asyncio.gather(*conns, return_exceptions=True)
