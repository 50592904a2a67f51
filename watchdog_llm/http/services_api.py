"""The always-on services' endpoints of the admin API (mode C): list, start, stop, restart.
Only translation: the rules live in `watchdog_llm.services`."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from watchdog_llm.http.coord_api import error_doc
from watchdog_llm.http.errors import api_body
from watchdog_llm.services import ServiceError, Services


def services_router(services: Services) -> APIRouter:
    r = APIRouter(prefix="/api")

    @r.get("/services", summary="The always-on services (mode C): state, host, base URL, restarts")
    async def listing() -> dict[str, Any]:
        return {"services": services.public()}

    @r.post(
        "/services/{name}/{action}",
        status_code=202,
        summary="Start, stop or restart an always-on service",
        responses={404: error_doc(404, "no such service"), 409: error_doc(409, "it is running already (start)")},
    )
    async def act(name: str, action: Literal["start", "stop", "restart"]) -> Any:
        try:
            svc = getattr(services, action)(name)
        except ServiceError as e:
            return JSONResponse(api_body(e.code, e.message), status_code=e.status)
        return JSONResponse(svc.public(), status_code=202)

    return r
