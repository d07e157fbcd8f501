"""Scored results written in groups: the requests answered together commit together.

Under load, a result a request stores (``usage.record_score``: its row, the usage meter, the audit record) costs a
thread hop and a transaction of its own, as much CPU as the rest of the service's own work on the request. Here
one writer thread takes every result waiting and writes them in one transaction: one hop and one commit for the
group. A request is answered only once its result is committed, as before. A write that fails (a constraint, a
value the database refuses) rolls the group back and each of its results is written again alone, so the others
are stored and only the one that failed answers with its error.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable

from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger("medvision.serving")

GROUP_MAX = 64  # results in one transaction at most (a burst is written in several)


class Recorder:
    """``await record(write)``: ``write(db)`` (its statements, not its commit) done in the writer thread, committed
    with whatever else was waiting."""

    def __init__(self, sessions: sessionmaker[Session], group_max: int = GROUP_MAX) -> None:
        self.sessions = sessions
        self.group_max = max(1, group_max)
        self.waiting: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="medvision-recorder", daemon=True)
        self.thread.start()

    async def record(self, write: Callable[[Session], None]) -> None:
        if not self.thread.is_alive():
            raise RuntimeError("the recorder is stopped")
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self.waiting.put((write, loop, done))
        try:
            # shielded: a request cancelled now still has its result written (the group holds it); it no longer waits
            await asyncio.shield(done)
        except asyncio.CancelledError:
            done.add_done_callback(_observed)
            raise

    def stop(self) -> None:
        """Write what is waiting, then end the thread."""
        if self.thread.is_alive():
            self.waiting.put(None)
            self.thread.join()

    def _run(self) -> None:
        while True:
            first = self.waiting.get()
            if first is None:
                return
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
            outcomes = self._write(group)
            by_loop: dict = {}
            for (_, loop, done), outcome in zip(group, outcomes, strict=True):
                by_loop.setdefault(loop, []).append((done, outcome))
            for loop, settled in by_loop.items():
                try:
                    loop.call_soon_threadsafe(_settle, settled)  # one wake-up of the event loop per group
                except RuntimeError:  # that loop is closed: nobody waits any more
                    pass

    def _write(self, group: list) -> list[BaseException | None]:
        """Each write's outcome: None (committed) or what it raised."""
        try:
            with self.sessions() as db:
                for write, _, _ in group:
                    write(db)
                db.commit()
            return [None] * len(group)
        except Exception as exc:  # noqa: BLE001 - one write's failure must not fail the others: each again alone
            if len(group) == 1:
                return [exc]
            log.warning("a group of %d results failed to commit (%s); writing them one by one", len(group),
                        type(exc).__name__)
        outcomes: list[BaseException | None] = []
        for item in group:
            outcomes.extend(self._write([item]))
        return outcomes


def _observed(done: asyncio.Future) -> None:
    """A write's outcome that its cancelled request no longer waits for: taken, so asyncio does not log it as lost."""
    if not done.cancelled():
        done.exception()


def _settle(settled: list) -> None:
    for done, outcome in settled:
        if done.done():
            continue
        if outcome is None:
            done.set_result(None)
        else:
            done.set_exception(outcome)
