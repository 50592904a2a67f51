"""Helpers shared by the STAND-INs (`vllm-standin`, `cloudflared-standin`); not part of vLLM or cloudflared.

Standard library only: the stand-in's engine and worker processes import this module, and they must
start in milliseconds, not after importing a web framework.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

PR_SET_NAME = 15
COMM_LEN = 15  # the kernel keeps 15 bytes of a process name (TASK_COMM_LEN 16, with the NUL)


def env_str(name: str) -> str | None:
    value = os.environ.get(name, "").strip()
    return value or None


def env_float(name: str, default: float) -> float:
    value = env_str(name)
    if value is None:
        return default
    try:
        return float(value)
    except ValueError:
        return default


def env_flag(name: str) -> bool:
    return (env_str(name) or "0").lower() not in ("0", "false", "no", "off")


def exit_at_once_code() -> int | None:
    """STANDIN_EXIT_AT_ONCE: the exit status to fail with before doing anything (None: not set)."""
    value = env_str("STANDIN_EXIT_AT_ONCE")
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        return 1


def set_process_title(title: str) -> None:
    """Rename this process the way the `setproctitle` package does (vLLM uses it for its children).

    Two places hold a process's name: the kernel's 15-byte comm (`ps -o comm`, /proc/PID/stat) and the
    argv area (/proc/PID/cmdline, `ps aux`). psutil's name() returns comm, or cmdline[0] when comm is
    15 bytes and a prefix of it, so "VLLM::EngineCore" (16 bytes) needs both to show in full.
    """
    raw = title.encode()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.prctl(PR_SET_NAME, ctypes.c_char_p(raw[:COMM_LEN]), 0, 0, 0)
    except (OSError, AttributeError):
        return
    try:
        # arg_start and arg_end: fields 48 and 49 of /proc/self/stat (Linux >= 3.5). The argv strings
        # are our own writable memory; Python has copied them long ago, so overwriting them is safe.
        with open("/proc/self/stat", "rb") as f:
            stat = f.read()
        fields = stat[stat.rindex(b")") + 2 :].split()
        start, end = int(fields[45]), int(fields[46])
    except (OSError, ValueError, IndexError):
        return
    size = end - start
    if size <= 1:
        return
    text = raw[: size - 1]
    ctypes.memmove(start, text + b"\0" * (size - len(text)), size)
