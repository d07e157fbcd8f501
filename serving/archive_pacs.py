"""Fetch studies from a PACS over DICOMweb (WADO-RS, dicomweb-client) into a folder ``medvision score`` reads.

Each study lands in ``FOLDER/<study uid>/<sop uid>.dcm`` and is marked complete only once every instance
is on disk, so an interrupted fetch is redone and a finished one is never fetched twice. HTTP basic
credentials come from ``MEDVISION_PACS_USERNAME`` / ``MEDVISION_PACS_PASSWORD`` when set. Both UIDs name a path,
so both are checked first (the PACS's answers are data from outside too): an instance whose SOP Instance UID is
malformed is skipped, with a warning.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from medvision.errors import ConfigError
from medvision.identifiers import is_uid
from medvision.progress import progress_bar

log = logging.getLogger(__name__)


def parse_studies(spec: str | None) -> list[str]:
    if not spec:
        raise ConfigError("--pacs needs --studies: Study Instance UIDs, comma-separated or a file with one per line")
    p = Path(spec)
    items = p.read_text().split() if p.is_file() else spec.split(",")
    uids = [u.strip() for u in items if u.strip()]
    bad = [u for u in uids if not is_uid(u)]
    if bad:
        raise ConfigError(f"not a Study Instance UID: {bad[0]!r} (digits and dots, no empty or leading-zero "
                          "components, at most 64 characters)")
    return list(dict.fromkeys(uids))


def fetch_studies(url: str, spec: str | None, folder: Path, show_progress: bool = True) -> tuple[list[str], list[str]]:
    """Paths of the fetched instances, and the studies the PACS does not have."""
    from dicomweb_client.api import DICOMwebClient
    from requests.exceptions import ConnectionError as RequestsConnectionError
    from requests.exceptions import HTTPError

    uids = parse_studies(spec)
    session = None
    if os.environ.get("MEDVISION_PACS_USERNAME"):
        from dicomweb_client.session_utils import create_session_from_user_pass

        session = create_session_from_user_pass(os.environ["MEDVISION_PACS_USERNAME"],
                                                os.environ.get("MEDVISION_PACS_PASSWORD", ""))
    client = DICOMwebClient(url=url.rstrip("/"), session=session)
    paths, missing = [], []
    with progress_bar("fetch (WADO-RS)", total=len(uids), enabled=show_progress) as advance:
        for uid in uids:
            target = folder / uid
            if not (target / ".complete").is_file():
                try:
                    instances = client.retrieve_study(uid)
                except HTTPError as exc:
                    if exc.response is not None and exc.response.status_code == 404:
                        missing.append(uid)
                        advance()
                        continue
                    raise ConfigError(f"the PACS at {url} refused study {uid}: HTTP {exc.response.status_code}") from None
                except RequestsConnectionError:
                    raise ConfigError(f"cannot reach the PACS at {url}") from None
                target.mkdir(parents=True, exist_ok=True)
                malformed = [ds for ds in instances if not is_uid(str(ds.get("SOPInstanceUID", "")))]
                if malformed:
                    log.warning("skipped %d instance(s) whose SOP Instance UID is malformed", len(malformed))
                for ds in instances:
                    if any(ds is m for m in malformed):
                        continue
                    tmp = target / f"{ds.SOPInstanceUID}.tmp"
                    ds.save_as(tmp, enforce_file_format=True)
                    os.replace(tmp, target / f"{ds.SOPInstanceUID}.dcm")
                if not instances:
                    missing.append(uid)
                (target / ".complete").touch()
            paths += sorted(str(p.resolve()) for p in target.glob("*.dcm"))
            advance()
    if missing:
        log.warning("%d of %d studies were not found on the PACS", len(missing), len(uids))
    return paths, missing
