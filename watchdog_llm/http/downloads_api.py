"""The downloads endpoints of the admin API: start, follow (server-sent events), list, cancel.
Only translation: the rules live in `watchdog_llm.downloads`."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from watchdog_llm.downloads import REPO_PATTERN, REVISION_PATTERN, DownloadError, Downloads
from watchdog_llm.http.coord_api import error_doc, event_stream
from watchdog_llm.http.errors import api_body


class DownloadIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    repo: str = Field(pattern=REPO_PATTERN, max_length=193, description="ORG/NAME on the hub (HF_ENDPOINT)")
    revision: str | None = Field(
        None, pattern=REVISION_PATTERN, max_length=128, description="branch, tag or commit; default main"
    )
    host: str | None = Field(None, min_length=1, max_length=64, description="a host of the catalog; default here")


def _error(e: DownloadError) -> JSONResponse:
    return JSONResponse({**api_body(e.code, e.message, retryable=e.status == 409), **e.extra}, status_code=e.status)


def downloads_router(downloads: Downloads) -> APIRouter:
    r = APIRouter(prefix="/api")

    @r.post(
        "/downloads",
        status_code=202,
        summary="Download a model from the hub, here or on a host; follow it at /api/downloads/{id}/stream",
        responses={
            404: error_doc(404, "unknown host"),
            409: error_doc(409, "that repo is already downloading there"),
            422: error_doc(422, "a bad repo, revision or host"),
        },
    )
    async def start(body: DownloadIn) -> Any:
        try:
            rec = downloads.start(body.repo, body.revision, body.host)
        except DownloadError as e:
            return _error(e)
        return JSONResponse(rec.public(), status_code=202, headers={"Location": f"/api/downloads/{rec.id}"})

    @r.get("/downloads", summary="Downloads, oldest first (running and the last finished ones)")
    async def listing() -> dict[str, Any]:
        return {"downloads": [d.public() for d in downloads.list()]}

    @r.get("/downloads/{download_id}", responses={404: error_doc(404, "no such download")})
    async def one(download_id: str) -> Any:
        rec = downloads.get(download_id)
        if rec is None:
            return _error(DownloadError(404, "unknown_download", f"no download {download_id[:40]!r}"))
        return rec.public()

    @r.get(
        "/downloads/{download_id}/stream",
        summary="A download's progress as server-sent events, until it ends",
        response_class=StreamingResponse,
        responses={200: {"content": {"text/event-stream": {}}}, 404: error_doc(404, "no such download")},
    )
    async def stream(download_id: str) -> Any:
        if downloads.get(download_id) is None:
            return _error(DownloadError(404, "unknown_download", f"no download {download_id[:40]!r}"))

        return event_stream(downloads.stream(download_id))

    @r.post(
        "/downloads/{download_id}/cancel",
        status_code=202,
        summary="Cancel a download (the files it finished stay cached: a new download resumes from them)",
        responses={404: error_doc(404, "no such download"), 409: error_doc(409, "it has finished already")},
    )
    async def cancel(download_id: str) -> Any:
        try:
            rec = downloads.cancel(download_id)
        except DownloadError as e:
            return _error(e)
        return JSONResponse(rec.public(), status_code=202)

    return r
