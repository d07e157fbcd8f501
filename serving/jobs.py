"""The persisted scoring queue: studies received over STOW-RS are scored by workers that claim jobs.

A job is claimed with a compare-and-set ``UPDATE … WHERE status = 'queued' OR the lease expired``: on
PostgreSQL and SQLite alike exactly one worker wins, even across service processes sharing the
database. The winner holds a lease it renews after every image; a worker killed mid-job (``kill -9``)
stops renewing, and once the lease lapses any worker (the restarted service included) takes the job
over. Instances already scored are skipped, so every SOP Instance UID is scored once.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import threading
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydicom import dcmread
from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from medvision.errors import MedvisionError
from medvision.serving.batcher import TimedOut
from medvision.serving.decode_pool import DecodersStopped
from medvision.serving.delivery import DIMSE, STOW, deliver_due, due_now
from medvision.serving.heatmap_capture import build_capture
from medvision.serving.identifiers import Owner
from medvision.serving.site_calibrations import meaning
from medvision.serving.stow import requeue_orphans
from medvision.serving.structured_report import ImageScore, build_sr, derived_uid, report_uids
from medvision.serving.tables import (
    Instance,
    InstanceState,
    Job,
    JobState,
    ScoredImage,
    Study,
    StudyState,
    utcnow,
)
from medvision.serving.usage import accession_of, record_score

if TYPE_CHECKING:
    from medvision.serving.decode_pool import DecodePool
    from medvision.serving.engine import Engine, ModelInfo
    from medvision.serving.metrics import Metrics
    from medvision.serving.rendering import DecodedImages
    from medvision.serving.settings import Settings
    from medvision.serving.site_calibrations import SiteOverlays
    from medvision.serving.storage import DataFolder

log = logging.getLogger("medvision.serving.jobs")
MAX_ATTEMPTS = 3


def claim(sessions: sessionmaker[Session], owner: str, lease_seconds: float) -> Job | None:
    now = utcnow()
    ready = (Job.status == JobState.QUEUED) & or_(Job.not_before.is_(None), Job.not_before <= now)
    claimable = or_(ready, (Job.status == JobState.RUNNING) & (Job.lease_until < now))
    with sessions() as db:
        for job_id in db.scalars(select(Job.id).where(claimable).order_by(Job.id).limit(5)):
            won = db.execute(
                update(Job).where(Job.id == job_id, claimable)
                .values(status=JobState.RUNNING, lease_owner=owner, attempts=Job.attempts + 1,
                        lease_until=now + _dt.timedelta(seconds=lease_seconds), updated_at=now)
            ).rowcount
            db.commit()
            if won == 1:
                return db.get(Job, job_id)
    return None


def _renew(sessions, job: Job, owner: str, lease_seconds: float) -> None:
    with sessions() as db:
        db.execute(update(Job).where(Job.id == job.id, Job.lease_owner == owner)
                   .values(lease_until=utcnow() + _dt.timedelta(seconds=lease_seconds)))
        db.commit()


def _finish(sessions, job: Job, owner: str, status: JobState, error: str = "", uncount: bool = False) -> None:
    """``uncount``: this attempt does not count towards MAX_ATTEMPTS (it failed for the service's reasons)."""
    values = {"status": status, "last_error": error[:256], "lease_until": None, "updated_at": utcnow()}
    if uncount:
        values["attempts"] = Job.attempts - 1
    with sessions() as db:
        db.execute(update(Job).where(Job.id == job.id, Job.lease_owner == owner).values(**values))
        db.commit()


@dataclass(frozen=True)
class WorkerContext:
    """What the job worker uses of the service, and nothing else."""

    db: sessionmaker[Session]
    data: DataFolder
    settings: Settings
    metrics: Metrics
    engine: Engine
    site_overlays: SiteOverlays
    decoder: DecodePool | None = None
    decoded: DecodedImages | None = None  # the heatmap captures' decodes: in a worker where need be, none kept

    @classmethod
    def of(cls, app_state) -> WorkerContext:
        from medvision.serving.rendering import DecodedImages

        # kept by nothing: a stream of PACS studies must not push out of memory the images readers have open
        decoded = DecodedImages(0, app_state.decoder.read if app_state.decoder is not None else None)
        return cls(app_state.db, app_state.data, app_state.settings, app_state.metrics, app_state.engine,
                   app_state.site_overlays, app_state.decoder, decoded)


class Worker:
    """Background threads that score queued studies with the service's engine and write their SR."""

    def __init__(self, context: WorkerContext, threads: int = 1, lease_seconds: float = 60.0,
                 poll_seconds: float = 1.0) -> None:
        self.context = context
        self.lease_seconds = lease_seconds
        self.poll_seconds = poll_seconds
        self.owner = f"{os.uname().nodename[:24]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.wake = threading.Event()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._loop, name=f"medvision-job-{i}", daemon=True)
                        for i in range(threads)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        self.stop.set()
        self.wake.set()
        for t in self.threads:
            t.join(timeout)

    def _loop(self) -> None:
        outage = False  # the database failed us: once it answers again, queue what was filed but never queued
        while not self.stop.is_set():
            try:
                if outage:
                    requeue_orphans(self.context.db, self.context.settings.study_stable_seconds)
                    outage = False
                job = claim(self.context.db, self.owner, self.lease_seconds)
            except Exception as exc:  # the database may be briefly unavailable: retry, never die
                log.warning("job claim failed: %s", type(exc).__name__)
                job, outage = None, True
            if job is None:
                self._deliver()
                self.wake.wait(self.poll_seconds)
                self.wake.clear()
                continue
            try:
                self.run(job)
            except Exception as exc:  # even recording the failure failed (the database went away mid-job): the
                # job keeps its lease, which lapses, and is taken over then; what was scored is not scored again
                log.warning("job %d could not be finished: %s", job.id, type(exc).__name__)
                outage = True
            self._deliver()

    def _deliver(self) -> None:
        """Reports due to go back to the PACS (``delivery``): by C-STORE and by STOW-RS, between jobs."""
        settings, ctx = self.context.settings, self.context
        routes = []
        if settings.dimse_destination:
            from medvision.serving.dimse import send_files

            routes.append((DIMSE, lambda paths: send_files(settings, paths), max(60.0, 4 * settings.dimse_network_timeout)))
        if settings.pacs_url:
            routes.append((STOW, self._store_in_pacs, 120.0))
        for route, send, lease in routes:
            try:
                deliver_due(route, send, ctx.db, ctx.data, lease, ctx.metrics)
            except Exception as exc:  # the database may be briefly unavailable: the next round tries again
                log.warning("report delivery round (%s) failed: %s", route.via, type(exc).__name__)

    def run(self, job: Job) -> None:
        try:
            self.score_study(job)
        except (DecodersStopped, TimedOut) as exc:  # the service stopping, or too busy to decode: not the study's
            # doing, so the job goes back to the queue without using up an attempt (restarts must not fail it)
            log.warning("job %d put back in the queue: %s", job.id, exc.code)
            _finish(self.context.db, job, self.owner, JobState.QUEUED, exc.code, uncount=True)
            return
        except Exception as exc:  # record it, let another attempt (or an operator) deal with it
            error = exc.code if isinstance(exc, MedvisionError) else type(exc).__name__
            retry = job.attempts < MAX_ATTEMPTS
            log.warning("job %d (attempt %d) failed: %s%s", job.id, job.attempts, error, "; will retry" if retry else "")
            _finish(self.context.db, job, self.owner, JobState.QUEUED if retry else JobState.FAILED, error)
            if not retry:
                self._set_study(job, status=StudyState.FAILED)
            return
        _finish(self.context.db, job, self.owner, JobState.DONE)

    def score_study(self, job: Job) -> None:
        engine, sessions, metrics = self.context.engine, self.context.db, self.context.metrics
        info = engine.model_info()
        with sessions() as db:
            study = db.scalar(select(Study).where(Study.site == job.site,
                                                  Study.study_instance_uid == job.study_instance_uid))
            instances = list(db.scalars(select(Instance).where(Instance.site == job.site,
                                                               Instance.study_instance_uid == job.study_instance_uid)
                                        .order_by(Instance.id)))
        owner = Owner(job.site, study.key_id if study else None)
        with sessions() as db:  # images this model already scored for this site (e.g. through /v1/predict): reuse
            known = set(db.scalars(select(ScoredImage.sop_instance_uid).where(
                ScoredImage.site == job.site,
                ScoredImage.sop_instance_uid.in_([i.sop_instance_uid for i in instances]),
                ScoredImage.artifact_sha256 == info.artifact_sha256)))
        # A job is claimed more than MAX_ATTEMPTS times only by taking it over from holders that died mid-job (a
        # failure that raises stops at MAX_ATTEMPTS): each time the service died on the first image still unscored,
        # in this order. That image (a file that crashes a codec natively, say) is refused, the rest scored.
        suspect = job.attempts > MAX_ATTEMPTS
        for inst in instances:
            if inst.status != InstanceState.RECEIVED:
                continue  # scored (or refused) before: never twice
            if inst.sop_instance_uid in known:
                self._set_instance(inst.id, InstanceState.SCORED)
                self._fill_accession(inst)
                continue
            if suspect:
                suspect = False
                log.error("job %d: the service died %d times scoring this study, on image %d each time: refused",
                          job.id, job.attempts - 1, inst.id)
                self._set_instance(inst.id, InstanceState.REFUSED, "service_died")
                metrics.refused.labels("service_died").inc()
                continue
            ids: dict[str, str] = {}
            try:
                path = self.context.data.inside(inst.path)
                result = engine.score(*(self.context.decoder or engine).prepare(path, ids),
                                      overlay=self.context.site_overlays.get(owner.site))
            except (DecodersStopped, TimedOut):
                raise  # the service is stopping, or no decoding worker was free: the job goes back to the queue
            except MedvisionError as exc:
                self._set_instance(inst.id, InstanceState.REFUSED, exc.code)
                metrics.refused.labels(exc.code).inc()
                continue
            record_score(sessions, owner, result, info, accession=ids.get("AccessionNumber", ""))
            self._set_instance(inst.id, InstanceState.SCORED)
            metrics.images.labels(owner.site).inc()
            metrics.inference.observe(result.inference_ms / 1000)
            metrics.scores.observe(result.probability)
            _renew(sessions, job, self.owner, self.lease_seconds)
        self.write_report(job, info)

    def write_report(self, job: Job, info: ModelInfo) -> None:
        sessions, data = self.context.db, self.context.data
        with sessions() as db:
            rows = list(db.execute(
                select(Instance.path, ScoredImage.sop_instance_uid, ScoredImage.probability, ScoredImage.threshold,
                       ScoredImage.calibration_id)
                .join(ScoredImage, (ScoredImage.site == Instance.site)
                      & (ScoredImage.sop_instance_uid == Instance.sop_instance_uid))
                .where(Instance.site == job.site, Instance.study_instance_uid == job.study_instance_uid,
                       Instance.status == InstanceState.SCORED)
                .order_by(Instance.id)))
        if not rows:
            self._set_study(job, status=StudyState.FAILED)
            return
        sources = [dcmread(data.inside(path), stop_before_pixels=True) for path, *_ in rows]
        meanings = {i: tuple(meaning(sessions, self.context.engine.meta, {i}).parameters()) for i in {r[4] for r in rows}}
        scores = [ImageScore(uid, p, p >= thr, thr, meanings[cal]) for _, uid, p, thr, cal in rows]
        uids = report_uids(job.site, job.study_instance_uid, info, scores)
        sr = build_sr(sources, scores, info, uids=uids)
        path = data.write_dataset(sr)
        files = [str(path)]
        engine, settings = self.context.engine, self.context.settings
        if settings.heatmap_capture and engine.has_heatmap:
            series = derived_uid("heatmap series", uids[1])
            for n, (source_path, uid, *_) in enumerate(rows, start=1):
                capture = build_capture(engine, data.inside(source_path), series, n,
                                        sop_instance_uid=derived_uid("heatmap", uids[1], uid),
                                        images=self.context.decoded)
                files.append(str(data.write_dataset(capture)))
        # due to go back to the PACS (delivery: retried until it arrives); a report made again (more instances
        # arrived) goes back again
        self._set_study(job, status=StudyState.SCORED, report_sop_instance_uid=str(sr.SOPInstanceUID),
                        report_series_instance_uid=str(sr.SeriesInstanceUID), report_path=str(path),
                        report_files=files, **(due_now(DIMSE) if settings.dimse_destination else {}),
                        **(due_now(STOW) if settings.pacs_url else {}))

    def _store_in_pacs(self, paths: list[str]) -> None:
        """STOW-RS the report's files (the SR and heatmap captures) into the PACS (dicomweb-client); raises on any
        failure, for ``delivery`` to retry."""
        from dicomweb_client.api import DICOMwebClient

        settings = self.context.settings
        session = None
        if settings.pacs_username:
            from dicomweb_client.session_utils import create_session_from_user_pass

            session = create_session_from_user_pass(settings.pacs_username, settings.pacs_password)
        client = DICOMwebClient(url=settings.pacs_url, session=session, timeout=60)
        client.set_http_retry_params(retry=False)  # delivery retries with its own back-off, never inside an attempt
        client.store_instances([dcmread(p) for p in paths])

    def _fill_accession(self, inst: Instance) -> None:
        """An image scored before through /v1/predict: its row gains the accession the reviewers search by."""
        accession = accession_of(str(self.context.data.inside(inst.path)))
        if accession:
            with self.context.db() as db:
                db.execute(update(ScoredImage).where(ScoredImage.site == inst.site,
                                                     ScoredImage.sop_instance_uid == inst.sop_instance_uid,
                                                     ScoredImage.accession_number == "")
                           .values(accession_number=accession[:16]))
                db.commit()

    def _set_instance(self, instance_id: int, status: InstanceState, error_code: str = "") -> None:
        with self.context.db() as db:
            db.execute(update(Instance).where(Instance.id == instance_id).values(status=status, error_code=error_code))
            db.commit()

    def _set_study(self, job: Job, **values) -> None:
        with self.context.db() as db:
            db.execute(update(Study).where(Study.site == job.site, Study.study_instance_uid == job.study_instance_uid)
                       .values(updated_at=utcnow(), **values))
            db.commit()
