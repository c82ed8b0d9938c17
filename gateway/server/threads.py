"""The request threads: their stack size, all of them started at boot, and whether a new
worker's threads fit the process's limits at all (`boot_shortfall`, asked before a reload)."""

from __future__ import annotations

import contextlib
import os
import resource
import threading
from collections.abc import Callable
from concurrent import futures
from pathlib import Path

# Stack of each request thread. Measured: at 512 KiB a recursion through C slots (a
# `__getattr__` calling itself) segfaults the process before Python's recursion limit
# stops it; from 768 KiB it ends in RecursionError. 1 MiB keeps that margin, and 2,048
# threads reserve 2 GiB of address space instead of 16 GiB at the usual 8 MiB (only
# touched pages cost memory either way).
THREAD_STACK_BYTES = 1024 * 1024
# Beside each stack: glibc's guard page and the thread's own state.
_PER_THREAD_EXTRA_BYTES = 64 * 1024
# What a worker maps beyond the master's pages and its stacks as it boots (its poller, the
# first requests' buffers): measured ~20 MiB, doubled.
_BOOT_HEADROOM_BYTES = 48 * 1024 * 1024
# Descriptors a worker needs besides its clients' (listener, pipes, poller, logs, files).
_BASE_DESCRIPTORS = 64


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


def boot_shortfall(threads: int, workers: int) -> str | None:
    """Why `workers` new workers of `threads` request threads could not boot in this
    process's limits (forked from it, they inherit them), or None if they fit.

    Checked before a reload is accepted: address space for the stacks (`ulimit -v`), the
    process or cgroup task limit (`ulimit -u`, pids.max: the old workers' threads still
    count while they drain) and open files (one client socket per thread at least).
    """
    stacks = threads * (THREAD_STACK_BYTES + _PER_THREAD_EXTRA_BYTES)
    address_space = resource.getrlimit(resource.RLIMIT_AS)[0]
    needed = _mapped_bytes() + stacks + _BOOT_HEADROOM_BYTES
    if address_space != resource.RLIM_INFINITY and needed > address_space:
        return (
            f"GUNICORN_THREADS={threads} needs about {needed >> 20} MiB of address space per "
            f"worker (1 MiB of stack per thread), more than its limit (ulimit -v) of "
            f"{address_space >> 20} MiB"
        )
    tasks = _task_room()
    if tasks is not None and workers * (threads + 8) > tasks:
        return (
            f"GUNICORN_WORKERS={workers} x GUNICORN_THREADS={threads} threads do not fit in "
            f"the {tasks} more threads the process limits allow (ulimit -u, pids.max)"
        )
    files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if files != resource.RLIM_INFINITY and files < threads + _BASE_DESCRIPTORS:
        return (
            f"GUNICORN_THREADS={threads} needs at least {threads + _BASE_DESCRIPTORS} open "
            f"files per worker, more than its limit (ulimit -n) of {files}"
        )
    return None


def _mapped_bytes() -> int:
    """This process's address space in use (a forked worker starts with all of it)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _task_room() -> int | None:
    """How many more threads may start: the tightest of RLIMIT_NPROC (not enforced for
    root) and the cgroup's pids.max; None if neither limits."""
    rooms = []
    nproc = resource.getrlimit(resource.RLIMIT_NPROC)[0]
    if nproc != resource.RLIM_INFINITY and os.geteuid() != 0:
        rooms.append(nproc - _threads_of_this_user())
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controllers in ("", "pids"):
                base = Path("/sys/fs/cgroup", "pids" if controllers else "", path.lstrip("/"))
                limit = (base / "pids.max").read_text().strip()
                if limit != "max":
                    rooms.append(int(limit) - int((base / "pids.current").read_text()))
    return min(rooms) if rooms else None


def _threads_of_this_user() -> int:
    uid, count = str(os.getuid()), 0
    for status in Path("/proc").glob("[0-9]*/status"):
        with contextlib.suppress(OSError):
            fields = dict(
                line.split(":", 1) for line in status.read_text().splitlines() if ":" in line
            )
            if fields.get("Uid", "").split()[:1] == [uid]:
                count += int(fields.get("Threads", "1"))
    return count
