"""Run the real daemon (`python -m watchdog_llm run`) as a subprocess and observe it from outside."""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
from helpers import alive, wait_for


class DaemonProc:
    def __init__(self, env: dict[str, str], *args: str, nofile: int | None = None) -> None:
        self.env = env
        self.state_dir = Path(env["STATE_DIR"])
        self.root = Path(env["CGROUP_ROOT"])
        self.log_path = Path(env["STATE_DIR"]).parent / f"daemon-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "watchdog_llm", *args, "run"],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            # A lab node's login limit (soft = hard), which the daemon cannot raise.
            preexec_fn=None if nofile is None else lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile)),
        )

    # ---- observing ---------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """This daemon's status (a previous daemon's file on the same STATE_DIR does not count)."""
        try:
            data = dict(json.loads((self.state_dir / "status.json").read_text()))
        except (OSError, ValueError):
            return {}
        return data if data.get("daemon_pid") == self.proc.pid else {}

    def wait_state(self, state: str, timeout: float = 20.0) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            st = self.status()
            return st if st.get("state") == state else None

        try:
            result: dict[str, Any] = wait_for(check, timeout, 0.01, f"state {state}")
        except AssertionError as e:
            raise AssertionError(f"{e}; last status {self.status().get('state')}\n{self.log()[-3000:]}") from None
        return result

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def job_dir(self, name: str) -> Path:
        return self.root / "system.slice" / "slurmstepd.scope" / name

    def start_job(self, name: str) -> Path:
        d = self.job_dir(name)
        d.mkdir()
        (d / "step_extern").mkdir()  # as slurmstepd does, within ~0.1 ms
        return d

    def end_job(self, name: str) -> None:
        d = self.job_dir(name)
        for step in d.iterdir():
            step.rmdir()
        d.rmdir()

    # ---- stopping ----------------------------------------------------------------------------

    def terminate(self, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def kill_hard(self) -> None:
        """SIGKILL the daemon alone (its children survive: that is what leftovers are)."""
        self.proc.kill()
        self.proc.wait()
        self._log.close()

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            try:
                self.terminate(30)
            except subprocess.TimeoutExpired:
                for p in psutil.Process(self.proc.pid).children(recursive=True):
                    p.kill()
                self.proc.kill()
                self.proc.wait()


def start(daemons: list[DaemonProc], env: dict[str, str], *, nofile: int | None = None) -> DaemonProc:
    """A daemon that the `daemons` fixture stops (or kills) after the test, whatever happens."""
    d = DaemonProc(env, nofile=nofile)
    daemons.append(d)
    return d


def gone(pids: list[int], timeout: float = 10.0) -> bool:
    return bool(wait_for(lambda: not alive(pids), timeout, 0.005, f"pids {pids} to exit"))


def env_with(env: dict[str, str], **kw: str) -> dict[str, str]:
    out = dict(env)
    out.update(kw)
    return out


def tree_names(pids: list[int]) -> list[str]:
    names = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            names.append(psutil.Process(pid).name())
    return sorted(names)


__all__ = ["DaemonProc", "env_with", "gone", "os", "start", "tree_names"]
