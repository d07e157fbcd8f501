"""The service over real HTTP semantics (TestClient), with a real ONNX Runtime session."""

import io
import logging
import os
from pathlib import Path

import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.data import get_testdata_file

from medvision.serving.app import create_app
from medvision.serving.engine import Engine
from medvision.serving.settings import Settings

DICOM = {"Content-Type": "application/dicom"}


def test_health_and_readiness(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready" and ready["model"]["name"] == "mv_vit_test"
    assert ready["model"]["format"] == "fp32" and ready["model"]["gate"] == "not gated"


def test_predict_raw_body_matches_local_engine(client, artifact, dicom_files):
    f = dicom_files[3]
    r = client.post("/v1/predict", content=f.read_bytes(), headers=DICOM)
    assert r.status_code == 200, r.text
    body = r.json()
    ds = pydicom.dcmread(f)
    assert body["sop_instance_uid"] == ds.SOPInstanceUID
    assert body["study_instance_uid"] == ds.StudyInstanceUID
    local = Engine(artifact).predict(f)
    assert body["probability"] == pytest.approx(local.probability, abs=1e-6)
    assert body["label"] == ("cancer" if body["probability"] >= body["threshold"] else "non-cancer")
    assert body["model"]["name"] == "mv_vit_test" and len(body["model"]["artifact_sha256"]) == 64
    assert r.headers["X-Request-ID"]
    # decoded under the model's contract (96 px for a 256-row image: half size), said in the answer and the record
    assert body["decode"] == local.meta.decode and body["decode"].startswith("1/2 ")
    from sqlalchemy import select

    from medvision.serving.tables import ScoredImage

    with client.app.state.db() as db:
        assert db.scalar(select(ScoredImage.decode).where(ScoredImage.sop_instance_uid == body["sop_instance_uid"])
                         ) == body["decode"]


def test_predict_multipart_upload(client, dicom_files):
    f = dicom_files[0]
    raw = client.post("/v1/predict", content=f.read_bytes(), headers=DICOM).json()
    r = client.post("/v1/predict", files={"file": (f.name, f.read_bytes(), "application/dicom")})
    assert r.status_code == 200, r.text
    assert r.json()["probability"] == pytest.approx(raw["probability"])


def _truncated(files):
    data = files[0].read_bytes()
    return data[: len(data) * 2 // 3]


def _sr(_):
    return Path(get_testdata_file("test-SR.dcm", download=False)).read_bytes()


def _png(_):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


BAD = [
    ("png", _png, 422, "not_dicom", "PNG"),
    ("empty", lambda f: b"", 400, "empty_body", "0 bytes"),
    ("truncated", _truncated, 422, "corrupt_dicom", "truncated"),
    ("structured report", _sr, 422, "not_an_image", "SR"),
    ("garbage", lambda f: bytes(range(256)) * 4, 422, "not_dicom", "not a DICOM"),
    ("invalid attribute value", lambda f: Path(get_testdata_file("badVR.dcm", download=False)).read_bytes(), 422,
     "corrupt_dicom", "malformed"),
    ("too large", lambda f: b"\0" * 2_000_001, 413, "payload_too_large", "limit"),
]


@pytest.mark.parametrize("case,make,status,code,words", BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_a_4xx_naming_the_problem(client, dicom_files, case, make, status, code, words):
    r = client.post("/v1/predict", content=make(dicom_files), headers=DICOM)
    assert r.status_code == status, r.text
    problem = r.json()
    assert r.headers["content-type"] == "application/problem+json"
    assert problem["code"] == code and words in problem["detail"] and problem["status"] == status
    # ... and the service stays up and keeps scoring
    assert client.post("/v1/predict", content=dicom_files[0].read_bytes(), headers=DICOM).status_code == 200


def test_bad_multipart_and_content_type(client, dicom_files):
    r = client.post("/v1/predict", files={"file": ("x.png", _png(None), "image/png")})
    assert r.status_code == 422 and r.json()["code"] == "not_dicom"
    r = client.post("/v1/predict", data={"note": "no file"})
    assert r.status_code in (400, 415) and r.json()["code"] in ("missing_file", "unsupported_media_type")
    r = client.post("/v1/predict", content=b"{}", headers={"Content-Type": "application/json"})
    assert r.status_code == 415 and "application/dicom" in r.json()["detail"]
    assert client.get("/v1/nope").status_code == 404
    broken = b"--xyz\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.dcm\"\r\n\r\nabc"  # no closing boundary
    r = client.post("/v1/predict", content=broken, headers={"Content-Type": "multipart/form-data; boundary=xyz"})
    assert 400 <= r.status_code < 500 and r.json()["code"] == "malformed_request"


def test_openapi_documents_predict(client):
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    assert "application/dicom" in spec["paths"]["/v1/predict"]["post"]["requestBody"]["content"]


def test_logs_carry_no_patient_identifiers(client, dicom_files, caplog):
    caplog.set_level(logging.DEBUG)
    ds = pydicom.dcmread(dicom_files[2])
    client.post("/v1/predict", content=dicom_files[2].read_bytes(), headers=DICOM)
    client.post("/v1/predict", content=_truncated([dicom_files[2]]), headers=DICOM)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "POST /v1/predict 200" in text
    for identifier in (str(ds.PatientName), ds.PatientID, ds.AccessionNumber, ds.SOPInstanceUID):
        assert identifier not in text


def test_missing_artifact_fails_at_startup_with_a_clear_error(tmp_path):
    from medvision.errors import ArtifactError

    with pytest.raises(ArtifactError, match="not found"):
        with TestClient(create_app(Settings(artifact=str(tmp_path / "none.onnx")))):
            pass


def test_a_model_trained_under_another_decode_contract_is_refused_by_name(artifact):
    from medvision.errors import ArtifactError
    from medvision.serving.settings import Settings

    with pytest.raises(ArtifactError, match=r"decode contract mismatch: .*decode_long_side 96.*pinned to "
                                            r"decode_long_side 0"):
        Engine.from_settings(Settings(artifact=str(artifact), decode_long_side=0))
    assert Engine.from_settings(Settings(artifact=str(artifact), decode_long_side=96)).meta.preprocess.decode_long_side == 96


def test_a_model_refused_by_the_gate_is_never_served(artifact, tmp_path):
    import onnx

    from medvision.artifact import GateReport, read_artifact, write_artifact
    from medvision.errors import ArtifactError

    meta = read_artifact(artifact).model_copy(update={"gate": GateReport(
        passed=False, reasons=["AUROC drop 0.05 is not ≤ 0.01"])})
    refused = write_artifact(onnx.load(str(artifact)), meta, tmp_path / "refused.onnx")
    with pytest.raises(ArtifactError, match="refused by the promotion gate .*AUROC drop 0.05"):
        Engine(str(refused))


def test_decoding_processes_default_to_one_per_core(monkeypatch):
    from medvision.cores import usable_cores
    from medvision.serving.settings import Settings

    monkeypatch.delenv("MEDVISION_DECODE_PROCESSES", raising=False)
    cores = usable_cores()  # the CPUs it may run on, within a CPU quota
    assert Settings().decoders == (cores if cores > 1 else 0)
    assert Settings(decode_processes=0).decoders == 0 and Settings(decode_processes=3).decoders == 3


def test_the_model_runs_on_the_cores_the_service_was_given(artifact):
    # a service started with `taskset -c 0` (or in a container's CPU set) on a machine of more cores: every thread
    # of its model stays on core 0 (ONNX Runtime left to itself pins a thread to each physical core of the machine)
    import subprocess
    import sys

    script = ("import glob, os, sys; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
              "from medvision.serving.engine import Engine; e = Engine(sys.argv[1]); "
              "print(sorted({open(t + '/status').read().split('Cpus_allowed_list:')[1].split()[0] "
              "for t in glob.glob('/proc/self/task/*')}), e.session.get_session_options().intra_op_num_threads)")
    done = subprocess.run([sys.executable, "-c", script, str(artifact)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    first = min(os.sched_getaffinity(0))
    assert done.stdout.split() == [f"['{first}']", "1"]
