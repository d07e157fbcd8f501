"""The service's tables (SQLAlchemy 2 ORM). The schema itself is created and changed by Alembic
migrations (``medvision/serving/migrations``), never by ``create_all``, so SQLite and PostgreSQL
deployments upgrade the same way.

No patient identifiers are stored: studies and images are keyed by their DICOM UIDs, which the
service needs to send results back to the PACS, and the accession number, which readers search by.

Everything received belongs to a **site** (the sending API key's site): studies, instances, results, jobs and
readers' calls are unique per site and UID, never per UID alone, so another site sending the same UIDs gets
records of its own and can neither see nor change the first site's.
"""

from __future__ import annotations

import datetime as _dt
from enum import StrEnum

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class StudyState(StrEnum):
    """Where a received study stands (stored as its value)."""

    RECEIVED = "received"  # instances arrived; not scored yet (or more arrived since)
    SCORED = "scored"  # every instance scored or refused, the report written
    FAILED = "failed"  # nothing could be scored, or the job ran out of attempts


class InstanceState(StrEnum):
    RECEIVED = "received"
    SCORED = "scored"
    REFUSED = "refused"  # error_code says why


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"  # claimed under a lease; a lapsed lease makes it claimable again
    DONE = "done"
    FAILED = "failed"


def utcnow() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


class Base(DeclarativeBase):
    pass


class ApiKey(Base):
    """An API key: only its SHA-256 is stored; ``prefix`` (public) finds it, the secret proves it."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    site: Mapped[str] = mapped_column(String(64), doc="the site that owns what this key sends (several keys may share "
                                      "one site, e.g. while a key is rotated)")
    prefix: Mapped[str] = mapped_column(String(16), unique=True, index=True)
    secret_sha256: Mapped[str] = mapped_column(String(64))
    scopes: Mapped[str] = mapped_column(String(128), doc="comma-separated: score, pull, review, admin")
    created_at: Mapped[_dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    revoked_at: Mapped[_dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    last_used_at: Mapped[_dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class User(Base):
    """A person who signs in to the review UI; only a salted scrypt hash of the password is stored."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    password_hash: Mapped[str] = mapped_column(String(256))
    role: Mapped[str] = mapped_column(String(16), doc="reader or admin")
    created_at: Mapped[_dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    disabled_at: Mapped[_dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class LoginFailure(Base):
    """A failed sign-in, for throttling by client address (never by account alone: that would let anyone lock a
    named reader out). The typed user name is kept only as a keyed digest: people type passwords into it."""

    __tablename__ = "login_failures"
    __table_args__ = (Index("ix_login_failures_address_at", "address", "at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[_dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    address: Mapped[str] = mapped_column(String(64))
    username_digest: Mapped[str] = mapped_column(String(64))


class UiSession(Base):
    """A signed-in browser: the cookie holds a random token, the table its SHA-256."""

    __tablename__ = "ui_sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[_dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[_dt.datetime] = mapped_column(DateTime(timezone=True))


class Review(Base):
    """A reader's call on a study, with the AI result it was made against (one row per reader and study;
    every change is also in the audit log)."""

    __tablename__ = "reviews"
    __table_args__ = (UniqueConstraint("site", "study_instance_uid", "user_id", name="uq_reviews_site_study_user"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    site: Mapped[str] = mapped_column(String(64), default="")
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    call: Mapped[str] = mapped_column(String(16), doc="agree, disagree or uncertain")
    birads: Mapped[str] = mapped_column(String(4), default="")
    comment: Mapped[str] = mapped_column(Text, default="")
    model_name: Mapped[str] = mapped_column(String(128))
    artifact_sha256: Mapped[str] = mapped_column(String(64))
    probability: Mapped[float] = mapped_column(Float, doc="the study's AI probability the reader saw")
    threshold: Mapped[float] = mapped_column(Float)
    called_at: Mapped[_dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class AuditEvent(Base):
    """One access: who (key), what (action on a resource), when, how it ended, and the request id."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    at: Mapped[_dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id"), nullable=True, index=True)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), nullable=True, index=True,
                                                doc="the reader, for actions in the review UI")
    action: Mapped[str] = mapped_column(String(64))
    resource: Mapped[str] = mapped_column(String(256), default="")
    status: Mapped[int] = mapped_column(Integer)
    request_id: Mapped[str] = mapped_column(String(64), default="")
    detail: Mapped[dict] = mapped_column(JSON, default=dict)


class Usage(Base):
    """Images and studies scored per sender per UTC day: what a deployment bills or budgets by. A sender is an API
    key (``meter`` ``key:<id>``) or the site's DICOM callers together (``dimse:<site>``)."""

    __tablename__ = "usage"
    __table_args__ = (UniqueConstraint("day", "meter", name="uq_usage_day_meter"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    day: Mapped[str] = mapped_column(String(10), index=True, doc="YYYY-MM-DD, UTC")
    site: Mapped[str] = mapped_column(String(64), default="")
    meter: Mapped[str] = mapped_column(String(80), doc="key:<id> or dimse:<site>")
    key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id"), nullable=True)
    images: Mapped[int] = mapped_column(Integer, default=0)
    studies: Mapped[int] = mapped_column(Integer, default=0)
    inference_ms: Mapped[float] = mapped_column(Float, default=0.0)


class ScoredImage(Base):
    """One scored image; re-sending the same SOP Instance UID returns this row instead of scoring again."""

    __tablename__ = "scored_images"
    __table_args__ = (UniqueConstraint("site", "sop_instance_uid", name="uq_scored_images_site_sop"),
                      Index("ix_scored_images_site_scored_at", "site", "scored_at"),
                      Index("ix_scored_images_site_study", "site", "study_instance_uid"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    site: Mapped[str] = mapped_column(String(64), default="")
    sop_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True, default="")
    accession_number: Mapped[str] = mapped_column(String(16), default="", index=True)
    key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id"), nullable=True)
    probability: Mapped[float] = mapped_column(Float)
    label: Mapped[str] = mapped_column(String(32))
    threshold: Mapped[float] = mapped_column(Float)
    model_name: Mapped[str] = mapped_column(String(128))
    artifact_sha256: Mapped[str] = mapped_column(String(64))
    inference_ms: Mapped[float] = mapped_column(Float)
    decode: Mapped[str] = mapped_column(String(96), default="", doc="how the image was decoded, e.g. '1/8 wavelet'")
    scored_at: Mapped[_dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    note: Mapped[str] = mapped_column(Text, default="")
    profile: Mapped[dict | None] = mapped_column(JSON, nullable=True, doc="drift quantities (medvision.drift.profile): "
                                                 "header attributes, input statistics, probability; no identifiers")
    calibration_id: Mapped[int | None] = mapped_column(Integer, nullable=True, doc="the site calibration that made "
                                                       "probability and threshold; None: the model's own")


class SiteCalibrationRow(Base):
    """A site's overlay (``medvision.site_calibration.SiteCalibration``), active while ``removed_at`` is None."""

    __tablename__ = "site_calibrations"
    __table_args__ = (Index("ix_site_calibrations_site_artifact", "site", "artifact_sha256"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    site: Mapped[str] = mapped_column(String(64))
    artifact_sha256: Mapped[str] = mapped_column(String(64))
    overlay: Mapped[dict] = mapped_column(JSON)
    applied_by: Mapped[str] = mapped_column(String(128))
    applied_at: Mapped[_dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    removed_by: Mapped[str | None] = mapped_column(String(128), nullable=True)
    removed_at: Mapped[_dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class Study(Base):
    """A study received over STOW-RS: where its scoring stands and where its report went."""

    __tablename__ = "studies"
    __table_args__ = (UniqueConstraint("site", "study_instance_uid", name="uq_studies_site_study"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    site: Mapped[str] = mapped_column(String(64), default="")
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id"), nullable=True)
    received_at: Mapped[_dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[_dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    status: Mapped[str] = mapped_column(String(16), default=StudyState.RECEIVED, doc="a StudyState")
    report_series_instance_uid: Mapped[str] = mapped_column(String(64), default="")
    report_sop_instance_uid: Mapped[str] = mapped_column(String(64), default="")
    report_path: Mapped[str] = mapped_column(String(512), default="")
    report_files: Mapped[list] = mapped_column(JSON, default=list, doc="the SR and its heatmap captures, in order")
    pushed_at: Mapped[_dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    push_error: Mapped[str] = mapped_column(String(256), default="")
    push_attempts: Mapped[int] = mapped_column(Integer, default=0)
    push_next_at: Mapped[_dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True, index=True,
                                                              doc="the next STOW-RS attempt is due (None: none due)")
    dimse_sent_at: Mapped[_dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True,
                                                               doc="when the report went back by C-STORE")
    dimse_error: Mapped[str] = mapped_column(String(256), default="")
    dimse_attempts: Mapped[int] = mapped_column(Integer, default=0)
    dimse_next_at: Mapped[_dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True, index=True,
                                                               doc="the next C-STORE attempt is due (None: none due)")


class Instance(Base):
    """A received DICOM instance, stored on disk before the STOW-RS response acknowledged it."""

    __tablename__ = "instances"
    __table_args__ = (UniqueConstraint("site", "sop_instance_uid", name="uq_instances_site_sop"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    site: Mapped[str] = mapped_column(String(64), default="")
    sop_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), default="")
    sop_class_uid: Mapped[str] = mapped_column(String(64), default="")
    path: Mapped[str] = mapped_column(String(512), doc="inside the data folder, named by the service (never by a UID)")
    received_at: Mapped[_dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    status: Mapped[str] = mapped_column(String(16), default=InstanceState.RECEIVED, doc="an InstanceState")
    error_code: Mapped[str] = mapped_column(String(64), default="")


class Job(Base):
    """Scoring work for one study, claimed by one worker at a time under a renewable lease."""

    __tablename__ = "jobs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    site: Mapped[str] = mapped_column(String(64), default="")
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    status: Mapped[str] = mapped_column(String(16), default=JobState.QUEUED, index=True, doc="a JobState")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_owner: Mapped[str] = mapped_column(String(64), default="")
    lease_until: Mapped[_dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    not_before: Mapped[_dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    last_error: Mapped[str] = mapped_column(String(256), default="")
    created_at: Mapped[_dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[_dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
