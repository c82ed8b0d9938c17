"""The allocator setting that lets a gateway's memory go back down after a large body.

glibc serves a large allocation with its own mmap, returned to the system when freed, but
it raises that threshold each time such a block is freed (up to 32 MiB). After a few 10 MB
request bodies, the next ones come from the heap arenas of whichever threads read them and
stay there: measured +38 MB of RSS that never went away after eight concurrent 10 MB
bodies. Fixing the threshold keeps buffers over 128 KiB on mmap: RSS returns to idle.
"""

from __future__ import annotations

import ctypes
import ctypes.util

_M_MMAP_THRESHOLD = -3  # from glibc's malloc.h
_THRESHOLD_BYTES = 128 * 1024  # glibc's own starting value, now kept fixed


def return_large_buffers_to_the_system() -> None:
    """Set once per process (before gunicorn forks, the workers inherit it)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return
    libc = ctypes.CDLL(name)
    mallopt = getattr(libc, "mallopt", None)  # glibc only; musl has none and needs none
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, _THRESHOLD_BYTES)
