"""DICOMweb out: QIDO-RS search and WADO-RS retrieve (study, series, metadata) of what a site sent and of the reports
medvision made for it, as a PACS script using dicomweb-client expects them.

What a key sees is what ``visible_study`` allows: a ``score`` key its own site's studies, a ``review`` or ``admin``
key every site's (``?site=`` picks one where several sent the same Study UID). The search attributes come from the
stored files' headers (read without pixel data); responses are DICOM JSON built by pydicom. Every search and retrieval
is audited by UID, never by the matching values a caller typed.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pydicom
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from pydicom.dataset import Dataset
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from medvision.serving.audit import audit
from medvision.serving.auth import Caller, require
from medvision.serving.dependencies import State
from medvision.serving.errors import InvalidParameter
from medvision.serving.identifiers import request_site, request_uid
from medvision.serving.problems import STUDY_READ
from medvision.serving.routes.dicomweb import (
    DICOM_JSON,
    SITE_QUERY,
    DicomJSONResponse,
    MultipartDicomResponse,
    visible_study,
)
from medvision.serving.tables import Instance, Study

router = APIRouter(tags=["dicomweb"])
MAX_RESULTS = 1000


class _Object:
    """One stored object of a study: a received instance, or the study's report."""

    def __init__(self, path: Path, series: str, sop: str) -> None:
        self.path, self.series, self.sop = path, series, sop
        self._header: Dataset | None = None

    @property
    def header(self) -> Dataset:
        if self._header is None:
            self._header = pydicom.dcmread(self.path, stop_before_pixels=True)
        return self._header


def _objects(state, study: Study) -> list[_Object]:
    with state.db() as db:
        rows = db.execute(select(Instance.path, Instance.series_instance_uid, Instance.sop_instance_uid)
                          .where(Instance.site == study.site, Instance.study_instance_uid == study.study_instance_uid)
                          .order_by(Instance.series_instance_uid, Instance.id)).all()
    out = [_Object(state.data.inside(p), series, sop) for p, series, sop in rows]
    if study.report_path and study.report_sop_instance_uid:
        out.append(_Object(state.data.inside(study.report_path), study.report_series_instance_uid,
                           study.report_sop_instance_uid))
    return [o for o in out if o.path.is_file()]


def _url(request: Request, *parts: str) -> str:
    return str(request.base_url).rstrip("/") + "/dicomweb/studies/" + "/".join(parts)


def _copy(source: Dataset, target: Dataset, keywords: tuple[str, ...]) -> None:
    for keyword in keywords:
        if keyword in source:
            setattr(target, keyword, source.get(keyword))


STUDY_KEYS = ("StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "PatientID", "PatientName",
              "StudyID", "StudyDescription", "ReferringPhysicianName")
SERIES_KEYS = ("SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription")
INSTANCE_KEYS = ("SOPInstanceUID", "SOPClassUID", "InstanceNumber")


def _matches(ds: Dataset, filters: dict[str, str]) -> bool:
    """Single-value matching of the usual keys (exact, case-sensitive; '*' at the end matches a prefix)."""
    for keyword, wanted in filters.items():
        have = str(ds.get(keyword, "") or "")
        if wanted.endswith("*") and have.startswith(wanted[:-1]):
            continue
        if have != wanted:
            return False
    return True


def _filters(request: Request, allowed: tuple[str, ...]) -> dict[str, str]:
    """The query's matching keys (by keyword; unknown ones refused by name, values bounded)."""
    out = {}
    for key, value in request.query_params.items():
        if key in ("limit", "offset", "site", "includefield", "fuzzymatching"):
            continue
        if key not in allowed:
            raise InvalidParameter(f"unsupported matching key: use one of {', '.join(allowed)}")
        if len(value) > 64 or any(ord(c) < 32 for c in value):
            raise InvalidParameter("a matching value must be printable and at most 64 characters")
        out[key] = value
    return out


def _visible_studies(state, caller: Caller, site: str | None, study_uid: str | None) -> list[Study]:
    with state.db() as db:
        query = select(Study).order_by(Study.received_at.desc(), Study.id.desc())
        if not caller.reads_all:
            query = query.where(Study.site == caller.site)
        elif site is not None:
            query = query.where(Study.site == site)
        if study_uid is not None:
            query = query.where(Study.study_instance_uid == study_uid)
        return list(db.scalars(query.limit(MAX_RESULTS)))


def _search_studies(state, request: Request, caller: Caller, site: str | None, filters: dict[str, str],
                    limit: int, offset: int) -> list[dict]:
    wanted_uid = filters.get("StudyInstanceUID")
    uid = wanted_uid if wanted_uid and not wanted_uid.endswith("*") else None
    results = []
    for study in _visible_studies(state, caller, site, uid):
        objects = _objects(state, study)
        if not objects:
            continue
        first = next((o for o in objects if o.sop != study.report_sop_instance_uid), objects[0])
        if not _matches(first.header, filters):
            continue
        ds = Dataset()
        _copy(first.header, ds, STUDY_KEYS)
        ds.StudyInstanceUID = study.study_instance_uid
        ds.ModalitiesInStudy = sorted({str(o.header.get("Modality", "")) for o in objects} - {""})
        ds.NumberOfStudyRelatedSeries = len({o.series for o in objects})
        ds.NumberOfStudyRelatedInstances = len(objects)
        ds.RetrieveURL = _url(request, study.study_instance_uid)
        results.append(ds.to_json_dict())
    return results[offset:offset + limit]


def _one_study(state, caller: Caller, site: str | None, study_uid: str) -> Study:
    with state.db() as db:
        study = visible_study(db, study_uid, caller, site)
    if study is None:
        raise HTTPException(404, "no such study visible to this key")
    return study


def _search_series(state, request: Request, caller: Caller, site: str | None, study_uid: str,
                   filters: dict[str, str]) -> list[dict]:
    study = _one_study(state, caller, site, study_uid)
    by_series: dict[str, list[_Object]] = {}
    for o in _objects(state, study):
        by_series.setdefault(o.series, []).append(o)
    results = []
    for series, objects in by_series.items():
        if not _matches(objects[0].header, filters):
            continue
        ds = Dataset()
        _copy(objects[0].header, ds, SERIES_KEYS)
        ds.SeriesInstanceUID = series
        ds.NumberOfSeriesRelatedInstances = len(objects)
        ds.RetrieveURL = _url(request, study_uid, "series", series)
        results.append(ds.to_json_dict())
    return results


def _search_instances(state, request: Request, caller: Caller, site: str | None, study_uid: str, series_uid: str,
                      filters: dict[str, str]) -> list[dict]:
    study = _one_study(state, caller, site, study_uid)
    results = []
    for o in _objects(state, study):
        if o.series != series_uid or not _matches(o.header, filters):
            continue
        ds = Dataset()
        _copy(o.header, ds, INSTANCE_KEYS)
        ds.SOPInstanceUID = o.sop
        ds.RetrieveURL = _url(request, study_uid, "series", series_uid, "instances", o.sop)
        results.append(ds.to_json_dict())
    return results


def _limits(limit: int, offset: int) -> tuple[int, int]:
    if not (1 <= limit <= MAX_RESULTS and 0 <= offset <= 100_000):
        raise InvalidParameter(f"limit must be 1..{MAX_RESULTS} and offset 0..100000")
    return limit, offset


@router.get("/dicomweb/studies", response_class=DicomJSONResponse, summary="QIDO-RS: search the studies this key may read")
async def search_studies(request: Request, state: State, limit: int = Query(100), offset: int = Query(0),
                         site: str | None = SITE_QUERY, caller: Caller = require("score", "review")) -> JSONResponse:
    limit, offset = _limits(limit, offset)
    filters = _filters(request, ("StudyInstanceUID", "AccessionNumber", "StudyDate", "PatientID", "ModalitiesInStudy"))
    if "StudyInstanceUID" in filters and not filters["StudyInstanceUID"].endswith("*"):
        request_uid(filters["StudyInstanceUID"], "the Study Instance UID")
    found = await run_in_threadpool(_search_studies, state, request, caller, request_site(site), filters,
                                    limit, offset)
    await run_in_threadpool(audit, state.db, request, "search_studies", 200, "", caller.key_id,
                            results=len(found))
    return JSONResponse(found, media_type=DICOM_JSON)


@router.get("/dicomweb/studies/{study_uid}/series", responses=STUDY_READ, response_class=DicomJSONResponse, summary="QIDO-RS: the series of a study (with its report's)")
async def search_series(study_uid: str, request: Request, state: State, site: str | None = SITE_QUERY,
                        caller: Caller = require("score", "review")) -> JSONResponse:
    study_uid = request_uid(study_uid, "the Study Instance UID")
    filters = _filters(request, ("SeriesInstanceUID", "Modality", "SeriesNumber"))
    found = await run_in_threadpool(_search_series, state, request, caller, request_site(site), study_uid,
                                    filters)
    await run_in_threadpool(audit, state.db, request, "search_series", 200, study_uid, caller.key_id)
    return JSONResponse(found, media_type=DICOM_JSON)


@router.get("/dicomweb/studies/{study_uid}/series/{series_uid}/instances", responses=STUDY_READ, response_class=DicomJSONResponse,
            summary="QIDO-RS: the instances of a series")
async def search_instances(study_uid: str, series_uid: str, request: Request, state: State, site: str | None = SITE_QUERY,
                           caller: Caller = require("score", "review")) -> JSONResponse:
    study_uid = request_uid(study_uid, "the Study Instance UID")
    series_uid = request_uid(series_uid, "the Series Instance UID")
    filters = _filters(request, ("SOPInstanceUID", "SOPClassUID", "InstanceNumber"))
    found = await run_in_threadpool(_search_instances, state, request, caller, request_site(site),
                                    study_uid, series_uid, filters)
    await run_in_threadpool(audit, state.db, request, "search_instances", 200, study_uid, caller.key_id)
    return JSONResponse(found, media_type=DICOM_JSON)


def _selected(state, caller: Caller, site: str | None, study_uid: str, series_uid: str | None) -> list[_Object]:
    objects = [o for o in _objects(state, _one_study(state, caller, site, study_uid))
               if series_uid is None or o.series == series_uid]
    if not objects:
        raise HTTPException(404, "no such series visible to this key")
    return objects


def _multipart(objects: list[_Object]) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + o.path.read_bytes() + b"\r\n"
             for o in objects]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), boundary


def _metadata(objects: list[_Object], request: Request, study_uid: str) -> list[dict]:
    """Each object's attributes as DICOM JSON, pixel data left out (a BulkDataURI would point at the instance)."""
    out = []
    for o in objects:
        ds = o.header
        url = _url(request, study_uid, "series", o.series, "instances", o.sop)
        out.append(ds.to_json_dict(bulk_data_threshold=4096, bulk_data_element_handler=lambda _element, u=url: u))
    return out


async def _retrieve(request: Request, state, caller: Caller, site: str | None, study_uid: str,
                    series_uid: str | None, metadata: bool) -> Response:
    objects = await run_in_threadpool(_selected, state, caller, request_site(site), study_uid, series_uid)
    await run_in_threadpool(audit, state.db, request, "retrieve_metadata" if metadata else "retrieve", 200,
                            series_uid or study_uid, caller.key_id, instances=len(objects))
    if metadata:
        return JSONResponse(await run_in_threadpool(_metadata, objects, request, study_uid), media_type=DICOM_JSON)
    body, boundary = await run_in_threadpool(_multipart, objects)
    return Response(body, media_type=f'multipart/related; type="application/dicom"; boundary={boundary}')


@router.get("/dicomweb/studies/{study_uid}", responses=STUDY_READ, response_class=MultipartDicomResponse, summary="WADO-RS: every instance of a study and its report")
async def retrieve_study(study_uid: str, request: Request, state: State, site: str | None = SITE_QUERY,
                         caller: Caller = require("score", "review")) -> Response:
    return await _retrieve(request, state, caller, site, request_uid(study_uid, "the Study Instance UID"), None, False)


@router.get("/dicomweb/studies/{study_uid}/metadata", responses=STUDY_READ, response_class=DicomJSONResponse, summary="WADO-RS: the study's metadata (DICOM JSON)")
async def retrieve_study_metadata(study_uid: str, request: Request, state: State, site: str | None = SITE_QUERY,
                                  caller: Caller = require("score", "review")) -> Response:
    return await _retrieve(request, state, caller, site, request_uid(study_uid, "the Study Instance UID"), None, True)


@router.get("/dicomweb/studies/{study_uid}/series/{series_uid}", responses=STUDY_READ, response_class=MultipartDicomResponse, summary="WADO-RS: every instance of a series")
async def retrieve_series(study_uid: str, series_uid: str, request: Request, state: State, site: str | None = SITE_QUERY,
                          caller: Caller = require("score", "review")) -> Response:
    return await _retrieve(request, state, caller, site, request_uid(study_uid, "the Study Instance UID"),
                           request_uid(series_uid, "the Series Instance UID"), False)


@router.get("/dicomweb/studies/{study_uid}/series/{series_uid}/metadata", responses=STUDY_READ, response_class=DicomJSONResponse,
            summary="WADO-RS: the series' metadata (DICOM JSON)")
async def retrieve_series_metadata(study_uid: str, series_uid: str, request: Request, state: State, site: str | None = SITE_QUERY,
                                   caller: Caller = require("score", "review")) -> Response:
    return await _retrieve(request, state, caller, site, request_uid(study_uid, "the Study Instance UID"),
                           request_uid(series_uid, "the Series Instance UID"), True)
