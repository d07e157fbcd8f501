"""DICOMweb in: STOW-RS reception (standard responses, per-instance failures, idempotent re-sends, chunked
bodies), the persisted scoring queue, the TID 1500 SR (valid by dciodvfy) retrievable by WADO-RS."""

import subprocess
import time

import httpx
import pydicom
import pytest
from helpers import LiveServer as Server
from helpers import require_tool, stow_body

from medvision.serving.engine import Engine
from medvision.serving.settings import Settings


@pytest.fixture(scope="module")
def server(artifact, tmp_path_factory):
    base = tmp_path_factory.mktemp("dicomweb")
    s = Server(Settings(artifact=str(artifact), database_url=f"sqlite:///{base / 'db.sqlite'}",
                        data_dir=str(base / "data"), job_lease_seconds=5, max_upload_bytes=20_000_000,
                        study_stable_seconds=0.5))
    yield s
    s.stop()


def _study(dicom_files, patient: int) -> list:
    return dicom_files[4 * patient: 4 * patient + 4]


def test_stow_stores_scores_and_reports_a_study(server, dicom_files, tmp_path):
    files = _study(dicom_files, 0)
    body, ctype = stow_body([f.read_bytes() for f in files])
    r = server.client.post("/dicomweb/studies", content=body, headers={"Content-Type": ctype})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/dicom+json")
    stored = r.json()["00081199"]["Value"]
    uids = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    assert [s["00081155"]["Value"][0] for s in stored] == [str(d.SOPInstanceUID) for d in uids]
    study_uid = str(uids[0].StudyInstanceUID)
    assert r.json()["00081190"]["Value"][0].endswith(f"/dicomweb/studies/{study_uid}")

    status = server.wait_scored(study_uid)
    assert status["status"] == "scored" and status["instances"] == {"scored": 4}
    results = server.client.get(f"/v1/studies/{study_uid}/results").json()["images"]
    engine = Engine(server.server.config.app.state.settings.artifact)
    for f, row in zip(files, results, strict=True):
        assert row["probability"] == pytest.approx(engine.predict(f).probability, abs=1e-6)

    # the report: retrievable by WADO-RS, referencing the four images, valid for dciodvfy
    sr_uid = status["report_sop_instance_uid"]
    series = status["report_series_instance_uid"]
    assert server.client.get(f"/dicomweb/studies/{study_uid}/series/1.2.3/instances/{sr_uid}").status_code == 404
    r = server.client.get(f"/dicomweb/studies/{study_uid}/series/{series}/instances/{sr_uid}")
    assert r.status_code == 200 and r.headers["content-type"].startswith("multipart/related")
    boundary = r.headers["content-type"].split("boundary=")[1].encode()
    part = r.content.split(b"--" + boundary)[1].split(b"\r\n\r\n", 1)[1].rsplit(b"\r\n", 1)[0]
    sr_path = tmp_path / "sr.dcm"
    sr_path.write_bytes(part)
    sr = pydicom.dcmread(sr_path)
    assert sr.Modality == "SR" and str(sr.StudyInstanceUID) == study_uid
    referenced = {str(i.ReferencedSOPInstanceUID) for s in sr.CurrentRequestedProcedureEvidenceSequence
                  for se in s.ReferencedSeriesSequence for i in se.ReferencedSOPSequence}
    assert referenced == {str(d.SOPInstanceUID) for d in uids}
    # each image's group says what its probability means: the calibration that made it, the prevalence it assumes
    from medvision.serving.site_calibrations import Meaning

    expected = Meaning(engine.meta.calibration_method, engine.meta.calibration_prevalence).parameters()
    parameters = [item.TextValue for item in _content_items(sr) if item.get("ValueType") == "TEXT"
                  and item.ConceptNameCodeSequence[0].CodeValue == "111002"]  # DCM Algorithm Parameters
    assert parameters.count(expected[0]) == parameters.count(expected[1]) == 4 * 2  # measurement and evaluation
    assert expected[1].startswith("meaning: ") and len(expected[1]) <= 64
    out = subprocess.run([require_tool("dciodvfy"), str(sr_path)], capture_output=True, text=True)
    errors = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]
    assert not errors, errors


def _content_items(item):
    for child in item.get("ContentSequence", []):
        yield child
        yield from _content_items(child)


def test_resending_a_study_scores_nothing_twice(server, dicom_files):
    files = _study(dicom_files, 1)
    body, ctype = stow_body([f.read_bytes() for f in files])
    assert server.client.post("/dicomweb/studies", content=body, headers={"Content-Type": ctype}).status_code == 200
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    first = server.wait_scored(study_uid)
    before = server.client.get(f"/v1/studies/{study_uid}/results").json()["images"]
    r = server.client.post(f"/dicomweb/studies/{study_uid}", content=body, headers={"Content-Type": ctype})
    assert r.status_code == 200 and len(r.json()["00081199"]["Value"]) == 4
    time.sleep(1.0)
    after = server.client.get(f"/v1/studies/{study_uid}/results").json()["images"]
    assert [i["scored_at"] for i in after] == [i["scored_at"] for i in before]
    assert server.client.get(f"/v1/studies/{study_uid}").json()["instances"] == first["instances"]


def test_per_instance_failures_and_chunked_bodies(server, dicom_files):
    good = _study(dicom_files, 2)[0]
    sr_only = pydicom.data.get_testdata_file("test-SR.dcm")
    parts = [good.read_bytes(), b"not a dicom file at all", open(sr_only, "rb").read()]
    body, ctype = stow_body(parts)

    def chunks():  # no Content-Length: a chunked upload, as Orthanc sends with ChunkedTransfers
        for i in range(0, len(body), 7000):
            yield body[i:i + 7000]

    r = server.client.post("/dicomweb/studies", content=chunks(), headers={"Content-Type": ctype})
    assert r.status_code == 202, r.text
    failed = r.json()["00081198"]["Value"]
    assert sorted(f["00081197"]["Value"][0] for f in failed) == [0x0122, 0xC000]
    assert len(r.json()["00081199"]["Value"]) == 1

    other_study = _study(dicom_files, 3)[0]
    b2, c2 = stow_body([other_study.read_bytes()])
    r = server.client.post(f"/dicomweb/studies/{pydicom.dcmread(good, stop_before_pixels=True).StudyInstanceUID}",
                           content=b2, headers={"Content-Type": c2})
    assert r.status_code == 409 and r.json()["00081198"]["Value"][0]["00081197"]["Value"][0] == 0xA900


@pytest.mark.parametrize("case,headers,body,status,code", [
    ("no key", {"Authorization": ""}, None, 401, "unauthenticated"),
    ("form upload", {"Content-Type": "multipart/form-data; boundary=x"}, b"--x--", 415, "unsupported_media_type"),
    ("json metadata", {"Content-Type": 'multipart/related; type="application/dicom+json"; boundary=x'}, b"--x--",
     415, "unsupported_media_type"),
    ("no boundary", {"Content-Type": 'multipart/related; type="application/dicom"'}, b"", 400, "malformed_request"),
    ("truncated", None, "truncate", 400, "malformed_request"),
    ("empty", {"Content-Type": 'multipart/related; type="application/dicom"; boundary=x'}, b"--x--\r\n", 400,
     "malformed_request"),
])
def test_bad_stow_requests_are_refused_clearly(server, dicom_files, case, headers, body, status, code):
    full, ctype = stow_body([dicom_files[20].read_bytes()])
    if body == "truncate":
        body, headers = full[: len(full) // 2], {"Content-Type": ctype}
    r = server.client.post("/dicomweb/studies", content=body or b"", headers={"Content-Type": ctype, **(headers or {})})
    assert r.status_code == status and r.json()["code"] == code, r.text
    assert server.client.get("/healthz").status_code == 200  # still up


def test_dicomweb_client_stores_and_reads_back(server, dicom_files):
    from dicomweb_client.api import DICOMwebClient
    from dicomweb_client.session_utils import create_session

    session = create_session()
    session.headers["Authorization"] = f"Bearer {server.key}"
    client = DICOMwebClient(url=f"{server.url}/dicomweb", session=session)
    datasets = [pydicom.dcmread(f) for f in _study(dicom_files, 4)]
    response = client.store_instances(datasets)
    assert len(response.ReferencedSOPSequence) == 4
    study_uid = str(datasets[0].StudyInstanceUID)
    status = server.wait_scored(study_uid)
    sr = client.retrieve_instance(study_uid, status["report_series_instance_uid"], status["report_sop_instance_uid"])
    assert sr.Modality == "SR" and sr.SOPInstanceUID == status["report_sop_instance_uid"]
    # a reader (review scope) sees the study; another site's score key would not
    reader = httpx.get(f"{server.url}/v1/studies/{study_uid}", headers={"Authorization": f"Bearer {server.reader}"})
    assert reader.status_code == 200


def test_pull_without_a_configured_pacs_says_so(server):
    r = server.client_for("puller", "pull").post("/v1/pull", json={"study_instance_uid": "1.2.3"})
    assert r.status_code == 409 and r.json()["code"] == "pacs_not_configured"


def test_an_image_already_scored_by_predict_is_not_scored_again(server, dicom_files):
    files = _study(dicom_files, 5)
    first = server.client.post("/v1/predict", content=files[0].read_bytes(),
                               headers={"Content-Type": "application/dicom"}).json()
    body, ctype = stow_body([f.read_bytes() for f in files])
    assert server.client.post("/dicomweb/studies", content=body, headers={"Content-Type": ctype}).status_code == 200
    study_uid = first["study_instance_uid"]
    assert server.wait_scored(study_uid)["instances"] == {"scored": 4}
    rows = server.client.get(f"/v1/studies/{study_uid}/results").json()["images"]
    reused = next(r for r in rows if r["sop_instance_uid"] == first["sop_instance_uid"])
    assert reused["probability"] == first["probability"]
    state = server.server.config.app.state
    from medvision.serving.tables import ScoredImage, Usage

    with state.db() as db:
        assert db.query(ScoredImage).filter_by(study_instance_uid=study_uid).count() == 4
        # every row carries the accession number the review UI searches by, the predicted one too
        accession = str(pydicom.dcmread(files[0], stop_before_pixels=True).AccessionNumber)
        assert {r.accession_number for r in db.query(ScoredImage).filter_by(study_instance_uid=study_uid)} == {accession}
        key_id = db.query(ScoredImage).filter_by(study_instance_uid=study_uid).first().key_id
        # metered: 1 image by predict + 3 by the queue (not 5), summed with this key's other studies
        total_scored = db.query(ScoredImage).filter_by(key_id=key_id).count()
        assert sum(u.images for u in db.query(Usage).filter_by(key_id=key_id)) == total_scored


def test_a_study_sent_in_pieces_gets_one_report(server, dicom_files):
    files = _study(dicom_files, 6)
    for piece in (files[:2], files[2:]):  # two requests, as a PACS sending series by series would
        body, ctype = stow_body([f.read_bytes() for f in piece])
        assert server.client.post("/dicomweb/studies", content=body, headers={"Content-Type": ctype}).status_code == 200
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    status = server.wait_scored(study_uid)
    assert status["instances"] == {"scored": 4}
    reports = [pydicom.dcmread(p, stop_before_pixels=True) for p in (server.data_dir / "reports").glob("*.dcm")]
    mine = [r for r in reports if r.StudyInstanceUID == study_uid]
    assert len(mine) == 1 and mine[0].SOPInstanceUID == status["report_sop_instance_uid"]


def test_a_report_made_again_is_the_same_instance_in_the_same_file(server, dicom_files):
    """A job run again after the service died between writing its report and recording it makes the same report:
    the same SOP Instance UID (derived from what the report says), on the same file; nothing is left unreferenced
    in the data folder. A report that says something else (another image, another threshold) is a new instance."""
    from medvision.serving.structured_report import ImageScore, report_uids
    from medvision.serving.tables import Job

    files = _study(dicom_files, 7)
    body, ctype = stow_body([f.read_bytes() for f in files])
    assert server.client.post("/dicomweb/studies", content=body, headers={"Content-Type": ctype}).status_code == 200
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    first = server.wait_scored(study_uid)
    state = server.server.config.app.state
    reports = server.data_dir / "reports"
    before = sorted(reports.glob("*.dcm"))
    with state.db() as db:
        job = db.query(Job).filter_by(study_instance_uid=study_uid).first()
        db.expunge(job)
    info = state.engine.model_info()
    state.worker.write_report(job, info)
    again = server.client.get(f"/v1/studies/{study_uid}").json()
    assert again["report_sop_instance_uid"] == first["report_sop_instance_uid"]
    assert sorted(reports.glob("*.dcm")) == before
    mine = [p for p in before if pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID == study_uid]
    assert len(mine) == 1 and pydicom.dcmread(mine[0]).SOPInstanceUID == first["report_sop_instance_uid"]

    scores = [ImageScore("1.2.3.4", 0.25, False, 0.3), ImageScore("1.2.3.5", 0.75, True, 0.3)]
    series, sop = report_uids("a", study_uid, info, scores)
    assert report_uids("a", study_uid, info, scores[::-1]) == (series, sop)  # order does not matter
    for changed in (report_uids("a", study_uid, info, scores[:1]),
                    report_uids("a", study_uid, info, [scores[0], ImageScore("1.2.3.5", 0.75, True, 0.2)]),
                    report_uids("b", study_uid, info, scores)):
        assert changed[1] != sop
    assert report_uids("a", study_uid, info, scores[:1])[0] == series  # one series per study and model
    assert len(sop) <= 64 and all(part.isdigit() for part in sop.split("."))


def test_metrics_count_images_alike_whichever_way_they_came(server, dicom_files):
    """Images scored from a STOW-RS study and through /v1/predict land in one counter per site; an image refused by
    /v1/predict is counted as refused, like one refused in a study; the scoring queue is visible."""
    import re

    admin = server.client_for("metrics-ops", "admin")
    site = server.client_for("metrics-site", "score")

    def value(name: str, label: str) -> float:
        m = re.search(rf'^{name}{{{label}}} ([0-9.e+-]+)$', admin.get("/metrics").text, re.MULTILINE)
        return float(m.group(1)) if m else 0.0

    files = _study(dicom_files, 5)
    body, ctype = stow_body([f.read_bytes() for f in files])
    assert site.post("/dicomweb/studies", content=body, headers={"Content-Type": ctype}).status_code == 200
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    deadline = time.monotonic() + 60
    while site.get(f"/v1/studies/{study_uid}").json()["status"] == "received":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert value("medvision_images_scored_total", 'site="metrics-site"') == 4.0  # by the job worker
    assert site.post("/v1/predict", content=dicom_files[-1].read_bytes(),
                     headers={"Content-Type": "application/dicom"}).status_code == 200
    assert value("medvision_images_scored_total", 'site="metrics-site"') == 5.0
    before = value("medvision_images_refused_total", 'reason="not_dicom"')
    assert site.post("/v1/predict", content=b"not a dicom file at all",
                     headers={"Content-Type": "application/dicom"}).status_code == 422
    assert value("medvision_images_refused_total", 'reason="not_dicom"') == before + 1
    text = admin.get("/metrics").text
    assert re.search(r"^medvision_jobs_queued \d", text, re.MULTILINE)
    assert re.search(r"^medvision_oldest_due_job_seconds \d", text, re.MULTILINE)


def test_qido_and_wado_answer_a_pacs_script_with_dicomweb_client(server, dicom_files):
    """Search and retrieve through dicomweb-client as a PACS integration script would: the study (and the RetrieveURL
    the STOW-RS response gave), its series including the report's, its instances, metadata without pixel data, and
    nothing of another site's."""
    from dicomweb_client.api import DICOMwebClient
    from dicomweb_client.session_utils import create_session

    files = _study(dicom_files, 6)
    body, ctype = stow_body([f.read_bytes() for f in files])
    owner = server.client_for("qido-site", "score")
    r = owner.post("/dicomweb/studies", content=body, headers={"Content-Type": ctype})
    assert r.status_code == 200
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    deadline = time.monotonic() + 60
    while (status := owner.get(f"/v1/studies/{study_uid}").json())["status"] == "received":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    retrieve_url = r.json()["00081190"]["Value"][0]
    assert owner.get(retrieve_url).status_code == 200  # the RetrieveURL answers

    def client_for(http_client) -> DICOMwebClient:
        session = create_session()
        session.headers["Authorization"] = http_client.headers["Authorization"]
        return DICOMwebClient(url=f"{server.url}/dicomweb", session=session)

    dw = client_for(owner)
    studies = dw.search_for_studies(search_filters={"StudyInstanceUID": study_uid})
    assert len(studies) == 1
    found = pydicom.Dataset.from_json(studies[0])
    assert found.NumberOfStudyRelatedInstances == 5 and set(found.ModalitiesInStudy) == {"MG", "SR"}
    accession = str(pydicom.dcmread(files[0], stop_before_pixels=True).AccessionNumber)
    assert [pydicom.Dataset.from_json(s).StudyInstanceUID for s in
            dw.search_for_studies(search_filters={"AccessionNumber": accession})] == [study_uid]
    series = {pydicom.Dataset.from_json(s).SeriesInstanceUID: pydicom.Dataset.from_json(s)
              for s in dw.search_for_series(study_uid)}
    assert status["report_series_instance_uid"] in series
    assert series[status["report_series_instance_uid"]].Modality == "SR"
    image_series = [uid for uid in series if uid != status["report_series_instance_uid"]]
    sent = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    assert {pydicom.Dataset.from_json(i).SOPInstanceUID for uid in image_series
            for i in dw.search_for_instances(study_uid, uid)} == sent
    retrieved = dw.retrieve_study(study_uid)
    assert len(retrieved) == 5 and sum(ds.Modality == "SR" for ds in retrieved) == 1
    assert {str(ds.SOPInstanceUID) for uid in image_series for ds in dw.retrieve_series(study_uid, uid)} == sent
    metadata = dw.retrieve_study_metadata(study_uid)
    assert len(metadata) == 5 and all("7FE00010" not in m or "BulkDataURI" in m["7FE00010"] for m in metadata)
    # another site sees nothing of it; bad matching keys are refused by name
    other = client_for(server.client_for("qido-other", "score"))
    assert other.search_for_studies(search_filters={"StudyInstanceUID": study_uid}) == []
    assert server.client_for("qido-other2", "score").get(f"/dicomweb/studies/{study_uid}").status_code == 404
    bad = owner.get("/dicomweb/studies", params={"PatientName": "DOE*"})
    assert bad.status_code == 400 and "unsupported matching key" in bad.json()["detail"]
    assert owner.get("/dicomweb/studies", params={"limit": 0}).status_code == 400
