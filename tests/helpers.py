"""Helpers shared by tests (importable because pyproject sets pythonpath = ["tests"])."""

from __future__ import annotations

import os
import shutil

import pytest


def require_tool(name: str) -> str:
    """Path of an external tool; in CI a missing tool is a failure, elsewhere a skip that says why."""
    path = shutil.which(name)
    if path is None:
        msg = f"'{name}' is not installed (Debian package; .ci/run installs it)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def fresh_postgres_db(url: str, name: str) -> str:
    """A new, empty database named ``name`` on the PostgreSQL cluster at ``url`` (the ``postgres_url`` fixture)."""
    from sqlalchemy import create_engine, text

    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return url.replace("@/postgres?", f"@/{name}?")
