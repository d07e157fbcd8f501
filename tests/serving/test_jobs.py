"""The persisted job queue: exactly one claimer per job (threads and databases alike), lease takeover after a
crash, and a study acknowledged by STOW-RS survives kill -9 of the service and is scored after restart."""

import datetime as _dt
import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pydicom
import pytest
from helpers import free_port, fresh_postgres_db, start_service, stow_body

from medvision.serving.db import open_database
from medvision.serving.jobs import claim
from medvision.serving.tables import Job, utcnow


@pytest.fixture(params=["sqlite", "postgresql"])
def sessions(request, tmp_path):
    if request.param == "sqlite":
        return open_database(f"sqlite:///{tmp_path / 'jobs.db'}")
    return open_database(fresh_postgres_db(request.getfixturevalue("postgres_url"), f"jobs_{tmp_path.name[-12:]}"))


def test_each_job_is_claimed_by_exactly_one_worker(sessions):
    with sessions() as db:
        db.add_all([Job(study_instance_uid=f"1.2.{i}") for i in range(40)])
        db.commit()
    claimed: dict[str, list[int]] = {}

    def worker(name):
        mine = claimed.setdefault(name, [])
        while (job := claim(sessions, name, 60)) is not None:
            mine.append(job.id)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    ids = [j for js in claimed.values() for j in js]
    assert sorted(ids) == sorted(set(ids)) and len(ids) == 40
    with sessions() as db:
        assert {j.attempts for j in db.query(Job)} == {1}


def test_a_dead_workers_job_is_taken_over_after_its_lease(sessions):
    now = utcnow()
    with sessions() as db:
        db.add(Job(study_instance_uid="1.2.3", status="running", lease_owner="dead", attempts=1,
                   lease_until=now - _dt.timedelta(seconds=1)))
        db.add(Job(study_instance_uid="1.2.4", status="running", lease_owner="alive", attempts=1,
                   lease_until=now + _dt.timedelta(seconds=600)))
        db.commit()
    job = claim(sessions, "new", 60)
    assert job.study_instance_uid == "1.2.3" and job.lease_owner == "new" and job.attempts == 2
    assert claim(sessions, "other", 60) is None  # the live lease is respected



@pytest.mark.integration
def test_acknowledged_study_survives_kill_9_and_is_scored_after_restart(artifact, dicom_files, tmp_path):
    env = {**os.environ, "MEDVISION_DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite'}",
           "MEDVISION_DATA_DIR": str(tmp_path / "data"), "MEDVISION_JOB_WORKERS": "0",
           "MEDVISION_STUDY_STABLE_SECONDS": "0.3"}
    made = subprocess.run([sys.executable, "-m", "medvision.cli", "keys", "create", "pacs"], env=env,
                          capture_output=True, text=True, timeout=60)
    key = json.loads(made.stdout)["key"]
    port = free_port()
    proc = start_service(env, artifact, port)  # receive only: nothing gets scored before the crash
    files = dicom_files[24:28]
    body, ctype = stow_body([f.read_bytes() for f in files])
    auth = {"Authorization": f"Bearer {key}"}
    r = httpx.post(f"http://127.0.0.1:{port}/dicomweb/studies", content=body,
                   headers={"Content-Type": ctype, **auth}, timeout=60)
    assert r.status_code == 200
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)

    env["MEDVISION_JOB_WORKERS"] = "1"
    proc = start_service(env, artifact, port)
    try:
        study = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        deadline = time.monotonic() + 60
        while True:
            s = httpx.get(f"http://127.0.0.1:{port}/v1/studies/{study}", headers=auth, timeout=10).json()
            if s["status"] == "scored":
                break
            assert time.monotonic() < deadline, s
            time.sleep(0.3)
        assert s["instances"] == {"scored": 4} and s["report_sop_instance_uid"]
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.integration
def test_two_services_sharing_postgresql_score_each_study_once(artifact, dicom_files, postgres_url, tmp_path):
    from helpers import LiveServer

    from medvision.serving.settings import Settings
    from medvision.serving.tables import ScoredImage, Usage

    url = fresh_postgres_db(postgres_url, "two_services")
    data = str(tmp_path / "shared")  # one storage volume, as two replicas behind a load balancer would share
    a = LiveServer(Settings(artifact=str(artifact), database_url=url, data_dir=data, job_workers=2, study_stable_seconds=0.3))
    b = LiveServer(Settings(artifact=str(artifact), database_url=url, data_dir=data, job_workers=2, study_stable_seconds=0.3),
                   key_suffix="b")
    try:
        studies = []
        for n, server in enumerate([a, b, a, b, a, b]):
            files = dicom_files[4 * n: 4 * n + 4]
            body, ctype = stow_body([f.read_bytes() for f in files])
            assert server.client.post("/dicomweb/studies", content=body, headers={"Content-Type": ctype}).status_code == 200
            studies.append(str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID))
        for n, uid in enumerate(studies):
            assert (a if n % 2 == 0 else b).wait_scored(uid)["instances"] == {"scored": 4}
    finally:
        a.stop()
        b.stop()
    sessions = open_database(url)
    with sessions() as db:
        jobs = db.query(Job).all()
        assert len(jobs) == 6 and all(j.status == "done" and j.attempts == 1 for j in jobs)
        assert sum(u.images for u in db.query(Usage)) == 24  # metered once per image: nothing scored twice
        assert db.query(ScoredImage).count() == 24


def test_instances_filed_without_a_job_are_queued_at_start_up(sessions):
    from medvision.serving.stow import requeue_orphans
    from medvision.serving.tables import Instance

    with sessions() as db:  # the service died after filing these and before queueing their study
        db.add(Instance(sop_instance_uid="1.2.3.1", study_instance_uid="1.2.3", path="/x", status="received"))
        db.add(Instance(sop_instance_uid="1.2.4.1", study_instance_uid="1.2.4", path="/y", status="scored"))
        db.commit()
    assert requeue_orphans(sessions) == 1
    assert requeue_orphans(sessions) == 0  # queued now
    with sessions() as db:
        assert [j.study_instance_uid for j in db.query(Job)] == ["1.2.3"]


def test_an_image_the_service_died_on_three_times_is_refused_and_the_rest_scored(artifact, dicom_files, tmp_path):
    """No crash loop: a file that kills the service natively would otherwise be retried after every restart."""
    from helpers import LiveServer

    from medvision.serving.jobs import MAX_ATTEMPTS, Worker, WorkerContext
    from medvision.serving.settings import Settings
    from medvision.serving.tables import Instance

    server = LiveServer(Settings(artifact=str(artifact), database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
                                 data_dir=str(tmp_path / "data"), job_workers=0, study_stable_seconds=0))
    state = server.server.config.app.state
    try:
        study = _pushed(server, dicom_files[32:36])
        with state.db() as db:  # as left by the last of MAX_ATTEMPTS holders that died on the first image
            job = db.query(Job).filter_by(study_instance_uid=study).one()
            job.status, job.lease_owner, job.attempts = "running", "dead", MAX_ATTEMPTS
            job.lease_until = utcnow() - _dt.timedelta(seconds=1)
            db.commit()
            first = db.query(Instance).filter_by(study_instance_uid=study).order_by(Instance.id).first().id
        worker = Worker(WorkerContext.of(state), 1, 60, poll_seconds=0.1)
        worker.start()
        try:
            assert server.wait_scored(study)["status"] == "scored"
        finally:
            worker.shutdown()
        with state.db() as db:
            rows = {i.id: (i.status, i.error_code) for i in db.query(Instance).filter_by(study_instance_uid=study)}
        assert rows.pop(first) == ("refused", "service_died")
        assert set(rows.values()) == {("scored", "")} and len(rows) == 3
    finally:
        server.stop()


def test_images_the_stopping_decoders_did_not_reach_go_back_to_the_queue_not_refused(artifact, dicom_files, tmp_path):
    """The service stopping with a job mid-study: the images its decoding workers, shut down, did not take stay to be
    scored (the job is queued again), none is refused for good with ``shutting_down``."""
    from helpers import LiveServer

    from medvision.serving.jobs import MAX_ATTEMPTS, Worker, WorkerContext
    from medvision.serving.settings import Settings
    from medvision.serving.tables import Instance

    server = LiveServer(Settings(artifact=str(artifact), database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
                                 data_dir=str(tmp_path / "data"), job_workers=0, study_stable_seconds=0,
                                 decode_processes=1))
    state = server.server.config.app.state
    try:
        study = _pushed(server, dicom_files[36:40])
        worker = Worker(WorkerContext.of(state), 1, 60, poll_seconds=0.1)
        state.decoder.close()  # the service stopping: its decoding workers are gone
        for _ in range(MAX_ATTEMPTS + 1):  # restart after restart: the study is never failed for it
            with state.db() as db:
                job = db.query(Job).filter_by(study_instance_uid=study).one()
                job.status, job.lease_owner, job.attempts = "running", worker.owner, 1  # as claim() leaves it
                db.commit()
                db.refresh(job)
                db.expunge(job)
            worker.run(job)
            with state.db() as db:
                job = db.query(Job).filter_by(study_instance_uid=study).one()
                assert (job.status, job.last_error, job.attempts) == ("queued", "shutting_down", 0)
                assert {i.status for i in db.query(Instance).filter_by(study_instance_uid=study)} == {"received"}
    finally:
        server.stop()


def _pushed(server, files) -> str:
    """``files`` pushed to ``server`` by STOW-RS as one study (acknowledged): its Study Instance UID."""
    body, ctype = stow_body([f.read_bytes() for f in files])
    assert server.client.post("/dicomweb/studies", content=body, headers={"Content-Type": ctype}).status_code == 200
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
