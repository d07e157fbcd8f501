"""Manifests from the four export layouts, all converging on one canonical CSV."""

import csv
import shutil
from pathlib import Path

import pytest

from medvision.cli import main
from medvision.errors import ConfigError
from medvision.manifest import (
    from_class_folders,
    from_dicom_folder,
    from_rsna,
    parse_classes,
    read_manifest,
    write_manifest,
)
from medvision.scan import scan


def _write_csv(path: Path, header: list[str], rows: list[list]) -> Path:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def rsna_rows(synth_dir):
    return from_rsna(synth_dir / "labels.csv", synth_dir / "images")


@pytest.fixture(scope="module")
def index(synth_dir):
    return scan(synth_dir / "images", workers=1, show_progress=False)


def test_rsna_layout_and_round_trip(rsna_rows, tmp_path):
    assert len(rsna_rows) == 64 and {r.label for r in rsna_rows} == {0, 1}
    assert all(Path(r.path).is_file() for r in rsna_rows)
    write_manifest(tmp_path / "m.csv", rsna_rows)
    back = read_manifest(tmp_path / "m.csv")
    assert [(r.patient_id, r.image_id, r.label, Path(r.path).resolve()) for r in back] == \
        [(r.patient_id, r.image_id, r.label, Path(r.path).resolve()) for r in rsna_rows]


def test_generic_csv_relative_paths_and_aliases(synth_dir, tmp_path):
    files = sorted((synth_dir / "images").rglob("*.dcm"))[:3]
    local = tmp_path / "imgs"
    local.mkdir()
    for f in files:
        shutil.copy(f, local / f.name)
    m = _write_csv(tmp_path / "any.csv", ["path", "cancer", "patient_id", "view"],
                   [[f"imgs/{f.name}", lab, "p1", "CC"] for f, lab in zip(files, ["1", "0.0", "true"], strict=True)])
    rows = read_manifest(m)
    assert [r.label for r in rows] == [1, 0, 1] and rows[0].image_id == f"imgs/{files[0].name}"
    assert all(Path(r.path).is_file() for r in rows) and rows[0].view == "CC"


@pytest.mark.parametrize(("header", "row", "message"), [
    (["path", "patient_id"], ["a.dcm", "p"], "lacks column(s) label"),
    (["path", "label", "patient_id"], ["a.dcm", "2", "p"], ":2: label must be 0 or 1, got '2'"),
    (["path", "label", "patient_id"], ["a.dcm", "maybe", "p"], "label must be 0 or 1"),
    (["path", "label", "patient_id"], ["a.dcm", "1", ""], ":2: empty patient_id"),
    (["path", "label", "patient_id"], ["", "1", "p"], ":2: empty path"),
    (["path", "label", "patient_id"], ["missing.dcm", "1", "p"], "1 file(s) do not exist, e.g. 'missing.dcm'"),
])
def test_generic_csv_errors_name_line_and_column(tmp_path, header, row, message):
    with pytest.raises(ConfigError) as err:
        read_manifest(_write_csv(tmp_path / "m.csv", header, [row]))
    assert message in err.value.message


def test_dicom_folder_keyed_by_sop_uid_reports_unlabelled(index, synth_dir, tmp_path):
    labelled = index[:10]
    labels = _write_csv(tmp_path / "l.csv", ["sop_instance_uid", "label"],
                        [[r.sop_instance_uid, i % 2] for i, r in enumerate(labelled)] + [["1.2.3.404", 1]])
    rows, report = from_dicom_folder(index, synth_dir / "images", labels)
    assert report["key"] == "sop_instance_uid" and len(rows) == 10
    assert report["unlabelled_images"] == len(index) - 10 and report["labels_without_image"] == 1
    assert [r.label for r in rows] == [i % 2 for i in range(10)]
    assert all(r.study_id and r.patient_id and Path(r.path).is_file() for r in rows)


def test_dicom_folder_keyed_by_patient(index, synth_dir, tmp_path):
    patients = sorted({r.patient_id for r in index})
    labels = _write_csv(tmp_path / "l.csv", ["patient_id", "cancer"], [[p, int(i == 0)] for i, p in enumerate(patients)])
    rows, report = from_dicom_folder(index, synth_dir / "images", labels)
    assert len(rows) == len(index) and report["unlabelled_images"] == 0
    assert {r.patient_id for r in rows if r.label} == {patients[0]}
    bad = _write_csv(tmp_path / "b.csv", ["patient_id", "label"], [[patients[0], 1], [patients[0], 0]])
    with pytest.raises(ConfigError, match="appears twice with different labels"):
        from_dicom_folder(index, synth_dir / "images", bad)
    nokey = _write_csv(tmp_path / "n.csv", ["accession", "label"], [["x", 1]])
    with pytest.raises(ConfigError, match="needs a key column"):
        from_dicom_folder(index, synth_dir / "images", nokey)


def test_class_folders(dicom_files, tmp_path):
    root = tmp_path / "classes"
    for i, f in enumerate(dicom_files[:8]):
        d = root / ("Cancer" if i < 3 else "normal") / f.parent.name
        d.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, d / f.name)
    idx = scan(root, workers=1, show_progress=False)
    rows, report = from_class_folders(idx, root)
    assert sum(r.label for r in rows) == 3 and len(rows) == 8
    assert report["classes"] == {"Cancer": 1, "normal": 0}
    (root / "other").mkdir()
    shutil.copy(dicom_files[9], root / "other" / "x.dcm")
    idx = scan(root, workers=1, show_progress=False)
    with pytest.raises(ConfigError, match="class folder\\(s\\) other have no label; name them with --classes"):
        from_class_folders(idx, root)
    rows, _ = from_class_folders(idx, root, parse_classes("cancer=1,normal=0,other=0"))
    assert len(rows) == 9
    with pytest.raises(ConfigError, match="must look like name=0"):
        parse_classes("cancer=yes")


def test_manifest_cli_each_source(synth_dir, tmp_path, capsys):
    assert main(["data", "manifest", "--rsna", str(synth_dir / "labels.csv"), "--images", str(synth_dir / "images"),
                 "--out", str(tmp_path / "rsna.csv")]) == 0
    assert main(["data", "manifest", "--csv", str(tmp_path / "rsna.csv"), "--out", str(tmp_path / "again.csv")]) == 0
    assert len(read_manifest(tmp_path / "again.csv")) == 64
    sops = [r.image_id for r in read_manifest(tmp_path / "rsna.csv")]
    assert main(["data", "manifest", "--rsna", str(synth_dir / "labels.csv"), "--out", str(tmp_path / "x.csv")]) == 2
    assert "--rsna needs --images" in capsys.readouterr().err
    idx = tmp_path / "index.csv"
    assert main(["data", "scan", str(synth_dir / "images"), "--out", str(idx), "--no-progress"]) == 0
    from medvision.scan import read_index

    pids = sorted({r.patient_id for r in read_index(idx)})
    _write_csv(tmp_path / "by_patient.csv", ["patient_id", "label"], [[p, i % 2] for i, p in enumerate(pids)])
    assert main(["data", "manifest", "--dicom", str(synth_dir / "images"), "--labels", str(tmp_path / "by_patient.csv"),
                 "--index", str(idx), "--out", str(tmp_path / "dicom.csv")]) == 0
    rows = read_manifest(tmp_path / "dicom.csv")
    assert len(rows) == 64 and len(sops) == 64
