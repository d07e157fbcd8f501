"""Labels tables and the patient-level split every run and every model share."""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from medvision.errors import ConfigError

SPLITS = ("train", "val", "test")
_CORE_COLUMNS = {"patient_id", "image_id", "cancer", "label", "path", "laterality", "view", "study_id"}


@dataclass(frozen=True)
class ImageRow:
    patient_id: str
    image_id: str
    path: str
    label: int
    laterality: str = ""
    view: str = ""
    study_id: str = ""
    # Other columns of the source (RSNA: age, density, site_id, machine_id, ...), for subgroup results.
    attributes: dict[str, str] = field(default_factory=dict, compare=False)


def read_labels(labels_csv: str | os.PathLike, image_dir: str | os.PathLike) -> list[ImageRow]:
    """Read an RSNA-style labels CSV; images are found at ``image_dir/<patient_id>/<image_id>.dcm``.

    A ``path`` column, when present, overrides that layout (relative paths are taken from ``image_dir``).
    """
    path = Path(labels_csv)
    if not path.is_file():
        raise ConfigError(f"labels CSV not found: {path}")
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {"patient_id", "image_id", "cancer"} - set(reader.fieldnames or [])
        if missing:
            raise ConfigError(f"labels CSV {path} lacks column(s): {', '.join(sorted(missing))}")
        rows = []
        for i, r in enumerate(reader, start=2):
            try:
                label = int(float(r["cancer"]))
            except ValueError:
                raise ConfigError(f"{path}:{i}: 'cancer' must be 0 or 1, got {r['cancer']!r}") from None
            if label not in (0, 1):
                raise ConfigError(f"{path}:{i}: 'cancer' must be 0 or 1, got {label}")
            rel = r.get("path") or f"{r['patient_id']}/{r['image_id']}.dcm"
            rows.append(ImageRow(
                patient_id=r["patient_id"], image_id=r["image_id"], path=str(Path(image_dir) / rel), label=label,
                laterality=r.get("laterality", ""), view=r.get("view", ""), study_id=r.get("study_id", ""),
                attributes={k: v for k, v in r.items() if k not in _CORE_COLUMNS and k and v not in (None, "")},
            ))
    if not rows:
        raise ConfigError(f"labels CSV {path} has no rows")
    return rows


def patient_split(
    rows: list[ImageRow], val_fraction: float, test_fraction: float, seed: int
) -> dict[str, str]:
    """Assign each patient to train / val / test, stratified by whether the patient has a cancer.

    Returns ``{patient_id: split}``; all images of a patient share its split (no leakage).
    """
    patient_label: dict[str, int] = {}
    for r in rows:
        patient_label[r.patient_id] = max(patient_label.get(r.patient_id, 0), r.label)
    rng = np.random.default_rng(seed)
    assignment: dict[str, str] = {}
    for label in (0, 1):
        patients = sorted(p for p, lab in patient_label.items() if lab == label)
        rng.shuffle(patients)
        n = len(patients)
        n_test = int(round(test_fraction * n))
        n_val = int(round(val_fraction * n))
        if n >= 3 and val_fraction > 0 and n_val == 0:
            n_val = 1
        for i, p in enumerate(patients):
            assignment[p] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return assignment


def write_split(path: str | os.PathLike, rows: list[ImageRow], assignment: dict[str, str]) -> None:
    with Path(path).open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["patient_id", "image_id", "split", "cancer"])
        for r in rows:
            w.writerow([r.patient_id, r.image_id, assignment[r.patient_id], r.label])


def read_split(path: str | os.PathLike) -> dict[str, str]:
    """Read a split file back as ``{patient_id: split}``."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"split file not found: {p}")
    out: dict[str, str] = {}
    with p.open(newline="") as fh:
        reader = csv.DictReader(fh)
        missing = {"patient_id", "split"} - set(reader.fieldnames or [])
        if missing:
            raise ConfigError(f"split file {p} lacks column(s): {', '.join(sorted(missing))}")
        for i, r in enumerate(reader, start=2):
            if r["split"] not in SPLITS:
                raise ConfigError(f"split file {p}:{i}: unknown split {r['split']!r} (expected one of {', '.join(SPLITS)})")
            if out.setdefault(r["patient_id"], r["split"]) != r["split"]:
                raise ConfigError(f"split file {p}:{i}: a patient appears in two splits (leakage)")
    return out


def check_split(rows: list[ImageRow], assignment: dict[str, str]) -> dict[str, int]:
    """Check that ``assignment`` covers every patient and that nothing leaks between splits.

    Leakage is also looked for where patient IDs cannot see it: the same image (``image_id``, e.g. a
    SOP Instance UID re-exported under another pseudonym) or the same study in two splits.
    Returns image counts per split; raises ``ConfigError`` naming the problem.
    """
    unknown = sorted({r.patient_id for r in rows} - set(assignment))
    if unknown:
        raise ConfigError(f"the split lacks {len(unknown)} patient(s) of the manifest; make a new split "
                          "or pass the split file that was made for this manifest")
    for attr, what in (("image_id", "image"), ("study_id", "study")):
        seen: dict[str, str] = {}
        for r in rows:
            key = getattr(r, attr)
            if not key:
                continue
            split = assignment[r.patient_id]
            if seen.setdefault(key, split) != split:
                raise ConfigError(
                    f"leakage: the same {what} ({attr} of a row for a patient in '{split}') is also in "
                    f"'{seen[key]}' under another patient ID; de-duplicate the manifest"
                )
    counts = {s: 0 for s in SPLITS}
    for r in rows:
        counts[assignment[r.patient_id]] += 1
    return counts
