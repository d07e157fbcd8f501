"""Pull mode: fetch a study from the configured PACS (QIDO-RS, then WADO-RS with dicomweb-client) and queue it.

Only the PACS named in the settings is ever contacted: a URL taken from a request would let any API
key make the service fetch from arbitrary hosts.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from medvision.dicom_io import ReadLimits
from medvision.serving.errors import PacsNotConfigured, PacsUnavailable, StudyNotFound
from medvision.serving.stow import Outcome, enqueue, store_file


def pacs_client(settings):
    from dicomweb_client.api import DICOMwebClient
    from dicomweb_client.session_utils import create_session, create_session_from_user_pass

    if not settings.pacs_url:
        raise PacsNotConfigured("no PACS is configured: set MEDVISION_PACS_URL to its DICOMweb root")
    session = (create_session_from_user_pass(settings.pacs_username, settings.pacs_password)
               if settings.pacs_username else create_session())
    return DICOMwebClient(url=settings.pacs_url, session=session)


def pull_study(settings, sessions: sessionmaker[Session], study_uid: str, key_id: int | None) -> list[Outcome]:
    """Blocking (run it in a worker thread): every instance of the study, filed as if it had been pushed."""
    client = pacs_client(settings)
    try:
        found = client.search_for_instances(study_instance_uid=study_uid)
    except Exception as exc:  # requests / HTTP errors of many kinds: the PACS could not answer
        raise PacsUnavailable(f"the PACS did not answer the QIDO-RS query: {type(exc).__name__}") from None
    if not found:
        raise StudyNotFound("the PACS holds no instances of this study")
    storage = Path(settings.data_dir) / "instances"
    incoming = Path(settings.data_dir) / "incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    limits = ReadLimits(max_pixels=settings.max_pixels)
    outcomes = []
    for meta in found:
        series = meta["0020000E"]["Value"][0]
        sop = meta["00080018"]["Value"][0]
        try:
            ds = client.retrieve_instance(study_uid, series, sop)
        except Exception as exc:
            raise PacsUnavailable(f"the PACS did not return an instance by WADO-RS: {type(exc).__name__}") from None
        with tempfile.NamedTemporaryFile(dir=incoming, suffix=".dcm", delete=False) as fh:
            path = Path(fh.name)
        ds.save_as(path, enforce_file_format=True)
        outcomes.append(store_file(path, sessions, storage, key_id, study_uid, limits))
    enqueue(sessions, {study_uid}, settings.study_stable_seconds)
    return outcomes
