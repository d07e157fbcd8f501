"""De-identification by the DICOM PS3.15 Annex E Basic Application Level Confidentiality Profile.

The attribute table (which tag is removed, emptied, replaced with a dummy or has its UID replaced) comes
from ``dicom-anonymizer`` (Kitware, BSD-3), which transcribes PS3.15 Table E.1-1; medvision applies it
itself so that it can:

- walk every nested sequence item, not just the top level;
- replace identifiers *consistently and reproducibly*: UIDs become ``2.25.<HMAC-SHA256(key, uid)>`` and
  Patient ID becomes ``MV<HMAC>``, so all files of a study stay linked, re-running with the same key gives
  the same output, and splits by patient still work, while nobody without the key can reverse them;
- keep what training needs: pixel data (never re-encoded), photometric / LUT / view / laterality
  attributes (the profile does not list them), and, with the Retain Patient Characteristics Option, age
  and sex;
- refuse, by default, images that declare burned-in annotation (text in the pixels the profile cannot remove);
- record what was done: Patient Identity Removed = YES, De-identification Method and its code sequence.

Combined actions are resolved to the choice that keeps every IOD valid whatever the attribute's type:
any action that allows D becomes D (a dummy value is valid for Type 1, 2 and 3), X/Z becomes Z, X/Z/U*
keeps the sequence and replaces the UIDs inside it. Private attributes, curves (50xx) and overlays (60xx)
are removed.
"""

from __future__ import annotations

import csv
import hashlib
import hmac
import logging
import os
import secrets
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.tag import Tag

from medvision import __version__
from medvision.cores import usable_cores
from medvision.errors import ConfigError, MedvisionError
from medvision.parallel import process_pool
from medvision.progress import progress_bar

log = logging.getLogger(__name__)

TABLE_VERSION = "dicomfields_2026c"
# PS3.16 CID 7050 codes for the method.
CODE_BASIC = ("113100", "Basic Application Confidentiality Profile")
CODE_PATIENT_CHARACTERISTICS = ("113108", "Retain Patient Characteristics Option")
# PS3.15 E.3.4: what the Retain Patient Characteristics Option keeps.
PATIENT_CHARACTERISTICS = (
    "PatientAge", "PatientSex", "PatientSize", "PatientWeight", "EthnicGroup", "SmokingStatus",
    "PregnancyStatus", "PatientSexNeutered", "PatientSpeciesDescription", "PatientBreedDescription",
)
_DUMMY_TEXT = "ANONYMIZED"
_DUMMY = {"DA": "19000101", "DT": "19000101000000", "TM": "000000", "AS": "000Y", "DS": "0", "IS": "0",
          "UR": "http://anonymized.invalid"}


class DeidError(MedvisionError):
    """A file could not be de-identified (not DICOM, unreadable, or refused by policy)."""

    code = "deid_failed"


@lru_cache(maxsize=1)
def profile_actions() -> tuple[dict[int, str], list[tuple[int, int, int, int]]]:
    """``({tag: action}, [repeating-group masks])`` with actions resolved to one of D, Z, X, U, K."""
    import importlib

    table = importlib.import_module(f"dicomanonymizer.dicom_anonymization_databases.{TABLE_VERSION}")
    resolved = {
        "D_TAGS": "D", "Z_TAGS": "Z", "X_TAGS": "X", "U_TAGS": "U", "Z_D_TAGS": "D", "X_Z_TAGS": "Z",
        "X_D_TAGS": "D", "X_Z_D_TAGS": "D", "X_Z_U_STAR_TAGS": "K",
    }
    actions: dict[int, str] = {}
    masks: list[tuple[int, int, int, int]] = []
    for category, action in resolved.items():
        for t in getattr(table, category):
            if len(t) > 2:
                masks.append(t)  # (group, element, group mask, element mask): curves and overlays, removed
            else:
                actions[int(Tag(t[0], t[1]))] = action
    return actions, masks


@dataclass(frozen=True)
class DeidOptions:
    key: bytes = field(repr=False)
    keep_patient_characteristics: bool = False
    allow_burned_in: bool = False


def load_or_create_key(path: str | os.PathLike | None) -> tuple[bytes, bool]:
    """The secret for pseudonyms: read from ``path``, created there (mode 600) if absent, or random if None.

    Returns ``(key, reproducible)``.
    """
    if path is None:
        return secrets.token_bytes(32), False
    p = Path(path)
    if p.is_file():
        text = p.read_text().strip()
        if len(text) < 32:
            raise ConfigError(f"key file {p} holds {len(text)} characters; expected at least 32 (hex)")
        return text.encode(), True
    p.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(32) + "\n")
    return p.read_text().strip().encode(), True


class Deidentifier:
    def __init__(self, options: DeidOptions) -> None:
        self.options = options
        self.actions, self.masks = profile_actions()
        self.keep = set()
        if options.keep_patient_characteristics:
            self.keep = {int(Tag(k)) for k in PATIENT_CHARACTERISTICS}

    def _digest(self, kind: str, value: str) -> bytes:
        return hmac.new(self.options.key, f"{kind}:{value}".encode(), hashlib.sha256).digest()

    def uid(self, old: str) -> str:
        """A new UID under the 2.25 root (UUID-derived form), the same for the same input and key."""
        return "2.25." + str(int.from_bytes(self._digest("uid", str(old).strip())[:16], "big"))

    def pseudonym(self, patient_id: str) -> str:
        return "MV" + self._digest("patient", str(patient_id).strip()).hex()[:16].upper()

    # ---- the walk ----

    def _masked(self, tag: int) -> bool:
        group, element = tag >> 16, tag & 0xFFFF
        if group & 0xFF00 in (0x5000, 0x6000) and group % 2 == 0:
            return True  # curves and overlay planes, wholly (overlay data may hold burned-in text)
        return any(group & gm == g & gm and element & em == e & em for g, e, gm, em in self.masks)

    def _dummy(self, elem) -> None:
        vr = elem.VR
        if vr == "UI":
            self._replace_uid(elem)
        elif vr in _DUMMY:
            elem.value = _DUMMY[vr]
        elif vr in ("AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT"):
            elem.value = _DUMMY_TEXT
        elif vr in ("FD", "FL", "SS", "US", "SL", "UL", "SV", "UV"):
            elem.value = 0
        elif vr in ("OB", "OW", "OD", "OF", "OL", "OV", "UN"):
            elem.value = b"\x00\x00"
        else:  # SQ: keep the items, already cleaned by the walk
            pass

    def _replace_uid(self, elem) -> None:
        if elem.VR != "UI" or elem.value in (None, ""):
            return
        if isinstance(elem.value, (list, pydicom.multival.MultiValue)):
            elem.value = [self.uid(v) for v in elem.value]
        else:
            elem.value = self.uid(elem.value)

    def clean(self, ds: Dataset) -> None:
        """De-identify ``ds`` in place (every nesting level)."""
        for elem in list(ds):
            tag = int(elem.tag)
            if elem.tag.is_private or self._masked(tag):
                del ds[elem.tag]
                continue
            if elem.VR == "SQ" and elem.value:
                for item in elem.value:
                    self.clean(item)
            if tag in self.keep:
                continue
            action = self.actions.get(tag)
            if action is None or action == "K":
                continue
            if action == "X":
                del ds[elem.tag]
            elif action == "Z":
                elem.value = Sequence() if elem.VR == "SQ" else None
            elif action == "U":
                self._replace_uid(elem)
            elif action == "D":
                self._dummy(elem)

    def apply(self, ds: Dataset, patient_id: str | None = None) -> dict:
        """De-identify a whole file's dataset; returns what was flagged. Raises ``DeidError`` if refused.

        ``patient_id`` (e.g. from a manifest) keys the pseudonym instead of the header's Patient ID.
        """
        burned = str(ds.get("BurnedInAnnotation", "") or "").upper()
        if burned == "YES" and not self.options.allow_burned_in:
            raise DeidError("Burned In Annotation is YES: the pixels carry text the profile cannot remove "
                            "(pass --allow-burned-in only after masking it)")
        patient = patient_id if patient_id is not None else str(ds.get("PatientID", "") or "")
        self.clean(ds)
        pseudonym = self.pseudonym(patient)
        ds.PatientID = pseudonym
        ds.PatientName = f"{pseudonym}^"  # a family-name component, as PN expects
        ds.PatientIdentityRemoved = "YES"
        codes = [CODE_BASIC] + ([CODE_PATIENT_CHARACTERISTICS] if self.options.keep_patient_characteristics else [])
        ds.DeidentificationMethod = [c[1] for c in codes] + [f"medvision {__version__}"]  # LO, VM 1-n
        seq = []
        for value, meaning in codes:
            item = Dataset()
            item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
            seq.append(item)
        ds.DeidentificationMethodCodeSequence = seq
        fm = getattr(ds, "file_meta", None)
        if fm is not None:
            if "SOPInstanceUID" in ds:
                fm.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            for t in ("SourceApplicationEntityTitle", "SendingApplicationEntityTitle",
                      "ReceivingApplicationEntityTitle", "PrivateInformationCreatorUID", "PrivateInformation"):
                if t in fm:
                    del fm[t]
        return {"burned_in": burned or "not recorded", "patient": pseudonym}


# ---- files and trees -------------------------------------------------------------------------------------

_worker: Deidentifier | None = None


def _init(options: DeidOptions) -> None:
    global _worker
    _worker = Deidentifier(options)


def deidentify_file(src: str, dst_root: str, patient_id: str | None = None, deid: Deidentifier | None = None) -> dict:
    """De-identify one file into ``dst_root/<pseudonym>/<study>/<sop>.dcm``; never raises for a bad file."""
    deid = deid or _worker
    try:
        try:
            ds = pydicom.dcmread(src)
        except Exception as exc:
            raise DeidError(f"not a readable DICOM file ({type(exc).__name__})") from None
        if "SOPInstanceUID" not in ds:
            raise DeidError("no SOP Instance UID: not a composite object")
        old = {"sop": str(ds.SOPInstanceUID), "study": str(ds.get("StudyInstanceUID", ""))}
        flags = deid.apply(ds, patient_id)
        rel = Path(flags["patient"]) / str(ds.get("StudyInstanceUID", "unknown-study")) / f"{ds.SOPInstanceUID}.dcm"
        out = Path(dst_root) / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(out, enforce_file_format=True)
        return {"src": src, "status": "ok", "out": str(rel), "old_sop": old["sop"], "old_study": old["study"],
                "sop": str(ds.SOPInstanceUID), "study": str(ds.get("StudyInstanceUID", "")), **flags}
    except DeidError as exc:
        return {"src": src, "status": "refused", "reason": exc.message}
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # a malformed attribute: report the file, go on with the others
        return {"src": src, "status": "refused", "reason": f"could not be de-identified ({type(exc).__name__})"}


def deidentify_tree(
    files: list[str], dst: str | os.PathLike, options: DeidOptions, workers: int = 0, show_progress: bool = True,
    patient_ids: list[str] | None = None,
) -> list[dict]:
    """De-identify ``files`` into ``dst``, in parallel; one result dict per input, in order."""
    dst = str(dst)
    pids = patient_ids if patient_ids is not None else [None] * len(files)
    n = workers or usable_cores()
    results = []
    with progress_bar("de-identify", total=len(files), enabled=show_progress) as advance:
        if n == 1 or len(files) < 32:
            deid = Deidentifier(options)
            for f, pid in zip(files, pids, strict=True):
                results.append(deidentify_file(f, dst, pid, deid))
                advance()
        else:
            with process_pool(n, _init, (options,)) as pool:
                for r in pool.map(deidentify_file, files, [dst] * len(files), pids, chunksize=16):
                    results.append(r)
                    advance()
    return results


def write_report(path: Path, results: Iterable[dict], source_root: str) -> dict:
    """A CSV of refused files (source paths relative to the input, and why) plus counts.

    Source paths can identify patients (exports are often foldered by name), so the caller keeps this
    report outside the de-identified output.
    """
    results = list(results)
    refused = [r for r in results if r["status"] != "ok"]
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["source", "status", "reason"])
        for r in refused:
            w.writerow([os.path.relpath(r["src"], source_root) if source_root else r["src"], r["status"], r["reason"]])
    burned = Counter(r.get("burned_in") for r in results if r["status"] == "ok")
    return {"files": len(results), "written": len(results) - len(refused), "refused": len(refused),
            "burned_in_annotation": dict(burned)}
