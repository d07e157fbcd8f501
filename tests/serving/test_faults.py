"""Faults injected for real: the database stopped under load and started again. While it is down every answer is
503 with Retry-After (never a 500), nothing acknowledged is lost, and once it is back every study is scored exactly
once. (A decoding worker killed: test_decode_pool; the service killed mid-job or mid-association: test_jobs,
test_dimse; a full disk: test_dimse, and below for STOW-RS; an interrupted batch: test_archive.)"""

from __future__ import annotations

import threading
import time
from collections import defaultdict

import httpx
import pydicom
import pytest
from helpers import LiveServer, stow_body
from sqlalchemy import func, select

pytestmark = pytest.mark.integration


def _studies(files) -> list[tuple[str, list[bytes]]]:
    by_study = defaultdict(list)
    for f in files:
        by_study[str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID)].append(f.read_bytes())
    return sorted(by_study.items())


def test_postgresql_stopped_under_load_answers_503_loses_nothing_and_scores_each_image_once(
        artifact, dicom_files, postgres_cluster, tmp_path):
    from medvision.serving.settings import Settings
    from medvision.serving.tables import Instance, InstanceState, Job, ScoredImage, Study, Usage

    server = LiveServer(Settings(artifact=str(artifact), database_url=postgres_cluster.url,
                                 data_dir=str(tmp_path / "data"), job_workers=1, study_stable_seconds=0.2,
                                 job_lease_seconds=3))
    studies = _studies(dicom_files[:48])
    answers: dict[str, list[httpx.Response]] = defaultdict(list)
    acknowledged, down, answered_while_down = threading.Event(), threading.Event(), threading.Event()
    failures: list[str] = []

    def pacs() -> None:  # sends every study once, as fast as it is answered, whatever happens to the database
        client = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.key}"}, timeout=60)
        try:
            for n, (uid, parts) in enumerate(studies):
                body, ctype = stow_body(parts)
                r = client.post("/dicomweb/studies", content=body, headers={"Content-Type": ctype})
                answers[uid].append(r)
                if n >= 2:
                    acknowledged.set()
                if down.is_set() and r.status_code == 503:
                    answered_while_down.set()
                if acknowledged.is_set() and not down.is_set():
                    time.sleep(0.05)
        except Exception as exc:  # a dropped connection would be a failure of the service
            failures.append(repr(exc))

    sender = threading.Thread(target=pacs)
    try:
        sender.start()
        assert acknowledged.wait(60), "no study acknowledged before the fault"
        postgres_cluster.stop("immediate")  # a crash: connections dropped mid-transaction, recovery at start
        down.set()
        assert answered_while_down.wait(30), "nothing answered while the database was down"
        # reads and readiness say the same while it is down
        r = server.client.get(f"/v1/studies/{studies[0][0]}")
        assert r.status_code == 503 and r.json()["code"] == "database_unavailable" and r.headers["Retry-After"]
        ready = httpx.get(f"{server.url}/readyz", timeout=30)
        assert ready.status_code == 503 and ready.json()["status"] == "database_unavailable"
        postgres_cluster.start()
        sender.join(120)
        assert not failures, failures
        statuses = [r.status_code for rs in answers.values() for r in rs]
        assert set(statuses) <= {200, 503} and 503 in statuses, statuses
        for rs in answers.values():
            for r in rs:
                if r.status_code == 503:
                    assert r.headers.get("Retry-After") and r.json()["code"] == "database_unavailable"
        # the PACS sends again what was not acknowledged (and, to be sure, one that was: idempotent)
        again = [uid for uid, rs in answers.items() if rs[-1].status_code != 200] + [studies[0][0]]
        for uid in again:
            body, ctype = stow_body(dict(studies)[uid])
            r = server.client.post("/dicomweb/studies", content=body, headers={"Content-Type": ctype})
            assert r.status_code == 200, r.text
        for uid, parts in studies:
            assert server.wait_scored(uid, timeout=120)["instances"] == {"scored": len(parts)}
    finally:
        server.stop()
    images = sum(len(parts) for _, parts in studies)
    with server.sessions() as db:
        assert db.scalar(select(func.count()).select_from(ScoredImage)) == images  # each image scored once
        assert db.scalar(select(func.sum(Usage.images))) == images  # and metered once
        assert db.scalar(select(func.count()).select_from(Instance)) == images
        assert db.scalar(select(func.count()).where(Instance.status != InstanceState.SCORED)) == 0
        assert {s.status for s in db.scalars(select(Study))} == {"scored"}
        assert {j.status for j in db.scalars(select(Job))} == {"done"}
        for path in db.scalars(select(Instance.path)):  # no row without its file
            assert (server.data_dir / path).is_file(), path  # (an absolute path stays itself under '/')


@pytest.fixture
def small_disk(tmp_path):
    """A real 1.5 MB file system (tmpfs) to fill up: the data folder lives on it."""
    import subprocess

    where = tmp_path / "data"
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1536k,mode=0700", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.fail(f"this test mounts a small tmpfs and needs the privilege to: {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_a_disk_filling_up_during_stow_refuses_the_body_with_507_and_keeps_nothing_of_it(
        artifact, dicom_files, small_disk, tmp_path):
    from medvision.serving.settings import Settings

    server = LiveServer(Settings(artifact=str(artifact), database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
                                 data_dir=str(small_disk), job_workers=0))
    try:
        files = [f.read_bytes() for f in dicom_files[:40]]
        assert sum(map(len, files)) > 1536 * 1024  # more than the disk holds
        body, ctype = stow_body(files)
        r = server.client.post("/dicomweb/studies", content=body, headers={"Content-Type": ctype})
        assert r.status_code == 507 and r.json()["code"] == "insufficient_storage", r.text
        assert not [p for p in small_disk.rglob("*") if p.is_file()]  # nothing half-written left behind
        # the space came back: the next study that fits is stored, the service never stopped
        body, ctype = stow_body(files[:1])
        r = server.client.post("/dicomweb/studies", content=body, headers={"Content-Type": ctype})
        assert r.status_code == 200, r.text
        assert server.client.get("/healthz").status_code == 200
    finally:
        server.stop()


def test_reports_wait_for_a_pacs_that_is_down_and_arrive_once_when_it_returns(artifact, dicom_files, tmp_path,
                                                                               monkeypatch):
    """The PACS that should get the SR is down: each attempt fails, is recorded on the study and retried with
    back-off (shortened here); once Orthanc is up the report arrives, exactly once."""
    import secrets

    from dicomweb_client.api import DICOMwebClient
    from dicomweb_client.session_utils import create_session_from_user_pass
    from helpers import free_port, require_tool, start_orthanc

    from medvision.serving import delivery
    from medvision.serving.settings import Settings

    require_tool("Orthanc")
    monkeypatch.setattr(delivery, "RETRY_SECONDS", (1, 2))
    password, http_port = secrets.token_hex(8), free_port()
    pacs = f"http://127.0.0.1:{http_port}/dicom-web"
    server = LiveServer(Settings(artifact=str(artifact), database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
                                 data_dir=str(tmp_path / "data"), pacs_url=pacs, pacs_username="mv",
                                 pacs_password=password, job_workers=1, study_stable_seconds=0.2))
    orthanc = None
    try:
        files = dicom_files[8:12]
        uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        body, ctype = stow_body([f.read_bytes() for f in files])
        assert server.client.post("/dicomweb/studies", content=body, headers={"Content-Type": ctype}).status_code == 200
        assert server.wait_scored(uid)["status"] == "scored"
        deadline = time.monotonic() + 60
        while (status := server.client.get(f"/v1/studies/{uid}").json())["push_attempts"] < 2:
            assert time.monotonic() < deadline, {k: v for k, v in status.items() if "push" in k}
            time.sleep(0.3)
        # visible: what failed, how often, when the next attempt is due; nothing delivered
        assert status["pushed_to_pacs"] is None and status["push_error"] and status["push_next_attempt"], status
        metrics = server.client_for("monitor", "admin").get("/metrics").text
        assert 'medvision_results_sent_total{outcome="failed",via="stow"}' in metrics
        config = {"Name": "pacs-back", "HttpPort": http_port, "DicomPort": free_port(), "RemoteAccessAllowed": False,
                  "AuthenticationEnabled": True, "RegisteredUsers": {"mv": password},
                  "StorageDirectory": str(tmp_path / "orthanc"), "IndexDirectory": str(tmp_path / "orthanc"),
                  "Plugins": ["/usr/share/orthanc/plugins/libOrthancDicomWeb.so"],
                  "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
        orthanc, api = start_orthanc(config, tmp_path, "mv", password)
        deadline = time.monotonic() + 60
        while not (status := server.client.get(f"/v1/studies/{uid}").json())["pushed_to_pacs"]:
            assert time.monotonic() < deadline, {k: v for k, v in status.items() if "push" in k}
            time.sleep(0.3)
        assert status["push_error"] == "" and status["push_next_attempt"] is None and status["push_attempts"] >= 3
        client = DICOMwebClient(url=pacs, session=create_session_from_user_pass("mv", password))
        reports = client.search_for_instances(uid, search_filters={"Modality": "SR"})
        assert [r["00080018"]["Value"][0] for r in reports] == [status["report_sop_instance_uid"]]  # once
        api.close()
    finally:
        if orthanc is not None:
            orthanc.terminate()
            orthanc.wait(30)
        server.stop()
