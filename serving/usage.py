"""What was scored, for whom: results, usage per key per day, and the audit of each result returned."""

from __future__ import annotations

import datetime as _dt

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from medvision.serving.tables import ScoredImage, Usage, utcnow


def accession_of(source: str | bytes) -> str:
    """The exam's Accession Number, which readers search the worklist by (stored, never logged); "" if unreadable."""
    import io

    from pydicom import dcmread

    try:
        ds = dcmread(io.BytesIO(source) if isinstance(source, bytes) else source, stop_before_pixels=True,
                     specific_tags=["AccessionNumber"])
        return str(ds.get("AccessionNumber", "") or "")
    except Exception:  # the image was scored; a header that cannot be re-read only costs the search key
        return ""


def record_score(sessions: sessionmaker[Session], key_id: int, sop_uid: str | None, study_uid: str | None,
                 probability: float, label: str, threshold: float, model: dict,
                 inference_ms: float, audit_event=None, accession: str = "") -> None:
    """Store the result (a re-scored SOP Instance UID replaces its row) and meter it for the key's site.

    Two requests may create the same usage row or result row at once: the loser of that race hits the
    unique constraint, rolls back and retries against the winner's row.
    """
    for attempt in range(3):
        try:
            _record(sessions, key_id, sop_uid, study_uid, probability, label, threshold, model,
                    inference_ms, audit_event, accession)
            return
        except IntegrityError:
            if attempt == 2:
                raise


def _record(sessions, key_id, sop_uid, study_uid, probability, label, threshold, model,
            inference_ms, audit_event, accession) -> None:
    day = _dt.datetime.now(_dt.UTC).date().isoformat()
    with sessions() as db:
        new_study = False
        if sop_uid:
            study = study_uid or ""
            new_study = bool(study) and db.scalar(
                select(ScoredImage.id).where(ScoredImage.study_instance_uid == study, ScoredImage.key_id == key_id)
                .limit(1)) is None
            row = db.scalar(select(ScoredImage).where(ScoredImage.sop_instance_uid == sop_uid))
            if row is None:
                row = ScoredImage(sop_instance_uid=sop_uid)
                db.add(row)
            row.study_instance_uid, row.key_id = study, key_id
            if accession:
                row.accession_number = accession[:16]
            row.probability, row.label, row.threshold = probability, label, threshold
            row.model_name, row.artifact_sha256 = model["name"], model["artifact_sha256"]
            row.inference_ms, row.scored_at = inference_ms, utcnow()
        # an increment in SQL, not read-modify-write: concurrent workers must not lose each other's counts
        bumped = db.execute(update(Usage).where(Usage.day == day, Usage.key_id == key_id).values(
            images=Usage.images + 1, studies=Usage.studies + int(new_study),
            inference_ms=Usage.inference_ms + inference_ms)).rowcount
        if not bumped:  # the key's first image today (a concurrent first insert is retried by the caller)
            db.add(Usage(day=day, key_id=key_id, images=1, studies=int(new_study), inference_ms=inference_ms))
        if audit_event is not None:  # the access record commits with the result it describes
            db.add(audit_event)
        db.commit()
