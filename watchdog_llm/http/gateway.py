"""The public gateway: vLLM's OpenAI API behind keys and limits, with a clean answer while it is away.

`/v1/*` is a plain ASGI proxy (the hot path: no routing or validation framework in the way); `/`
and `/health` and every other path go to a small FastAPI app. What is never forwarded: anything
outside `/v1` (vLLM's /sleep, /wake_up, /collective_rpc, /reset_prefix_cache, /metrics, docs),
and the LoRA load/unload endpoints inside it.

Streams pass through chunk by chunk. A stream whose model goes away (a yield, a crash) ends with an
SSE error event and `data: [DONE]`; a client that disconnects cancels its upstream request at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import Counter, Histogram
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Message, Receive, Scope, Send

from watchdog_llm.availability import Availability
from watchdog_llm.coordination.catalog import ModelEntry
from watchdog_llm.http import pages
from watchdog_llm.http.errors import allowed_methods, encode, headers, openai_body
from watchdog_llm.http.keys import KeyRing, Limiter
from watchdog_llm.http.upstream import UPSTREAM_KEEPALIVE_EXPIRY, Lanes
from watchdog_llm.metrics import Metrics, route_label

log = logging.getLogger("watchdog_llm.gateway")
# One line per public request: who (the key's consumer), what, the status, how long. Its own logger,
# so a site can route or silence it apart from the daemon's events.
access_log = logging.getLogger("watchdog_llm.access")

# Paths under /v1 that are administration, not inference: a public user must not load adapters.
BLOCKED = frozenset({"/v1/load_lora_adapter", "/v1/unload_lora_adapter"})
_SEGMENT = re.compile(r"[A-Za-z0-9._~:@!$&'()*+,;=-]+")
_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
# Who the client is and how it came, as a proxy would say it: never believed and never passed on.
# The gateway cannot tell cloudflared from another user of the node on loopback, so any of these may
# be forged; vLLM needs none of them (it would build redirects and logs from them).
_FORWARDING = frozenset(
    {
        b"forwarded",
        b"x-forwarded-for",
        b"x-forwarded-host",
        b"x-forwarded-port",
        b"x-forwarded-prefix",
        b"x-forwarded-proto",
        b"x-forwarded-scheme",
        b"x-forwarded-ssl",
        b"x-real-ip",
        b"x-original-url",
        b"x-rewrite-url",
        b"cf-connecting-ip",
        b"cf-connecting-ipv6",
        b"true-client-ip",
    }
)
# Request headers we set ourselves (the internal key) or that describe the client's connection.
_DROP_IN = (
    _HOP_BY_HOP | _FORWARDING | {b"host", b"content-length", b"authorization", b"x-api-key", b"cookie", b"expect"}
)
_DROP_OUT = _HOP_BY_HOP | {b"content-length", b"date", b"server", b"set-cookie"}
_BODY_TYPES = ("application/json", "multipart/form-data", "application/x-www-form-urlencoded")
CLIENT_GONE = 499  # nginx's code for "the client closed the connection": metrics only
_MAX_HELD = 1024 * 1024  # an "event" this long without a blank line is passed on as it is
_EVENT_ENDS = (b"\n\n", b"\r\n\r\n", b"\r\r")


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    max_body_bytes: int = 16 * 1024 * 1024
    body_timeout: float = 30.0  # the whole request body must arrive within this (slow clients)
    connect_timeout: float = 5.0
    read_timeout: float = 600.0  # longest silence from the model (a long non-streamed answer)
    upstream_uds: str | None = None  # the model's unix socket (SERVER_SOCKET); None: TCP
    chat_page: bool = True  # CHAT_PAGE: `/` is the chat page, else a status page


@dataclass(frozen=True, slots=True)
class Refusal:
    """An answer instead of forwarding: our envelope with this status, code and message."""

    status: int
    code: str
    message: str
    retry_after: int | None = None
    entry: str | None = None  # model_not_loaded: the catalog entry the request named

    @property
    def retryable(self) -> bool:
        return self.retry_after is not None


# Waits for a model that a request named (ON_DEMAND): None once it serves, else why not.
Demand = Callable[[str, str], Awaitable["Refusal | None"]]


@dataclass(frozen=True, slots=True)
class ModelNames:
    """Which `model` a request may name: the catalog's view, rebuilt when the served model changes."""

    served: frozenset[str]  # what the running model answers to, as it is
    rename: Mapping[str, str]  # the running entry's catalog name and aliases -> its served name
    others: Mapping[str, str]  # names, aliases and model ids of the other entries -> their catalog name
    shown: str  # the running model, in messages
    name: str = ""  # the running entry's catalog name
    listed: tuple[tuple[str, str], ...] = ()  # the other entries for /v1/models: (served id, catalog name)

    def known(self) -> str:
        return ", ".join(sorted({self.shown, *self.others.values()}))


def model_names(entries: Sequence[ModelEntry], active: ModelEntry, shown: str) -> ModelNames:
    """The names a request may use while `active` runs; catalog names and aliases case-insensitively,
    as the admin API resolves them (vLLM itself matches its served names exactly)."""
    served = frozenset(served_names(active))
    target = next(iter(sorted(served)))
    rename = {}
    for n in (active.name, *active.aliases):
        for k in (n, n.lower()):
            if k not in served:
                rename[k] = target
    others = {}
    entries = [e for e in entries if not e.always_on]  # services: reached at /services/NAME/, not by `model`
    for e in entries:
        if e.name == active.name:
            continue
        for n in (e.name, *e.aliases, *served_names(e)):
            for k in (n, n.lower()):
                if k not in served and k not in rename:
                    others[k] = e.name
    listed = tuple((served_names(e)[0], e.name) for e in entries if e.name != active.name)
    return ModelNames(served, rename, others, shown, active.name, listed)


def served_names(e: ModelEntry) -> list[str]:
    """What vLLM answers to for this entry: --served-model-name's names, else the model as given."""
    args = list(e.args)
    for i, a in enumerate(args):
        if a.startswith("--served-model-name="):
            return [a.split("=", 1)[1]]
        if a == "--served-model-name":
            names = []
            for w in args[i + 1 :]:
                if w.startswith("-"):
                    break
                names.append(w)
            if names:
                return names
    return [e.model]


class _Aborted(Exception):
    def __init__(self, why: str) -> None:
        self.why = why


class _Exchange:
    """One request in flight: what may abort it (client gone, model gone) and when it can be cancelled."""

    __slots__ = ("task", "waiting", "why")

    def __init__(self, task: asyncio.Task[Any]) -> None:
        self.task = task
        self.waiting = False  # inside an upstream await: cancelling lands in our own code
        self.why: str | None = None

    def abort(self, why: str) -> None:
        if self.why is not None:
            return
        self.why = why
        if self.waiting:
            self.task.cancel()

    async def wait(self, aw: Any) -> Any:
        """Await an upstream operation; an abort meanwhile raises _Aborted (never CancelledError)."""
        if self.why is not None:
            raise _Aborted(self.why)
        self.waiting = True
        try:
            return await aw
        except asyncio.CancelledError:
            if self.why is None:  # someone else's cancellation (shutdown): not ours to swallow
                raise
            self.task.uncancel()
            raise _Aborted(self.why) from None
        finally:
            self.waiting = False


class Gateway:
    """The public ASGI app. `availability()` and `upstream()` are read per request: the daemon owns
    the truth (phase, base URL, the internal key of the current run)."""

    def __init__(
        self,
        cfg: GatewayConfig,
        keys: KeyRing,
        limiter: Limiter,
        metrics: Metrics,
        availability: Callable[[], Availability],
        upstream: Callable[[], tuple[str, str, bool]],
        page: Callable[[], dict[str, Any]],
        models: Callable[[], ModelNames | None] = lambda: None,  # None: the body's `model` is not checked
        demand: Demand | None = None,  # None: a catalog model not loaded is 409, never waited for
        idle: Callable[[], None] = lambda: None,  # called when the last request in flight ends
        # /services/NAME/...: (base URL, key) of a running always-on service, why it is not running, or None
        services: Callable[[str], tuple[str, str] | str | None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.keys = keys
        self.limiter = limiter
        self.metrics = metrics
        self.availability = availability
        self.upstream = upstream
        self.page = page
        self.models = models
        self.demand = demand
        self.idle = idle
        self.services = services
        self._inflight: set[_Exchange] = set()
        # httpx's transport without an AsyncClient around it: no redirects followed, no proxy from
        # the environment (it must not carry our internal key elsewhere), no cookie jar (a cookie one
        # user's answer set would go upstream with everyone's requests), no default headers; and
        # none of the client's per-request work for features we do not use.
        self.upstream_client = Lanes(keep=256, keepalive_expiry=UPSTREAM_KEEPALIVE_EXPIRY, uds=cfg.upstream_uds)
        # A model on another host (LAN controller mode) is reached over TCP, whatever the local one uses.
        self.remote_client = Lanes(keep=64, keepalive_expiry=UPSTREAM_KEEPALIVE_EXPIRY)
        self._timeout = httpx.Timeout(
            cfg.read_timeout, connect=cfg.connect_timeout, write=30.0, pool=cfg.connect_timeout
        ).as_dict()
        # Per-request work that repeats: the upstream URL of a path, a metric's child of a label set.
        self._urls: dict[tuple[str, str, bytes], httpx.URL] = {}
        self._counted: dict[tuple[str, int, str], Counter] = {}
        self._latency: dict[tuple[str, str], Histogram] = {}
        self.site = _site(self)

    async def aclose(self) -> None:
        await self.upstream_client.aclose()
        await self.remote_client.aclose()

    def model_down(self) -> None:
        """The model left serving (yield, crash, hang, stop): every request in flight ends now, a
        stream with an error event, a request still waiting for its answer with our 503."""
        for ex in list(self._inflight):
            ex.abort("model")

    # ---- ASGI ------------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (
            scope["path"] == "/v1"
            or scope["path"].startswith("/v1/")
            or (self.services is not None and scope["path"].startswith("/services/"))
        ):
            await self._proxy(scope, receive, send)
        elif scope["type"] == "http":
            await self.site(scope, receive, _relative_redirects(scope, send))
        else:
            await self.site(scope, receive, send)

    async def _proxy(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = route_label(scope["path"])
        self.metrics.in_flight.inc()
        t0 = time.perf_counter()
        code = CLIENT_GONE
        # Who asked: set by _exchange once the key is known; None (no key, unknown key) counts as "".
        scope["watchdog_llm.consumer"] = None
        try:
            code = await self._exchange(scope, receive, send)
        except Exception:
            log.exception("gateway: internal error on %s %s", scope["method"], scope["path"])
            code = 502
            body = openai_body(502, "gateway_error", "the gateway failed to handle this request; it was logged")
            await _send_json(send, 502, body)  # fails silently if a response had already started
        finally:
            self.metrics.in_flight.dec()
            who = scope["watchdog_llm.consumer"] or ""
            counter = self._counted.get((route, code, who))
            if counter is None:  # bounded: consumers are the configured keys' names
                counter = self._counted[(route, code, who)] = self.metrics.requests.labels(route, str(code), who)
            counter.inc()
            if access_log.isEnabledFor(logging.INFO):
                client = scope.get("client") or ("-", 0)
                access_log.info(
                    '%s "%s %s" %s %.1f ms consumer=%s',
                    client[0],
                    scope["method"],
                    _printable(scope["path"]),
                    code,
                    (time.perf_counter() - t0) * 1000,
                    who or "-",
                )

    async def _exchange(self, scope: Scope, receive: Receive, send: Send) -> int:
        path: str = scope["path"]
        method: str = scope["method"]
        if not _safe(path) or _below(path) in BLOCKED:
            return await self._refuse(send, 404, "not_found", f"{method} {_printable(path)} is not served here")
        raw = dict(scope["headers"])  # later duplicates win: fine for the few we read
        consumer = scope["watchdog_llm.consumer"] = self.keys.consumer(_presented_key(raw))
        if consumer is None:
            msg = "missing or unknown API key: send it as 'Authorization: Bearer <key>' or 'x-api-key: <key>'"
            return await self._refuse(send, 401, "invalid_api_key", msg, reason="auth")
        if self.services is not None and path.startswith("/services/"):
            return await self._service(scope, receive, send, raw, consumer)
        avail = self.availability()
        if not avail.serving:
            return await self._unavailable(send, avail, consumer)
        if not self.limiter.acquire(consumer):
            msg = f"too many requests in flight for this key (at most {self.limiter.limit}); retry when one finishes"
            return await self._refuse(send, 429, "too_many_requests", msg, consumer, True, 1, reason="concurrency")
        try:
            return await self._forward(scope, receive, send, raw, consumer)
        finally:
            self.limiter.release(consumer)

    async def _service(self, scope: Scope, receive: Receive, send: Send, raw: dict[bytes, bytes], consumer: str) -> int:
        """An always-on service (mode C), whatever the model is doing: /services/NAME/REST -> its /REST."""
        assert self.services is not None
        name, _, rest = scope["path"].removeprefix("/services/").partition("/")
        target = self.services(name)
        if target is None:
            msg = f"no service {_printable(name)!r} here"
            return await self._refuse(send, 404, "service_not_found", msg, consumer, reason="service")
        if isinstance(target, str):
            return await self._refuse(send, 503, "service_unavailable", target, consumer, True, 5, reason="service")
        if not self.limiter.acquire(consumer):
            msg = f"too many requests in flight for this key (at most {self.limiter.limit}); retry when one finishes"
            return await self._refuse(send, 429, "too_many_requests", msg, consumer, True, 1, reason="concurrency")
        try:
            return await self._forward({**scope, "path": "/" + rest}, receive, send, raw, consumer, target)
        finally:
            self.limiter.release(consumer)

    async def _forward(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        raw: dict[bytes, bytes],
        consumer: str,
        service: tuple[str, str] | None = None,
    ) -> int:
        body = await self._read_body(receive, raw)
        if isinstance(body, tuple):
            status, code, msg = body
            return await self._refuse(send, status, code, msg, consumer, reason=code)
        if body is None:
            return CLIENT_GONE
        bad, doc = _check_body(scope["method"], raw, body)
        if bad is not None:
            status, code, msg = bad
            return await self._refuse(send, status, code, msg, consumer, reason=code)
        if doc is not None and service is None:
            body, wrong = self._by_model(doc, body)
            if wrong is not None and wrong.entry is not None and self.demand is not None:
                waited = await self._await_model(receive, wrong.entry, consumer)
                if not isinstance(waited, Refusal) and waited is not None:
                    return CLIENT_GONE
                body, wrong = self._by_model(doc, body) if waited is None else (body, waited)
            if wrong is not None:
                return await self._refuse(
                    send, wrong.status, wrong.code, wrong.message, consumer, wrong.retryable, wrong.retry_after,
                    reason="model",
                )  # fmt: skip
        base, key, remote = self.upstream() if service is None else (*service, True)
        fwd = [(k, v) for k, v in scope["headers"] if k not in _DROP_IN]
        fwd.append((b"authorization", b"Bearer " + key.encode()))
        try:
            req = httpx.Request(
                scope["method"],
                self._url(base, scope),
                headers=fwd,
                content=body,
                extensions={"timeout": self._timeout},
            )
        except (httpx.InvalidURL, httpx.LocalProtocolError, ValueError, UnicodeError) as e:
            return await self._refuse(send, 400, "bad_request", f"request cannot be forwarded: {e}", consumer)
        me = asyncio.current_task()
        assert me is not None
        ex = _Exchange(me)
        self._inflight.add(ex)
        watcher = asyncio.create_task(_watch_disconnect(receive, ex))
        try:
            lanes = self.remote_client if remote else self.upstream_client
            route = "/services" if service is not None else route_label(scope["path"])  # its /v1/models is its own
            return await self._relay(send, req, ex, consumer, route, lanes)
        finally:
            watcher.cancel()
            self._inflight.discard(ex)
            if not self._inflight:
                self.idle()

    def _with_catalog(self, content: bytes) -> bytes:
        """vLLM's /v1/models plus the catalog's other models (loaded on demand), each card marked
        with `watchdog_llm: {name, loaded}`; vLLM's own answer when it is not the list expected."""
        names = self.models()
        if names is None:
            return content
        try:
            doc = json.loads(content)
        except ValueError:
            return content
        cards = doc.get("data") if isinstance(doc, dict) else None
        if not isinstance(cards, list) or not all(isinstance(c, dict) for c in cards):
            return content
        created = next((c.get("created") for c in cards if isinstance(c.get("created"), int)), int(time.time()))
        for c in cards:
            c["watchdog_llm"] = {"name": names.name, "loaded": True}
        for served, name in names.listed:
            card = {"id": served, "object": "model", "created": created, "owned_by": "vllm"}
            cards.append({**card, "watchdog_llm": {"name": name, "loaded": False}})
        return json.dumps(doc, separators=(",", ":")).encode()

    @property
    def in_flight(self) -> int:
        """Requests being forwarded to the model now."""
        return len(self._inflight)

    async def _await_model(self, receive: Receive, entry: str, consumer: str) -> Refusal | int | None:
        """Wait (ON_DEMAND) until `entry` serves: None then, else why not; CLIENT_GONE if the client left."""
        assert self.demand is not None
        waiting = asyncio.ensure_future(self.demand(entry, consumer))
        gone = asyncio.ensure_future(_disconnected(receive))
        try:
            await asyncio.wait({waiting, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (waiting, gone):
                if not t.done():
                    t.cancel()
        return waiting.result() if waiting.done() and not waiting.cancelled() else CLIENT_GONE

    def _by_model(self, doc: dict[str, Any], body: bytes) -> tuple[bytes, Refusal | None]:
        """The body to send (the running model's catalog name becomes the name vLLM knows), or why a
        request for another model is refused: 409 for one of the catalog not loaded now, 404 else."""
        asked = doc.get("model")
        names = self.models()
        if not isinstance(asked, str) or names is None or asked in names.served:
            return body, None
        target = names.rename.get(asked) or names.rename.get(asked.lower())
        if target is not None:
            doc["model"] = target
            return json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode(), None
        other = names.others.get(asked) or names.others.get(asked.lower())
        if other is not None:
            msg = f"model {_printable(asked)!r} ({other}) is not loaded: this endpoint serves {names.shown} now"
            return body, Refusal(409, "model_not_loaded", msg, entry=other)
        msg = f"model {_printable(asked)!r} is not served here (models: {names.known()})"
        return body, Refusal(404, "model_not_found", msg)

    def _url(self, base: str, scope: Scope) -> httpx.URL:
        """The upstream URL of this path and query: parsed once (a parse costs ~15 us), kept while
        there are at most 256 of them (an open key's users can make up paths; the usual ones are few)."""
        k = (base, scope["path"], scope["query_string"])
        url = self._urls.get(k)
        if url is None:
            query = scope["query_string"]
            url = httpx.URL(base + scope["path"] + ("?" + query.decode("latin-1") if query else ""))
            if len(self._urls) >= 256:
                self._urls.clear()
            self._urls[k] = url
        return url

    async def _relay(
        self, send: Send, req: httpx.Request, ex: _Exchange, consumer: str, route: str, lanes: Lanes
    ) -> int:
        t0 = time.perf_counter()
        try:
            resp: httpx.Response = await ex.wait(lanes.handle_async_request(req))
        except _Aborted as a:
            return await self._aborted(send, a, consumer)
        except httpx.TimeoutException:
            msg = "the model did not answer in time"
            return await self._refuse(send, 504, "upstream_timeout", msg, consumer, True, 5, reason="timeout")
        except httpx.HTTPError as e:
            return await self._upstream_failed(send, consumer, e)
        latency = self._latency.get((route, consumer))
        if latency is None:
            if len(self._latency) >= 4096:  # routes x keys: bounded by the config, but kept bounded anyway
                self._latency.clear()
            latency = self._latency[(route, consumer)] = self.metrics.upstream_latency.labels(route, consumer)
        latency.observe(time.perf_counter() - t0)
        try:
            out = _response_headers(resp, req.url)
            if resp.headers.get("content-type", "").startswith("text/event-stream"):
                return await self._stream(send, resp, out, ex, consumer)
            try:
                content = b"".join([c async for c in _chunks(resp, ex)])
            except _Aborted as a:
                return await self._aborted(send, a, consumer)
            except httpx.TimeoutException:
                msg = "the model stopped answering mid-response"
                return await self._refuse(send, 504, "upstream_timeout", msg, consumer, True, 5, reason="timeout")
            except httpx.HTTPError as e:
                return await self._upstream_failed(send, consumer, e)
            if route == "/v1/models" and resp.status_code == 200 and req.method == "GET":
                content = self._with_catalog(content)
            out.append((b"content-length", str(len(content)).encode()))
            await send({"type": "http.response.start", "status": resp.status_code, "headers": out})
            await send({"type": "http.response.body", "body": content})
            return resp.status_code
        finally:
            await resp.aclose()

    async def _stream(
        self, send: Send, resp: httpx.Response, out: list[tuple[bytes, bytes]], ex: _Exchange, consumer: str
    ) -> int:
        """Relay whole SSE events as they arrive. A partial event is held until its blank line: if the
        model goes away mid-event, the client never gets half of one (the SDK would fail to parse it
        instead of showing our error event)."""
        await send({"type": "http.response.start", "status": resp.status_code, "headers": out})
        tail = b""  # the end of what was sent: did the model say [DONE]?
        held = b""  # bytes after the last complete event
        failure: tuple[str, str] | None = None
        try:
            async for chunk in _chunks(resp, ex):
                held += chunk
                cut = _event_end(held)
                if cut == 0 and len(held) < _MAX_HELD:
                    continue
                ready, held = (held[:cut], held[cut:]) if cut else (held, b"")
                tail = (tail + ready)[-64:]
                await send({"type": "http.response.body", "body": ready, "more_body": True})
                if ex.why is not None:
                    raise _Aborted(ex.why)
        except _Aborted as a:
            if a.why == "client":
                return CLIENT_GONE
            if b"[DONE]" not in tail:  # went away just after a whole answer: nothing is missing
                failure = self._down_message()
        except httpx.TimeoutException:
            failure = ("upstream_timeout", "the model stopped sending tokens; this response is incomplete")
        except httpx.HTTPError:
            failure = self._down_message("the connection to the model was lost; this response is incomplete")
        except OSError:  # the client went away while we were sending
            return CLIENT_GONE
        if failure is None and held:  # a clean end of the body: what is left is the model's to send
            tail = (tail + held)[-64:]
            try:
                await send({"type": "http.response.body", "body": held, "more_body": True})
            except OSError:
                return CLIENT_GONE
        if failure is None and b"[DONE]" not in tail and not self.availability().serving:
            failure = self._down_message()  # the model stopped gracefully mid-answer: not a clean end
        end = b""
        if failure is not None:
            code, msg = failure
            body = openai_body(503, code, msg, consumer=consumer, retryable=True)
            end = (b"" if tail.endswith(b"\n\n") or not tail else b"\n\n") + b"data: " + encode(body) + b"\n\n"
            end += b"data: [DONE]\n\n"
            log.info("stream for %s ended early: %s", consumer, msg)
        try:
            await send({"type": "http.response.body", "body": end, "more_body": False})
        except OSError:
            return CLIENT_GONE
        return resp.status_code

    async def _aborted(self, send: Send, a: _Aborted, consumer: str) -> int:
        """Before any of the answer was sent: the client left, or the model went away (say why)."""
        if a.why == "client":
            return CLIENT_GONE
        avail = self.availability()
        if avail.serving:  # back already (a fast restart): this request's answer is lost all the same
            msg = "the model went away before answering; try again"
            return await self._refuse(send, 502, "upstream_error", msg, consumer, True, 1, reason="upstream")
        return await self._unavailable(send, avail, consumer)

    def _down_message(self, default: str = "the model went away mid-answer") -> tuple[str, str]:
        avail = self.availability()
        if avail.serving:
            return ("upstream_error", default)
        return (avail.code, f"{avail.message}; this response is incomplete")

    async def _upstream_failed(self, send: Send, consumer: str, e: httpx.HTTPError) -> int:
        avail = self.availability()
        if not avail.serving:  # it went away between our check and the request: say why
            return await self._unavailable(send, avail, consumer)
        log.warning("gateway: upstream error: %s: %s", type(e).__name__, e)
        msg = "the model's server failed to answer (connection lost); try again"
        return await self._refuse(send, 502, "upstream_error", msg, consumer, True, 1, reason="upstream")

    async def _unavailable(self, send: Send, avail: Availability, consumer: str | None) -> int:
        return await self._refuse(
            send, 503, avail.code, avail.message, consumer, avail.retryable, avail.retry_after, reason="unavailable"
        )

    async def _refuse(
        self,
        send: Send,
        status: int,
        code: str,
        message: str,
        consumer: str | None = None,
        retryable: bool = False,
        retry_after: int | None = None,
        *,
        reason: str | None = None,
    ) -> int:
        if reason is not None:
            self.metrics.rejected.labels(reason).inc()
        body = openai_body(status, code, message, consumer=consumer, retryable=retryable)
        await _send_json(send, status, body, retry_after)
        return status

    async def _read_body(self, receive: Receive, raw: dict[bytes, bytes]) -> bytes | tuple[int, str, str] | None:
        """The whole body, within the size and time limits; None if the client went away."""
        limit = self.cfg.max_body_bytes
        too_big = (413, "request_too_large", f"request body larger than {limit} bytes (MAX_BODY_BYTES)")
        declared = raw.get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                return (400, "bad_request", "Content-Length is not a number")
            if int(declared) > limit:
                return too_big
        parts: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.cfg.body_timeout):
                while True:
                    msg: Message = await receive()
                    if msg["type"] == "http.disconnect":
                        return None
                    chunk = msg.get("body", b"")
                    size += len(chunk)
                    if size > limit:
                        return too_big
                    parts.append(chunk)
                    if not msg.get("more_body", False):
                        break
        except TimeoutError:
            late = f"the request body did not arrive within {self.cfg.body_timeout:g} s (BODY_TIMEOUT)"
            return (408, "request_timeout", late)
        return b"".join(parts)


def _site(gw: Gateway) -> FastAPI:
    """`/`, `/health`, and the envelope for every path that is not served."""
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
        text = f"{request.method} {_printable(request.url.path)} is not served here"
        allow = None
        if exc.status_code == 405:
            methods = allowed_methods(request.app.router.routes, request.scope)
            text = f"{request.method} is not allowed on {_printable(request.url.path)} (allowed: {methods})"
            allow = {"Allow": methods}
        return JSONResponse(openai_body(exc.status_code, code, text), status_code=exc.status_code, headers=allow)

    @app.get("/health")
    async def health() -> JSONResponse:
        a = gw.availability()
        body = {
            "status": "ok" if a.serving else a.code,
            "message": a.message,
            "model": gw.page().get("model"),
        }
        if a.serving:
            return JSONResponse(body)
        return JSONResponse(body, status_code=503, headers={"Retry-After": str(a.retry_after)})

    @app.get("/", response_class=HTMLResponse)
    async def home() -> HTMLResponse:
        render = pages.chat_page if gw.cfg.chat_page else pages.status_page
        return HTMLResponse(render(gw.page(), gw.availability()), headers=pages.SECURITY_HEADERS)

    @app.get("/_chat/{name}")
    async def chat_asset(name: str) -> Response:
        kind = pages.ASSETS.get(name)
        if kind is None:
            raise StarletteHTTPException(404)
        return Response(pages.asset(name), media_type=kind, headers=pages.SECURITY_HEADERS)

    return app


def _relative_redirects(scope: Scope, send: Send) -> Send:
    """Our own pages' redirects (Starlette's trailing-slash 307 is absolute, built from the Host
    header and our plain-http scheme) as paths."""
    host = next((v for k, v in scope["headers"] if k == b"host"), b"")

    async def sending(msg: Message) -> None:
        if msg["type"] == "http.response.start":
            hs = msg.get("headers", [])
            if any(k.lower() == b"location" for k, _ in hs):
                msg = {
                    **msg,
                    "headers": [(k, relative_location(v, host) if k.lower() == b"location" else v) for k, v in hs],
                }
        await send(msg)

    return sending


async def _chunks(resp: httpx.Response, ex: _Exchange) -> Any:
    """resp.aiter_raw(), each read abortable by the exchange."""
    it = resp.aiter_raw()
    while True:
        try:
            chunk = await ex.wait(it.__anext__())
        except StopAsyncIteration:
            return
        if chunk:
            yield chunk


def _response_headers(resp: httpx.Response, upstream: httpx.URL) -> list[tuple[bytes, bytes]]:
    """The model's headers for the client: hop-by-hop ones dropped, and a redirect to the model's own
    address (Starlette's trailing-slash 307) made relative, so the internal address never leaks."""
    out = []
    for k, v in resp.headers.raw:
        name = k.lower()
        if name in _DROP_OUT:
            continue
        if name == b"location":
            v = relative_location(v, upstream.netloc)
        out.append((k, v))
    return out


_LOCAL_HOSTS = (b"localhost", b"127.", b"[::1]", b"0.0.0.0", b"[::]")


def relative_location(value: bytes, *own: bytes) -> bytes:
    """An absolute Location to one of `own` authorities (host[:port]) or to a local address, whatever
    its scheme (a forwarded "https" included), as a path: the client follows it to where it already
    is (the public hostname through the tunnel), and no internal address or port is shown."""
    scheme, sep, rest = value.partition(b"://")
    if not sep or not scheme.isalpha():
        return value  # relative already (or not a URL we understand: left as the server sent it)
    cut = min((i for i in (rest.find(b"/"), rest.find(b"?"), rest.find(b"#")) if i >= 0), default=len(rest))
    authority, tail = rest[:cut].lower(), rest[cut:]
    host = authority.rpartition(b"@")[2]
    if host in {o.lower() for o in own} or host.startswith(_LOCAL_HOSTS):
        return tail if tail.startswith(b"/") else b"/" + tail
    return value


def _event_end(data: bytes) -> int:
    """Length of the prefix of `data` that is whole SSE events (0: none yet)."""
    if data.endswith(_EVENT_ENDS):  # the usual case: a chunk of whole events
        return len(data)
    return max((i + len(sep) for sep in _EVENT_ENDS if (i := data.rfind(sep)) >= 0), default=0)


async def _disconnected(receive: Receive) -> None:
    """Returns when the client has gone (its request body was read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _watch_disconnect(receive: Receive, ex: _Exchange) -> None:
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            ex.abort("client")
            return


async def _send_json(send: Send, status: int, body: dict[str, Any], retry_after: int | None = None) -> None:
    content = encode(body)
    try:
        await send({"type": "http.response.start", "status": status, "headers": headers(content, retry_after)})
        await send({"type": "http.response.body", "body": content})
    except (OSError, RuntimeError):  # the client is gone, or a response had already started
        pass


def _presented_key(raw: dict[bytes, bytes]) -> str | None:
    auth = raw.get(b"authorization")
    if auth is not None:
        scheme, _, token = auth.decode("latin-1").strip().partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        return None
    key = raw.get(b"x-api-key")
    return key.decode("latin-1").strip() or None if key is not None else None


def _safe(path: str) -> bool:
    """/v1 (or /services/NAME/) and plain segments below it: no dot segments, empty segments or
    encoded oddities."""
    segments = path[1:].split("/")
    if segments[-1] == "" and len(segments) > 1:
        segments.pop()  # one trailing slash is fine
    first = segments[0] == "v1" or (segments[0] == "services" and len(segments) >= 2)
    return first and all(_SEGMENT.fullmatch(s) and s not in (".", "..") for s in segments)


def _below(path: str) -> str:
    """The path the upstream gets: a service's own, below /services/NAME."""
    if path.startswith("/services/"):
        return "/" + path.removeprefix("/services/").partition("/")[2]
    return path


def _check_body(
    method: str, raw: dict[bytes, bytes], body: bytes
) -> tuple[tuple[int, str, str] | None, dict[str, Any] | None]:
    """(why it is refused, or None; the JSON object it holds, or None)."""
    if not body or method not in ("POST", "PUT", "PATCH"):
        return None, None
    ctype = raw.get(b"content-type", b"").decode("latin-1").split(";", 1)[0].strip().lower()
    if ctype not in _BODY_TYPES:
        shown = _printable(ctype) or "none"
        return (415, "unsupported_media_type", f"Content-Type {shown} is not accepted: send application/json"), None
    if ctype != "application/json":
        return None, None
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        return (400, "invalid_json", f"request body is not valid JSON: {e}"), None
    except RecursionError:
        return (400, "invalid_json", "request body is nested too deeply"), None
    if not isinstance(doc, dict):
        return (400, "invalid_json", "request body must be a JSON object"), None
    return None, doc


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in text)[:200]
