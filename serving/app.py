"""``create_app(settings)``: the FastAPI application."""

from __future__ import annotations

import logging
import re
import time
import traceback
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from medvision import __version__
from medvision.resolution import use_decode_threads
from medvision.serving.audit import FailureBudget
from medvision.serving.auth import KeyCache
from medvision.serving.batcher import Batcher
from medvision.serving.db import open_database
from medvision.serving.decode_pool import DecodePool
from medvision.serving.drift_watch import DriftGauges
from medvision.serving.engine import Engine
from medvision.serving.errors import install_error_handlers
from medvision.serving.jobs import Worker, WorkerContext
from medvision.serving.limits import Admission, BodyLimit
from medvision.serving.metrics import Metrics
from medvision.serving.problems import MEDIA_TYPE, document_errors, problem_bytes
from medvision.serving.recorder import Recorder
from medvision.serving.rendering import DecodedImages, RenderCache
from medvision.serving.routes import admin, dicomweb, dicomweb_query, health, predict, problems, results, ui
from medvision.serving.settings import Settings
from medvision.serving.site_calibrations import SiteOverlays
from medvision.serving.storage import DataFolder
from medvision.serving.stow import requeue_orphans

log = logging.getLogger("medvision.serving")
_SAFE_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")


# On every response: nothing sniffed, framed or referred (URLs carry study UIDs); API answers load nothing. The review
# UI's pages set their own, stricter-than-nothing policy (``routes.ui``); the interactive API docs are left alone.
SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
                    (b"referrer-policy", b"no-referrer"), (b"cross-origin-resource-policy", b"same-origin")]
API_CSP = (b"content-security-policy", b"default-src 'none'; frame-ancestors 'none'")
_DOCS = ("/docs", "/redoc")


class RequestLog:
    """Every HTTP request: a request id (the caller's ``X-Request-ID`` if it is safe, else a new one) in
    ``request.state`` and the response headers, the security headers, the in-flight gauge, the latency
    histogram by route template, and one log line with method, route, status and timing only — no headers,
    query strings or bodies (they may carry PHI). An exception that escapes the app ends here: answered 500 and
    logged as its type and the line it came from, never re-raised: the server's traceback would print request
    values (a database error quotes its parameters, a password typed as a user name among them).

    A plain ASGI middleware: Starlette's ``BaseHTTPMiddleware`` (``@app.middleware``) runs each request in
    an extra task behind memory streams, which cost about a millisecond per request on this service.
    """

    def __init__(self, app, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"), "")
        request_id = given if _SAFE_ID.fullmatch(given) else uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = request_id
        status, started = 500, False  # if the app fails before it answers

        async def send_with_id(message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                headers = list(message.get("headers", []))
                present = {k.lower() for k, _ in headers}
                headers += [h for h in SECURITY_HEADERS if h[0] not in present]
                if API_CSP[0] not in present and not scope["path"].startswith(_DOCS):
                    headers.append(API_CSP)
                message["headers"] = [*headers, (b"x-request-id", request_id.encode())]
            await send(message)

        start = time.perf_counter()
        self.metrics.inflight.inc()
        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:  # a bug: answered 500 here, and only where it happened goes to the log
            _log_failure(request_id, exc)
            if not started:
                await send_with_id({"type": "http.response.start", "status": 500,
                                    "headers": [(b"content-type", MEDIA_TYPE.encode())]})
                await send_with_id({"type": "http.response.body", "body": problem_bytes(
                    "internal_error", "internal error; quote the request id when reporting it", 500, request_id)})
        finally:
            self.metrics.inflight.dec()
            elapsed = time.perf_counter() - start
            # the route template, not the path: UIDs in paths would make one time series per study
            route = getattr(scope.get("route"), "path", "unmatched")
            method = scope["method"]
            self.metrics.requests.labels(method, route, str(status)).observe(elapsed)
            log.info("%s %s %d %.1f ms id=%s", method, route, status, elapsed * 1000, request_id,
                     extra={"request_id": request_id, "method": method, "route": route, "status": status,
                            "duration_ms": round(elapsed * 1000, 2)})


def _log_failure(request_id: str, exc: Exception) -> None:
    where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
    at = f" at {where.filename.rsplit('/', 1)[-1]}:{where.lineno} in {where.name}" if where else ""
    log.error("request %s failed: %s%s", request_id, type(exc).__name__, at)


def _seconds_per_image(app: FastAPI) -> float:
    batcher = getattr(app.state, "batcher", None)
    return batcher.seconds_per_image if batcher is not None else 0.01


def quiet_libraries() -> None:
    """highdicom logs SOP Instance UIDs at INFO, and pydicom quotes invalid values (any text a file holds) in the
    warnings and log lines of its value validation: none of it may reach the service log. The service checks the
    values it uses itself (``identifiers``)."""
    import pydicom.config

    logging.getLogger("highdicom").setLevel(logging.WARNING)
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE


DOCS_DIR = Path(__file__).resolve().parent / "docs_assets"
DOCS_CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; script-src 'self'; "
            "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'")


def _offline_docs(app: FastAPI) -> None:
    """Swagger UI at /docs from files the service ships (``docs_assets``: swagger-ui-dist, Apache-2.0, see its
    SOURCE), under a policy that loads nothing from elsewhere."""
    from fastapi.responses import HTMLResponse

    app.mount("/docs/assets", StaticFiles(directory=str(DOCS_DIR / "swagger-ui")), name="docs-assets")
    app.mount("/docs/static", StaticFiles(directory=str(DOCS_DIR)), name="docs-static")
    page = ('<!doctype html><html lang="en"><head><meta charset="utf-8"><title>medvision API</title>'
            '<link rel="icon" href="data:,"><link rel="stylesheet" href="/docs/assets/swagger-ui.css"></head>'
            '<body><div id="swagger-ui"></div>'
            '<script src="/docs/assets/swagger-ui-bundle.js"></script><script src="/docs/static/init.js"></script>'
            '</body></html>')

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": DOCS_CSP, "Cache-Control": "no-cache"})


def create_app(settings: Settings | None = None, engine: Engine | None = None) -> FastAPI:
    """Build the app; the artifact is loaded in the lifespan handler (or ``engine`` is used as given)."""
    settings = settings or Settings()
    quiet_libraries()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.data = DataFolder(settings.data_dir)
        if swept := app.state.data.sweep_incoming():
            log.warning("deleted %d partial upload(s) an interrupted request left in the data folder", swept)
        app.state.renders = RenderCache(app.state.data.folder("renders"), settings.render_cache_bytes)
        app.state.decoded = DecodedImages(settings.decoded_cache_bytes)
        app.state.db = open_database(settings.database_url)
        if settings.job_workers and (orphans := requeue_orphans(app.state.db, settings.study_stable_seconds)):
            log.warning("queued %d received study(ies) that had no scoring job (an interrupted request)", orphans)
        app.state.engine = engine or Engine.from_settings(settings)
        # this process decodes what no decoding worker takes (a request alone, the review UI's renderings), seldom
        # several images at once: JPEG 2000 on every core; its decoding workers (started below, one a core) one each
        use_decode_threads(settings.cores, keep_set=True)
        app.state.site_overlays = SiteOverlays(app.state.db, app.state.engine.artifact_sha256)
        info = app.state.engine.model_info()
        app.state.metrics.set_model(info)
        app.state.batcher = Batcher(app.state.engine.run, settings.batch_max_size, settings.batch_max_wait_ms,
                                    settings.queue_max, settings.request_timeout_s, app.state.metrics)
        await app.state.batcher.start()
        if settings.decoders:
            loaded = app.state.engine
            app.state.decoder = DecodePool(loaded.meta.preprocess, loaded.limits, settings.decoders,
                                           timeout_s=settings.decode_timeout_s)
            app.state.decoded.elsewhere = app.state.decoder.read  # what would hold the event loop: in a worker
        if settings.job_workers:
            app.state.worker = Worker(WorkerContext.of(app.state), settings.job_workers,
                                      settings.job_lease_seconds)
            app.state.worker.start()
        if settings.dimse_port is not None:
            from medvision.serving.dimse import StorageSCP

            app.state.dimse = StorageSCP(settings, app.state.db, app.state.data, app.state.metrics,
                                         app.state.worker.wake if app.state.worker else None, app.state.failures)
            app.state.dimse.start()
        if settings.secure_cookies and settings.ui_secure_cookies is None:
            log.info("review UI cookies are Secure (the service binds %s, not loopback): reach /ui over HTTPS, e.g. "
                     "through a TLS proxy (docs/security.md)", settings.host)
        if settings.host not in ("127.0.0.1", "localhost", "::1") and settings.forwarded_allow_ips == "127.0.0.1,::1":
            log.warning("the service binds %s but trusts X-Forwarded-For from loopback only: behind a proxy on "
                        "another host every reader shares the proxy's address for sign-in throttling; set "
                        "MEDVISION_FORWARDED_ALLOW_IPS to the proxy's address", settings.host)
        log.info("model %s loaded (sha256 %s…, %s, gate: %s, providers %s)", info.name, info.artifact_sha256[:12],
                 info.format, info.gate, ",".join(info.providers))
        app.state.recorder = Recorder(app.state.db)  # last: a startup that fails above leaves no thread behind
        yield
        if app.state.dimse is not None:
            app.state.dimse.stop()
            app.state.dimse = None
        if app.state.worker is not None:
            app.state.worker.shutdown()
            app.state.worker = None
        await app.state.batcher.stop()
        app.state.recorder.stop()
        if app.state.decoder is not None:
            app.state.decoded.elsewhere = None
            await run_in_threadpool(app.state.decoder.close)  # joins its workers: not on the event loop
            app.state.decoder = None
        app.state.engine = None
        app.state.db.kw["bind"].dispose()

    app = FastAPI(
        title="medvision",
        version=__version__,
        description="Cancer-probability scoring of DICOM mammograms with an ONNX model. Research use only.",
        lifespan=lifespan,
        docs_url=None,  # served below from the service's own files: no CDN (offline hospital networks)
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.key_cache = KeyCache(settings.key_cache_seconds)
    app.state.engine = None
    app.state.metrics = Metrics()
    app.state.drift_gauges = DriftGauges(settings.drift_interval_s)
    app.state.failures = FailureBudget()  # audit rows for anyone's failures: a budget per address, HTTP and DIMSE
    app.state.worker = None
    app.state.dimse = None  # a StorageSCP when settings.dimse_port
    app.state.decoder = None  # a DecodePool when settings.decoders

    app.add_middleware(BodyLimit, dicom_bytes=settings.max_upload_bytes, other_bytes=settings.max_form_bytes)
    app.add_middleware(Admission, limit=settings.queue_max, seconds_per_request=lambda: _seconds_per_image(app))
    app.add_middleware(RequestLog, metrics=app.state.metrics)  # outermost: it sees every answer, refusals included
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(predict.router)
    app.include_router(results.router)
    app.include_router(dicomweb.router)
    app.include_router(dicomweb_query.router)
    app.include_router(admin.router)
    app.include_router(ui.router)
    app.add_exception_handler(ui.SignInRequired, ui.sign_in_first)
    app.include_router(problems.router)
    app.mount("/ui/static", StaticFiles(directory=str(ui.UI_DIR / "static")), name="ui-static")
    _offline_docs(app)
    generated = app.openapi

    def openapi() -> dict:  # FastAPI's document, with every error answer described as a problem (problems.py)
        if app.openapi_schema is None:
            app.openapi_schema = document_errors(generated())
        return app.openapi_schema

    app.openapi = openapi
    return app
