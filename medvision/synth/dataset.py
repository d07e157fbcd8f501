"""Generate a synthetic screening-mammography dataset: DICOM files, RSNA-style labels, lesion sidecar."""

from __future__ import annotations

import csv
import datetime as _dt
import json
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from pydicom.dataset import Dataset

from medvision.cores import usable_cores
from medvision.progress import progress_bar
from medvision.synth.dicom_writer import ImageRecord, build_dataset, save, uid_for
from medvision.synth.phantom import (
    BENIGN_KINDS,
    MALIGNANT_KINDS,
    BreastGeometry,
    Finding,
    render_breast,
)
from medvision.synth.sites import SITES
from medvision.synth.vendors import Vendor, default_window, to_stored

LABEL_COLUMNS = [
    "site_id", "patient_id", "image_id", "laterality", "view", "age", "cancer", "biopsy", "invasive",
    "BIRADS", "implant", "density", "machine_id", "difficult_negative_case",
]
LESION_COLUMNS = ["patient_id", "image_id", "laterality", "view", "kind", "malignant", "x", "y", "radius_px"]
FIELD_OF_VIEW_MM = 240.0  # detector height the image represents


class SynthConfig(BaseModel):
    """Options of ``medvision synth``."""

    model_config = ConfigDict(extra="forbid")

    n_patients: int = Field(100, ge=1, description="patients; each has one 4-view exam")
    prevalence: float = Field(0.3, ge=0.0, le=1.0, description="fraction of patients with a cancer")
    rows: int = Field(512, ge=64, le=4096)
    columns: int = Field(416, ge=64, le=4096)
    difficulty: float = Field(0.5, ge=0.0, le=1.0, description="0 = conspicuous lesions, 1 = subtle")
    benign_rate: float = Field(0.35, ge=0.0, le=1.0, description="chance a breast carries a benign finding")
    monochrome1_vendors: bool = True
    compressed_fraction: float = Field(0.3, ge=0.0, le=1.0, description="share of files written compressed")
    site: Literal["reference", "shifted"] = Field("reference", description="whose images: the reference site, or a "
                                                  "site whose equipment and population differ (sites.SITES)")
    seed: int = 0
    workers: int = Field(0, ge=0, description="processes; 0 = every core this process may use")


def _breast_plan(cfg: SynthConfig, rng: np.random.Generator, malignant: bool, shape: tuple[int, int]):
    """Decide geometry and findings (in canonical CC coordinates) for one breast."""
    geom = BreastGeometry(
        depth=rng.uniform(0.55, 0.8), half_height=rng.uniform(0.33, 0.44), center_y=rng.uniform(0.47, 0.53)
    )
    size = (1.6 - 1.0 * cfg.difficulty) * shape[0] / 512
    planned: list[tuple[str, bool, float, float, float]] = []  # kind, malignant, depth_frac, y_frac, radius

    def place() -> tuple[float, float]:
        t = rng.uniform(0.25, 0.8)  # fraction of breast depth from chest wall
        s = rng.uniform(-0.6, 0.6) * np.sqrt(max(1 - t**2, 0.05))
        return t, s

    if malignant:
        kind = MALIGNANT_KINDS[int(rng.integers(len(MALIGNANT_KINDS)))]
        radius = (rng.uniform(7, 12) if kind == "calcification_cluster" else rng.uniform(9, 18)) * size
        planned.append((kind, True, *place(), radius))
    if rng.random() < cfg.benign_rate:
        kind = BENIGN_KINDS[int(rng.integers(len(BENIGN_KINDS)))]
        radius = (rng.uniform(30, 60) if kind == "scattered_calcifications" else rng.uniform(8, 16)) * size
        planned.append((kind, False, *place(), radius))
    return geom, planned


def _findings_for_view(planned, geom: BreastGeometry, view: str, shape, rng) -> list[Finding]:
    h, w = shape
    out = []
    for kind, malignant, t, s, radius in planned:
        x = t * geom.depth * w
        # Depth from the chest wall is shared between views; the vertical position is not.
        y_frac = s if view == "CC" else float(np.clip(s * 0.8 + rng.uniform(-0.25, 0.25), -0.7, 0.7))
        y = (geom.center_y + y_frac * geom.half_height) * h + (0.06 * h if view == "MLO" else 0.0)
        out.append(Finding(kind, malignant, float(x), float(y), float(radius)))
    return out


def example_image(vendor: Vendor, rows: int, columns: int, seed: int = 0, malignant: bool = True,
                  view: str = "CC") -> Dataset:
    """One synthetic view as ``vendor`` stores it (uncompressed), for tests and benchmarks that need the same
    image from every vendor or in every transfer syntax (``dicom_writer.save`` compresses it)."""
    cfg = SynthConfig(rows=rows, columns=columns, seed=seed, difficulty=0.3)
    rng = np.random.default_rng([seed, 7])
    geom, planned = _breast_plan(cfg, rng, malignant, (rows, columns))
    findings = _findings_for_view(planned, geom, view, (rows, columns), rng)
    att = render_breast((rows, columns), view, geom, "B", findings, 0.45 - 0.37 * cfg.difficulty, rng)
    stored = to_stored(att, vendor)
    rec = ImageRecord(patient_id="EX1", patient_name="SYNTHETIC^EXAMPLE", age=55, study_uid=uid_for("study", seed, 0),
                      series_uid=uid_for("series", seed, 0, "L", view), sop_uid=uid_for("sop", seed, 0, "L", view),
                      accession="EX0000001", laterality="L", view=view, instance_number=1,
                      study_date=_dt.date(2026, 1, 5))
    return build_dataset(stored, rec, vendor, default_window(stored, att > 0.05), FIELD_OF_VIEW_MM / rows)


def _patient_task(args: tuple) -> tuple[list[dict], list[dict], list[str]]:
    cfg, index, cancer_side, out_dir = args
    site = SITES[cfg.site]
    salt = () if cfg.site == "reference" else (cfg.site,)  # the reference site's UIDs are as they always were
    rng = np.random.default_rng([cfg.seed, index, *((7919,) if salt else ())])
    shape = (cfg.rows, cfg.columns)
    patient_id = str(site.patient_base + index)
    vendors = [v for v in site.vendors if cfg.monochrome1_vendors or v.photometric == "MONOCHROME2"] or list(site.vendors)
    vendor = vendors[int(rng.integers(len(vendors)))]
    compressed = rng.random() < cfg.compressed_fraction
    tsyntax = vendor.transfer_syntaxes[1] if compressed else vendor.transfer_syntaxes[0]
    age = int(rng.integers(*site.ages))
    density = str(rng.choice(["A", "B", "C", "D"], p=[0.1, 0.4, 0.4, 0.1]))
    site_id = site.site_id or 1 + int(vendor.machine_id > 25)
    contrast = (0.45 - 0.37 * cfg.difficulty) * site.lesion_contrast
    study_uid = uid_for("study", cfg.seed, index, *salt)
    study_date = _dt.date(2026, 1, 5) + _dt.timedelta(days=int(index % 300))
    labels, lesions, syntaxes = [], [], []
    spacing = FIELD_OF_VIEW_MM / cfg.rows
    for side_i, side in enumerate(("L", "R")):
        malignant = side == cancer_side
        geom, planned = _breast_plan(cfg, rng, malignant, shape)
        has_benign = any(not m for _, m, *_ in planned)
        for view_i, view in enumerate(("CC", "MLO")):
            findings = _findings_for_view(planned, geom, view, shape, rng)
            att = render_breast(shape, view, geom, density, findings, contrast, rng)
            breast = att > 0.05
            if site.noise:
                att = np.where(breast, np.clip(att + rng.normal(0.0, site.noise, att.shape), 0.06, 1.0), att)
            if side == "R":  # canonical frame has the chest wall on the left; right breasts point left
                att, breast = att[:, ::-1], breast[:, ::-1]
                findings = [Finding(f.kind, f.malignant, cfg.columns - 1 - f.x, f.y, f.radius) for f in findings]
            stored = to_stored(att, vendor)
            image_id = str(index * 4 + side_i * 2 + view_i + 10 * site.patient_base)
            rec = ImageRecord(
                patient_id=patient_id,
                patient_name=f"SYNTHETIC^PATIENT{index:05d}",
                age=age,
                study_uid=study_uid,
                series_uid=uid_for("series", cfg.seed, index, side, view, *salt),
                sop_uid=uid_for("sop", cfg.seed, index, side, view, *salt),
                accession=f"SYN{cfg.seed % 1000:03d}{site.patient_base // 10000}{index:06d}" if salt
                else f"SYN{cfg.seed % 1000:03d}{index:07d}",
                laterality=side,
                view=view,
                instance_number=side_i * 2 + view_i + 1,
                study_date=study_date,
            )
            ds = build_dataset(stored, rec, vendor, default_window(stored, breast), spacing)
            save(ds, Path(out_dir) / "images" / patient_id / f"{image_id}.dcm", tsyntax)
            syntaxes.append(tsyntax)
            labels.append({
                "site_id": site_id, "patient_id": patient_id, "image_id": image_id, "laterality": side,
                "view": view, "age": age, "cancer": int(malignant), "biopsy": int(malignant or has_benign and rng.random() < 0.3),
                "invasive": int(malignant and rng.random() < 0.7), "BIRADS": 0 if malignant else (2 if has_benign else 1),
                "implant": 0, "density": density, "machine_id": vendor.machine_id,
                "difficult_negative_case": int(has_benign and not malignant),
            })
            for f in findings:
                lesions.append({
                    "patient_id": patient_id, "image_id": image_id, "laterality": side, "view": view,
                    "kind": f.kind, "malignant": int(f.malignant), "x": round(f.x, 1), "y": round(f.y, 1),
                    "radius_px": round(f.radius, 1),
                })
    return labels, lesions, syntaxes


def generate_dataset(cfg: SynthConfig, out_dir: str | os.PathLike, show_progress: bool = True) -> dict:
    """Write ``images/<patient_id>/<image_id>.dcm``, ``labels.csv``, ``lesions.csv`` and ``summary.json``.

    Output is a pure function of ``cfg`` (the worker count does not change a single byte).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([cfg.seed, 2**31])
    n_pos = int(round(cfg.prevalence * cfg.n_patients))
    positives = set(rng.choice(cfg.n_patients, size=n_pos, replace=False).tolist()) if n_pos else set()
    sides = rng.choice(["L", "R"], size=cfg.n_patients)
    tasks = [(cfg, i, str(sides[i]) if i in positives else None, str(out)) for i in range(cfg.n_patients)]
    workers = cfg.workers or usable_cores()
    results: list = []
    with progress_bar("synth: writing exams", total=len(tasks), enabled=show_progress) as advance:
        if workers == 1:
            for t in tasks:
                results.append(_patient_task(t))
                advance()
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                for r in pool.map(_patient_task, tasks, chunksize=2):
                    results.append(r)
                    advance()
    labels = [row for r in results for row in r[0]]
    lesions = [row for r in results for row in r[1]]
    syntaxes = Counter(s for r in results for s in r[2])
    _write_csv(out / "labels.csv", LABEL_COLUMNS, labels)
    _write_csv(out / "lesions.csv", LESION_COLUMNS, lesions)
    summary = {
        "synthetic": True,
        "config": cfg.model_dump(),
        "patients": cfg.n_patients,
        "images": len(labels),
        "cancer_images": sum(r["cancer"] for r in labels),
        "cancer_patients": n_pos,
        "transfer_syntaxes": {str(k): v for k, v in sorted(syntaxes.items())},
        "photometric": dict(Counter("MONOCHROME1" if r["machine_id"] == 29 else "MONOCHROME2" for r in labels)),
        "site": {"name": cfg.site, "description": SITES[cfg.site].description},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
