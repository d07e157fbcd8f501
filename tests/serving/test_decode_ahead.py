"""A lone request's image read while its body arrives (``serving.decode_ahead``): over real HTTP, a body sent at a
network's pace is read ahead and scored as it always was; one sent at memory speed, one that stops halfway, and a
service told not to, read nothing ahead; and no thread is left waiting for bytes that never come."""

import copy
import json
import socket
import threading
import time

import pydicom
import pytest
from helpers import LiveServer
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless

from medvision import dicom_io, read_ahead, resolution
from medvision.serving.decode_ahead import Arrival
from medvision.serving.engine import Engine
from medvision.serving.settings import Settings
from medvision.synth.dataset import example_image
from medvision.synth.dicom_writer import save
from medvision.synth.vendors import VENDORS


def send(url: str, key: str, body: bytes, pause_s: float = 0.0, stop_at: int | None = None) -> tuple[int, dict]:
    """POST /v1/predict on a socket of its own, the body in 64 kB pieces ``pause_s`` apart (as from across a
    network); ``stop_at``: the sender goes away after that many bytes ((0, {}) back)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as s:
        s.sendall(f"POST /v1/predict HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
                  f"Content-Type: application/dicom\r\nContent-Length: {len(body)}\r\n\r\n".encode())
        end = len(body) if stop_at is None else stop_at
        for at in range(0, end, 65536):
            s.sendall(body[at:min(end, at + 65536)])
            if pause_s:
                time.sleep(pause_s)
        if stop_at is not None:
            return 0, {}
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += s.recv(65536)
        head, _, rest = answer.partition(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
        while len(rest) < length:
            rest += s.recv(65536)
        return int(head.split()[1]), json.loads(rest)


@pytest.fixture(scope="module")
def bodies(tmp_path_factory) -> dict:
    """A 2048 x 1664 image as JPEG 2000 (a 3 MB codestream, read at a reduced size from its cut) and uncompressed."""
    folder = tmp_path_factory.mktemp("ahead")
    ds = example_image(VENDORS[2], 2048, 1664, seed=8)
    out = {}
    for syntax in (JPEG2000Lossless, ExplicitVRLittleEndian):
        path = folder / f"{syntax.name}.dcm"
        save(copy.deepcopy(ds), path, syntax)
        out[syntax] = path
    return out


@pytest.fixture
def watched(monkeypatch) -> dict:
    """What was read ahead (each ``Engine.decode_ahead``'s answer) and which decoders the read of the whole file ran."""
    seen = {"ahead": [], "read": []}
    real_ahead = Engine.decode_ahead
    monkeypatch.setattr(Engine, "decode_ahead", lambda *a: (lambda r: seen["ahead"].append(r is not None) or r)(
        real_ahead(*a)))
    real_opj, real_lowpass = resolution.openjpeg, dicom_io.lowpass
    monkeypatch.setattr(resolution, "openjpeg", lambda *a: seen["read"].append("openjpeg") or real_opj(*a))
    monkeypatch.setattr(dicom_io, "lowpass", lambda *a, **k: seen["read"].append("lowpass") or real_lowpass(*a, **k))
    monkeypatch.setattr(read_ahead, "openjpeg", real_opj)
    return seen


def _server(artifact, tmp_path, processes=2, **settings) -> LiveServer:
    return LiveServer(Settings(artifact=str(artifact), database_url=f"sqlite:///{tmp_path / 'p.db'}",
                               data_dir=str(tmp_path / "d"), decode_processes=processes, **settings))


# with decoding processes the body goes into one of their segments; without (one core), into the service's own memory
@pytest.mark.parametrize("processes", [2, 0])
def test_a_lone_body_from_across_a_network_is_read_while_it_arrives(artifact, bodies, tmp_path, watched, processes):
    server = _server(artifact, tmp_path, processes)
    try:
        engine = Engine(artifact)
        for syntax, path in bodies.items():
            expected = engine.predict(path)
            decoder = "openjpeg" if syntax == JPEG2000Lossless else "lowpass"
            for pause_s, sends in ((0.004, 1), (0.0, 3)):  # a network's pace; memory speed (not worth it)
                watched["ahead"].clear(), watched["read"].clear()
                for _ in range(sends):
                    status, answer = send(server.url, server.key, path.read_bytes(), pause_s)
                    assert status == 200, answer
                    assert answer["probability"] == pytest.approx(expected.probability, abs=1e-6)
                    assert answer["decode"] == expected.meta.decode
                if pause_s:
                    assert watched["ahead"] == [True] and watched["read"] == [], syntax
                else:  # (a pause of this machine's in the sender's first reads can make one look slow)
                    assert len(watched["ahead"]) <= 1 and watched["read"].count(decoder) >= 2, syntax
    finally:
        server.stop()


def test_a_service_told_not_to_reads_nothing_ahead(artifact, bodies, tmp_path, watched):
    server = _server(artifact, tmp_path, decode_ahead=False)
    try:
        status, _ = send(server.url, server.key, bodies[JPEG2000Lossless].read_bytes(), 0.004)
        assert status == 200 and watched["ahead"] == [] and watched["read"] == ["openjpeg"]
    finally:
        server.stop()


@pytest.mark.parametrize("processes", [2, 0])
def test_a_sender_that_goes_away_halfway_leaves_nothing_waiting(artifact, bodies, tmp_path, watched, monkeypatch,
                                                                processes):
    """The read-ahead thread stops waiting for bytes when the body ends short, the segment goes back, and the next
    request (in the same segment) is scored as usual."""
    from medvision.serving.decode_ahead import DecodeAhead

    ended = []
    real_run = DecodeAhead._run
    monkeypatch.setattr(DecodeAhead, "_run", lambda self: (real_run(self), ended.append(time.monotonic())))
    server = _server(artifact, tmp_path, processes)
    try:
        body = bodies[ExplicitVRLittleEndian].read_bytes()
        gone = time.monotonic()
        send(server.url, server.key, body, 0.004, stop_at=len(body) // 2)
        deadline = time.monotonic() + 10
        while not ended and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ended and ended[0] - gone < 5  # not the 30 s a stalled sender is given
        assert watched["ahead"] == [False]
        status, answer = send(server.url, server.key, body, 0.004)
        assert status == 200 and answer["probability"] == pytest.approx(
            Engine(artifact).predict(bodies[ExplicitVRLittleEndian]).probability, abs=1e-6)
        assert watched["ahead"] == [False, True]
    finally:
        server.stop()


def test_arrival_waits_for_bytes_and_gives_up_when_none_will_come():
    buffer = bytearray(1000)
    arrival = Arrival(memoryview(buffer), wait_s=5)
    got = []
    waiter = threading.Thread(target=lambda: got.append(arrival(600)))
    waiter.start()
    arrival.advanced(300)
    time.sleep(0.05)
    assert not got  # still waiting: 300 of 600
    arrival.advanced(700)
    waiter.join(5)
    assert len(got[0]) == 700 and arrival.rest_s() is not None
    arrival.end()
    assert arrival(900) is None  # ended short of it: at once
    stalled = Arrival(memoryview(buffer), wait_s=0.1)
    start = time.monotonic()
    assert stalled(10) is None and time.monotonic() - start < 2  # a stalled sender: given up on


def test_a_body_too_large_to_keep_its_segment_is_answered_and_its_segment_let_go(artifact, bodies, tmp_path):
    """A segment over KEEP_MAX is unmapped and unlinked after its request: no view kept for reading ahead (one for
    every lone request, read ahead or not) may stand in the way, nor turn the answer into a 500."""
    from medvision.serving.decode_pool import KEEP_MAX

    ds = pydicom.dcmread(bodies[JPEG2000Lossless])
    ds.add_new((0xFFFC, 0xFFFC), "OB", b"\0" * (KEEP_MAX + 1024))  # trailing padding: a valid, giant file
    giant = tmp_path / "giant.dcm"
    ds.save_as(giant)
    server = _server(artifact, tmp_path)
    try:
        segments = server.server.config.app.state.decoder.segments
        for pause_s in (0.0, 0.0005):
            status, answer = send(server.url, server.key, giant.read_bytes(), pause_s)
            assert status == 200, answer
            assert answer["probability"] == pytest.approx(Engine(artifact).predict(giant).probability, abs=1e-6)
            assert segments.count == len(segments.free)  # the giant's segment is gone, not counted, not leaked
    finally:
        server.stop()
