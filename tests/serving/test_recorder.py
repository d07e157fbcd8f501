"""Results written in groups (``serving.recorder``): the writes waiting together commit in one transaction, each
caller answered only after its commit; a write whose own statements fail costs only its caller; a database that
fails, or a commit that fails, fails the group at once and nothing is written twice; nothing waiting is lost at
shutdown or when its caller gives up, and no caller is left hanging when the writer itself fails."""

import asyncio
import threading

import pytest
from sqlalchemy import event, text
from sqlalchemy.exc import IntegrityError, OperationalError

from medvision.serving.db import open_database
from medvision.serving.recorder import Recorder, RecorderStopped


@pytest.fixture
def sessions(tmp_path):
    made = open_database(f"sqlite:///{tmp_path / 'r.db'}")
    yield made
    made.kw["bind"].dispose()


@pytest.fixture
def recorder(sessions):
    made = Recorder(sessions)
    yield made
    made.stop(10)


def _meter(meter: str, calls: list | None = None):
    """A write: one usage row (unique per day and meter); ``calls`` counts how often it ran."""
    def write(db) -> None:
        if calls is not None:
            calls.append(meter)
        db.execute(text("INSERT INTO usage (day, site, meter, images, studies, inference_ms) "
                        "VALUES ('2026-12-04', 's', :m, 1, 0, 0)"), {"m": meter})
    return write


def _meters(sessions) -> list[str]:
    with sessions() as db:
        return sorted(db.execute(text("SELECT meter FROM usage")).scalars())


def _commits(sessions) -> list:
    seen: list = []
    event.listen(sessions.kw["bind"], "commit", lambda conn: seen.append(1))
    return seen


async def _hold(recorder: Recorder):
    """The writer thread held in a write of its own until ``release`` is set: what arrives meanwhile waits together."""
    release, holding = threading.Event(), threading.Event()

    def hold(db) -> None:
        holding.set()
        release.wait(10)

    held = asyncio.create_task(recorder.record(hold, "held"))
    assert await asyncio.to_thread(holding.wait, 10)
    return release, held


async def _together(recorder: Recorder, writes: list, orders: list[str] | None = None) -> list:
    release, held = await _hold(recorder)
    tasks = [asyncio.create_task(recorder.record(w, (orders or [""] * len(writes))[i])) for i, w in enumerate(writes)]
    await asyncio.sleep(0.2)
    release.set()
    await held
    return await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 20)


def test_writes_waiting_together_commit_in_one_transaction_before_their_callers_go_on(sessions, recorder):
    commits = _commits(sessions)

    async def scenario():
        release, held = await _hold(recorder)

        async def one(i):
            await recorder.record(_meter(f"key:{i}"))
            return f"key:{i}" in _meters(sessions)  # committed, and visible to another session, when record returns

        tasks = [asyncio.create_task(one(i)) for i in range(10)]
        await asyncio.sleep(0.2)
        release.set()
        await held
        return await asyncio.wait_for(asyncio.gather(*tasks), 20)

    assert asyncio.run(scenario()) == [True] * 10
    assert len(commits) == 1  # one transaction for the ten that waited together (the held write ran no statement)
    assert _meters(sessions) == sorted(f"key:{i}" for i in range(10))


def test_a_groups_writes_run_in_the_order_of_the_meters_they_lock(sessions, recorder):
    calls: list[str] = []
    outcomes = asyncio.run(_together(recorder, [_meter(m, calls) for m in ("key:9", "key:1", "key:5")],
                                     ["key:9", "key:1", "key:5"]))
    assert outcomes == [None] * 3 and calls == ["key:1", "key:5", "key:9"]


def test_a_write_whose_statements_fail_costs_its_caller_only(sessions, recorder):
    calls: list[str] = []
    outcomes = asyncio.run(_together(recorder, [_meter(m, calls) for m in ("a", "b", "a", "c")]))  # the 2nd 'a' breaks
    assert outcomes[0] is None and outcomes[1] is None and outcomes[3] is None
    assert isinstance(outcomes[2], IntegrityError)
    assert _meters(sessions) == ["a", "b", "c"]  # the others written again without it
    assert calls == ["a", "b", "a", "a", "b", "c"]


def test_a_database_that_fails_fails_the_group_at_once_and_nothing_is_written_twice(sessions, recorder):
    calls: list[str] = []

    def unreachable(db) -> None:
        calls.append("x")
        raise OperationalError("INSERT", {}, Exception("database is locked"))

    outcomes = asyncio.run(_together(recorder, [_meter("a", calls), unreachable, _meter("b", calls)]))
    assert all(isinstance(o, OperationalError) for o in outcomes), outcomes  # each answered 503, not retried alone
    assert calls == ["a", "x"] and _meters(sessions) == []

    fail = {"once": True}

    def failing_commit(conn) -> None:
        if fail.pop("once", False):
            raise OperationalError("COMMIT", {}, Exception("disk I/O error"))

    event.listen(sessions.kw["bind"], "commit", failing_commit)
    calls.clear()
    outcomes = asyncio.run(_together(recorder, [_meter("c", calls), _meter("d", calls)]))
    assert all(isinstance(o, OperationalError) for o in outcomes), outcomes
    assert calls == ["c", "d"]  # a commit that failed is never replayed: it may have landed
    assert asyncio.run(recorder.record(_meter("e"))) is None and _meters(sessions) == ["e"]  # and it writes on

    def failing_rollback(conn) -> None:  # the connection gone: rolling back fails too
        if fail.pop("rollback", False):
            raise OperationalError("ROLLBACK", {}, Exception("server closed the connection"))

    event.listen(sessions.kw["bind"], "rollback", failing_rollback)
    fail.update(rollback=True)
    outcomes = asyncio.run(_together(recorder, [_meter("f"), _meter("f")]))  # the 2nd breaks; rolling back fails
    assert outcomes[0] is None and isinstance(outcomes[1], IntegrityError) and "rollback" not in fail
    assert asyncio.run(recorder.record(_meter("g"))) is None and _meters(sessions) == ["e", "f", "g"]  # still writing


def test_a_caller_that_gives_up_still_has_its_result_written_and_stop_drains_the_queue(sessions):
    recorder = Recorder(sessions)

    async def scenario():
        release, held = await _hold(recorder)
        gone = asyncio.create_task(recorder.record(_meter("cancelled")))
        kept = [asyncio.create_task(recorder.record(_meter(f"k{i}"))) for i in range(3)]
        await asyncio.sleep(0.1)
        gone.cancel()  # its client went away while the result waited
        with pytest.raises(asyncio.CancelledError):
            await gone
        stopping = asyncio.create_task(asyncio.to_thread(recorder.stop, 10))  # shutdown while writes wait
        await asyncio.sleep(0.1)
        with pytest.raises(RecorderStopped, match="shutting down"):
            await recorder.record(_meter("late"))
        release.set()
        await held
        await asyncio.wait_for(asyncio.gather(*kept, stopping), 20)

    try:
        asyncio.run(scenario())
    finally:
        recorder.stop(10)
    assert not recorder.thread.is_alive()
    assert _meters(sessions) == ["cancelled", "k0", "k1", "k2"]


def test_a_writer_that_dies_refuses_its_callers_and_later_ones_never_leaves_them_waiting(sessions, recorder):
    class Fatal(BaseException):
        pass

    def fatal(db) -> None:
        raise Fatal()

    outcomes = asyncio.run(_together(recorder, [_meter("a"), fatal, _meter("b")]))
    assert all(isinstance(o, RecorderStopped) for o in outcomes), outcomes
    recorder.thread.join(10)
    assert not recorder.thread.is_alive()
    with pytest.raises(RecorderStopped, match="writer failed"):
        asyncio.run(recorder.record(_meter("c")))
    assert _meters(sessions) == []
    from medvision.serving.errors import status_for

    refused = RecorderStopped("results cannot be stored: the service is shutting down")
    assert status_for(refused) == 503 and refused.code == "database_unavailable"  # a problem the client may retry
