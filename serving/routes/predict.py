"""``POST /v1/predict``: one DICOM in (raw ``application/dicom`` body or multipart upload), one result out."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

import numpy as np
from fastapi import APIRouter, Request
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from medvision.dicom_io import DecodeElsewhere
from medvision.identifiers import check_uid
from medvision.serving.auth import Caller, require
from medvision.serving.decode_ahead import DecodeAhead
from medvision.serving.decode_pool import Received
from medvision.serving.dependencies import LoadedEngine, State
from medvision.serving.engine import ModelInfo
from medvision.serving.errors import MissingFile, PayloadTooLarge, UnsupportedMediaType
from medvision.serving.http_server import BODY_INTO
from medvision.serving.problems import SCORING
from medvision.serving.settings import Settings
from medvision.serving.storage import DataFolder
from medvision.serving.stow import form_boundary, receive_parts
from medvision.serving.tables import AuditEvent
from medvision.serving.usage import record_into, record_score

router = APIRouter(prefix="/v1", tags=["predict"])
FORM_PARTS = 16  # a form upload: the file and a few fields
log = logging.getLogger("medvision.serving")


class PredictResponse(BaseModel):
    sop_instance_uid: str | None = Field(description="SOP Instance UID of the scored image")
    study_instance_uid: str | None
    probability: float = Field(description="model probability of cancer, in [0, 1]")
    label: str = Field(description="label at the operating point (the artifact's, or the site calibration's)")
    threshold: float
    calibration: str = Field("model", description="what made probability and threshold: 'model' (the artifact's "
                             "validation calibration) or 'site calibration N' (an overlay fitted on this site's "
                             "outcomes; medvision recalibrate)")
    above_threshold: bool
    operating_point: str
    model: ModelInfo
    inference_ms: float
    decode: str = Field(description="how the image was decoded under the model's contract: 'full', or e.g. "
                        "'1/8 wavelet' (JPEG 2000 levels not decoded) / '1/8 lowpass' (the same low-pass band computed)")


async def _read_limited(request: Request, limit: int) -> bytes:
    """The raw body, counted as it streams in (chunked bodies have no Content-Length to trust)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit:,} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


SHARED_BODY_MIN = 1 << 20  # raw bodies this large go straight into a decoding worker's shared segment


async def _read_into(request: Request, received: Received, progress=None) -> None:
    """The raw body, straight into ``received`` (its size is the declared Content-Length, which the HTTP server
    holds the body to): written there by the HTTP protocol as it comes off the socket where the server offers it
    (``http_server.BODY_INTO``), else copied there chunk by chunk. ``progress(n)``: told each time the first ``n``
    bytes are in."""
    fill = request.scope.get("extensions", {}).get(BODY_INTO)
    if fill is not None:
        try:
            at = await fill(received.view(), progress)
        except ValueError:  # longer than its Content-Length (the HTTP parser does not let that happen)
            raise PayloadTooLarge("request body is longer than its Content-Length") from None
        await request.receive()  # the end of the body, as the middleware counting it expects to see it
    else:
        view, at = received.view(), 0
        async for chunk in request.stream():
            if at + len(chunk) > received.size:
                raise PayloadTooLarge("request body is longer than its Content-Length")
            view[at:at + len(chunk)] = chunk
            at += len(chunk)
            if progress is not None and chunk:
                progress(at)
    if at != received.size:
        raise MissingFile(f"request body ended after {at:,} of its {received.size:,} bytes")


@asynccontextmanager
async def dicom_body(request: Request, app, ahead=None):
    """The DICOM of a scoring request: a large raw body goes straight into one of the decoding workers' shared
    segments (a ``Received``: one copy on its way from the socket to the decoder, where reading it into memory and
    handing it over made two), or, where the service has no decoding workers, into an ``OwnBody`` (its ``view()`` is
    what is yielded); anything else, or when no segment is free, as ``read_dicom_upload`` gives it.
    ``ahead(view)``: called before a body is read into a segment's or an ``OwnBody``'s ``view``, may start a
    ``DecodeAhead`` on it (ended and waited for before the segment goes back)."""
    declared = request.headers.get("content-length", "")
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    large_raw = (ctype in RAW_TYPES and declared.isascii() and declared.isdigit()
                 and SHARED_BODY_MIN <= int(declared) <= app.settings.max_upload_bytes)
    if large_raw and app.decoder is not None:
        with app.decoder.segments.receiving(int(declared)) as received:
            if received is not None:
                early = ahead(received.view()) if ahead is not None else None
                try:
                    await _read_into(request, received, early.advanced if early is not None else None)
                    yield received
                finally:
                    if early is not None:
                        try:
                            await early.close()
                        except asyncio.CancelledError:
                            received.abandoned = received.abandoned or early.running  # it may still read the segment
                            raise
                        finally:
                            early = None
                return
    elif large_raw:
        # decoded by a thread of this process: straight into memory of its own, as into a segment (no chunk copied
        # by the app, no joining them into one more copy of the body)
        try:
            body = OwnBody(int(declared))
        except MemoryError:  # no room to set the whole body aside now (a strict overcommit policy): as it arrives
            body = None
        if body is not None:
            early = ahead(body.view()) if ahead is not None else None
            try:
                await _read_into(request, body, early.advanced if early is not None else None)
                yield body.view()
            finally:
                if early is not None:  # (cancelled meanwhile, its thread keeps the buffer alive while it reads)
                    await early.close()
            return
    yield await read_dicom_upload(request, app.settings, app.data)


class OwnBody:
    """A raw body of a declared length, read into the service's own memory (where no decoding worker takes it):
    ``view()`` and ``size`` as a ``Received`` has them. Not zeroed first: every byte is written before it is read
    (``_read_into`` refuses a body that ends short)."""

    def __init__(self, size: int) -> None:
        self.buffer = np.empty(size, np.uint8)
        self.size = size

    def view(self) -> memoryview:
        return memoryview(self.buffer).cast("B")

    def __len__(self) -> int:
        return self.size


RAW_TYPES = ("application/dicom", "application/octet-stream", "")


async def read_dicom_upload(request: Request, settings: Settings, data: DataFolder) -> bytes:
    """The DICOM bytes from a raw body or from the file part of a multipart form. The body is counted while it
    streams in, however it is framed (``limits.BodyLimit``); a form's parts go to private files in the data
    folder, never to memory or the system's temporary folder."""
    limit = settings.max_upload_bytes
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        parts = await receive_parts(request, data, limit, FORM_PARTS,
                                    form_boundary(request.headers.get("content-type", "")))
        try:
            files = [p for p in parts if "filename=" in p.disposition] or \
                [p for p in parts if 'name="file"' in p.disposition]
            if not files:
                raise MissingFile("multipart body has no file part: send the DICOM as a form field named 'file'")
            return await run_in_threadpool(files[0].path.read_bytes)
        finally:
            for p in parts:
                p.path.unlink(missing_ok=True)
    if ctype in RAW_TYPES:
        return await _read_limited(request, limit)
    raise UnsupportedMediaType(
        f"content type '{ctype}' is not accepted: send 'application/dicom' or a 'multipart/form-data' upload"
    )


def _check_uids(meta) -> None:
    """The image's UIDs key its result: a malformed one is refused (a missing one only means nothing is stored)."""
    if meta.sop_instance_uid:
        check_uid(meta.sop_instance_uid, "the image's SOP Instance UID")
    if meta.study_instance_uid:
        check_uid(meta.study_instance_uid, "the image's Study Instance UID")


@router.post(
    "/predict",
    response_model=PredictResponse,
    summary="Score one DICOM image",
    description="Body: the DICOM file as `application/dicom`, or `multipart/form-data` with a file field. "
    "Errors are RFC 9457 problem details (`application/problem+json`) with a stable `code`.",
    openapi_extra={"requestBody": {"content": {
        "application/dicom": {"schema": {"type": "string", "format": "binary"}},
        "multipart/form-data": {"schema": {"type": "object", "properties": {"file": {"type": "string", "format": "binary"}}}},
    }, "required": True}},
    responses={400: {"description": "empty body / no file"}, 401: {"description": "no valid API key"},
               403: {"description": "the key lacks the 'score' scope"}, 413: {"description": "too large"},
               415: {"description": "wrong content type"}, 422: {"description": "not a usable DICOM image"},
               507: {"description": "a form upload could not be stored: the data folder's disk is full"},
               **SCORING},
)
async def predict(request: Request, engine: LoadedEngine, app: State, caller: Caller = require("score")) -> PredictResponse:
    ids: dict[str, str] = {}  # the accession number, read in the same parse: the reviewers' search key
    statistics: dict[str, float] = {}  # the drift watch's, of the model input: computed off the event loop

    def event(result) -> AuditEvent:
        return AuditEvent(key_id=caller.key_id, action="score", resource=result.meta.sop_instance_uid or "",
                          status=200, request_id=request.state.request_id, detail={})

    def record(result) -> None:
        record_score(app.db, caller.owner, result, info, event(result), ids.get("AccessionNumber", ""))

    def decodes_here() -> bool:
        # A request alone in the service is decoded in its own thread (no hop to a process), unless its decoder
        # holds the GIL for long (a full-size JPEG 2000 decode by pydicom's plugins, a reduced one of more than
        # resolution.J2K_IN_THREAD_PIXELS by Pillow; JPEG-LS and RLE without imagecodecs: the
        # event loop would stop for the whole decode): then by a worker like the others. (``gil_free``: worked out
        # once the body is in)
        return app.decoder is None or (gil_free and app.batcher.alone())

    def score_if_alone(x, meta):
        # Still alone: scored and recorded in this thread (no hop to the batching loop's thread and back, nor to the
        # result writer's); else None, and the request is batched with the others.
        scored = app.batcher.run_alone(x)
        if scored is None:
            return None
        result = engine.prediction(scored[0], meta, scored[1], statistics, overlay)
        record(result)
        return result

    def decode_ahead(view) -> DecodeAhead | None:
        # A request alone when its body starts to arrive: its image (JPEG 2000, uncompressed) may be read while the
        # rest of the body arrives (``DecodeAhead`` decides; decode_and_score_if_alone's read takes the pixels)
        nonlocal early
        if app.settings.decode_ahead and app.batcher.alone() and engine.reads_reduced:
            early = DecodeAhead(engine, view)
        return early

    def decode_and_score_if_alone():
        # Decoding is CPU-bound: off the event loop, in parallel across requests (in worker processes when there
        # are some). A request alone in the service is decoded, scored and recorded right here (one thread hop in
        # all, no hop to a process); others are decoded by the workers and micro-batched.
        prepared = None
        if decodes_here():
            try:  # held to decoders that let the event loop run, whatever the file's meta suggested
                prepared = engine.prepare(data.view() if isinstance(data, Received) else data, ids,
                                          gil_free_only=app.decoder is not None, ahead=early)
                statistics.update(engine.statistics(prepared[0]))
            except DecodeElsewhere:
                pass
        x, meta = prepared or app.decoder.prepare(data, ids, statistics)
        _check_uids(meta)
        return x, meta, score_if_alone(x, meta)

    info = engine.model_info()
    overlay = app.site_overlays.get(caller.owner.site)
    early: DecodeAhead | None = None
    with app.batcher.incoming():
        async with dicom_body(request, app, decode_ahead) as data:
            gil_free = app.decoder is not None and engine.decodes_without_gil(
                data.view() if isinstance(data, Received) else data)
            if isinstance(data, Received) and not decodes_here():
                if early is not None:
                    early.stop()  # a worker decodes it: what is read ahead would go unused
                # in a worker's segment already: awaited here, no thread waiting on the worker; then scored in one
                # hop if it is alone now (a JPEG-LS or RLE image alone, or the last of a busy spell), else batched
                x, meta = await app.decoder.prepare_async(data, ids, statistics)
                _check_uids(meta)
                result = await run_in_threadpool(score_if_alone, x, meta) if app.batcher.alone() else None
            else:
                x, meta, result = await run_in_threadpool(decode_and_score_if_alone)
            size = len(data)
    data = None  # the body: not kept while the request waits for its batch and its stored result
    if result is None:
        probability, inference_ms, _ = await app.batcher.submit(x)
        result = engine.prediction(probability, meta, inference_ms, statistics, overlay)
        # with the results of the requests scored beside it, in one transaction (committed before the answer)
        audit, accession = event(result), ids.get("AccessionNumber", "")
        await app.recorder.record(lambda db: record_into(db, caller.owner, result, info, audit, accession),
                                  caller.owner.meter)
    log.info("request %s scored: %d bytes, %.1f ms inference", request.state.request_id, size, result.inference_ms)
    app.metrics.inference.observe(result.inference_ms / 1000)
    app.metrics.scores.observe(result.probability)
    app.metrics.images.labels(caller.site).inc()
    return PredictResponse(
        sop_instance_uid=result.meta.sop_instance_uid,
        study_instance_uid=result.meta.study_instance_uid,
        probability=result.probability,
        label=result.label,
        threshold=result.threshold,
        calibration=result.calibration,
        above_threshold=result.above_threshold,
        operating_point=engine.meta.operating_point if overlay is None else f"{overlay[1].rule} ({result.calibration})",
        model=info,
        inference_ms=result.inference_ms,
        decode=result.meta.decode,
    )
