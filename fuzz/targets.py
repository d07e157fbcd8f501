"""Fuzz targets: bytes from outside in, a documented refusal or a result out; anything else is a finding.

Each target takes the raw bytes a caller could send and runs them through the code that meets them first:

- ``read``: ``read_header`` and ``read_dicom`` on a file's bytes (also at a reduced decode), then the model's
  preprocessing (every LUT, window and photometric path a header can ask for). Refusals: ``MedvisionError``.
- ``stow``: a STOW-RS request body through the streaming multipart parser into the data folder, then filing and
  recording of every part (SQLite), as ``POST /dicomweb/studies`` does. Refusals: the service's 4xx errors and
  per-instance failure reasons in the outcome.
- ``dimse``: the data set of a C-STORE request, as the DICOM node receives it (file meta prepended from the
  request, written as it arrived, then filed and recorded). Refusals: failure reasons in the outcome.

A target raises only for a finding (an exception that is not a documented refusal, or a result that breaks an
invariant: non-finite model input, a file left behind). Used by ``tests/test_fuzz.py`` (a short run and every
kept finding replayed) and ``benchmarks/fuzz.py`` (the long run, with atheris).
"""

from __future__ import annotations

import asyncio
import atexit
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

TARGETS = ("read", "stow", "dimse")
# the transfer syntaxes a C-STORE input may declare: its first byte chooses one
DIMSE_SYNTAXES = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99",
                  "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70",
                  "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.5")
BOUNDARY = b"medvision-fuzz-boundary"


class Finding(AssertionError):
    """An invariant the target checks did not hold."""


# -- read ---------------------------------------------------------------------------------------------------------

_PRE = None


def read(data: bytes) -> None:
    global _PRE
    from medvision.dicom_io import ReadLimits, read_header
    from medvision.errors import MedvisionError
    from medvision.preprocess import Preprocess, PreprocessConfig

    if _PRE is None:
        _PRE = (Preprocess(PreprocessConfig(image_size=32)),
                Preprocess(PreprocessConfig(image_size=32, decode_long_side=32, voi="percentile")))
    limits = ReadLimits(max_pixels=4_000_000)
    try:
        read_header(data, limits)
    except MedvisionError:
        pass
    pre = _PRE[len(data) % 2]  # one decode per input: full resolution and the file's VOI, or reduced and percentiles
    try:
        stored, meta = pre.read(data, limits)
        x = pre(stored, meta)
    except MedvisionError:
        return
    if x.shape != (1, 32, 32) or not np.isfinite(x).all():
        raise Finding(f"model input of shape {x.shape}, finite: {bool(np.isfinite(x).all())}")
    lo, hi = (0 - pre.cfg.mean) / pre.cfg.std, (1 - pre.cfg.mean) / pre.cfg.std
    if x.min() < lo - 1e-5 or x.max() > hi + 1e-5:
        raise Finding(f"model input outside [{lo}, {hi}]: {x.min()} .. {x.max()}")


# -- the service's receiving paths ---------------------------------------------------------------------------------


class _Service:
    """A data folder and a SQLite database of the target's own, made once per process."""

    def __init__(self) -> None:
        from medvision.serving.db import open_database
        from medvision.serving.storage import DataFolder

        # on tmpfs where there is one: the receiving paths fsync every file, which on a disk would be most of the time
        # (MEDVISION_FUZZ_TMP: a folder of the caller's, which it removes; libFuzzer ends the process without atexit)
        shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        self.tmp = Path(tempfile.mkdtemp(prefix="medvision-fuzz-", dir=os.environ.get("MEDVISION_FUZZ_TMP") or shm))
        self.data = DataFolder(self.tmp / "data")
        self.sessions = open_database(f"sqlite:///{self.tmp / 'db.sqlite'}")
        self.inputs = 0
        atexit.register(shutil.rmtree, self.tmp, True)

    def files(self) -> set[Path]:
        return {p for p in self.data.root.rglob("*") if p.is_file()}

    def tick(self) -> None:
        """Every few hundred inputs, forget what was stored: the folder and database stay small over a long run."""
        self.inputs += 1
        if self.inputs % 500:
            return
        from sqlalchemy import delete

        from medvision.serving.tables import Instance, Job, Study

        with self.sessions() as db:
            for table in (Job, Instance, Study):
                db.execute(delete(table))
            db.commit()
        for path in self.files():
            path.unlink(missing_ok=True)


_SERVICE: _Service | None = None


def _service() -> _Service:
    global _SERVICE
    if _SERVICE is None:
        _SERVICE = _Service()
    return _SERVICE


class _Request:
    """What ``receive_parts`` reads of a request: its headers and its body, in chunks as a socket gives them."""

    def __init__(self, body: bytes, content_type: str) -> None:
        self.headers = {"content-type": content_type}
        self._body = body

    async def stream(self):
        for i in range(0, len(self._body), 4096):
            yield self._body[i:i + 4096]
        yield b""


def stow(data: bytes) -> None:
    from medvision.dicom_io import ReadLimits
    from medvision.errors import MedvisionError
    from medvision.serving.errors import status_for
    from medvision.serving.identifiers import Owner
    from medvision.serving.stow import receive_parts, response_body, store_parts

    svc = _service()
    svc.tick()
    before = svc.files()
    ctype = f'multipart/related; type="application/dicom"; boundary={BOUNDARY.decode()}'
    try:
        parts = asyncio.run(receive_parts(_Request(data, ctype), svc.data, 2_000_000, 16))
    except MedvisionError as exc:
        if not 400 <= status_for(exc) < 500:
            raise Finding(f"a body refused with {status_for(exc)} ({exc.code})") from exc
        if svc.files() != before:
            raise Finding("a refused body left files in the data folder") from exc
        return
    outcomes = store_parts(parts, svc.sessions, svc.data, Owner("fuzz"), None, ReadLimits(max_pixels=4_000_000))
    status, _ = response_body(outcomes, "http://localhost")
    if status not in (200, 202, 409) or len(outcomes) != len(parts):
        raise Finding(f"store response {status} for {len(parts)} parts, {len(outcomes)} outcomes")
    if any(p.path.exists() for p in parts):
        raise Finding("a part's temporary file was left behind")
    _check_filed(svc, outcomes)


def dimse(data: bytes) -> None:
    """The data set of a C-STORE (after the first byte, which picks the transfer syntax the association agreed),
    with the file meta the node builds from the request."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info

    from medvision.dicom_io import ReadLimits
    from medvision.serving.identifiers import Owner
    from medvision.serving.stow import store_file

    svc = _service()
    svc.tick()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.2"
    meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    meta.TransferSyntaxUID = DIMSE_SYNTAXES[data[0] % len(DIMSE_SYNTAXES)] if data else DIMSE_SYNTAXES[1]
    fp = DicomBytesIO()
    fp.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(fp, meta, enforce_standard=True)
    fd, path = svc.data.temporary(".dcm")
    with os.fdopen(fd, "wb") as fh:
        fh.write(fp.getvalue() + data[1:])
    outcome = store_file(Path(path), svc.sessions, svc.data, Owner("fuzz"), None, ReadLimits(max_pixels=4_000_000))
    if Path(path).exists():
        raise Finding("the received file was left in the incoming folder")
    _check_filed(svc, [outcome])


def _check_filed(svc: _Service, outcomes) -> None:
    """Every instance reported stored has a valid UID, its row, and its file inside the data folder."""
    from sqlalchemy import select

    from medvision.identifiers import check_uid
    from medvision.serving.tables import Instance

    with svc.sessions() as db:
        for o in outcomes:
            row = db.scalar(select(Instance).where(Instance.site == "fuzz",
                                                   Instance.sop_instance_uid == o.sop_instance_uid))
            if o.failure is None:
                check_uid(o.sop_instance_uid, "SOP Instance UID")
                if row is None or not svc.data.inside(row.path).is_file():
                    raise Finding("an instance reported stored has no row or no file")


def run(name: str, data: bytes) -> None:
    {"read": read, "stow": stow, "dimse": dimse}[name](data)


REGRESSIONS = Path(__file__).with_name("regressions")


def replay(folder: Path = REGRESSIONS) -> int:
    """Run every kept finding (``regressions/<target>/<file>``) through its target again; returns how many. A
    finding that is not fixed raises, as it did when it was found."""
    import logging
    import warnings

    warnings.simplefilter("ignore")
    logging.disable(logging.CRITICAL)
    n = 0
    for path in sorted(folder.glob("*/*")):
        if path.parent.name in TARGETS and path.is_file():
            run(path.parent.name, path.read_bytes())
            n += 1
    return n


if __name__ == "__main__":
    print(f"{replay()} kept findings replayed, none raised")
