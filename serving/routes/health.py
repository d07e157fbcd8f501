"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

from medvision.serving.dependencies import State

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> dict:
    return {"status": "ok"}


def _database_answers(sessions) -> bool:
    try:
        with sessions() as db:
            db.execute(text("SELECT 1"))
        return True
    except Exception:  # down, restarting, unreachable: not ready, whatever the driver says
        return False


@router.get("/readyz", summary="Readiness: the model is loaded and has run once, and the database answers",
            responses={503: {"description": "the model is still loading, or the database does not answer",
                             "content": {"application/json": {"schema": {"type": "object", "properties": {
                                 "status": {"enum": ["loading", "database_unavailable"]}}}}}}})
async def readyz(state: State) -> JSONResponse:
    engine = getattr(state, "engine", None)
    if engine is None:
        return JSONResponse({"status": "loading"}, status_code=503)
    if not await run_in_threadpool(_database_answers, state.db):
        return JSONResponse({"status": "database_unavailable"}, status_code=503, headers={"Retry-After": "5"})
    overlays = state.site_overlays.summary()
    # which site calibrations are active (their ids; which site each serves is for admin keys: /v1/admin/drift)
    return JSONResponse({"status": "ready", "model": engine.model_info().model_dump(),
                         "site_calibrations": sorted(o["id"] for o in overlays.values())})
