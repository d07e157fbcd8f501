"""Helpers shared by tests (importable because pyproject sets pythonpath = ["tests"])."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

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


def start_orthanc(config: dict, folder, user: str, password: str):
    """A real Orthanc with ``config`` (written to ``folder/orthanc.json``), waited for until its REST API answers;
    returns the process and an HTTP client for that API. A start that fails says why (Orthanc's own output)."""
    import json
    import subprocess

    import httpx

    path = folder / "orthanc.json"
    path.write_text(json.dumps(config))
    proc = subprocess.Popen([require_tool("Orthanc"), str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    api = httpx.Client(base_url=f"http://127.0.0.1:{config['HttpPort']}", auth=(user, password), timeout=60)
    deadline = time.monotonic() + 30
    while True:
        try:
            if api.get("/system").status_code == 200:
                return proc, api
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            api.close()
            pytest.fail(f"Orthanc did not start: {proc.communicate(timeout=10)[1][-2000:]!r}")
        time.sleep(0.2)


def free_port() -> int:
    """A TCP port on loopback that is free now and stays free for the server it is meant for: taken from below the
    kernel's ephemeral range, where no other socket is given a port by the system (a port-0 bind, an outgoing
    connection), so a server started after the choice (ours, on port 0) cannot take it first."""
    import random
    import socket

    try:
        low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for _ in range(200):
        port = random.randint(max(1024, low - 12000), low - 1)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # no luck below the range: any free port
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fresh_postgres_db(url: str, name: str) -> str:
    """A new, empty database named ``name`` on the PostgreSQL cluster at ``url`` (the ``postgres_url`` fixture)."""
    from sqlalchemy import create_engine, text

    engine = create_engine(url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return url.replace("@/postgres?", f"@/{name}?")


def start_service(env: dict, artifact, port: int, timeout: float = 90):
    """``medvision serve`` as a process of its own (to be killed for real), once it answers /readyz."""
    import subprocess
    import sys

    import httpx

    proc = subprocess.Popen([sys.executable, "-m", "medvision.cli", "serve", "--model", str(artifact), "--port",
                             str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        assert proc.poll() is None and time.monotonic() < deadline, "service did not start"
        time.sleep(0.2)


def stow_body(files: list[bytes], content_types: dict[int, str] | None = None) -> tuple[bytes, str]:
    """A STOW-RS request body (``multipart/related; type="application/dicom"``) and its content type."""
    import uuid

    boundary = uuid.uuid4().hex
    body = b""
    for i, data in enumerate(files):
        ctype = (content_types or {}).get(i, "application/dicom")
        body += f"--{boundary}\r\nContent-Type: {ctype}\r\n\r\n".encode() + data + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


READER = ("reader1", "reader-password-1")  # review-UI accounts made by the ui_server fixture
ADMIN = ("admin1", "admin-password-1")


class LiveServer:
    """The real app under uvicorn on a loopback port, in a thread (dicomweb-client needs real HTTP)."""

    def __init__(self, settings, key_suffix: str = "") -> None:
        import httpx
        import uvicorn

        from medvision.serving.app import create_app
        from medvision.serving.auth import create_key
        from medvision.serving.db import open_database
        from medvision.serving.http_server import uvicorn_options

        self.sessions = open_database(settings.database_url)
        with self.sessions() as db:
            self.key = create_key(db, f"pacs{key_suffix}", "score")[0]
            self.reader = create_key(db, f"reader{key_suffix}", "review")[0]
        self.clients: list = []
        self.app = create_app(settings)
        options = {**uvicorn_options(settings), "host": "127.0.0.1", "port": 0, "log_level": "warning"}
        self.server = uvicorn.Server(uvicorn.Config(self.app, **options))  # as `medvision serve` runs it
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.05)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.data_dir = Path(settings.data_dir)
        self.client = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {self.key}"}, timeout=60)

    def client_for(self, name: str, scopes: str, site: str | None = None):
        """An HTTP client with a new key of its own (``site`` defaults to the key's name)."""
        import httpx

        from medvision.serving.auth import create_key

        with self.sessions() as db:
            token = create_key(db, name, scopes, site=site)[0]
        client = httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {token}"}, timeout=60)
        self.clients.append(client)
        return client

    def stop(self) -> None:
        for c in (self.client, *self.clients):
            c.close()
        self.server.should_exit = True
        self.thread.join(30)

    def wait_scored(self, study_uid: str, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            r = self.client.get(f"/v1/studies/{study_uid}")
            if r.status_code == 200 and r.json()["status"] in ("scored", "failed"):
                return r.json()
            assert time.monotonic() < deadline, r.text
            time.sleep(0.2)


def environment(name: str) -> str | None:
    """A worker process's value of the environment variable ``name`` (for ``WorkerProcesses.run``)."""
    return os.environ.get(name)


def decode_or_die(data, want_ids: bool, want_statistics: bool = False):
    """A DecodePool target for tests: a worker process that gets b"DIE" dies the way a crashing codec does."""
    from medvision.serving.decode_pool import Shared, _prepare

    if isinstance(data, Shared):  # the usual way in
        with data.attach() as view:
            body = bytes(view[:8])
    else:  # through the pipe: every shared segment was in use by the requests ahead
        body = bytes(data[:8]) if isinstance(data, (bytes, bytearray)) else b""
    if body == b"DIE":
        os._exit(134)
    if body == b"SLOW":  # a codestream that keeps its decoder busy
        time.sleep(3600)
    return _prepare(data, want_ids, want_statistics)


def predict_all(client, files) -> list[dict]:
    """Each file scored through ``/v1/predict`` by ``client`` (an httpx client with a key); their answers."""
    out = []
    for f in files:
        r = client.post("/v1/predict", content=f.read_bytes(), headers={"Content-Type": "application/dicom"})
        assert r.status_code == 200, r.text
        out.append(r.json())
    return out


class Unrebuildable(Exception):
    """An exception its own pickle cannot rebuild (its constructor takes two arguments, its args hold one)."""

    def __init__(self, a, b) -> None:
        super().__init__(f"{a} {b}")


def raise_unrebuildable():
    """A worker target whose exception would fail in the caller's unpickling."""
    raise Unrebuildable(1, 2)


def decode_reduced(codestream: bytes, levels: int):
    """A JPEG 2000 / HTJ2K codestream decoded by OpenJPEG (through Pillow) without its ``levels`` finest levels, as
    the reader hands it over (``resolution.openjpeg``), whole: never cut."""
    from medvision.resolution import openjpeg

    return openjpeg(codestream, levels)


def mangled_cuts(codestream: bytes, seed: int, tries: int = 300) -> dict[str, int]:
    """``tries`` copies of ``codestream`` with a few bytes changed in its headers or its first packets, each cut at a
    random level (``j2k_prefix.coarse_codestream``): where the whole mangled codestream decodes, the cut one must decode
    to the same pixels (asserted). How often there was no cut, the same pixels, or no decode of the whole."""
    import numpy as np

    from medvision.j2k_prefix import coarse_codestream

    rng = np.random.default_rng(seed)
    sod = codestream.index(b"\xff\x93")
    outcomes = {"none": 0, "same": 0, "whole fails": 0}
    for i in range(tries):
        bad = bytearray(codestream)
        where = int(rng.integers(0, sod + 3000)) if i % 3 else int(rng.integers(sod, sod + 200))
        bad[where:where + int(rng.integers(1, 4))] = rng.integers(0, 256, size=3, dtype=np.uint8).tobytes()
        level = int(rng.integers(1, 6))
        cut = coarse_codestream(bytes(bad), level)
        if cut is None:
            outcomes["none"] += 1
            continue
        try:
            whole = decode_reduced(bytes(bad), level)
        except (OSError, ValueError, SyntaxError):
            outcomes["whole fails"] += 1
            continue
        np.testing.assert_array_equal(decode_reduced(cut, level), whole, err_msg=f"mutation {i} at {where}, level {level}")
        outcomes["same"] += 1
    return outcomes
