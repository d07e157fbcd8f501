import csv
import hashlib
import json
import subprocess

import numpy as np
import pydicom
import pytest
from helpers import require_tool

from medvision.dicom_io import read_dicom
from medvision.preprocess import PreprocessConfig, to_display
from medvision.synth import SynthConfig, generate_dataset
from medvision.synth.dataset import LABEL_COLUMNS

RSNA_COLUMNS = ["site_id", "patient_id", "image_id", "laterality", "view", "age", "cancer", "biopsy", "invasive",
                "BIRADS", "implant", "density", "machine_id", "difficult_negative_case"]


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_labels_have_rsna_columns_and_four_views_per_patient(synth_dir):
    rows = _rows(synth_dir / "labels.csv")
    assert LABEL_COLUMNS == RSNA_COLUMNS
    assert list(rows[0].keys()) == RSNA_COLUMNS
    by_patient = {}
    for r in rows:
        by_patient.setdefault(r["patient_id"], set()).add((r["laterality"], r["view"]))
    assert len(by_patient) == 16
    assert all(v == {("L", "CC"), ("L", "MLO"), ("R", "CC"), ("R", "MLO")} for v in by_patient.values())
    # prevalence 0.5 -> 8 patients with cancer in exactly one breast (2 images each)
    assert sum(int(r["cancer"]) for r in rows) == 16
    for r in rows:
        assert (synth_dir / "images" / r["patient_id"] / f"{r['image_id']}.dcm").is_file()


def test_lesion_sidecar_matches_labels(synth_dir):
    labels = {r["image_id"]: int(r["cancer"]) for r in _rows(synth_dir / "labels.csv")}
    lesions = _rows(synth_dir / "lesions.csv")
    malignant_images = {r["image_id"] for r in lesions if r["malignant"] == "1"}
    assert malignant_images == {i for i, c in labels.items() if c == 1}
    benign = [r for r in lesions if r["malignant"] == "0"]
    assert benign, "negatives must carry benign findings too"
    assert any(labels[r["image_id"]] == 0 for r in benign)
    for r in lesions:
        assert 0 <= float(r["x"]) < 208 and 0 <= float(r["y"]) < 256


def test_lesion_pixels_are_brighter_than_their_surroundings(synth_dir):
    """The sidecar's coordinates are where the findings really are (in the stored image's frame)."""
    labels = {r["image_id"]: r for r in _rows(synth_dir / "labels.csv")}
    diffs = []
    for les in _rows(synth_dir / "lesions.csv"):
        if les["kind"] not in ("circumscribed_mass", "ill_defined_mass", "spiculated_mass"):
            continue
        r = labels[les["image_id"]]
        ds = pydicom.dcmread(synth_dir / "images" / r["patient_id"] / f"{r['image_id']}.dcm")
        a = ds.pixel_array.astype(float)
        if ds.PhotometricInterpretation == "MONOCHROME1":
            a = a.max() - a
        x, y, rad = int(float(les["x"])), int(float(les["y"])), max(int(float(les["radius_px"])), 2)
        inner = a[max(y - rad // 2, 0): y + rad // 2 + 1, max(x - rad // 2, 0): x + rad // 2 + 1].mean()
        ring = a[max(y - 3 * rad, 0): y + 3 * rad, max(x - 3 * rad, 0): x + 3 * rad]
        diffs.append(inner - np.median(ring))
    assert diffs and np.mean(np.array(diffs) > 0) >= 0.8


def test_summary_covers_vendors_photometrics_and_transfer_syntaxes(synth_dir):
    summary = json.loads((synth_dir / "summary.json").read_text())
    assert summary["synthetic"] is True
    assert set(summary["photometric"]) == {"MONOCHROME1", "MONOCHROME2"}
    syntaxes = set(summary["transfer_syntaxes"])
    assert "1.2.840.10008.1.2.1" in syntaxes
    assert syntaxes & {"1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90"}


def test_files_are_for_presentation_mammograms_with_12_to_14_bits(dicom_files):
    manufacturers = set()
    for f in dicom_files:
        ds = pydicom.dcmread(f)
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.1.2"
        assert ds.PresentationIntentType == "FOR PRESENTATION"
        assert 12 <= ds.BitsStored <= 14
        assert ds.WindowCenter and ds.WindowWidth
        assert int(ds.pixel_array.max()) < 2**ds.BitsStored
        manufacturers.add(ds.Manufacturer)
    assert len(manufacturers) >= 2


def test_deterministic_for_a_seed_and_independent_of_workers(tmp_path):
    cfg = SynthConfig(n_patients=3, rows=128, columns=104, seed=11, compressed_fraction=0.5)
    generate_dataset(cfg.model_copy(update={"workers": 1}), tmp_path / "a", show_progress=False)
    generate_dataset(cfg.model_copy(update={"workers": 2}), tmp_path / "b", show_progress=False)
    generate_dataset(cfg.model_copy(update={"seed": 12}), tmp_path / "c", show_progress=False)

    def digest(root):
        return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file()}

    a, b, c = digest(tmp_path / "a"), digest(tmp_path / "b"), digest(tmp_path / "c")
    a.pop("summary.json"), b.pop("summary.json")  # records the worker count
    assert a == b
    assert {k: v for k, v in a.items() if k.endswith(".dcm")} != {k: v for k, v in c.items() if k.endswith(".dcm")}


def test_compressed_files_are_lossless(tmp_path):
    """Every compressed synthetic file decodes to exactly the pixels of its uncompressed twin."""
    cfg = SynthConfig(n_patients=6, rows=128, columns=104, seed=5, workers=1)
    generate_dataset(cfg.model_copy(update={"compressed_fraction": 0.0}), tmp_path / "raw", show_progress=False)
    generate_dataset(cfg.model_copy(update={"compressed_fraction": 1.0}), tmp_path / "cmp", show_progress=False)
    compared = set()
    for raw in sorted((tmp_path / "raw").rglob("*.dcm")):
        twin = tmp_path / "cmp" / raw.relative_to(tmp_path / "raw")
        a, raw_meta = read_dicom(raw)
        b, meta = read_dicom(twin)
        np.testing.assert_array_equal(a, b)
        assert meta.sop_instance_uid == raw_meta.sop_instance_uid  # compression keeps the instance identity
        compared.add(meta.transfer_syntax)
    assert "1.2.840.10008.1.2.1" not in compared and len(compared) >= 2


@pytest.mark.integration
def test_every_synthetic_file_passes_dciodvfy(dicom_files):
    dciodvfy = require_tool("dciodvfy")
    for f in dicom_files:
        proc = subprocess.run([dciodvfy, str(f)], capture_output=True, text=True, timeout=60)
        out = proc.stdout + proc.stderr
        errors = [line for line in out.splitlines() if line.startswith("Error")]
        assert not errors, f"{f.name}: {errors}"
        assert "MammographyImageForPresentation" in out


def _lesion_contrast(root):
    """Mean (lesion centre - local median) over malignant masses, in display units, and mean radius."""
    labels = {r["image_id"]: r for r in _rows(root / "labels.csv")}
    contrasts, radii = [], []
    for les in _rows(root / "lesions.csv"):
        if les["malignant"] != "1" or les["kind"] == "calcification_cluster":
            continue
        r = labels[les["image_id"]]
        stored, meta = read_dicom(root / "images" / r["patient_id"] / f"{r['image_id']}.dcm")
        grey = to_display(stored, meta, PreprocessConfig())
        x, y, rad = int(float(les["x"])), int(float(les["y"])), float(les["radius_px"])
        k = max(int(rad / 3), 1)
        centre = grey[max(y - k, 0): y + k + 1, max(x - k, 0): x + k + 1].mean()
        w = int(3 * rad)
        contrasts.append(centre - np.median(grey[max(y - w, 0): y + w, max(x - w, 0): x + w]))
        radii.append(rad)
    return float(np.mean(contrasts)), float(np.mean(radii))


def test_difficulty_knob_lowers_lesion_contrast_and_size(tmp_path):
    cfg = SynthConfig(n_patients=6, prevalence=1.0, rows=256, columns=208, seed=3, benign_rate=0.0, workers=1)
    generate_dataset(cfg.model_copy(update={"difficulty": 0.0}), tmp_path / "easy", show_progress=False)
    generate_dataset(cfg.model_copy(update={"difficulty": 1.0}), tmp_path / "hard", show_progress=False)
    easy_c, easy_r = _lesion_contrast(tmp_path / "easy")
    hard_c, hard_r = _lesion_contrast(tmp_path / "hard")
    assert easy_c > hard_c + 0.05
    assert easy_r > 2 * hard_r


def test_a_shifted_site_differs_in_vendor_population_and_contrast_and_shares_no_identifiers(tmp_path):
    cfg = SynthConfig(n_patients=6, prevalence=1.0, rows=256, columns=208, seed=3, benign_rate=0.0, workers=1,
                      difficulty=0.3)
    generate_dataset(cfg, tmp_path / "ref", show_progress=False)
    generate_dataset(cfg.model_copy(update={"site": "shifted"}), tmp_path / "new", show_progress=False)
    ref, new = _rows(tmp_path / "ref" / "labels.csv"), _rows(tmp_path / "new" / "labels.csv")
    assert {r["machine_id"] for r in new} == {"63"} and not {r["machine_id"] for r in ref} & {"63"}
    assert {r["site_id"] for r in new} == {"3"} and min(int(r["age"]) for r in new) >= 55
    assert not {r["patient_id"] for r in ref} & {r["patient_id"] for r in new}
    assert not {r["image_id"] for r in ref} & {r["image_id"] for r in new}

    def uids(root):
        return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in root.rglob("*.dcm")} | \
            {str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID) for p in root.rglob("*.dcm")}

    assert not uids(tmp_path / "ref") & uids(tmp_path / "new")  # one archive can hold both sites
    assert {pydicom.dcmread(p, stop_before_pixels=True).Manufacturer for p in (tmp_path / "new").rglob("*.dcm")} \
        == {"Draco Diagnostics"}
    assert _lesion_contrast(tmp_path / "new")[0] < _lesion_contrast(tmp_path / "ref")[0]
    summary = json.loads((tmp_path / "new" / "summary.json").read_text())
    assert summary["site"]["name"] == "shifted" and "Draco" in summary["site"]["description"]
