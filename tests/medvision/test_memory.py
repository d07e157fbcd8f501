"""Freed image-sized buffers stay in the process for the next image (glibc), instead of being unmapped and faulted in
again: observed as resident memory that does not fall back after a 64 MB buffer is freed."""

import subprocess
import sys

import pytest

PROBE = """
import sys
import numpy as np
from medvision.memory import keep_freed_memory
if sys.argv[1] == "tuned":
    assert keep_freed_memory() and keep_freed_memory()  # once per process; a second call is a no-op
def resident():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
before = resident()
buffer = np.ones(64 << 20, np.uint8)  # written, so its pages are resident
del buffer
print(resident() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator and /proc are Linux's")
def test_a_freed_image_buffer_is_kept_for_the_next_image():
    def kept(mode: str) -> int:
        done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
        return int(done.stdout)

    assert kept("default") < 8 << 20  # glibc's default: a block this large is mmapped and handed back on free
    assert kept("tuned") > 56 << 20  # tuned: the pages stay, ready for the next image
