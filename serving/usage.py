"""What was scored, for whom: results, usage per sender per day, and the audit of each result returned."""

from __future__ import annotations

import datetime as _dt
from typing import TYPE_CHECKING

from sqlalchemy import bindparam, case, select, update
from sqlalchemy.orm import Session, sessionmaker

from medvision.serving.identifiers import Owner
from medvision.serving.tables import AuditEvent, ScoredImage, Usage, utcnow

if TYPE_CHECKING:
    from medvision.serving.engine import ModelInfo, Prediction


def printable(text: str, length: int) -> str:
    """``text`` without control characters (a NUL cannot even be stored in PostgreSQL), cut to ``length``."""
    return "".join(c for c in text if c.isprintable())[:length]


def accession_of(source: str | bytes) -> str:
    """The exam's Accession Number, which readers search the worklist by (stored, never logged); "" if unreadable."""
    import io

    from pydicom import dcmread

    try:
        ds = dcmread(io.BytesIO(source) if isinstance(source, bytes) else source, stop_before_pixels=True,
                     specific_tags=["AccessionNumber"])
        return printable(str(ds.get("AccessionNumber", "") or ""), 16)
    except Exception:  # the image was scored; a header that cannot be re-read only costs the search key
        return ""


_STATEMENTS: dict[str, dict] = {}


def _statements(dialect: str) -> dict:
    """The scoring path's statements, built once per SQL dialect and executed with parameters: building a
    SQLAlchemy statement costs more than running it against SQLite."""
    if dialect not in _STATEMENTS:
        if dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        images, usage, audit = ScoredImage.__table__, Usage.__table__, AuditEvent.__table__
        result = insert(images)
        replaced = {c: result.excluded[c] for c in ("study_instance_uid", "key_id", "probability", "label", "threshold",
                                                    "model_name", "artifact_sha256", "inference_ms", "decode",
                                                    "scored_at", "profile", "calibration_id")}
        # a re-score without an accession number keeps the one recorded before
        replaced["accession_number"] = case((result.excluded.accession_number != "", result.excluded.accession_number),
                                            else_=images.c.accession_number)
        metered = insert(usage)
        _STATEMENTS[dialect] = {
            "study_seen": select(images.c.id).where(images.c.site == bindparam("site"),
                                                    images.c.study_instance_uid == bindparam("study"),
                                                    images.c.key_id.is_not_distinct_from(bindparam("key_id"))).limit(1),
            # a re-score replaces the row of the same site only: the same UID from another site is another row
            "result": result.on_conflict_do_update(index_elements=["site", "sop_instance_uid"], set_=replaced),
            # increments in SQL, not read-modify-write: concurrent workers must not lose each other's counts
            "usage": metered.on_conflict_do_update(index_elements=["day", "meter"], set_={
                "images": usage.c.images + metered.excluded.images,
                "inference_ms": usage.c.inference_ms + metered.excluded.inference_ms}),
            "new_study": update(usage).where(usage.c.day == bindparam("d"), usage.c.meter == bindparam("m"))
                                      .values(studies=usage.c.studies + 1),
            "audit": audit.insert(),
        }
    return _STATEMENTS[dialect]


def record_score(sessions: sessionmaker[Session], owner: Owner, result: Prediction, model: ModelInfo,
                 audit_event: AuditEvent | None = None, accession: str = "") -> None:
    """Store ``result`` (made by ``model``) for ``owner``'s site (a SOP Instance UID the site re-scores replaces its row) and meter it
    for the key, with the audit record of the access, in one transaction.

    Both writes are upserts (``INSERT ... ON CONFLICT DO UPDATE``): two requests creating the same result or
    usage row at once both land, the usage counts as increments in SQL, never a lost update, and a study
    counts once however many of its images are scored at the same time.
    """
    with sessions() as db:
        record_into(db, owner, result, model, audit_event, accession)
        db.commit()


def record_into(db: Session, owner: Owner, result: Prediction, model: ModelInfo,
                audit_event: AuditEvent | None = None, accession: str = "") -> None:
    """``record_score``'s writes in ``db``'s transaction, left to the caller to commit (with others: ``Recorder``)."""
    day = _dt.datetime.now(_dt.UTC).date().isoformat()
    key_id, sop_uid, study_uid = owner.key_id, result.meta.sop_instance_uid, result.meta.study_instance_uid
    conn = db.connection()  # Core execution: the ORM session's execute path costs more than these statements
    sql = _statements(conn.dialect.name)
    # The usage row first: it locks this site's (day, key) row (SQLite: the database) until the commit, so
    # the site's scorers take turns from here on and each sees the results the others committed — four views
    # of one study scored at once count as one study, not four.
    conn.execute(sql["usage"], {"day": day, "site": owner.site, "meter": owner.meter, "key_id": key_id, "images": 1,
                                "studies": 0, "inference_ms": result.inference_ms})
    if sop_uid:
        study = study_uid or ""
        if study and conn.execute(sql["study_seen"], {"site": owner.site, "study": study,
                                                      "key_id": key_id}).first() is None:
            conn.execute(sql["new_study"], {"d": day, "m": owner.meter})
        conn.execute(sql["result"], {
            "site": owner.site, "sop_instance_uid": sop_uid, "study_instance_uid": study, "key_id": key_id,
            "probability": result.probability, "decode": result.meta.decode[:96],
            "label": result.label, "threshold": result.threshold, "model_name": model.name,
            "artifact_sha256": model.artifact_sha256, "inference_ms": result.inference_ms, "scored_at": utcnow(),
            "accession_number": printable(accession or "", 16), "profile": result.profile,
            "calibration_id": result.calibration_id})
    if audit_event is not None:  # the access record commits with the result it describes
        conn.execute(sql["audit"], {c.key: getattr(audit_event, c.key) for c in AuditEvent.__table__.columns
                                    if getattr(audit_event, c.key) is not None})
