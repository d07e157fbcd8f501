"""A site's own calibration, end to end on a live service, on SQLite and PostgreSQL: fitted from the site's stored
scores and outcomes by `medvision recalibrate fit`, refused by its gate when the model does not separate the site's
cases, applied only by an administrator (forced, and audited as such), then used for that site's scores only, shown
in every result and in /readyz, and removed again."""

import csv
import hashlib
import json

import pydicom
import pytest
from helpers import LiveServer, fresh_postgres_db, predict_all

from medvision.cli import main
from medvision.serving.settings import Settings

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_a_site_calibration_is_fitted_gated_applied_by_an_admin_and_used_for_that_site_only(
        database, request, artifact, dicom_files, shifted_site, tmp_path, capsys):
    from sqlalchemy import select

    from medvision.artifact import read_artifact
    from medvision.serving.tables import AuditEvent, ScoredImage

    url = f"sqlite:///{tmp_path / 'db.sqlite'}" if database == "sqlite" else \
        fresh_postgres_db(request.getfixturevalue("postgres_url"), "site_calibration_tests")
    server = LiveServer(Settings(artifact=str(artifact), database_url=url, data_dir=str(tmp_path / "data"),
                                 job_workers=0))
    try:
        site_a, site_b = server.client_for("site-a", "score"), server.client_for("site-b", "score")
        before = predict_all(site_b, shifted_site)
        assert {r["calibration"] for r in before} == {"model"}
        # outcomes the model cannot know: a coin per study (a hash of its UID)
        outcomes = tmp_path / "outcomes.csv"
        with outcomes.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["sop_instance_uid", "cancer"])
            for f in shifted_site:
                ds = pydicom.dcmread(f, stop_before_pixels=True)
                w.writerow([ds.SOPInstanceUID, hashlib.sha256(ds.StudyInstanceUID.encode()).digest()[0] % 2])
        overlay = tmp_path / "overlay.json"
        code = main(["recalibrate", "--database", url, "fit", "--site", "site-b", "--model", str(artifact),
                     "--outcomes", str(outcomes), "--out", str(overlay), "--bootstrap", "300"])
        printed = json.loads(capsys.readouterr().out)
        assert code == 3 and not printed["accepted"]  # refused, and the exit status says so
        assert any("does not show that it separates" in r for r in printed["reasons"])
        fitted = json.loads(overlay.read_text())
        ev = fitted["evidence"]
        assert ev["fit_images"] + ev["held_out_images"] == len(shifted_site)
        assert fitted["artifact_sha256"] == server.server.config.app.state.engine.artifact_sha256
        assert main(["recalibrate", "--database", url, "apply", str(overlay)]) != 0  # a refused overlay stays out
        assert "refused by its gate" in capsys.readouterr().err
        assert main(["recalibrate", "--database", url, "apply", str(overlay), "--force"]) == 0
        applied = json.loads(capsys.readouterr().out)
        deadline_results = None
        import time

        for _ in range(50):  # the service reloads site calibrations every few seconds
            deadline_results = predict_all(site_b, shifted_site[:4])
            if deadline_results[0]["calibration"] != "model":
                break
            time.sleep(0.2)
        meta = read_artifact(artifact)
        from medvision.site_calibration import SiteCalibration

        site = SiteCalibration.model_validate(fitted)
        for new, old in zip(deadline_results, before[:4], strict=True):
            assert new["calibration"] == f"site calibration {applied['id']}"
            assert new["threshold"] == pytest.approx(site.threshold)
            assert new["probability"] == pytest.approx(float(site.probability(old["probability"])), abs=1e-6)
        assert {r["calibration"] for r in predict_all(site_a, dicom_files[:2])} == {"model"}  # other sites: the model's
        assert all(r["threshold"] == pytest.approx(meta.threshold) for r in predict_all(site_a, dicom_files[:2]))
        from helpers import ADMIN

        from medvision.serving.users import create_user

        with server.sessions() as db:
            create_user(db, *ADMIN, "admin")
        import httpx

        ui = httpx.Client(base_url=server.url, timeout=60)
        assert ui.post("/ui/login", data={"username": ADMIN[0], "password": ADMIN[1]}).status_code == 303
        view = ui.get(f"/ui/api/studies/site-b/{deadline_results[0]['study_instance_uid']}").json()
        assert view["calibration"].startswith(f"Calibrated for this site (site calibration {applied['id']})")
        assert f"{100 * fitted['evidence']['prevalence']:.0f} % of images had cancer" in view["calibration"]
        ui.close()
        ready = server.client.get("/readyz").json()
        assert ready["site_calibrations"] == [applied["id"]]
        with server.sessions() as db:
            stored = db.execute(select(ScoredImage.calibration_id, ScoredImage.profile)
                                .where(ScoredImage.site == "site-b")).all()
            audit = [(e.action, e.resource, e.detail) for e in db.scalars(
                select(AuditEvent).where(AuditEvent.action.like("site_calibration%")).order_by(AuditEvent.id))]
        rescored = [s for s in stored if s[0] == applied["id"]]
        assert len(rescored) == 4 and all(0 <= s[1]["probability"] <= 1 for s in rescored)
        assert audit[0][0] == "site_calibration_applied" and audit[0][1] == "site-b" and audit[0][2]["forced"]
        assert audit[0][2]["by"].startswith("cli:")
        # a second fit uses the model's own probability (kept in the drift profile), not the overlay's
        assert main(["recalibrate", "--database", url, "fit", "--site", "site-b", "--model", str(artifact),
                     "--outcomes", str(outcomes), "--out", str(tmp_path / "again.json"), "--bootstrap", "300"]) == 3
        again = json.loads((tmp_path / "again.json").read_text())
        assert again["temperature"] == pytest.approx(fitted["temperature"], rel=1e-6)
        capsys.readouterr()
        assert main(["recalibrate", "--database", url, "remove", "--site", "site-b", "--model", str(artifact)]) == 0
        assert json.loads(capsys.readouterr().out)["removed"] == 1
        for _ in range(50):
            if predict_all(site_b, shifted_site[:1])[0]["calibration"] == "model":
                break
            time.sleep(0.2)
        else:
            pytest.fail("the removed site calibration was still applied")
        with server.sessions() as db:
            assert db.scalar(select(AuditEvent.action).where(AuditEvent.action == "site_calibration_removed"))
        # bad outcomes files are refused by name
        bad = tmp_path / "bad.csv"
        bad.write_text("image,label\n1,1\n")
        assert main(["recalibrate", "--database", url, "fit", "--site", "site-b", "--model", str(artifact),
                     "--outcomes", str(bad), "--out", str(tmp_path / "x.json")]) != 0
        assert "needs 'cancer'" in capsys.readouterr().err
    finally:
        server.stop()


def test_what_a_probability_means_is_said_the_same_way_to_a_reader_and_in_the_sr():
    from medvision.serving.site_calibrations import Meaning

    model = Meaning("platt", 0.153)
    assert model.parameters() == ["calibration: platt on validation images",
                                  "meaning: chance of cancer where 15 % had cancer"]
    assert "15 % of which had cancer" in model.sentence() and "rarer" in model.sentence()
    site = Meaning("site", 0.071, calibration_id=12)
    assert site.parameters() == ["calibration: site calibration 12", "meaning: chance of cancer where 7 % had cancer"]
    assert site.sentence().startswith("Calibrated for this site (site calibration 12)")
    assert Meaning("none", None).parameters()[1] == "meaning: a ranking score, not a chance of cancer"
    assert all(len(p) <= 64 for m in (model, site, Meaning("temperature", None)) for p in m.parameters())


def _overlay_for(sha256: str, model_threshold: float, site: str = "site-b"):
    """A site calibration as `medvision recalibrate fit` writes one, from outcomes the model separates (its gate
    accepts it when ``model_threshold`` misses the target)."""
    import numpy as np

    from medvision.site_calibration import recalibrate

    rng = np.random.default_rng(0)
    p = rng.uniform(0.01, 0.99, 600)
    y = (rng.uniform(size=600) < p**2).astype(int)
    return recalibrate(site, sha256, model_threshold, p, y, [f"1.2.3.{i // 2}" for i in range(600)], n_boot=200)


def test_an_admin_applies_and_removes_a_site_calibration_in_the_review_ui(artifact, shifted_site, tmp_path):
    """Only an admin, with the session's CSRF token, and only a calibration fitted for the served model whose own
    evidence supports its gate's verdict; scores change at once and the audit log names the reader."""
    import re

    import httpx
    from helpers import ADMIN, READER
    from sqlalchemy import select

    from medvision.serving.tables import AuditEvent, User
    from medvision.serving.users import create_user

    server = LiveServer(Settings(artifact=str(artifact), database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
                                 data_dir=str(tmp_path / "data"), job_workers=0))
    try:
        with server.sessions() as db:
            create_user(db, *ADMIN, "admin")
            create_user(db, *READER, "reader")
            admin_id = db.scalar(select(User.id).where(User.username == ADMIN[0]))
        sha = server.server.config.app.state.engine.artifact_sha256
        site_b = server.client_for("site-b", "score")
        before = predict_all(site_b, shifted_site[:2])
        good = _overlay_for(sha, model_threshold=0.7)
        refused = _overlay_for(sha, model_threshold=0.2)  # the model's own threshold already meets the target
        assert good.accepted and not refused.accepted

        def signed_in(user):
            ui = httpx.Client(base_url=server.url, timeout=60)
            assert ui.post("/ui/login", data={"username": user[0], "password": user[1]}).status_code == 303
            token = re.search(r'name="csrf-token" content="([^"]+)"', ui.get("/ui/worklist").text).group(1)
            return ui, token

        def send(ui, csrf, content: bytes):
            return ui.post("/ui/admin/site-calibrations", data={"csrf": csrf},
                           files={"overlay": ("overlay.json", content, "application/json")})

        reader, reader_csrf = signed_in(READER)
        assert send(reader, reader_csrf, good.model_dump_json().encode()).status_code == 403  # not an admin
        admin, csrf = signed_in(ADMIN)
        assert "No site calibration" in admin.get("/ui/admin").text
        assert send(admin, "not-the-token", good.model_dump_json().encode()).status_code == 403
        tampered = refused.model_copy(update={"accepted": True})
        other_model = good.model_copy(update={"artifact_sha256": "0" * 64})
        for content, said in ((refused.model_dump_json().encode(), "refused by its gate"),
                              (tampered.model_dump_json().encode(), "does not follow from its own evidence"),
                              (other_model.model_dump_json().encode(), "fitted for another model"),
                              (b"\x00not json", "not a site calibration"), (b"", "choose the site calibration")):
            r = send(admin, csrf, content)
            assert r.status_code == 422 and said in r.text, (said, r.text[-400:])
        assert predict_all(site_b, shifted_site[:1])[0]["calibration"] == "model"  # nothing was applied
        r = send(admin, csrf, good.model_dump_json().encode())
        assert r.status_code == 303, r.text
        page = admin.get("/ui/admin").text
        row = re.search(r'<tr data-site="site-b">.*?</tr>', page, re.S).group(0)
        assert f"{good.threshold:.3f}" in row and f"by ui:{ADMIN[0]}" in row
        after = predict_all(site_b, shifted_site[:2])  # at once: the service reloaded its site calibrations
        for new, old in zip(after, before, strict=True):
            assert new["calibration"].startswith("site calibration ")
            assert new["probability"] == pytest.approx(float(good.probability(old["probability"])), abs=1e-6)
        assert reader.post("/ui/admin/site-calibrations/remove",
                           data={"csrf": reader_csrf, "site": "site-b"}).status_code == 403
        assert admin.post("/ui/admin/site-calibrations/remove", data={"csrf": csrf, "site": "../x"}).status_code == 400
        assert admin.post("/ui/admin/site-calibrations/remove",
                          data={"csrf": csrf, "site": "site-b"}).status_code == 303
        assert [r["calibration"] for r in predict_all(site_b, shifted_site[:2])] == ["model", "model"]
        assert "No site calibration" in admin.get("/ui/admin").text
        with server.sessions() as db:
            events = {e.action: e for e in db.scalars(select(AuditEvent).where(
                AuditEvent.action.like("%site_calibration%")).order_by(AuditEvent.id))}
        for action in ("site_calibration_applied", "site_calibration_removed"):
            assert events[action].user_id == admin_id and events[action].detail["by"] == f"ui:{ADMIN[0]}"
            assert events[action].resource == "site-b"
        assert events["ui_site_calibration_refused"].status == 422
        admin.close()
        reader.close()
    finally:
        server.stop()
