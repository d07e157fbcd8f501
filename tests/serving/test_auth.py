"""API keys (hashed, scoped, revocable), the audit trail, usage metering and Prometheus metrics."""

import json

import pytest
from fastapi.testclient import TestClient
from helpers import fresh_postgres_db

from medvision.cli import main
from medvision.serving.app import create_app
from medvision.serving.auth import create_key, revoke_key
from medvision.serving.db import open_database
from medvision.serving.settings import Settings

DICOM = {"Content-Type": "application/dicom"}


@pytest.fixture(params=["sqlite", "postgresql"], scope="module")
def service(request, artifact, tmp_path_factory):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('auth') / 'medvision.db'}"
    else:
        url = fresh_postgres_db(request.getfixturevalue("postgres_url"), "auth_tests")
    sessions = open_database(url)
    keys = {}
    with sessions() as db:
        for name, scopes in [("site-a", "score"), ("site-b", "score"), ("reader", "review"), ("ops", "admin"),
                             ("old", "score")]:
            keys[name] = create_key(db, name, scopes)[0]
        revoke_key(db, "old")
    with TestClient(create_app(Settings(artifact=str(artifact), database_url=url))) as client:
        yield client, keys, sessions


def _auth(token):
    return {"Authorization": f"Bearer {token}"}


def test_every_route_but_health_needs_a_key(service, dicom_files):
    client, keys, _ = service
    assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200
    data = dicom_files[0].read_bytes()
    r = client.post("/v1/predict", content=data, headers=DICOM)
    assert r.status_code == 401 and r.json()["code"] == "unauthenticated"
    assert r.headers["www-authenticate"].startswith("Bearer")
    for bad in ["mv_nothere_x", "garbage", keys["site-a"][:-2] + "xx", keys["old"]]:
        r = client.post("/v1/predict", content=data, headers={**DICOM, **_auth(bad)})
        assert r.status_code == 401, bad
    for path in ["/v1/studies/1.2.3/results", "/v1/admin/usage", "/v1/admin/audit", "/metrics"]:
        assert client.get(path).status_code == 401, path
    # the X-API-Key header works too
    assert client.post("/v1/predict", content=data, headers={**DICOM, "X-API-Key": keys["site-a"]}).status_code == 200


def test_scopes_are_enforced(service, dicom_files):
    client, keys, _ = service
    data = dicom_files[1].read_bytes()
    r = client.post("/v1/predict", content=data, headers={**DICOM, **_auth(keys["reader"])})
    assert r.status_code == 403 and "score" in r.json()["detail"]
    for path in ["/v1/admin/usage", "/v1/admin/audit", "/metrics"]:
        assert client.get(path, headers=_auth(keys["site-a"])).status_code == 403, path
    assert client.post("/v1/predict", content=data, headers={**DICOM, **_auth(keys["ops"])}).status_code == 200


def test_results_usage_audit_and_metrics(service, dicom_files):
    client, keys, _ = service
    scored = []
    for f in dicom_files[8:11]:  # three views of the third patient's exam
        r = client.post("/v1/predict", content=f.read_bytes(), headers={**DICOM, **_auth(keys["site-b"])})
        assert r.status_code == 200
        scored.append(r.json())
    study = scored[0]["study_instance_uid"]
    mine = [s for s in scored if s["study_instance_uid"] == study]
    r = client.get(f"/v1/studies/{study}/results", headers=_auth(keys["site-b"]))
    assert r.status_code == 200
    body = r.json()
    assert {i["sop_instance_uid"] for i in body["images"]} >= {s["sop_instance_uid"] for s in mine}
    assert body["max_probability"] == pytest.approx(max(i["probability"] for i in body["images"]))
    # another site's score key does not see site-b's results; the reader does
    assert client.get(f"/v1/studies/{study}/results", headers=_auth(keys["site-a"])).status_code == 404
    assert client.get(f"/v1/studies/{study}/results", headers=_auth(keys["reader"])).status_code == 200

    usage = client.get("/v1/admin/usage", headers=_auth(keys["ops"])).json()
    b = next(u for u in usage if u["site"] == "site-b")
    assert b["images"] == 3 and b["studies"] == len({s["study_instance_uid"] for s in scored})
    assert b["inference_seconds"] > 0

    audit = client.get("/v1/admin/audit", params={"limit": 500}, headers=_auth(keys["ops"])).json()
    actions = {(a["action"], a["key"], a["resource"]) for a in audit}
    for s in scored:
        assert ("score", "site-b", s["sop_instance_uid"]) in actions
    assert ("read_results", "site-b", study) in actions
    assert any(a["action"] == "auth_failed" and a["key"] is None for a in audit)
    assert all(a["request_id"] for a in audit if a["action"] not in ("key_create", "key_revoke"))
    assert ("key_create", "site-b", "site-b") in actions and ("key_revoke", "old", "old") in actions

    text = client.get("/metrics", headers=_auth(keys["ops"])).text
    assert 'medvision_images_scored_total{site="site-b"} 3.0' in text
    assert "medvision_model_info{" in text and 'gate="not gated"' in text
    assert 'route="/v1/studies/{study_uid}/results"' in text  # route templates, never UIDs, label the series
    assert study not in text


def test_keys_cli_prints_the_key_once_and_stores_only_its_hash(tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'k.db'}"
    assert main(["keys", "--database", url, "create", "pacs-1", "--scopes", "score,review"]) == 0
    token = json.loads(capsys.readouterr().out)["key"]
    assert token.startswith("mv_")
    assert token.split("_", 2)[2].encode() not in (tmp_path / "k.db").read_bytes()
    assert main(["keys", "--database", url, "list"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed[0]["name"] == "pacs-1" and listed[0]["scopes"] == ["review", "score"] and token not in str(listed)
    assert main(["keys", "--database", url, "create", "pacs-1"]) == 2  # names are unique
    assert main(["keys", "--database", url, "create", "x", "--scopes", "root"]) == 2
    assert main(["keys", "--database", url, "create", "pacs-1b", "--site", "pacs-1"]) == 0  # a second key, one site
    assert json.loads(capsys.readouterr().out)["site"] == "pacs-1"
    assert main(["keys", "--database", url, "create", "y", "--site", "../etc"]) == 2  # a site is a plain name
    assert main(["keys", "--database", url, "revoke", "pacs-1"]) == 0
    assert main(["keys", "--database", url, "revoke", "nobody"]) == 2
    # every change is in the audit log, with who made it (the operating-system user of the CLI)
    from sqlalchemy import select

    from medvision.serving.tables import AuditEvent

    with open_database(url)() as db:
        rows = [(e.action, e.resource, e.detail["by"]) for e in db.scalars(select(AuditEvent).order_by(AuditEvent.id))]
    assert [r[:2] for r in rows] == [("key_create", "pacs-1"), ("key_create", "pacs-1b"), ("key_revoke", "pacs-1")]
    assert all(r[2].startswith("cli:") for r in rows)


def test_a_verified_key_is_trusted_for_key_cache_seconds_then_looked_up_again(artifact, tmp_path):
    import time

    url = f"sqlite:///{tmp_path / 'cache.db'}"
    sessions = open_database(url)
    with sessions() as db:
        token = create_key(db, "pacs", "score")[0]
        reader = create_key(db, "reader", "review")[0]
    settings = Settings(artifact=str(artifact), database_url=url, key_cache_seconds=0.5)
    with TestClient(create_app(settings)) as client:
        results = "/v1/studies/1.2.3/results"
        assert client.get(results, headers=_auth(token)).status_code == 404  # valid key: no such study
        cache = client.app.state.key_cache
        assert token not in str(cache._held) and len(cache._held) == 1  # held under its digest only
        with sessions() as db:
            revoke_key(db, "pacs")
        assert client.get(results, headers=_auth(token)).status_code == 404  # still trusted, within 0.5 s
        # a cached key still gets only its scopes; a wrong key is never cached
        assert client.get("/v1/admin/usage", headers=_auth(reader)).status_code == 403
        assert client.get("/v1/admin/usage", headers=_auth(reader)).status_code == 403
        assert client.get(results, headers=_auth(token + "x")).status_code == 401
        time.sleep(0.6)
        assert client.get(results, headers=_auth(token)).status_code == 401  # revocation has taken effect
    settings = Settings(artifact=str(artifact), database_url=url, key_cache_seconds=0)
    with sessions() as db:
        fresh = create_key(db, "pacs-2", "score")[0]
    with TestClient(create_app(settings)) as client:
        assert client.get("/v1/studies/1.2.3/results", headers=_auth(fresh)).status_code == 404
        with sessions() as db:
            revoke_key(db, "pacs-2")
        assert client.get("/v1/studies/1.2.3/results", headers=_auth(fresh)).status_code == 401  # at once
        assert client.app.state.key_cache._held == {}
