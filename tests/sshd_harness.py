"""A real OpenSSH server (Debian's openssh-server) on loopback, for the LAN controller's tests: its own
host key, config and authorized_keys in a scratch directory, a test user, a spare port.

Needs root (sshd drops privileges to the user it logs in) and /usr/sbin/sshd; CI installs both
(`.ci/run`) and sets WATCHDOG_LLM_REQUIRE_SSHD=1, so that a missing server fails rather than skips.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from pathlib import Path

from helpers import free_port, wait_for

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
# The host's init: a subreaper that reaps what the sessions leave (a `docker run -d`-style server
# whose launcher exited), as init does on a real host; without it they would re-parent to pytest
# (a subreaper that never reaps) and stay zombies that `kill -0` still finds.
TINI = shutil.which("tini") or "/usr/bin/tini"
USER = "wdltest"
AVAILABLE = os.geteuid() == 0 and os.path.exists(SSHD) and os.path.exists(TINI)
REQUIRED = os.environ.get("WATCHDOG_LLM_REQUIRE_SSHD") == "1"
MISSING = "needs root, Debian's openssh-server and tini (apt-get install openssh-server tini; .ci/run does)"


def ensure_user() -> None:
    """The test user: a home, a shell, and an account that is not locked (sshd refuses locked ones).
    Under a lock: two test workers must not both run useradd."""
    import fcntl

    with open("/tmp/wdl-test-useradd.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if subprocess.run(["id", USER], capture_output=True).returncode != 0:
            subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", USER], check=True)
        subprocess.run(["usermod", "-p", "*", USER], check=True)


class Sshd:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        os.chmod(root, 0o755)
        self.port = free_port()
        self.authorized = root / "authorized_keys"
        self.authorized.write_text("")
        os.chmod(self.authorized, 0o644)
        self.host_key = root / "host_ed25519"
        self.proc: subprocess.Popen[bytes] | None = None
        self.new_host_key()

    def new_host_key(self) -> None:
        for p in (self.host_key, self.host_key.with_suffix(".pub")):
            p.unlink(missing_ok=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.host_key)], check=True)

    @property
    def fingerprint(self) -> str:
        out = subprocess.run(["ssh-keygen", "-lf", str(self.host_key) + ".pub"], capture_output=True, text=True)
        return out.stdout.split()[1]  # "256 SHA256:... comment (ED25519)"

    def authorize(self, public_line: str) -> None:
        self.authorized.write_text(public_line.strip() + "\n")

    def start(self) -> None:
        cfg = self.root / "sshd_config"
        cfg.write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {self.host_key}\n"
            f"PidFile {self.root / 'sshd.pid'}\nAuthorizedKeysFile {self.authorized}\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n"
            # root too (by key only): the daemon's tests start model servers from this checkout's venv,
            # whose Python lives under root's 0700 home.
            f"PermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\nAllowUsers {USER} root\n"
            "LogLevel VERBOSE\n"
        )
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # its privilege separation directory
        self.log = open(self.root / "sshd.log", "ab")
        self.proc = subprocess.Popen(
            [TINI, "-s", "--", SSHD, "-D", "-e", "-f", str(cfg)], stdout=self.log, stderr=subprocess.STDOUT
        )
        wait_for(lambda: self._listening() or None, 10, 0.05, "sshd listening")

    def _listening(self) -> bool:
        import socket

        assert self.proc is not None and self.proc.poll() is None, self.text()
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None
        time.sleep(0.05)

    def crash(self) -> None:
        """The host goes away: this sshd and everything under it (its sessions, their commands) SIGKILLed
        at once. Connections drop without a goodbye, as when a machine loses power."""
        import psutil

        assert self.proc is not None
        root = psutil.Process(self.proc.pid)
        for p in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                p.kill()
        self.proc.wait(10)
        self.proc = None

    def text(self) -> str:
        return (self.root / "sshd.log").read_text(errors="replace")
