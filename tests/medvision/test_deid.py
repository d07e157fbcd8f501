"""medvision deid: no attribute PS3.15 lists survives, identifiers stay linked, pixels and validity are kept."""

import re
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from helpers import require_tool
from pydicom.data import get_testdata_file
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from medvision.cli import main
from medvision.deid import Deidentifier, DeidOptions, deidentify_file, load_or_create_key, profile_actions
from medvision.dicom_io import read_dicom
from medvision.manifest import read_manifest

KEY = b"k" * 64
SECRET_UID = "1.2.826.0.1.4242"


def _value(vr: str, i: int):
    return {
        "AE": "SECRET", "AS": "042Y", "CS": "SECRET", "DA": "20010203", "DS": "4242", "DT": "20010203101010",
        "IS": "4242", "LO": "SECRET LO", "LT": "SECRET LT", "PN": "SECRET^PERSON", "SH": "SECRET SH",
        "ST": "SECRET ST", "TM": "101010", "UC": "SECRET UC", "UI": f"{SECRET_UID}.{i}", "UR": "http://secret.example",
        "UT": "SECRET UT", "OB": b"SECRETSECRET", "OW": b"SECRETSECRET", "UN": b"SECRETSECRET",
        "US": 4242, "UL": 4242, "SS": 4242, "SL": 4242, "FL": 42.42, "FD": 42.42,
    }.get(vr)


def _nested_secret() -> Dataset:
    item = Dataset()
    item.PatientName = "SECRET^NESTED"
    item.ReferencedSOPInstanceUID = f"{SECRET_UID}.999"
    item.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.2"
    item.add_new(0x00091010, "LO", "SECRET PRIVATE NESTED")
    return item


@pytest.fixture(scope="module")
def phi_file(dicom_files, tmp_path_factory) -> tuple[Path, dict[int, str]]:
    """A synthetic mammogram with every attribute of the profile's table filled with identifying values."""
    ds = pydicom.dcmread(dicom_files[0])
    filled = {}
    actions, _ = profile_actions()
    for i, (tag, action) in enumerate(sorted(actions.items())):
        if tag >> 16 < 0x0008 or tag >> 16 == 0x7FE0 or tag in (0x00080016, 0x00080018):  # command, meta, pixels, SOP
            continue
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            continue
        if vr == "SQ":
            ds.add_new(tag, "SQ", [_nested_secret()])
        elif _value(vr, i) is not None:
            ds.add_new(tag, vr, _value(vr, i))
        else:
            continue
        filled[tag] = action
    ds.SOPInstanceUID = f"{SECRET_UID}.1"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = f"{SECRET_UID}.2"
    ds.add_new(0x00291010, "LO", "SECRET PRIVATE")
    ds.add_new(0x60000022, "LO", "SECRET OVERLAY DESCRIPTION")
    ds.ViewCodeSequence[0].PatientName = "SECRET^IN^VIEW"  # identifiers nested in a kept sequence
    path = tmp_path_factory.mktemp("phi") / "phi.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, filled


def test_no_listed_attribute_survives(phi_file, tmp_path):
    path, filled = phi_file
    assert len(filled) > 250  # the profile's table really was exercised
    result = deidentify_file(str(path), str(tmp_path), deid=Deidentifier(DeidOptions(key=KEY)))
    assert result["status"] == "ok", result
    out = pydicom.dcmread(tmp_path / result["out"])
    for elem in out.iterall():
        value = elem.value
        text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
        assert "SECRET" not in text.upper(), (elem.tag, elem.keyword)
        assert SECRET_UID not in text, (elem.tag, elem.keyword)
        assert "20010203" not in text, (elem.tag, elem.keyword)
        assert elem.tag.is_private is False
        assert not (0x6000 <= elem.tag.group <= 0x60FF)
    for tag, action in filled.items():
        if action == "X":
            assert tag not in out, Tag(tag)
        elif action == "U" or (tag in out and out[tag].VR == "UI" and out[tag].value):
            assert tag not in out or str(out[tag].value).startswith("2.25."), Tag(tag)
        elif action in ("Z", "D") and tag in out and out[tag].VR not in ("SQ",):
            assert out[tag].value in (None, "", 0, "0", b"\x00\x00", "ANONYMIZED", "19000101", "000000",
                                      "19000101000000", "000Y", "http://anonymized.invalid", []) \
                or tag in (0x00100010, 0x00100020), (Tag(tag), out[tag].value)
    assert out.PatientIdentityRemoved == "YES"
    assert [c.CodeValue for c in out.DeidentificationMethodCodeSequence] == ["113100"]
    assert out.file_meta.MediaStorageSOPInstanceUID == out.SOPInstanceUID
    assert "PatientAge" not in out  # removed by the basic profile
    # the pixels are untouched and the image still reads the same
    a, ma = read_dicom(path)
    b, mb = read_dicom(tmp_path / result["out"])
    np.testing.assert_array_equal(a, b)
    assert (ma.photometric, ma.view, ma.laterality, ma.window_centers) == (mb.photometric, mb.view, mb.laterality, mb.window_centers)


def test_identifiers_are_consistent_reproducible_and_keyed(dicom_files, tmp_path):
    same_study = [f for f in dicom_files if f.parent == dicom_files[0].parent]
    assert len(same_study) >= 2
    d = Deidentifier(DeidOptions(key=KEY))
    r1 = [deidentify_file(str(f), str(tmp_path / "a"), deid=d) for f in same_study]
    r2 = [deidentify_file(str(f), str(tmp_path / "b"), deid=Deidentifier(DeidOptions(key=KEY))) for f in same_study]
    r3 = [deidentify_file(str(f), str(tmp_path / "c"), deid=Deidentifier(DeidOptions(key=b"x" * 64))) for f in same_study]
    assert len({r["study"] for r in r1}) == 1 and len({r["patient"] for r in r1}) == 1
    assert len({r["sop"] for r in r1}) == len(same_study)
    assert [r["sop"] for r in r1] == [r["sop"] for r in r2]  # same key: same output
    assert not {r["sop"] for r in r1} & {r["sop"] for r in r3}  # another key: unlinkable
    for r in r1:
        assert r["sop"].startswith("2.25.") and len(r["sop"]) <= 64 and r["sop"] != r["old_sop"]
        out = pydicom.dcmread(tmp_path / "a" / r["out"])
        assert out.SeriesInstanceUID == d.uid(pydicom.dcmread(r["src"]).SeriesInstanceUID)
        assert str(out.PatientID) == r["patient"] != str(pydicom.dcmread(r["src"]).PatientID)


def test_burned_in_annotation_is_refused_unless_allowed(dicom_files, tmp_path):
    ds = pydicom.dcmread(dicom_files[0])
    ds.BurnedInAnnotation = "YES"
    ds.save_as(tmp_path / "burned.dcm")
    r = deidentify_file(str(tmp_path / "burned.dcm"), str(tmp_path / "out"), deid=Deidentifier(DeidOptions(key=KEY)))
    assert r["status"] == "refused" and "Burned In Annotation" in r["reason"]
    r = deidentify_file(str(tmp_path / "burned.dcm"), str(tmp_path / "out"),
                        deid=Deidentifier(DeidOptions(key=KEY, allow_burned_in=True)))
    assert r["status"] == "ok" and r["burned_in"] == "YES"


def test_retain_patient_characteristics_option(dicom_files, tmp_path):
    d = Deidentifier(DeidOptions(key=KEY, keep_patient_characteristics=True))
    r = deidentify_file(str(dicom_files[0]), str(tmp_path), deid=d)
    out, src = pydicom.dcmread(tmp_path / r["out"]), pydicom.dcmread(dicom_files[0])
    assert out.PatientAge == src.PatientAge and out.PatientSex == src.PatientSex
    assert [c.CodeValue for c in out.DeidentificationMethodCodeSequence] == ["113100", "113108"]


def _errors(dciodvfy: str, path: Path) -> list[str]:
    proc = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=60)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")]
    return [re.sub(r"<[^>]*>|= \S+", "", line) for line in lines]  # values differ after de-identification


REAL_FILES = ["CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "SC_rgb.dcm", "rtplan.dcm"]


@pytest.mark.parametrize("name", ["synthetic", *REAL_FILES])
def test_dciodvfy_finds_no_new_errors(name, dicom_files, tmp_path):
    dciodvfy = require_tool("dciodvfy")
    src = dicom_files[3] if name == "synthetic" else Path(get_testdata_file(name, download=False))
    r = deidentify_file(str(src), str(tmp_path), deid=Deidentifier(DeidOptions(key=KEY)))
    assert r["status"] == "ok", r
    before, after = _errors(dciodvfy, src), _errors(dciodvfy, tmp_path / r["out"])
    new = [e for e in after if e not in before]
    assert not new, new
    if name == "synthetic":
        assert after == []


def test_unreadable_input_is_reported_not_fatal(tmp_path):
    (tmp_path / "junk.dcm").write_bytes(b"not dicom at all")
    r = deidentify_file(str(tmp_path / "junk.dcm"), str(tmp_path / "o"), deid=Deidentifier(DeidOptions(key=KEY)))
    assert r["status"] == "refused" and "not a readable DICOM" in r["reason"]


def test_key_file_is_created_private_and_reused(tmp_path):
    key, reproducible = load_or_create_key(tmp_path / "k" / "deid.key")
    assert reproducible and (tmp_path / "k" / "deid.key").stat().st_mode & 0o777 == 0o600
    assert load_or_create_key(tmp_path / "k" / "deid.key")[0] == key
    assert load_or_create_key(None)[1] is False


def test_deid_cli_with_manifest_feeds_training(synth_dir, tmp_path, capsys):
    m = tmp_path / "m.csv"
    assert main(["data", "manifest", "--rsna", str(synth_dir / "labels.csv"), "--images", str(synth_dir / "images"),
                 "--out", str(m)]) == 0
    out = tmp_path / "deid"
    assert main(["deid", str(synth_dir / "images"), str(out), "--manifest", str(m), "--key-file",
                 str(tmp_path / "key"), "--workers", "2", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert '"written": 64' in text
    rows, orig = read_manifest(out / "manifest.csv"), read_manifest(m)
    assert [r.label for r in rows] == [r.label for r in orig]
    assert len({r.patient_id for r in rows}) == len({r.patient_id for r in orig})
    assert not {r.patient_id for r in rows} & {r.patient_id for r in orig}
    assert all(Path(r.path).is_file() and r.patient_id.startswith("MV") for r in rows)
    assert "density" in rows[0].attributes and "age" not in rows[0].attributes  # age needs the option
    # nothing identifying from the sources anywhere in the output folder: not in file names, not in any
    # value (as a whole token), and long identifiers not even as raw bytes
    secrets_ = set()
    for f in (synth_dir / "images").rglob("*.dcm"):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        secrets_ |= {str(ds.PatientID), str(ds.PatientName), str(ds.AccessionNumber), str(ds.SOPInstanceUID),
                     str(ds.StudyInstanceUID), ds.StudyDate}
    secrets_.discard("")
    for f in out.rglob("*"):
        assert not set(f.relative_to(out).with_suffix("").parts) & secrets_, f.name
        if f.suffix == ".dcm":
            blob = f.read_bytes()
            assert not [s for s in secrets_ if len(s) >= 10 and s.encode() in blob], f.name
            for elem in pydicom.dcmread(f, stop_before_pixels=True).iterall():
                tokens = set(re.split(r"[^0-9A-Za-z.^]+", str(elem.value)))
                assert not tokens & secrets_, (f.name, elem.keyword)
        elif f.suffix == ".csv":
            tokens = set(re.split(r"[^0-9A-Za-z.^]+", f.read_text()))
            assert not tokens & secrets_, f.name
    assert (tmp_path / "deid_deid_report.csv").is_file()
    # the output folder may not be inside the input
    assert main(["deid", str(synth_dir), str(synth_dir / "x"), "--no-progress"]) == 2
