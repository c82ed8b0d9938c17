"""The request threads: their stack size, and all of them started at boot."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent import futures

# Stack of each request thread. Measured: at 512 KiB a recursion through C slots (a
# `__getattr__` calling itself) segfaults the process before Python's recursion limit
# stops it; from 768 KiB it ends in RecursionError. 1 MiB keeps that margin, and 2,048
# threads reserve 2 GiB of address space instead of 16 GiB at the usual 8 MiB (only
# touched pages cost memory either way).
THREAD_STACK_BYTES = 1024 * 1024


def thread_pool(count: int, alive: Callable[[], None]) -> futures.ThreadPoolExecutor:
    """A pool of `count` threads, every one of them started before this returns."""
    # Process-wide, for threads started from now on: the pool's among them.
    threading.stack_size(THREAD_STACK_BYTES)
    pool = futures.ThreadPoolExecutor(max_workers=count)
    start_every_thread(pool, count, alive)
    return pool


def start_every_thread(
    pool: futures.ThreadPoolExecutor, count: int, alive: Callable[[], None] = lambda: None
) -> None:
    """Start all `count` threads of `pool` now, at boot, rather than one per request.

    The executor starts a thread on a submit that finds none idle, and `Thread.start()`
    waits until the new thread has run: in a burst of streams, with hundreds of threads
    contending for the GIL, that wait stalled the main loop (accepts, heads, probes) for
    seconds. Started at boot, the worker's memory is also its peak from the first second,
    and a thread limit too low for GUNICORN_THREADS fails the boot, not a request.
    `alive` is called as threads start: on a loaded machine starting 2,048 threads can
    take longer than the arbiter's heartbeat timeout.
    """
    # No task ends before all have started, so every submit finds no idle thread.
    everyone = threading.Barrier(count)
    started = []
    for n in range(count):
        started.append(pool.submit(everyone.wait, 120))
        if n % 64 == 0:
            alive()
    for future in started:
        future.result(timeout=180)
