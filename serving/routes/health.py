"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from medvision.serving.dependencies import State

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: the model is loaded and has run once",
            responses={503: {"description": "the model is still loading", "content": {"application/json": {
                "schema": {"type": "object", "properties": {"status": {"const": "loading"}}}}}}})
async def readyz(state: State) -> JSONResponse:
    engine = getattr(state, "engine", None)
    if engine is None:
        return JSONResponse({"status": "loading"}, status_code=503)
    overlays = state.site_overlays.summary()
    # which site calibrations are active (their ids; which site each serves is for admin keys: /v1/admin/drift)
    return JSONResponse({"status": "ready", "model": engine.model_info().model_dump(),
                         "site_calibrations": sorted(o["id"] for o in overlays.values())})
