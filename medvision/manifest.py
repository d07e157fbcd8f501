"""Manifests: one table of images with labels and patients, built from whatever a hospital export looks like.

The canonical manifest is a CSV with ``path, label, patient_id`` and optional ``image_id, study_id,
laterality, view``. It is also the *generic CSV* input: any CSV with those columns is a manifest.
Other layouts are converted to it:

- the RSNA Screening Mammography layout (``train.csv`` + ``<patient_id>/<image_id>.dcm``): ``from_rsna``;
- a DICOM folder plus a labels CSV keyed by SOP Instance UID, Study Instance UID or Patient ID:
  ``from_dicom_folder`` (patients and studies come from the headers, via a scan index);
- a folder per class (``negative/...``, ``cancer/...``): ``from_class_folders``.

Relative paths in a manifest are relative to the manifest file's folder.
"""

from __future__ import annotations

import csv
import os
from collections import Counter
from pathlib import Path

from medvision.data import ImageRow, read_labels
from medvision.errors import ConfigError
from medvision.scan import STATUS_OK, IndexRow

COLUMNS = ["path", "label", "patient_id", "image_id", "study_id", "laterality", "view"]  # then any extra columns
REQUIRED = ("path", "label", "patient_id")
LABEL_COLUMNS = ("label", "cancer")
KEYS = ("sop_instance_uid", "study_instance_uid", "patient_id")

# Folder names understood without a --classes mapping (case-insensitive).
DEFAULT_CLASSES = {
    "0": 0, "negative": 0, "normal": 0, "benign": 0, "non-cancer": 0, "noncancer": 0, "no_cancer": 0,
    "1": 1, "positive": 1, "cancer": 1, "malignant": 1, "malignancy": 1,
}


def _label(raw: str, where: str) -> int:
    text = (raw or "").strip().lower()
    aliases = {"true": 1, "false": 0, "yes": 1, "no": 0}
    if text in aliases:
        return aliases[text]
    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"{where}: label must be 0 or 1, got {raw!r}") from None
    if value not in (0.0, 1.0):
        raise ConfigError(f"{where}: label must be 0 or 1, got {raw!r}")
    return int(value)


def read_manifest(path: str | os.PathLike, check_files: bool = True) -> list[ImageRow]:
    """Read a canonical / generic manifest CSV. Errors name the file, line and column."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"manifest not found: {p}")
    base = p.resolve().parent
    with p.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = set(reader.fieldnames or [])
        label_col = next((c for c in LABEL_COLUMNS if c in header), None)
        missing = [c for c in REQUIRED if c not in header and not (c == "label" and label_col)]
        if missing:
            raise ConfigError(
                f"manifest {p} lacks column(s) {', '.join(missing)}; a manifest needs path, label "
                f"(or cancer) and patient_id, optionally image_id, study_id, laterality, view"
            )
        rows, missing_files = [], []
        for i, r in enumerate(reader, start=2):
            where = f"{p}:{i}"
            rel = (r.get("path") or "").strip()
            if not rel:
                raise ConfigError(f"{where}: empty path")
            if not (r.get("patient_id") or "").strip():
                raise ConfigError(f"{where}: empty patient_id (splits are made per patient)")
            full = Path(rel) if Path(rel).is_absolute() else base / rel
            if check_files and not full.is_file():
                missing_files.append(rel)
            rows.append(ImageRow(
                # without an image_id the path is the identity (file names like IM0001 repeat across patients)
                patient_id=r["patient_id"].strip(), image_id=(r.get("image_id") or "").strip() or rel,
                path=str(full), label=_label(r[label_col], where), laterality=(r.get("laterality") or "").strip(),
                view=(r.get("view") or "").strip(), study_id=(r.get("study_id") or "").strip(),
                attributes={k: v for k, v in r.items() if k and k not in COLUMNS and k != label_col and v},
            ))
    if not rows:
        raise ConfigError(f"manifest {p} has no rows")
    if missing_files:
        raise ConfigError(
            f"manifest {p}: {len(missing_files)} file(s) do not exist, e.g. {missing_files[0]!r} "
            f"(relative paths are taken from the manifest's folder)"
        )
    return rows


def write_manifest(path: str | os.PathLike, rows: list[ImageRow]) -> None:
    """Write rows as a manifest; paths under the manifest's folder are stored relative to it."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    base = p.resolve().parent
    extra = sorted({k for r in rows for k in r.attributes} - set(COLUMNS))
    with p.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(COLUMNS + extra)
        for r in rows:
            full = Path(r.path).resolve()
            try:
                shown = str(full.relative_to(base))
            except ValueError:
                shown = str(full)
            w.writerow([shown, r.label, r.patient_id, r.image_id, r.study_id, r.laterality, r.view]
                       + [r.attributes.get(k, "") for k in extra])


def from_rsna(labels_csv: str | os.PathLike, image_dir: str | os.PathLike) -> list[ImageRow]:
    """The RSNA Screening Mammography layout: ``patient_id, image_id, cancer`` (+ laterality, view)."""
    rows = read_labels(labels_csv, image_dir)
    missing = [r for r in rows if not Path(r.path).is_file()]
    if missing:
        raise ConfigError(f"{len(missing)} image(s) of {labels_csv} are not under {image_dir}, "
                          f"e.g. {os.path.relpath(missing[0].path, image_dir)}")
    return rows


def _usable(index: list[IndexRow], root: str | os.PathLike) -> list[tuple[IndexRow, Path]]:
    return [(r, Path(root) / r.path) for r in index if r.status == STATUS_OK]


def from_dicom_folder(
    index: list[IndexRow], root: str | os.PathLike, labels_csv: str | os.PathLike, key: str | None = None,
) -> tuple[list[ImageRow], dict]:
    """Join a scan index of ``root`` with a labels CSV keyed by SOP / Study Instance UID or Patient ID.

    Returns ``(rows, report)``; the report counts images without a label and labels without an image,
    so nothing is dropped silently.
    """
    p = Path(labels_csv)
    if not p.is_file():
        raise ConfigError(f"labels CSV not found: {p}")
    with p.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = list(reader.fieldnames or [])
        key = key or next((k for k in KEYS if k in header), None)
        if key not in KEYS or key not in header:
            raise ConfigError(f"labels CSV {p} needs a key column, one of {', '.join(KEYS)}; it has {', '.join(header)}")
        label_col = next((c for c in LABEL_COLUMNS if c in header), None)
        if label_col is None:
            raise ConfigError(f"labels CSV {p} needs a 'label' (or 'cancer') column")
        labels: dict[str, int] = {}
        for i, r in enumerate(reader, start=2):
            value = _label(r[label_col], f"{p}:{i}")
            k = (r[key] or "").strip()
            if labels.setdefault(k, value) != value:
                raise ConfigError(f"{p}:{i}: {key} appears twice with different labels")
    rows, unlabelled, no_patient = [], 0, 0
    used: set[str] = set()
    for ir, full in _usable(index, root):
        k = getattr(ir, key)
        if k not in labels:
            unlabelled += 1
            continue
        if not ir.patient_id:
            no_patient += 1
            continue
        used.add(k)
        rows.append(ImageRow(
            patient_id=ir.patient_id, image_id=ir.sop_instance_uid or ir.path, path=str(full),
            label=labels[k], laterality=ir.laterality, view=ir.view, study_id=ir.study_instance_uid,
        ))
    if no_patient:
        raise ConfigError(f"{no_patient} labelled image(s) have no Patient ID: splits cannot be made per patient")
    if not rows:
        raise ConfigError(f"no image under {root} matched a {key} of {p}")
    report = {"key": key, "images": len(rows), "unlabelled_images": unlabelled,
              "labels_without_image": len(set(labels) - used),
              "not_usable": sum(1 for r in index if r.status != STATUS_OK)}
    return rows, report


def parse_classes(spec: str | None) -> dict[str, int]:
    """``"normal=0,cancer=1"`` -> mapping; ``None`` -> the default names."""
    if not spec:
        return dict(DEFAULT_CLASSES)
    out = {}
    for part in spec.split(","):
        name, _, value = part.partition("=")
        if not name.strip() or value.strip() not in ("0", "1"):
            raise ConfigError(f"--classes entry {part!r} must look like name=0 or name=1")
        out[name.strip().lower()] = int(value)
    return out


def from_class_folders(
    index: list[IndexRow], root: str | os.PathLike, classes: dict[str, int] | None = None,
) -> tuple[list[ImageRow], dict]:
    """Label each image by its top-level folder under ``root`` (``negative/``, ``cancer/``, ...)."""
    classes = classes or dict(DEFAULT_CLASSES)
    folders = Counter(Path(r.path).parts[0] for r, _ in _usable(index, root) if len(Path(r.path).parts) > 1)
    unknown = sorted(f for f in folders if f.lower() not in classes)
    if unknown:
        raise ConfigError(
            f"class folder(s) {', '.join(unknown)} have no label; name them with --classes, e.g. "
            f"--classes {unknown[0]}=0"
        )
    rows, no_patient = [], 0
    for ir, full in _usable(index, root):
        parts = Path(ir.path).parts
        if len(parts) < 2:
            continue
        if not ir.patient_id:
            no_patient += 1
            continue
        rows.append(ImageRow(
            patient_id=ir.patient_id, image_id=ir.sop_instance_uid or ir.path, path=str(full),
            label=classes[parts[0].lower()], laterality=ir.laterality, view=ir.view, study_id=ir.study_instance_uid,
        ))
    if no_patient:
        raise ConfigError(f"{no_patient} image(s) have no Patient ID: splits cannot be made per patient")
    if not rows:
        raise ConfigError(f"no usable DICOM image in a class folder under {root}")
    report = {"classes": {f: classes[f.lower()] for f in folders}, "images": len(rows),
              "not_usable": sum(1 for r in index if r.status != STATUS_OK)}
    return rows, report


def load_rows(labels_csv: str | os.PathLike | None, image_dir: str | os.PathLike | None,
              manifest: str | os.PathLike | None = None) -> list[ImageRow]:
    """The images of a run: a manifest or an RSNA labels CSV + image folder (``data.read_labels``)."""
    if manifest:
        return read_manifest(manifest)
    if not labels_csv or not image_dir:
        raise ConfigError("set data.manifest, or data.labels_csv and data.image_dir")
    return read_labels(labels_csv, image_dir)
