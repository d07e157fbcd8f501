"""How the service runs under uvicorn: its options, and the HTTP protocol it uses.

A request body reaches the app in the chunks httptools parsed it into. uvicorn's own httptools protocol appends
each chunk to a ``bytearray`` and copies that out again for every ``receive()``: two copies of every byte, which
on a 17 MB full-field image are a measurable share of the service's own work (benchmarks/fullfield.py).
``ChunkedBodyProtocol`` keeps uvicorn's protocol and only changes the container: the chunks are kept as they came
and handed on as they are (a ``receive()`` that finds one chunk returns that very object; several are joined, as
before). Everything else, flow control included, is uvicorn's code. Where uvicorn's internals are not the ones
this was written against (the body container is not a ``bytearray``, or ``receive()`` does not hand it on through
``bytes()``), the protocol steps aside and uvicorn's own runs.
"""

from __future__ import annotations

import inspect
from typing import Any

SMALL_CHUNK = 4096  # chunks below this are gathered into one bytearray: a body sent in tiny chunks costs no object each


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


def chunked_body_protocol() -> type | None:
    """uvicorn's httptools protocol, passing request bodies on in their chunks; None without httptools."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
    except ImportError:  # uvicorn without its [standard] extras: its pure-Python protocol, unchanged
        return None
    try:  # the body reaches the app through bytes(): anything else and the chunk list would reach it as it is
        handed_as_bytes = "bytes(self.body)" in inspect.getsource(RequestResponseCycle.receive)
    except (OSError, TypeError):
        handed_as_bytes = False
    if not handed_as_bytes:
        return None

    class ChunkedBodyProtocol(HttpToolsProtocol):
        def on_body(self, body: bytes) -> None:
            cycle = self.cycle
            # uvicorn starts every request, and every receive(), with an empty bytearray: swap in the chunk list
            if type(cycle.body) is bytearray and not cycle.body:
                cycle.body = _Chunks()
            super().on_body(body)

    return ChunkedBodyProtocol


def uvicorn_options(settings) -> dict[str, Any]:
    """The options ``medvision serve`` (and every test that runs the real service) gives ``uvicorn.Config``."""
    protocol = chunked_body_protocol()
    return {"host": settings.host, "port": settings.port, "log_level": settings.log_level,
            "access_log": False,  # our middleware logs, without query strings
            "proxy_headers": True, "forwarded_allow_ips": settings.forwarded_allow_ips,
            **({"http": protocol} if protocol is not None else {})}
