"""The schema comes from Alembic migrations and matches the ORM, on SQLite (WAL) and on a real PostgreSQL."""

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from helpers import fresh_postgres_db
from sqlalchemy import inspect, text

from medvision.errors import ConfigError
from medvision.serving.db import make_engine, migrate, open_database
from medvision.serving.tables import Base, utcnow


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'db' / 'medvision.db'}"
    return fresh_postgres_db(request.getfixturevalue("postgres_url"), f"schema_{tmp_path.name[-20:].lower()}")


def test_migrations_build_the_orm_schema(url):
    engine = make_engine(url)
    assert migrate(engine) == "0011"
    assert migrate(engine) == "0011"  # idempotent: a restarted service upgrades nothing
    tables = set(inspect(engine).get_table_names())
    assert {"api_keys", "audit_log", "usage", "scored_images", "studies", "instances", "jobs", "login_failures",
            "alembic_version"} <= tables
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == [], diff
    engine.dispose()


def test_sqlite_runs_in_wal_mode(tmp_path):
    sessions = open_database(f"sqlite:///{tmp_path / 'm.db'}")
    with sessions() as db:
        assert db.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert db.execute(text("PRAGMA foreign_keys")).scalar() == 1


def test_unsupported_database_url_is_refused():
    with pytest.raises(ConfigError, match="sqlite:// or postgresql://"):
        make_engine("mysql://u@h/db")


def test_upgrading_an_older_database_keeps_its_rows(url):
    engine = make_engine(url)
    assert migrate(engine, "0002") == "0002"
    now = utcnow()
    with engine.begin() as conn:  # rows as the schema of 0002 had them (plain SQL: the ORM is the newest schema)
        conn.execute(text("INSERT INTO api_keys (name, prefix, secret_sha256, scopes, created_at) "
                          "VALUES ('site', 'abcd1234', :h, 'score', :t)"), {"h": "0" * 64, "t": now})
        conn.execute(text("INSERT INTO jobs (study_instance_uid, status, attempts, lease_owner, last_error, created_at, "
                          "updated_at) VALUES ('1.2.3', 'queued', 0, '', '', :t, :t)"), {"t": now})
        conn.execute(text("INSERT INTO audit_log (at, action, resource, status, request_id, detail) "
                          "VALUES (:t, 'score', '1.2.3.4', 200, 'r1', '{}')"), {"t": now})
        conn.execute(text("INSERT INTO studies (study_instance_uid, key_id, received_at, updated_at, status, "
                          "report_series_instance_uid, report_sop_instance_uid, report_path, push_error) "
                          "VALUES ('1.2.3', 1, :t, :t, 'received', '', '', '', '')"), {"t": now})
        conn.execute(text("INSERT INTO instances (sop_instance_uid, study_instance_uid, series_instance_uid, "
                          "sop_class_uid, path, received_at, status, error_code) "
                          "VALUES ('1.2.3.4', '1.2.3', '1.2.3.5', '1.2.840.10008.5.1.4.1.1.1.2', 'x.dcm', :t, "
                          "'received', '')"), {"t": now})
        conn.execute(text("INSERT INTO scored_images (sop_instance_uid, study_instance_uid, accession_number, key_id, "
                          "probability, label, threshold, model_name, artifact_sha256, inference_ms, scored_at, note) "
                          "VALUES ('1.2.3.4', '1.2.3', 'A1', 1, 0.5, 'cancer', 0.4, 'm', 'sha', 1.0, :t, '')"),
                     {"t": now})
    assert migrate(engine, "0004") == "0004"
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO users (username, password_hash, role, created_at, failed_logins) "
                          "VALUES ('reader1', 'x', 'reader', :t, 3)"), {"t": now})
        conn.execute(text("INSERT INTO reviews (study_instance_uid, user_id, call, birads, comment, model_name, "
                          "artifact_sha256, probability, threshold, called_at) "
                          "VALUES ('1.2.3', 1, 'agree', '', '', 'm', 'sha', 0.5, 0.4, :t)"), {"t": now})
    assert migrate(engine) == "0011"
    with engine.connect() as conn:
        assert conn.execute(text("SELECT name, site FROM api_keys")).one() == ("site", "site")
        row = conn.execute(text("SELECT study_instance_uid, not_before, site FROM jobs")).one()
        assert row == ("1.2.3", None, "site")
        # 0004 rebuilt the audit table (SQLite) to add the reader's user id: its rows are kept
        assert conn.execute(text("SELECT action, resource, user_id FROM audit_log")).one() == ("score", "1.2.3.4", None)
        # 0005: what was received belongs to the site of the key that sent it
        for table in ("studies", "instances", "scored_images", "reviews"):
            assert conn.execute(text(f"SELECT site FROM {table}")).scalar() == "site", table
        assert conn.execute(text("SELECT username FROM users")).scalar() == "reader1"
    engine.dispose()


def test_the_study_counted_check_of_each_scored_image_is_an_index_lookup(tmp_path):
    """Every scored image asks whether its site scored its study before (usage counts studies once): SQLite must
    answer from the (site, study) index, not by walking every result of the site (the (site, scored_at) index)."""
    from medvision.serving.usage import _statements

    engine = make_engine(f"sqlite:///{tmp_path / 'db' / 'medvision.db'}")
    migrate(engine)
    query = str(_statements("sqlite")["study_seen"].compile(dialect=engine.dialect))
    with engine.connect() as conn:
        plan = " ".join(str(row[-1]) for row in conn.exec_driver_sql(
            "EXPLAIN QUERY PLAN " + query, ("site-a", "1.2.3", 1, 1, 0)).fetchall())
    engine.dispose()
    assert "ix_scored_images_site_study (site=? AND study_instance_uid=?)" in plan, plan
