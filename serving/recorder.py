"""Scored results written in groups: the requests answered together commit together.

Under load, a result a request stores (``usage.record_score``: its row, the usage meter, the audit record) costs a
thread hop and a transaction of its own, as much CPU as the rest of the service's own work on the request. Here
one writer thread takes every result waiting and writes them in one transaction: one hop and one commit for the
group. A request is answered only once its result is committed, as before.

When a write fails:
- one write's own statements refused (a constraint, a value the database will not take): the group is rolled back,
  that write's request gets the error and the others are written again without it;
- the database unreachable, locked or failing (``OperationalError`` and kin), or the commit failing: every request of
  the group gets the error at once (a 503, as before). Nothing is written again after a failed commit: it may have
  landed, and the usage meter must not count an image twice.
The writes of a group take the usage meters' row locks in one order (by meter), as no two groups can then wait on
each other. If the writer thread itself fails, the requests waiting and any that come later are refused with an
error, never left hanging.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable

from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker

from medvision.errors import MedvisionError

log = logging.getLogger("medvision.serving")

GROUP_MAX = 64  # results in one transaction at most (a burst is written in several)
UNAVAILABLE = (OperationalError, InterfaceError, PoolTimeout)  # the database, not one write: the whole group fails
STOP_WAIT_S = 60.0


class RecorderStopped(MedvisionError):
    """The result writer is not taking writes (shutting down, or failed): the request is answered 503, its result
    not stored."""

    code = "database_unavailable"


class Recorder:
    """``await record(write, order)``: ``write(db)`` (its statements, not its commit) done in the writer thread,
    committed with whatever else was waiting; ``order`` (the usage meter it locks) orders the writes of a group."""

    def __init__(self, sessions: sessionmaker[Session], group_max: int = GROUP_MAX) -> None:
        self.sessions = sessions
        self.group_max = max(1, group_max)
        self.waiting: queue.SimpleQueue = queue.SimpleQueue()
        self.lock = threading.Lock()  # guards ``closed`` against a put racing the thread's end
        self.closed: RecorderStopped | None = None  # why no more writes are taken
        self.thread = threading.Thread(target=self._run, name="medvision-recorder", daemon=True)
        self.thread.start()

    async def record(self, write: Callable[[Session], None], order: str = "") -> None:
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        with self.lock:
            if self.closed is not None:
                raise RecorderStopped(str(self.closed))
            self.waiting.put((order, write, loop, done))
        try:
            # shielded: a request cancelled now still has its result written (the group holds it); it no longer waits
            await asyncio.shield(done)
        except asyncio.CancelledError:
            done.add_done_callback(_observed)
            raise

    def stop(self, timeout_s: float = STOP_WAIT_S) -> None:
        """Write what is waiting, then end the thread (waiting at most ``timeout_s`` for it)."""
        with self.lock:
            if self.closed is None:
                self.closed = RecorderStopped("results cannot be stored: the service is shutting down")
                self.waiting.put(None)
        self.thread.join(timeout_s)
        if self.thread.is_alive():
            log.error("the result writer did not finish within %g s of shutdown (the database holds it)", timeout_s)

    def _run(self) -> None:
        group: list = []
        try:
            while True:
                group = sorted(self._next_group(), key=lambda item: item[0])  # the meters' locks in one order
                if not group:
                    return
                _settle_all(group, self._write(group))
                group = []
        except BaseException as exc:  # whatever ends the thread, no request is left waiting
            log.error("the result writer failed (%s); results are refused until the service restarts", type(exc).__name__)
            stopped = RecorderStopped(f"results cannot be stored: the result writer failed ({type(exc).__name__})")
            with self.lock:
                self.closed = self.closed or stopped
            _settle_all(group, [stopped] * len(group))
        finally:  # what still waits, and anything put before ``closed`` was set, is refused
            with self.lock:
                self.closed = self.closed or RecorderStopped("results cannot be stored: the result writer ended")
            self._refuse_waiting(self.closed)

    def _next_group(self) -> list:
        """The writes waiting now (at least one; empty: stop)."""
        first = self.waiting.get()
        if first is None:
            return []
        group = [first]
        while len(group) < self.group_max:
            try:
                item = self.waiting.get_nowait()
            except queue.Empty:
                break
            if item is None:  # stop after this group
                self.waiting.put(None)
                break
            group.append(item)
        return group

    def _refuse_waiting(self, exc: RecorderStopped) -> None:
        left = []
        while True:
            try:
                item = self.waiting.get_nowait()
            except queue.Empty:
                break
            if item is not None:
                left.append(item)
        _settle_all(left, [exc] * len(left))

    def _write(self, group: list) -> list[BaseException | None]:
        """Each write's outcome: None (committed) or what it raised."""
        failed_at, failure = None, None
        with self.sessions() as db:
            try:
                for i, (_, write, _, _) in enumerate(group):
                    failed_at = i
                    write(db)
                failed_at = None
                db.commit()
                return [None] * len(group)
            except Exception as exc:  # sorted out below: one write's, or the database's
                failure = exc
                try:
                    db.rollback()
                except Exception:  # a connection gone too: closing the session discards it
                    pass
        if failed_at is None or isinstance(failure, UNAVAILABLE):  # the commit, or the database: all of them
            return [failure] * len(group)
        rest = self._write(group[:failed_at] + group[failed_at + 1:]) if len(group) > 1 else []
        rest.insert(failed_at, failure)
        return rest


def _observed(done: asyncio.Future) -> None:
    """A write's outcome that its cancelled request no longer waits for: taken, so asyncio does not log it as lost."""
    if not done.cancelled():
        done.exception()


def _settle_all(group: list, outcomes: list) -> None:
    """Each item's future given its outcome, on its own event loop: one wake-up of each loop for the group."""
    by_loop: dict = {}
    for (_, _, loop, done), outcome in zip(group, outcomes, strict=True):
        by_loop.setdefault(loop, []).append((done, outcome))
    for loop, settled in by_loop.items():
        try:
            loop.call_soon_threadsafe(_settle, settled)
        except RuntimeError:  # that loop is closed: nobody waits any more
            pass


def _settle(settled: list) -> None:
    for done, outcome in settled:
        if done.done():
            continue
        if outcome is None:
            done.set_result(None)
        else:
            done.set_exception(outcome)
