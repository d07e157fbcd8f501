"""The reading loop's data: the AI-prioritised worklist, readers' calls, their export and agreement rates.

A study is a site's study: the same Study UID from two sites is two worklist entries, each with its own images,
result and calls. A study's AI result is its most suspicious image (highest probability; positive when any
image is at or above its operating threshold). Status is the team's, not one reader's: *unread* (no call yet), *read*
(calls, none a disagreement) or *disagreed* (at least one reader disagreed with the AI).
"""

from __future__ import annotations

import csv
import datetime as _dt
import io

from sqlalchemy import and_, case, func, or_, select
from sqlalchemy.orm import Session

from medvision.errors import ConfigError
from medvision.serving.tables import Instance, Review, ScoredImage, User, utcnow

CALLS = ("agree", "disagree", "uncertain")
BIRADS = ("", "0", "1", "2", "3", "4", "4A", "4B", "4C", "5", "6")
STATUSES = ("unread", "read", "disagreed")
MAX_COMMENT = 2000


def _studies(site: str | None = None, study_uid: str | None = None):
    """One row per scored (site, study) (or only ``site``'s ``study_uid``): its most suspicious probability,
    threshold, images, model."""
    s = ScoredImage
    query = (select(s.site.label("site"), s.study_instance_uid.label("study"), func.max(s.probability).label("probability"),
                   func.max(s.threshold).label("threshold"), func.count(s.id).label("images"),
                   func.sum(case((s.probability >= s.threshold, 1), else_=0)).label("positives"),
                   func.max(s.scored_at).label("scored_at"), func.max(s.accession_number).label("accession"),
                   func.max(s.model_name).label("model_name"), func.max(s.artifact_sha256).label("artifact_sha256"))
            .where(s.study_instance_uid != "").group_by(s.site, s.study_instance_uid))
    if study_uid:
        query = query.where(s.site == site, s.study_instance_uid == study_uid)
    return query


def _calls():
    r = Review
    return (select(r.site.label("site"), r.study_instance_uid.label("study"), func.count(r.id).label("calls"),
                   func.sum(case((r.call == "disagree", 1), else_=0)).label("disagreements"))
            .group_by(r.site, r.study_instance_uid))


def worklist(db: Session, status: str | None = None, model: str | None = None, site: str | None = None,
             day_from: _dt.date | None = None, day_to: _dt.date | None = None, q: str | None = None,
             sort: str = "suspicion", limit: int = 500, study_uid: str | None = None) -> list[dict]:
    """Scored studies, most suspicious first (``sort="suspicion"``) or newest first (``"newest"``);
    ``site`` with ``study_uid`` looks up one study without aggregating the others."""
    if status and status not in STATUSES:
        raise ConfigError(f"status must be one of {', '.join(STATUSES)}")
    studies, calls = _studies(site, study_uid).subquery(), _calls().subquery()
    query = (select(studies, calls.c.calls, calls.c.disagreements)
             .outerjoin(calls, (calls.c.site == studies.c.site) & (calls.c.study == studies.c.study)))
    if status == "unread":
        query = query.where(calls.c.calls.is_(None))
    elif status == "read":
        query = query.where(calls.c.calls > 0, calls.c.disagreements == 0)
    elif status == "disagreed":
        query = query.where(calls.c.disagreements > 0)
    if model:
        query = query.where(studies.c.artifact_sha256.startswith(model))
    if site:
        query = query.where(studies.c.site == site)
    if day_from:
        query = query.where(studies.c.scored_at >= _dt.datetime.combine(day_from, _dt.time(), _dt.UTC))
    if day_to:
        query = query.where(studies.c.scored_at < _dt.datetime.combine(day_to + _dt.timedelta(days=1), _dt.time(), _dt.UTC))
    if q:
        q = q.strip()
        query = query.where(or_(studies.c.study == q, and_(studies.c.accession != "", studies.c.accession == q)))
    order = ((studies.c.probability.desc(), studies.c.study, studies.c.site) if sort != "newest"
             else (studies.c.scored_at.desc(), studies.c.study, studies.c.site))
    rows = db.execute(query.order_by(*order).limit(limit)).mappings()
    out = []
    for r in rows:
        calls_n, disagreements = r["calls"] or 0, r["disagreements"] or 0
        out.append({
            "study_instance_uid": r["study"], "accession": r["accession"] or "", "probability": float(r["probability"]),
            "threshold": float(r["threshold"]), "ai_positive": bool(r["positives"]), "images": int(r["images"]),
            "scored_at": iso(r["scored_at"]), "model_name": r["model_name"], "model_version": r["artifact_sha256"][:12],
            "artifact_sha256": r["artifact_sha256"],
            "site": r["site"], "calls": int(calls_n),
            "status": "unread" if not calls_n else "disagreed" if disagreements else "read",
        })
    return out


def iso(t: _dt.datetime | None) -> str:
    if t is None:
        return ""
    return (t if t.tzinfo else t.replace(tzinfo=_dt.UTC)).isoformat(timespec="seconds")


def filters(db: Session) -> dict:
    """The choices the worklist's filters offer: model versions and sites that have scored studies."""
    models = db.execute(select(ScoredImage.model_name, ScoredImage.artifact_sha256).distinct()).all()
    sites = db.scalars(select(ScoredImage.site).where(ScoredImage.site != "").distinct()).all()
    return {"models": sorted({(m, sha[:12]) for m, sha in models}), "sites": sorted(sites)}


def study(db: Session, site: str, study_uid: str) -> dict | None:
    """The site's study: its AI result and images (``image_id`` names the stored file where the service has one)."""
    found = worklist(db, site=site, study_uid=study_uid, limit=1)
    if not found:
        return None
    images = db.execute(
        select(ScoredImage.sop_instance_uid, ScoredImage.probability, ScoredImage.threshold, Instance.id,
               ScoredImage.calibration_id)
        .outerjoin(Instance, (Instance.site == ScoredImage.site) & (Instance.sop_instance_uid == ScoredImage.sop_instance_uid))
        .where(ScoredImage.site == site, ScoredImage.study_instance_uid == study_uid)
        .order_by(ScoredImage.sop_instance_uid)).all()
    calls = db.execute(select(Review, User.username).join(User, User.id == Review.user_id)
                       .where(Review.site == site, Review.study_instance_uid == study_uid)
                       .order_by(Review.called_at)).all()
    return {**found[0],
            "images_detail": [{"sop_instance_uid": uid, "probability": float(p), "threshold": float(t),
                               "image_id": image_id, "calibration_id": cal} for uid, p, t, image_id, cal in images],
            "reviews": [{"reader": name, "call": r.call, "birads": r.birads, "comment": r.comment,
                         "called_at": iso(r.called_at)} for r, name in calls]}


def image_path(db: Session, image_id: int) -> str | None:
    """Where a received image is stored (``image_id``: its row in ``instances``)."""
    return db.scalar(select(Instance.path).where(Instance.id == image_id))


def neighbours(db: Session, study: tuple[str, str], **filters) -> tuple[dict | None, dict | None]:
    """The studies before and after ``study`` (site, Study UID) in the worklist order with the same filters, each as
    ``{"site", "study_instance_uid"}``."""
    keys = [{"site": r["site"], "study_instance_uid": r["study_instance_uid"]} for r in worklist(db, **filters)]
    here = {"site": study[0], "study_instance_uid": study[1]}
    if here not in keys:
        return None, keys[0] if keys else None
    i = keys.index(here)
    return (keys[i - 1] if i > 0 else None), (keys[i + 1] if i + 1 < len(keys) else None)


def record_call(db: Session, site: str, study_uid: str, user_id: int, call: str, birads: str = "",
                comment: str = "") -> Review:
    """The reader's call on a site's study (a second call by the same reader replaces the first)."""
    if call not in CALLS:
        raise ConfigError(f"call must be one of {', '.join(CALLS)}")
    birads = (birads or "").strip().upper()
    if birads not in BIRADS:
        raise ConfigError(f"BI-RADS must be one of {', '.join(b for b in BIRADS if b)} or empty")
    comment = (comment or "").strip()
    if len(comment) > MAX_COMMENT:
        raise ConfigError(f"a comment is at most {MAX_COMMENT} characters")
    if any(not (c.isprintable() or c in "\n\t") for c in comment):
        raise ConfigError("a comment holds control characters: only text, line breaks and tabs")
    found = worklist(db, site=site, study_uid=study_uid, limit=1)
    if not found:
        raise LookupError(study_uid)
    ai = found[0]
    row = db.scalar(select(Review).where(Review.site == site, Review.study_instance_uid == study_uid,
                                         Review.user_id == user_id))
    if row is None:
        row = Review(site=site, study_instance_uid=study_uid, user_id=user_id)
        db.add(row)
    row.call, row.birads, row.comment = call, birads, comment
    row.model_name, row.artifact_sha256 = ai["model_name"], ai["artifact_sha256"]
    row.probability, row.threshold, row.called_at = ai["probability"], ai["threshold"], utcnow()
    return row


EXPORT_COLUMNS = ("site", "study_instance_uid", "accession", "reader", "call", "birads", "comment", "called_at",
                  "ai_probability", "ai_threshold", "ai_positive", "model_name", "artifact_sha256")


def spreadsheet_safe(text: str) -> str:
    """A cell a spreadsheet shows as text: one starting with = + - @ or a tab / carriage return would be run as a
    formula (CSV injection, OWASP), so it gets a leading apostrophe."""
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def export_csv(db: Session) -> str:
    """Every reader's current call with the AI result it was made against, for local recalibration. Free text
    (comments) and values from received files (accession numbers) are made spreadsheet-safe."""
    s = ScoredImage
    accession = (select(s.site.label("site"), s.study_instance_uid.label("study"), func.max(s.accession_number).label("acc"))
                 .group_by(s.site, s.study_instance_uid).subquery())
    rows = db.execute(select(Review, User.username, accession.c.acc).join(User, User.id == Review.user_id)
                      .outerjoin(accession, (accession.c.site == Review.site) & (accession.c.study == Review.study_instance_uid))
                      .order_by(Review.called_at, Review.id)).all()
    buf = io.StringIO()
    out = csv.writer(buf)
    out.writerow(EXPORT_COLUMNS)
    for r, reader, acc in rows:
        out.writerow([r.site, r.study_instance_uid, spreadsheet_safe(acc or ""), reader, r.call, r.birads,
                      spreadsheet_safe(r.comment), iso(r.called_at),
                      f"{r.probability:.6f}", f"{r.threshold:.6f}", int(r.probability >= r.threshold), r.model_name,
                      r.artifact_sha256])
    return buf.getvalue()


def agreement(db: Session) -> list[dict]:
    """Per model version: calls, and the share that agree / disagree / are uncertain."""
    rows = db.execute(select(Review.model_name, Review.artifact_sha256, Review.call, func.count(Review.id))
                      .group_by(Review.model_name, Review.artifact_sha256, Review.call)).all()
    by_model: dict[tuple[str, str], dict[str, int]] = {}
    for name, sha, call, n in rows:
        by_model.setdefault((name, sha), {c: 0 for c in CALLS})[call] = n
    out = []
    for (name, sha), counts in sorted(by_model.items()):
        total = sum(counts.values())
        out.append({"model_name": name, "model_version": sha[:12], "calls": total, **counts,
                    **{f"{c}_rate": counts[c] / total for c in CALLS}})
    return out
