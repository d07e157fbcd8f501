"""How the service runs under uvicorn: its options, and the HTTP protocol it uses.

A request body reaches the app in the chunks httptools parsed it into. uvicorn's own httptools protocol appends
each chunk to a ``bytearray`` and copies that out again for every ``receive()``: two copies of every byte, which
on a 17 MB full-field image are a measurable share of the service's own work (benchmarks/fullfield.py).
``ChunkedBodyProtocol`` keeps uvicorn's protocol and only changes the container: the chunks are kept as they came
and handed on as they are (a ``receive()`` that finds one chunk returns that very object; several are joined, as
before). Everything else, flow control included, is uvicorn's code. Where uvicorn's internals are not the ones
this was written against (the body container is not a ``bytearray``, or ``receive()`` does not hand it on through
``bytes()``), the protocol steps aside and uvicorn's own runs.

It also offers the app one extension (``scope["extensions"][BODY_INTO]``): ``await fill(buffer)`` writes the rest
of a request's body straight into ``buffer`` as it comes off the socket (a decoding worker's shared segment), in
place of the ``receive()`` round trip per chunk, each pausing and resuming the socket at uvicorn's 64 kB
high-water mark, and a copy per chunk in the app. The body's framing stays uvicorn's (httptools holds it to its
Content-Length); ``receive()`` afterwards says the body is over, as it would have.

Where the buffer is exactly the body's declared Content-Length, the rest of the body does not pass through Python
at all: ``BodyIntoProtocol`` is the transport's protocol, a ``BufferedProtocol`` that reads the socket into a reused
buffer and feeds uvicorn's protocol from it (one copy fewer than a plain protocol's ``bytes`` per read), and that,
while a buffer is being filled, hands the event loop the buffer's unwritten part to read the socket into: the
kernel writes the body where the decoder reads it, never more than the body's remaining bytes (a pipelined request
behind it stays in the socket). At the body's end uvicorn's protocol gets a fresh parser (the old one was left
inside a body it never saw the end of) and the message is completed as httptools would have completed it.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import weakref
from typing import Any

BODY_INTO = "medvision.body_into"
SMALL_CHUNK = 4096  # chunks below this are gathered into one bytearray: a body sent in tiny chunks costs no object each
READ_SIZE = 256 * 1024  # what one socket read takes at most outside a body being filled (uvloop's own read size)
_reads = threading.local()  # one read buffer per event loop's thread, as uvloop keeps one per loop: a read is
# handed to the parser, which copies out what it keeps, before the loop reads any other socket


def _read_buffer() -> memoryview:
    buffer = getattr(_reads, "buffer", None)
    if buffer is None:
        buffer = _reads.buffer = memoryview(bytearray(READ_SIZE))
    return buffer


class _Chunks:
    """What uvicorn's cycle uses of its ``bytearray`` body: ``+=``, ``len()`` and ``bytes()``, without copying a
    large chunk (small ones are copied together, as uvicorn copies every chunk)."""

    __slots__ = ("chunks", "size")

    def __init__(self) -> None:
        self.chunks: list[bytes | bytearray] = []
        self.size = 0

    def __iadd__(self, chunk: bytes) -> _Chunks:
        if len(chunk) >= SMALL_CHUNK:
            self.chunks.append(chunk)
        elif self.chunks and type(self.chunks[-1]) is bytearray:
            self.chunks[-1] += chunk
        else:
            self.chunks.append(bytearray(chunk))
        self.size += len(chunk)
        return self

    def __len__(self) -> int:
        return self.size

    def __bool__(self) -> bool:
        return self.size > 0

    def __bytes__(self) -> bytes:
        if len(self.chunks) == 1 and type(self.chunks[0]) is bytes:
            return self.chunks[0]
        return b"".join(self.chunks)


class _Sink:
    """The body container while the app fills a buffer: each chunk is copied to where it belongs, none is kept.
    Bytes past the buffer's end (a buffer shorter than the body) are counted, not written. ``progress``, if any, is
    told how many bytes are in the buffer each time more are."""

    __slots__ = ("view", "at", "over", "progress")

    def __init__(self, view: memoryview, progress=None) -> None:
        self.view, self.at, self.over, self.progress = view, 0, 0, progress

    def write(self, chunk) -> None:
        n = min(len(chunk), len(self.view) - self.at)
        self.view[self.at:self.at + n] = chunk[:n] if n < len(chunk) else chunk
        self.at += n
        self.over += len(chunk) - n
        if n and self.progress is not None:
            self.progress(self.at)

    @property
    def full(self) -> bool:
        return self.at == len(self.view)


def _declared_length(scope) -> int | None:
    """The request's Content-Length when it is its only framing (one header, digits, no Transfer-Encoding)."""
    lengths = [v for k, v in scope["headers"] if k == b"content-length"]
    if len(lengths) != 1 or not lengths[0].isdigit() or any(k == b"transfer-encoding" for k, _ in scope["headers"]):
        return None
    return int(lengths[0])


def _filler(cycle, protocol):
    """``fill(buffer, progress=None) -> bytes written``: the rest of ``cycle``'s body into ``buffer`` (the body's
    Content-Length long). Returns at the body's end, or with fewer bytes when the client disconnects; a body longer
    than the buffer is read to its end and refused (ValueError). ``progress(n)`` is called, on the event loop, each
    time the buffer's first ``n`` bytes are in. It holds its cycle and protocol weakly: the cycle holds the scope
    that holds it."""
    ref, protocol_ref = weakref.ref(cycle), weakref.ref(protocol)

    async def fill(buffer, progress=None) -> int:
        cycle, protocol = ref(), protocol_ref()
        if cycle is None or protocol is None:
            raise RuntimeError("this request is over: its body can no longer be read")
        view = memoryview(buffer).cast("B")
        if cycle.waiting_for_100_continue and not cycle.transport.is_closing():  # as receive() does it
            cycle.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            cycle.waiting_for_100_continue = False
        pending = cycle.body  # what came before the app asked: chunks, or uvicorn's bytearray
        if type(pending) is _Sink:
            raise RuntimeError("this request's body is already being read into a buffer")
        sink = _Sink(view)
        for chunk in (pending.chunks if type(pending) is _Chunks else [pending]):
            sink.write(chunk)
        sink.progress = progress
        if progress is not None and sink.at:
            progress(sink.at)  # what came before the app asked: one report, not one a chunk
        cycle.body = sink
        # the rest is read from the socket straight into the buffer only when it is exactly the body's rest: every
        # body byte parsed so far is in the sink (none taken by an earlier receive(), none dropped by uvicorn) and
        # the buffer is the declared length; else the parser keeps framing it and on_body writes it here
        if (protocol.reads_direct and protocol.cycle is cycle and cycle.more_body and not sink.full
                and not sink.over and protocol.parsed == sink.at and _declared_length(cycle.scope) == len(view)):
            protocol.direct = sink
        try:
            while cycle.more_body and not cycle.disconnected and not cycle.response_complete:
                cycle.message_event.clear()
                cycle.flow.resume_reading()
                await cycle.message_event.wait()
        finally:
            if protocol.direct is sink:  # left inside the body (cancelled): the parser never saw what was read, so
                protocol.direct = None  # the rest is read and dropped past it too, and the message ends there
                protocol.skip = 0 if cycle.disconnected else len(view) - sink.at
            cycle.body = bytearray()
            if not cycle.more_body or cycle.disconnected or cycle.response_complete:
                cycle.message_event.set()  # receive() must find the end (or the disconnect) without waiting
        if sink.over:
            raise ValueError(f"the request body runs {sink.over:,} bytes past the {len(view):,}-byte buffer given")
        return sink.at

    return fill


def chunked_body_protocol() -> type | None:
    """uvicorn's httptools protocol, passing request bodies on in their chunks; None without httptools."""
    try:
        import httptools
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
    except ImportError:  # uvicorn without its [standard] extras: its pure-Python protocol, unchanged
        return None
    try:  # the body reaches the app through bytes(): anything else and the chunk list would reach it as it is
        handed_as_bytes = "bytes(self.body)" in inspect.getsource(RequestResponseCycle.receive)
    except (OSError, TypeError):
        handed_as_bytes = False
    if not handed_as_bytes:
        return None
    try:  # what fill() uses of a cycle, as uvicorn sets it up (else the app reads the body through receive())
        setup = inspect.getsource(RequestResponseCycle.__init__)
        can_fill = all(f"self.{name} =" in setup for name in (
            "flow", "transport", "message_event", "waiting_for_100_continue", "body", "more_body", "disconnected",
            "response_complete"))
        # reading a body past the parser: uvicorn's protocol keeps its parser where a fresh one can replace it, and
        # hands data_received's argument to nothing but the parser
        protocol_setup = inspect.getsource(HttpToolsProtocol.__init__)
        received = inspect.getsource(HttpToolsProtocol.data_received)
        reads_direct = can_fill and "self.parser = httptools.HttpRequestParser(self)" in protocol_setup and \
            "self.parser.feed_data(data)" in received and "self._unset_keepalive_if_required()" in received and \
            "keep_alive=" in inspect.getsource(HttpToolsProtocol.on_headers_complete)
    except (OSError, TypeError):
        can_fill = reads_direct = False

    class ChunkedBodyProtocol(HttpToolsProtocol):
        direct: _Sink | None = None  # the buffer the rest of this request's body is read into, past the parser
        skip = 0  # bytes of a body left unread in ``direct`` (its reader was cancelled): read and dropped
        closed = False  # a message that ends the connection was read past the parser: what follows is ignored
        reads_direct = False  # True under BodyIntoProtocol, which reads the socket into ``direct``
        parsed = 0  # body bytes the parser has handed on for the newest request (``cycle``)

        def on_headers_complete(self) -> None:
            super().on_headers_complete()
            cycle = self.cycle
            if cycle is not None and cycle.scope is self.scope:  # a new request (not an upgrade)
                self.parsed = 0
                if can_fill:
                    self.scope.setdefault("extensions", {})[BODY_INTO] = _filler(cycle, self)

        def body_read(self) -> None:
            """The body read into ``direct`` is whole: the message ends here, and the next request on the
            connection starts with a parser of its own (this one was left inside a body it never saw the end of)."""
            self.direct, self.skip = None, 0
            self.parser = httptools.HttpRequestParser(self)
            try:
                self.parser.set_dangerous_leniencies(lenient_data_after_close=True)  # as uvicorn sets its own
            except AttributeError:
                pass
            # uvicorn's parser ignores whatever follows a message that closes the connection (HTTP/1.0, Connection:
            # close); the fresh one would parse it as a request: it is dropped here instead
            self.closed = not self.cycle.keep_alive
            self.on_message_complete()

        def on_body(self, body: bytes) -> None:
            self.parsed += len(body)  # every byte the parser frames as this request's body, kept or not
            cycle = self.cycle
            if cycle is not None and type(cycle.body) is _Sink:  # the app is filling a buffer: straight there
                # (no pause, no wake-up per chunk); only its own request's bytes: once its message is complete,
                # body bytes here belong to a request that gets no cycle (an upgrade), which uvicorn drops too
                if cycle.more_body and not cycle.response_complete:
                    cycle.body.write(body)
                    if cycle.body.full:
                        cycle.message_event.set()  # (its end: on_message_complete follows in the same feed)
                return
            # uvicorn starts every request, and every receive(), with an empty bytearray: swap in the chunk list
            if cycle is not None and type(cycle.body) is bytearray and not cycle.body:
                cycle.body = _Chunks()
            super().on_body(body)

    if not reads_direct:
        return ChunkedBodyProtocol

    class BodyIntoProtocol(asyncio.BufferedProtocol):
        """The transport's protocol: reads the socket into a reused buffer and feeds ``ChunkedBodyProtocol`` from it,
        or, while a body is read into an app's buffer, into that buffer (see the module's docstring). uvloop reads
        into a buffer only for a protocol that is not an ``asyncio.Protocol``, hence a wrapper, not a subclass."""

        def __init__(self, *args, **kwargs) -> None:
            self.http = ChunkedBodyProtocol(*args, **kwargs)
            self.http.reads_direct = True
            self.buffer = _read_buffer()

        def get_buffer(self, sizehint: int) -> memoryview:
            http = self.http
            if http.direct is not None:
                return http.direct.view[http.direct.at:]  # never past the body's end
            return self.buffer[:http.skip] if 0 < http.skip < READ_SIZE else self.buffer

        def buffer_updated(self, nbytes: int) -> None:
            http = self.http
            sink = http.direct
            if sink is not None:
                sink.at += nbytes
                if sink.progress is not None:
                    sink.progress(sink.at)
                if sink.full:
                    http.body_read()
            elif http.skip:
                http._unset_keepalive_if_required()  # data is arriving: the connection is not idle (as uvicorn's)
                http.skip -= nbytes
                if not http.skip:
                    http.body_read()
            elif not http.closed:
                http.data_received(self.buffer[:nbytes])

        def connection_made(self, transport) -> None:
            self.http.connection_made(transport)

        def connection_lost(self, exc) -> None:
            self.http.direct, self.http.skip = None, 0
            self.http.connection_lost(exc)

        def eof_received(self):
            return self.http.eof_received()

        def pause_writing(self) -> None:
            self.http.pause_writing()

        def resume_writing(self) -> None:
            self.http.resume_writing()

    return BodyIntoProtocol


def uvicorn_options(settings) -> dict[str, Any]:
    """The options ``medvision serve`` (and every test that runs the real service) gives ``uvicorn.Config``."""
    protocol = chunked_body_protocol()
    return {"host": settings.host, "port": settings.port, "log_level": settings.log_level,
            "access_log": False,  # our middleware logs, without query strings
            "proxy_headers": True, "forwarded_allow_ips": settings.forwarded_allow_ips,
            **({"http": protocol} if protocol is not None else {})}
