"""The drift watch: each site's most recent scored images (their drift quantities, recorded with each score)
against the reference the served artifact carries (``medvision.drift``). Computed on request
(``GET /v1/admin/drift``, the admin page) and for Prometheus at most every ``drift_interval_s``."""

from __future__ import annotations

import time

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from medvision.drift import Drift, DriftPolicy, Reference, compare
from medvision.serving.tables import ScoredImage


def _window(db: Session, site: str, artifact_sha256: str, images: int) -> tuple[list[dict], list[str]]:
    rows = db.execute(select(ScoredImage.profile, ScoredImage.study_instance_uid)
                      .where(ScoredImage.site == site, ScoredImage.artifact_sha256 == artifact_sha256,
                             ScoredImage.profile.is_not(None))
                      .order_by(ScoredImage.scored_at.desc(), ScoredImage.id.desc()).limit(images)).all()
    return [r[0] for r in rows], [r[1] or f"image-{i}" for i, r in enumerate(rows)]


def drift_report(sessions: sessionmaker[Session], reference: Reference | None, artifact_sha256: str,
                 window_images: int, policy: DriftPolicy, site: str | None = None,
                 calibrations: dict | None = None) -> dict:
    """Per site (or one): the window's size, each quantity's test, which alarms are on, and the site calibration
    in force (``calibrations``: site -> its summary)."""
    calibrations = calibrations or {}
    out: dict = {"artifact_sha256": artifact_sha256, "window_images": window_images,
                 "policy": policy.__dict__, "reference": None, "sites": []}
    if reference is None:
        out["note"] = ("the served artifact carries no reference distributions (export it after 'medvision "
                       "evaluate'): nothing to compare with")
        return out
    out["reference"] = {"images": reference.images, "studies": reference.studies, "source": reference.source}
    with sessions() as db:
        sites = [site] if site is not None else list(db.scalars(
            select(ScoredImage.site).where(ScoredImage.artifact_sha256 == artifact_sha256).distinct()
            .order_by(ScoredImage.site)))
        windows = {s: _window(db, s, artifact_sha256, window_images) for s in sites}
    for s, (profiles, studies) in windows.items():
        drifts: list[Drift] = compare(reference, profiles, studies, policy) if profiles else []
        out["sites"].append({"site": s, "images": len(profiles), "studies": len(set(studies)),
                             "calibration": calibrations.get(s),
                             "alarms": [d.quantity for d in drifts if d.alarm],
                             "quantities": [d.as_dict() for d in drifts]})
    return out


def drift_of(state, site: str | None = None) -> dict:
    """The drift report for the served model (every site, or one), from the app's state and settings."""
    s, engine = state.settings, state.engine
    policy = DriftPolicy(min_studies=s.drift_min_studies, alpha=s.drift_alpha)
    return drift_report(state.db, engine.meta.reference, engine.artifact_sha256, s.drift_window_images, policy, site,
                        state.site_overlays.summary())


class DriftGauges:
    """Keeps the Prometheus gauges no older than ``interval`` seconds (refreshed when metrics are scraped)."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.checked = float("-inf")

    def due(self) -> bool:
        return time.monotonic() - self.checked >= self.interval

    def publish(self, metrics, report: dict) -> None:
        self.checked = time.monotonic()
        for site in report["sites"]:
            metrics.drift_window.labels(site["site"]).set(site["studies"])
            for q in site["quantities"]:
                metrics.drift_alarm.labels(site["site"], q["quantity"]).set(1 if q["alarm"] else 0)
                metrics.drift_effect.labels(site["site"], q["quantity"]).set(q["effect"])
