"""``medvision data scan``: index a DICOM tree from headers only, in parallel, without stopping on bad files.

Each file becomes one row of an index CSV: where it is, whether medvision can use it (``ok``), would
refuse it by policy (``refused``) or cannot read it at all (``unreadable``), with the reason, plus the
attributes that manifests, splits and data cards need. The index holds Patient ID (splits must group by
patient) and age / sex (data cards): it is a data file under the same protection as the images, and
nothing from it is ever logged.
"""

from __future__ import annotations

import csv
import os
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from medvision.cores import usable_cores
from medvision.dicom_io import ReadLimits, read_header
from medvision.errors import ConfigError, DicomError
from medvision.parallel import process_pool
from medvision.progress import progress_bar

STATUS_OK, STATUS_REFUSED, STATUS_UNREADABLE = "ok", "refused", "unreadable"
# Refusals by stated policy (the file is fine, medvision does not score it) versus files that are broken.
_POLICY_CODES = {"unsupported_image", "not_an_image", "missing_codec"}
# Files no DICOM tree export should contain; skipped silently rather than reported as unreadable.
_IGNORED_NAMES = {"DICOMDIR", ".DS_Store", "Thumbs.db"}
_IGNORED_SUFFIXES = {".csv", ".json", ".txt", ".md", ".xml", ".html", ".log", ".yaml", ".yml", ".py"}


@dataclass
class IndexRow:
    path: str
    status: str
    reason: str = ""
    sop_instance_uid: str = ""
    study_instance_uid: str = ""
    series_instance_uid: str = ""
    patient_id: str = ""
    modality: str = ""
    sop_class: str = ""
    manufacturer: str = ""
    model: str = ""
    transfer_syntax: str = ""
    photometric: str = ""
    rows: int = 0
    columns: int = 0
    bits_stored: int = 0
    frames: int = 0
    pixel_spacing_mm: str = ""
    laterality: str = ""
    view: str = ""
    presentation_intent: str = ""
    patient_age: str = ""
    patient_sex: str = ""
    burned_in_annotation: str = ""
    identity_removed: str = ""
    phi_attributes: str = ""
    file_bytes: int = 0


# Attributes whose presence in a training set needs a reason; the data card counts them.
PHI_KEYWORDS = (
    "PatientName", "PatientBirthDate", "OtherPatientIDs", "OtherPatientNames", "PatientAddress",
    "PatientTelephoneNumbers", "AccessionNumber", "InstitutionName", "InstitutionAddress",
    "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName", "StudyDate", "DeviceSerialNumber",
)

_DUMMIES = {"ANONYMIZED", "ANONYMOUS", "REMOVED", "19000101", "00010101"}

COLUMNS = [f.name for f in fields(IndexRow)]
_INT_COLUMNS = {f.name for f in fields(IndexRow) if f.type in ("int", int)}


def iter_files(root: str | os.PathLike) -> Iterator[Path]:
    """Every candidate file under ``root`` in a stable order (hidden folders and sidecar files skipped)."""
    base = Path(root)
    if base.is_file():
        yield base
        return
    if not base.is_dir():
        raise ConfigError(f"not a folder: {base}")
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name in _IGNORED_NAMES or name.startswith(".") or Path(name).suffix.lower() in _IGNORED_SUFFIXES:
                continue
            yield Path(dirpath) / name


def _text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value).strip()


def index_file(path: str | os.PathLike, root: str | os.PathLike = "", limits: ReadLimits = ReadLimits()) -> IndexRow:
    """Index one file. Never raises for a bad file: the row's status and reason say what is wrong."""
    p = Path(path)
    rel = os.path.relpath(p, root) if root and Path(root).is_dir() else str(p)
    try:
        size = p.stat().st_size
    except OSError as exc:
        return IndexRow(path=rel, status=STATUS_UNREADABLE, reason=f"cannot stat: {exc.strerror}")
    try:
        ds, meta = read_header(p, limits)
        row = IndexRow(path=rel, status=STATUS_OK, file_bytes=size)
    except DicomError as exc:
        status = STATUS_REFUSED if exc.code in _POLICY_CODES else STATUS_UNREADABLE
        row = IndexRow(path=rel, status=status, reason=f"{exc.code}: {exc.message}", file_bytes=size)
        try:  # still describe refused files (what was refused matters for the data card)
            import pydicom

            ds = pydicom.dcmread(p, stop_before_pixels=True) if status == STATUS_REFUSED else None
        except Exception:
            ds = None
        if ds is None:
            return row
        meta = None
    except OSError as exc:
        return IndexRow(path=rel, status=STATUS_UNREADABLE, reason=f"cannot read: {exc.strerror}", file_bytes=size)
    try:
        _fill(row, ds, meta)
    except Exception as exc:  # a malformed optional attribute must not lose the row
        row.reason = (row.reason + "; " if row.reason else "") + f"some attributes unreadable ({type(exc).__name__})"
    return row


def _fill(row: IndexRow, ds, meta) -> None:
    get = ds.get
    row.sop_instance_uid = _text(get("SOPInstanceUID"))
    row.study_instance_uid = _text(get("StudyInstanceUID"))
    row.series_instance_uid = _text(get("SeriesInstanceUID"))
    row.patient_id = _text(get("PatientID"))
    row.modality = _text(get("Modality"))
    sop_class = get("SOPClassUID")
    row.sop_class = sop_class.name if sop_class is not None else ""
    row.manufacturer = _text(get("Manufacturer"))
    row.model = _text(get("ManufacturerModelName"))
    file_meta = getattr(ds, "file_meta", None)
    row.transfer_syntax = meta.transfer_syntax if meta else _text(file_meta.get("TransferSyntaxUID") if file_meta else "")
    row.photometric = _text(get("PhotometricInterpretation"))
    row.rows = int(get("Rows", 0) or 0)
    row.columns = int(get("Columns", 0) or 0)
    row.bits_stored = int(get("BitsStored", 0) or 0)
    row.frames = int(get("NumberOfFrames", 1) or 1)
    spacing = get("PixelSpacing") or get("ImagerPixelSpacing")
    row.pixel_spacing_mm = _text(spacing)
    row.laterality = (meta.laterality if meta else None) or _text(get("ImageLaterality") or get("Laterality"))
    row.view = (meta.view if meta else None) or _text(get("ViewPosition"))
    row.presentation_intent = _text(get("PresentationIntentType"))
    row.patient_age = _text(get("PatientAge"))
    row.patient_sex = _text(get("PatientSex"))
    row.burned_in_annotation = _text(get("BurnedInAnnotation"))
    row.identity_removed = _text(get("PatientIdentityRemoved"))
    # Which identifying attributes hold real-looking values (their names, never the values). Dummy values
    # and the pseudonyms `medvision deid` writes do not count.
    removed = row.identity_removed.upper() == "YES"
    row.phi_attributes = " ".join(
        k for k in PHI_KEYWORDS
        if _text(get(k)) and _text(get(k)).upper() not in _DUMMIES
        and not (removed and k == "PatientName" and _text(get(k)).rstrip("^") == row.patient_id)
    )


def _index_star(args: tuple[str, str, ReadLimits]) -> IndexRow:
    return index_file(*args)


def scan(
    root: str | os.PathLike,
    workers: int = 0,
    limits: ReadLimits = ReadLimits(),
    show_progress: bool = True,
) -> list[IndexRow]:
    """Index every file under ``root`` with ``workers`` processes (0 = every core this process may use, 1 = in this process).

    Paths in the rows are relative to ``root``.
    """
    files = [str(p) for p in iter_files(root)]
    return scan_files(files, str(root) if Path(root).is_dir() else "", workers, limits, show_progress)


def scan_files(
    files: list[str], root: str = "", workers: int = 0, limits: ReadLimits = ReadLimits(),
    show_progress: bool = True,
) -> list[IndexRow]:
    """Index the given files, in order (rows' paths relative to ``root`` when given)."""
    n = workers or usable_cores()
    tasks = [(f, root, limits) for f in files]
    out: list[IndexRow] = []
    with progress_bar("scan", total=len(files), enabled=show_progress) as advance:
        if n == 1 or len(files) <= 4:
            for row in map(_index_star, tasks):
                out.append(row)
                advance()
        else:
            with process_pool(n) as pool:
                for row in pool.map(_index_star, tasks, chunksize=32):
                    out.append(row)
                    advance()
    return out


def write_index(path: str | os.PathLike, rows: Iterable[IndexRow]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with Path(path).open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow(asdict(r))


def read_index(path: str | os.PathLike) -> list[IndexRow]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"index not found: {p} (make one with 'medvision data scan')")
    with p.open(newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {"path", "status"} - set(reader.fieldnames or [])
        if missing:
            raise ConfigError(f"{p} is not a scan index: it lacks column(s) {', '.join(sorted(missing))}")
        out = []
        for r in reader:
            values = {k: (int(r[k] or 0) if k in _INT_COLUMNS else r.get(k, "") or "") for k in COLUMNS if k in r}
            out.append(IndexRow(**values))
    return out


def summarise(rows: list[IndexRow]) -> dict:
    """Counts by status and by reason. No paths: export folders are often named after patients."""
    by_status = Counter(r.status for r in rows)
    reasons = Counter(r.reason.split(":", 1)[0] for r in rows if r.status != STATUS_OK)
    return {
        "files": len(rows),
        "ok": by_status.get(STATUS_OK, 0),
        "refused": by_status.get(STATUS_REFUSED, 0),
        "unreadable": by_status.get(STATUS_UNREADABLE, 0),
        "reasons": dict(reasons.most_common()),
        "patients": len({r.patient_id for r in rows if r.status == STATUS_OK and r.patient_id}),
        "studies": len({r.study_instance_uid for r in rows if r.status == STATUS_OK and r.study_instance_uid}),
    }
