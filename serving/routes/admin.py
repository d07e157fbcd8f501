"""Operations: usage per site and day, the audit log, Prometheus metrics (``admin`` scope)."""

from __future__ import annotations

import datetime as _dt

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from medvision.serving.audit import audit
from medvision.serving.auth import Caller, require
from medvision.serving.dependencies import Database, ServiceMetrics, State
from medvision.serving.drift_watch import drift_of
from medvision.serving.identifiers import request_site
from medvision.serving.tables import ApiKey, AuditEvent, Job, JobState, Usage

router = APIRouter(tags=["admin"])


class UsageRow(BaseModel):
    day: str
    site: str
    key: str
    images: int
    studies: int
    inference_seconds: float = Field(description="model time in seconds, to the microsecond (a small model takes "
                                     "well under a millisecond an image)")


class AuditRow(BaseModel):
    at: _dt.datetime
    key: str | None
    action: str
    resource: str
    status: int
    request_id: str


def _usage(sessions, since: str, until: str) -> list[UsageRow]:
    stmt = (select(Usage, ApiKey.name).join(ApiKey, Usage.key_id == ApiKey.id, isouter=True)
            .where(Usage.day >= since, Usage.day <= until).order_by(Usage.day, Usage.site, Usage.meter))
    with sessions() as db:  # images that came by C-STORE have no key: their row says so
        return [UsageRow(day=u.day, site=u.site, key=name if u.key_id is not None else "(DICOM C-STORE)",
                         images=u.images, studies=u.studies, inference_seconds=round(u.inference_ms / 1000, 6))
                for u, name in db.execute(stmt)]


def _audit_rows(sessions, limit: int, action: str | None) -> list[AuditRow]:
    stmt = (select(AuditEvent, ApiKey.name).join(ApiKey, AuditEvent.key_id == ApiKey.id, isouter=True)
            .order_by(AuditEvent.id.desc()).limit(limit))
    if action:
        stmt = stmt.where(AuditEvent.action == action)
    with sessions() as db:
        return [AuditRow(at=e.at, key=name, action=e.action, resource=e.resource, status=e.status,
                         request_id=e.request_id) for e, name in db.execute(stmt)]


@router.get("/v1/admin/usage", response_model=list[UsageRow], summary="Images and studies scored per site and key per day")
async def usage(request: Request, db: Database, since: _dt.date = Query(None, description="first UTC day (default: 30 days ago)"),
                until: _dt.date = Query(None, description="last UTC day (default: today)"),
                caller: Caller = require("admin")) -> list[UsageRow]:
    today = _dt.datetime.now(_dt.UTC).date()
    since, until = since or today - _dt.timedelta(days=30), until or today
    rows = await run_in_threadpool(_usage, db, since.isoformat(), until.isoformat())
    await run_in_threadpool(audit, db, request, "read_usage", 200, "", caller.key_id)
    return rows


@router.get("/v1/admin/audit", response_model=list[AuditRow], summary="The newest audit events")
async def audit_log(request: Request, db: Database, limit: int = Query(100, ge=1, le=10_000), action: str | None = None,
                    caller: Caller = require("admin")) -> list[AuditRow]:
    rows = await run_in_threadpool(_audit_rows, db, limit, action)
    await run_in_threadpool(audit, db, request, "read_audit", 200, "", caller.key_id)
    return rows


@router.get("/v1/admin/drift", summary="Each site's recent images against the model's reference: tests and alarms")
async def drift(request: Request, state: State, site: str | None = Query(None, description="one site (default: every site)"),
                caller: Caller = require("admin")) -> dict:
    site = request_site(site)
    report = await run_in_threadpool(drift_of, state, site)
    if site is None:
        state.drift_gauges.publish(state.metrics, report)
    await run_in_threadpool(audit, state.db, request, "read_drift", 200, site or "", caller.key_id)
    return report


def _job_gauges(sessions, metrics) -> None:
    """The scoring queue, read from the database at scrape time (every worker of every replica shares it)."""
    now = _dt.datetime.now(_dt.UTC)
    with sessions() as db:
        rows = db.execute(select(Job.not_before, Job.created_at).where(Job.status == JobState.QUEUED)).all()

    def utc(t):
        return t.replace(tzinfo=_dt.UTC) if t is not None and t.tzinfo is None else t  # SQLite: naive, in UTC

    due = [utc(not_before) or utc(created) for not_before, created in rows
           if not_before is None or utc(not_before) <= now]
    metrics.jobs_queued.set(len(rows))
    metrics.oldest_due_job.set(max(0.0, (now - min(due)).total_seconds()) if due else 0.0)


@router.get("/metrics", summary="Prometheus metrics (scrape with an admin key as bearer token)",
            response_class=Response)
async def metrics(state: State, db: Database, service_metrics: ServiceMetrics,
                  caller: Caller = require("admin")) -> Response:
    await run_in_threadpool(_job_gauges, db, service_metrics)
    if state.drift_gauges.due():
        state.drift_gauges.publish(service_metrics, await run_in_threadpool(drift_of, state))
    return Response(generate_latest(service_metrics.registry), media_type=CONTENT_TYPE_LATEST)
