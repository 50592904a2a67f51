"""Readiness probes: plain HTTP checks with connect and read timeouts, never through a proxy."""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass

import httpx

# vLLM binds its socket before loading the model: a connect succeeds long before any answer,
# so a probe without a read timeout would hang for the whole load.
PROBE_TIMEOUT = httpx.Timeout(2.0, connect=1.0)


@dataclass(frozen=True, slots=True)
class Address:
    """Where a child's HTTP server listens: a unix socket (`uds`; `base_url` then only names the
    scheme and Host header) or the TCP `base_url`."""

    base_url: str
    uds: str | None = None
    port: int | None = None  # over TCP: the port of base_url

    @property
    def shown(self) -> str:
        """For status and logs: unix:/path or the URL."""
        return f"unix:{self.uds}" if self.uds else self.base_url


def probe_client(timeout: float | None = None, uds: str | None = None) -> httpx.AsyncClient:
    # trust_env=False: cluster nodes often set HTTP(S)_PROXY, which must never see loopback probes.
    # A new connection per check: vLLM closes an idle one after 5 s, the liveness interval's order,
    # so a kept one would fail now and then as "Server disconnected" on a healthy server. A fresh
    # connection also proves the server still accepts them.
    t = PROBE_TIMEOUT if timeout is None else httpx.Timeout(timeout, connect=min(timeout, 1.0))
    fresh = httpx.Limits(max_keepalive_connections=0)
    transport = httpx.AsyncHTTPTransport(uds=uds, trust_env=False, limits=fresh)
    return httpx.AsyncClient(timeout=t, trust_env=False, transport=transport)


@dataclass(frozen=True, slots=True)
class Liveness:
    """After readiness: `url` is asked every `interval` s; `failures` failed answers in a row (no
    answer within `timeout`, or not 200) mean the server hangs (SIGSTOPped, deadlocked, its engine
    dead): the child is then handled as if it had exited."""

    url: str
    interval: float
    timeout: float
    failures: int

    async def check(self, client: httpx.AsyncClient) -> str | None:
        """None if alive, else what went wrong, in a few words."""
        try:
            r = await client.get(self.url)
        except httpx.TimeoutException:
            return f"no answer within {self.timeout:g} s"
        except (httpx.HTTPError, OSError) as e:
            return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        return None if r.status_code == 200 else f"answered {r.status_code}"


@dataclass(frozen=True, slots=True)
class HttpProbe:
    """Ready when `url` answers 200 and, if set, `confirm_url` answers 200 to our credentials.

    The confirmation proves the server on the port is ours: another user's server could answer
    /health, but it cannot know the random key our model was started with.
    """

    url: str
    confirm_url: str | None = None
    confirm_headers: Callable[[], dict[str, str]] = dict  # read per probe: the key changes with each run

    async def __call__(self, client: httpx.AsyncClient) -> bool:
        try:
            if (await client.get(self.url)).status_code != 200:
                return False
            if self.confirm_url is None:
                return True
            r = await client.get(self.confirm_url, headers=self.confirm_headers())
            return r.status_code == 200
        except (httpx.HTTPError, httpx.InvalidURL, OSError):
            return False


def port_in_use(host: str, port: int) -> bool:
    """Something already accepts connections on host:port (checked before we start a server there)."""
    target = "127.0.0.1" if host in ("", "0.0.0.0") else host
    try:
        with socket.create_connection((target, port), timeout=0.5):
            return True
    except OSError:
        return False


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on `host` that nothing listens on right now."""
    target = "127.0.0.1" if host in ("", "0.0.0.0") else host
    with socket.socket(socket.AF_INET6 if ":" in target else socket.AF_INET) as sock:
        sock.bind((target, 0))
        return int(sock.getsockname()[1])
