"""``create_app(settings)``: the FastAPI application."""

from __future__ import annotations

import logging
import re
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.staticfiles import StaticFiles

from medvision import __version__
from medvision.serving.batcher import Batcher
from medvision.serving.db import open_database
from medvision.serving.engine import Engine
from medvision.serving.errors import install_error_handlers
from medvision.serving.jobs import Worker
from medvision.serving.metrics import Metrics
from medvision.serving.routes import admin, dicomweb, health, predict, results, ui
from medvision.serving.settings import Settings
from medvision.serving.stow import requeue_orphans

log = logging.getLogger("medvision.serving")
_SAFE_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def create_app(settings: Settings | None = None, engine: Engine | None = None) -> FastAPI:
    """Build the app; the artifact is loaded in the lifespan handler (or ``engine`` is used as given)."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.db = open_database(settings.database_url)
        if settings.job_workers and (orphans := requeue_orphans(app.state.db, settings.study_stable_seconds)):
            log.warning("queued %d received study(ies) that had no scoring job (an interrupted request)", orphans)
        app.state.engine = engine or Engine.from_settings(settings)
        info = app.state.engine.model_info()
        app.state.metrics.set_model(info)
        app.state.batcher = Batcher(app.state.engine.run, settings.batch_max_size, settings.batch_max_wait_ms,
                                    settings.queue_max, settings.request_timeout_s, app.state.metrics)
        await app.state.batcher.start()
        if settings.job_workers:
            app.state.worker = Worker(app.state, settings.job_workers, settings.job_lease_seconds)
            app.state.worker.start()
        log.info("model %s loaded (sha256 %s…, %s, gate: %s, providers %s)", info["name"], info["artifact_sha256"][:12],
                 info["format"], info["gate"], ",".join(info["providers"]))
        yield
        if app.state.worker is not None:
            app.state.worker.shutdown()
            app.state.worker = None
        await app.state.batcher.stop()
        app.state.engine = None
        app.state.db.kw["bind"].dispose()

    app = FastAPI(
        title="medvision",
        version=__version__,
        description="Cancer-probability scoring of DICOM mammograms with an ONNX model. Research use only.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.engine = None
    app.state.metrics = Metrics()
    app.state.worker = None

    @app.middleware("http")
    async def request_log(request: Request, call_next):
        # Method, path, status and timing only: no headers, query strings or bodies (they may carry PHI).
        given = request.headers.get("x-request-id", "")
        request.state.request_id = given if _SAFE_ID.fullmatch(given) else uuid.uuid4().hex[:16]
        start = time.perf_counter()
        metrics = app.state.metrics
        metrics.inflight.inc()
        try:
            response = await call_next(request)
        finally:
            metrics.inflight.dec()
        elapsed = time.perf_counter() - start
        response.headers["X-Request-ID"] = request.state.request_id
        # the route template, not the path: UIDs in paths would make one time series per study
        route = getattr(request.scope.get("route"), "path", "unmatched")
        metrics.requests.labels(request.method, route, str(response.status_code)).observe(elapsed)
        log.info("%s %s %d %.1f ms id=%s", request.method, route, response.status_code, elapsed * 1000,
                 request.state.request_id, extra={"request_id": request.state.request_id, "method": request.method,
                                                  "route": route, "status": response.status_code,
                                                  "duration_ms": round(elapsed * 1000, 2)})
        return response

    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(predict.router)
    app.include_router(results.router)
    app.include_router(dicomweb.router)
    app.include_router(admin.router)
    app.include_router(ui.router)
    app.mount("/ui/static", StaticFiles(directory=str(ui.UI_DIR / "static")), name="ui-static")
    return app
