"""Results written in groups (``serving.recorder``): the writes waiting together commit in one transaction, each
caller answered only after its commit; one write that fails costs only its own caller; nothing waiting is lost at
shutdown or when its caller gives up."""

import asyncio
import threading

import pytest
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from medvision.serving.db import open_database
from medvision.serving.recorder import Recorder


@pytest.fixture
def sessions(tmp_path):
    made = open_database(f"sqlite:///{tmp_path / 'r.db'}")
    yield made
    made.kw["bind"].dispose()


def _meter(meter: str, seen: list | None = None):
    """A write: one usage row (unique per day and meter), and which session wrote it."""
    def write(db) -> None:
        if seen is not None:
            seen.append(id(db))
        db.execute(text("INSERT INTO usage (day, site, meter, images, studies, inference_ms) "
                        "VALUES ('2026-12-04', 's', :m, 1, 0, 0)"), {"m": meter})
    return write


def _meters(sessions) -> list[str]:
    with sessions() as db:
        return sorted(db.execute(text("SELECT meter FROM usage")).scalars())


def _held(recorder: Recorder) -> threading.Event:
    """Hold the writer thread in a write of its own until the event is set: what arrives meanwhile waits together."""
    release, holding = threading.Event(), threading.Event()

    def hold(db) -> None:
        holding.set()
        release.wait(10)

    recorder.waiting.put((hold, asyncio.new_event_loop(), None))
    assert holding.wait(10)
    return release


def test_writes_waiting_together_commit_in_one_transaction_before_their_callers_go_on(sessions):
    recorder = Recorder(sessions)
    seen: list[int] = []

    async def scenario():
        release = _held(recorder)

        async def one(i):
            await recorder.record(_meter(f"key:{i}", seen))
            return f"key:{i}" in _meters(sessions)  # committed, and visible to another session, when record returns

        tasks = [asyncio.create_task(one(i)) for i in range(10)]
        await asyncio.sleep(0.2)
        assert not any(t.done() for t in tasks)  # nothing answered before its commit
        release.set()
        return await asyncio.gather(*tasks)

    try:
        assert asyncio.run(scenario()) == [True] * 10
    finally:
        recorder.stop()
    assert len(set(seen)) == 1  # the ten waited together: one session, one transaction
    assert _meters(sessions) == sorted(f"key:{i}" for i in range(10))


def test_a_write_that_fails_costs_its_caller_only(sessions):
    recorder = Recorder(sessions)

    async def scenario():
        release = _held(recorder)
        tasks = [asyncio.create_task(recorder.record(_meter(m))) for m in ("a", "b", "a", "c")]  # the 2nd 'a' breaks
        await asyncio.sleep(0.2)
        release.set()
        return await asyncio.gather(*tasks, return_exceptions=True)

    try:
        outcomes = asyncio.run(scenario())
    finally:
        recorder.stop()
    assert outcomes[0] is None and outcomes[1] is None and outcomes[3] is None
    assert isinstance(outcomes[2], IntegrityError)
    assert _meters(sessions) == ["a", "b", "c"]  # the group was written again one by one: the others are stored


def test_a_caller_that_gives_up_still_has_its_result_written_and_stop_drains_the_queue(sessions):
    recorder = Recorder(sessions)

    async def scenario():
        release = _held(recorder)
        gone = asyncio.create_task(recorder.record(_meter("cancelled")))
        kept = [asyncio.create_task(recorder.record(_meter(f"k{i}"))) for i in range(3)]
        await asyncio.sleep(0.1)
        gone.cancel()  # its client went away while the result waited
        with pytest.raises(asyncio.CancelledError):
            await gone
        release.set()
        await asyncio.gather(*kept)

    asyncio.run(scenario())
    leftover = threading.Event()
    recorder.waiting.put((lambda db: (_meter("at-stop")(db), leftover.set()), asyncio.new_event_loop(), None))
    recorder.stop()  # what waits at shutdown is written before the thread ends
    assert leftover.is_set()
    assert _meters(sessions) == ["at-stop", "cancelled", "k0", "k1", "k2"]
    with pytest.raises(RuntimeError, match="stopped"):
        asyncio.run(recorder.record(_meter("late")))
