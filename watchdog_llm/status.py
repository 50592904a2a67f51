"""`STATE_DIR/status.json`: the daemon's state for people and tools, replaced atomically on change."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import psutil

STATUS_FILE = "status.json"


def write_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write to a temporary file in the same directory, then rename: readers never see half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".status.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.write("\n")
        # mkstemp's 0600 kept: status names jobs, pids and paths; only the daemon's user reads it.
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return data


def daemon_alive(status: dict[str, Any]) -> bool:
    """The daemon that wrote this status still runs (same pid *and* start time, so no recycled pid)."""
    pid, started = status.get("daemon_pid"), status.get("daemon_create_time")
    if not isinstance(pid, int) or not isinstance(started, int | float):
        return False
    try:
        return abs(psutil.Process(pid).create_time() - started) < 0.01
    except psutil.Error:
        return False
