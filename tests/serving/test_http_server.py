"""The service's HTTP protocol (uvicorn's, passing request bodies on in their chunks): every body arrives whole and
in order, however it is framed, on a real uvicorn server on a loopback port, exactly as with uvicorn's own."""

import asyncio
import hashlib
import socket
import threading
import time
from contextlib import contextmanager

import httpx
import pytest
import uvicorn

from medvision.serving.http_server import BODY_INTO, _Chunks, chunked_body_protocol, uvicorn_options
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


@contextmanager
def _running(app, http, loop="auto", **options):
    """``app`` under a real uvicorn on a loopback port, in a thread: (url, server)."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", http=http, loop=loop,
                                           **options))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}", server
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(params=["chunked-body", "uvicorn's own"], scope="module")
def server(request):
    with _running(_digest_app, chunked_body_protocol() if request.param == "chunked-body" else "httptools") as started:
        yield started


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
    _pipelined(server[0], last=b" 1")


def _pipelined(url: str, last: bytes) -> None:
    """Two requests written back to back on one connection before either is answered (the second answer ends with
    ``last``): each answer names its own body's digest."""
    host, port = url.removeprefix("http://").split(":")
    first, second = b"a" * 300_000, b"b" * 5
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"".join(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(b) + b
                           for b in (first, second)))
        answers = b""
        while answers.count(b"HTTP/1.1 200") < 2 or not answers.rstrip().endswith(last):
            chunk = s.recv(65536)
            assert chunk, answers
            answers += chunk
    assert hashlib.sha256(first).hexdigest().encode() in answers
    assert hashlib.sha256(second).hexdigest().encode() in answers


def test_the_service_runs_on_the_chunked_protocol(server):
    """``medvision serve`` and the tests' live servers take their options from ``uvicorn_options``."""
    options = uvicorn_options(Settings())
    assert options["http"] is not None and options["http"].__name__ == "BodyIntoProtocol"
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


async def _fill_app(scope, receive, send) -> None:
    """Reads the body the service's way: ``fill`` into a buffer of its Content-Length (after ``?wait=`` seconds, so
    that part of it is already buffered), then ``receive()``. Answers the buffer's SHA-256, the bytes written, and
    what ``receive()`` said afterwards."""
    if scope["type"] != "http":
        return
    fill = scope["extensions"][BODY_INTO]
    size = int(next(v for k, v in scope["headers"] if k == b"content-length"))
    query = dict(p.split(b"=") for p in scope["query_string"].split(b"&") if p)
    if b"wait" in query:
        await asyncio.sleep(float(query[b"wait"]))
    if b"peek" in query:  # something took the body's first chunk through receive() before fill (a middleware)
        await receive()
    buffer = bytearray(size - int(query.get(b"short", b"0")))
    try:
        written = await asyncio.wait_for(fill(buffer), float(query.get(b"give_up", b"60")))
    except ValueError as exc:
        body, status = str(exc).encode(), 400
    except TimeoutError:  # the reader cancelled mid-body: what is left of it must not become the next request
        body, status = b"gave up", 408
    else:
        after = await receive()
        body, status = f"{hashlib.sha256(buffer).hexdigest()} {written} {after['type']} {after.get('more_body')} " \
                       f"{len(after.get('body', b''))}".encode(), 200
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


READ_DIRECT = {"bytes": 0}  # body bytes the socket read put straight into the app's buffer, past the parser


@pytest.fixture(scope="module", params=["uvloop", "asyncio"])  # each event loop reads into a buffer its own way
def fill_server(request):
    class Counting(chunked_body_protocol()):  # the service's protocol, counting what it reads past the parser
        def buffer_updated(self, nbytes: int) -> None:
            if self.http.direct is not None:
                READ_DIRECT["bytes"] += nbytes
            super().buffer_updated(nbytes)

    with _running(_fill_app, Counting, loop=request.param, timeout_keep_alive=1) as (url, _):
        yield url


@pytest.mark.parametrize("name", ["one byte", "odd", "full-field"])
@pytest.mark.parametrize("wait", [0, 0.3])
def test_a_body_filled_into_a_buffer_arrives_whole(fill_server, name, wait):
    """Written into the app's buffer as it comes off the socket (part of it already buffered when the app asks,
    with ``wait``); ``receive()`` then says the body is over, and the kept-alive connection serves the next request."""
    body = _bodies()[name]
    with httpx.Client(timeout=60) as client:
        for _ in range(2):
            before = READ_DIRECT["bytes"]
            r = client.post(f"{fill_server}/?wait={wait}", content=body)
            digest, written, kind, more, rest = r.text.split()
            assert r.status_code == 200 and digest == hashlib.sha256(body).hexdigest() and int(written) == len(body)
            assert (kind, more, rest) == ("http.request", "False", "0")
            if name == "full-field":  # all but what came before the app asked (a socket read or two) came direct
                assert READ_DIRECT["bytes"] - before > len(body) - (2 << 20)


def test_a_body_read_direct_is_followed_by_the_next_request_on_the_connection(fill_server):
    """A body read past the parser ends where its Content-Length says: a request written right behind it (in the
    same packets) is parsed as a request of its own, and so is a third after it."""
    host, port = fill_server.removeprefix("http://").split(":")
    first = bytes(range(256)) * 20_000  # 5 MB: read direct after the first socket reads
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(first) + first
                  + b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nnext"
                  + b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nthird")
        answers = b""
        while answers.count(b"HTTP/1.1 200") < 3 or not answers.rstrip().endswith(b" 0"):
            chunk = s.recv(65536)
            assert chunk, answers
            answers += chunk
    for body in (first, b"next", b"third"):
        assert hashlib.sha256(body).hexdigest().encode() in answers


def _answers(s: socket.socket, done) -> bytes:
    """What the server sends on ``s`` until ``done(answers)`` (or it closes the connection)."""
    answers = b""
    while not done(answers):
        chunk = s.recv(65536)
        if not chunk:
            break
        answers += chunk
    return answers


def test_a_body_partly_taken_by_receive_is_never_read_past_its_end(fill_server):
    """Part of the body was taken through receive() before fill (as a middleware peeking at it would): fill gets the
    rest, framed by the parser, and a request behind it, whose body carries a request of its own, stays one request."""
    host, port = fill_server.removeprefix("http://").split(":")
    size, peeked = 2_000_000, 50_000
    inner = b"POST /smuggled HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nsmuggled!!"
    second = b"p" * 49_900 + inner + b"q" * 10_000
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"POST /?wait=0.4&peek=1 HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size + b"a" * peeked)
        time.sleep(1.0)  # the first chunk is parsed (and taken) before the rest arrives
        s.sendall(b"a" * (size - peeked) + b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(second)
                  + second)
        answers = _answers(s, lambda a: a.count(b"HTTP/1.1 ") >= 2 and a.rstrip().endswith(b" 0"))
    assert answers.count(b"HTTP/1.1 200") == 2, answers
    assert b" %d " % (size - peeked) in answers  # fill wrote the rest of the first body, no byte more
    assert hashlib.sha256(second).hexdigest().encode() in answers  # the second request had its whole body


def test_nothing_after_a_body_that_closes_the_connection_is_parsed(fill_server):
    """HTTP/1.1 with ``Connection: close``: the body is read past the parser, and what the client sends after it
    (here an upgrade request) is ignored, as uvicorn's parser ignores it; the answer to the body arrives."""
    host, port = fill_server.removeprefix("http://").split(":")
    body = b"c" * 2_000_000
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"POST /?wait=0.2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: %d\r\n\r\n"
                  % len(body) + body[:1000])
        time.sleep(0.5)
        s.sendall(body[1000:] + b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                  b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        answers = _answers(s, lambda a: False)  # until the server closes the connection
    assert answers.startswith(b"HTTP/1.1 200") and answers.count(b"HTTP/1.1 ") == 1, answers
    assert hashlib.sha256(body).hexdigest().encode() in answers


def test_a_reader_cancelled_mid_body_leaves_the_connection_framed(fill_server):
    """The app gives up on a body half read past the parser (its task's wait timed out): the rest of that body is
    read and dropped, never parsed as a request, and the next request on the connection is answered."""
    host, port = fill_server.removeprefix("http://").split(":")
    body = b"r" * 3_000_000
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"POST /?give_up=0.3 HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
                  + body[:2_000_000])
        answer = b""
        while b"gave up" not in answer:
            chunk = s.recv(65536)
            assert chunk, answer
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 408")
        rest = body[2_000_000:]
        for k in range(4):  # the rest trickles in over longer than the keep-alive timeout (1 s here): still live
            s.sendall(rest[k * len(rest) // 4:(k + 1) * len(rest) // 4])
            time.sleep(0.6)
        s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nafter")
        answer = b""
        while not answer.rstrip().endswith(b" 0"):
            chunk = s.recv(65536)
            assert chunk, answer
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200") and hashlib.sha256(b"after").hexdigest().encode() in answer


def test_a_body_longer_than_the_buffer_is_refused_and_the_connection_goes_on(fill_server):
    body = _bodies()["full-field"]
    with httpx.Client(timeout=60) as client:
        r = client.post(f"{fill_server}/?short=10", content=body)
        assert r.status_code == 400 and "runs 10 bytes past" in r.text
        r = client.post(fill_server, content=b"after")
        assert r.status_code == 200 and r.text.split()[:2] == [hashlib.sha256(b"after").hexdigest(), "5"]


def test_fill_answers_expect_100_continue(fill_server):
    """curl sends ``Expect: 100-continue`` before a large body and waits for the go-ahead: fill gives it, as
    ``receive()`` does."""
    host, port = fill_server.removeprefix("http://").split(":")
    body = b"z" * 2_000_000
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body))
        assert s.recv(1024).startswith(b"HTTP/1.1 100 Continue")
        s.sendall(body)
        answer = b""
        while not answer.rstrip().endswith(b" 0"):
            chunk = s.recv(65536)
            assert chunk, answer
            answer += chunk
    assert b"HTTP/1.1 200" in answer and hashlib.sha256(body).hexdigest().encode() in answer


def test_a_client_gone_mid_body_ends_fill_and_the_server_goes_on(fill_server):
    host, port = fill_server.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5000000\r\n\r\n" + b"q" * 1_000_000)
        time.sleep(0.2)
    with httpx.Client(timeout=30) as client:  # the server did not hang on the half-read body
        assert client.post(fill_server, content=b"next").status_code == 200


def test_pipelined_requests_fill_their_own_buffers(fill_server):
    _pipelined(fill_server, last=b" 0")
