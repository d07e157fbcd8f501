"""Pull mode: fetch a study from the configured PACS (QIDO-RS, then WADO-RS with dicomweb-client) and queue it.

Only the PACS named in the settings is ever contacted: a URL taken from a request would let any API
key make the service fetch from arbitrary hosts. The PACS's answers are data from outside too: the series and
instance UIDs it lists are checked before they go into a WADO-RS URL.
"""

from __future__ import annotations

import os

from pydicom import Dataset
from sqlalchemy.orm import Session, sessionmaker

from medvision.dicom_io import ReadLimits
from medvision.errors import InvalidUidError
from medvision.identifiers import check_uid
from medvision.serving.errors import PacsNotConfigured, PacsUnavailable, StudyNotFound
from medvision.serving.identifiers import Owner
from medvision.serving.storage import DataFolder
from medvision.serving.stow import CANNOT_UNDERSTAND, Outcome, enqueue, store_file


def pacs_client(settings):
    from dicomweb_client.api import DICOMwebClient
    from dicomweb_client.session_utils import create_session, create_session_from_user_pass

    if not settings.pacs_url:
        raise PacsNotConfigured("no PACS is configured: set MEDVISION_PACS_URL to its DICOMweb root")
    session = (create_session_from_user_pass(settings.pacs_username, settings.pacs_password)
               if settings.pacs_username else create_session())
    return DICOMwebClient(url=settings.pacs_url, session=session)


def _listed(meta: dict, keyword: str, what: str) -> str:
    """A UID of a QIDO-RS result (DICOM JSON), read by pydicom."""
    try:
        value = Dataset.from_json(meta).get(keyword)
    except Exception:  # DICOM JSON that pydicom cannot read: as good as no UID
        value = None
    if not value:
        raise InvalidUidError(f"the PACS listed an instance without a {what}")
    return check_uid(str(value), what)


def pull_study(settings, sessions: sessionmaker[Session], folder: DataFolder, study_uid: str,
               owner: Owner) -> list[Outcome]:
    """Blocking (run it in a worker thread): every instance of the study, filed for ``owner`` as if pushed."""
    client = pacs_client(settings)
    try:
        found = client.search_for_instances(study_instance_uid=study_uid)
    except Exception as exc:  # requests / HTTP errors of many kinds: the PACS could not answer
        raise PacsUnavailable(f"the PACS did not answer the QIDO-RS query: {type(exc).__name__}") from None
    if not found:
        raise StudyNotFound("the PACS holds no instances of this study")
    limits = ReadLimits(max_pixels=settings.max_pixels)
    outcomes = []
    for meta in found:
        try:
            series = _listed(meta, "SeriesInstanceUID", "Series Instance UID")
            sop = _listed(meta, "SOPInstanceUID", "SOP Instance UID")
        except InvalidUidError as exc:
            outcomes.append(Outcome(failure=CANNOT_UNDERSTAND, reason=exc.code))
            continue
        try:
            ds = client.retrieve_instance(study_uid, series, sop)
        except Exception as exc:
            raise PacsUnavailable(f"the PACS did not return an instance by WADO-RS: {type(exc).__name__}") from None
        fd, path = folder.temporary(".dcm")
        with os.fdopen(fd, "wb") as fh:
            ds.save_as(fh, enforce_file_format=True)
        outcomes.append(store_file(path, sessions, folder, owner, study_uid, limits))
    enqueue(sessions, {(owner.site, study_uid)}, settings.study_stable_seconds)
    return outcomes
