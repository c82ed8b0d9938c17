"""gunicorn with a CPU-time profiler in every request thread: `python -m bench.cpuprofile`.

Used by `bench.run --profile` instead of plain `gunicorn -c gunicorn.conf.py app:app` (same
config, same app). Why not only py-spy: with a hundred threads on one core, py-spy counts a
thread as active while it is runnable but waiting for the CPU, so its samples pile up on
whatever call each thread woke from (queue.get, recv, a lock). cProfile with
`time.thread_time` as its clock charges each function only the CPU its own thread spent, so
waiting costs nothing; the price is a slower (deterministic) profile, so compare shares,
not absolute times.

Each worker writes `<BENCH_PROFILE_DIR>/worker-<pid>.pstats` when it exits.
"""

from __future__ import annotations

import atexit
import cProfile
import os
import pstats
import sys
import threading
import time
from pathlib import Path
from typing import Any


class _Profile(cProfile.Profile):
    def create_stats(self) -> None:
        """The finished calls, read without stopping the profiler (pstats.Stats calls this).

        Not cProfile's `create_stats()`: it calls `disable()`, which closes every call still
        open on the profiler's stack with the clock of the thread that calls it (at exit the
        main thread's CPU time), so each idle pool thread's pending queue wait and each
        watcher's pending poll were charged the main thread's CPU minus their own: waiting
        that never ran, in earlier profiles a third of the total each for lock acquire and
        epoll poll. A call that has not returned by the end is left out of every table.
        """
        self.snapshot_stats()


_profiles: list[_Profile] = []
_lock = threading.Lock()


def _start_in_this_thread(*_: Any) -> None:
    """threading's profile hook: replaced, on a new thread's first call, by a real profiler."""
    sys.setprofile(None)
    profiler = _Profile(time.thread_time)
    with _lock:
        _profiles.append(profiler)
    profiler.enable()


def _dump(master_pid: int, out_dir: Path) -> None:
    if os.getpid() == master_pid:
        return
    with _lock:
        profilers = list(_profiles)
    if not profilers:
        return
    stats: pstats.Stats | None = None
    for profiler in profilers:
        profiler.create_stats()
        if not profiler.stats:  # type: ignore[attr-defined]
            continue  # a pool thread that never finished a call (pstats refuses empty stats)
        if stats is None:
            stats = pstats.Stats(profiler)
        else:
            stats.add(profiler)
    if stats is not None:
        stats.dump_stats(out_dir / f"worker-{os.getpid()}.pstats")


def _forget_the_boot() -> None:
    """Profile requests, not the worker's boot: each profile starts with its thread, and the
    first task of every pool thread is the barrier that starts all 2,048 of them at once
    (their wake-ups were 1.4-4.4% of a profile, as "lock acquire"). Cleared once they run."""
    from gateway.server import threads

    start_every_thread = threads.start_every_thread

    def start_then_forget(*args: Any, **kwargs: Any) -> None:
        start_every_thread(*args, **kwargs)
        with _lock:
            for profiler in _profiles:
                profiler.clear()

    threads.start_every_thread = start_then_forget


def main() -> None:
    from gunicorn.app.wsgiapp import run

    out_dir = Path(os.environ.get("BENCH_PROFILE_DIR", "."))
    out_dir.mkdir(parents=True, exist_ok=True)
    # Set in the master, inherited by the forked worker: every thread it starts is profiled.
    threading.setprofile(_start_in_this_thread)
    _forget_the_boot()
    atexit.register(_dump, os.getpid(), out_dir)
    sys.argv = ["gunicorn", *sys.argv[1:]]
    run()


if __name__ == "__main__":
    main()
