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
    assert migrate(engine) == "0004"
    assert migrate(engine) == "0004"  # idempotent: a restarted service upgrades nothing
    tables = set(inspect(engine).get_table_names())
    assert {"api_keys", "audit_log", "usage", "scored_images", "studies", "instances", "jobs",
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
    from sqlalchemy import insert

    from medvision.serving.tables import ApiKey, AuditEvent, Job

    engine = make_engine(url)
    assert migrate(engine, "0002") == "0002"
    with engine.begin() as conn:
        conn.execute(insert(ApiKey.__table__).values(name="site", prefix="abcd1234", secret_sha256="0" * 64,
                                                     scopes="score", created_at=utcnow()))
        conn.execute(insert(Job.__table__).values(
            study_instance_uid="1.2.3", status="queued", attempts=0, lease_owner="", last_error="",
            created_at=utcnow(), updated_at=utcnow()))
        conn.execute(insert(AuditEvent.__table__).values(at=utcnow(), action="score", resource="1.2.3.4", status=200,
                                                         request_id="r1", detail={}))
    assert migrate(engine) == "0004"
    with engine.connect() as conn:
        assert conn.execute(text("SELECT name FROM api_keys")).scalar() == "site"
        row = conn.execute(text("SELECT study_instance_uid, not_before FROM jobs")).one()
        assert row == ("1.2.3", None)
        # 0004 rebuilt the audit table (SQLite) to add the reader's user id: its rows are kept
        assert conn.execute(text("SELECT action, resource, user_id FROM audit_log")).one() == ("score", "1.2.3.4", None)
    engine.dispose()
