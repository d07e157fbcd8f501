"""DICOMweb: STOW-RS (a PACS pushes studies), WADO-RS of stored instances and reports, study status."""

from __future__ import annotations

import datetime as _dt
import logging
import uuid
from pathlib import Path

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from sqlalchemy import func, select
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from medvision.dicom_io import ReadLimits
from medvision.serving.audit import audit
from medvision.serving.auth import Caller, require
from medvision.serving.dependencies import Data, Database, State
from medvision.serving.errors import AmbiguousStudy
from medvision.serving.identifiers import request_site, request_uid
from medvision.serving.problems import STUDY_READ
from medvision.serving.storage import DataFolder
from medvision.serving.stow import receive_parts, response_body, store_parts
from medvision.serving.tables import Instance, InstanceState, Study, StudyState

router = APIRouter(tags=["dicomweb"])
log = logging.getLogger("medvision.serving")
DICOM_JSON = "application/dicom+json"


class DicomJSONResponse(JSONResponse):
    """DICOM JSON (PS3.18 F): how the OpenAPI document names what QIDO-RS, WADO-RS metadata and STOW-RS answer."""

    media_type = DICOM_JSON


class MultipartDicomResponse(Response):
    """WADO-RS instances: ``multipart/related; type="application/dicom"``, one part per instance."""

    media_type = 'multipart/related; type="application/dicom"'


async def _stow(request: Request, state, caller: Caller, study_uid: str | None) -> JSONResponse:
    settings = state.settings
    if study_uid is not None:
        study_uid = request_uid(study_uid, "the Study Instance UID in the URL")
    parts = await receive_parts(request, state.data, settings.max_upload_bytes, settings.max_stow_parts)
    outcomes = await run_in_threadpool(store_parts, parts, state.db, state.data, caller.owner, study_uid,
                                       ReadLimits(max_pixels=settings.max_pixels), settings.study_stable_seconds)
    if state.worker is not None:
        state.worker.wake.set()
    status, body = response_body(outcomes, str(request.base_url).rstrip("/"))
    stored = sum(o.failure is None for o in outcomes)
    already = sum(o.already_stored for o in outcomes)
    studies = sorted({o.study_instance_uid for o in outcomes if o.failure is None})
    # one audit row for the request: the instances it stored are in the database, the refusals by reason
    await run_in_threadpool(audit, state.db, request, "stow", status, studies[0] if len(studies) == 1 else "",
                            caller.key_id, stored=stored, already_stored=already, refused=len(outcomes) - stored,
                            studies=len(studies), failures=sorted({o.reason for o in outcomes if o.failure}))
    log.info("request %s STOW-RS: %d stored (%d already), %d refused", request.state.request_id, stored, already,
             len(outcomes) - stored)
    return JSONResponse(body, status_code=status, media_type=DICOM_JSON)


_STOW_DOC = dict(
    summary="STOW-RS: store DICOM instances (a PACS pushes a study); they are scored in the background",
    description="Body: `multipart/related; type=\"application/dicom\"` (Content-Length or chunked). Response: the "
    "PS3.18 store response in DICOM JSON: 200 all stored, 202 some refused (Failed SOP Sequence with a Failure "
    "Reason each), 409 none stored. Re-sending an instance is harmless: it is stored and scored once. What a "
    "key sends belongs to its site: the same UIDs from another site are that site's own records.",
    responses={200: {"description": "all stored"}, 202: {"description": "some refused"},
               409: {"description": "none stored"}, 400: {"description": "malformed or truncated body, bad UID"},
               401: {"description": "no valid API key"}, 413: {"description": "too large or too many parts"},
               415: {"description": "not multipart/related application/dicom"},
               507: {"description": "the data folder's disk filled up while storing: nothing kept "
                                    "(insufficient_storage)"}},
)


@router.post("/dicomweb/studies", response_class=DicomJSONResponse, **_STOW_DOC)
async def stow(request: Request, state: State, caller: Caller = require("score")) -> JSONResponse:
    return await _stow(request, state, caller, None)


@router.post("/dicomweb/studies/{study_uid}", response_class=DicomJSONResponse, **_STOW_DOC)
async def stow_study(study_uid: str, request: Request, state: State,
                     caller: Caller = require("score")) -> JSONResponse:
    return await _stow(request, state, caller, study_uid)


class StudyStatus(BaseModel):
    study_instance_uid: str
    site: str
    status: str
    instances: dict[str, int]
    report_series_instance_uid: str
    report_sop_instance_uid: str
    pushed_to_pacs: _dt.datetime | None = Field(description="when the report was stored into the PACS by STOW-RS")
    push_error: str = Field(description="the last STOW-RS attempt's failure (empty: none, or it went through)")
    push_attempts: int = 0
    push_next_attempt: _dt.datetime | None = Field(None, description="when the next STOW-RS attempt is due (None: "
                                                   "none due); failures are retried with back-off until it arrives")
    sent_by_c_store: _dt.datetime | None = None
    c_store_error: str = ""
    c_store_attempts: int = 0
    c_store_next_attempt: _dt.datetime | None = None


SITE_QUERY = Query(None, description="review / admin keys: which site's study, when several sites sent this Study "
                   "UID (score keys always read their own site's)")


def visible_study(db, study_uid: str, caller: Caller, site: str | None) -> Study | None:
    """The study of this UID that ``caller`` may read: its own site's for a score key; for a reading key the one of
    ``site``, or the only one (several sites sent it and no ``site`` given: ``AmbiguousStudy``)."""
    query = select(Study).where(Study.study_instance_uid == study_uid)
    if not caller.reads_all:
        if site is not None and site != caller.site:
            return None
        query = query.where(Study.site == caller.site)
    elif site is not None:
        query = query.where(Study.site == site)
    found = list(db.scalars(query.order_by(Study.id).limit(2)))
    if len(found) > 1:
        raise AmbiguousStudy("several sites sent a study with this UID: add ?site=NAME to say whose")
    return found[0] if found else None


def _status(sessions, study_uid: str, caller: Caller, site: str | None) -> StudyStatus | None:
    with sessions() as db:
        study = visible_study(db, study_uid, caller, site)
        if study is None:
            return None
        counts = dict(db.execute(select(Instance.status, func.count())
                                 .where(Instance.site == study.site, Instance.study_instance_uid == study_uid)
                                 .group_by(Instance.status)).all())
    # "scored" only once every received instance is through: more may have arrived after the last job
    status = StudyState.RECEIVED if counts.get(InstanceState.RECEIVED) else study.status
    return StudyStatus(study_instance_uid=study_uid, site=study.site, status=status, instances=counts,
                       report_series_instance_uid=study.report_series_instance_uid,
                       report_sop_instance_uid=study.report_sop_instance_uid, pushed_to_pacs=study.pushed_at,
                       push_error=study.push_error, push_attempts=study.push_attempts,
                       push_next_attempt=study.push_next_at, sent_by_c_store=study.dimse_sent_at,
                       c_store_error=study.dimse_error, c_store_attempts=study.dimse_attempts,
                       c_store_next_attempt=study.dimse_next_at)


@router.get("/v1/studies/{study_uid}", response_model=StudyStatus, tags=["results"],
            summary="Where a received study stands: instances received / scored / refused, its report",
            responses={400: {"description": "malformed UID"}, 404: {"description": "no such study visible to the key"},
                       409: {"description": "several sites sent this UID: give ?site="}})
async def study_status(study_uid: str, request: Request, db: Database, site: str | None = SITE_QUERY,
                       caller: Caller = require("score", "review")) -> StudyStatus:
    study_uid, site = request_uid(study_uid, "the Study Instance UID"), request_site(site)
    status = await run_in_threadpool(_status, db, study_uid, caller, site)
    await run_in_threadpool(audit, db, request, "read_status", 200 if status else 404, study_uid,
                            caller.key_id)
    if status is None:
        raise HTTPException(404, "no such study visible to this key")
    return status


def _find_file(sessions, data: DataFolder, study_uid: str, series_uid: str, sop_uid: str, caller: Caller,
               site: str | None) -> Path | None:
    with sessions() as db:
        study = visible_study(db, study_uid, caller, site)
        if study is None:
            return None
        if (study.report_sop_instance_uid, study.report_series_instance_uid) == (sop_uid, series_uid):
            path = study.report_path
        else:
            path = db.scalar(select(Instance.path).where(
                Instance.site == study.site, Instance.study_instance_uid == study_uid,
                Instance.series_instance_uid == series_uid, Instance.sop_instance_uid == sop_uid))
    return data.inside(path) if path else None


@router.get("/dicomweb/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}", responses=STUDY_READ,
            response_class=MultipartDicomResponse,
            summary="WADO-RS: a stored instance or the study's report, as multipart/related application/dicom")
async def retrieve_instance(study_uid: str, series_uid: str, sop_uid: str, request: Request, db: Database,
                            data: Data, site: str | None = SITE_QUERY, caller: Caller = require("score", "review")) -> Response:
    study_uid = request_uid(study_uid, "the Study Instance UID")
    series_uid = request_uid(series_uid, "the Series Instance UID")
    sop_uid, site = request_uid(sop_uid, "the SOP Instance UID"), request_site(site)
    path = await run_in_threadpool(_find_file, db, data, study_uid, series_uid, sop_uid, caller, site)
    found = path is not None and path.is_file()
    await run_in_threadpool(audit, db, request, "retrieve", 200 if found else 404, sop_uid,
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
             description="Needs the `pull` scope: pulling reads any study the PACS holds. The study is stored for "
             "the key's site.",
             responses={400: {"description": "malformed UID"}, 403: {"description": "the key lacks the pull scope"},
                        404: {"description": "the PACS has no such study"},
                        409: {"description": "this service has no PACS configured (pacs_not_configured)"},
                        503: {"description": "the PACS did not answer (pacs_unavailable): retry after Retry-After"}})
async def pull(body: PullRequest, request: Request, state: State, caller: Caller = require("pull")) -> PullResponse:
    from medvision.serving.pull import pull_study

    study_uid = request_uid(body.study_instance_uid, "study_instance_uid")
    outcomes = await run_in_threadpool(pull_study, state.settings, state.db, state.data, study_uid, caller.owner)
    if state.worker is not None:
        state.worker.wake.set()
    stored = [o for o in outcomes if o.failure is None]
    await run_in_threadpool(audit, state.db, request, "pull", 200, study_uid, caller.key_id,
                            stored=len(stored), refused=len(outcomes) - len(stored))
    return PullResponse(study_instance_uid=study_uid, stored=sum(not o.already_stored for o in stored),
                        already_stored=sum(o.already_stored for o in stored), refused=len(outcomes) - len(stored))
