"""LAN controller mode, first part: the controller's SSH key, host keys accepted explicitly, and
commands run over a real OpenSSH server on loopback (tests/sshd_harness.py)."""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from sshd_harness import AVAILABLE, MISSING, REQUIRED, USER, Sshd

from watchdog_llm.coordination.hosts import Host, HostsError, parse_hosts
from watchdog_llm.remote.ssh import Remote, SshError, ensure_key

pytestmark = [pytest.mark.skipif(not AVAILABLE and not REQUIRED, reason=MISSING), pytest.mark.timeout(90)]


@pytest.fixture
def env(tmp_path: Path, sshd: Sshd) -> dict[str, str]:
    catalog = tmp_path / "models.yaml"
    catalog.write_text(
        "models:\n  - {name: chat, model: org/chat}\n"
        f"hosts:\n  spark-1: {{address: 127.0.0.1, port: {sshd.port}, user: {USER}}}\n"
        "  gone: {address: 127.0.0.1, port: 1, user: nobody}\n"
    )
    keep = ("PATH", "HOME", "LANG", "PYTHONPATH")
    return {
        **{k: v for k, v in os.environ.items() if k in keep},
        "STATE_DIR": str(tmp_path / "state"),
        "MODELS": str(catalog),
        "WATCHDOG_LLM_CONFIG": str(tmp_path / "none.env"),
    }


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    (Path(env["WATCHDOG_LLM_CONFIG"])).write_text("")
    return subprocess.run(
        [sys.executable, "-m", "watchdog_llm", *args], env=env, capture_output=True, text=True, timeout=60
    )


def test_key_then_an_explicitly_accepted_host_then_commands(env: dict[str, str], sshd: Sshd) -> None:
    state = Path(env["STATE_DIR"])
    r = cli(env, "ssh-key")
    assert r.returncode == 0, r.stderr
    key = state / "ssh" / "id_ed25519"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and stat.S_IMODE(key.parent.stat().st_mode) == 0o700
    public = (state / "ssh" / "id_ed25519.pub").read_text().strip()
    assert public.startswith("ssh-ed25519 ") and public in r.stdout and ">> ~/.ssh/authorized_keys" in r.stdout
    assert cli(env, "ssh-key").stdout.splitlines()[1] == public  # made once, not again
    sshd.authorize(public)

    # The host key is not known: no connection, and the way forward is named.
    r = cli(env, "hosts", "check", "spark-1")
    assert r.returncode == 1 and "host key of spark-1" in r.stdout and "hosts accept spark-1" in r.stdout, r.stdout
    r = cli(env, "hosts", "accept", "spark-1")  # shows the fingerprint; accepts nothing without it
    assert r.returncode == 1 and sshd.fingerprint in r.stdout and f"--fingerprint {sshd.fingerprint}" in r.stdout
    assert not (state / "ssh" / "known_hosts").exists()
    r = cli(env, "hosts", "accept", "spark-1", "--fingerprint", "SHA256:not-this-one")
    assert r.returncode == 1 and "not accepted" in r.stderr
    r = cli(env, "hosts", "accept", "spark-1", "--fingerprint", sshd.fingerprint)
    assert r.returncode == 0 and "accepted" in r.stdout, r.stderr
    assert stat.S_IMODE((state / "ssh" / "known_hosts").stat().st_mode) == 0o600
    r = cli(env, "hosts")
    assert r.returncode == 0 and sshd.fingerprint in r.stdout and "not accepted yet (hosts accept gone)" in r.stdout

    r = cli(env, "doctor")
    assert f"host spark-1 ({USER}@127.0.0.1:{sshd.port}): host key accepted ({sshd.fingerprint})" in r.stdout
    assert "host gone (nobody@127.0.0.1:1): host key not accepted yet: `watchdog-llm hosts accept gone`" in r.stdout

    r = cli(env, "hosts", "check")
    assert r.returncode == 1, r.stdout
    assert "spark-1          ok" in r.stdout and "cannot reach host gone" in r.stdout

    host = Host("spark-1", "127.0.0.1", USER, sshd.port)
    remote = Remote(state, logging.getLogger("test"))
    # Words stay words: `;`, `$(...)` and quotes are never run by the remote shell.
    marker = Path(f"/tmp/wdl-pwned-{os.getpid()}")
    words = ["printf", "%s|", f"a; touch {marker}", "$(id)", "it's", "`id`"]
    r = asyncio.run(remote.run(host, words))
    assert (r.exit_status, r.stdout) == (0, f"a; touch {marker}|$(id)|it's|`id`|"), r
    assert not marker.exists()
    # A secret goes on stdin: the host's process list never shows it.
    secret = "hf_0123456789abcdefSECRET"
    r = asyncio.run(
        remote.run(host, ["sh", "-c", "read s; ps -eo args; echo got:${#s}"], stdin=secret.encode() + b"\n")
    )
    assert "got:25" in r.stdout and secret not in r.stdout
    r = asyncio.run(remote.run(host, ["sh", "-c", "echo oops >&2; exit 3"]))
    assert (r.exit_status, r.stderr) == (3, "oops\n")


def test_a_hung_command_is_ended_on_the_host_and_said_so(env: dict[str, str], sshd: Sshd) -> None:
    state = Path(env["STATE_DIR"])
    _, public, _ = ensure_key(state, "test")
    sshd.authorize(public)
    assert cli(env, "hosts", "accept", "spark-1", "--yes").returncode == 0
    host = Host("spark-1", "127.0.0.1", USER, sshd.port)
    remote = Remote(state, logging.getLogger("test"))
    tag = f"{time.monotonic_ns()}"
    t0 = time.monotonic()
    with pytest.raises(SshError) as e:
        asyncio.run(remote.run(host, ["sh", "-c", f"sleep 300 # {tag}"], timeout=1))
    assert e.value.kind == "timeout" and "did not finish within 1 s" in e.value.message
    assert time.monotonic() - t0 < 10

    def ours() -> list[psutil.Process]:
        out = []
        for p in psutil.process_iter(["username", "cmdline"]):
            if p.info["username"] == USER and tag in " ".join(p.info["cmdline"] or []):
                out.append(p)
        return out

    deadline = time.monotonic() + 5
    while ours() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert ours() == [], "the remote command outlived its timeout"


def test_wrong_key_and_changed_host_key_are_refused_with_reasons(env: dict[str, str], sshd: Sshd) -> None:
    state = Path(env["STATE_DIR"])
    ensure_key(state, "test")  # never installed on the host
    assert cli(env, "hosts", "accept", "spark-1", "--yes").returncode == 0
    host = Host("spark-1", "127.0.0.1", USER, sshd.port)
    remote = Remote(state, logging.getLogger("test"))
    with pytest.raises(SshError) as e:
        asyncio.run(remote.run(host, ["true"]))
    assert e.value.kind == "auth" and "refused our key" in e.value.message and USER in e.value.message
    # The host is reinstalled (a new host key): refused, and said so, with what to do.
    _, public, _ = ensure_key(state, "test")
    sshd.authorize(public)
    sshd.stop()
    sshd.new_host_key()
    sshd.start()
    with pytest.raises(SshError) as e:
        asyncio.run(remote.run(host, ["true"]))
    assert e.value.kind == "host_key_changed" and "changed since it was accepted" in e.value.message
    r = cli(env, "hosts", "accept", "spark-1", "--yes")
    assert r.returncode == 1 and "not the key accepted before" in r.stderr


@pytest.mark.parametrize(
    ("doc", "msg"),
    [
        ({"a": {"user": "x"}}, "host 'a': address: expected"),
        ({"a": {"address": "-oProxyCommand=x"}}, "host 'a': address: expected"),
        ({"a": {"address": "h; rm -rf /"}}, "host 'a': address: expected"),
        ({"a": {"address": "h", "port": 0}}, "host 'a': port:"),
        ({"a": {"address": "h", "user": "x y"}}, "host 'a': user:"),
        ({"a": {"address": "h", "pasword": "x"}}, "host 'a': unknown field 'pasword'"),
        ({"-a": "h"}, "host '-a': expected a name"),
        ([1], "hosts: expected a mapping"),
    ],
)
def test_bad_hosts_name_the_host_and_field(doc: object, msg: str) -> None:
    with pytest.raises(HostsError) as e:
        parse_hosts(doc, "MODELS m.yaml")
    assert msg in str(e.value) and str(e.value).startswith("MODELS m.yaml: ")
