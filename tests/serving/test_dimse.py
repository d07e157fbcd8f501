"""The DICOM node, with real tools on loopback: dcmtk's storescu sends studies in every transfer syntax the reader
decodes, the reports come back by C-STORE to a dcmtk storescp and pass dciodvfy; a real Orthanc routes a study to
medvision and gets the report back by C-STORE; unknown callers are refused at association, a full disk answers
0xA700, 20 associations at once lose nothing, and kill -9 in the middle of an association loses nothing that was
acknowledged."""

from __future__ import annotations

import copy
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from helpers import LiveServer, free_port, require_tool, start_orthanc, start_service
from pydicom.uid import generate_uid

from medvision.serving.settings import Settings
from medvision.synth.dataset import example_image
from medvision.synth.dicom_writer import save
from medvision.synth.vendors import VENDORS

pytestmark = pytest.mark.integration

# transfer syntax -> (how to write it, storescu's proposal flag)
SYNTAXES = {
    "1.2.840.10008.1.2.1": ("pydicom", []),
    "1.2.840.10008.1.2": ("dcmconv +ti", ["-xi"]),
    "1.2.840.10008.1.2.2": ("dcmconv +tb", ["-xb"]),
    "1.2.840.10008.1.2.1.99": ("dcmconv +td", ["-xd"]),
    "1.2.840.10008.1.2.4.70": ("dcmcjpeg +e1", ["-xs"]),
    "1.2.840.10008.1.2.4.80": ("pydicom", ["-xt"]),
    "1.2.840.10008.1.2.4.90": ("pydicom", ["-xv"]),
    "1.2.840.10008.1.2.5": ("pydicom", ["-xr"]),
}


def _study(folder: Path, n: int, seed: int = 0, syntaxes=None) -> tuple[str, list[Path]]:
    """``n`` views of one synthetic study (512 x 416), written in ``syntaxes`` in turn."""
    from pydicom.uid import UID, ExplicitVRLittleEndian

    folder.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    syntaxes = list(syntaxes or SYNTAXES)
    paths = []
    for i in range(n):
        ds = example_image(VENDORS[i % len(VENDORS)], 512, 416, seed=seed * 100 + i, malignant=i % 2 == 0)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        syntax = syntaxes[i % len(syntaxes)]
        how = SYNTAXES[syntax][0]
        path = folder / f"{i:03d}.dcm"
        if how == "pydicom":
            save(copy.deepcopy(ds), path, UID(syntax))
        else:
            raw = folder / f"{i:03d}.raw.dcm"
            save(copy.deepcopy(ds), raw, ExplicitVRLittleEndian)
            tool, flag = how.split()
            done = subprocess.run([require_tool(tool), flag, str(raw), str(path)], capture_output=True, text=True)
            assert done.returncode == 0, done.stderr
            raw.unlink()
        assert str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID) == syntax
        paths.append(path)
    return study, paths


def _storescu(port: int, files: list[Path], aet: str = "STORESCU", flags=(), check: bool = True,
              called: str = "MEDVISION") -> subprocess.CompletedProcess:
    done = subprocess.run([require_tool("storescu"), "-v", "-aet", aet, "-aec", called, *flags, "127.0.0.1",
                           str(port), *map(str, files)], capture_output=True, text=True, timeout=120)
    if check:
        assert done.returncode == 0, done.stdout + done.stderr
    return done


def _statuses(done: subprocess.CompletedProcess) -> list[int]:
    """The C-STORE response statuses storescu received (its debug dump of each response)."""
    return [int(v, 16) for v in re.findall(r"DIMSE Status\s*:\s*0x([0-9A-Fa-f]{4})", done.stdout + done.stderr)]


def _send_each(port: int, files: list[Path], aet: str = "STORESCU") -> None:
    for f in files:
        syntax = str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        _storescu(port, [f], aet, SYNTAXES[syntax][1])


@pytest.fixture(scope="module")
def destination(tmp_path_factory):
    """dcmtk's storescp, where reports go back."""
    out = tmp_path_factory.mktemp("destination")
    port = free_port()
    proc = subprocess.Popen([require_tool("storescp"), "-aet", "DEST", "-od", str(out), "+xa", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    yield out, port
    proc.terminate()
    proc.wait(30)


@pytest.fixture(scope="module")
def node(artifact, destination, tmp_path_factory):
    out, port = destination
    base = tmp_path_factory.mktemp("dimse")
    server = LiveServer(Settings(artifact=str(artifact), database_url=f"sqlite:///{base / 'db.sqlite'}",
                                 data_dir=str(base / "data"), study_stable_seconds=0.5, dimse_port=0,
                                 dimse_callers="STORESCU=site-a,BURST=site-b,PINNED=site-c@10.9.9.9",
                                 dimse_destination=f"DEST@127.0.0.1:{port}", dimse_min_free_bytes=0))
    server.scp = server.server.config.app.state.dimse
    server.reviewer = server.client_for("dimse-reviewer", "review")
    server.base = base
    yield server
    server.stop()


def _wait(server, study: str, timeout: float = 90) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        r = server.reviewer.get(f"/v1/studies/{study}")
        if r.status_code == 200 and r.json()["status"] in ("scored", "failed") and r.json()["sent_by_c_store"]:
            return r.json()
        assert time.monotonic() < deadline, r.text
        time.sleep(0.3)


def test_every_transfer_syntax_is_stored_as_sent_scored_and_the_report_comes_back(node, destination, tmp_path):
    out, _ = destination
    study, files = _study(tmp_path / "study", len(SYNTAXES))
    _send_each(node.scp.port, files)
    status = _wait(node, study)
    assert status["status"] == "scored" and status["instances"] == {"scored": len(files)}
    assert status["site"] == "site-a" and not status["c_store_error"]
    # metered for the site although no key sent it: one study, each image once
    usage = node.client_for("dimse-admin", "admin").get("/v1/admin/usage").json()
    assert [(u["site"], u["key"], u["images"], u["studies"]) for u in usage if u["site"] == "site-a"] == [
        ("site-a", "(DICOM C-STORE)", len(files), 1)]
    # each instance was kept as it arrived: same transfer syntax, same bytes of pixel data
    from sqlalchemy import select

    from medvision.serving.tables import Instance

    with node.sessions() as db:
        stored = {i.sop_instance_uid: i.path for i in db.scalars(select(Instance).where(Instance.site == "site-a"))}
    for f in files:
        sent = pydicom.dcmread(f)
        kept = pydicom.dcmread(stored[str(sent.SOPInstanceUID)])
        assert kept.file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID
        assert kept.PixelData == sent.PixelData
    # the SR arrived at the destination, references every image and is valid for dciodvfy
    deadline = time.monotonic() + 30
    while not (reports := [p for p in out.rglob("*") if p.is_file() and
                           pydicom.dcmread(p, stop_before_pixels=True).get("StudyInstanceUID") == study]):
        assert time.monotonic() < deadline
        time.sleep(0.3)
    sr = pydicom.dcmread(reports[0])
    assert sr.Modality == "SR" and str(sr.SOPInstanceUID) == status["report_sop_instance_uid"]
    referenced = {str(i.ReferencedSOPInstanceUID) for s in sr.CurrentRequestedProcedureEvidenceSequence
                  for se in s.ReferencedSeriesSequence for i in se.ReferencedSOPSequence}
    assert referenced == {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    checked = subprocess.run([require_tool("dciodvfy"), str(reports[0])], capture_output=True, text=True)
    errors = [line for line in (checked.stdout + checked.stderr).splitlines() if line.startswith("Error")]
    assert not errors, errors


def test_echo_unknown_callers_and_unscored_classes(node, tmp_path):
    from sqlalchemy import select

    from medvision.serving.tables import AuditEvent

    echo = subprocess.run([require_tool("echoscu"), "-aet", "STORESCU", "-aec", "MEDVISION", "127.0.0.1",
                           str(node.scp.port)], capture_output=True, text=True, timeout=30)
    assert echo.returncode == 0, echo.stderr
    _, files = _study(tmp_path / "s", 1, seed=7, syntaxes=["1.2.840.10008.1.2.1"])
    refused = _storescu(node.scp.port, files, aet="INTRUDER", check=False)
    assert "Association Rejected" in refused.stdout + refused.stderr
    pinned = _storescu(node.scp.port, files, aet="PINNED", flags=["-d"], check=False)  # only from 10.9.9.9
    assert _statuses(pinned) == [0x0124]
    # tomosynthesis is refused by name; an SR of the study is accepted and not kept
    tomo = pydicom.dcmread(files[0])
    tomo.SOPClassUID = tomo.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.13.1.3"
    tomo.SOPInstanceUID = tomo.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    tomo_path = tmp_path / "tomo.dcm"
    tomo.save_as(tomo_path)
    answer = _storescu(node.scp.port, [tomo_path], flags=["-d", "-R"], check=False)  # propose its class
    assert _statuses(answer) == [0x0122] and "tomosynthesis" in (answer.stdout + answer.stderr).lower()
    sr = pydicom.dcmread(files[0])  # a PACS that forwards a whole study also forwards its reports
    sr.SOPClassUID = sr.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.33"
    sr.SOPInstanceUID = sr.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    sr.save_as(tmp_path / "sr.dcm")
    answer = _storescu(node.scp.port, [tmp_path / "sr.dcm"], flags=["-d", "-R"], check=False)
    assert _statuses(answer) == [0x0000]
    from medvision.serving.tables import Instance

    with node.sessions() as db:
        assert db.scalars(select(Instance).where(Instance.sop_instance_uid == str(sr.SOPInstanceUID))).first() is None
    with node.sessions() as db:
        actions = [(e.action, e.resource, e.status) for e in db.scalars(select(AuditEvent)
                                                                       .where(AuditEvent.action.like("dimse%")))]
    assert ("dimse_refused", "INTRUDER", 403) in actions
    assert ("dimse_refused", "PINNED", 403) in actions
    assert ("dimse_association", "STORESCU", 200) in actions


def test_twenty_associations_at_once_lose_nothing_and_score_each_instance_once(node, tmp_path):
    studies = [_study(tmp_path / f"burst{i}", 2, seed=20 + i, syntaxes=["1.2.840.10008.1.2.1"]) for i in range(20)]
    procs = [subprocess.Popen([require_tool("storescu"), "-aet", "BURST", "-aec", "MEDVISION", "127.0.0.1",
                               str(node.scp.port), *map(str, files)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _, files in studies]
    for p in procs:
        assert p.wait(180) == 0, p.stdout.read()
    for study, files in studies:
        assert _wait(node, study, 180)["instances"] == {"scored": len(files)}
    from sqlalchemy import func, select

    from medvision.serving.tables import ScoredImage

    with node.sessions() as db:
        counts = dict(db.execute(select(ScoredImage.sop_instance_uid, func.count()).where(ScoredImage.site == "site-b")
                                 .group_by(ScoredImage.sop_instance_uid)).all())
    assert len(counts) == 40 and set(counts.values()) == {1}


def test_a_full_disk_answers_out_of_resources_and_stores_nothing(artifact, tmp_path):
    server = LiveServer(Settings(artifact=str(artifact), database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
                                 data_dir=str(tmp_path / "data"), dimse_port=0, dimse_callers="STORESCU=site-a",
                                 dimse_min_free_bytes=1 << 62))  # a watermark no disk is above
    try:
        _, files = _study(tmp_path / "s", 1, syntaxes=["1.2.840.10008.1.2.1"])
        answer = _storescu(server.server.config.app.state.dimse.port, files, flags=["-d"], check=False)
        assert _statuses(answer) == [0xA700]
        assert not list((tmp_path / "data").rglob("*.dcm"))
    finally:
        server.stop()


def test_kill_9_in_the_middle_of_an_association_loses_nothing_acknowledged(artifact, tmp_path):
    env = {**os.environ, "MEDVISION_DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite'}",
           "MEDVISION_DATA_DIR": str(tmp_path / "data"), "MEDVISION_DIMSE_PORT": str(free_port()),
           "MEDVISION_DIMSE_CALLERS": "STORESCU=site-a", "MEDVISION_DIMSE_MIN_FREE_BYTES": "0",
           "MEDVISION_STUDY_STABLE_SECONDS": "0.5"}
    dimse_port = int(env["MEDVISION_DIMSE_PORT"])
    study, files = _study(tmp_path / "s", 24, seed=3, syntaxes=["1.2.840.10008.1.2.1"])
    proc = start_service(env, artifact, free_port())
    sender = subprocess.Popen([require_tool("storescu"), "-v", "-aet", "STORESCU", "-aec", "MEDVISION", "127.0.0.1",
                               str(dimse_port), *map(str, files)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    acknowledged = []
    for line in sender.stdout:
        if "Received Store Response (Success)" in line:
            acknowledged.append(1)
            if len(acknowledged) == 6:
                proc.send_signal(signal.SIGKILL)  # mid-association
                break
    proc.wait(30)
    sender.wait(60)
    log = sender.stdout.read() if sender.stdout else ""
    assert len(acknowledged) == 6, log
    # the acknowledged instances are the first six sent (storescu sends in order)
    sent_uids = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
    proc = start_service(env, artifact, free_port())
    try:
        from sqlalchemy import select

        from medvision.serving.db import open_database
        from medvision.serving.tables import Instance

        sessions = open_database(env["MEDVISION_DATABASE_URL"])
        deadline = time.monotonic() + 90
        while True:
            with sessions() as db:
                rows = list(db.scalars(select(Instance).where(Instance.study_instance_uid == study)))
            if rows and all(r.status == "scored" for r in rows):
                break
            assert time.monotonic() < deadline, [(r.sop_instance_uid, r.status) for r in rows]
            time.sleep(0.5)
        recorded = {r.sop_instance_uid for r in rows}
        assert set(sent_uids[:6]) <= recorded  # nothing acknowledged is lost
        assert all(Path(r.path).is_file() for r in rows)  # nothing half-recorded: each row has its whole file
        for r in rows:
            assert pydicom.dcmread(r.path).SOPInstanceUID == r.sop_instance_uid
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def test_the_conformance_statement_lists_what_the_node_accepts(node):
    """docs/dicom-conformance.md names every SOP class and transfer syntax the SCP accepts, and nothing else."""
    from medvision.dicom_io import READABLE_SYNTAXES
    from medvision.serving.dimse import IGNORED, REFUSED, SCORED, VERIFICATION

    text = (Path(__file__).resolve().parents[2] / "docs" / "dicom-conformance.md").read_text()
    listed = set(re.findall(r"`(1\.2\.840\.10008\.[0-9.]+)`", text))
    accepted = {cx.abstract_syntax for cx in node.scp.server.ae.supported_contexts}
    syntaxes = {ts for cx in node.scp.server.ae.supported_contexts for ts in cx.transfer_syntax}
    assert accepted == {*SCORED, *REFUSED, *IGNORED, VERIFICATION}
    assert set(READABLE_SYNTAXES) <= syntaxes
    assert accepted | syntaxes <= listed, (accepted | syntaxes) - listed
    assert listed <= accepted | syntaxes | {"1.2.840.10008.5.1.4.1.1.88.34"}, listed - accepted - syntaxes


def test_orthanc_routes_a_study_by_c_store_and_gets_the_report_back_by_c_store(artifact, tmp_path):
    """A real PACS: Orthanc, with medvision as one of its DICOM modalities, sends a study with
    ``/modalities/medvision/store``; the SR comes back into Orthanc by C-STORE and is found there by QIDO-RS."""
    import secrets

    from dicomweb_client.api import DICOMwebClient
    from dicomweb_client.session_utils import create_session_from_user_pass

    require_tool("Orthanc")
    password = secrets.token_hex(8)
    http_port, orthanc_dicom = free_port(), free_port()
    medvision = LiveServer(Settings(artifact=str(artifact), database_url=f"sqlite:///{tmp_path / 'mv.db'}",
                                    data_dir=str(tmp_path / "mv"), study_stable_seconds=0.5, dimse_port=0,
                                    dimse_callers="ORTHANC=site-o@127.0.0.1", dimse_min_free_bytes=0,
                                    dimse_destination=f"ORTHANC@127.0.0.1:{orthanc_dicom}"))
    mv_port = medvision.server.config.app.state.dimse.port
    config = {
        "Name": "medvision-dimse-test", "HttpPort": http_port, "DicomPort": orthanc_dicom, "DicomAet": "ORTHANC",
        "RemoteAccessAllowed": False, "AuthenticationEnabled": True, "RegisteredUsers": {"mv": password},
        "DicomAlwaysAllowStore": False, "DicomCheckModalityHost": True, "DicomCheckCalledAet": True,
        "DicomModalities": {"medvision": ["MEDVISION", "127.0.0.1", mv_port],
                            "testscu": ["TESTSCU", "127.0.0.1", 104]},
        "StorageDirectory": str(tmp_path / "orthanc"), "IndexDirectory": str(tmp_path / "orthanc"),
        "Plugins": ["/usr/share/orthanc/plugins/libOrthancDicomWeb.so"],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    try:
        proc, api = start_orthanc(config, tmp_path, "mv", password)
    except BaseException:
        medvision.stop()
        raise
    try:
        study, files = _study(tmp_path / "study", 4, seed=11,
                              syntaxes=["1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.5"])
        for f in files:  # into Orthanc first, as a modality would
            syntax = str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID)
            _storescu(orthanc_dicom, [f], "TESTSCU", SYNTAXES[syntax][1], called="ORTHANC")
        orthanc_study = next(x["ID"] for x in api.post("/tools/lookup", content=study).json() if x["Type"] == "Study")
        r = api.post("/modalities/medvision/store", json={"Resources": [orthanc_study], "Synchronous": True})
        assert r.status_code == 200, r.text
        assert r.json()["InstancesCount"] == 4 and r.json()["FailedInstancesCount"] == 0, r.text

        deadline = time.monotonic() + 90
        reviewer = medvision.client_for("orthanc-reviewer", "review", site="site-o")
        while not (status := reviewer.get(f"/v1/studies/{study}").json()).get("sent_by_c_store"):
            assert not status.get("c_store_error") and time.monotonic() < deadline, status
            time.sleep(0.3)
        assert status["site"] == "site-o" and status["instances"] == {"scored": 4}
        pacs = DICOMwebClient(url=f"http://127.0.0.1:{http_port}/dicom-web",
                              session=create_session_from_user_pass("mv", password))
        (series,) = pacs.search_for_series(study, search_filters={"Modality": "SR"})
        (meta,) = pacs.search_for_instances(study, series["0020000E"]["Value"][0])
        assert meta["00080018"]["Value"][0] == status["report_sop_instance_uid"]
    finally:
        proc.terminate()
        proc.wait(30)
        api.close()
        medvision.stop()


def _certificates(folder: Path) -> dict[str, Path]:
    """A CA, and a server and a client certificate it signed (openssl), for DICOM over TLS on loopback."""
    openssl = require_tool("openssl")
    folder.mkdir(parents=True, exist_ok=True)
    paths = {name: folder / f"{name}.pem" for name in ("ca", "ca.key", "server", "server.key", "client", "client.key")}

    def run(*args: str) -> None:
        done = subprocess.run([openssl, *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test CA",
        "-keyout", str(paths["ca.key"]), "-out", str(paths["ca"]))
    for name in ("server", "client"):
        csr = folder / f"{name}.csr"
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", str(paths[f"{name}.key"]),
            "-out", str(csr))
        ext = folder / f"{name}.ext"
        ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        run("x509", "-req", "-in", str(csr), "-CA", str(paths["ca"]), "-CAkey", str(paths["ca.key"]),
            "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", str(paths[name]))
    return paths


def test_dicom_over_tls_needs_a_certificate_of_the_sites_ca(artifact, tmp_path):
    from sqlalchemy import func, select

    from medvision.serving.tables import Instance

    certs = _certificates(tmp_path / "pki")
    server = LiveServer(Settings(artifact=str(artifact), database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
                                 data_dir=str(tmp_path / "data"), study_stable_seconds=60, dimse_port=0,
                                 dimse_callers="STORESCU=site-a", dimse_min_free_bytes=0,
                                 dimse_tls_cert=str(certs["server"]), dimse_tls_key=str(certs["server.key"]),
                                 dimse_tls_ca=str(certs["ca"])))
    try:
        port = server.server.config.app.state.dimse.port
        _, files = _study(tmp_path / "s", 3, seed=11, syntaxes=["1.2.840.10008.1.2.1"])
        tls = ["+tls", str(certs["client.key"]), str(certs["client"]), "+cf", str(certs["ca"])]
        _storescu(port, files[:1], flags=tls)  # a PACS with a certificate of the site's CA: stored
        plain = _storescu(port, files[1:2], check=False)  # plain TCP to a TLS port: no association
        anonymous = _storescu(port, files[2:], flags=["+tla", "+cf", str(certs["ca"])], check=False)  # no client cert
        assert plain.returncode != 0 and anonymous.returncode != 0
        with server.sessions() as db:
            stored = db.scalar(select(func.count()).select_from(Instance))
        assert stored == 1
    finally:
        server.stop()
