"""Map domain errors to HTTP: a stable error code, a message that names the problem, never a 500 for bad input."""

from __future__ import annotations

import logging
import os

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from medvision.errors import (
    CorruptDicomError,
    DicomError,
    EmptyInputError,
    MedvisionError,
    MissingCodecError,
    NotAnImageError,
    NotDicomError,
    PreprocessError,
    UnsupportedImageError,
)
from medvision.serving.batcher import Overloaded, TimedOut
from medvision.serving.decode_pool import DecodersStopped
from medvision.serving.problems import MEDIA_TYPE, problem
from medvision.serving.recorder import RecorderStopped

log = logging.getLogger("medvision.serving")
DATABASE_RETRY_AFTER = 5  # seconds a client is asked to wait while the database does not answer
PACS_RETRY_AFTER = 30  # ... and while the PACS does not


class PayloadTooLarge(MedvisionError):
    code = "payload_too_large"


class UnsupportedMediaType(MedvisionError):
    code = "unsupported_media_type"


class MissingFile(MedvisionError):
    code = "missing_file"


class MalformedRequest(MedvisionError):
    code = "malformed_request"


class TooManyParts(PayloadTooLarge):
    code = "too_many_parts"


class InvalidParameter(MalformedRequest):
    """A path, query or body parameter that cannot be what it names (a malformed UID, site name...)."""

    def __init__(self, message: str, code: str = "invalid_parameter") -> None:
        super().__init__(message)
        self.code = code


class AmbiguousStudy(MedvisionError):
    """A reading key asked for a Study UID that several sites sent: it must say which site's."""

    code = "ambiguous_study"


class InsufficientStorage(MedvisionError):
    """The data folder's disk filled up while a body was being stored: nothing of it was kept."""

    code = "insufficient_storage"


class PacsNotConfigured(MedvisionError):
    code = "pacs_not_configured"


class PacsUnavailable(MedvisionError):
    code = "pacs_unavailable"


class StudyNotFound(MedvisionError):
    code = "study_not_found"


class Unauthenticated(MedvisionError):
    code = "unauthenticated"


class Forbidden(MedvisionError):
    code = "forbidden"


class CsrfFailed(Forbidden):
    code = "csrf_failed"


class ImageNotStored(StudyNotFound):
    code = "image_not_stored"


STATUS = {
    EmptyInputError: 400,
    MissingFile: 400,
    MalformedRequest: 400,
    Unauthenticated: 401,
    Forbidden: 403,
    PayloadTooLarge: 413,
    Overloaded: 429,
    StudyNotFound: 404,
    AmbiguousStudy: 409,
    PacsNotConfigured: 409,  # the deployment's state, not a passing fault: retrying will not help
    PacsUnavailable: 503,
    InsufficientStorage: 507,
    TimedOut: 503,
    RecorderStopped: 503,
    DecodersStopped: 503,
    UnsupportedMediaType: 415,
    NotDicomError: 422,
    NotAnImageError: 422,
    CorruptDicomError: 422,
    UnsupportedImageError: 422,
    MissingCodecError: 422,
    PreprocessError: 422,
}


def error_response(request: Request, code: str, message: str, status: int, headers: dict | None = None,
                   **extensions) -> JSONResponse:
    """An RFC 9457 problem (``problems.py``) for this request."""
    body = problem(code, message, status, getattr(request.state, "request_id", None), **extensions)
    return JSONResponse(body, status_code=status, headers=headers, media_type=MEDIA_TYPE)


def status_for(exc: MedvisionError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 422


async def _audit_refusal(request: Request, status: int, code: str) -> None:
    """A refusal of a known caller (key or signed-in reader) that its route did not audit itself."""
    from medvision.serving.audit import audit, route_of

    caller, reader = getattr(request.state, "caller", None), getattr(request.state, "reader", None)
    if (caller is None and reader is None) or getattr(request.state, "audited", False):
        return
    try:
        await run_in_threadpool(audit, request.app.state.db, request, "refused", status, route_of(request),
                                key_id=caller.key_id if caller else None, user_id=reader.user_id if reader else None,
                                code=code)
    except (OperationalError, InterfaceError, PoolTimeout) as exc:  # the refusal stands; its audit line is lost
        log.warning("request %s: the refusal could not be audited: database unavailable (%s)",
                    getattr(request.state, "request_id", "-"), type(exc).__name__)


def _without_data_folder(request: Request, message: str) -> str:
    """``message`` with the data folder's own path left out: a decoder's words about a stored file name it in full
    (pydicom: "... found in file /srv/medvision/instances/ab/….dcm"), and where the service keeps its files is none of
    a caller's business; the file's place inside the folder is kept."""
    data = getattr(request.app.state, "data", None)
    return message.replace(f"{data.root}{os.sep}", "") if data is not None else message


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(MedvisionError)
    async def _domain(request: Request, exc: MedvisionError) -> JSONResponse:
        status = status_for(exc)
        if isinstance(exc, (DicomError, PreprocessError)) and getattr(request.app.state, "metrics", None):
            request.app.state.metrics.refused.labels(exc.code).inc()  # an image refused, as the job worker counts
        await _audit_refusal(request, status, exc.code)
        # The code only: messages may quote file content, and logs must stay free of identifiers.
        log.info("request %s refused: %s (%d)", getattr(request.state, "request_id", "-"), exc.code, status)
        headers = {"WWW-Authenticate": 'Bearer realm="medvision"'} if status == 401 else None
        if isinstance(exc, Overloaded):
            headers = {"Retry-After": str(exc.retry_after)}
        elif isinstance(exc, PacsUnavailable):
            headers = {"Retry-After": str(PACS_RETRY_AFTER)}
        return error_response(request, exc.code, _without_data_folder(request, exc.message), status, headers)

    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    @app.exception_handler(PoolTimeout)
    async def _database(request: Request, exc: Exception) -> JSONResponse:
        # The database is down, restarting or saturated: a dependency, not a fault of the service. The driver's
        # message may quote SQL or values: only its type is logged.
        cause = type(getattr(exc, "orig", None) or exc).__name__
        log.warning("request %s: database unavailable (%s)", getattr(request.state, "request_id", "-"), cause)
        if getattr(request.app.state, "metrics", None):
            request.app.state.metrics.dependency_errors.labels("database").inc()
        return error_response(request, "database_unavailable", "the database did not answer; nothing of this "
                              "request was acknowledged: retry later", 503, {"Retry-After": str(DATABASE_RETRY_AFTER)})

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}.get(exc.status_code, "http_error")
        await _audit_refusal(request, exc.status_code, code)
        return error_response(request, code, str(exc.detail), exc.status_code, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        await _audit_refusal(request, 422, "invalid_request")
        errors = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
                  for e in exc.errors()]
        where = "; ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in errors)
        return error_response(request, "invalid_request", f"the request does not validate: {where}", 422,
                              errors=errors)
