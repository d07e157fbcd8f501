"""Admission at the door: scoring requests beyond the limit are refused at once, with Retry-After, before their key
is looked up or their body read, and the connection lives on."""

import asyncio
import json
import threading
import time

import httpx
from helpers import LiveServer

from medvision.serving.limits import Admission
from medvision.serving.settings import Settings


def _scope(path: str = "/v1/predict", method: str = "POST") -> dict:
    return {"type": "http", "method": method, "path": path, "headers": [(b"content-length", b"100")],
            "query_string": b""}


def test_requests_beyond_the_limit_are_refused_without_reading_their_bodies():
    async def scenario():
        release, entered = asyncio.Event(), []

        async def inner(scope, receive, send):
            entered.append(scope["path"])
            await release.wait()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

        door = Admission(inner, limit=2, seconds_per_request=lambda: 0.4)
        answers: list[list[dict]] = []
        reads = 0

        async def receive():
            nonlocal reads
            reads += 1
            return {"type": "http.request", "body": b"x" * 100, "more_body": False}

        async def call(scope):
            sent: list[dict] = []
            answers.append(sent)

            async def send(message):
                sent.append(message)

            await door(scope, receive, send)

        admitted = [asyncio.create_task(call(_scope())) for _ in range(2)]
        await asyncio.sleep(0.01)
        for _ in range(3):
            await call(_scope())  # refused at once: it returns while the two admitted ones still wait
        refused = answers[2:]
        other = asyncio.create_task(call(_scope("/v1/studies", "GET")))  # not a scoring request: never held back
        await asyncio.sleep(0.01)
        release.set()
        await asyncio.gather(*admitted, other)
        await call(_scope())  # room again
        return entered, refused, reads, answers[-1], door.inside

    entered, refused, reads, last, inside = asyncio.run(scenario())
    assert entered == ["/v1/predict", "/v1/predict", "/v1/studies", "/v1/predict"]
    assert reads == 0  # the refused bodies were never read
    for sent in refused:
        start, body = sent
        headers = dict(start["headers"])
        assert start["status"] == 429 and int(headers[b"retry-after"]) >= 1
        assert b"connection" not in headers  # the HTTP server discards the rest of the body and keeps the connection
        problem = json.loads(body["body"])
        assert problem["code"] == "overloaded" and "2 scoring requests in progress" in problem["detail"]
    assert last[0]["status"] == 200 and inside == 0


def test_requests_held_before_the_route_are_counted_and_a_refusal_keeps_the_connection(artifact, dicom_files,
                                                                                         tmp_path, monkeypatch):
    """Requests waiting for their key to be checked (a database that stalls) are inside the service: they count, and
    the ones beyond the limit are answered 429 at once instead of joining the wait."""
    from medvision.serving import auth

    server = LiveServer(Settings(artifact=str(artifact), database_url=f"sqlite:///{tmp_path / 'o.db'}",
                                 data_dir=str(tmp_path / "d"), queue_max=2, decode_processes=0, key_cache_seconds=0))
    lookup = auth._lookup
    stall = threading.Event()

    def stalling_lookup(*args):  # in a worker thread, as the real lookup runs
        if stall.is_set():
            time.sleep(1.0)
        return lookup(*args)

    monkeypatch.setattr(auth, "_lookup", stalling_lookup)
    data = dicom_files[0].read_bytes()
    headers = {"Content-Type": "application/dicom", "Authorization": f"Bearer {server.key}"}
    answers = []

    def send():
        t = time.perf_counter()
        r = httpx.post(f"{server.url}/v1/predict", content=data, timeout=60, headers=headers)
        answers.append((r.status_code, r.headers.get("retry-after"), time.perf_counter() - t))

    try:
        stall.set()
        threads = [threading.Thread(target=send) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert sorted(c for c, _, _ in answers) == [200, 200] + [429] * 6, answers
        assert all(retry and int(retry) >= 1 for c, retry, _ in answers if c == 429)
        assert max(s for c, _, s in answers if c == 429) < 0.9  # refused at the door, not after the key check
        with httpx.Client(base_url=server.url, headers=headers, timeout=60) as client:
            holders = [threading.Thread(target=send) for _ in range(2)]
            for t in holders:
                t.start()
            time.sleep(0.4)  # both inside, waiting for their keys
            refused = client.post("/v1/predict", content=data)
            for t in holders:
                t.join(60)
            stall.clear()
            assert refused.status_code == 429 and refused.headers.get("connection") != "close"
            again = client.post("/v1/predict", content=data)  # the same connection, its refused body discarded
            assert again.status_code == 200, again.text
    finally:
        server.stop()
