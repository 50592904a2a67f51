"""STAND-IN for `cloudflared tunnel run`: NOT cloudflared. It reaches no Cloudflare edge and opens no tunnel.

watchdog-llm's tests (and `watchdog-llm demo`) run this where cloudflared and Cloudflare are out of reach.
It reproduces what a supervisor sees of cloudflared and nothing else: the command line, how the
credentials are found (and the errors when they are not), log lines in cloudflared's format on stderr,
the metrics server (/ready, /metrics, /healthcheck) and the shutdown on SIGTERM/SIGINT.

CLI:  cloudflared-standin tunnel [--no-autoupdate] [--metrics HOST:PORT] [--config FILE] [--loglevel L]
      run [--token-file FILE] [--token T] [--credentials-file FILE] [TUNNEL]
Flags may come before or after `run`, as `--flag value` or `--flag=value`; unknown flags are accepted
(an unknown boolean flag right before a positional must be written `--flag=true`).

Credentials, in cloudflared's order: --token (warned about: it shows in `ps`), env TUNNEL_TOKEN,
--token-file (or env TUNNEL_TOKEN_FILE). Without a token: a named tunnel, given as TUNNEL or by
`tunnel:` in --config, with a credentials file (--credentials-file, `credentials-file:` in the config,
or ~/.cloudflared/<TUNNEL>.json) that exists. Otherwise it exits 1 with cloudflared's message.
The config is YAML (the subset cloudflared configs use: `key: value`, and `ingress:` with `- hostname:` /
`service:` items) or JSON. Any token is accepted; one that is not a real tunnel token (base64 JSON with
a/t/s) is warned about instead of refused. Default config locations (~/.cloudflared/config.yml ...)
are not searched.

--metrics HOST:PORT (port 0: any free port; without the flag, 127.0.0.1:20241-20245 as current
cloudflared, else any): `Starting metrics server on HOST:PORT/metrics` gives the port. GET /ready is
503 `{"status":503,"readyConnections":0,...}` until the 4 connections are "registered", then 200.

Environment:
  STANDIN_CONNECT_S=<s>          time until the tunnel connections are registered (default 0.2).
  STANDIN_EXIT_AT_ONCE=<code>    print an error and exit with <code> before anything else.
  STANDIN_CRASH_AFTER_S=<s>      exit 1 (abruptly) s seconds after start.
  STANDIN_EDGE_LISTEN=host:port  also run a local stand-in for Cloudflare's edge there: every request is
                                 forwarded to the matching ingress rule's service (by Host, else the first
                                 rule with an http(s) service; STANDIN_EDGE_ORIGIN=<url> when there is no
                                 ingress, as with a token), streaming the response (no buffering, so SSE
                                 passes through). An unreachable origin gives Cloudflare's 502
                                 "Bad gateway" page ("Error code 502").
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import os
import secrets
import signal
import socket
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path
from typing import Any, cast

from watchdog_llm.standin._common import env_float, env_str, exit_at_once_code

VERSION = "0.0.0-standin"
BANNER = "STAND-IN: this is watchdog-llm's cloudflared-standin, not cloudflared"
CONNECTIONS = 4
EDGE_IPS = ("198.41.192.7", "198.41.200.13", "198.41.192.47", "198.41.200.53")
DEFAULT_METRICS_PORTS = range(20241, 20246)
LEVELS = {"debug": 0, "info": 1, "warn": 2, "error": 3, "fatal": 4}
LEVEL_TAGS = {"DBG": 0, "INF": 1, "WRN": 2, "ERR": 3, "FTL": 4}

BOOL_FLAGS = frozenset(
    {
        "no-autoupdate",
        "post-quantum",
        "no-tls-verify",
        "no-chunked-encoding",
        "management-diagnostics",
        "help",
        "h",
        "version",
        "v",
    }
)
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)

_threshold = LEVELS["info"]


def log(level: str, msg: str, **fields: object) -> None:
    """cloudflared's console format: `2006-01-02T15:04:05Z INF message key=value ...`, on stderr."""
    if LEVEL_TAGS.get(level, 1) < _threshold:
        return
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    parts = [stamp, level, msg]
    for key, value in fields.items():
        text = str(value)
        parts.append(f"{key}={json.dumps(text) if (' ' in text or not text) else text}")
    print(" ".join(parts), file=sys.stderr, flush=True)


class SetupError(Exception):
    """Exit 1 with these lines on stderr (cloudflared prints such errors as plain lines)."""

    def __init__(self, *lines: str) -> None:
        super().__init__(lines[0])
        self.lines = lines


# ---------------------------------------------------------------------------------------------------
# Command line and configuration
# ---------------------------------------------------------------------------------------------------


@dataclass
class Cli:
    positionals: list[str] = field(default_factory=list)
    flags: dict[str, str | bool] = field(default_factory=dict)

    def value(self, *names: str) -> str | None:
        for name in names:
            v = self.flags.get(name)
            if isinstance(v, str) and v:
                return v
        return None


def parse_cli(argv: list[str]) -> Cli:
    """urfave/cli's conventions: `-flag`/`--flag`, `value` or `=value`, flags on either side of `run`."""
    cli = Cli()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            cli.positionals.extend(argv[i + 1 :])
            break
        if arg.startswith("-") and arg != "-":
            name, eq, value = arg.lstrip("-").partition("=")
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if eq:
                cli.flags[name] = value
            elif name in BOOL_FLAGS or nxt is None or nxt.startswith("-") or nxt in ("tunnel", "run"):
                cli.flags[name] = True
            else:
                cli.flags[name] = nxt
                i += 1
        else:
            cli.positionals.append(arg)
        i += 1
    return cli


def _scalar(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def _strip_comment(line: str) -> str:
    if line.lstrip().startswith("#"):
        return ""
    cut = line.find(" #")
    return line if cut < 0 else line[:cut]


def parse_yaml_subset(text: str) -> dict[str, Any]:
    """The YAML that cloudflared configs use: top-level `key: value`, and lists of flat maps under a key.

    Nested maps (originRequest: ...) are skipped; PyYAML is not a dependency of watchdog-llm.
    """
    out: dict[str, Any] = {}
    block: list[dict[str, str]] | None = None
    item: dict[str, str] | None = None
    item_indent = 0
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = _strip_comment(raw).rstrip()
        body = line.strip()
        if not body or body in ("---", "..."):
            continue
        indent = len(line) - len(line.lstrip(" "))
        is_item = body == "-" or body.startswith("- ")
        # PyYAML's safe_dump writes list items at the key's own indentation ("ingress:\n- service: x").
        if indent == 0 and not (is_item and block is not None):
            key, sep, value = body.partition(":")
            if not sep:
                raise ValueError(f"line {lineno}: expected `key: value`, got {body!r}")
            value = _scalar(value)
            if value in ("", "[]"):
                block = []
                out[key.strip()] = block
            else:
                block = None
                out[key.strip()] = value
            item = None
            continue
        if block is None:
            continue
        if is_item:
            item = {}
            block.append(item)
            item_indent = indent + 2
            body = body[1:].strip()
            if not body:
                continue
        elif item is None or indent != item_indent:
            continue  # deeper: a nested map of the item, which we do not model
        key, sep, value = body.partition(":")
        if sep and item is not None and _scalar(value):
            item[key.strip()] = _scalar(value)
    return out


def load_config(path: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise SetupError(f"Cannot read config file {path}: {e.strerror or e}") from None
    try:
        data = json.loads(text) if text.lstrip().startswith("{") else parse_yaml_subset(text)
    except ValueError as e:
        raise SetupError(f"Error parsing YAML in config file at {path}: {e}") from None
    if not isinstance(data, dict):
        raise SetupError(f"Error parsing YAML in config file at {path}: not a mapping")
    return data


def check_ingress(raw: Any) -> list[dict[str, str]]:
    if not raw:
        return []
    if not isinstance(raw, list) or not all(isinstance(r, dict) for r in raw):
        raise SetupError('Couldn\'t start tunnel error="ingress must be a list of rules"')
    rules = [{str(k): str(v) for k, v in r.items()} for r in raw]
    for n, rule in enumerate(rules, 1):
        if not rule.get("service"):
            raise SetupError(f'Couldn\'t start tunnel error="Ingress rule #{n} is missing a service"')
    if rules[-1].get("hostname") not in (None, "", "*") or rules[-1].get("path"):
        raise SetupError(
            "Couldn't start tunnel error=\"The last ingress rule must match all URLs (i.e. it should not "
            'have a hostname or path filter)"'
        )
    return rules


def decode_token(token: str) -> str | None:
    """The tunnel id of a real tunnel token (base64 of {"a": account, "t": tunnel id, "s": secret})."""
    try:
        data = json.loads(base64.b64decode(token + "=" * (-len(token) % 4)))
    except (binascii.Error, ValueError):
        return None
    if isinstance(data, dict) and isinstance(data.get("t"), str) and data.get("a") and data.get("s"):
        return str(data["t"])
    return None


@dataclass
class Setup:
    tunnel_id: str
    ingress: list[dict[str, str]]
    metrics: str | None
    edge_listen: str | None
    settings: dict[str, str]


def _is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
        return True
    except ValueError:
        return False


def resolve(cli: Cli) -> Setup:
    """Find the credentials the way cloudflared does; SetupError (exit 1) when they cannot be found."""
    config_path = cli.value("config")
    config = load_config(config_path) if config_path else {}
    ingress = check_ingress(config.get("ingress"))
    settings = {
        k: ("*****" if k == "token" else str(v).lower() if isinstance(v, bool) else v)
        for k, v in sorted(cli.flags.items())
    }

    token = cli.value("token")
    if token:
        log(
            "WRN",
            "The tunnel token is on the command line, where every user of this host can read it (ps). "
            "Pass it in the TUNNEL_TOKEN environment variable or with --token-file. (stand-in warning)",
        )
    token = token or env_str("TUNNEL_TOKEN")
    token_file = cli.value("token-file") or env_str("TUNNEL_TOKEN_FILE")
    if not token and token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as e:
            raise SetupError(f"Failed to read token file: open {token_file}: {e.strerror or e}") from None
    metrics = cli.value("metrics") or cast(str | None, config.get("metrics"))
    edge = env_str("STANDIN_EDGE_LISTEN")
    if token:
        tunnel_id = decode_token(token)
        if tunnel_id is None:
            log(
                "WRN",
                "stand-in: this is not a real tunnel token; real cloudflared would exit with "
                '"Provided Tunnel token is not valid."',
            )
            tunnel_id = str(uuid.uuid5(uuid.NAMESPACE_URL, "standin-token:" + token))
        return Setup(tunnel_id, ingress, metrics, edge, settings)

    name = cli.positionals[2] if len(cli.positionals) > 2 else str(config.get("tunnel") or "")
    if not name:
        raise SetupError(
            '"cloudflared tunnel run" requires the ID or name of the tunnel to run as the last command line '
            "argument or in the configuration file.",
            "See 'cloudflared tunnel run --help'.",
            "stand-in: no tunnel token (TUNNEL_TOKEN, --token-file, --token) and no tunnel name "
            "(TUNNEL argument or `tunnel:` in --config) was given.",
        )
    creds_path = (
        cli.value("credentials-file", "cred-file")
        or str(config.get("credentials-file") or config.get("credentials_file") or "")
        or str(Path.home() / ".cloudflared" / f"{name}.json")
    )
    path = Path(creds_path).expanduser()
    if not path.is_file():
        raise SetupError(f"Tunnel credentials file '{creds_path}' doesn't exist or is not a file")
    try:
        creds = json.loads(path.read_text())
    except (OSError, ValueError):
        raise SetupError(f"Couldn't parse tunnel credentials from {creds_path}") from None
    tunnel_id = str(creds.get("TunnelID") or "") if isinstance(creds, dict) else ""
    if not tunnel_id:
        tunnel_id = name if _is_uuid(name) else str(uuid.uuid5(uuid.NAMESPACE_URL, "standin-tunnel:" + name))
    return Setup(tunnel_id, ingress, metrics, edge, settings)


# ---------------------------------------------------------------------------------------------------
# Metrics server (plain asyncio: it must be up in milliseconds)
# ---------------------------------------------------------------------------------------------------


@dataclass
class TunnelState:
    connector_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    connected: int = 0
    requests: int = 0
    errors: int = 0
    started: float = field(default_factory=time.time)


def metrics_response(path: str, st: TunnelState) -> tuple[int, str, bytes]:
    if path == "/ready":
        code = 200 if st.connected else 503
        body = {"status": code, "readyConnections": st.connected, "connectorId": st.connector_id}
        # Go's json.Marshal (no newline); no Content-Type is set, so Go sniffs text/plain.
        return code, "text/plain; charset=utf-8", json.dumps(body, separators=(",", ":")).encode()
    if path == "/healthcheck":
        return 200, "text/plain; charset=utf-8", b"OK\n"
    if path == "/quicktunnel":
        return 200, "application/json", b'{"hostname":""}\n'
    if path == "/metrics":
        lines = [
            "# HELP build_info Build and version information",
            "# TYPE build_info gauge",
            f'build_info{{goversion="stand-in",revision="stand-in",type="",version="{VERSION}"}} 1',
            "# HELP cloudflared_tunnel_ha_connections Number of active ha connections",
            "# TYPE cloudflared_tunnel_ha_connections gauge",
            f"cloudflared_tunnel_ha_connections {st.connected}",
            "# HELP cloudflared_tunnel_total_requests Amount of requests proxied through all the tunnels",
            "# TYPE cloudflared_tunnel_total_requests counter",
            f"cloudflared_tunnel_total_requests {st.requests}",
            "# HELP cloudflared_tunnel_request_errors Amount of requests errors",
            "# TYPE cloudflared_tunnel_request_errors counter",
            f"cloudflared_tunnel_request_errors {st.errors}",
        ]
        return 200, "text/plain; version=0.0.4; charset=utf-8", ("\n".join(lines) + "\n").encode()
    return 404, "text/plain; charset=utf-8", b"404 page not found\n"


REASONS = {200: "OK", 404: "Not Found", 503: "Service Unavailable"}


async def _metrics_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, st: TunnelState) -> None:
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        parts = head.split(b"\r\n", 1)[0].decode("latin-1").split()
        method = parts[0] if parts else "GET"
        path = parts[1].split("?", 1)[0] if len(parts) > 1 else "/"
        code, ctype, body = metrics_response(path, st)
        header = (
            f"HTTP/1.1 {code} {REASONS.get(code, '')}\r\nContent-Type: {ctype}\r\n"
            f"Date: {formatdate(usegmt=True)}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        writer.write(header.encode() + (b"" if method == "HEAD" else body))
        await writer.drain()
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
        pass
    finally:
        writer.close()


def _split_hostport(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if host == "localhost":
        host = "127.0.0.1"
    return host, int(port)


async def start_metrics(addr: str | None, st: TunnelState) -> asyncio.Server:
    def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> Awaitable[None]:
        return _metrics_conn(r, w, st)

    if addr is not None:
        host, port = _split_hostport(addr)
        return await asyncio.start_server(handler, host, port)
    for port in DEFAULT_METRICS_PORTS:
        with contextlib.suppress(OSError):
            return await asyncio.start_server(handler, "127.0.0.1", port)
    return await asyncio.start_server(handler, "127.0.0.1", 0)


# ---------------------------------------------------------------------------------------------------
# Edge stand-in: an HTTP reverse proxy to the ingress service (uvicorn + httpx, imported only if used)
# ---------------------------------------------------------------------------------------------------

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def bad_gateway_page(host: str, ray: str) -> bytes:
    """Cloudflare's 502 page, shortened (the same title, heading and Ray ID line)."""
    return f"""<!DOCTYPE html>
<html lang="en-US">
<head><meta charset="UTF-8" /><title>{host} | 502: Bad gateway</title></head>
<body>
<div id="cf-wrapper"><div id="cf-error-details">
<h1><span class="inline-block">Bad gateway</span> <span class="code-label">Error code 502</span></h1>
<div>Visit <a href="https://www.cloudflare.com/">cloudflare.com</a> for more information.</div>
<p>The web server reported a bad gateway error.</p>
<p>Cloudflare Ray ID: <strong>{ray}</strong> &bull; {formatdate(usegmt=True)} (cloudflared-standin, not Cloudflare)</p>
</div></div>
</body>
</html>
""".encode()


def choose_rule(rules: list[dict[str, str]], host: str) -> tuple[int, str] | None:
    """(rule index, service): the rule for this Host, else the first rule with an http(s) service."""
    bare = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    for i, r in enumerate(rules):
        if r.get("hostname") and r["hostname"] == bare:
            return i, r["service"]
    for i, r in enumerate(rules):
        if r["service"].startswith(("http://", "https://")):
            return i, r["service"]
    return (len(rules) - 1, rules[-1]["service"]) if rules else None


def _go_error(e: Exception, service: str) -> str:
    """How Go's net package words the usual origin failures (cloudflared logs those)."""
    import httpx

    hostport = service.split("://", 1)[-1].split("/", 1)[0]
    if isinstance(e, httpx.ConnectTimeout):
        return f"dial tcp {hostport}: i/o timeout"
    if isinstance(e, httpx.ConnectError):
        return f"dial tcp {hostport}: connect: connection refused"
    return str(e) or type(e).__name__


def make_edge_app(rules: list[dict[str, str]], st: TunnelState, client: Any) -> Callable[..., Awaitable[None]]:
    import httpx

    fallback = env_str("STANDIN_EDGE_ORIGIN")

    async def simple(send: Send, status: int, body: bytes, ctype: str, ray: str) -> None:
        headers = [
            (b"content-type", ctype.encode()),
            (b"content-length", str(len(body)).encode()),
            (b"cf-ray", ray.encode()),
            (b"server", b"cloudflare"),
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        ray = f"{secrets.token_hex(8)}-STANDIN"
        st.requests += 1
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]]
        host = next((v for k, v in headers if k.lower() == "host"), "")
        body = b""
        while True:
            msg = await receive()
            body += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        chosen = choose_rule(rules, host)
        index, service = chosen if chosen else (0, fallback or "http_status:503")
        if service.startswith("http_status:"):
            await simple(send, int(service.split(":", 1)[1]), b"", "text/plain; charset=utf-8", ray)
            return
        if not service.startswith(("http://", "https://")):
            st.errors += 1
            await simple(send, 502, bad_gateway_page(host, ray), "text/html; charset=UTF-8", ray)
            return
        client_ip = (scope.get("client") or ("127.0.0.1", 0))[0]
        out = [(k, v) for k, v in headers if k.lower() not in HOP_BY_HOP]
        out += [
            ("cf-ray", ray),
            ("cf-connecting-ip", client_ip),
            ("cf-visitor", '{"scheme":"https"}'),
            ("x-forwarded-for", client_ip),
            ("x-forwarded-proto", "https"),
        ]
        path = scope.get("raw_path") or scope["path"].encode()
        query = scope.get("query_string") or b""
        url = service.rstrip("/") + path.decode("latin-1") + ("?" + query.decode("latin-1") if query else "")
        request = client.build_request(scope["method"], url, headers=out, content=body)
        try:
            response = await client.send(request, stream=True)
        except httpx.HTTPError as e:
            st.errors += 1
            log(
                "ERR",
                "",
                error="Unable to reach the origin service. The service may be down or it may not be "
                f"responding to traffic from cloudflared: {_go_error(e, service)}",
                cfRay=ray,
                event=1,
                ingressRule=index,
                originService=service,
            )
            await simple(send, 502, bad_gateway_page(host, ray), "text/html; charset=UTF-8", ray)
            return
        # The client may leave mid-stream (an SSE reader closing): stop reading the origin then.
        gone = asyncio.ensure_future(receive())
        try:
            resp_headers = [
                (k, v) for k, v in response.headers.raw if k.lower().decode("latin-1") not in HOP_BY_HOP | {"server"}
            ]
            resp_headers += [(b"cf-ray", ray.encode()), (b"server", b"cloudflare")]
            await send({"type": "http.response.start", "status": response.status_code, "headers": resp_headers})
            async for chunk in response.aiter_raw():
                if gone.done():
                    break
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except httpx.HTTPError as e:  # the origin broke off mid-response: so does the edge
            log("ERR", "", error=f"stream ended: {e}", cfRay=ray, event=1, originService=service)
        finally:
            gone.cancel()
            await response.aclose()

    return app


async def start_edge(listen: str, rules: list[dict[str, str]], st: TunnelState) -> Callable[[], Awaitable[None]]:
    """Start the edge proxy; returns the coroutine function that stops it."""
    import httpx
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Any:
            yield  # our own signal handlers stay in charge

    host, port = _split_hostport(listen)
    client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10.0), trust_env=False)
    config = uvicorn.Config(
        make_edge_app(rules, st, client),
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        lifespan="off",
        server_header=False,
        date_header=False,
        timeout_graceful_shutdown=cast(int, 0.1),  # a number for asyncio.wait_for, despite the annotation
    )
    server = Server(config)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.01)
    if task.done():
        task.result()  # raises what stopped it
    origin = choose_rule(rules, "")
    target = origin[1] if origin else env_str("STANDIN_EDGE_ORIGIN") or "http_status:503"
    log("INF", f"stand-in edge listening on {host}:{sock.getsockname()[1]}, forwarding to {target}")

    async def stop() -> None:
        server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, 2.0)
        await client.aclose()

    return stop


# ---------------------------------------------------------------------------------------------------
# The tunnel process
# ---------------------------------------------------------------------------------------------------


async def run_tunnel(setup: Setup) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    reason: list[str] = []
    for sig, name in ((signal.SIGTERM, "terminated"), (signal.SIGINT, "interrupt")):

        def on_signal(name: str = name) -> None:
            if reason:  # a second signal: no more grace
                os._exit(0)
            reason.append(name)
            stop.set()

        loop.add_signal_handler(sig, on_signal)

    st = TunnelState()
    log("INF", "Starting tunnel", tunnelID=setup.tunnel_id)
    log("INF", f"Version {VERSION} (Checksum stand-in)")
    log("INF", "GOOS: linux, GOVersion: stand-in, GoArch: amd64")
    log("INF", "Settings: map[" + " ".join(f"{k}:{v}" for k, v in setup.settings.items()) + "]")
    log("INF", f"Generated Connector ID: {st.connector_id}")
    log("INF", "Initial protocol quic")
    try:
        metrics = await start_metrics(setup.metrics, st)
    except OSError as e:
        log("ERR", "failed to start the metrics server", error=str(e))
        return 1
    mhost, mport = metrics.sockets[0].getsockname()[:2]
    log("INF", f"Starting metrics server on {mhost}:{mport}/metrics")
    stop_edge: Callable[[], Awaitable[None]] | None = None
    if setup.edge_listen:
        try:
            stop_edge = await start_edge(setup.edge_listen, setup.ingress, st)
        except OSError as e:
            log("ERR", "stand-in edge failed to start", error=str(e))
            metrics.close()
            return 1

    async def connect() -> None:
        await asyncio.sleep(env_float("STANDIN_CONNECT_S", 0.2))
        for i in range(CONNECTIONS):
            log(
                "INF",
                "Registered tunnel connection",
                connIndex=i,
                connection=uuid.uuid4(),
                event=0,
                ip=EDGE_IPS[i],
                location="stand-in",
                protocol="quic",
            )
            st.connected += 1

    async def crash(after: float) -> None:
        await asyncio.sleep(after)
        log("ERR", "Serve tunnel error", error=f"stand-in fault (STANDIN_CRASH_AFTER_S={after})", connIndex=0)
        os._exit(1)  # abrupt, like a crash

    tasks = [asyncio.ensure_future(connect())]
    crash_after = env_float("STANDIN_CRASH_AFTER_S", -1.0)
    if crash_after >= 0:
        tasks.append(asyncio.ensure_future(crash(crash_after)))
    await stop.wait()
    log("INF", f"Initiating graceful shutdown due to signal {reason[0]} ...")
    for t in tasks:
        t.cancel()
    for i in range(st.connected):
        log("INF", "Unregistered tunnel connection", connIndex=i, event=0, ip=EDGE_IPS[i])
    st.connected = 0
    if stop_edge is not None:
        await stop_edge()
    log("INF", "Tunnel server stopped")
    metrics.close()
    log("INF", "Metrics server stopped")
    return 0


USAGE = """NAME:
   cloudflared-standin tunnel run - STAND-IN for `cloudflared tunnel run` (not cloudflared)

USAGE:
   cloudflared-standin tunnel [--no-autoupdate] [--metrics HOST:PORT] [--config FILE] [--loglevel L] \\
       run [--token-file FILE] [--token T] [--credentials-file FILE] [TUNNEL]
"""


def main(argv: list[str] | None = None) -> int:
    global _threshold
    argv = sys.argv[1:] if argv is None else argv
    log("INF", BANNER)
    cli = parse_cli(argv)
    if cli.flags.get("version") or cli.flags.get("v") or cli.positionals[:1] == ["version"]:
        print(f"cloudflared version {VERSION} (built stand-in)")
        return 0
    if cli.flags.get("help") or cli.flags.get("h"):
        print(USAGE, end="")
        return 0
    code = exit_at_once_code()
    if code is not None:
        log("ERR", "Couldn't start tunnel", error=f"stand-in fault (STANDIN_EXIT_AT_ONCE={code})")
        return code
    if cli.positionals[:2] != ["tunnel", "run"]:
        print(USAGE, end="", file=sys.stderr)
        print("stand-in: only `tunnel run` is implemented", file=sys.stderr)
        return 1
    level = (cli.value("loglevel") or env_str("TUNNEL_LOGLEVEL") or "info").lower()
    _threshold = LEVELS.get(level, LEVELS["info"])
    try:
        setup = resolve(cli)
    except SetupError as e:
        for line in e.lines:
            print(line, file=sys.stderr, flush=True)
        return 1
    return asyncio.run(run_tunnel(setup))


if __name__ == "__main__":
    sys.exit(main())
