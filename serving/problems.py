"""Every error the service answers, as RFC 9457 problem details (``application/problem+json``).

A problem's ``type`` is ``/problems/<code>``: the service answers that URL with the problem's title and what to do
about it, so a client (or a person with a browser) can look a code up where the answer came from. ``code`` (the
stable code clients switch on) and ``request_id`` (the audit log's and the service log's key for this request) are
extension members; ``errors`` lists the fields of a request that failed validation.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, Field

MEDIA_TYPE = "application/problem+json"
TYPE_PREFIX = "/problems/"

# code -> (title, what it means and what to do). One entry per stable code the service or its core library answers;
# tests/serving/test_problems.py checks that every error class's code is here and that docs/errors.md lists them.
CATALOGUE: dict[str, tuple[str, str]] = {
    # the request itself
    "invalid_request": ("Invalid request", "A parameter, the URL or the JSON body does not have the form the route "
                        "documents; 'errors' names the fields."),
    "malformed_request": ("Malformed request", "The body cannot be parsed as what its Content-Type says (e.g. a "
                          "multipart body without a boundary, a part without headers)."),
    "invalid_parameter": ("Invalid parameter", "A parameter cannot be what it names; 'detail' says which."),
    "invalid_uid": ("Invalid UID", "A DICOM UID in the URL, the query or the file is not a valid UID (digits and "
                    "dots, at most 64 characters, no leading zeros)."),
    "invalid_site": ("Invalid site name", "A site name is 1-64 letters, digits or '.', '_', '@', '-', starting "
                     "with a letter or digit."),
    "empty_body": ("Empty body", "The request carried no bytes: send the DICOM file as the body."),
    "missing_file": ("No file in the form", "A multipart upload must carry the DICOM as a field named 'file'."),
    "payload_too_large": ("Payload too large", "The body is over the service's limit "
                          "(MEDVISION_MAX_UPLOAD_BYTES for DICOM, a smaller one for forms and JSON)."),
    "too_many_parts": ("Too many parts", "A multipart body holds more parts than the service accepts in one request; "
                       "send the study in several requests."),
    "unsupported_media_type": ("Unsupported media type", "The Content-Type is not one the route accepts "
                               "(application/dicom, multipart/related; type=\"application/dicom\" or "
                               "multipart/form-data)."),
    "not_found": ("Not found", "No route answers this path."),
    "method_not_allowed": ("Method not allowed", "The route exists but not for this HTTP method."),
    "http_error": ("HTTP error", "The request was refused by the HTTP layer; 'detail' says why."),
    # who is asking
    "unauthenticated": ("Unauthenticated", "Send a valid, unrevoked API key as 'Authorization: Bearer <key>' or "
                        "'X-API-Key: <key>' (create one with 'medvision keys create')."),
    "forbidden": ("Forbidden", "The key (or the signed-in reader) lacks the scope or role this route needs."),
    "csrf_failed": ("Cross-site request refused", "A review-UI form was posted without the page's CSRF token "
                    "or from another origin; reload the page and try again."),
    # what the service holds
    "study_not_found": ("Study not found", "No study with this UID is visible to this key's site."),
    "image_not_stored": ("Image not stored", "No such image (or no heatmap for it) is stored on this service: only "
                         "studies received by STOW-RS or C-STORE are kept."),
    "ambiguous_study": ("Ambiguous study", "Several sites sent this Study UID: a reading key must name the site "
                        "('?site=')."),
    "outside_data_folder": ("Outside the data folder", "A stored path would leave the service's data folder; "
                            "nothing was written."),
    # the DICOM file
    "invalid_dicom": ("Invalid DICOM", "The file cannot be used as a DICOM image; 'detail' names the problem."),
    "not_dicom": ("Not DICOM", "The bytes are not a DICOM Part 10 file (no 'DICM' preamble) nor a readable "
                  "raw data set."),
    "not_an_image": ("Not an image", "The DICOM object carries no pixel data (e.g. a structured report)."),
    "corrupt_dicom": ("Corrupt DICOM", "The file is truncated or its elements or pixel data are inconsistent."),
    "decoder_crashed": ("Decoder crashed", "The pixel decoder ended its worker process on this file; the file is "
                        "refused and the service carries on."),
    "decode_too_slow": ("Decoding too slow", "Decoding the file took longer than the service allows "
                        "(MEDVISION_DECODE_TIMEOUT_S) even on its own: a pathological or hostile codestream; refused."),
    "unsupported_image": ("Unsupported image", "The image is of a kind the model does not score (e.g. colour, "
                          "multi-frame, too small or too large)."),
    "missing_codec": ("Missing codec", "The transfer syntax needs a decoder that is not installed; "
                      "docs/dicom-reading.md lists the plugins."),
    "preprocess_failed": ("Preprocessing failed", "The pixels could not be turned into the model's input "
                          "(e.g. a constant image or a LUT that does not fit)."),
    # capacity and dependencies
    "overloaded": ("Overloaded", "The scoring queue is full: retry after the seconds in Retry-After."),
    "timeout": ("Timed out", "The image was not scored within the service's time limit; retry later."),
    "shutting_down": ("Shutting down", "The service was stopping and did not decode the image; retry in a moment."),
    "pacs_not_configured": ("PACS not configured", "Pulling needs MEDVISION_PACS_URL to be set on the service."),
    "pacs_unavailable": ("PACS unavailable", "The PACS did not answer or refused the request; retry later."),
    "insufficient_storage": ("Insufficient storage", "The service's data folder filled up while the body was being "
                             "stored: nothing of this request was kept; retry once the site has freed space (the "
                             "service's operators are alerted by its log and metrics)."),
    "database_unavailable": ("Database unavailable", "The service's database did not answer (restarting, "
                             "unreachable or busy): nothing of this request was acknowledged; retry after the "
                             "seconds in Retry-After."),
    "internal_error": ("Internal error", "A fault in the service; quote the request_id when reporting it."),
    # errors of the core library that can reach a request
    "medvision_error": ("Refused", "The request was refused; 'detail' says why."),
    "invalid_config": ("Invalid configuration", "A configuration value is invalid; 'detail' says which."),
    "invalid_artifact": ("Invalid model artifact", "The model artifact cannot be used; 'detail' says why."),
    "missing_extra": ("Missing optional dependency", "A feature needs an optional package that is not installed."),
    "deid_failed": ("De-identification failed", "The file could not be de-identified; it is not stored."),
}


class Problem(BaseModel):
    """RFC 9457 problem details, with medvision's stable code and the request id."""

    type: str = Field(description="URI of the problem type: /problems/<code> (the service answers it)",
                      examples=["/problems/corrupt_dicom"])
    title: str = Field(description="short summary of the problem type", examples=["Corrupt DICOM"])
    status: int = Field(description="the HTTP status of this answer", examples=[422])
    detail: str = Field(description="what is wrong with this request, in words", examples=[
        "pixel data is truncated: 1,204,224 bytes expected, 65,536 present"])
    instance: str | None = Field(None, description="this occurrence: urn:medvision:request:<request id>")
    code: str = Field(description="stable machine-readable code (one per type)", examples=["corrupt_dicom"])
    request_id: str | None = Field(None, description="the X-Request-Id of this request (audit and service logs)")
    errors: list[dict[str, Any]] | None = Field(None, description="for invalid_request: the fields that failed "
                                                "validation (loc, msg, type)")


class ProblemType(BaseModel):
    type: str
    code: str
    title: str
    description: str


def title_of(code: str) -> str:
    return CATALOGUE[code][0] if code in CATALOGUE else code.replace("_", " ").capitalize()


def problem(code: str, detail: str, status: int, request_id: str | None, **extensions: Any) -> dict[str, Any]:
    """The body of an error answer."""
    body: dict[str, Any] = {"type": TYPE_PREFIX + code, "title": title_of(code), "status": status, "detail": detail,
                            "code": code}
    if request_id:
        body["instance"] = f"urn:medvision:request:{request_id}"
        body["request_id"] = request_id
    body.update({k: v for k, v in extensions.items() if v is not None})
    return body


def problem_bytes(code: str, detail: str, status: int, request_id: str | None) -> bytes:
    """For the ASGI middlewares that answer before any route: the same body, encoded."""
    return json.dumps(problem(code, detail, status, request_id)).encode()


def problem_type(code: str) -> ProblemType | None:
    if code not in CATALOGUE:
        return None
    title, description = CATALOGUE[code]
    return ProblemType(type=TYPE_PREFIX + code, code=code, title=title, description=description)


# The statuses a route can answer besides its own, and why; document_errors adds them to every operation.
COMMON = {400: "the URL holds control characters, or a parameter is malformed",
          500: "a fault in the service (quote the request_id)",
          503: "a dependency is unavailable (the database: database_unavailable): retry after Retry-After seconds"}
SECURED = {401: "no valid API key", 403: "the key lacks the scope this route needs"}
VALIDATED = {422: "a parameter or the body does not validate (invalid_request)"}
# Shared by routes: what reading one study can answer, and what scoring through the model's queue can.
STUDY_READ = {404: {"description": "no such study (or series, or instance) visible to this key"},
              409: {"description": "several sites sent this Study UID: a reading key adds ?site=NAME"}}
SCORING = {429: {"description": "the scoring queue is full (overloaded): retry after Retry-After seconds"},
           503: {"description": "not scored within the service's time limit (timeout)"}}


def document_errors(spec: dict[str, Any]) -> dict[str, Any]:
    """Every error response of every operation in the OpenAPI document: described, and with the Problem schema as
    ``application/problem+json`` (FastAPI's own HTTPValidationError replaced)."""
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    schemas["Problem"] = Problem.model_json_schema(ref_template="#/components/schemas/{model}")
    ref = {"$ref": "#/components/schemas/Problem"}
    for operations in spec.get("paths", {}).values():
        for op in operations.values():
            responses = op.setdefault("responses", {})
            extra = dict(COMMON)
            if op.get("security"):
                extra.update(SECURED)
            if op.get("parameters") or op.get("requestBody"):
                extra.update(VALIDATED)
            if op.get("requestBody"):
                extra[413] = "the body is over the service's limit for this route"
            for status, why in extra.items():
                responses.setdefault(str(status), {"description": why})
            for status, response in responses.items():
                if status.isdigit() and int(status) >= 400:
                    generated = response.get("description") in (None, "", "Validation Error")
                    if generated:
                        response["description"] = VALIDATED[422] if status == "422" else "refused"
                    if generated or "content" not in response:  # a route's own error body (e.g. /readyz) stays
                        response["content"] = {MEDIA_TYPE: {"schema": ref}}
    for unused in ("HTTPValidationError", "ValidationError"):
        schemas.pop(unused, None)
    return spec
