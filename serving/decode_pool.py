"""Decoding in worker processes (``MEDVISION_DECODE_PROCESSES``).

In threads, DICOM parsing and several codecs (GDCM's bindings, pydicom itself) hold the GIL, so a busy service
decodes about one image at a time whatever the cores. Worker processes decode side by side, one file each at a time
(``worker_processes``), and a codec that dies natively (an uncaught C++ exception, a segfault) takes down one
worker, not the service: its file is refused with ``decoder_crashed``, the worker replaced, and no other request is
touched.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np

from medvision.cores import usable_cores
from medvision.dicom_io import DicomMeta, ReadLimits, read_dicom
from medvision.drift import input_statistics
from medvision.errors import CorruptDicomError, MedvisionError
from medvision.parallel import decoder, start_decoder
from medvision.preprocess import PreprocessConfig
from medvision.resolution import use_decode_threads
from medvision.serving.batcher import TimedOut
from medvision.serving.worker_processes import (
    WorkerDied,
    WorkerProcesses,
    WorkersBusy,
    WorkersClosed,
    WorkerTimedOut,
)

log = logging.getLogger("medvision.serving")


class DecoderCrashed(CorruptDicomError):
    code = "decoder_crashed"


class DecodersStopped(MedvisionError):
    """The decoding workers were shut down (the service stopping) before this file reached one: answered 503."""

    code = "shutting_down"


class DecodeTooSlow(CorruptDicomError):
    """A file whose decoding outlasted the pool's time limit even alone in a worker (fuzzing found codestreams of
    10 kB that keep a JPEG-LS decoder busy for seconds): refused, its worker stopped."""

    code = "decode_too_slow"


def _prepare(data: Shared | Path | bytes, want_ids: bool,
             want_statistics: bool = False) -> tuple[np.ndarray, DicomMeta, dict[str, str], dict[str, float] | None]:
    """In a worker: the model input, its metadata, the identifiers asked for and, asked for, the drift watch's
    statistics of the input (``drift.input_statistics``: computed here, off the service's process)."""
    preprocess, limits = decoder()
    ids: dict[str, str] = {}
    if isinstance(data, Shared):
        with data.attach() as view:
            stored, meta = preprocess.read(view, limits, ids if want_ids else None)
    else:
        stored, meta = preprocess.read(data, limits, ids if want_ids else None)
    x = preprocess(stored, meta)
    return x, meta, ids, input_statistics(x, preprocess.cfg) if want_statistics else None


def _read(path: str, limits: ReadLimits, long_side: int, threads: int = 1) -> tuple[np.ndarray, DicomMeta]:
    """In a worker: ``read_dicom`` of a stored file (a rendering of the review UI whose decode would hold the
    service's GIL), with OpenJPEG on ``threads`` threads (the cores no other worker was busy on), then back to one."""
    use_decode_threads(threads)
    try:
        return read_dicom(path, limits, long_side=long_side)
    finally:
        use_decode_threads(1)


@dataclass(frozen=True)
class Shared:
    """A request body handed to a worker in shared memory: one copy in, none out (a pickled 17 MB body is copied
    four times on its way through a pipe). The service owns the segment; the worker reads it in place. A ``kept``
    segment is one of the pool's (``Segments``): reused request after request, so neither side pays the page faults
    of fresh memory again, and the worker keeps it mapped."""

    name: str
    size: int
    kept: bool = False

    @contextmanager
    def attach(self):
        segment = _mapped.get(self.name) if self.kept else None
        if segment is None:
            # attaching registers the name with the resource tracker again: the service's own (spawned workers
            # share it), where it already is. It is not unregistered here: that would take the service's entry out,
            # and a service killed with -9 would leave its segments in /dev/shm for good instead of the tracker
            # unlinking them.
            segment = shared_memory.SharedMemory(name=self.name)
            if self.kept:
                _remember(self.name, segment)
        view = segment.buf[:self.size]
        try:
            yield view
        finally:
            view.release()
            if not self.kept:
                _close(segment)


@dataclass
class Received:
    """``size`` bytes in a segment the service owns (``Segments.receiving``): decoded in place by a worker
    (``shared``) or by a thread of the service (``view``). ``abandoned``: a worker may still be reading it after its
    request ended (the request was cancelled mid-decode), so the segment is let go, never handed to another body."""

    segment: shared_memory.SharedMemory
    size: int
    abandoned: bool = False

    def view(self) -> memoryview:
        return self.segment.buf[:self.size]

    @property
    def shared(self) -> Shared:
        # a worker keeps a kept segment mapped for the next request; a giant one (not kept) it unmaps after use
        return Shared(self.segment.name, self.size, kept=self.segment.size <= KEEP_MAX)

    def __len__(self) -> int:
        return self.size


_mapped: dict[str, shared_memory.SharedMemory] = {}  # in a worker: the pool's segments it has mapped
MAPPED_MAX = 32


def _remember(name: str, segment: shared_memory.SharedMemory) -> None:
    # A new segment: the service may have let one go that this worker still maps (replaced by a larger one). Its
    # memory stays allocated in /dev/shm for as long as any process maps it: mappings of unlinked segments go now.
    for gone in [n for n in _mapped if not _linked(n)]:
        _close(_mapped.pop(gone))
    if len(_mapped) >= MAPPED_MAX:  # still too many: let the oldest go
        _close(_mapped.pop(next(iter(_mapped))))
    _mapped[name] = segment


def _linked(name: str, folder: str = "/dev/shm") -> bool:
    """Whether the segment ``name`` still exists (where POSIX shared memory shows as files; elsewhere assumed)."""
    return not os.path.isdir(folder) or os.path.exists(os.path.join(folder, name.lstrip("/")))


def _close(segment: shared_memory.SharedMemory) -> None:
    try:
        segment.close()
    except BufferError:  # a view made while decoding outlived it: collected with the worker's next call
        gc.collect()
        segment.close()


SEGMENT_STEP = 8 << 20  # segment sizes are multiples of 8 MiB: a full-field image fits a 24 MiB one
KEEP_MAX = 64 << 20  # larger segments (a multi-frame body) are unlinked after use, not kept


class Segments:
    """The service's shared-memory segments for request bodies, kept for reuse (at most ``keep``). When none is free
    or /dev/shm lacks the room (a container's default is 64 MB, and a full tmpfs kills the writer with SIGBUS), the
    body goes to the worker through the pipe instead: slower, never a crash."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.free: list[shared_memory.SharedMemory] = []
        self.count = 0
        self.lock = threading.Lock()

    @contextmanager
    def holding(self, data: bytes):
        """``Shared`` holding ``data``, or ``data`` itself when shared memory cannot take it."""
        with self.receiving(len(data)) as received:
            if received is None:
                yield data  # through the pipe: no shared copy to make
                return
            received.view()[:] = data
            yield received.shared

    @contextmanager
    def receiving(self, size: int):
        """A ``Received`` of ``size`` bytes in one of the kept segments, to fill (a request body read straight into
        it: no copy in the service's memory first), or None when none is free or /dev/shm lacks the room."""
        segment = self._take(size)
        if segment is None:
            yield None
            return
        received = Received(segment, size)
        try:
            yield received
        finally:
            with self.lock:
                # a rare giant: its memory goes back now rather than stay pinned; an abandoned one: the worker still
                # reading it keeps its own mapping, and no other body is ever written under it
                if segment.size > KEEP_MAX or received.abandoned:
                    self._drop(segment)
                else:
                    self.free.append(segment)

    def _take(self, size: int) -> shared_memory.SharedMemory | None:
        with self.lock:
            fitting = [s for s in self.free if s.size >= size]
            if fitting:
                best = min(fitting, key=lambda s: s.size)
                self.free.remove(best)
                return best
            if self.count >= self.keep:
                if not self.free:
                    return None
                self._drop(self.free.pop(0))  # a smaller free one makes room for this size
            wanted = max(SEGMENT_STEP, -(-size // SEGMENT_STEP) * SEGMENT_STEP)
            if not _shm_has_room(wanted):
                return None
            self.count += 1
        return shared_memory.SharedMemory(create=True, size=wanted)

    def _drop(self, segment: shared_memory.SharedMemory) -> None:
        self.count -= 1
        segment.unlink()  # first: whatever happens to the mapping, the memory goes once its last view does
        try:
            _close(segment)
        except BufferError:  # a view of it is still held (a thread reading it when its request was cancelled)
            log.warning("a shared segment is still viewed: it is unmapped when the view goes")

    def close(self) -> None:
        with self.lock:
            while self.free:
                self._drop(self.free.pop())


def _handed(outcome: tuple, identifiers: dict[str, str] | None,
            statistics: dict[str, float] | None) -> tuple[np.ndarray, DicomMeta]:
    """A worker's (x, meta, ids, statistics), its out-parameters copied into the caller's dicts."""
    x, meta, ids, stats = outcome
    if identifiers is not None:
        identifiers.update(ids)
    if statistics is not None:
        statistics.update(stats)
    return x, meta


def _shm_has_room(size: int, folder: str = "/dev/shm") -> bool:
    try:
        st = os.statvfs(folder)
    except OSError:  # no such folder (not Linux): let SharedMemory decide
        return True
    return st.f_bavail * st.f_frsize >= 2 * size  # room for it and to spare


READ_WAIT_S = 2.0  # a review UI read waits this long for a free worker, then decodes in its own thread


class DecodePool:
    """``prepare(data, identifiers)`` as ``Engine.prepare`` does it, in one of ``processes`` worker processes
    (``data``: the bytes of a DICOM file, handed over in shared memory, or its path, read by the worker). Each worker
    decodes one file at a time (``WorkerProcesses``): a file that kills its worker or holds it past ``timeout_s`` is
    refused by name, its worker replaced, and no other request is touched."""

    def __init__(self, config: PreprocessConfig, limits: ReadLimits, processes: int, target=_prepare,
                 timeout_s: float = 30.0) -> None:
        self.processes, self.target = processes, target
        self.timeout_s = timeout_s
        # waiting for a free worker: bounded (a pool that cannot start workers must not hang its callers), and long
        # enough for the queue of a busy service and a worker being replaced after a slow file
        self.wait_s = 4 * timeout_s
        self.segments = Segments(keep=4 * processes + 2)  # requests being received and decoded, each holding one
        # spawned: the service has threads (a forked child could inherit a held lock); a worker ends with the
        # service, even one killed with -9
        self.workers = WorkerProcesses(processes, start_decoder, (config.model_dump_json(), limits, os.getpid()))

    def prepare(self, data: bytes | Path | Received, identifiers: dict[str, str] | None = None,
                statistics: dict[str, float] | None = None) -> tuple[np.ndarray, DicomMeta]:
        """(model input, metadata); ``identifiers`` and ``statistics`` (the drift watch's, of the input), where
        given, are filled in by the worker."""
        if isinstance(data, Received):  # already in one of this pool's segments
            return self._prepare(data.shared, identifiers, statistics)
        if isinstance(data, (bytes, bytearray)):
            with self.segments.holding(data) as shared:
                return self._prepare(shared, identifiers, statistics)
        return self._prepare(data, identifiers, statistics)

    def _prepare(self, data: Shared | Path | bytes, identifiers: dict[str, str] | None,
                 statistics: dict[str, float] | None) -> tuple[np.ndarray, DicomMeta]:
        with self._refusing():
            outcome = self.workers.run(self.target, (data, identifiers is not None, statistics is not None),
                                       self.timeout_s, self.wait_s)
        return _handed(outcome, identifiers, statistics)

    async def prepare_async(self, data: Received, identifiers: dict[str, str] | None = None,
                            statistics: dict[str, float] | None = None) -> tuple[np.ndarray, DicomMeta]:
        """``prepare`` of a body in one of this pool's segments, awaited on the event loop: no thread of the service
        hands it over or waits on the worker."""
        args = (data.shared, identifiers is not None, statistics is not None)
        try:
            with self._refusing():
                outcome = await self.workers.run_async(self.target, args, self.timeout_s, self.wait_s)
        except asyncio.CancelledError:
            data.abandoned = True  # a worker may still be reading its segment
            raise
        return _handed(outcome, identifiers, statistics)

    def read(self, path: str | Path, limits: ReadLimits, long_side: int) -> tuple[np.ndarray, DicomMeta]:
        """``read_dicom(path, limits, long_side=long_side)`` in a worker: the stored pixels come back (the review
        UI's renderings of a file whose decoder would hold the service's GIL for the whole decode). A reader does not
        queue behind a scoring load: with no worker free within ``READ_WAIT_S``, the file is decoded in the calling
        thread, as it was before there were workers."""
        threads = max(1, min(len(self.workers.idle), usable_cores()))  # a reader's view alone: on the idle cores
        try:
            with self._refusing():
                return self.workers.run(_read, (str(path), limits, long_side, threads), self.timeout_s, READ_WAIT_S)
        except TimedOut:
            return read_dicom(path, limits, long_side=long_side)

    @contextmanager
    def _refusing(self):
        """A worker's death or time-out, as the refusal of the file it was decoding."""
        try:
            yield
        except WorkerDied:
            log.error("a decoding worker process died on a file; it was replaced")
            raise DecoderCrashed("the image decoder crashed on this file (its worker process died): refused; "
                                 "the service carries on") from None
        except WorkerTimedOut:
            log.error("a decoding worker outlasted %g s on a file; it was stopped and replaced", self.timeout_s)
            raise DecodeTooSlow(f"decoding this file took longer than {self.timeout_s:g} s: refused (a pathological "
                                "or hostile codestream); the service carries on") from None
        except WorkersBusy as exc:
            raise TimedOut(f"{exc}: the service is at capacity; retry later") from None
        except WorkersClosed:
            raise DecodersStopped("the service is shutting down: this image was not decoded; retry in a moment") \
                from None

    def close(self) -> None:
        self.workers.close()
        self.segments.close()
