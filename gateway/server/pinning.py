"""GUNICORN_PIN_WORKERS: each worker process on a CPU of its own.

A worker is one process with one GIL and thousands of threads. Left to the scheduler, its
threads run on every core, and each GIL hand-off between two of them on different cores
is a cross-core wake-up (an inter-processor interrupt, slow in a VM): measured on two
cores, two unpinned workers served no more than one pinned worker (1.01x), two pinned
ones 1.77x (bench: scale-json, scale-json-pinned). Pinned, a worker's threads hand the
GIL over on one core.

Off by default: where CPUs are shared with other processes (a container with a CPU quota
but every core of the node visible), a pinned worker cannot move off a core that another
process keeps busy. Turn it on where the gateway has its cores to itself: a VM, or a pod
with whole CPUs under the static CPU manager.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable
from typing import Any


def choose_core(worker: Any, siblings: Iterable[Any]) -> None:
    """In the master, before the fork: the allowed CPU with the fewest live workers."""
    allowed = sorted(os.sched_getaffinity(0))
    taken = Counter(getattr(sibling, "gateway_core", None) for sibling in siblings)
    worker.gateway_core = min(allowed, key=lambda core: (taken[core], core))


def pin(worker: Any) -> None:
    """In the new worker, before it starts a thread: every thread inherits the core."""
    core = getattr(worker, "gateway_core", None)
    if core is not None:
        os.sched_setaffinity(0, {core})
