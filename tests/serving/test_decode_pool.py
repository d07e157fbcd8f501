"""Decoding in worker processes (MEDVISION_DECODE_PROCESSES): the same scores and refusals as decoding in threads,
and a worker that dies costs its own request a clear refusal, never the service."""

import asyncio
import copy
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pydicom
import pytest
from helpers import LiveServer, decode_or_die, environment, free_port, start_service, stow_body
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, JPEGLSLossless, RLELossless
from sqlalchemy import select

from medvision.dicom_io import ReadLimits
from medvision.serving.decode_pool import DecodePool, DecoderCrashed
from medvision.serving.engine import Engine
from medvision.serving.routes.predict import SHARED_BODY_MIN
from medvision.serving.settings import Settings
from medvision.serving.tables import ScoredImage
from medvision.synth.dataset import example_image
from medvision.synth.dicom_writer import save
from medvision.synth.vendors import VENDORS


def _together(server, files) -> dict:
    """Each file sent to /v1/predict at the same time, on connections of their own: the answers by index."""
    results = {}

    def send(i):
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {server.key}"}, timeout=60) as c:
            results[i] = c.post("/v1/predict", content=files[i].read_bytes(),
                                headers={"Content-Type": "application/dicom"})

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(files))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return results


def test_predict_through_worker_processes_matches_the_in_thread_path(artifact, dicom_files, tmp_path):
    server = LiveServer(Settings(artifact=str(artifact), database_url=f"sqlite:///{tmp_path / 'p.db'}",
                                 data_dir=str(tmp_path / "d"), decode_processes=2))
    try:
        pool = server.server.config.app.state.decoder
        assert pool is not None
        engine = Engine(artifact)
        handed, real = [], pool.prepare
        pool.prepare = lambda data, ids=None, statistics=None: handed.append(1) or real(data, ids, statistics)
        # a request alone in the service is decoded in its own thread: a hop to a process would only add latency
        alone = server.client.post("/v1/predict", content=dicom_files[0].read_bytes(),
                                   headers={"Content-Type": "application/dicom"})
        assert alone.status_code == 200 and handed == []
        results = _together(server, dicom_files[:8])
        assert handed  # requests that arrived together went to the workers
        for i in range(8):
            assert results[i].status_code == 200, results[i].text
            assert results[i].json()["probability"] == pytest.approx(engine.predict(dicom_files[i]).probability,
                                                                      abs=1e-5)
        # stored as the in-thread path stores them: the drift watch's statistics were computed by the workers
        with server.sessions() as db:
            stored = {r.sop_instance_uid: r.profile for r in db.scalars(select(ScoredImage))}
        for f in dicom_files[:8]:
            expected = engine.predict(f).profile
            got = stored[str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)]
            assert {k: got[k] for k in expected} == pytest.approx(expected, abs=1e-5), f.name
        refused = server.client.post("/v1/predict", content=b"\x89PNG\r\n\x1a\n" + b"\0" * 200,
                                     headers={"Content-Type": "application/dicom"})
        assert refused.status_code == 422 and refused.json()["code"] == "not_dicom"
        body, ctype = stow_body([f.read_bytes() for f in dicom_files[8:12]])  # a study pushed by a PACS: the job
        assert server.client.post("/dicomweb/studies", content=body, headers={"Content-Type": ctype}).status_code == 200
        study = str(pydicom.dcmread(dicom_files[8], stop_before_pixels=True).StudyInstanceUID)
        assert server.wait_scored(study)["status"] == "scored"
        images = server.client.get(f"/v1/studies/{study}/results").json()["images"]
        by_uid = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in dicom_files[8:12]}
        assert len(images) == len(by_uid) == 4
        for image in images:
            assert image["probability"] == pytest.approx(engine.predict(by_uid[image["sop_instance_uid"]]).probability,
                                                         abs=1e-5)
    finally:
        server.stop()
    assert server.server.config.app.state.decoder is None  # the pool was shut down with the service


def test_a_request_alone_is_decoded_in_its_own_thread_only_where_its_decoder_lets_the_event_loop_run(
        artifact, tmp_path, monkeypatch):
    """pydicom's plugins decoding JPEG 2000 at full size hold the GIL for the whole decode (a full-field image about
    0.5 s): in the service's own thread they would stop its event loop, and every other request and health check with
    it. A request alone is decoded there only where the decoder lets go or holds it briefly (uncompressed pixels; JPEG
    2000 at a small reduced size; JPEG-LS and RLE through imagecodecs: ``resolution.lets_threads_run``); the others by a worker process, as
    under load, with the same score, whatever the file meta's hint said."""
    ds = example_image(VENDORS[0], 1024, 832, seed=5)
    files = {}
    for syntax in (ExplicitVRLittleEndian, JPEGLSLossless, RLELossless, JPEG2000Lossless):
        files[syntax] = tmp_path / f"{syntax.name}.dcm"
        save(copy.deepcopy(ds), files[syntax], syntax)
    # no larger than the model's contract asks for (the test artifact's 96 px): a JPEG 2000 decode at full size
    files["small"] = tmp_path / "small.dcm"
    save(example_image(VENDORS[0], 96, 78, seed=6), files["small"], JPEG2000Lossless)
    # a decoy Transfer Syntax UID ahead of the real one: the file meta's hint says uncompressed, the file is that
    # JPEG 2000 one
    real = files["small"].read_bytes()
    files["decoy"] = tmp_path / "decoy.dcm"
    files["decoy"].write_bytes(real[:132] + b"\x02\x00\x10\x00UI\x14\x001.2.840.10008.1.2.1\x00" + real[132:])
    server = LiveServer(Settings(artifact=str(artifact), database_url=f"sqlite:///{tmp_path / 'p.db'}",
                                 data_dir=str(tmp_path / "d"), decode_processes=2))
    pool = server.server.config.app.state.decoder
    handed, real, real_async = [], pool.prepare, pool.prepare_async
    monkeypatch.setattr(pool, "prepare", lambda data, *a: handed.append(data) or real(data, *a))
    monkeypatch.setattr(pool, "prepare_async", lambda data, *a: handed.append(data) or real_async(data, *a))
    # still alone once a worker has decoded it: scored and stored in one thread, not through the batching loop and
    # the result writer (two hops more)
    state, batched = server.server.config.app.state, []
    real_submit, real_record = state.batcher.submit, state.recorder.record
    monkeypatch.setattr(state.batcher, "submit", lambda x: batched.append("model") or real_submit(x))
    monkeypatch.setattr(state.recorder, "record", lambda *a: batched.append("writer") or real_record(*a))
    try:
        engine = Engine(artifact)
        by_worker, decoded = [], {}
        for syntax, path in files.items():
            before = len(handed)
            alone = server.client.post("/v1/predict", content=path.read_bytes(),
                                       headers={"Content-Type": "application/dicom"})
            assert alone.status_code == 200, alone.text
            assert alone.json()["probability"] == pytest.approx(engine.predict(path).probability, abs=1e-5)
            decoded[syntax] = alone.json()["decode"]
            if len(handed) > before:
                by_worker.append(syntax)
        assert by_worker == ["small", "decoy"]
        assert batched == []
        with server.sessions() as db:  # and stored before the answer (one row per SOP Instance UID: its last score)
            stored = {r.sop_instance_uid: r.probability for r in db.scalars(select(ScoredImage))}
        expected = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID):
                    pytest.approx(engine.predict(p).probability, abs=1e-5) for p in files.values()}
        assert stored == expected and len(stored) == 2
        assert decoded["small"] == decoded["decoy"] == "full"
        assert decoded[JPEG2000Lossless].endswith("wavelet")  # a short reduced decode
        assert files[ExplicitVRLittleEndian].stat().st_size > SHARED_BODY_MIN  # in a segment, decoded in place
    finally:
        server.stop()


def test_the_service_decodes_jpeg_2000_on_every_core_and_each_worker_on_one(artifact, tmp_path, monkeypatch):
    """The service's own process decodes one image at a time (a request alone, the review UI's renderings):
    OpenJPEG gets every core there. Its decoding workers, one a core, decode on one thread each (they inherit the
    service's environment, and set their own). A value the user set is kept."""
    from fastapi.testclient import TestClient

    from medvision.resolution import OPENJPEG_THREADS
    from medvision.serving.app import create_app

    monkeypatch.setenv(OPENJPEG_THREADS, "unset below")  # the test's environment is given back afterwards
    monkeypatch.delenv(OPENJPEG_THREADS)
    settings = Settings(artifact=str(artifact), database_url=f"sqlite:///{tmp_path / 'db.sqlite'}",
                        data_dir=str(tmp_path / "data"), decode_processes=2, job_workers=0)
    with TestClient(create_app(settings)) as c:
        assert os.environ.get(OPENJPEG_THREADS) == (str(settings.cores) if settings.cores > 1 else None)
        workers = c.app.state.decoder.workers
        assert [workers.run(environment, (OPENJPEG_THREADS,), 30) for _ in range(4)] == \
            ["0" if settings.cores > 1 else None] * 4  # each decodes in its calling thread
    monkeypatch.setenv(OPENJPEG_THREADS, "3")
    with TestClient(create_app(settings)):
        assert os.environ[OPENJPEG_THREADS] == "3"


def test_a_view_read_by_a_worker_decodes_on_the_idle_cores_then_the_worker_goes_back_to_one(tmp_path, monkeypatch):
    """A review UI rendering handed to a worker (one too long to decode beside the event loop) is read with OpenJPEG on
    as many threads as workers were idle, at most the cores (as fast as the service's own thread decoded it on every
    core), the same pixels; the worker then decodes on one thread again, as beside the other workers."""
    import numpy as np

    from medvision import resolution
    from medvision.dicom_io import read_dicom
    from medvision.resolution import OPENJPEG_THREADS
    from medvision.serving import decode_pool

    monkeypatch.setenv(OPENJPEG_THREADS, "unset below")  # the test's environment is given back afterwards
    monkeypatch.delenv(OPENJPEG_THREADS)
    path = tmp_path / "view.dcm"
    save(example_image(VENDORS[0], 1024, 832, seed=2), path, JPEG2000Lossless)
    seen, real = [], resolution.openjpeg
    monkeypatch.setattr(resolution, "openjpeg", lambda *a: seen.append(os.environ.get(OPENJPEG_THREADS)) or real(*a))
    expected, meta = read_dicom(path, long_side=512)
    assert meta.decode == "1/2 wavelet" and seen == [None]
    got, _ = decode_pool._read(str(path), ReadLimits(), 512, 3)  # in a worker, as it runs there
    np.testing.assert_array_equal(got, expected)
    assert seen == [None, "3"] and os.environ.get(OPENJPEG_THREADS) in (None, "0")  # both: one, in the caller
    pool = DecodePool(decode_pool.PreprocessConfig(), ReadLimits(), 2)
    calls, run = [], pool.workers.run
    monkeypatch.setattr(pool.workers, "run", lambda target, args, *a: calls.append(args[3:]) or run(target, args, *a))
    try:
        got, got_meta = pool.read(path, ReadLimits(), 512)
        assert calls == [(min(2, decode_pool.usable_cores()),)]  # both workers idle: as many threads, cores allowing
        with monkeypatch.context() as m:  # one core: one thread, however many workers are idle
            m.setattr(decode_pool, "usable_cores", lambda: 1)
            pool.read(path, ReadLimits(), 512)
        assert calls[1:] == [(1,)]
        np.testing.assert_array_equal(got, expected)
        assert got_meta == meta
        assert {pool.workers.run(environment, (OPENJPEG_THREADS,), 30) for _ in range(4)} <= {None, "0"}
    finally:
        pool.close()


@pytest.mark.parametrize(("processes", "threads", "expected"), [(2, 0, 1), (0, 0, None), (2, 3, 3)])
def test_beside_decoding_processes_the_model_runs_on_one_thread_unless_told(artifact, processes, threads, expected):
    """The decoding processes fill the cores: a second ONNX Runtime thread would only cost CPU to wake. Without them,
    one thread per physical core the process may run on (None below)."""
    from medvision.cores import physical_cores

    engine = Engine.from_settings(Settings(artifact=str(artifact), decode_processes=processes, threads=threads))
    assert engine.session.get_session_options().intra_op_num_threads == (expected or physical_cores())


def test_a_worker_that_dies_refuses_its_file_and_the_pool_comes_back(artifact, dicom_files):
    engine = Engine(artifact)
    pool = DecodePool(engine.meta.preprocess, ReadLimits(), 2, target=decode_or_die)
    try:
        first = pool.workers.pids
        with pytest.raises(DecoderCrashed, match="decoder crashed on this file"):
            pool.prepare(b"DIE")
        now = _replaced(pool, 1)
        assert len(now) == 2 and len(set(now) - set(first)) == 1  # the dead one replaced, the other untouched
        ids: dict[str, str] = {}
        x, meta = pool.prepare(dicom_files[0].read_bytes(), ids)
        expected, expected_meta = engine.prepare(dicom_files[0])
        assert (x == expected).all() and meta == expected_meta and "AccessionNumber" in ids
    finally:
        pool.close()


def test_a_file_that_arrives_after_the_workers_stopped_is_answered_503_not_500(artifact, dicom_files):
    from medvision.serving.decode_pool import DecodersStopped
    from medvision.serving.errors import STATUS

    pool = DecodePool(Engine(artifact).meta.preprocess, ReadLimits(), 1)
    pool.close()
    with pytest.raises(DecodersStopped, match="shutting down") as refused:
        pool.prepare(dicom_files[0])
    assert STATUS[type(refused.value)] == 503 and refused.value.code == "shutting_down"


def test_a_crash_fails_only_its_own_request(artifact, dicom_files):
    engine = Engine(artifact)
    pool = DecodePool(engine.meta.preprocess, ReadLimits(), 1, target=decode_or_die)
    outcomes = {}

    def good(i):
        outcomes[i] = pool.prepare(dicom_files[i].read_bytes())[0].shape

    try:
        threads = [threading.Thread(target=good, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        with pytest.raises(DecoderCrashed):
            pool.prepare(b"DIE")
        for t in threads:
            t.join(120)
        assert len(outcomes) == 4  # every bystander decoded, before the crash or by the worker that replaced it
    finally:
        pool.close()


def test_a_file_that_keeps_its_decoder_busy_is_refused_and_the_others_go_through(artifact, dicom_files):
    """A worker stuck past the time limit is stopped and replaced; its file is refused by name, and the requests
    waiting for a worker are decoded by the new one."""
    from medvision.serving.decode_pool import DecodeTooSlow

    engine = Engine(artifact)
    pool = DecodePool(engine.meta.preprocess, ReadLimits(), 1, target=decode_or_die, timeout_s=3)
    pool.wait_s = 120  # bystanders wait out the slow file and the start of its worker's replacement
    outcomes = {}

    def good(i):
        try:
            outcomes[i] = pool.prepare(dicom_files[i].read_bytes())[0].shape
        except Exception as exc:  # shown in the assertion below
            outcomes[i] = repr(exc)

    try:
        slow = threading.Thread(target=lambda: outcomes.setdefault("slow", _refusal(pool)))
        slow.start()
        time.sleep(0.5)  # the slow file holds the only worker; these queue behind it
        threads = [threading.Thread(target=good, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in [slow, *threads]:
            t.join(120)
        assert isinstance(outcomes.pop("slow"), DecodeTooSlow)
        assert all(isinstance(v, tuple) for v in outcomes.values()) and len(outcomes) == 3, outcomes  # every bystander decoded
        assert pool.prepare(dicom_files[5].read_bytes())[0].shape == outcomes[0]
    finally:
        pool.close()


def test_the_awaited_hand_off_decodes_and_recovers_as_the_blocking_one(artifact, dicom_files):
    """``prepare_async`` (a body already in one of the pool's segments, awaited on the event loop, as the service
    hands off requests that arrive together): the same arrays and identifiers; a crash refuses only its file and the
    requests waiting for the worker go through; a worker stuck past the limit is refused by name and the others go
    through; a worker killed while idle costs no request anything."""
    from medvision.serving.decode_pool import DecodeTooSlow

    engine = Engine(artifact)
    pool = DecodePool(engine.meta.preprocess, ReadLimits(), 1, target=decode_or_die, timeout_s=3)
    pool.wait_s = 120  # bystanders wait out the slow file and the start of its worker's replacement

    async def one(data: bytes, ids=None, statistics=None):
        with pool.segments.receiving(len(data)) as received:
            assert received is not None
            received.view()[:] = data
            return await pool.prepare_async(received, ids, statistics)

    async def scenario():
        ids: dict[str, str] = {}
        statistics: dict[str, float] = {}
        x, meta = await one(dicom_files[0].read_bytes(), ids, statistics)
        expected, expected_meta = engine.prepare(dicom_files[0])
        assert (x == expected).all() and meta == expected_meta and "AccessionNumber" in ids
        # the drift watch's statistics of the input, computed by the worker as the service's own thread would
        assert statistics == engine.statistics(expected) and 0 < statistics["breast_fraction"] < 1
        first = pool.workers.pids
        kept = [{} for _ in dicom_files[1:4]]
        crash = await asyncio.gather(one(b"DIE"), *(one(f.read_bytes(), None, st) for f, st in zip(dicom_files[1:4], kept, strict=True)),
                                     return_exceptions=True)
        assert isinstance(crash[0], DecoderCrashed), crash
        assert all(isinstance(o, tuple) for o in crash[1:]), crash  # the bystanders, decoded again
        assert kept == [engine.statistics(engine.prepare(f)[0]) for f in dicom_files[1:4]]  # with their statistics
        assert _replaced(pool, 1) != first
        stuck = await asyncio.gather(one(b"SLOW"), *(one(f.read_bytes()) for f in dicom_files[4:6]),
                                     return_exceptions=True)
        assert isinstance(stuck[0], DecodeTooSlow), stuck
        assert all(isinstance(o, tuple) for o in stuck[1:]), stuck
        assert (await one(dicom_files[6].read_bytes()))[0].shape == expected.shape  # the pool serves on
        _replaced(pool, 2)
        os.kill(pool.workers.pids[0], signal.SIGKILL)  # killed from outside while idle (the OOM killer, an operator)
        pool.workers.idle[0].process.join(10)
        assert (await one(dicom_files[7].read_bytes()))[0].shape == expected.shape  # not this request's doing
        _replaced(pool, 3)

    try:
        asyncio.run(scenario())
    finally:
        pool.close()


def _replaced(pool: DecodePool, times: int, within_s: float = 60) -> list[int]:
    """The workers' pids once ``times`` of them have been replaced and the replacements are up."""
    deadline = time.monotonic() + within_s
    while pool.workers.replaced < times or len(pool.workers.idle) < pool.processes:
        assert time.monotonic() < deadline, (pool.workers.replaced, len(pool.workers.idle))
        time.sleep(0.1)
    assert pool.workers.replaced == times
    return pool.workers.pids


def test_a_segment_whose_request_is_cancelled_mid_decode_is_never_reused(artifact, dicom_files):
    """The worker may still be reading the segment of a request cancelled while it decodes: that segment is let go
    (unlinked; the worker keeps its own mapping), never handed to the next body. The worker itself is still held to
    the time limit: stopped and replaced at it, not left busy for good."""
    engine = Engine(artifact)
    pool = DecodePool(engine.meta.preprocess, ReadLimits(), 1, target=decode_or_die, timeout_s=3)
    pool.wait_s = 120  # bystanders wait out the slow file and the start of its worker's replacement

    async def cancelled_mid_decode():
        with pool.segments.receiving(4) as received:
            received.view()[:] = b"SLOW"
            name = received.segment.name
            task = asyncio.ensure_future(pool.prepare_async(received))
            await asyncio.sleep(1.0)  # the worker is in it now
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert received.abandoned
        return name

    async def then_one_more():
        first = pool.workers.pids
        name = await cancelled_mid_decode()
        assert pool.workers.pids == first and pool.workers.replaced == 0  # still on the cancelled file
        await asyncio.sleep(3.5)  # past the limit (3 s): stopped, and a new worker started
        return name

    try:
        name = asyncio.run(then_one_more())
        assert name not in {s.name for s in pool.segments.free} and pool.segments.count == 0
        assert _replaced(pool, 1, within_s=30)
        assert pool.prepare(dicom_files[0].read_bytes())[0].shape == engine.prepare(dicom_files[0])[0].shape
    finally:
        pool.close()


def _refusal(pool):
    try:
        pool.prepare(b"SLOW")
    except Exception as exc:
        return exc
    return None


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            pass
    return out


@pytest.mark.integration
def test_decoding_workers_exit_when_the_service_is_killed(artifact, dicom_files, tmp_path):
    env = {**os.environ, "MEDVISION_DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite'}",
           "MEDVISION_DATA_DIR": str(tmp_path / "data"), "MEDVISION_DECODE_PROCESSES": "2"}
    key = json.loads(subprocess.run([sys.executable, "-m", "medvision.cli", "keys", "create", "k"], env=env,
                                    capture_output=True, text=True, timeout=60).stdout)["key"]
    port = free_port()
    proc = start_service(env, artifact, port)
    try:
        r = httpx.post(f"http://127.0.0.1:{port}/v1/predict", content=dicom_files[0].read_bytes(), timeout=60,
                       headers={"Content-Type": "application/dicom", "Authorization": f"Bearer {key}"})
        assert r.status_code == 200
        workers = _children(proc.pid)
        assert len(workers) >= 2  # the decoding processes (and multiprocessing's resource tracker)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    deadline = time.monotonic() + 20
    while alive := [w for w in workers if Path(f"/proc/{w}").exists() and "(python" in Path(f"/proc/{w}/stat")
                    .read_text() and " Z " not in Path(f"/proc/{w}/stat").read_text()]:
        assert time.monotonic() < deadline, f"decoding workers still running after the service was killed: {alive}"
        time.sleep(0.5)


def test_a_worker_lets_go_of_the_segments_the_service_unlinked():
    """A segment the service replaced (by a larger one) is unlinked there, but its memory stays allocated while a
    worker maps it: a worker drops such mappings when it maps a new segment."""
    from multiprocessing import shared_memory

    from medvision.serving import decode_pool

    made = [shared_memory.SharedMemory(create=True, size=4096) for _ in range(3)]
    try:
        for segment in made[:2]:  # as a worker: kept segments stay mapped from one request to the next
            with decode_pool.Shared(segment.name, 16, kept=True).attach() as view:
                assert len(view) == 16
        assert {made[0].name, made[1].name} <= set(decode_pool._mapped)
        made[0].unlink()  # the service lets it go
        with decode_pool.Shared(made[2].name, 16, kept=True).attach():
            pass
        assert made[0].name not in decode_pool._mapped  # unmapped: its memory is free
        assert {made[1].name, made[2].name} <= set(decode_pool._mapped)  # the live ones stay mapped
    finally:
        for name in [s.name for s in made]:
            if name in decode_pool._mapped:
                decode_pool._close(decode_pool._mapped.pop(name))
        for segment in made:
            segment.close()
            if segment is not made[0]:
                segment.unlink()


KILLED = """
import os, signal, sys
from pathlib import Path
from medvision.dicom_io import ReadLimits
from medvision.serving.decode_pool import DecodePool
from medvision.serving.engine import Engine
if __name__ == "__main__":
    pool = DecodePool(Engine(Path(sys.argv[1])).meta.preprocess, ReadLimits(), 1)
    pool.prepare(Path(sys.argv[2]).read_bytes())  # handed over in a segment, which the worker attaches to
    print(" ".join(s.name for s in pool.segments.free), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_the_segments_of_a_service_killed_with_9_are_unlinked(artifact, dicom_files, tmp_path):
    """The resource tracker the workers share with the service unlinks its segments once both are gone: 24 MB each
    that would otherwise stay in /dev/shm (a container's is 64 MB) until the machine restarts."""
    script = tmp_path / "killed.py"
    script.write_text(KILLED)
    done = subprocess.run([sys.executable, str(script), str(artifact), str(dicom_files[0])], capture_output=True,
                          text=True, timeout=120)
    names = done.stdout.split()
    assert done.returncode == -signal.SIGKILL and names, done.stderr[-2000:]
    deadline = time.monotonic() + 30
    while left := [n for n in names if Path("/dev/shm", n.lstrip("/")).exists()]:
        assert time.monotonic() < deadline, f"segments left in /dev/shm after the service was killed: {left}"
        time.sleep(0.5)


def test_large_raw_bodies_go_straight_into_shared_segments_and_score_as_in_process(artifact, dicom_files, tmp_path,
                                                                                monkeypatch):
    """A body over SHARED_BODY_MIN is read from the socket into one of the workers' segments, decoded there (or in
    place by the request's own thread when it is alone), never gathered into the service's memory first."""
    from pydicom.dataset import Dataset  # noqa: F401 - the padded files below are plain pydicom writes

    from medvision.serving.routes import predict as predict_route

    padded = []
    for i, f in enumerate(dicom_files[:8]):  # valid DICOM, larger than the threshold: trailing padding
        ds = pydicom.dcmread(f)
        ds.add_new((0xFFFC, 0xFFFC), "OB", b"\0" * (predict_route.SHARED_BODY_MIN + 1000))
        out = tmp_path / f"padded{i}.dcm"
        ds.save_as(out)
        padded.append(out)
    gathered = []
    real = predict_route.read_dicom_upload
    monkeypatch.setattr(predict_route, "read_dicom_upload", lambda *a: gathered.append(1) or real(*a))
    server = LiveServer(Settings(artifact=str(artifact), database_url=f"sqlite:///{tmp_path / 'p.db'}",
                                 data_dir=str(tmp_path / "d"), decode_processes=2))
    pool = server.server.config.app.state.decoder
    awaited, real_async = [], pool.prepare_async
    monkeypatch.setattr(pool, "prepare_async", lambda *a: awaited.append(1) or real_async(*a))
    try:
        engine = Engine(artifact)
        expected = [engine.predict(f).probability for f in padded]
        alone = server.client.post("/v1/predict", content=padded[0].read_bytes(),
                                   headers={"Content-Type": "application/dicom"})
        assert alone.status_code == 200 and alone.json()["probability"] == pytest.approx(expected[0], abs=1e-5)
        results = _together(server, padded[:8])
        for i in range(8):
            assert results[i].status_code == 200, results[i].text
            assert results[i].json()["probability"] == pytest.approx(expected[i], abs=1e-5)
        segments = server.server.config.app.state.decoder.segments
        assert len(gathered) <= max(0, 8 - segments.keep) and segments.count >= 1  # beyond the kept ones: gathered
        assert awaited  # requests that arrived together were handed to the workers without a thread waiting
        small = server.client.post("/v1/predict", content=dicom_files[9].read_bytes(),  # under the threshold
                                   headers={"Content-Type": "application/dicom"})
        assert small.status_code == 200 and gathered == [1]
        garbage = server.client.post("/v1/predict", content=b"\0" * (2 * predict_route.SHARED_BODY_MIN),
                                     headers={"Content-Type": "application/dicom"})
        assert garbage.status_code == 422 and garbage.json()["code"] == "not_dicom"
    finally:
        server.stop()


def test_without_decoding_workers_a_large_raw_body_is_read_straight_into_memory_of_its_own(artifact, dicom_files,
                                                                                          tmp_path, monkeypatch):
    """A service with no decoding workers (one core, or DECODE_PROCESSES=0) reads a large raw body from the socket
    into one buffer of its own, the size of its Content-Length, instead of gathering its chunks and joining them
    into one more copy; what it scores is what the file scores in process."""
    from medvision.serving.routes import predict as predict_route

    padded = []
    for i, f in enumerate(dicom_files[:4]):
        ds = pydicom.dcmread(f)
        ds.add_new((0xFFFC, 0xFFFC), "OB", os.urandom(predict_route.SHARED_BODY_MIN + 1000))  # the tail: no zeros
        padded.append(tmp_path / f"padded{i}.dcm")
        ds.save_as(padded[-1])
    from medvision.serving import http_server

    gathered, own, filled = [], [], []
    real = predict_route.read_dicom_upload
    monkeypatch.setattr(predict_route, "read_dicom_upload", lambda *a: gathered.append(1) or real(*a))

    class Counted(predict_route.OwnBody):
        def __init__(self, size):
            super().__init__(size)
            own.append(self)

    monkeypatch.setattr(predict_route, "OwnBody", Counted)
    real_filler = http_server._filler

    def counted_filler(cycle, protocol):  # the server's socket-to-buffer path, not the app's copy of each chunk
        fill = real_filler(cycle, protocol)

        async def counted_fill(buffer, progress=None):
            n = await fill(buffer, progress)
            filled.append(n)
            return n
        return counted_fill

    monkeypatch.setattr(http_server, "_filler", counted_filler)
    server = LiveServer(Settings(artifact=str(artifact), database_url=f"sqlite:///{tmp_path / 'p.db'}",
                                 data_dir=str(tmp_path / "d"), decode_processes=0))
    try:
        assert server.server.config.app.state.decoder is None
        engine = Engine(artifact)
        expected = [engine.predict(f).probability for f in padded]
        alone = server.client.post("/v1/predict", content=padded[0].read_bytes(),
                                   headers={"Content-Type": "application/dicom"})
        assert alone.status_code == 200 and alone.json()["probability"] == pytest.approx(expected[0], abs=1e-5)
        results = _together(server, padded)
        for i in range(len(padded)):
            assert results[i].status_code == 200, results[i].text
            assert results[i].json()["probability"] == pytest.approx(expected[i], abs=1e-5)
        sent = sorted(f.read_bytes() for f in [padded[0], *padded])
        assert not gathered and sorted(body.buffer.tobytes() for body in own) == sent  # every byte, where it belongs
        assert sorted(filled) == sorted(len(b) for b in sent)
        # a chunked body (no Content-Length to size a buffer by) and a small one are gathered as before
        chunked = server.client.post("/v1/predict", content=iter([padded[1].read_bytes()]),
                                     headers={"Content-Type": "application/dicom"})
        small = server.client.post("/v1/predict", content=dicom_files[9].read_bytes(),
                                   headers={"Content-Type": "application/dicom"})
        assert chunked.status_code == small.status_code == 200 and len(gathered) == 2 and len(own) == 5
        assert chunked.json()["probability"] == pytest.approx(expected[1], abs=1e-5)
        garbage = server.client.post("/v1/predict", content=b"\0" * (2 * predict_route.SHARED_BODY_MIN),
                                     headers={"Content-Type": "application/dicom"})
        assert garbage.status_code == 422 and garbage.json()["code"] == "not_dicom" and len(own) == 6
        # a body that ends short of its Content-Length: refused, never decoded from the bytes that did not come
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as s:
            s.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + server.key.encode()
                      + b"\r\nContent-Type: application/dicom\r\nContent-Length: %d\r\n\r\n" % len(sent[0])
                      + sent[0][:len(sent[0]) // 2])
            s.shutdown(socket.SHUT_WR)
            reply = b"".join(iter(lambda: s.recv(65536), b""))
        assert len(own) == 7 and (not reply or int(reply.split(b" ", 2)[1]) == 400), reply[:300]
        again = server.client.post("/v1/predict", content=padded[2].read_bytes(),
                                   headers={"Content-Type": "application/dicom"})
        assert again.status_code == 200 and again.json()["probability"] == pytest.approx(expected[2], abs=1e-5)
    finally:
        server.stop()


def test_a_giant_body_segment_is_used_once_and_unlinked_a_usual_one_is_kept():
    from multiprocessing import shared_memory

    from medvision.serving.decode_pool import KEEP_MAX, Segments

    segments = Segments(keep=4)
    try:
        with segments.receiving(KEEP_MAX + 1) as giant:
            name = giant.segment.name
            giant.view()[-3:] = b"end"
            assert not giant.shared.kept  # a worker unmaps it after use
        assert segments.count == 0 and segments.free == []
        with pytest.raises(FileNotFoundError):
            shared_memory.SharedMemory(name=name)
        with segments.receiving(3 << 20) as usual:
            kept = usual.segment.name
            assert usual.shared.kept and len(usual) == 3 << 20
        assert segments.count == 1 and [s.name for s in segments.free] == [kept]
    finally:
        segments.close()
