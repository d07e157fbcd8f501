"""Stored results: a study's scored images (``score`` keys see their own site's; ``review`` / ``admin`` every site's,
one site at a time)."""

from __future__ import annotations

import datetime as _dt

from fastapi import APIRouter, Request
from pydantic import BaseModel
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from medvision.serving.audit import audit
from medvision.serving.auth import Caller, require
from medvision.serving.dependencies import Database
from medvision.serving.errors import AmbiguousStudy
from medvision.serving.identifiers import request_site, request_uid
from medvision.serving.routes.dicomweb import SITE_QUERY
from medvision.serving.tables import ScoredImage

router = APIRouter(prefix="/v1", tags=["results"])


class StoredResult(BaseModel):
    model_config = {"protected_namespaces": ()}

    site: str
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


def _query(sessions, study_uid: str, caller: Caller, site: str | None) -> list[ScoredImage]:
    stmt = select(ScoredImage).where(ScoredImage.study_instance_uid == study_uid).order_by(ScoredImage.id)
    if not caller.reads_all:  # a score key: only its own site's images
        if site is not None and site != caller.site:
            return []
        stmt = stmt.where(ScoredImage.site == caller.site)
    elif site is not None:
        stmt = stmt.where(ScoredImage.site == site)
    with sessions() as db:
        rows = list(db.scalars(stmt))
    if len({r.site for r in rows}) > 1:
        raise AmbiguousStudy("several sites sent a study with this UID: add ?site=NAME to say whose")
    return rows


@router.get("/studies/{study_uid}/results", response_model=StudyResults, summary="Scores of a study's images",
            responses={400: {"description": "malformed UID"}, 401: {"description": "no valid API key"},
                       404: {"description": "nothing scored for it"},
                       409: {"description": "several sites sent this UID: give ?site="}})
async def study_results(study_uid: str, request: Request, db: Database, site: str | None = SITE_QUERY,
                        caller: Caller = require("score", "review")) -> StudyResults:
    study_uid, site = request_uid(study_uid, "the Study Instance UID"), request_site(site)
    rows = await run_in_threadpool(_query, db, study_uid, caller, site)
    status = 200 if rows else 404
    await run_in_threadpool(audit, db, request, "read_results", status, study_uid, caller.key_id)
    if not rows:
        from starlette.exceptions import HTTPException

        raise HTTPException(404, "no scored images of this study are visible to this key")
    images = [StoredResult.model_validate(r, from_attributes=True) for r in rows]
    return StudyResults(study_instance_uid=study_uid, images=images, max_probability=max(i.probability for i in images))
