"""Worker processes that each take one call at a time, over a pipe of their own.

``concurrent.futures.ProcessPoolExecutor`` hands every call through two threads of the caller's process (a manager
that queues it, a feeder that pickles it into a shared pipe) and back through the manager: per image, two thread
wake-ups and their share of the GIL in a service whose event loop is its busiest thread. Here a call goes from the
caller straight to an idle worker's pipe, and an awaited call's answer is read by the event loop itself
(``loop.add_reader``): no thread of the caller's process is involved.

A worker runs one call at a time, so what happens to it is its call's doing: a worker that dies (a codec crashing
natively) or outlasts the time limit fails that call alone (``WorkerDied`` / ``WorkerTimedOut``) and is replaced;
calls waiting for a worker wait for the next idle one.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import multiprocessing
import os
import pickle
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from medvision.errors import MedvisionError

log = logging.getLogger("medvision.serving")


class WorkerDied(RuntimeError):
    """The worker running the call died (killed by a signal, or its process exited) before answering."""


class WorkerTimedOut(RuntimeError):
    """The call outlasted its time limit; its worker was stopped."""


class WorkersClosed(RuntimeError):
    """The workers were shut down before this call was answered."""


class WorkersBusy(RuntimeError):
    """No worker became free within the time a call may wait for one."""


def _serve(conn: Connection, initializer: Callable | None, initargs: tuple) -> None:
    """A worker's life: ``initializer(*initargs)``, then each ``(target, args)`` received is answered with
    ``(True, target(*args))`` or ``(False, the exception)``, until the pipe closes or ``None`` arrives."""
    if initializer is not None:
        initializer(*initargs)
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return
        if message is None:
            return
        target, args = message
        try:
            outcome = (True, target(*args))
        except Exception as exc:  # handed back to the caller, which raises it
            outcome = (False, _portable(exc))
        try:
            conn.send(outcome)
        except (EOFError, OSError):
            return
        except Exception as exc:  # noqa: BLE001 - an answer that cannot be pickled: said so, in its place
            conn.send((False, RuntimeError(f"the worker's answer could not be sent back: {type(exc).__name__}: {exc}")))


def _portable(exc: Exception) -> Exception:
    """``exc``, or a RuntimeError saying what it was where it would not survive the trip back (an exception class
    whose arguments do not rebuild it fails in the caller's unpickling, after the whole answer was read)."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:  # noqa: BLE001 - any failure to round-trip
        if isinstance(exc, MedvisionError):  # still a refusal with its code, not a fault
            portable = MedvisionError(str(exc))
            portable.code = exc.code
            return portable
        return RuntimeError(f"{type(exc).__name__}: {exc}")
    return exc


def _ready() -> bool:
    return True


@dataclass(eq=False)
class _Worker:
    process: Any  # multiprocessing's Process of the chosen context
    conn: Connection
    lost: bool = False  # stopped: killed, reaped and its pipe closed (once: `_stop`)
    awaited: tuple | None = None  # (event loop, settle) of the awaited call it is on


class WorkerProcesses:
    """``processes`` workers started with ``initializer(*initargs)`` (spawned: the caller may have threads holding
    locks a forked child would inherit). ``run`` from a thread, ``run_async`` on an event loop; both raise the
    target's own exception, or ``WorkerDied`` / ``WorkerTimedOut`` / ``WorkersBusy`` / ``WorkersClosed``."""

    def __init__(self, processes: int, initializer: Callable | None = None, initargs: tuple = (),
                 start_timeout_s: float = 120.0) -> None:
        self.context = multiprocessing.get_context("spawn")
        self.initializer, self.initargs, self.start_timeout_s = initializer, initargs, start_timeout_s
        self.lock = threading.Lock()
        self.idle: list[_Worker] = []
        self.waiters: deque = deque()  # callers waiting for a worker: asyncio futures or concurrent.futures ones
        self.workers: set[_Worker] = set()
        self.closed = False
        self.replaced = 0  # workers replaced after dying or being stopped
        started = [self._start() for _ in range(processes)]
        try:
            for worker in started:  # each ready now, not on the first call
                self._call(worker, _ready, (), start_timeout_s)
        except BaseException:
            for worker in started:
                _stop(worker)
            raise
        self.idle = started

    @property
    def pids(self) -> list[int]:
        with self.lock:
            return sorted(w.process.pid for w in self.workers)

    def _start(self) -> _Worker:
        ours, theirs = self.context.Pipe(duplex=True)
        process = self.context.Process(target=_serve, args=(theirs, self.initializer, self.initargs), daemon=True,
                                       name="medvision-decoder")
        process.start()
        theirs.close()
        worker = _Worker(process, ours)
        with self.lock:
            self.workers.add(worker)
        return worker

    # -- a worker for each call --------------------------------------------------------------------------------------

    def _acquire(self, wait_s: float) -> _Worker:
        with self.lock:
            if self.closed:
                raise WorkersClosed("the decoding workers are shut down")
            if self.idle:
                return self.idle.pop()
            waiter: concurrent.futures.Future = concurrent.futures.Future()
            self.waiters.append(waiter)
        try:
            return waiter.result(wait_s)
        except concurrent.futures.TimeoutError:
            if not waiter.cancel():  # handed a worker (or refused) just now
                return waiter.result()
            raise WorkersBusy(f"no decoding worker became free within {wait_s:g} s") from None

    async def _acquire_async(self, wait_s: float) -> _Worker:
        loop = asyncio.get_running_loop()
        with self.lock:
            if self.closed:
                raise WorkersClosed("the decoding workers are shut down")
            if self.idle:
                return self.idle.pop()
            waiter = loop.create_future()
            self.waiters.append(waiter)
        busy = WorkersBusy(f"no decoding worker became free within {wait_s:g} s")
        # the waiter settles once: with a worker (_hand), or with WorkersBusy here; a worker handed after that is
        # passed on by _hand, never lost
        timer = loop.call_later(wait_s, lambda: waiter.done() or waiter.set_exception(busy))
        try:
            return await waiter
        except asyncio.CancelledError:
            # handed a worker just as this call was cancelled: it goes to the next caller (a waiter cancelled first
            # is found done by _hand, which passes the worker on)
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self._release(waiter.result())
            raise
        finally:
            timer.cancel()

    def _release(self, worker: _Worker) -> None:
        """``worker`` is free: to the longest-waiting caller, else idle."""
        with self.lock:
            stop = self.closed
            while not stop and self.waiters:
                waiter = self.waiters.popleft()
                if isinstance(waiter, asyncio.Future):
                    if waiter.done():  # cancelled or timed out: settled for good, no hop to its loop
                        continue
                    try:
                        waiter.get_loop().call_soon_threadsafe(self._hand, waiter, worker)
                    except RuntimeError:  # its event loop is closed: the caller is gone
                        continue
                    return
                if waiter.set_running_or_notify_cancel():
                    waiter.set_result(worker)
                    return
            if not stop:
                self.idle.append(worker)
                return
            self.workers.discard(worker)
        _stop(worker)  # shut down meanwhile

    def _hand(self, waiter: asyncio.Future, worker: _Worker) -> None:
        if waiter.done():  # cancelled (or timed out) while the worker was on its way: the next caller's
            self._release(worker)
        else:
            waiter.set_result(worker)

    def _replace(self, worker: _Worker) -> None:
        """``worker`` died or was stopped: gone, and a new one started in its place, handed out once it is ready (in
        a thread of its own: a call's time limit never pays for a worker's start)."""
        with self.lock:
            if worker not in self.workers:  # replaced already (or shut down)
                return
            self.workers.discard(worker)
            closed = self.closed
            if not closed:
                self.replaced += 1
        _stop(worker)
        if not closed:
            threading.Thread(target=self._start_ready, name="medvision-decoder-start", daemon=True).start()

    def _start_ready(self) -> None:
        """Start a worker and hand it out once it answers; a start that fails is tried again (1 s, 2 s, ... 60 s
        apart) until one comes up or the workers are shut down: the pool never stays a worker short."""
        pause = 1.0
        while not self.closed:
            fresh = None
            try:
                fresh = self._start()
                self._call(fresh, _ready, (), self.start_timeout_s)
            except Exception:  # noqa: BLE001 - logged, and tried again
                log.exception("a decoding worker did not start; trying again in %g s", pause)
                if fresh is not None:
                    with self.lock:
                        self.workers.discard(fresh)
                    _stop(fresh)
                time.sleep(pause)
                pause = min(2 * pause, 60.0)
                continue
            self._release(fresh)
            return

    def _died(self) -> RuntimeError:
        return WorkersClosed("the decoding workers were shut down during this call") if self.closed else \
            WorkerDied("the worker process died")

    # -- calls ----------------------------------------------------------------------------------------------------------

    def _call(self, worker: _Worker, target: Callable, args: tuple, timeout_s: float) -> Any:
        """``target(*args)`` on ``worker``, waited for in this thread."""
        try:
            worker.conn.send((target, args))
        except OSError:
            raise self._died() from None
        return self._answer(worker, timeout_s)

    def _answer(self, worker: _Worker, timeout_s: float) -> Any:
        """The answer to the call sent to ``worker``, waited for in this thread."""
        try:
            if not worker.conn.poll(timeout_s):
                raise WorkerTimedOut(f"no answer within {timeout_s:g} s")
            ok, value = worker.conn.recv()
        except (EOFError, OSError):
            raise self._died() from None
        if not ok:
            raise value
        return value

    def run(self, target: Callable, args: tuple, timeout_s: float, wait_s: float | None = None) -> Any:
        """``target(*args)`` in a worker, from a thread (blocks until it answers): at most ``wait_s`` (default
        ``timeout_s``) waiting for a worker, and ``timeout_s`` for the call."""
        wait_s = timeout_s if wait_s is None else wait_s
        worker = self._acquire(wait_s)
        while True:
            try:
                worker.conn.send((target, args))
                break
            except OSError:  # its end of the pipe is closed: it died while idle (killed from outside), not this
                pass  # call's doing
            except BaseException:  # arguments that cannot be pickled: nothing was written, the worker is fine
                self._release(worker)
                raise
            self._replace(worker)
            worker = self._acquire(wait_s)
        try:
            value = self._answer(worker, timeout_s)
        except (WorkerDied, WorkerTimedOut, WorkersClosed):
            self._replace(worker)
            raise
        except BaseException:
            self._release(worker)
            raise
        self._release(worker)
        return value

    async def run_async(self, target: Callable, args: tuple, timeout_s: float, wait_s: float | None = None) -> Any:
        """``target(*args)`` in a worker, awaited (limits as ``run``'s): its answer is read by the event loop when it
        arrives. A caller cancelled mid-call leaves the worker to finish; it is released when it answers, or stopped
        at the limit."""
        wait_s = timeout_s if wait_s is None else wait_s
        worker = await self._acquire_async(wait_s)
        while True:
            try:
                worker.conn.send((target, args))  # a few hundred bytes: the idle worker's pipe takes them at once
                break
            except OSError:  # its end of the pipe is closed: it died while idle (killed from outside)
                await asyncio.get_running_loop().run_in_executor(None, self._replace, worker)
            except BaseException:  # arguments that cannot be pickled: nothing was written, the worker is fine
                self._release(worker)
                raise
            worker = await self._acquire_async(wait_s)
        loop = asyncio.get_running_loop()
        answer = loop.create_future()
        fd = worker.conn.fileno()
        reading = _Reading()

        def settle(outcome) -> bool:  # the first of readable(), expired() and close() settles the call
            if answer.done():
                return False
            loop.remove_reader(fd)
            timer.cancel()
            worker.awaited = None
            answer.set_result(outcome)
            return True

        def readable() -> None:  # on the event loop: part of the answer is there (or the pipe closed)
            if answer.done():
                return
            try:
                message = reading.more(fd)
                if message is None:
                    return  # the rest is on its way: read when it arrives, the loop never waits for it
                outcome = pickle.loads(message)
            except Exception:  # noqa: BLE001 - closed, or a message that cannot be read: the pipe is not trusted again
                outcome = None
            if settle(outcome):
                if outcome is None:
                    loop.run_in_executor(None, self._replace, worker)
                else:
                    try:
                        os.set_blocking(fd, True)  # as a thread's calls expect it
                    except OSError:  # closed meanwhile (shut down)
                        return
                    self._release(worker)

        def expired() -> None:
            if settle(TIMED_OUT):
                loop.run_in_executor(None, self._replace, worker)

        os.set_blocking(fd, False)
        loop.add_reader(fd, readable)
        timer = loop.call_later(timeout_s, expired)
        worker.awaited = (loop, settle)
        outcome = await asyncio.shield(answer)  # a cancelled caller leaves the call to be settled as any other
        if outcome is TIMED_OUT:
            raise WorkerTimedOut(f"no answer within {timeout_s:g} s")
        if outcome is CLOSED:
            raise WorkersClosed("the decoding workers were shut down during this call")
        if outcome is None:
            raise self._died()
        ok, value = outcome
        if not ok:
            raise value
        return value

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop every worker (a busy one after ``timeout_s`` in all); calls still waiting get ``WorkersClosed``."""
        with self.lock:
            self.closed = True
            waiters, self.waiters = list(self.waiters), deque()
            workers, self.idle = list(self.workers), []
            self.workers = set()
        for waiter in waiters:
            closed = WorkersClosed("the decoding workers are shut down")
            if isinstance(waiter, asyncio.Future):
                try:
                    waiter.get_loop().call_soon_threadsafe(lambda w=waiter, e=closed: w.done() or w.set_exception(e))
                except RuntimeError:
                    pass
            elif waiter.set_running_or_notify_cancel():
                waiter.set_exception(closed)
        for worker in workers:
            try:
                worker.conn.send(None)
            except OSError:
                pass
        deadline = time.monotonic() + timeout_s
        for worker in workers:
            worker.process.join(max(0.0, deadline - time.monotonic()))
            awaited = worker.awaited
            if awaited is not None:  # an awaited call still on it: settled on its loop (its pipe unwatched) first
                loop, settle = awaited
                settled: concurrent.futures.Future = concurrent.futures.Future()
                try:
                    loop.call_soon_threadsafe(lambda s=settle, f=settled: (s(CLOSED), f.set_result(None)))
                    settled.result(5)
                except (RuntimeError, concurrent.futures.TimeoutError):  # its loop is closed, or not answering
                    pass
            _stop(worker)


TIMED_OUT = object()
CLOSED = object()


class _Reading:
    """One answer read off a non-blocking pipe in pieces as they arrive, framed as ``Connection.send`` frames it
    (a 4-byte big-endian length, or -1 and an 8-byte one, then the pickle; a large answer's length and body are
    written separately, so the length may arrive well before the rest). The body is read into one buffer of its
    size, allocated once its length is known."""

    def __init__(self) -> None:
        self.head = bytearray()  # the length (and whatever came with it) until the body's buffer exists
        self.body: bytearray | None = None
        self.at = 0  # body bytes read

    def more(self, fd: int) -> memoryview | None:
        """Reads what has arrived; the pickle once it is whole, else None. EOFError when the pipe closed first."""
        while True:
            if self.body is None:
                try:
                    chunk = os.read(fd, 65536)
                except BlockingIOError:
                    return None
                if not chunk:
                    raise EOFError("the worker's pipe closed mid-answer")
                self.head += chunk
                if len(self.head) < 4:
                    continue
                (size,), start = struct.unpack("!i", self.head[:4]), 4
                if size == -1:
                    if len(self.head) < 12:
                        continue
                    (size,), start = struct.unpack("!Q", self.head[4:12]), 12
                came = self.head[start:start + size]
                self.body = bytearray(size)
                self.body[:len(came)] = came
                self.at, self.head = len(came), bytearray()
            if self.at == len(self.body):
                return memoryview(self.body)
            try:
                n = os.readv(fd, [memoryview(self.body)[self.at:]])
            except BlockingIOError:
                return None
            if not n:
                raise EOFError("the worker's pipe closed mid-answer")
            self.at += n


_stopping = threading.Lock()


def _stop(worker: _Worker) -> None:
    """Kill ``worker`` (if it still runs), reap it and close its pipe: once, whoever asks first."""
    with _stopping:
        if worker.lost:
            return
        worker.lost = True
    if worker.process.is_alive():
        worker.process.kill()
    worker.process.join(10)
    worker.conn.close()
