"""The service's database: SQLAlchemy with SQLite (WAL) by default or PostgreSQL by URL; schema by Alembic.

``open_database(url)`` upgrades the schema to the latest migration and returns a session factory.
Statement parameters are never quoted in database errors (``hide_parameters``): they are request data.
SQLite gets WAL journaling (readers never block the writer), a busy timeout and foreign keys, and a database
file readable by the service's user only (0600: it holds accession numbers and readers' comments; SQLite gives
its -wal and -shm files the same mode); PostgreSQL is used as given (``postgresql+psycopg://user@host/db``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from medvision.errors import ConfigError

log = logging.getLogger(__name__)
MIGRATIONS = Path(__file__).parent / "migrations"


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1].split("?", 1)[0]
        if path and path != ":memory:":
            _private_file(Path(path))
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, hide_parameters=True)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(conn, _record) -> None:
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    if url.startswith("postgresql"):
        # a connection that cannot be made in 10 s fails (503 to the caller) instead of holding a request forever
        return create_engine(url, pool_pre_ping=True, hide_parameters=True, pool_timeout=10,
                             connect_args={"connect_timeout": 10})
    raise ConfigError(f"database URL must start with sqlite:// or postgresql://, not {url.split(':', 1)[0]!r}")


def _private_file(path: Path) -> None:
    if not path.parent.exists():
        from medvision.serving.storage import private_folder

        private_folder(path.parent)
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
        if p.exists() and p.stat().st_mode & 0o077:
            p.chmod(0o600)


def migrate(engine: Engine, revision: str = "head") -> str:
    """Upgrade the schema to ``revision`` (the newest by default); returns the revision now in place."""
    from alembic import command
    from alembic.config import Config
    from alembic.runtime.migration import MigrationContext

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision() or ""


def open_database(url: str) -> sessionmaker[Session]:
    engine = make_engine(url)
    revision = migrate(engine)
    log.info("database %s at schema revision %s", engine.url.get_backend_name(), revision)
    return sessionmaker(engine, expire_on_commit=False)
