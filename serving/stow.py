"""STOW-RS reception: a ``multipart/related; type="application/dicom"`` body, parsed as it streams in.

Every part is written to disk (fsync, then an atomic, exclusive link under a name the service chooses) and
recorded in the database before the response acknowledges it, so an instance the PACS was told is stored
survives a crash; its study is queued for scoring. Parts that are not usable DICOM images, or whose UIDs are
not well-formed, are reported per instance in the response with a DICOM failure reason, as PS3.18 says, and
the rest are still stored. What a site sends is that site's: the same UIDs from another site are another
site's records (``tables``).
"""

from __future__ import annotations

import datetime as _dt
import errno
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import Dataset
from python_multipart.multipart import MultipartParseError, MultipartParser
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from medvision.dicom_io import ReadLimits, read_header
from medvision.errors import (
    MedvisionError,
    MissingCodecError,
    NotAnImageError,
    NotDicomError,
    UnsupportedImageError,
)
from medvision.identifiers import check_uid
from medvision.serving.errors import (
    InsufficientStorage,
    MalformedRequest,
    PayloadTooLarge,
    TooManyParts,
    UnsupportedMediaType,
)
from medvision.serving.identifiers import Owner
from medvision.serving.storage import DataFolder
from medvision.serving.tables import Instance, InstanceState, Job, JobState, Study, utcnow

log = logging.getLogger("medvision.serving.stow")

# PS3.4 / PS3.18 failure reasons (Failure Reason, 0008,1197)
PROCESSING_FAILURE = 0x0110
SOP_CLASS_NOT_SUPPORTED = 0x0122
STUDY_MISMATCH = 0xA900  # "Data Set does not match SOP Class" is what PS3.18 asks for a wrong study
CANNOT_UNDERSTAND = 0xC000
TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122


@dataclass
class Part:
    path: Path
    content_type: str = ""
    size: int = 0
    disposition: str = ""  # Content-Disposition (form uploads name their file part there)


@dataclass
class Outcome:
    sop_class_uid: str = ""
    sop_instance_uid: str = ""
    study_instance_uid: str = ""
    series_instance_uid: str = ""
    failure: int | None = None
    reason: str = ""
    already_stored: bool = False


@dataclass
class _Collector:
    folder: DataFolder
    limit: int
    max_parts: int
    parts: list[Part] = field(default_factory=list)
    size: int = 0
    ended: bool = False
    _field: bytearray = field(default_factory=bytearray)
    _value: bytearray = field(default_factory=bytearray)
    _headers: dict = field(default_factory=dict)
    _fh: object = None

    def callbacks(self) -> dict:
        return {"on_part_begin": self.begin, "on_header_field": self.header_field,
                "on_header_value": self.header_value, "on_header_end": self.header_end,
                "on_headers_finished": self.headers_done, "on_part_data": self.data, "on_part_end": self.end,
                "on_end": self.finish}

    def begin(self) -> None:
        self._headers = {}

    def header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def header_end(self) -> None:
        self._headers[bytes(self._field).decode("latin-1").strip().lower()] = bytes(self._value).decode("latin-1").strip()
        self._field.clear()
        self._value.clear()

    def headers_done(self) -> None:
        if len(self.parts) >= self.max_parts:
            raise TooManyParts(f"a request holds at most {self.max_parts} parts (STOW-RS: send a larger study in "
                               "several requests)")
        fd, path = self.folder.temporary()
        self._fh = os.fdopen(fd, "wb")
        self.parts.append(Part(path, self._headers.get("content-type", "").split(";")[0].strip().lower(),
                               disposition=self._headers.get("content-disposition", "")))

    def data(self, data: bytes, start: int, end: int) -> None:
        n = end - start
        self.size += n
        if self.size > self.limit:
            raise PayloadTooLarge(f"the request body exceeds the limit of {self.limit:,} bytes")
        self.parts[-1].size += n
        self._fh.write(data[start:end])

    def end(self) -> None:
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self._fh.close()
        self._fh = None

    def finish(self) -> None:
        self.ended = True

    def cleanup(self) -> None:
        if self._fh is not None:
            try:
                self._fh.close()
            except OSError:  # its buffer could not be flushed (a full disk): the file goes anyway
                pass
            self._fh = None
        for p in self.parts:
            p.path.unlink(missing_ok=True)


def boundary_of(content_type: str) -> bytes:
    """The boundary of a ``multipart/related`` body whose root type is ``application/dicom``."""
    main, _, params = content_type.partition(";")
    if main.strip().lower() != "multipart/related":
        raise UnsupportedMediaType(f"STOW-RS takes 'multipart/related; type=\"application/dicom\"', not "
                                   f"'{main.strip() or 'no content type'}'")
    values = {}
    for item in params.split(";"):
        k, _, v = item.partition("=")
        values[k.strip().lower()] = v.strip().strip('"')
    if values.get("type", "application/dicom").lower() != "application/dicom":
        raise UnsupportedMediaType(f"only type=\"application/dicom\" parts are accepted (got {values['type']!r}); "
                                   "DICOM JSON / XML metadata with bulk data is not supported")
    if not values.get("boundary"):
        raise MalformedRequest("the multipart/related content type has no boundary parameter")
    return values["boundary"].encode("latin-1")


def form_boundary(content_type: str) -> bytes:
    """The boundary of a ``multipart/form-data`` body."""
    for item in content_type.partition(";")[2].split(";"):
        k, _, v = item.partition("=")
        if k.strip().lower() == "boundary" and v.strip().strip('"'):
            return v.strip().strip('"').encode("latin-1")
    raise MalformedRequest("the multipart/form-data content type has no boundary parameter")


async def receive_parts(request, folder: DataFolder, limit: int, max_parts: int,
                        boundary: bytes | None = None) -> list[Part]:
    """Stream a multipart body (STOW-RS's ``multipart/related`` unless ``boundary`` is given) into one private
    temporary file per part in the data folder; refuse a truncated or oversized body, or too many parts."""
    boundary = boundary or boundary_of(request.headers.get("content-type", ""))
    collector = _Collector(folder, limit, max_parts)
    parser = MultipartParser(boundary, collector.callbacks())
    try:
        async for chunk in request.stream():
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as exc:
        collector.cleanup()
        raise MalformedRequest(f"could not parse the multipart body: {exc}") from None
    except OSError as exc:
        collector.cleanup()
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            log.error("STOW-RS body refused: the data folder's disk is full")
            raise InsufficientStorage("the service's disk filled up while storing the body: nothing of it was "
                                      "kept") from None
        raise
    except BaseException:
        collector.cleanup()
        raise
    if not collector.ended:
        collector.cleanup()
        raise MalformedRequest("the multipart body ended before its closing boundary (truncated upload)")
    if not collector.parts:
        collector.cleanup()
        raise MalformedRequest("the multipart body holds no parts")
    return collector.parts


def _failure_for(exc: MedvisionError) -> int:
    if isinstance(exc, MissingCodecError):
        return TRANSFER_SYNTAX_NOT_SUPPORTED
    if isinstance(exc, (NotAnImageError, UnsupportedImageError)):
        return SOP_CLASS_NOT_SUPPORTED
    if isinstance(exc, NotDicomError):
        return CANNOT_UNDERSTAND
    return CANNOT_UNDERSTAND


def store_parts(parts: list[Part], sessions: sessionmaker[Session], folder: DataFolder, owner: Owner,
                study_in_url: str | None, limits: ReadLimits, stable_seconds: float = 0.0) -> list[Outcome]:
    """Validate, file and record every part, then queue the studies (blocking: run it in a worker thread)."""
    outcomes = []
    try:
        for part in parts:
            outcomes.append(_store_one(part, sessions, folder, owner, study_in_url, limits))
    finally:
        for part in parts:
            part.path.unlink(missing_ok=True)
        enqueue(sessions, {(owner.site, o.study_instance_uid) for o in outcomes if o.failure is None}, stable_seconds)
    return outcomes


def enqueue(sessions: sessionmaker[Session], studies: set[tuple[str, str]], stable_seconds: float) -> None:
    """One queued job per (site, study), due once the study is stable: no new instance for ``stable_seconds`` (as a
    PACS's "stable study" event), so a study arriving over several requests gets one report, not several."""
    not_before = utcnow() + _dt.timedelta(seconds=stable_seconds)
    for site, uid in sorted(studies):
        with sessions() as db:
            if db.scalar(select(Instance.id).where(Instance.site == site, Instance.study_instance_uid == uid,
                                                   Instance.status == InstanceState.RECEIVED).limit(1)) is None:
                continue  # everything of it is scored already: a re-send must not produce a second report
            job = db.scalar(select(Job).where(Job.site == site, Job.study_instance_uid == uid, Job.status == JobState.QUEUED))
            if job is None:
                db.add(Job(site=site, study_instance_uid=uid, not_before=not_before))
            else:
                job.not_before = not_before
            db.commit()


def store_file(path: Path, sessions: sessionmaker[Session], folder: DataFolder, owner: Owner, study_uid: str | None,
               limits: ReadLimits) -> Outcome:
    """File one DICOM already on local disk (e.g. fetched from the PACS by WADO-RS); ``path`` is consumed.
    The caller queues the study with ``enqueue`` once all its instances are filed."""
    try:
        return _store_one(Part(path, "application/dicom"), sessions, folder, owner, study_uid, limits)
    finally:
        path.unlink(missing_ok=True)


def _checked_uids(ds, meta) -> Outcome:
    """The part's UIDs, each checked: a malformed one (a path, a name, an over-long value) refuses the part."""
    out = Outcome()
    for field_name, what, value in (("sop_instance_uid", "SOP Instance UID", meta.sop_instance_uid),
                                    ("study_instance_uid", "Study Instance UID", meta.study_instance_uid),
                                    ("series_instance_uid", "Series Instance UID", ds.get("SeriesInstanceUID")),
                                    ("sop_class_uid", "SOP Class UID", ds.get("SOPClassUID"))):
        text = "" if value is None else str(value)
        if not text:
            out.failure, out.reason = CANNOT_UNDERSTAND, f"missing {what}"
            continue
        check_uid(text, what)
        setattr(out, field_name, text)
    return out


def _store_one(part: Part, sessions, folder: DataFolder, owner: Owner, study_in_url, limits) -> Outcome:
    if part.content_type not in ("application/dicom", ""):
        return Outcome(failure=CANNOT_UNDERSTAND, reason="not_application_dicom")
    try:
        ds, meta = read_header(part.path, limits)
        out = _checked_uids(ds, meta)
    except MedvisionError as exc:
        return Outcome(failure=_failure_for(exc), reason=exc.code)
    if out.failure is not None:
        return out
    if study_in_url and out.study_instance_uid != study_in_url:
        out.failure, out.reason = STUDY_MISMATCH, "instance belongs to another study than the request URL"
        return out
    mine = (Instance.site == owner.site, Instance.sop_instance_uid == out.sop_instance_uid)
    target: Path | None = None
    for _ in range(3):  # a concurrent request may create the same study row first: then try again, it exists
        with sessions() as db:
            try:
                if db.scalar(select(Instance.id).where(*mine)) is not None:
                    out.already_stored = True  # an idempotent re-send by the same site: stored and scored once
                    break
                target = target or folder.file_instance(part.path)
                db.add(Instance(site=owner.site, sop_instance_uid=out.sop_instance_uid,
                                study_instance_uid=out.study_instance_uid,
                                series_instance_uid=out.series_instance_uid, sop_class_uid=out.sop_class_uid,
                                path=str(target)))
                study = db.scalar(select(Study).where(Study.site == owner.site,
                                                      Study.study_instance_uid == out.study_instance_uid))
                if study is None:
                    db.add(Study(site=owner.site, study_instance_uid=out.study_instance_uid, key_id=owner.key_id))
                else:
                    study.updated_at = utcnow()
            except BaseException:  # the database (or the disk) failed before the commit: no row names the file
                if target is not None:
                    target.unlink(missing_ok=True)
                raise
            try:
                db.commit()
                return out
            except IntegrityError:
                db.rollback()
            # any other failure of the commit leaves the file: the row may have been written before the answer was
            # lost, and a file without a row is only garbage, a row without its file a lost instance
    else:
        out.failure, out.reason = PROCESSING_FAILURE, "the instance could not be recorded (concurrent requests)"
    if target is not None:
        target.unlink(missing_ok=True)
    return out


def response_body(outcomes: list[Outcome], base_url: str) -> tuple[int, dict]:
    """The PS3.18 store response (DICOM JSON) and its status: 200 all stored, 202 some failed, 409 none."""
    stored = [o for o in outcomes if o.failure is None]
    failed = [o for o in outcomes if o.failure is not None]
    response = Dataset()
    studies = sorted({o.study_instance_uid for o in stored})
    if len(studies) == 1:
        response.RetrieveURL = f"{base_url}/dicomweb/studies/{studies[0]}"
    if stored:
        response.ReferencedSOPSequence = [_item(o, RetrieveURL=f"{base_url}/dicomweb/studies/{o.study_instance_uid}"
                                                f"/series/{o.series_instance_uid}/instances/{o.sop_instance_uid}")
                                          for o in stored]
    if failed:
        response.FailedSOPSequence = [_item(o, FailureReason=o.failure) for o in failed]
    status = 200 if not failed else 202 if stored else 409
    return status, response.to_json_dict()


def _item(outcome: Outcome, **attributes) -> Dataset:
    item = Dataset()
    if outcome.sop_class_uid:
        item.ReferencedSOPClassUID = outcome.sop_class_uid
    if outcome.sop_instance_uid:
        item.ReferencedSOPInstanceUID = outcome.sop_instance_uid
    for keyword, value in attributes.items():
        setattr(item, keyword, value)
    return item


def requeue_orphans(sessions: sessionmaker[Session], stable_seconds: float = 0.0) -> int:
    """Studies with unscored instances but no live job (the service died between filing and queueing): queue them.
    Run at start-up; returns how many studies were queued."""
    with sessions() as db:
        pending = {tuple(row) for row in db.execute(select(Instance.site, Instance.study_instance_uid)
                                                    .where(Instance.status == InstanceState.RECEIVED).distinct())}
        live = {tuple(row) for row in db.execute(select(Job.site, Job.study_instance_uid)
                                                 .where(Job.status.in_((JobState.QUEUED, JobState.RUNNING))))}
    orphans = pending - live
    enqueue(sessions, orphans, stable_seconds)
    return len(orphans)
