"""The coordination endpoints of the admin API: models, swaps (with live logs), the swap lock, the
schedule registry, discovery and the connectivity log. The HTTP layer only translates: every rule
lives in `watchdog_llm.coordination`.

Shapes follow the Spark controller's (`X-Swap-Lock-Token`, 423 when locked, `?force=true`); errors
are `{"error", "message", "consumer", "retryable"}` plus, where useful, the lock or the running swap.
"""

from __future__ import annotations

import asyncio
import functools
import json
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Header, Path, Query
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from watchdog_llm.coordination import health
from watchdog_llm.coordination.catalog import CatalogError
from watchdog_llm.coordination.core import CoordError, Coordinator
from watchdog_llm.coordination.lock import HOLDER_MAX, REASON_MAX, holder_problem, reason_problem
from watchdog_llm.coordination.lock import public as lock_public
from watchdog_llm.coordination.schedule import (
    ID_PATTERN,
    PRINTABLE_NOT_BLANK_PATTERN,
    PRINTABLE_PATTERN,
    ScheduleError,
    ScheduleIn,
)
from watchdog_llm.http.errors import api_body

LockToken = Annotated[str | None, Header(alias="X-Swap-Lock-Token", max_length=1024)]


class ApiError(BaseModel):
    model_config = ConfigDict(extra="allow")
    error: str
    message: str
    consumer: str | None = None
    retryable: bool = False


class SwapIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, max_length=200, description="catalog name or alias")


class ModelIn(BaseModel):
    """POST /api/models: a catalog entry's fields (docs/COORDINATION.md), checked as the catalog checks
    them; `like` copies another entry's fields first (its host, commands, args), then these apply."""

    model_config = ConfigDict(extra="allow")
    name: str = Field(min_length=1, max_length=64)
    model: str | None = Field(None, min_length=1, max_length=500, description="hub id or local path")
    like: str | None = Field(None, min_length=1, max_length=64, description="copy this entry's fields first")


class SettingsIn(BaseModel):
    """PATCH /api/models/{key}/settings: the settings given change, `null` clears one, the rest stay."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    max_model_len: int | None = Field(None, ge=16, le=10_000_000, strict=True, description="--max-model-len")
    gpu_memory_utilization: float | None = Field(None, gt=0, le=1, strict=True, description="--gpu-memory-utilization")
    prefix_caching: bool | None = Field(None, strict=True, description="--enable-prefix-caching or --no-...")
    kv_cache_dtype: str | None = Field(None, pattern=r"^[a-z0-9_]{1,32}$", description="--kv-cache-dtype")
    extra_args: list[str] | str | None = Field(
        None, max_length=200, description="more vllm serve arguments: a list, or one shell-quoted string"
    )

    @field_validator("max_model_len", mode="before")
    @classmethod
    def _whole(cls, v: Any) -> Any:
        """JSON has one number type: 32768.0 is the integer the schema asks for."""
        return int(v) if isinstance(v, float) and v.is_integer() else v


_TTL = "seconds; at most SWAP_LOCK_MAX_TTL"


class _LockBody(BaseModel):
    """POST /api/swap/lock, but `ttl_s`: its maximum is this daemon's SWAP_LOCK_MAX_TTL (coordination_router)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    holder: str = Field(
        min_length=1,
        max_length=HOLDER_MAX,
        description="printable, not blank",
        json_schema_extra={"pattern": PRINTABLE_NOT_BLANK_PATTERN},
    )
    reason: str = Field(
        "", max_length=REASON_MAX, description="printable", json_schema_extra={"pattern": PRINTABLE_PATTERN}
    )
    # strict: a number, not "60", nor true (a 1-second lock)
    ttl_s: float = Field(gt=0, strict=True, description=_TTL)

    @field_validator("holder")
    @classmethod
    def _holder(cls, v: str) -> str:
        if (problem := holder_problem(v)) is not None:
            raise ValueError(problem)
        return v

    @field_validator("reason")
    @classmethod
    def _reason(cls, v: str) -> str:
        if (problem := reason_problem(v)) is not None:
            raise ValueError(problem)
        return v


class HealthEventIn(health.HealthEventIn):
    """One report: could `source` reach `service`, and how long did it take (`ms`)."""

    # As the API reads it: JSON's own types (strict: no "yes" for true, no "5" for 5), and a schema that says
    # which names are accepted: the model's own validator wants str.isprintable() (unassigned and private-use
    # characters out too), which no short pattern spells; this one is that rule, character by character.
    model_config = ConfigDict(strict=True, json_schema_extra=lambda s: _isprintable_fields(s, "service", "source"))


def _isprintable_fields(schema: dict[str, Any], *names: str) -> None:
    for name in names:
        schema["properties"][name]["pattern"] = f"^[{_isprintable_class()}]*$"


@functools.cache
def _isprintable_class() -> str:
    """str.isprintable() as a regex character class: ranges of literal characters, which Python's, Rust's and
    ECMA-262's engines read alike. Made with the schema (about 0.2 s, once), not at import."""
    ranges: list[tuple[int, int]] = []
    for code in range(sys.maxunicode + 1):
        # No surrogates: not characters of a JSON string, and no regex class takes them.
        if chr(code).isprintable() and not 0xD800 <= code <= 0xDFFF:
            if ranges and ranges[-1][1] == code - 1:
                ranges[-1] = (ranges[-1][0], code)
            else:
                ranges.append((code, code))

    def lit(code: int) -> str:
        return "\\" + chr(code) if chr(code) in "\\[]^-" else chr(code)

    return "".join(lit(a) if a == b else f"{lit(a)}-{lit(b)}" for a, b in ranges)


class LockOut(BaseModel):
    locked: bool
    holder: str | None
    reason: str | None
    acquired_at: float | None
    expires_at: float | None


class LockTaken(LockOut):
    token: str | None = Field(description="the lock's token: only in the answer that created the lock")


class SwapOut(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: str
    model: str
    previous: str | None
    state: str
    detail: str
    created_at: float
    updated_at: float


def error_doc(status: int, description: str) -> dict[str, Any]:
    return {"model": ApiError, "description": description}


def event_stream(events: AsyncIterator[dict[str, Any]]) -> StreamingResponse:
    """Server-sent events of {"event", "data"} items, unbuffered (no proxy holds them back)."""

    async def encoded() -> AsyncIterator[bytes]:
        async for ev in events:
            yield f"event: {ev['event']}\ndata: {json.dumps(ev['data'])}\n\n".encode()

    return StreamingResponse(
        encoded(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


def error_response(e: CoordError | ScheduleError) -> JSONResponse:
    extra = e.extra if isinstance(e, CoordError) else {}
    retryable = e.retryable if isinstance(e, CoordError) else False
    body = {**api_body(e.code, e.message, retryable=retryable), **extra}
    headers = {"Retry-After": "5"} if e.status in (409, 503) else None
    return JSONResponse(body, status_code=e.status, headers=headers)


# Handlers that write state files (fsync) are plain functions: FastAPI runs them in its thread pool,
# so a slow disk never stalls the event loop that carries out yields. The stores are thread-safe.
# Swaps stay on the loop: the gate hands them to the daemon's policy, which lives there.
def coordination_router(
    coord: Coordinator,
    endpoints: Callable[[], dict[str, Any]],
    validate: Callable[[str], dict[str, Any]],
    reload: Callable[[], Awaitable[dict[str, Any]]] | None = None,
    add: Callable[[dict[str, Any]], Awaitable[dict[str, Any]]] | None = None,
) -> APIRouter:
    r = APIRouter(prefix="/api")

    class LockIn(_LockBody):
        # The schema's maximum is the one the lock applies: a ttl_s the schema allows is taken, and one above
        # it is a 422 like any other invalid field.
        ttl_s: float = Field(gt=0, le=coord.lock.max_ttl, strict=True, description=_TTL)

    @r.get("/models", summary="The model catalog, and which model is active")
    async def models() -> dict[str, Any]:
        active = coord.active()
        return {
            "active": active,
            "default": coord.catalog.default,
            "source": coord.catalog.source,
            "models": [
                {**e.public(), "active": e.name == active, "settings": (v := coord.settings(e.name))["settings"],
                 "effective_args": v["args"]}
                for e in coord.catalog.entries
            ],
        }  # fmt: skip

    @r.get(
        "/models/{key}/settings",
        summary="A model's settings that persist, and the args its next start gets",
        responses={404: error_doc(404, "unknown model")},
    )
    def model_settings(key: str) -> Any:
        try:
            return coord.settings(key)
        except CoordError as e:
            return error_response(e)

    @r.patch(
        "/models/{key}/settings",
        summary="Change a model's settings (null clears one); they apply at its next start",
        responses={
            404: error_doc(404, "unknown model"),
            422: error_doc(422, "a setting is invalid: `field` names it"),
            503: error_doc(503, "the overrides file cannot be written; nothing changed"),
        },
    )
    def model_tune(key: str, body: SettingsIn) -> Any:
        patch = {k: getattr(body, k) for k in body.model_fields_set}
        try:
            return coord.tune(key, patch)
        except CoordError as e:
            return error_response(e)

    @r.post(
        "/models/{key}/settings/reset",
        summary="Clear a model's settings: its next start uses the catalog's args alone",
        responses={404: error_doc(404, "unknown model"), 503: error_doc(503, "the overrides file cannot be written")},
    )
    def model_untune(key: str) -> Any:
        try:
            return coord.tune(key, {k: None for k in SettingsIn.model_fields})
        except CoordError as e:
            return error_response(e)

    if add is not None:
        add_model = add

        @r.post(
            "/models",
            status_code=201,
            summary="Add a model to the catalog file (atomically, the old one kept as .bak), then reload",
            responses={
                409: error_doc(409, "the catalog is not a YAML file, or the name is taken"),
                422: error_doc(422, "the new entry (or the file with it) has problems: all of them in `problems`"),
            },
        )
        async def model_add(body: ModelIn) -> Any:
            try:
                return JSONResponse(await add_model(body.model_dump(exclude_none=True)), status_code=201)
            except CoordError as e:
                return error_response(e)
            except CatalogError as e:
                problems = list(e.problems) or [str(e)]
                body_ = {**api_body("invalid_catalog", problems[0]), "problems": problems}
                return JSONResponse(body_, status_code=422)

    if reload is not None:
        reload_catalog = reload

        @r.post(
            "/catalog/reload",
            summary="Read the catalog file again (the serving model keeps running); every problem, the old one kept",
            responses={422: error_doc(422, "the new catalog has problems: all of them in `problems`")},
        )
        async def catalog_reload() -> Any:
            try:
                return await reload_catalog()
            except CatalogError as e:
                problems = list(e.problems) or [str(e)]
                body = {**api_body("invalid_catalog", problems[0]), "problems": problems}
                return JSONResponse(body, status_code=422)

    # The lock's routes come before /swap/{swap_id}: "lock" is not a swap id.
    @r.get("/swap/lock", response_model=LockOut, summary="The swap lock (never its token)")
    def lock_status() -> dict[str, Any]:
        return lock_public(coord.lock.status())

    def lock_acquire(body: _LockBody, token: LockToken = None) -> Any:
        try:
            new, info = coord.acquire_lock(body.holder, body.ttl_s, body.reason, token)
        except CoordError as e:
            return error_response(e)
        return {**info.to_public(), "token": new}

    # FastAPI reads the body's model from the annotation, resolving a postponed one in the module's globals,
    # where this daemon's LockIn (made above) is not: hand it the class itself.
    lock_acquire.__annotations__["body"] = LockIn
    r.post(
        "/swap/lock",
        response_model=LockTaken,
        summary="Take the swap lock (token returned once), or extend it with X-Swap-Lock-Token",
        responses={423: error_doc(423, "held by someone else")},
    )(lock_acquire)

    @r.delete(
        "/swap/lock",
        response_model=LockOut,
        summary="Release the swap lock with its token; ?force=true releases anyone's (logged, notified)",
        responses={423: error_doc(423, "held by someone else and no force")},
    )
    def lock_release(token: LockToken = None, force: bool = False) -> Any:
        try:
            coord.release_lock(token, force=force)
        except CoordError as e:
            return error_response(e)
        return lock_public(coord.lock.status())

    @r.post(
        "/swap",
        status_code=202,
        response_model=SwapOut,
        summary="Swap the model; follow it at /api/swap/{id} or /api/swap/{id}/stream",
        responses={
            404: error_doc(404, "unknown model"),
            409: error_doc(409, "another swap is under way, or the model needs more GPUs than can be ours"),
            423: error_doc(423, "the swap lock is held by someone else"),
            503: error_doc(503, "the daemon is stopping"),
        },
    )
    async def swap(body: SwapIn, token: LockToken = None) -> Any:
        try:
            rec = coord.swap(body.model, token)
        except CoordError as e:
            return error_response(e)
        # The owner decides at once (deferred while yielded, stopping when serving) and posts that
        # stage with call_soon: one turn of the loop lets it land, so the answer says what happens
        # next rather than the "queued" the record was created with.
        await asyncio.sleep(0)
        rec = coord.swaps.get(rec.id) or rec
        return JSONResponse(rec.public(), status_code=202, headers={"Location": f"/api/swap/{rec.id}"})

    @r.get("/swap/{swap_id}", response_model=SwapOut, responses={404: error_doc(404, "no such swap")})
    async def swap_status(swap_id: str) -> Any:
        rec = coord.swaps.get(swap_id)
        if rec is None:
            return error_response(CoordError(404, "unknown_swap", f"no swap {swap_id[:80]!r}"))
        return rec.public()

    @r.get(
        "/swap/{swap_id}/stream",
        summary="Server-sent events: the model's log lines and the swap's states until ready or failed",
        response_class=StreamingResponse,
        responses={200: {"content": {"text/event-stream": {}}}, 404: error_doc(404, "no such swap")},
    )
    async def swap_stream(swap_id: str) -> Any:
        if coord.swaps.get(swap_id) is None:
            return error_response(CoordError(404, "unknown_swap", f"no swap {swap_id[:80]!r}"))

        return event_stream(coord.swaps.stream(swap_id))

    @r.post(
        "/swap/{key}/validate",
        summary="Dry run: the command, the binary, a local model path, the GPU count",
        responses={404: error_doc(404, "unknown model")},
    )
    async def swap_validate(key: str) -> Any:
        try:
            coord.resolve(key)
        except CoordError as e:
            return error_response(e)
        return validate(key)

    @r.get("/schedule", summary="What external schedulers said they will do (never run by the daemon)")
    def schedule_list() -> dict[str, Any]:
        return {"entries": [e.model_dump(mode="json") for e in coord.schedule.list()]}

    @r.post(
        "/schedule",
        summary="Register or replace an entry (by id)",
        responses={200: {"description": "replaced"}, 201: {"description": "created"}, 409: error_doc(409, "full")},
    )
    def schedule_put(body: ScheduleIn) -> Any:
        try:
            entry, created = coord.schedule.put(body)
        except ScheduleError as e:
            return error_response(e)
        return JSONResponse(entry.model_dump(mode="json"), status_code=201 if created else 200)

    @r.delete("/schedule/{entry_id}", responses={404: error_doc(404, "no such entry")})
    def schedule_delete(entry_id: Annotated[str, Path(pattern=ID_PATTERN)]) -> Any:
        if not coord.schedule.delete(entry_id):
            return error_response(CoordError(404, "unknown_entry", f"no schedule entry {entry_id[:80]!r}"))
        return {"deleted": entry_id}

    @r.get("/endpoints", summary="Where the model lives and whether it is ready")
    async def get_endpoints() -> dict[str, Any]:
        return endpoints()

    @r.post("/health-event", status_code=201, summary="Report whether a service was reachable")
    def health_event(body: HealthEventIn) -> dict[str, Any]:
        return coord.health.append(body).model_dump(mode="json")

    @r.get("/connectivity", summary="The connectivity log, newest last")
    def connectivity(
        limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
        service: Annotated[str | None, Query(max_length=64)] = None,
    ) -> dict[str, Any]:
        return {"events": [e.model_dump(mode="json") for e in coord.health.list(limit, service)]}

    return r
