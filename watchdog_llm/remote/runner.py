"""The local stand-in for a model server on another host: the supervised child of a remote entry.

The daemon supervises it exactly like a local vLLM (own process group, output to the model's log and
a swap's live log, readiness and liveness probed over HTTP at the entry's base URL, SIGTERM then
SIGKILL). It holds one SSH connection to the host and, on it:

  1. the entry's stop command (whatever an earlier run or a person left running goes first: the
     Spark controller's "stop the running container" before every launch),
  2. the start command, with secrets on stdin, one NAME=value per line, exported by a small
     POSIX-sh prelude and never on a command line; then its output, or, once it returns 0 (a
     `docker run -d`), the log command's (`docker logs -f NAME`),
  3. on SIGTERM: the stop command (bounded by the grace period), then TERM and KILL over the
     channel to what still runs, and exit 0.

It exits non-zero when the start command fails, the log stream ends or the connection is lost: the
daemon then sees the model exit, with these lines as its tail. Never imported by the daemon: it is
started as `python -m watchdog_llm.remote.runner` with its job in the environment (SPEC_ENV).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shlex
import signal
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from watchdog_llm.coordination.hosts import Host
from watchdog_llm.remote.ssh import Remote, SshError, end_process

with warnings.catch_warnings():  # imported (quietly) by remote.ssh already
    warnings.simplefilter("ignore")
    import asyncssh

SPEC_ENV = "WATCHDOG_LLM_REMOTE"
# Run on the host by its POSIX sh, the command's words as its arguments (never parsed by a shell
# again: `;` or `$(...)` in a model name stays one word). It reads NAME=value lines up to an empty
# one and exports them (secrets on stdin, never on a command line), runs the command, and ends it
# (TERM, then KILL after $1 ticks of 0.2 s) once stdin closes: when we close it, when the connection drops,
# when the controller dies. OpenSSH refuses signal requests on some sessions (root's, without
# privilege separation) and sends no SIGHUP without a terminal, so the channel's stdin is the one
# signal that always arrives. (A background list's stdin is /dev/null in a shell without job
# control: the watcher reads the channel through fd 3, which the command does not get.)
PRELUDE = """\
ticks=$1; shift
while IFS= read -r kv && [ -n "$kv" ]; do export "$kv"; done
exec 3<&0
"$@" 3<&- &
pid=$!
{
    while IFS= read -r _; do :; done
    kill -TERM "$pid"
    i=0
    while kill -0 "$pid" && [ "$i" -lt "$ticks" ]; do sleep 0.2; i=$((i + 1)); done
    kill -KILL "$pid"
} <&3 >/dev/null 2>&1 &
watcher=$!
wait "$pid"
status=$?
kill "$watcher" 2>/dev/null
exit "$status"
"""
EXIT_START_FAILED = 3
EXIT_LOST = 4
EXIT_UNREACHABLE = 5


@dataclass(frozen=True, slots=True)
class Job:
    host: Host
    state_dir: Path
    start: list[str]
    stop: list[str]
    logs: list[str]
    forward: list[str]  # environment names sent to the host on stdin (their values are ours)
    stop_timeout: float
    once: bool = False  # a job (a download), not a server: the runner ends with the start command

    def to_env(self) -> str:
        h = self.host
        return json.dumps(
            {
                "host": {
                    "name": h.name,
                    "address": h.address,
                    "user": h.user,
                    "port": h.port,
                    "key_file": str(h.key_file) if h.key_file else None,
                },
                "state_dir": str(self.state_dir),
                "start": self.start,
                "stop": self.stop,
                "logs": self.logs,
                "forward": self.forward,
                "stop_timeout": self.stop_timeout,
                "once": self.once,
            }
        )

    @classmethod
    def from_env(cls, text: str) -> Job:
        d: dict[str, Any] = json.loads(text)
        h = d["host"]
        host = Host(h["name"], h["address"], h["user"], h["port"], Path(h["key_file"]) if h["key_file"] else None)
        return cls(
            host, Path(d["state_dir"]), d["start"], d["stop"], d["logs"], d["forward"], d["stop_timeout"], d["once"]
        )


def wrapped(words: list[str], grace: float) -> str:
    """The command line the host's shell gets: the prelude, then the words as its arguments."""
    return shlex.join(["sh", "-c", PRELUDE, "watchdog-llm", str(round(grace * 5)), *words])


def say(line: str) -> None:
    print(f"[watchdog-llm] {line}", flush=True)


class Runner:
    def __init__(self, job: Job, env: dict[str, str]) -> None:
        self.job = job
        self.secrets = "".join(f"{k}={env[k]}\n" for k in job.forward if k in env) + "\n"
        self.remote = Remote(job.state_dir, logging.getLogger("watchdog_llm.remote"))
        self.stopping = asyncio.Event()

    async def run(self) -> int:
        host = self.job.host
        try:
            async with self.remote.connect(host) as conn:
                say(f"connected to {host.shown}")
                if self.job.stop:
                    await self._stop_command(conn, "before start")
                if self.stopping.is_set():
                    return 0
                return await self._serve(conn)
        except SshError as e:
            say(e.message)
            return 0 if self.stopping.is_set() else EXIT_UNREACHABLE
        except (OSError, EOFError, asyncssh.Error) as e:
            say(f"connection to {host.shown} lost: {e or type(e).__name__}")
            return 0 if self.stopping.is_set() else EXIT_LOST

    async def _serve(self, conn: Any) -> int:
        host, job = self.job.host, self.job
        say(f"start: {shlex.join(job.start)}")
        proc = await self._open(conn, job.start)
        ended = await self._follow(conn, proc)
        if ended is None:  # asked to stop
            await self._shut(conn, proc)
            return 0
        if job.once:
            return min(max(ended, 0), 255) if ended != -1 else EXIT_LOST
        if ended != 0 or not job.logs:
            if ended == 0:  # a detached server and nothing to follow: readiness and liveness watch it
                say("start command returned 0; no log command: watching the server over HTTP only")
                await self._until_stopped(conn)
                await self._shut(conn, None)
                return 0
            say(f"start command exited with status {ended} on {host.name}")
            return EXIT_START_FAILED
        say(f"logs: {shlex.join(job.logs)}")
        follower = await self._open(conn, job.logs)
        ended = await self._follow(conn, follower)
        if ended is None:
            await self._shut(conn, follower)
            return 0
        say(f"log command ended (status {ended}): the server on {host.name} has stopped")
        return EXIT_LOST

    async def _open(self, conn: Any, words: list[str]) -> Any:
        grace = max(1.0, self.job.stop_timeout - 5)  # TERM to KILL on the host, within our own budget
        proc = await conn.create_process(
            wrapped(words, grace), encoding="utf-8", errors="replace", stderr=asyncssh.STDOUT
        )
        proc.stdin.write(self.secrets)  # and stdin stays open: closing it ends the command
        return proc

    async def _follow(self, conn: Any, proc: Any) -> int | None:
        """Copy the command's output to ours until it ends (its exit status; -1 for a signal) or
        we are asked to stop (None). A lost connection raises OSError."""
        copying = asyncio.create_task(self._copy(proc))
        stop = asyncio.create_task(self.stopping.wait())
        closed = asyncio.create_task(conn.wait_closed())
        try:
            done, _ = await asyncio.wait({copying, stop, closed}, return_when=asyncio.FIRST_COMPLETED)
            if stop in done:
                return None
            lost = copying.exception() if copying in done else None
            if lost is not None or (closed in done and copying not in done):
                why = f": {lost}" if lost is not None and str(lost) else ""
                raise OSError(f"the SSH connection closed{why}")
            result = await proc.wait(check=False)
            return -1 if result.exit_status is None else int(result.exit_status)
        finally:
            for t in (stop, closed, copying):
                _settle(t)

    @staticmethod
    async def _copy(proc: Any) -> None:
        async for line in proc.stdout:
            sys.stdout.write(line if line.endswith("\n") else line + "\n")
            sys.stdout.flush()

    async def _until_stopped(self, conn: Any) -> None:
        stop = asyncio.create_task(self.stopping.wait())
        closed = asyncio.create_task(conn.wait_closed())
        done, pending = await asyncio.wait({stop, closed}, return_when=asyncio.FIRST_COMPLETED)
        for t in pending:
            t.cancel()
        if closed in done:
            raise OSError(f"the SSH connection to {self.job.host.shown} closed")

    async def _shut(self, conn: Any, proc: Any) -> None:
        if self.job.stop:
            await self._stop_command(conn, "on stop")
        if proc is not None:
            await self._end(proc, self.job.stop_timeout)

    async def _end(self, proc: Any, timeout: float) -> None:
        """Close its stdin (the host's prelude then TERMs it, and KILLs it after its grace); what is
        left after `timeout` is signalled over the channel, where the server allows that."""
        with contextlib.suppress(Exception):
            proc.stdin.write_eof()
        copying = asyncio.create_task(self._copy(proc))  # its last words go to the log too
        try:
            await asyncio.wait_for(proc.wait_closed(), timeout)
        except TimeoutError:
            say(f"the command on {self.job.host.name} did not end within {timeout:g} s of its stdin closing")
            await end_process(proc)
        finally:
            _settle(copying)

    async def _stop_command(self, conn: Any, when: str) -> None:
        say(f"stop ({when}): {shlex.join(self.job.stop)}")
        proc = await self._open(conn, self.job.stop)
        try:
            await asyncio.wait_for(self._copy(proc), self.job.stop_timeout)
            result = await asyncio.wait_for(proc.wait(check=False), 2)
            if result.exit_status not in (0, None) and when == "on stop":
                say(f"stop command exited with status {result.exit_status}")
        except TimeoutError:
            say(f"stop command did not finish within {self.job.stop_timeout:g} s: ended")
            await self._end(proc, 5)


def _settle(task: asyncio.Task[Any]) -> None:
    """Cancel it if it runs; if it ended with an error, that was seen (never "never retrieved")."""
    if not task.done():
        task.cancel()
    elif not task.cancelled():
        task.exception()


async def _main() -> int:
    job = Job.from_env(os.environ[SPEC_ENV])
    runner = Runner(job, dict(os.environ))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, runner.stopping.set)
    return await runner.run()


def main() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="[watchdog-llm] %(message)s")
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(asyncio.run(_main()))


if __name__ == "__main__":
    main()
