"""Results and usage are upserts: a re-score replaces its row, counts never get lost, on SQLite and PostgreSQL."""

from concurrent.futures import ThreadPoolExecutor

import pytest
from helpers import fresh_postgres_db
from sqlalchemy import select

from medvision.dicom_io import DicomMeta
from medvision.serving.auth import create_key
from medvision.serving.db import open_database
from medvision.serving.engine import ModelInfo, Prediction
from medvision.serving.identifiers import Owner
from medvision.serving.tables import AuditEvent, ScoredImage, Usage
from medvision.serving.usage import record_score

MODEL = ModelInfo(name="m", architecture="vit", artifact_sha256="a" * 64, weights_sha256="b" * 64, trained_with="0",
                  served_by="0", operating_point="sensitivity >= 0.9", threshold=0.5, providers=["CPU"], format="fp32",
                  gate="not gated")


def _scored(sop: str, study: str, probability: float, label: str, inference_ms: float) -> Prediction:
    meta = DicomMeta(sop, study, None, "MG", "MG", "1.2.840.10008.1.2.1", "MONOCHROME2", 8, 8, 16, False)
    return Prediction(probability, label, probability >= 0.5, meta, inference_ms, threshold=0.5)


@pytest.fixture(params=["sqlite", "postgresql"])
def sessions(request, tmp_path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'usage.db'}"
    else:
        url = fresh_postgres_db(request.getfixturevalue("postgres_url"), f"usage_{tmp_path.name[-20:].lower()}")
    return open_database(url)


def _key(sessions, name="site") -> Owner:
    with sessions() as db:
        row = create_key(db, name, "score")[1]
        return Owner(row.site, row.id)


def test_a_rescore_replaces_the_result_keeps_the_accession_and_meters_one_study(sessions):
    key = _key(sessions)
    record_score(sessions, key, _scored("1.2.1", "1.3.1", 0.2, "no cancer", 1.5), MODEL,
                 AuditEvent(key_id=key.key_id, action="score", resource="1.2.1", status=200, request_id="r1",
                            detail={}),
                 "ACC1")
    record_score(sessions, key, _scored("1.2.2", "1.3.1", 0.4, "no cancer", 2.0), MODEL)
    m2 = MODEL.model_copy(update={"name": "m2"})
    record_score(sessions, key, _scored("1.2.1", "1.3.1", 0.9, "cancer", 2.5), m2)  # no accession
    with sessions() as db:
        rows = {r.sop_instance_uid: r for r in db.scalars(select(ScoredImage))}
        usage = db.scalars(select(Usage)).all()
        audit = db.scalars(select(AuditEvent).where(AuditEvent.action == "score")).all()
    assert set(rows) == {"1.2.1", "1.2.2"}
    again = rows["1.2.1"]
    assert (again.probability, again.label, again.model_name, again.inference_ms) == (0.9, "cancer", "m2", 2.5)
    assert again.accession_number == "ACC1" and rows["1.2.2"].accession_number == ""
    assert again.scored_at is not None and again.note == ""
    assert len(usage) == 1
    assert (usage[0].images, usage[0].studies, usage[0].inference_ms) == (3, 1, pytest.approx(6.0))
    # the access record committed with its result, its time stamped by the column default
    assert [(a.action, a.resource, a.request_id) for a in audit] == [("score", "1.2.1", "r1")] and audit[0].at


def test_concurrent_scores_lose_no_count(sessions):
    keys = [_key(sessions, "a"), _key(sessions, "b")]

    def score(i):
        record_score(sessions, keys[i % 2], _scored(f"1.2.{i}", f"1.3.{i // 4}", 0.5, "x", 1.0), MODEL)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(score, range(64)))
    with sessions() as db:
        usage = {u.key_id: u for u in db.scalars(select(Usage))}
        assert db.query(ScoredImage).count() == 64
    assert [usage[k.key_id].images for k in keys] == [32, 32]
    assert [usage[k.key_id].studies for k in keys] == [16, 16]


def test_the_same_uid_from_two_sites_is_two_results(sessions):
    a, b = _key(sessions, "site-a"), _key(sessions, "site-b")
    record_score(sessions, a, _scored("1.2.1", "1.3.1", 0.2, "no cancer", 1.0), MODEL, accession="A1")
    record_score(sessions, b, _scored("1.2.1", "1.3.1", 0.9, "cancer", 1.0), MODEL, accession="B1")
    record_score(sessions, b, _scored("1.2.1", "1.3.1", 0.8, "cancer", 1.0), MODEL)  # site B re-scores its own
    with sessions() as db:
        rows = {r.site: r for r in db.scalars(select(ScoredImage))}
    assert set(rows) == {"site-a", "site-b"}
    assert (rows["site-a"].probability, rows["site-a"].accession_number, rows["site-a"].key_id) == (0.2, "A1", a.key_id)
    assert (rows["site-b"].probability, rows["site-b"].accession_number) == (0.8, "B1")
