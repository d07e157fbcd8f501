"""The drift watch on a live service, on SQLite and PostgreSQL: every scored image records its drift quantities
(no identifiers); a site whose images come from equipment the model never saw raises an alarm in
/v1/admin/drift, in Prometheus and on the admin page, and the site the reference was built from does not."""

import re

import pytest
from helpers import ADMIN, LiveServer, fresh_postgres_db, predict_all

from medvision.serving.settings import Settings

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_a_site_on_unseen_equipment_raises_an_alarm_and_the_reference_site_does_not(
        database, request, artifact, dicom_files, shifted_site, tmp_path):
    from sqlalchemy import select

    from medvision.artifact import read_artifact, write_artifact
    from medvision.drift import build_reference
    from medvision.serving.tables import ScoredImage
    from medvision.serving.users import create_user

    url = f"sqlite:///{tmp_path / 'db.sqlite'}" if database == "sqlite" else \
        fresh_postgres_db(request.getfixturevalue("postgres_url"), "drift_tests")
    settings = dict(database_url=url, data_dir=str(tmp_path / "data"), drift_min_studies=8, job_workers=0)
    # 1. the model as exported without a reference: scores are recorded with their drift quantities
    server = LiveServer(Settings(artifact=str(artifact), **settings))
    site_a = server.client_for("site-a", "score")
    predict_all(site_a, dicom_files)
    with server.sessions() as db:
        rows = db.execute(select(ScoredImage.profile, ScoredImage.study_instance_uid)
                          .where(ScoredImage.site == "site-a")).all()
    server.stop()
    assert len(rows) == len(dicom_files)
    first = rows[0][0]
    assert set(first) >= {"manufacturer", "model", "transfer_syntax", "view", "age_band", "size", "probability",
                          "breast_fraction", "grey_p50"}
    assert not any(re.search(r"SYNTHETIC|\d\.\d+\.\d+", str(v)) for k, v in first.items()
                   if k != "transfer_syntax")  # no names, no UIDs
    # 2. the same model carrying the reference of what site A sent (as evaluate would have measured it)
    meta = read_artifact(artifact)
    meta.reference = build_reference([r[0] for r in rows], [r[1] for r in rows], source="site A")
    import onnx

    with_reference = write_artifact(onnx.load(str(artifact)), meta, tmp_path / "with_reference.onnx")
    server = LiveServer(Settings(artifact=str(with_reference), **settings), key_suffix="-2")
    try:
        site_a, site_b = server.client_for("site-a2", "score", site="site-a"), server.client_for("site-b", "score")
        admin = server.client_for("ops", "admin")
        predict_all(site_a, dicom_files)  # re-scored under this model: the reference's own images
        predict_all(site_b, shifted_site)
        report = admin.get("/v1/admin/drift").json()
        sites = {s["site"]: s for s in report["sites"]}
        assert report["reference"]["images"] == len(dicom_files)
        assert sites["site-a"]["alarms"] == [] and sites["site-a"]["studies"] == 16
        b = {q["quantity"]: q for q in sites["site-b"]["quantities"]}
        assert {"manufacturer", "model"} <= set(sites["site-b"]["alarms"]), sites["site-b"]["alarms"]
        assert b["manufacturer"]["site"] == {"(other)": 1.0, **{k: 0.0 for k in b["manufacturer"]["site"]
                                                               if k != "(other)"}}
        one = admin.get("/v1/admin/drift", params={"site": "site-b"}).json()
        assert [s["site"] for s in one["sites"]] == ["site-b"]
        assert admin.get("/v1/admin/drift", params={"site": "../etc"}).status_code == 400
        assert site_a.get("/v1/admin/drift").status_code == 403  # a score key cannot read other sites' drift
        metrics = admin.get("/metrics").text
        assert 'medvision_drift_alarm{quantity="manufacturer",site="site-b"} 1.0' in metrics
        assert 'medvision_drift_alarm{quantity="manufacturer",site="site-a"} 0.0' in metrics
        with server.sessions() as db:
            create_user(db, *ADMIN, "admin")
        import httpx

        ui = httpx.Client(base_url=server.url, timeout=60)
        assert ui.post("/ui/login", data={"username": ADMIN[0], "password": ADMIN[1]}).status_code == 303
        page = ui.get("/ui/admin").text
        assert 'data-site="site-b"' in page and "alarm: manufacturer" in page and "<svg" in page
        ui.close()
    finally:
        server.stop()
