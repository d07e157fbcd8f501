"""medvision data scan: headers only, every file reported with a status and a reason, never a crash."""

from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from medvision.cli import main
from medvision.scan import (
    STATUS_OK,
    STATUS_REFUSED,
    STATUS_UNREADABLE,
    index_file,
    read_index,
    scan,
    summarise,
    write_index,
)


@pytest.fixture(scope="module")
def messy_tree(tmp_path_factory, dicom_files) -> Path:
    """Good synthetic mammograms mixed with the kinds of files a real export contains."""
    root = tmp_path_factory.mktemp("messy")
    good = root / "good"
    good.mkdir()
    for f in dicom_files[:6]:
        (good / f.name).write_bytes(f.read_bytes())
    native = next(f for f in dicom_files if pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID.is_little_endian
                  and not pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID.is_compressed)
    bad = root / "bad"
    bad.mkdir()
    (bad / "empty.dcm").write_bytes(b"")
    (bad / "picture.dcm").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 100)
    data = native.read_bytes()
    (bad / "truncated.dcm").write_bytes(data[: len(data) - 5000])
    (bad / "header_cut.dcm").write_bytes(data[:300])
    (bad / "colour.dcm").write_bytes(Path(get_testdata_file("US1_UNCR.dcm", download=False)).read_bytes())
    (bad / "multiframe.dcm").write_bytes(Path(get_testdata_file("emri_small.dcm", download=False)).read_bytes())
    (bad / "report.dcm").write_bytes(Path(get_testdata_file("rtstruct.dcm", download=False)).read_bytes())
    (root / "notes.txt").write_text("sidecar files are skipped")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "x.dcm").write_bytes(b"ignored")
    return root


EXPECTED = {
    "bad/empty.dcm": (STATUS_UNREADABLE, "empty_body"),
    "bad/picture.dcm": (STATUS_UNREADABLE, "not_dicom"),
    "bad/truncated.dcm": (STATUS_UNREADABLE, "corrupt_dicom"),
    "bad/header_cut.dcm": (STATUS_UNREADABLE, "corrupt_dicom"),
    "bad/colour.dcm": (STATUS_REFUSED, "unsupported_image"),
    "bad/multiframe.dcm": (STATUS_REFUSED, "unsupported_image"),
    "bad/report.dcm": (STATUS_REFUSED, "not_an_image"),
}


def test_every_file_gets_a_status_and_reason(messy_tree):
    rows = {r.path: r for r in scan(messy_tree, workers=1, show_progress=False)}
    assert "notes.txt" not in rows and not any(p.startswith(".hidden") for p in rows)
    for path, (status, code) in EXPECTED.items():
        assert rows[path].status == status, (path, rows[path].reason)
        assert rows[path].reason.startswith(code), (path, rows[path].reason)
    good = [r for p, r in rows.items() if p.startswith("good/")]
    assert len(good) == 6 and all(r.status == STATUS_OK and not r.reason for r in good)
    for r in good:  # the attributes manifests and data cards need
        assert r.sop_instance_uid and r.patient_id and r.study_instance_uid and r.manufacturer
        assert r.view in {"CC", "MLO"} and r.laterality in {"L", "R"} and r.rows == 256
        assert r.patient_age.endswith("Y") and "PatientName" in r.phi_attributes
    # refused files are still described, which the data card reports
    assert rows["bad/colour.dcm"].photometric.startswith(("RGB", "YBR"))


def test_parallel_scan_equals_serial_and_index_round_trips(messy_tree, tmp_path):
    serial = scan(messy_tree, workers=1, show_progress=False)
    files = [p for p in messy_tree.rglob("*") if p.is_file()]
    parallel = scan(messy_tree, workers=2, show_progress=False)
    assert parallel == serial and len(files) > len(serial)
    write_index(tmp_path / "index.csv", serial)
    assert read_index(tmp_path / "index.csv") == serial
    s = summarise(serial)
    assert s["ok"] == 6 and s["refused"] == 3 and s["unreadable"] == 4 and s["patients"] >= 1


def test_header_scan_finds_native_truncation_without_decoding(dicom_files, tmp_path):
    native = next(f for f in dicom_files
                  if not pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID.is_compressed)
    data = native.read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[:-1000])
    row = index_file(cut)
    assert row.status == STATUS_UNREADABLE and "truncated" in row.reason


def test_scan_cli_reports_and_strict_fails(messy_tree, tmp_path, capsys):
    assert main(["data", "scan", str(messy_tree), "--out", str(tmp_path / "i.csv"), "--no-progress"]) == 0
    out = capsys.readouterr()
    assert '"unreadable": 4' in out.out and "unreadable" in out.err
    assert main(["data", "scan", str(messy_tree), "--out", str(tmp_path / "i.csv"), "--strict", "--no-progress"]) == 1
    assert main(["data", "scan", str(tmp_path / "nope"), "--out", str(tmp_path / "j.csv"), "--no-progress"]) == 2


def test_scan_never_logs_patient_ids(messy_tree, tmp_path, caplog, capsys):
    caplog.set_level("DEBUG")
    assert main(["data", "scan", str(messy_tree), "--out", str(tmp_path / "i.csv"), "--no-progress"]) == 0
    out = capsys.readouterr()
    ids = {r.patient_id for r in read_index(tmp_path / "i.csv") if r.patient_id}
    assert ids
    for pid in ids:
        assert pid not in caplog.text and pid not in out.out and pid not in out.err
