"""The service's HTTP protocol (uvicorn's, passing request bodies on in their chunks): every body arrives whole and
in order, however it is framed, on a real uvicorn server on a loopback port, exactly as with uvicorn's own."""

import hashlib
import socket
import threading
import time

import httpx
import pytest
import uvicorn

from medvision.serving.http_server import _Chunks, chunked_body_protocol, uvicorn_options
from medvision.serving.settings import Settings


async def _digest_app(scope, receive, send) -> None:
    """Answers the body's SHA-256, its length and how many ``receive()`` calls brought it."""
    if scope["type"] != "http":
        return
    digest, size, calls = hashlib.sha256(), 0, 0
    while True:
        message = await receive()
        assert message["type"] == "http.request" and type(message["body"]) is bytes
        digest.update(message["body"])
        size += len(message["body"])
        calls += 1
        if not message.get("more_body"):
            break
    body = f"{digest.hexdigest()} {size} {calls}".encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture(params=["chunked-body", "uvicorn's own"], scope="module")
def server(request):
    http = chunked_body_protocol() if request.param == "chunked-body" else "httptools"
    server = uvicorn.Server(uvicorn.Config(_digest_app, host="127.0.0.1", port=0, log_level="warning", http=http))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}", server
    server.should_exit = True
    thread.join(10)


def _bodies():
    big = bytes(range(256)) * (17 * 4096 + 7)  # ~17.8 MB: a full-field image, many chunks
    return {"empty": b"", "one byte": b"\x00", "odd": b"DICM" * 12345 + b"!", "full-field": big}


@pytest.mark.parametrize("name", list(_bodies()))
def test_every_body_arrives_whole(server, name):
    url, _ = server
    body = _bodies()[name]
    with httpx.Client(timeout=60) as client:
        for _ in range(2):  # twice on one kept-alive connection: nothing of the first is left for the second
            r = client.post(url, content=body)
            digest, size, calls = r.text.split()
            assert r.status_code == 200 and digest == hashlib.sha256(body).hexdigest() and int(size) == len(body)
    if name == "full-field":
        assert int(calls) > 1  # the body came in many receive() calls: the chunked path was the one taken


def test_a_chunked_transfer_encoding_body_arrives_whole(server):
    url, _ = server
    parts = [b"x" * 70_000, b"", b"y" * 3, bytes(range(256)) * 4000]

    def stream():
        yield from (p for p in parts if p)

    with httpx.Client(timeout=60) as client:
        r = client.post(url, content=stream())
    assert r.text.split()[:2] == [hashlib.sha256(b"".join(parts)).hexdigest(), str(sum(map(len, parts)))]


def test_pipelined_requests_keep_their_own_bodies(server):
    """Two requests written back to back before either is answered: each body goes to its own request."""
    url, _ = server
    host, port = url.removeprefix("http://").split(":")
    first, second = b"a" * 300_000, b"b" * 5
    with socket.create_connection((host, int(port)), timeout=30) as s:
        for body in (first, second):
            s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        answers = b""
        while answers.count(b"HTTP/1.1 200") < 2 or not answers.rstrip().endswith(b" 1"):
            chunk = s.recv(65536)
            assert chunk, answers
            answers += chunk
    assert hashlib.sha256(first).hexdigest().encode() in answers
    assert hashlib.sha256(second).hexdigest().encode() in answers


def test_the_service_runs_on_the_chunked_protocol(server):
    """``medvision serve`` and the tests' live servers take their options from ``uvicorn_options``."""
    options = uvicorn_options(Settings())
    assert options["http"] is not None and options["http"].__name__ == "ChunkedBodyProtocol"
    assert options["access_log"] is False and options["proxy_headers"] is True


def test_the_chunk_list_is_what_uvicorn_uses_of_a_bytearray():
    body = _Chunks()
    assert not body and len(body) == 0 and bytes(body) == b""
    one = bytes(range(256)) * 64  # 16 kB, as httptools hands on a read of a large body
    body += one
    assert body and len(body) == len(one) and bytes(body) is one  # one chunk: handed on, not copied
    body += b"de"
    assert len(body) == len(one) + 2 and bytes(body) == one + b"de"


def test_a_body_in_tiny_chunks_is_gathered_not_kept_as_an_object_per_chunk():
    """2-byte chunks (chunked transfer-encoding can send them) are copied into one buffer, as uvicorn copies every
    chunk: a slow app never holds an object per two bytes of a body."""
    body = _Chunks()
    for _ in range(10_000):
        body += b"XY"
    assert len(body.chunks) == 1 and len(body) == 20_000 and bytes(body) == b"XY" * 10_000
