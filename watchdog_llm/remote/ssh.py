"""SSH to model hosts, through asyncssh, with the controller's own key and known_hosts.

- The key is STATE_DIR/ssh/id_ed25519 (0600), made by `watchdog-llm ssh-key`; never the user's agent
  or ~/.ssh/config: what the daemon does must not change with someone's shell setup.
- Host keys are checked against STATE_DIR/ssh/known_hosts only. A host gets in there by an explicit
  `watchdog-llm hosts accept NAME` (after its fingerprint was checked), never on first use.
- A command is a list of words, each quoted for the remote shell (shlex.join): a model name with
  `;` or `$(...)` in it is a word, never a command. Secrets go on stdin, never on a command line.
- A command past its timeout is signalled (TERM, then KILL) over the channel and the channel
  closed: nothing of ours keeps running on the host.

Every failure is an `SshError` whose message is one line for people, naming the host.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import warnings
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

with warnings.catch_warnings():
    # asyncssh imports DSA support, which cryptography deprecates: a warning on every CLI run, for a
    # key type we never use (ours is ed25519; host keys are whatever the host has).
    warnings.simplefilter("ignore")
    import asyncssh

from watchdog_llm.coordination.hosts import Host

KEY_NAME = "id_ed25519"
CONNECT_TIMEOUT = 10.0
_KILL_GRACE = 2.0


class SshError(Exception):
    """kind: unknown_host_key, host_key_changed, auth, unreachable, timeout."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass(frozen=True, slots=True)
class Completed:
    exit_status: int | None  # None: ended by a signal
    stdout: str
    stderr: str


def ssh_dir(state_dir: Path) -> Path:
    d = state_dir / "ssh"
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    return d


def ensure_key(state_dir: Path, comment: str) -> tuple[Path, str, bool]:
    """(private key path, its public line, whether it was made now)."""
    path = ssh_dir(state_dir) / KEY_NAME
    made = False
    if not path.exists():
        key = asyncssh.generate_private_key("ssh-ed25519", comment=comment)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # 0600 from the start
        with os.fdopen(fd, "wb") as f:
            f.write(key.export_private_key())
        key.write_public_key(str(path) + ".pub")
        made = True
    key = asyncssh.read_private_key(str(path))
    return path, key.export_public_key().decode().strip(), made


def known_hosts_path(state_dir: Path) -> Path:
    return ssh_dir(state_dir) / "known_hosts"


def _pattern(host: Host) -> str:
    return host.address if host.port == 22 else f"[{host.address}]:{host.port}"


def fingerprint(key: asyncssh.SSHKey) -> str:
    return str(key.get_fingerprint("sha256"))


def known_keys(state_dir: Path, host: Host) -> list[asyncssh.SSHKey]:
    """The host keys known_hosts trusts for this host (none yet: an empty list)."""
    path = known_hosts_path(state_dir)
    if not path.exists():
        return []
    trusted, *_ = asyncssh.read_known_hosts(str(path)).match(host.address, "", host.port)
    return list(trusted)


async def offered_key(host: Host, timeout: float = CONNECT_TIMEOUT) -> asyncssh.SSHKey:
    """The key the host offers now (to be checked by a person before `accept`)."""
    try:
        key = await asyncio.wait_for(asyncssh.get_server_host_key(host.address, host.port), timeout)
    except (OSError, asyncssh.Error, TimeoutError) as e:
        raise _unreachable(host, e) from None
    if key is None:
        raise SshError("unreachable", f"host {host.shown} offered no host key")
    return key


def accept(state_dir: Path, host: Host, key: asyncssh.SSHKey) -> None:
    """Trust `key` for `host` from now on (appended to our known_hosts, 0600)."""
    line = f"{_pattern(host)} {key.export_public_key().decode().strip()}\n"
    fd = os.open(known_hosts_path(state_dir), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "a") as f:
        f.write(line)


class Remote:
    def __init__(self, state_dir: Path, log: logging.Logger) -> None:
        self.state_dir = state_dir
        self.log = log

    @contextlib.asynccontextmanager
    async def connect(self, host: Host) -> AsyncIterator[asyncssh.SSHClientConnection]:
        key = host.key_file or ssh_dir(self.state_dir) / KEY_NAME
        if not key.exists():
            raise SshError("auth", f"host {host.shown}: no key at {key}: run `watchdog-llm ssh-key` and install it")
        known = known_hosts_path(self.state_dir)
        try:
            conn = await asyncio.wait_for(
                asyncssh.connect(
                    host.address,
                    host.port,
                    username=host.user,
                    client_keys=[str(key)],
                    known_hosts=str(known) if known.exists() else ([], [], []),
                    agent_path=None,
                    config=[],
                    password=None,
                    kbdint_auth=False,
                ),
                CONNECT_TIMEOUT,
            )
        except asyncssh.HostKeyNotVerifiable:
            raise self._host_key_error(host) from None
        except asyncssh.PermissionDenied:
            raise SshError(
                "auth",
                f"host {host.shown} refused our key ({key}.pub): install it for {host.user} "
                "(`watchdog-llm ssh-key` prints the line)",
            ) from None
        except (OSError, asyncssh.Error, TimeoutError) as e:
            raise _unreachable(host, e) from None
        try:
            yield conn
        finally:
            conn.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.wait_closed(), 5)

    def _host_key_error(self, host: Host) -> SshError:
        if known_keys(self.state_dir, host):
            return SshError(
                "host_key_changed",
                f"host key of {host.shown} changed since it was accepted: refusing to connect "
                f"(if the host was reinstalled, remove its line from {known_hosts_path(self.state_dir)} "
                f"and run `watchdog-llm hosts accept {host.name}` again)",
            )
        return SshError(
            "unknown_host_key",
            f"host key of {host.shown} is not known: check its fingerprint, then run "
            f"`watchdog-llm hosts accept {host.name}`",
        )

    async def run(self, host: Host, argv: list[str], *, stdin: bytes | None = None, timeout: float = 60.0) -> Completed:
        """Run `argv` on `host` (each word quoted); its output, whatever its exit status."""
        command = shlex.join(argv)
        async with self.connect(host) as conn:
            proc = await conn.create_process(command, encoding="utf-8", errors="replace")
            try:
                if stdin is not None:
                    proc.stdin.write(stdin.decode("utf-8", "surrogateescape"))
                proc.stdin.write_eof()
                done = await asyncio.wait_for(proc.wait(check=False), timeout)
            except TimeoutError:
                await end_process(proc)
                raise SshError("timeout", f"host {host.shown}: {argv[0]} did not finish within {timeout:g} s") from None
            finally:
                proc.close()
        return Completed(done.exit_status, str(done.stdout or ""), str(done.stderr or ""))


async def end_process(proc: asyncssh.SSHClientProcess[str]) -> None:
    """TERM, a grace period, then KILL, over the channel (OpenSSH delivers both to the command)."""
    for sig in ("TERM", "KILL"):
        with contextlib.suppress(Exception):
            proc.send_signal(sig)
        try:
            await asyncio.wait_for(proc.wait_closed(), _KILL_GRACE)
            return
        except TimeoutError:
            continue


def os_reason(e: OSError) -> str:
    """ "Connection refused", not asyncio's "Connect call failed ('10.0.0.21', 22)"."""
    return os.strerror(e.errno) if e.errno else e.strerror or str(e) or type(e).__name__


def _unreachable(host: Host, e: BaseException) -> SshError:
    why = os_reason(e) if isinstance(e, OSError) else str(e) or type(e).__name__
    if isinstance(e, TimeoutError):
        why = f"no answer within {CONNECT_TIMEOUT:g} s"
    return SshError("unreachable", f"cannot reach host {host.shown}: {why}")
