"""Dynamic micro-batching: concurrent requests are scored together in one ONNX Runtime call.

Requests wait at most ``max_wait_ms`` for company, up to ``max_batch`` images per call, and only while
other requests are on their way (being decoded, announced by ``incoming()``): a lone request runs at
once, so batching costs no latency at low load. A request that finds nothing queued, decoding or running is
scored in the thread that decoded it (``run_alone``): the batch would be that one image anyway, and it saves two
thread hops. Model calls run one at a time (batches must not fight each other for the cores). The queue is
bounded: when it is full a request is refused at once with 429 and a Retry-After estimate instead of
piling up, and a request that waits longer than its timeout gets 503, never a hung connection.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np

from medvision.errors import MedvisionError


class Overloaded(MedvisionError):
    code = "overloaded"

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class TimedOut(MedvisionError):
    code = "timeout"


class Batcher:
    def __init__(self, run, max_batch: int = 8, max_wait_ms: float = 5.0, max_queue: int = 64,
                 timeout_s: float = 60.0, metrics=None) -> None:
        self.run = run
        self.max_batch = max(1, max_batch)
        self.max_wait = max_wait_ms / 1000
        self.max_queue = max_queue
        self.timeout = timeout_s
        self.metrics = metrics
        self.queue: asyncio.Queue | None = None
        self.task: asyncio.Task | None = None
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="medvision-infer")
        self.slot = threading.Lock()  # held during every model call, batched or alone
        self.seconds_per_image = 0.01  # running estimate, for Retry-After
        self.pending = 0  # requests decoding now, whose images will arrive shortly

    @contextmanager
    def incoming(self):
        """Wrap the receiving and decoding of a request that will ``submit``: the batcher waits for it if it can."""
        self.pending += 1
        try:
            yield
        finally:
            self.pending -= 1

    async def start(self) -> None:
        self.queue = asyncio.Queue()
        self.task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self.task:
            self.task.cancel()
            try:
                await self.task
            except asyncio.CancelledError:
                pass
        self.pool.shutdown(wait=True)

    def alone(self) -> bool:
        """True when the caller (inside ``incoming()``) is the only request about: nothing else decoding, queued or
        being scored. Such a request decodes in its own thread: a hop to a worker process would only add latency."""
        return self.pending <= 1 and not self.queue.qsize() and not self.slot.locked()

    def run_alone(self, x: np.ndarray) -> tuple[float, float, int] | None:
        """Called inside ``incoming()`` from the thread that decoded ``x``: score it now if it is the only request
        about (nothing queued, no other decoding, no model call running) and return what ``submit`` would; else
        None, and the caller submits it."""
        if self.pending > 1 or self.queue.qsize() or not self.slot.acquire(blocking=False):
            return None
        try:
            start = time.perf_counter()
            prob = float(self.run(x[None])[0])
        finally:
            self.slot.release()
        return prob, self._ran(1, time.perf_counter() - start), 1

    def _ran(self, n: int, seconds: float) -> float:
        self.seconds_per_image = 0.8 * self.seconds_per_image + 0.2 * seconds / n
        if self.metrics:
            self.metrics.batch_size.observe(n)
        return seconds * 1000

    def _run_batch(self, xs: np.ndarray) -> np.ndarray:
        with self.slot:
            return self.run(xs)

    async def submit(self, x: np.ndarray) -> tuple[float, float, int]:
        """(probability, inference ms of its batch, batch size) for one preprocessed image (1, H, W)."""
        waiting = self.queue.qsize()
        if waiting >= self.max_queue:
            retry = max(1, math.ceil(waiting * self.seconds_per_image))
            raise Overloaded(f"the service is at capacity ({waiting} images queued): retry after {retry} s", retry)
        future = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((x, future))
        if self.metrics:
            self.metrics.queue_depth.set(self.queue.qsize())
        try:
            return await asyncio.wait_for(asyncio.shield(future), self.timeout)
        except TimeoutError:
            future.cancel()
            raise TimedOut(f"scoring did not finish within {self.timeout:g} s; the request was dropped") from None

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.max_wait
            while len(batch) < self.max_batch and (self.pending > 0 or not self.queue.empty()):
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), remaining))
                except TimeoutError:
                    break
            batch = [(x, f) for x, f in batch if not f.cancelled()]  # timed out while queued
            if self.metrics:
                self.metrics.queue_depth.set(self.queue.qsize())
            if not batch:
                continue
            xs = np.stack([x for x, _ in batch])
            start = time.perf_counter()
            try:
                probs = await loop.run_in_executor(self.pool, self._run_batch, xs)
            except Exception as exc:  # a runtime failure fails this batch's requests, not the service
                for _, f in batch:
                    if not f.done():
                        f.set_exception(exc)
                continue
            ms = self._ran(len(batch), time.perf_counter() - start)
            for (_, f), p in zip(batch, probs, strict=True):
                if not f.done():
                    f.set_result((float(p), ms, len(batch)))
