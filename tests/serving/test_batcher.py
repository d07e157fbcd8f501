"""Micro-batching: concurrent requests share model calls without changing a single score; a full queue is
refused at once with 429 + Retry-After, a request stuck past its timeout gets 503; the service stays up."""

import asyncio
import threading
import time

import httpx
import numpy as np
import pytest
from helpers import LiveServer

from medvision.serving.batcher import Batcher, Overloaded, TimedOut
from medvision.serving.engine import Engine
from medvision.serving.settings import Settings


def test_requests_are_batched_and_scores_do_not_change(artifact, dicom_files, tmp_path):
    server = LiveServer(Settings(artifact=str(artifact), database_url=f"sqlite:///{tmp_path / 'b.db'}",
                                 data_dir=str(tmp_path / "d"), batch_max_size=8, batch_max_wait_ms=100))
    try:
        files = dicom_files[:16]
        results: dict[int, dict] = {}

        def send(i):
            with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.key}"}, timeout=60) as c:
                results[i] = c.post("/v1/predict", content=files[i].read_bytes(),
                                    headers={"Content-Type": "application/dicom"}).json()

        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(files))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        engine = Engine(artifact)
        for i, f in enumerate(files):
            assert results[i]["probability"] == pytest.approx(engine.predict(f).probability, abs=1e-5)
    finally:
        state = server.server.config.app.state
        sizes = state.metrics.batch_size.collect()[0].samples
        server.stop()
    count = next(s.value for s in sizes if s.name.endswith("_count"))
    total = next(s.value for s in sizes if s.name.endswith("_sum"))
    assert total == 16 and count < 16  # at least one call scored several images


def _slow(seconds):
    def run(xs):
        time.sleep(seconds)
        return np.full(len(xs), 0.5)
    return run


def test_a_full_queue_is_refused_with_a_retry_estimate():
    async def scenario():
        b = Batcher(_slow(0.3), max_batch=1, max_wait_ms=0, max_queue=2, timeout_s=10)
        await b.start()
        x = np.zeros((1, 8, 8), np.float32)
        first = asyncio.create_task(b.submit(x))
        await asyncio.sleep(0.05)  # the first is running; the next two wait in the queue
        queued = [asyncio.create_task(b.submit(x)) for _ in range(2)]
        await asyncio.sleep(0.01)
        with pytest.raises(Overloaded) as info:
            await b.submit(x)
        assert info.value.retry_after >= 1 and "capacity" in info.value.message
        done = await asyncio.gather(first, *queued)
        await b.stop()
        return done

    assert [p for p, _, _ in asyncio.run(scenario())] == [0.5, 0.5, 0.5]


def test_a_lone_request_is_scored_where_it_was_decoded_and_never_alongside_a_batch():
    calls, active, most = [], [0], [0]
    lock = threading.Lock()

    def run(xs):
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        time.sleep(0.05)
        calls.append((threading.current_thread().name, len(xs)))
        with lock:
            active[0] -= 1
        return np.full(len(xs), 0.25)

    async def scenario():
        b = Batcher(run, max_batch=4, max_wait_ms=20, max_queue=8, timeout_s=10)
        await b.start()
        x = np.zeros((1, 8, 8), np.float32)
        with b.incoming():
            alone = await asyncio.to_thread(b.run_alone, x)
        assert alone[0] == 0.25 and alone[2] == 1 and alone[1] >= 50
        assert calls[-1][0] != "medvision-infer_0" and calls[-1][1] == 1  # in the caller's thread
        with b.incoming(), b.incoming():  # another request is decoding: it may be batched with this one
            assert await asyncio.to_thread(b.run_alone, x) is None
        with b.incoming():  # a lone call holds the model while two requests are submitted: they wait for it
            lone = asyncio.create_task(asyncio.to_thread(b.run_alone, x))
            await asyncio.sleep(0.01)
            assert await asyncio.to_thread(b.run_alone, x) is None  # the model is busy
            batched = await asyncio.gather(b.submit(x), b.submit(x))
            assert (await lone)[2] == 1
        await b.stop()
        return batched

    assert [p for p, _, n in asyncio.run(scenario())] == [0.25, 0.25]
    assert most[0] == 1  # never two model calls at once
    assert calls[-1] == ("medvision-infer_0", 2)


def test_a_request_past_its_timeout_gets_an_error_not_a_hang():
    async def scenario():
        b = Batcher(_slow(0.5), max_batch=1, max_wait_ms=0, max_queue=8, timeout_s=0.1)
        await b.start()
        with pytest.raises(TimedOut):
            await b.submit(np.zeros((1, 8, 8), np.float32))
        b.timeout = 5
        p, _, _ = await b.submit(np.zeros((1, 8, 8), np.float32))  # the batcher still works afterwards
        await b.stop()
        return p

    assert asyncio.run(scenario()) == 0.5


def test_overload_over_http_is_429_with_retry_after(artifact, dicom_files, tmp_path):
    server = LiveServer(Settings(artifact=str(artifact), database_url=f"sqlite:///{tmp_path / 'o.db'}",
                                 data_dir=str(tmp_path / "d"), batch_max_size=1, queue_max=1))
    server.server.config.app.state.batcher.run = _slow(0.4)
    codes, retry = [], []
    data = dicom_files[0].read_bytes()

    def send():
        r = httpx.post(f"{server.url}/v1/predict", content=data, timeout=60,
                       headers={"Content-Type": "application/dicom", "Authorization": f"Bearer {server.key}"})
        codes.append(r.status_code)
        if r.status_code == 429:
            retry.append(r.headers.get("retry-after"))
            assert r.json()["code"] == "overloaded"

    try:
        threads = [threading.Thread(target=send) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert 429 in codes and 200 in codes and set(codes) <= {200, 429}, codes
        assert all(r and int(r) >= 1 for r in retry)
        assert httpx.get(f"{server.url}/healthz").status_code == 200
    finally:
        server.stop()


def test_requests_piling_up_in_decoding_are_refused_before_their_bodies_are_held(artifact, dicom_files, tmp_path):
    """The queue bound counts requests being received and decoded, not only images waiting for the model: when
    decoding is the bottleneck, the ones beyond it get 429 at once instead of waiting (and holding their bodies)
    behind the others."""
    server = LiveServer(Settings(artifact=str(artifact), database_url=f"sqlite:///{tmp_path / 'o.db'}",
                                 data_dir=str(tmp_path / "d"), queue_max=2, decode_processes=0))
    engine = server.server.config.app.state.engine
    prepare = engine.prepare

    def slow_prepare(*args, **kwargs):
        time.sleep(0.5)
        return prepare(*args, **kwargs)

    engine.prepare = slow_prepare
    codes = []
    data = dicom_files[0].read_bytes()

    def send():
        r = httpx.post(f"{server.url}/v1/predict", content=data, timeout=60,
                       headers={"Content-Type": "application/dicom", "Authorization": f"Bearer {server.key}"})
        codes.append((r.status_code, r.headers.get("retry-after"), r.json().get("code")))

    try:
        threads = [threading.Thread(target=send) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert {c for c, _, _ in codes} == {200, 429}, codes
        assert all(retry and code == "overloaded" for c, retry, code in codes if c == 429)
        engine.prepare = prepare
        r = httpx.post(f"{server.url}/v1/predict", content=data, timeout=60,  # the same connection pool lives on
                       headers={"Content-Type": "application/dicom", "Authorization": f"Bearer {server.key}"})
        assert r.status_code == 200
    finally:
        server.stop()
