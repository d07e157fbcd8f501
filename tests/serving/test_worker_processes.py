"""The service's decoding worker processes as a pool: one call per worker at a time, and no call's mishap (an answer
or argument that cannot travel, a cancelled or impatient caller) costs the pool a worker."""

import asyncio
import os
import pickle
import signal
import socket
import struct
import threading
import time

import pytest
from helpers import raise_unrebuildable

from medvision.serving.worker_processes import WorkerProcesses, WorkersBusy, WorkersClosed


def test_an_answer_or_argument_that_cannot_travel_costs_no_worker():
    pool = WorkerProcesses(1)
    try:
        with pytest.raises(RuntimeError, match="Unrebuildable: 1 2"):  # said so, not a failure to unpickle
            pool.run(raise_unrebuildable, (), 30)
        with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):  # a lambda cannot be sent
            pool.run(pow, (lambda: 0, 2), 30)
        assert pool.run(pow, (2, 10), 30) == 1024

        async def awaited():
            with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
                await pool.run_async(pow, (lambda: 0, 2), 30)
            with pytest.raises(RuntimeError, match="Unrebuildable"):
                await pool.run_async(raise_unrebuildable, (), 30)
            # an answer larger than the pipe holds arrives in many pieces, each read as it comes
            assert await pool.run_async(bytes, (3_000_000,), 30) == bytes(3_000_000)
            return await pool.run_async(pow, (3, 3), 30)

        assert asyncio.run(awaited()) == 27
        # the pipe the event loop read without blocking is a blocking one again for a thread's call
        assert pool.run(bytes, (3_000_000,), 30) == bytes(3_000_000)
        assert pool.replaced == 0 and len(pool.idle) == 1
    finally:
        pool.close()


def test_callers_cancelled_while_waiting_for_a_worker_lose_none():
    pool = WorkerProcesses(1)

    async def scenario():
        busy = asyncio.ensure_future(pool.run_async(time.sleep, (1.0,), 30))
        await asyncio.sleep(0.2)
        waiting = [asyncio.ensure_future(pool.run_async(pow, (2, i), 30)) for i in range(5)]
        await asyncio.sleep(0.2)
        for task in waiting[:4]:
            task.cancel()
        assert await busy is None
        assert await waiting[4] == 16  # the one still waiting got the worker, past the four cancelled
        assert await pool.run_async(pow, (2, 3), 30) == 8

    try:
        asyncio.run(scenario())
        assert len(pool.idle) == 1 and pool.replaced == 0 and not pool.waiters
    finally:
        pool.close()


def test_waiting_for_a_worker_is_bounded_and_a_closed_pool_says_so():
    pool = WorkerProcesses(1)
    try:
        holder = threading.Thread(target=pool.run, args=(time.sleep, (3,), 30))
        holder.start()
        _until(lambda: not pool.idle)  # the holder has the only worker
        started = time.monotonic()
        with pytest.raises(WorkersBusy, match="within 0.5 s"):
            pool.run(pow, (2, 2), 30, wait_s=0.5)
        assert time.monotonic() - started < 2.5  # not until the holder is done
        holder.join(30)
        assert pool.run(pow, (2, 2), 30) == 4 and len(pool.idle) == 1

        async def awaited():
            holding = asyncio.ensure_future(pool.run_async(time.sleep, (2,), 30))
            await asyncio.sleep(0)
            with pytest.raises(WorkersBusy, match="within 0.3 s"):
                await pool.run_async(pow, (2, 2), 30, wait_s=0.3)
            await holding
            return await pool.run_async(pow, (2, 3), 30, wait_s=0.3)

        assert asyncio.run(awaited()) == 8 and len(pool.idle) == 1 and pool.replaced == 0
    finally:
        pool.close()
    with pytest.raises(WorkersClosed):
        pool.run(pow, (2, 2), 30)


def _until(condition, within_s: float = 30) -> None:
    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_a_worker_killed_while_idle_costs_the_next_call_nothing():
    pool = WorkerProcesses(1)
    try:
        os.kill(pool.pids[0], signal.SIGKILL)  # the OOM killer, an operator
        pool.idle[0].process.join(10)
        assert pool.run(pow, (2, 5), 30) == 32  # on the worker started in its place, not refused
        assert pool.replaced == 1
    finally:
        pool.close()


def test_an_answer_is_read_in_the_pieces_it_arrives_in():
    """The event loop reads what has arrived and never waits for the rest: a large answer's length comes first, its
    pickle later (and the 8-byte length form of answers over 2 GiB is understood)."""
    from medvision.serving.worker_processes import _Reading

    body = pickle.dumps({"x": bytes(100_000)})
    for header, split in ((struct.pack("!i", len(body)), 3), (struct.pack("!i", -1) + struct.pack("!Q", len(body)), 4),
                          (struct.pack("!i", -1) + struct.pack("!Q", len(body)), 6)):
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        try:
            reading = _Reading()
            assert reading.more(ours.fileno()) is None  # nothing yet
            theirs.sendall(header[:split])
            assert reading.more(ours.fileno()) is None
            theirs.sendall(header[split:] + body[:50_000])
            assert reading.more(ours.fileno()) is None
            theirs.sendall(body[50_000:])
            assert pickle.loads(reading.more(ours.fileno())) == {"x": bytes(100_000)}
            theirs.close()
            with pytest.raises(EOFError):
                _Reading().more(ours.fileno())
        finally:
            ours.close()
            theirs.close()


def test_an_awaited_call_still_running_at_shutdown_is_told_so():
    """``close()`` (from a thread, as the service's shutdown runs it) settles an awaited call on its event loop before
    closing the worker's pipe: the caller gets WorkersClosed, and the loop watches no closed descriptor."""
    pool = WorkerProcesses(1)

    async def scenario():
        running = asyncio.ensure_future(pool.run_async(time.sleep, (60,), 120))
        await asyncio.sleep(0.2)
        started = time.monotonic()
        await asyncio.get_running_loop().run_in_executor(None, pool.close, 1.0)
        with pytest.raises(WorkersClosed, match="shut down during this call"):
            await running
        return time.monotonic() - started

    assert asyncio.run(scenario()) < 30  # not the 60 s call, nor its 120 s limit
