"""A lone request's image read while its body is still arriving (``medvision.read_ahead``).

A full-field JPEG 2000 file of 6-9 MB takes 50-70 ms to arrive over a 1 Gb/s network, and its reduced decode needs
only its first tens of kilobytes; an uncompressed one's low-pass band can be computed strip by strip as its rows
come in. A request alone in the service (others would compete for the cores) gets a ``DecodeAhead`` before its body
is read: as the HTTP protocol writes the body it advances an ``Arrival``; once the first bytes are in, and only if
the rest is still ``REST_MIN_S`` or more away at the rate they came, a thread reads the image from them, waiting
for more as it needs them, and holds the pixels for the read of the whole file, which takes them only where they
come from the very input it would have decoded itself.

A body that arrives at memory speed (a sender on the same machine) is not read ahead: receiving it keeps the cores
busy, and a decode beside that only slows the receive down (measured: a full-field JPEG 2000 file received in 1.5
ms alone, in 4.8 ms beside its decode on two cores).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time

from starlette.concurrency import run_in_threadpool

from medvision.read_ahead import Ahead

WAIT_S = 30.0  # the longest a thread waits for more of a body (a stalled sender): then it gives up, nothing else
REST_MIN_S = 0.010  # read ahead only when the rest of the body will take at least this long to arrive. A full-field
# body from this machine, at memory speed, was estimated at 0.3-2.4 ms (medians, JPEG 2000 / uncompressed; past 10 ms
# in 0.2-5 % of requests, where the sender paused), one from across a 1 Gb/s network at 50-140 ms
RATE_OVER_S = 0.002  # the arrival rate is measured over this long before it decides (on a 1 Gb/s link: 250 kB)


class Arrival:
    """How much of a body being read into ``view`` has arrived. The event loop calls ``advanced`` as bytes are
    written and ``end`` when no more will be; a thread calls it (``arrival(n)``) to wait for ``n`` of them."""

    def __init__(self, view: memoryview, wait_s: float = WAIT_S) -> None:
        self.view, self.wait_s = view, wait_s
        self.at, self.over, self.wanted = 0, False, 1 << 62  # wanted: what a waiting thread waits for (none yet)
        self.stopped = False  # nothing more is wanted: every wait answers None
        self.event = threading.Event()
        self.base, self.since = 0, 0.0  # the bytes in at the first ``advanced`` (come before it was asked), and when

    def rest_s(self) -> float | None:
        """How long the rest of the body will take to arrive, at the rate it has come since the first ``advanced``
        (None: no byte since, no rate yet)."""
        at, size = self.at, len(self.view)
        if at >= size:
            return 0.0
        return None if at == self.base else (size - at) * (time.perf_counter() - self.since) / (at - self.base)

    def advanced(self, at: int) -> None:
        if not self.since:
            self.base, self.since = at, time.perf_counter()
        self.at = at
        if at >= self.wanted:
            self.event.set()

    def end(self) -> None:
        self.over = True
        self.event.set()

    def __call__(self, n: int) -> memoryview | None:
        """The bytes arrived so far once at least ``n`` have, or None if the body ends (or stalls) before."""
        self.wanted = n
        if self.stopped:
            return None
        while self.at < n:
            if self.over:
                return None
            self.event.clear()
            if self.at >= n or self.over:  # (advanced or ended between the checks and the clear)
                continue
            if not self.event.wait(self.wait_s):
                return None
        self.wanted = 1 << 62
        return self.view[:self.at]


class DecodeAhead:
    """Reads, in a thread, a request body's image while the body arrives (``engine.decode_ahead``). ``advanced`` is
    the body's progress (on the event loop). ``RATE_OVER_S`` after the bytes that waited in the socket are in (the
    first read), a timer decides: if the rest is still ``REST_MIN_S`` or more away at the rate the bytes came since,
    the thread starts; else nothing is done, and a read costs a comparison and two attributes."""

    def __init__(self, engine, view: memoryview) -> None:
        self.engine, self.arrival = engine, Arrival(view)
        self.done: concurrent.futures.Future[Ahead | None] = concurrent.futures.Future()
        self.lock = threading.Lock()
        self.started = self.skipped = self.decided = False
        self.task: asyncio.Future | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.reads = 0

    def advanced(self, at: int) -> None:
        if self.task is not None:
            self.arrival.advanced(at)  # the thread may be waiting for these bytes
        elif not self.decided:
            self.arrival.at = at
            self.reads += 1
            if self.reads == 2:  # what waited in the socket before the body was asked for is in: the rate from here
                self.arrival.base, self.arrival.since = at, time.perf_counter()
                self.timer = asyncio.get_running_loop().call_later(RATE_OVER_S, self._decide)

    def _decide(self) -> None:
        self.decided = True
        rest = self.arrival.rest_s()
        if not self.arrival.over and (rest is None or rest >= REST_MIN_S):  # (None: nothing more came meanwhile)
            self.task = asyncio.ensure_future(run_in_threadpool(self._run))

    def _run(self) -> None:
        with self.lock:
            if self.skipped:
                return
            self.started = True
        try:
            self.done.set_result(self.engine.decode_ahead(self.arrival, len(self.arrival.view)))
        except BaseException:
            self.done.set_result(None)
            raise

    def __call__(self) -> Ahead | None:
        """What was decoded ahead, once it is (``read_dicom``'s ``ahead``); None at once if the thread has not
        started (then it never will)."""
        with self.lock:
            if not self.started:
                self.skipped = True
                return None
        return self.done.result()

    async def close(self) -> None:
        """Ends the wait for bytes, and waits for the thread (cancelled meanwhile, it may still be reading the
        body's buffer: ``running`` says so)."""
        self.arrival.end()
        if self.timer is not None:
            self.timer.cancel()
        with self.lock:
            self.skipped = True
        if self.task is not None:
            try:
                await asyncio.shield(self.task)
            except asyncio.CancelledError:
                raise  # (the thread may still read the view: kept)
            except Exception:  # (decode_ahead answers None rather than raise: nothing of it reaches a request)
                pass
        self.arrival.view = None  # no view of the segment outlives its request (one that is let go must unmap)

    def stop(self) -> None:
        """Whatever is being read ahead will not be used (the request went to a decoding worker): the thread stops
        at its next wait for bytes or strip, or never starts."""
        self.arrival.stopped = True
        self.arrival.end()
        with self.lock:
            self.skipped = True

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done()
