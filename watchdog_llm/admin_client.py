"""A small client for the daemon's admin API, for the CLI (and scripts that import it).

It reaches the daemon the way the daemon listens: on TCP at ADMIN_HOST:ADMIN_PORT with
`Authorization: Bearer ADMIN_TOKEN` when ADMIN_HOST is set, else on the unix socket
STATE_DIR/admin.sock. Proxies from the environment are never used (`trust_env=False`): the admin API
is local, and a proxy would see the token.

Every failure is an `AdminError` whose message is one line for people: the API's own `message` when
it answered with an error body, "daemon not running" when there is no socket or nobody listens.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

import httpx

from watchdog_llm import config

LOCK_TOKEN_HEADER = "X-Swap-Lock-Token"


class AdminError(Exception):
    """The admin API could not be asked, or refused. `status` is the HTTP status (None when no answer
    came), `body` the API's JSON error body when there was one."""

    def __init__(self, message: str, status: int | None = None, body: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.body = body or {}


class NotRunning(AdminError):
    """No daemon listens: the socket is missing or refuses connections."""


class AdminClient:
    def __init__(self, s: config.Settings, timeout: float = 5.0) -> None:
        self.timeout = timeout
        self.headers: dict[str, str] = {}
        self.socket = None if s.admin_host else s.admin_socket
        if s.admin_host:
            self.base = config.local_url(s.admin_host, s.admin_port)
            self.where = f"{s.admin_host}:{s.admin_port}"
            self.headers["Authorization"] = f"Bearer {s.admin_token.get_secret_value()}"
        else:
            self.base = "http://admin"
            self.where = str(s.admin_socket)

    def _client(self, timeout: httpx.Timeout | float) -> httpx.Client:
        if self.socket is not None and not self.socket.exists():
            raise NotRunning(f"daemon not running (no admin socket at {self.socket})")
        transport = httpx.HTTPTransport(uds=str(self.socket)) if self.socket is not None else httpx.HTTPTransport()
        return httpx.Client(
            transport=transport, base_url=self.base, headers=self.headers, timeout=timeout, trust_env=False
        )

    def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        token: str | None = None,
        params: Mapping[str, str] | None = None,
    ) -> Any:
        """The JSON answer of a 2xx; else AdminError with the API's message (NotRunning when nobody listens)."""
        headers = {LOCK_TOKEN_HEADER: token} if token else {}
        try:
            with self._client(self.timeout) as client:
                r = client.request(method, path, json=body, headers=headers, params=params)
        except httpx.HTTPError as e:
            raise self._unreachable(e) from None
        except OSError as e:  # e.g. a socket path that cannot be connected to
            raise NotRunning(f"daemon not running ({self.where}: {e.strerror or e})") from None
        except (httpx.InvalidURL, UnicodeError) as e:  # ADMIN_HOST is no host name or address
            raise self._bad_address(e) from None
        return _answer(r, method, path)

    def get(self, path: str, **kw: Any) -> Any:
        return self.request("GET", path, **kw)

    def post(self, path: str, body: Any = None, **kw: Any) -> Any:
        return self.request("POST", path, body=body, **kw)

    def delete(self, path: str, **kw: Any) -> Any:
        return self.request("DELETE", path, **kw)

    def events(self, path: str, read_timeout: float | None) -> Iterator[tuple[str, Any]]:
        """Server-sent events of `path` as (event, data) until the server ends the stream. A broken
        connection raises AdminError; no event within `read_timeout` seconds raises `TimeoutError`."""
        timeout = httpx.Timeout(self.timeout, read=read_timeout)
        try:
            with self._client(timeout) as client, client.stream("GET", path) as r:
                if r.status_code != 200:
                    r.read()
                    _answer(r, "GET", path)
                event, data = "message", list[str]()
                for line in r.iter_lines():
                    if not line:
                        if data:
                            yield event, _data("\n".join(data))
                        event, data = "message", list[str]()
                    elif line.startswith(":"):
                        continue  # a comment (keep-alive)
                    else:
                        field, _, value = line.partition(":")
                        value = value.removeprefix(" ")
                        if field == "event":
                            event = value
                        elif field == "data":
                            data.append(value)
        except httpx.ReadTimeout:
            raise TimeoutError(f"no event within {read_timeout:g} s") from None
        except httpx.HTTPError as e:
            raise self._unreachable(e) from None
        except OSError as e:
            raise NotRunning(f"daemon not running ({self.where}: {e.strerror or e})") from None
        except (httpx.InvalidURL, UnicodeError) as e:
            raise self._bad_address(e) from None

    def _bad_address(self, e: Exception) -> AdminError:
        return AdminError(f"ADMIN_HOST/ADMIN_PORT {self.where} is not a usable address ({_one_line(str(e))})")

    def _unreachable(self, e: httpx.HTTPError) -> AdminError:
        if isinstance(e, httpx.ConnectError):
            return NotRunning(f"daemon not running (nothing answers on {self.where})")
        if isinstance(e, httpx.TimeoutException):
            return AdminError(f"the daemon did not answer within {self.timeout:g} s ({self.where})")
        return AdminError(f"admin API on {self.where}: {_one_line(str(e)) or type(e).__name__}")


def _answer(r: httpx.Response, method: str, path: str) -> Any:
    try:
        data = r.json()
    except ValueError:
        data = None
    if r.is_success:
        if data is None:
            raise AdminError(f"{method} {path}: the daemon answered {r.status_code} without JSON", r.status_code)
        return data
    if isinstance(data, dict) and isinstance(data.get("message"), str):
        raise AdminError(_one_line(data["message"]), r.status_code, data)
    raise AdminError(f"{method} {path}: HTTP {r.status_code} {_one_line(r.text[:200])}".rstrip(), r.status_code)


def _data(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _one_line(text: str) -> str:
    return " ".join(text.split())
