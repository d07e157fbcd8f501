"""Service fixtures: a database per test module (SQLite, or a real PostgreSQL started for the session)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

PG_BIN = Path("/usr/lib/postgresql")


def _pg_tool(name: str) -> str:
    found = sorted(PG_BIN.glob(f"*/bin/{name}")) if PG_BIN.is_dir() else []
    path = str(found[-1]) if found else shutil.which(name)
    if not path:
        pytest.fail(f"PostgreSQL's '{name}' is not installed (Debian package 'postgresql'; .ci/run installs it)")
    return path


def _as_postgres(cmd: list[str]) -> list[str]:
    # initdb refuses to run as root: use Debian's 'postgres' system user then
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


class PostgresCluster:
    """A throwaway PostgreSQL cluster listening on a Unix socket only (no TCP: unreachable from outside), which a
    test may stop and start again (fault injection)."""

    def __init__(self) -> None:
        # directly under /tmp: pytest's own temporary folders are private to root, which 'postgres' cannot enter
        self.base = Path(tempfile.mkdtemp(prefix="medvision-pg-"))
        self.data, sock = self.base / "data", self.base / "sock"
        sock.mkdir()
        for p in (self.base, sock):
            p.chmod(0o777)
        subprocess.run(_as_postgres([_pg_tool("initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
                                     "--no-sync"]), check=True, capture_output=True, timeout=120)
        with socket.socket() as s:  # a free port number only names the socket file
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.opts = f"-c listen_addresses='' -k {sock} -p {port} -c fsync=off"
        self.url = f"postgresql+psycopg://postgres@/postgres?host={sock}&port={port}"
        self.start()

    def start(self) -> None:
        subprocess.run(_as_postgres([_pg_tool("pg_ctl"), "-D", str(self.data), "-o", self.opts, "-l",
                                     str(self.base / "log"), "-w", "start"]), check=True, capture_output=True,
                       timeout=120)

    def stop(self, mode: str = "fast") -> None:
        """``fast`` disconnects every client and stops; ``immediate`` is a crash (recovery at the next start)."""
        subprocess.run(_as_postgres([_pg_tool("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop"]),
                       capture_output=True, timeout=60)

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_url():
    cluster = PostgresCluster()
    try:
        yield cluster.url
    finally:
        cluster.remove()


@pytest.fixture
def postgres_cluster():
    """A cluster of this test's own, to stop and start."""
    cluster = PostgresCluster()
    try:
        yield cluster
    finally:
        cluster.remove()


@pytest.fixture(scope="module")
def client(artifact, tmp_path_factory):
    """The app in a TestClient with a fresh SQLite database and a 'score' key sent on every request."""
    from fastapi.testclient import TestClient

    from medvision.serving.app import create_app
    from medvision.serving.auth import create_key
    from medvision.serving.db import open_database
    from medvision.serving.settings import Settings

    url = f"sqlite:///{tmp_path_factory.mktemp('app') / 'medvision.db'}"
    with open_database(url)() as db:
        token, _ = create_key(db, "tests", "score")
    settings = Settings(artifact=str(artifact), max_upload_bytes=2_000_000, database_url=url)
    with TestClient(create_app(settings), headers={"Authorization": f"Bearer {token}"}) as c:
        yield c


@pytest.fixture(scope="module")
def ui_server(artifact, dicom_files, tmp_path_factory):
    """The live service with six synthetic studies received by STOW-RS and scored, a reader and an admin."""
    from helpers import ADMIN, READER, LiveServer, stow_body

    from medvision.serving.settings import Settings
    from medvision.serving.users import create_user

    base = tmp_path_factory.mktemp("ui")
    server = LiveServer(Settings(artifact=str(artifact), database_url=f"sqlite:///{base / 'db.sqlite'}",
                                 data_dir=str(base / "data"), study_stable_seconds=0.2, max_upload_bytes=20_000_000))
    import pydicom

    studies = []
    for patient in range(6):
        files = dicom_files[4 * patient: 4 * patient + 4]
        body, ctype = stow_body([f.read_bytes() for f in files])
        assert server.client.post("/dicomweb/studies", content=body, headers={"Content-Type": ctype}).status_code == 200
        studies.append(str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID))
    for uid in studies:
        assert server.wait_scored(uid)["status"] == "scored"
    from medvision.serving.db import open_database

    with open_database(server.server.config.app.state.settings.database_url)() as db:
        create_user(db, *READER, "reader")
        create_user(db, *ADMIN, "admin")
    server.studies = studies
    yield server
    server.stop()


@pytest.fixture(scope="session")
def shifted_site(tmp_path_factory):
    """Files of a second site on other equipment (`medvision synth --site shifted`): 16 four-view exams."""
    from medvision.cli import main

    out = tmp_path_factory.mktemp("shifted-site")
    assert main(["synth", str(out), "--patients", "16", "--rows", "256", "--columns", "208", "--site", "shifted",
                 "--seed", "3", "--no-progress"]) == 0
    return sorted((out / "images").rglob("*.dcm"))
