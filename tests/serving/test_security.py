"""Two sites' keys against one live service, on SQLite and on PostgreSQL: identifiers from requests never name a
path outside the data folder, never reach or change the other site's files, studies, results or reports, and
upload limits hold however the body is framed."""

from __future__ import annotations

import io
import time
from pathlib import Path
from urllib.parse import quote

import httpx
import pydicom
import pytest
from helpers import LiveServer, fresh_postgres_db, stow_body

from medvision.serving.settings import Settings

# What a PACS or an attacker may put where a UID belongs. Each is refused by name before it names anything.
BAD_UIDS = {
    "relative": "../../escaped_by_study_uid",
    "absolute": "/tmp/medvision_absolute_escape",
    "dotdot": "..",
    "over_long": "1.2." + "3" * 70,
    "non_numeric": "1.2.840.abc",
    "leading_zero": "1.2.03.4",
    "empty_component": "1.2..4",
    "trailing_newline": "1.2.3\n",
}


@pytest.fixture(params=["sqlite", "postgresql"], scope="module")
def sites(request, artifact, tmp_path_factory):
    base = tmp_path_factory.mktemp(f"security-{request.param}")
    if request.param == "sqlite":
        url = f"sqlite:///{base / 'db' / 'medvision.db'}"
    else:
        url = fresh_postgres_db(request.getfixturevalue("postgres_url"), "security_tests")
    server = LiveServer(Settings(artifact=str(artifact), database_url=url, data_dir=str(base / "data" / "store"),
                                 study_stable_seconds=0.2, max_upload_bytes=2_000_000, max_stow_parts=8),
                        key_suffix="-a")
    server.b = server.client_for("pacs-b", "score")
    server.puller = server.client_for("integration", "score,pull")
    server.reviewer = server.client_for("reading-app", "review")
    server.base = base
    yield server
    server.stop()


def _with_uids(path: Path, **uids) -> bytes:
    """The file's bytes with some UIDs replaced (pydicom warns about invalid ones and writes them anyway)."""
    import warnings

    ds = pydicom.dcmread(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for keyword, value in uids.items():
            setattr(ds, keyword, value)
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _stow(client: httpx.Client, files: list[bytes], url: str = "/dicomweb/studies") -> httpx.Response:
    body, ctype = stow_body(files)
    return client.post(url, content=body, headers={"Content-Type": ctype})


def _wait_idle(seconds: float = 1.5) -> None:
    """Let the job worker pick up and finish whatever was queued (a report written out of bounds would land now)."""
    time.sleep(seconds)


def _files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


def _uids(path: Path) -> tuple[str, str, str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)


def _wado(client: httpx.Client, study: str, series: str, sop: str) -> httpx.Response:
    return client.get(f"/dicomweb/studies/{study}/series/{series}/instances/{sop}")


def _part(r: httpx.Response) -> bytes:
    boundary = r.headers["content-type"].split("boundary=")[1].encode()
    return r.content.split(b"--" + boundary)[1].split(b"\r\n\r\n", 1)[1].rsplit(b"\r\n", 1)[0]


@pytest.mark.parametrize("attribute", ["StudyInstanceUID", "SOPInstanceUID", "SeriesInstanceUID"])
def test_traversal_and_malformed_uids_in_a_stow_are_refused_and_write_nothing_outside(sites, dicom_files,
                                                                                      attribute):
    outside_before = _files_under(sites.base) - _files_under(sites.data_dir)
    for name, bad in BAD_UIDS.items():
        if name == "trailing_newline":
            continue  # in a file, trailing white space is padding: pydicom strips it and a valid UID remains
        r = _stow(sites.b, [_with_uids(dicom_files[0], **{attribute: bad})])
        assert r.status_code == 409, (name, r.status_code, r.text)
        failed = r.json()["00081198"]["Value"][0]
        assert failed["00081197"]["Value"] == [0xC000], name
    _wait_idle()
    outside_after = _files_under(sites.base) - _files_under(sites.data_dir)
    assert outside_after == outside_before
    for escaped in ("escaped_by_study_uid", "medvision_absolute_escape"):
        assert not list(sites.base.parent.rglob(f"*{escaped}*")), escaped
        assert not Path("/tmp/medvision_absolute_escape").exists()


@pytest.mark.parametrize("name", sorted(BAD_UIDS))
def test_malformed_uids_in_urls_and_bodies_are_refused_by_name(sites, dicom_files, name):
    bad = BAD_UIDS[name]
    quoted = quote(bad, safe="") if bad != ".." else "%2E%2E"  # as a client would send it, not normalised away
    for path in (f"/v1/studies/{quoted}", f"/v1/studies/{quoted}/results",
                 f"/dicomweb/studies/{quoted}/series/1.2.3/instances/1.2.3.4",
                 f"/dicomweb/studies/1.2.3/series/{quoted}/instances/1.2.3.4",
                 f"/dicomweb/studies/1.2.3/series/1.2.3/instances/{quoted}"):
        r = sites.client.get(path)
        assert r.status_code in (400, 404), (path, r.status_code)
        if r.status_code == 400:  # a control character is refused before any route sees the URL
            assert r.json()["code"] == ("invalid_request" if "\n" in bad else "invalid_uid"), (path, r.text)
    if "/" not in bad and bad not in ("..",) and "\n" not in bad:
        r = _stow(sites.client, [dicom_files[0].read_bytes()], f"/dicomweb/studies/{bad}")
        assert r.status_code == 400 and r.json()["code"] == "invalid_uid", r.text
    r = sites.puller.post("/v1/pull", json={"study_instance_uid": bad})
    assert r.status_code == 400 and r.json()["code"] == "invalid_uid", r.text
    if name != "trailing_newline":  # in a file it is padding, stripped by pydicom (above)
        r = sites.client.post("/v1/predict", content=_with_uids(dicom_files[1], SOPInstanceUID=bad),
                              headers={"Content-Type": "application/dicom"})
        assert r.status_code == 422 and r.json()["code"] == "invalid_uid", r.text


def test_uids_that_once_collided_as_file_names_never_overwrite_or_reveal_the_other_site(sites, dicom_files):
    study, series, sop = _uids(dicom_files[4])
    mine = dicom_files[4].read_bytes()
    assert _stow(sites.client, [mine]).status_code == 200
    # names that the old sanitiser mapped onto site A's file: refused now, and site A's instance is intact
    for forged in (sop + "x", sop + ".1x"):
        r = _stow(sites.b, [_with_uids(dicom_files[5], StudyInstanceUID=study, SeriesInstanceUID=series,
                                       SOPInstanceUID=forged)])
        assert r.status_code == 409
    # site B sends site A's exact UIDs with other pixels: its own record, site A's file untouched
    theirs = _with_uids(dicom_files[5], StudyInstanceUID=study, SeriesInstanceUID=series, SOPInstanceUID=sop)
    assert _stow(sites.b, [theirs]).status_code == 200
    r = _wado(sites.client, study, series, sop)
    assert r.status_code == 200 and _part(r) == mine
    r = _wado(sites.b, study, series, sop)
    assert r.status_code == 200 and _part(r) == theirs
    stored = [p for p in _files_under(sites.data_dir / "instances")]
    assert sum(p.read_bytes() == mine for p in stored) == 1 and sum(p.read_bytes() == theirs for p in stored) == 1


def test_another_sites_uids_never_change_or_reveal_the_first_sites_study(sites, dicom_files):
    files = dicom_files[8:12]
    study, series, _ = _uids(files[0])
    assert _stow(sites.client, [f.read_bytes() for f in files]).status_code == 200
    first = sites.wait_scored(study)
    assert first["status"] == "scored" and first["instances"] == {"scored": 4}
    results_a = sites.client.get(f"/v1/studies/{study}/results").json()
    sr_a = _wado(sites.client, study, first["report_series_instance_uid"], first["report_sop_instance_uid"])
    assert sr_a.status_code == 200

    # site B: its own image injected into site A's study, one of A's SOP UIDs re-sent with other pixels, and the
    # same SOP UID scored through /v1/predict
    _, _, sop_a = _uids(files[0])
    injected = _with_uids(dicom_files[12], StudyInstanceUID=study, SeriesInstanceUID=series)
    replaced = _with_uids(dicom_files[13], StudyInstanceUID=study, SeriesInstanceUID=series, SOPInstanceUID=sop_a)
    assert _stow(sites.b, [injected, replaced]).status_code == 200
    r = sites.b.post("/v1/predict", content=replaced, headers={"Content-Type": "application/dicom"})
    assert r.status_code == 200
    deadline = time.monotonic() + 60
    while (s := sites.b.get(f"/v1/studies/{study}").json())["status"] not in ("scored", "failed"):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert s["status"] == "scored" and s["instances"] == {"scored": 2}

    # site A sees exactly what it had: status, results, report
    assert sites.client.get(f"/v1/studies/{study}").json() == first
    assert sites.client.get(f"/v1/studies/{study}/results").json() == results_a
    again = _wado(sites.client, study, first["report_series_instance_uid"], first["report_sop_instance_uid"])
    assert again.status_code == 200 and _part(again) == _part(sr_a)
    # site B sees only its own two images, and never site A's report
    theirs = sites.b.get(f"/v1/studies/{study}/results").json()
    assert len(theirs["images"]) == 2
    assert {i["probability"] for i in theirs["images"]}.isdisjoint(
        {i["probability"] for i in results_a["images"] if i["sop_instance_uid"] != sop_a})
    assert _wado(sites.b, study, first["report_series_instance_uid"],
                 first["report_sop_instance_uid"]).status_code == 404

    # the reading side keeps the two sites apart: two worklist entries, site A's unchanged
    r = sites.reviewer.get(f"/v1/studies/{study}/results", params={"site": "pacs-a"})
    assert r.status_code == 200 and r.json()["images"] == results_a["images"]
    r = sites.reviewer.get(f"/v1/studies/{study}")
    assert r.status_code == 409 and r.json()["code"] == "ambiguous_study"
    from medvision.serving import reviews
    from medvision.serving.db import open_database

    with open_database(sites.server.config.app.state.settings.database_url)() as db:
        entries = {e["site"]: e for e in reviews.worklist(db, q=study)}
    assert set(entries) == {"pacs-a", "pacs-b"}
    assert entries["pacs-a"]["probability"] == pytest.approx(results_a["max_probability"])
    assert entries["pacs-a"]["images"] == 4 and entries["pacs-b"]["images"] == 2


def test_a_chunked_multipart_upload_over_the_limit_is_refused_while_streaming(sites, dicom_files):
    sent = 0
    boundary = "b0undary"

    def body():
        nonlocal sent
        head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.dcm\"\r\n"
                "Content-Type: application/dicom\r\n\r\n").encode()
        sent += len(head)
        yield head
        chunk = b"\0" * 65536
        for _ in range(16384):  # 1 GiB if nobody stops it
            sent += len(chunk)
            yield chunk

    try:
        r = sites.client.post("/v1/predict", content=body(),
                              headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
        status = r.status_code
        code = r.json()["code"]
    except httpx.TransportError:  # the service answered 413 and closed the connection while the client still sent
        status, code = 413, "payload_too_large"
    assert status == 413 and code == "payload_too_large"
    assert sent < 64 * 1024 * 1024, f"{sent:,} bytes were sent before the refusal ended the upload"


@pytest.mark.parametrize("ctype", ["application/dicom", "application/json"])
@pytest.mark.parametrize("path", ["/v1/predict", "/dicomweb/studies", "/v1/pull"])
def test_chunked_bodies_over_the_limit_are_refused_on_every_route(sites, ctype, path):
    sent = 0

    def body():
        nonlocal sent
        for _ in range(4096):  # 256 MiB against limits of 2 MB (DICOM routes) and 64 KiB (JSON)
            sent += 65536
            yield b"\0" * 65536

    client = sites.puller if path == "/v1/pull" else sites.client
    try:
        r = client.post(path, content=body(), headers={"Content-Type": ctype})
        assert r.status_code in (413, 415), (r.status_code, r.text)
    except httpx.TransportError:  # refused, and the connection closed while the client still sent
        pass
    assert sent < 64 * 1024 * 1024, f"{sent:,} bytes were sent before the refusal ended the upload"


def test_a_stow_with_too_many_parts_is_refused_and_leaves_nothing(sites):
    body, ctype = stow_body([b""] * 500)
    before = _files_under(sites.data_dir)
    r = sites.b.post("/dicomweb/studies", content=body, headers={"Content-Type": ctype})
    assert r.status_code == 413 and r.json()["code"] == "too_many_parts", r.text
    assert _files_under(sites.data_dir) - before == set()


def test_pulling_from_the_pacs_needs_the_pull_scope(sites):
    r = sites.client.post("/v1/pull", json={"study_instance_uid": "1.2.3.4"})
    assert r.status_code == 403 and "pull" in r.json()["detail"]
    r = sites.puller.post("/v1/pull", json={"study_instance_uid": "1.2.3.4"})
    assert r.status_code == 409 and r.json()["code"] == "pacs_not_configured"


def test_files_holding_patient_data_are_private(sites, dicom_files):
    study, *_ = _uids(dicom_files[16])
    assert _stow(sites.client, [f.read_bytes() for f in dicom_files[16:18]]).status_code == 200
    assert sites.wait_scored(study)["status"] == "scored"
    url = sites.server.config.app.state.settings.database_url
    private = [p for p in _files_under(sites.data_dir)]
    if url.startswith("sqlite"):
        private += [p for p in _files_under(sites.base / "db")]
    assert any(p.suffix == ".dcm" for p in private)
    for p in private:
        assert p.stat().st_mode & 0o077 == 0, (p, oct(p.stat().st_mode))
    for d in [sites.data_dir, *[p for p in sites.data_dir.rglob("*") if p.is_dir()]]:
        assert d.stat().st_mode & 0o077 == 0, (d, oct(d.stat().st_mode))


def test_one_audit_row_per_stow_request(sites, dicom_files):
    from sqlalchemy import func, select

    from medvision.serving.db import open_database
    from medvision.serving.tables import AuditEvent

    sessions = open_database(sites.server.config.app.state.settings.database_url)
    with sessions() as db:
        before = db.scalar(select(func.count()).select_from(AuditEvent).where(AuditEvent.action == "stow"))
    files = [f.read_bytes() for f in dicom_files[20:24]] + [b"not dicom"]
    assert _stow(sites.b, files).status_code == 202
    with sessions() as db:
        rows = list(db.scalars(select(AuditEvent).where(AuditEvent.action == "stow").order_by(AuditEvent.id)))
    assert len(rows) == before + 1
    assert rows[-1].detail["stored"] == 4 and rows[-1].detail["refused"] == 1


def test_no_uid_or_refused_value_reaches_the_log(sites, dicom_files, caplog, recwarn):
    import logging

    caplog.set_level(logging.DEBUG)
    files = dicom_files[24:26]
    study, _, sop = _uids(files[0])
    assert _stow(sites.client, [f.read_bytes() for f in files]).status_code == 200
    status = sites.wait_scored(study)  # the SR is built (highdicom logs UIDs at INFO unless told not to)
    assert status["status"] == "scored"
    assert _stow(sites.b, [_with_uids(files[1], StudyInstanceUID="../../leaked_value")]).status_code == 409
    said = [r.getMessage() for r in caplog.records] + [str(w.message) for w in recwarn]
    for secret in (study, sop, status["report_sop_instance_uid"], "leaked_value"):
        assert not [line for line in said if secret in line], secret


def test_control_characters_and_out_of_range_values_get_a_clear_4xx_never_a_500(sites):
    anon = httpx.Client(base_url=sites.url, timeout=30)
    for path in ("/v1/studies/%00/results", "/v1/studies/1.2.3/results?site=%00", "/ui/api/studies/%00/1.2",
                 "/ui/api/worklist?q=1.2.3%00", "/v1/admin/audit?action=x%00"):
        for client in (anon, sites.reviewer):
            r = client.get(path)
            assert r.status_code == 400 and r.json()["code"] == "invalid_request", (path, r.text)
    # a NUL typed into the sign-in form: the same page as any unknown name (PostgreSQL cannot even store one)
    r = anon.post("/ui/login", data={"username": "MySecretPassw0rd\x00", "password": "x"})
    assert r.status_code == 200 and "wrong password" in r.text
    r = sites.client.post("/v1/pull", json={"study_instance_uid": "1.2.3\x00"})
    assert r.status_code == 403  # a score key: the scope is checked first
    r = sites.puller.post("/v1/pull", json={"study_instance_uid": "1.2.3\x00"})
    assert r.status_code == 400 and r.json()["code"] == "invalid_uid"
    anon.close()


def test_a_bug_answers_500_and_logs_no_request_data(sites, monkeypatch, caplog):
    import logging

    from medvision.serving.routes import results

    def broken(*args):
        raise ValueError("SELECT ... [parameters: {'username': 'MySecretPassw0rd'}]")

    monkeypatch.setattr(results, "_query", broken)
    caplog.set_level(logging.DEBUG)
    r = sites.client.get("/v1/studies/1.2.3/results")
    assert r.status_code == 500 and r.json()["code"] == "internal_error"
    assert r.json()["request_id"] == r.headers["x-request-id"]
    said = "\n".join(rec.getMessage() + (str(rec.exc_info) if rec.exc_info else "") for rec in caplog.records)
    assert "MySecretPassw0rd" not in said
    assert f"request {r.headers['x-request-id']} failed: ValueError at test_security.py" in said


def test_refusals_of_a_known_key_are_audited_and_anonymous_ones_name_the_route(sites, dicom_files):
    from sqlalchemy import select

    from medvision.serving.audit import FailureBudget
    from medvision.serving.tables import AuditEvent

    sites.app.state.failures = FailureBudget()  # this module's earlier probes may have spent this minute's budget
    body, ctype = stow_body([b""] * 9)
    assert sites.b.post("/dicomweb/studies", content=body, headers={"Content-Type": ctype}).status_code == 413
    assert sites.b.post("/v1/predict", content=b"not a dicom", headers={"Content-Type": "application/dicom"}
                        ).status_code == 422
    assert sites.b.get("/v1/studies/1.02/results").status_code == 400
    assert httpx.get(f"{sites.url}/v1/studies/DOE%5EJANE%20MRN123/results").status_code == 401
    with sites.sessions() as db:
        rows = list(db.scalars(select(AuditEvent).order_by(AuditEvent.id.desc()).limit(4)))[::-1]
        planted = [r for r in db.scalars(select(AuditEvent)) if "DOE" in r.resource or "MRN" in r.resource]
    assert not planted
    refused = [(r.action, r.status, r.resource, r.detail.get("code")) for r in rows[:3]]
    assert refused == [("refused", 413, "/dicomweb/studies", "too_many_parts"),
                       ("refused", 422, "/v1/predict", "not_dicom"),
                       ("refused", 400, "/v1/studies/{study_uid}/results", "invalid_uid")]
    assert all(r.key_id is not None for r in rows[:3])
    assert (rows[3].action, rows[3].resource) == ("auth_failed", "/v1/studies/{study_uid}/results")
