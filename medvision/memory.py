"""Keep freed memory for the next image instead of handing it back to the system.

A full-field mammogram passes through buffers of 10-70 MB (the request body, the decoded frame, the low-pass
levels). glibc's allocator serves blocks that large with fresh ``mmap`` pages and returns them on ``free``, so every
image pays the kernel to fault in and zero its pages again: measured here, a quarter of the time of an RLE or
JPEG-LS image and half the time of receiving an uncompressed 17 MB body. Raising the mmap and trim thresholds keeps
those pages in the heap for the next image. The price is that the process's resident memory stays at its peak
(about one set of buffers per concurrent decode) instead of shrinking between images.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
THRESHOLD = 1 << 30  # blocks up to 1 GiB come from the heap; freed memory below 2 GiB at its top is kept

_done = False


def keep_freed_memory() -> bool:
    """Tune glibc's allocator for image-sized buffers (once per process); False where there is no glibc."""
    global _done
    if _done:
        return True
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl, macOS, Windows: their allocators behave otherwise
        return False
    # an older glibc caps the mmap threshold at half its arena size (32 MiB): still above most image buffers
    ok = any(mallopt(M_MMAP_THRESHOLD, size) for size in (THRESHOLD, 32 << 20))
    ok = bool(mallopt(M_TRIM_THRESHOLD, 2 * THRESHOLD - 1)) and ok
    if not ok:
        log.debug("mallopt refused the thresholds; the allocator keeps its defaults")
    _done = ok
    return ok
