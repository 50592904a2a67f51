"""Small test helpers (importable from tests: pytest puts this directory on sys.path)."""

from __future__ import annotations

import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

TEST_KEY = "test-key-0123456789abcdef"  # the public key every test daemon accepts (consumer "test")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(pred: Callable[[], Any], timeout: float = 10.0, interval: float = 0.01, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or pred}")
        time.sleep(interval)


def alive(pids: list[int] | list[psutil.Process]) -> list[int]:
    out = []
    for p in pids:
        try:
            proc = p if isinstance(p, psutil.Process) else psutil.Process(p)
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc.pid)
        except psutil.NoSuchProcess:
            pass
    return out


def bin_path(name: str) -> str:
    path = Path(sys.executable).parent / name
    assert path.exists(), f"{path} missing: is the package installed (pip install -e .)?"
    return str(path)


def run_async(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run an async test function in a fresh event loop (no plugin needed)."""
    import asyncio
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return asyncio.run(fn(*args, **kwargs))

    return wrapper
