"""One way to start worker processes for CPU-bound DICOM work (scanning, decoding, de-identifying), and one way
for a decoding worker to get its preprocessing: ``decoding_pool`` (or, on Ray, ``start_decoder`` in the task) hands
it the ``PreprocessConfig`` as JSON and the ``ReadLimits``; the worker's code reads them back with ``decoder()``.
Every decoding pool uses it: the training cache, archive scoring (local and Ray) and the service's decode pool
(whose workers ``serving/worker_processes.py`` starts with ``start_decoder``). How many: ``medvision.cores``.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor

from medvision.dicom_io import ReadLimits
from medvision.memory import keep_freed_memory
from medvision.preprocess import Preprocess, PreprocessConfig
from medvision.resolution import use_decode_threads


def process_pool(workers: int, initializer: Callable | None = None, initargs: tuple = ()) -> ProcessPoolExecutor:
    """A process pool that forks where the platform can (Linux).

    Forking starts workers in milliseconds and does not re-import the caller's ``__main__`` (spawn does,
    which breaks scripts without a main guard and code piped to ``python -``). The workers run only
    pydicom, codecs and numpy, never torch, so a parent that imported torch is safe to fork, as
    PyTorch's own DataLoader workers are. A parent with threads of its own that may hold locks (the service) must
    spawn instead, as ``medvision.serving.worker_processes`` does: a forked child would inherit a lock held by
    another thread, forever.
    """
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method), initializer=initializer,
                               initargs=initargs)


_decoder: tuple[Preprocess, ReadLimits] | None = None


def start_decoder(config_json: str, limits: ReadLimits = ReadLimits(), parent: int | None = None) -> None:
    """Make this process a decoding worker: its ``Preprocess`` from the config's JSON, its read limits; with
    ``parent``, it exits when that process is gone (a pool's workers wait for work forever, and a parent killed
    with -9 has no time to shut its pool down)."""
    global _decoder
    keep_freed_memory()
    use_decode_threads(1)  # one file at a time, beside a worker per core: threads of its own would only compete
    _decoder = (Preprocess(PreprocessConfig.model_validate_json(config_json)), limits)
    if parent is not None:
        threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()


def _exit_with(parent: int) -> None:
    while os.getppid() == parent:  # re-parented: the parent is gone
        time.sleep(1)
    os._exit(0)


def decoder() -> tuple[Preprocess, ReadLimits]:
    """This worker's preprocessing and read limits (``start_decoder``)."""
    if _decoder is None:
        raise RuntimeError("not a decoding worker: start it with decoding_pool() or start_decoder()")
    return _decoder


def is_decoder() -> bool:
    return _decoder is not None


def decoding_pool(workers: int, config: PreprocessConfig, limits: ReadLimits = ReadLimits()) -> ProcessPoolExecutor:
    """``workers`` decoding worker processes for ``config``."""
    return process_pool(workers, start_decoder, (config.model_dump_json(), limits))
