"""Stored results: a study's scored images (``score`` keys see their own; ``review`` / ``admin`` see all)."""

from __future__ import annotations

import datetime as _dt

from fastapi import APIRouter, Request
from pydantic import BaseModel
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from medvision.serving.auth import Caller, audit, require
from medvision.serving.tables import ScoredImage

router = APIRouter(prefix="/v1", tags=["results"])


class StoredResult(BaseModel):
    model_config = {"protected_namespaces": ()}

    sop_instance_uid: str
    study_instance_uid: str
    probability: float
    label: str
    threshold: float
    model_name: str
    artifact_sha256: str
    scored_at: _dt.datetime


class StudyResults(BaseModel):
    study_instance_uid: str
    images: list[StoredResult]
    max_probability: float | None


def _query(sessions, study_uid: str, caller: Caller) -> list[ScoredImage]:
    stmt = select(ScoredImage).where(ScoredImage.study_instance_uid == study_uid).order_by(ScoredImage.id)
    if not caller.sees(None):  # a score key: only the images it sent
        stmt = stmt.where(ScoredImage.key_id == caller.key_id)
    with sessions() as db:
        return list(db.scalars(stmt))


@router.get("/studies/{study_uid}/results", response_model=StudyResults, summary="Scores of a study's images",
            responses={401: {"description": "no valid API key"}, 404: {"description": "nothing scored for it"}})
async def study_results(study_uid: str, request: Request, caller: Caller = require("score", "review")) -> StudyResults:
    rows = await run_in_threadpool(_query, request.app.state.db, study_uid, caller)
    status = 200 if rows else 404
    await run_in_threadpool(audit, request.app.state.db, request, "read_results", status, study_uid, caller.key_id)
    if not rows:
        from starlette.exceptions import HTTPException

        raise HTTPException(404, "no scored images of this study are visible to this key")
    images = [StoredResult.model_validate(r, from_attributes=True) for r in rows]
    return StudyResults(study_instance_uid=study_uid, images=images, max_probability=max(i.probability for i in images))
