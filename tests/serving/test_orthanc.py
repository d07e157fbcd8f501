"""The PACS round trip against a real Orthanc: storescu C-STOREs a study into Orthanc, Orthanc pushes it to
medvision over STOW-RS, medvision scores it and stores its DICOM SR back into Orthanc over STOW-RS, where it
is found by QIDO-RS, retrieved by WADO-RS (dicomweb-client) and valid for dciodvfy, with a heatmap Secondary
Capture per image.

Orthanc has no bind-address setting: its REST API is kept to loopback (RemoteAccessAllowed false) behind a
password, and its DICOM port accepts stores only from the registered test AE on 127.0.0.1."""

import json
import secrets
import subprocess
import time

import httpx
import pydicom
import pytest
from helpers import LiveServer as Server
from helpers import free_port, require_tool, start_orthanc

from medvision.serving.settings import Settings

pytestmark = pytest.mark.integration

PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
STORESCU_FLAG = {  # storescu proposes only the transfer syntax it is told to
    "1.2.840.10008.1.2.4.90": "-xv", "1.2.840.10008.1.2.4.91": "-xw", "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.80": "-xt", "1.2.840.10008.1.2.4.81": "-xu", "1.2.840.10008.1.2.5": "-xr",
    "1.2.840.10008.1.2.4.50": "-xy", "1.2.840.10008.1.2.1.99": "-xd",
}



@pytest.fixture()
def orthanc_and_medvision(artifact, tmp_path):
    require_tool("Orthanc")
    require_tool("storescu")
    password = secrets.token_hex(8)
    http_port, dicom_port = free_port(), free_port()
    medvision = None
    # medvision first (Orthanc must know its URL); it pushes reports to Orthanc's DICOMweb root
    medvision = Server(Settings(artifact=str(artifact), database_url=f"sqlite:///{tmp_path / 'mv.db'}",
                                data_dir=str(tmp_path / "mv"), pacs_url=f"http://127.0.0.1:{http_port}/dicom-web",
                                pacs_username="mv", pacs_password=password, heatmap_capture=True,
                                study_stable_seconds=0.5))
    config = {
        "Name": "medvision-test", "HttpPort": http_port, "DicomPort": dicom_port, "DicomAet": "ORTHANC",
        "RemoteAccessAllowed": False, "AuthenticationEnabled": True, "RegisteredUsers": {"mv": password},
        "DicomAlwaysAllowStore": False, "DicomCheckModalityHost": True, "DicomCheckCalledAet": True,
        "DicomModalities": {"testscu": ["TESTSCU", "127.0.0.1", 104]},
        "StorageDirectory": str(tmp_path / "orthanc"), "IndexDirectory": str(tmp_path / "orthanc"),
        "Plugins": [PLUGIN],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Servers": {"medvision": {
            "Url": f"{medvision.url}/dicomweb/", "HttpHeaders": {"Authorization": f"Bearer {medvision.key}"},
            "ChunkedTransfers": True}}},
    }
    try:
        proc, api = start_orthanc(config, tmp_path, "mv", password)
    except BaseException:
        medvision.stop()
        raise
    try:
        yield api, dicom_port, medvision, http_port, password
    finally:
        proc.terminate()
        proc.wait(30)
        api.close()
        medvision.stop()


def _c_store(files, dicom_port):
    for f in files:
        ts = str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        flag = [STORESCU_FLAG[ts]] if ts in STORESCU_FLAG else []
        done = subprocess.run(["storescu", "-aet", "TESTSCU", "-aec", "ORTHANC", *flag, "127.0.0.1", str(dicom_port),
                               str(f)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr


def _wait_pushed(medvision, study_uid):
    status = medvision.wait_scored(study_uid)
    deadline = time.monotonic() + 30
    while not status["pushed_to_pacs"]:
        assert not status["push_error"] and time.monotonic() < deadline, status
        time.sleep(0.3)
        status = medvision.client.get(f"/v1/studies/{study_uid}").json()
    return status


def test_pull_mode_fetches_a_study_from_the_pacs(orthanc_and_medvision, dicom_files):
    api, dicom_port, medvision, http_port, password = orthanc_and_medvision
    files = dicom_files[36:40]
    _c_store(files, dicom_port)
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    assert medvision.client.post("/v1/pull", json={"study_instance_uid": study_uid}).status_code == 403  # no pull scope
    puller = medvision.client_for("integration", "pull", site="pacs")  # pulls for the PACS key's site
    r = puller.post("/v1/pull", json={"study_instance_uid": study_uid})
    assert r.status_code == 200 and r.json()["stored"] == 4, r.text
    status = _wait_pushed(medvision, study_uid)
    assert status["instances"] == {"scored": 4}
    again = puller.post("/v1/pull", json={"study_instance_uid": study_uid}).json()
    assert again["stored"] == 0 and again["already_stored"] == 4  # scored once
    missing = puller.post("/v1/pull", json={"study_instance_uid": "1.2.3.4.5"})
    assert missing.status_code == 404 and missing.json()["code"] == "study_not_found"


def test_orthanc_round_trip(orthanc_and_medvision, dicom_files, tmp_path):
    api, dicom_port, medvision, http_port, password = orthanc_and_medvision
    assert httpx.get(f"http://127.0.0.1:{http_port}/system").status_code == 401  # Orthanc wants its password
    files = dicom_files[32:36]
    _c_store(files, dicom_port)
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    found = api.post("/tools/lookup", content=study_uid).json()
    orthanc_study = next(x["ID"] for x in found if x["Type"] == "Study")
    assert len(api.get(f"/studies/{orthanc_study}/instances").json()) == 4

    # Orthanc pushes the study to medvision over STOW-RS
    r = api.post("/dicom-web/servers/medvision/stow", json={"Resources": [orthanc_study], "Synchronous": True})
    assert r.status_code == 200, r.text
    status = _wait_pushed(medvision, study_uid)
    assert status["status"] == "scored" and status["instances"] == {"scored": 4}

    # the SR is now in Orthanc: find it by QIDO-RS, fetch it by WADO-RS
    from dicomweb_client.api import DICOMwebClient
    from dicomweb_client.session_utils import create_session_from_user_pass

    pacs = DICOMwebClient(url=f"http://127.0.0.1:{http_port}/dicom-web",
                          session=create_session_from_user_pass("mv", password))
    series = pacs.search_for_series(study_uid, search_filters={"Modality": "SR"})
    assert len(series) == 1
    sr_series = series[0]["0020000E"]["Value"][0]
    (meta,) = pacs.search_for_instances(study_uid, sr_series)
    sr_uid = meta["00080018"]["Value"][0]
    assert sr_uid == status["report_sop_instance_uid"]
    sr = pacs.retrieve_instance(study_uid, sr_series, sr_uid)
    path = tmp_path / "from_orthanc.dcm"
    sr.save_as(path, enforce_file_format=True)
    out = subprocess.run([require_tool("dciodvfy"), str(path)], capture_output=True, text=True)
    errors = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]
    assert not errors, errors
    # and with it one heatmap Secondary Capture per image, valid too
    captures = pacs.search_for_instances(study_uid, search_filters={"SOPClassUID": "1.2.840.10008.5.1.4.1.1.7"})
    assert len(captures) == 4
    sc_meta = captures[0]
    sc = pacs.retrieve_instance(study_uid, sc_meta["0020000E"]["Value"][0], sc_meta["00080018"]["Value"][0])
    sc_path = tmp_path / "sc_from_orthanc.dcm"
    sc.save_as(sc_path, enforce_file_format=True)
    out = subprocess.run([require_tool("dciodvfy"), str(sc_path)], capture_output=True, text=True)
    assert not [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]
    # the probabilities in the SR are the ones medvision stored for the images
    results = {i["sop_instance_uid"]: i["probability"]
               for i in medvision.client.get(f"/v1/studies/{study_uid}/results").json()["images"]}
    values = [float(item.MeasuredValueSequence[0].NumericValue)
              for group in sr.ContentSequence if group.ConceptNameCodeSequence[0].CodeValue == "126010"
              for g in group.ContentSequence for item in getattr(g, "ContentSequence", [])
              if getattr(item, "ValueType", "") == "NUM"]
    assert sorted(round(v, 6) for v in values) == sorted(round(p, 6) for p in results.values())


def test_score_fetches_an_archive_from_the_pacs(orthanc_and_medvision, dicom_files, tmp_path, monkeypatch, capsys):
    """medvision score --pacs: WADO-RS from Orthanc into the output folder, scored like local files, fetched once."""
    from medvision.cli import main

    api, dicom_port, medvision, http_port, password = orthanc_and_medvision
    files = dicom_files[40:48]
    _c_store(files, dicom_port)
    studies = sorted({str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID) for f in files})
    monkeypatch.setenv("MEDVISION_PACS_USERNAME", "mv")
    monkeypatch.setenv("MEDVISION_PACS_PASSWORD", password)
    out = tmp_path / "scores"
    args = ["score", "--pacs", f"http://127.0.0.1:{http_port}/dicom-web", "--studies", ",".join([*studies, "1.2.3.4.5"]),
            "--model", medvision.server.config.app.state.settings.artifact, "--out", str(out), "--no-progress",
            "--format", "csv"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["scored_now"] == 8 and summary["total"]["exams"] == 2
    assert summary["pacs_studies_not_found"] == ["1.2.3.4.5"]
    assert main(args) == 0  # again: nothing fetched or scored twice
    again = json.loads(capsys.readouterr().out)
    assert again["already_done"] == 8 and again["processed_now"] == 0
