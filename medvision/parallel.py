"""One way to start worker processes for CPU-bound DICOM work (scanning, decoding, de-identifying)."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor


def process_pool(workers: int, initializer: Callable | None = None, initargs: tuple = ()) -> ProcessPoolExecutor:
    """A process pool that forks where the platform can (Linux).

    Forking starts workers in milliseconds and does not re-import the caller's ``__main__`` (spawn does,
    which breaks scripts without a main guard and code piped to ``python -``). The workers run only
    pydicom, codecs and numpy, never torch, so a parent that imported torch is safe to fork, as
    PyTorch's own DataLoader workers are.
    """
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else None)
    return ProcessPoolExecutor(workers, mp_context=ctx, initializer=initializer, initargs=initargs)
