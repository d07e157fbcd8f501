"""Site calibrations in the service: fit one from a site's stored scores and outcomes, apply or remove it (audited),
and the cache the scoring paths read (refreshed every few seconds, so an overlay applied from the command line
reaches a running service without a restart)."""

from __future__ import annotations

import csv
import datetime as _dt
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from medvision.errors import ConfigError
from medvision.identifiers import check_uid
from medvision.serving.audit import write_audit
from medvision.serving.identifiers import is_site
from medvision.serving.tables import ScoredImage, SiteCalibrationRow
from medvision.site_calibration import SiteCalibration, consistent, recalibrate

log = logging.getLogger("medvision.serving")


def read_outcomes(path: str | Path) -> tuple[dict[str, int], dict[str, int]]:
    """Outcomes keyed by SOP Instance UID and by Study Instance UID, from a CSV with ``cancer`` (0 / 1) and
    ``sop_instance_uid`` and / or ``study_instance_uid`` columns; or from the review UI's export of calls
    (``study_instance_uid``, ``call``, ``ai_above_threshold``): a reader who agrees with the AI confirms its
    result, one who disagrees reverses it, and uncertain calls are left out."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no outcomes file at {path}")
    by_sop: dict[str, int] = {}
    by_study: dict[str, int] = {}
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        columns = set(reader.fieldnames or ())
        calls = {"call", "ai_above_threshold", "study_instance_uid"} <= columns
        if not calls and ("cancer" not in columns or not columns & {"sop_instance_uid", "study_instance_uid"}):
            raise ConfigError(f"{path.name}: an outcomes CSV needs 'cancer' and 'sop_instance_uid' or "
                              "'study_instance_uid' columns (or is the review UI's export of calls)")
        for n, row in enumerate(reader, start=2):
            if calls:
                if row["call"] not in ("agree", "disagree"):
                    continue
                above = row["ai_above_threshold"].strip() == "1"
                outcome = int(above if row["call"] == "agree" else not above)
            else:
                value = (row.get("cancer") or "").strip()
                if value not in ("0", "1"):
                    raise ConfigError(f"{path.name} line {n}: cancer must be 0 or 1")
                outcome = int(value)
            for column, into in (("sop_instance_uid", by_sop), ("study_instance_uid", by_study)):
                uid = (row.get(column) or "").strip()
                if uid:
                    into[check_uid(uid, column)] = outcome
    if not by_sop and not by_study:
        raise ConfigError(f"{path.name} holds no usable outcome")
    return by_sop, by_study


def fit_site(sessions: sessionmaker[Session], site: str, meta, artifact_sha256: str, outcomes: str | Path,
             rule: str | None = None, held_out_fraction: float = 0.5, n_boot: int = 2000) -> SiteCalibration:
    """The overlay for ``site`` from its stored scores under this artifact (the model's own probability) and the
    outcomes file."""
    if not is_site(site):
        raise ConfigError(f"{site!r} is not a site name")
    by_sop, by_study = read_outcomes(outcomes)
    with sessions() as db:
        rows = db.execute(select(ScoredImage.sop_instance_uid, ScoredImage.study_instance_uid, ScoredImage.profile,
                                 ScoredImage.probability, ScoredImage.calibration_id)
                          .where(ScoredImage.site == site, ScoredImage.artifact_sha256 == artifact_sha256)).all()
    probs, labels, studies = [], [], []
    for sop, study, profile, probability, calibration_id in rows:
        outcome = by_sop.get(sop, by_study.get(study))
        if outcome is None:
            continue
        # the model's own probability: the drift profile keeps it when a site overlay changed the stored one
        model_p = profile.get("probability") if calibration_id is not None and profile else probability
        if model_p is None:
            continue
        probs.append(float(model_p))
        labels.append(outcome)
        studies.append(study or sop)
    if not probs:
        raise ConfigError(f"no image of site {site!r} scored by this model has an outcome in {Path(outcomes).name}")
    rule = rule or meta.operating.rule.replace(" on validation", "")
    return recalibrate(site, artifact_sha256, meta.threshold, probs, labels, studies, rule=rule,
                       held_out_fraction=held_out_fraction, n_boot=n_boot, model_name=meta.model_name)


def apply_overlay(sessions: sessionmaker[Session], overlay: SiteCalibration, actor: str,
                  force: bool = False, user_id: int | None = None) -> SiteCalibrationRow:
    """Make ``overlay`` the site's active calibration for its artifact (replacing one there was), audited (``actor``:
    who, as the audit log names them; ``user_id``: the review UI's reader, if it came from there). One the gate
    refused is not applied unless ``force`` (which the audit row records)."""
    if not is_site(overlay.site):
        raise ConfigError("this site calibration names no valid site (1-64 letters, digits or . _ @ -, starting with a "
                          "letter or digit)")
    if not consistent(overlay):
        raise ConfigError("this site calibration's verdict or threshold does not follow from its own evidence (was "
                          "the file edited?): not applied; fit it again with 'medvision recalibrate fit'")
    if not overlay.accepted and not force:
        raise ConfigError("this site calibration was refused by its gate (" + "; ".join(overlay.reasons) + "): not "
                          "applied")
    now = _dt.datetime.now(_dt.UTC)
    with sessions() as db:
        for old in db.scalars(_active(overlay.site, overlay.artifact_sha256)):
            old.removed_at, old.removed_by = now, actor[:128]
        row = SiteCalibrationRow(site=overlay.site, artifact_sha256=overlay.artifact_sha256,
                                 overlay=overlay.model_dump(mode="json"), applied_by=actor[:128], applied_at=now)
        db.add(row)
        db.commit()
        db.refresh(row)
    write_audit(sessions, "site_calibration_applied", 200, overlay.site, user_id=user_id, id=row.id, by=actor[:128],
                artifact=overlay.artifact_sha256[:16], threshold=round(overlay.threshold, 6), forced=force)
    return row


def remove_overlay(sessions: sessionmaker[Session], site: str, artifact_sha256: str, actor: str,
                   user_id: int | None = None) -> int:
    """End the site's active calibration for this artifact (the model's own applies again); audited."""
    now = _dt.datetime.now(_dt.UTC)
    with sessions() as db:
        rows = list(db.scalars(_active(site, artifact_sha256)))
        for row in rows:
            row.removed_at, row.removed_by = now, actor[:128]
        db.commit()
    if rows:
        write_audit(sessions, "site_calibration_removed", 200, site, user_id=user_id, ids=[r.id for r in rows],
                    by=actor[:128], artifact=artifact_sha256[:16])
    return len(rows)


def listing(sessions: sessionmaker[Session], artifact_sha256: str, removed: int = 10) -> dict[str, list[dict]]:
    """For the admin page: the active site calibrations of this artifact, and the latest ``removed`` ended ones."""
    def row(r: SiteCalibrationRow) -> dict:
        o = SiteCalibration.model_validate(r.overlay)
        ev = o.evidence
        return {"id": r.id, "site": r.site, "rule": o.rule, "threshold": o.threshold,
                "model_threshold": ev.model_threshold.threshold, "temperature": o.temperature, "bias": o.bias,
                "held_out_studies": ev.held_out_studies, "site_sensitivity": ev.site_threshold.sensitivity,
                "site_sensitivity_ci95": ev.site_threshold.sensitivity_ci95,
                "site_specificity": ev.site_threshold.specificity,
                "model_sensitivity": ev.model_threshold.sensitivity, "model_specificity": ev.model_threshold.specificity,
                "ece": [ev.ece_before, ev.ece_after], "accepted": o.accepted, "applied_by": r.applied_by,
                "applied_at": r.applied_at.strftime("%Y-%m-%d %H:%M"), "removed_by": r.removed_by or "",
                "removed_at": r.removed_at.strftime("%Y-%m-%d %H:%M") if r.removed_at else ""}

    base = select(SiteCalibrationRow).where(SiteCalibrationRow.artifact_sha256 == artifact_sha256)
    with sessions() as db:
        active = [row(r) for r in db.scalars(base.where(SiteCalibrationRow.removed_at.is_(None))
                                             .order_by(SiteCalibrationRow.site))]
        ended = [row(r) for r in db.scalars(base.where(SiteCalibrationRow.removed_at.is_not(None))
                                            .order_by(SiteCalibrationRow.removed_at.desc()).limit(removed))]
    return {"active": active, "removed": ended}


def _active(site: str, artifact_sha256: str):
    return select(SiteCalibrationRow).where(SiteCalibrationRow.site == site,
                                            SiteCalibrationRow.artifact_sha256 == artifact_sha256,
                                            SiteCalibrationRow.removed_at.is_(None))


class SiteOverlays:
    """The active overlays of the served artifact, by site: loaded when the service starts, then reloaded in the
    background at most every ``seconds`` (``get`` never waits for the database: it runs on the event loop)."""

    def __init__(self, sessions: sessionmaker[Session], artifact_sha256: str, seconds: float = 5.0) -> None:
        self.sessions, self.artifact_sha256, self.seconds = sessions, artifact_sha256, seconds
        self._by_site: dict[str, tuple[int, SiteCalibration]] = {}
        self._lock = threading.Lock()
        self._reloading = False
        self._reload()

    def get(self, site: str) -> tuple[int, SiteCalibration] | None:
        if time.monotonic() - self._loaded >= self.seconds:
            with self._lock:
                start, self._reloading = not self._reloading, True
            if start:
                threading.Thread(target=self._reload, name="medvision-site-calibrations", daemon=True).start()
        return self._by_site.get(site)

    def reload(self) -> None:
        """Now, in this thread (after an admin applied or removed one here)."""
        self._reload()

    def _reload(self) -> None:
        try:
            with self.sessions() as db:
                rows = db.scalars(select(SiteCalibrationRow).where(
                    SiteCalibrationRow.artifact_sha256 == self.artifact_sha256,
                    SiteCalibrationRow.removed_at.is_(None)).order_by(SiteCalibrationRow.id))
                self._by_site = {r.site: (r.id, SiteCalibration.model_validate(r.overlay)) for r in rows}
        except Exception:  # the database away for a moment: keep the overlays known, try again next time
            log.warning("could not reload the site calibrations; keeping the %d known", len(self._by_site))
        finally:
            self._loaded = time.monotonic()
            self._reloading = False

    def summary(self) -> dict[str, dict]:
        return {site: {"id": i, "threshold": o.threshold, "rule": o.rule}
                for site, (i, o) in dict(self._by_site).items()}


@dataclass(frozen=True)
class Meaning:
    """What a served probability is relative to: the model's validation calibration or a site's, and the cancer
    share of the images it was calibrated on. The review UI says it in a sentence, the SR in two short parameters."""

    method: str  # "platt" / "temperature" / "none" (the model's), or "site"
    prevalence: float | None
    calibration_id: int | None = None

    @property
    def source(self) -> str:
        if self.calibration_id is not None:
            return f"site calibration {self.calibration_id}"
        return "none" if self.method == "none" else f"{self.method} on validation images"

    def parameters(self) -> list[str]:
        """For the SR's algorithm identification (each at most 64 characters)."""
        if self.method == "none":
            return ["calibration: none", "meaning: a ranking score, not a chance of cancer"]
        where = f" where {100 * self.prevalence:.0f} % had cancer" if self.prevalence is not None else ""
        return [f"calibration: {self.source}"[:64], f"meaning: chance of cancer{where}"[:64]]

    def sentence(self) -> str:
        """For a reader, under the probability."""
        share = f"{100 * self.prevalence:.0f} %" if self.prevalence is not None else None
        if self.calibration_id is not None:
            return (f"Calibrated for this site ({self.source}), on its own outcomes"
                    + (f", where {share} of images had cancer" if share else "")
                    + ": of images given a probability p here, about p have cancer.")
        if self.method == "none":
            return "Not calibrated: a score for ranking studies, not a chance of cancer."
        where = f" on the model's validation images, {share} of which had cancer" if share else \
            " on the model's validation images"
        return (f"Calibrated{where}. At a site where cancer is rarer the chance is lower than shown, where it is more "
                "common higher; a site calibration (medvision recalibrate) corrects it for this site.")


def meaning(sessions: sessionmaker[Session], meta, calibration_ids: set[int | None]) -> Meaning:
    """The meaning of a study's probabilities: the newest site calibration among ``calibration_ids`` (the ids its
    images were scored under), else the artifact's own calibration (``meta``: the engine's ArtifactMeta)."""
    site_ids = sorted(i for i in calibration_ids if i is not None)
    if site_ids:
        with sessions() as db:
            row = db.get(SiteCalibrationRow, site_ids[-1])
        prevalence = row.overlay["evidence"]["prevalence"] if row else None
        return Meaning("site", prevalence, site_ids[-1])
    return Meaning(meta.calibration_method, meta.calibration_prevalence)
