"""DICOMweb: STOW-RS (a PACS pushes studies), WADO-RS of stored instances and reports, study status."""

from __future__ import annotations

import datetime as _dt
import logging
import uuid
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from sqlalchemy import func, select
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from medvision.dicom_io import ReadLimits
from medvision.serving.auth import Caller, audit, require
from medvision.serving.stow import receive_parts, response_body, store_parts
from medvision.serving.tables import Instance, Study

router = APIRouter(tags=["dicomweb"])
log = logging.getLogger("medvision.serving")
DICOM_JSON = "application/dicom+json"


async def _stow(request: Request, caller: Caller, study_uid: str | None) -> JSONResponse:
    state = request.app.state
    settings = state.settings
    parts = await receive_parts(request, Path(settings.data_dir) / "incoming", settings.max_upload_bytes)
    outcomes = await run_in_threadpool(store_parts, parts, state.db, Path(settings.data_dir) / "instances",
                                       caller.key_id, study_uid, ReadLimits(max_pixels=settings.max_pixels),
                                       settings.study_stable_seconds)
    if state.worker is not None:
        state.worker.wake.set()
    status, body = response_body(outcomes, str(request.base_url).rstrip("/"))
    stored = sum(o.failure is None for o in outcomes)
    for o in outcomes:
        await run_in_threadpool(audit, state.db, request, "stow", 200 if o.failure is None else 409,
                                o.sop_instance_uid, caller.key_id, **({"failure": o.failure} if o.failure else {}))
    log.info("request %s STOW-RS: %d stored (%d already), %d refused", request.state.request_id, stored,
             sum(o.already_stored for o in outcomes), len(outcomes) - stored)
    return JSONResponse(body, status_code=status, media_type=DICOM_JSON)


_STOW_DOC = dict(
    summary="STOW-RS: store DICOM instances (a PACS pushes a study); they are scored in the background",
    description="Body: `multipart/related; type=\"application/dicom\"` (Content-Length or chunked). Response: the "
    "PS3.18 store response in DICOM JSON: 200 all stored, 202 some refused (Failed SOP Sequence with a Failure "
    "Reason each), 409 none stored. Re-sending an instance is harmless: it is stored and scored once.",
    responses={200: {"description": "all stored"}, 202: {"description": "some refused"},
               409: {"description": "none stored"}, 400: {"description": "malformed or truncated body"},
               401: {"description": "no valid API key"}, 413: {"description": "too large"},
               415: {"description": "not multipart/related application/dicom"}},
)


@router.post("/dicomweb/studies", **_STOW_DOC)
async def stow(request: Request, caller: Caller = require("score")) -> JSONResponse:
    return await _stow(request, caller, None)


@router.post("/dicomweb/studies/{study_uid}", **_STOW_DOC)
async def stow_study(study_uid: str, request: Request, caller: Caller = require("score")) -> JSONResponse:
    return await _stow(request, caller, study_uid)


class StudyStatus(BaseModel):
    study_instance_uid: str
    status: str
    instances: dict[str, int]
    report_series_instance_uid: str
    report_sop_instance_uid: str
    pushed_to_pacs: _dt.datetime | None
    push_error: str


def _visible_study(db, study_uid: str, caller: Caller) -> Study | None:
    study = db.scalar(select(Study).where(Study.study_instance_uid == study_uid))
    return study if study is not None and caller.sees(study.key_id) else None


def _status(sessions, study_uid: str, caller: Caller) -> StudyStatus | None:
    with sessions() as db:
        study = _visible_study(db, study_uid, caller)
        if study is None:
            return None
        counts = dict(db.execute(select(Instance.status, func.count()).where(Instance.study_instance_uid == study_uid)
                                 .group_by(Instance.status)).all())
    # "scored" only once every received instance is through: more may have arrived after the last job
    status = "received" if counts.get("received") else study.status
    return StudyStatus(study_instance_uid=study_uid, status=status, instances=counts,
                       report_series_instance_uid=study.report_series_instance_uid,
                       report_sop_instance_uid=study.report_sop_instance_uid, pushed_to_pacs=study.pushed_at,
                       push_error=study.push_error)


@router.get("/v1/studies/{study_uid}", response_model=StudyStatus, tags=["results"],
            summary="Where a received study stands: instances received / scored / refused, its report")
async def study_status(study_uid: str, request: Request, caller: Caller = require("score", "review")) -> StudyStatus:
    status = await run_in_threadpool(_status, request.app.state.db, study_uid, caller)
    await run_in_threadpool(audit, request.app.state.db, request, "read_status", 200 if status else 404, study_uid,
                            caller.key_id)
    if status is None:
        raise HTTPException(404, "no such study visible to this key")
    return status


def _find_file(sessions, study_uid: str, series_uid: str, sop_uid: str, caller: Caller) -> Path | None:
    with sessions() as db:
        study = _visible_study(db, study_uid, caller)
        if study is None:
            return None
        if (study.report_sop_instance_uid, study.report_series_instance_uid) == (sop_uid, series_uid):
            return Path(study.report_path)
        path = db.scalar(select(Instance.path).where(Instance.study_instance_uid == study_uid,
                                                     Instance.series_instance_uid == series_uid,
                                                     Instance.sop_instance_uid == sop_uid))
        return Path(path) if path else None


@router.get("/dicomweb/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}",
            summary="WADO-RS: a stored instance or the study's report, as multipart/related application/dicom")
async def retrieve_instance(study_uid: str, series_uid: str, sop_uid: str, request: Request,
                            caller: Caller = require("score", "review")) -> Response:
    path = await run_in_threadpool(_find_file, request.app.state.db, study_uid, series_uid, sop_uid, caller)
    found = path is not None and path.is_file()
    await run_in_threadpool(audit, request.app.state.db, request, "retrieve", 200 if found else 404, sop_uid,
                            caller.key_id)
    if not found:
        raise HTTPException(404, "no such instance visible to this key")
    boundary = uuid.uuid4().hex
    data = await run_in_threadpool(path.read_bytes)
    body = (f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + data
            + f"\r\n--{boundary}--\r\n".encode())
    return Response(body, media_type=f'multipart/related; type="application/dicom"; boundary={boundary}')


class PullRequest(BaseModel):
    study_instance_uid: str


class PullResponse(BaseModel):
    study_instance_uid: str
    stored: int
    already_stored: int
    refused: int


@router.post("/v1/pull", response_model=PullResponse, tags=["results"],
             summary="Fetch a study from the configured PACS (QIDO-RS + WADO-RS) and queue it for scoring",
             responses={404: {"description": "the PACS has no such study"}, 502: {"description": "PACS unreachable"}})
async def pull(body: PullRequest, request: Request, caller: Caller = require("score")) -> PullResponse:
    from medvision.serving.pull import pull_study

    state = request.app.state
    outcomes = await run_in_threadpool(pull_study, state.settings, state.db, body.study_instance_uid, caller.key_id)
    if state.worker is not None:
        state.worker.wake.set()
    stored = [o for o in outcomes if o.failure is None]
    await run_in_threadpool(audit, state.db, request, "pull", 200, body.study_instance_uid, caller.key_id,
                            stored=len(stored))
    return PullResponse(study_instance_uid=body.study_instance_uid, stored=sum(not o.already_stored for o in stored),
                        already_stored=sum(o.already_stored for o in stored), refused=len(outcomes) - len(stored))
