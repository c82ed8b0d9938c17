"""Where the gateway worker's CPU goes, for `bench.run --profile`.

Two views of one scenario (JSON c=64 by default):
- threads: CPU per request of gunicorn's main loop, its request threads and the master,
  from /proc/<pid>/task/*/stat of an unprofiled gateway (nothing perturbs it);
- functions: a cProfile run in every request thread with a per-thread CPU clock
  (bench/cpuprofile.py), summed by function (own and total time) and by package.
"""

from __future__ import annotations

import os
import pstats
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

_SITE = re.compile(r"^.*?/(?:site-packages|lib/python3\.\d+)/")
# Frames that only wrap the request (thread start-up, the pool), left out of "total".
_WRAPPERS = ("threading.py", "concurrent/futures/")

FunctionKey = tuple[str, int, str]


@dataclass(frozen=True)
class ThreadCpu:
    """CPU seconds of a gunicorn tree, split by role."""

    main_loop: float
    request_threads: float
    master: float


def thread_cpu(master: int, workers: Sequence[int]) -> ThreadCpu:
    main_loop = request_threads = 0.0
    for worker in workers:
        for tid, seconds in _task_seconds(worker).items():
            if tid == worker:
                main_loop += seconds
            else:
                request_threads += seconds
    return ThreadCpu(main_loop, request_threads, sum(_task_seconds(master).values()))


def _task_seconds(pid: int) -> dict[int, float]:
    # schedstat's nanoseconds, not stat's clock ticks: those are truncated per thread, and
    # hundreds of stream threads using a few ms each would add up to almost nothing.
    found = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            text = Path(f"/proc/{pid}/task/{tid}/schedstat").read_text()
        except OSError:
            continue
        found[int(tid)] = int(text.split()[0]) / 1e9
    return found


def thread_split_markdown(scenario: str, before: ThreadCpu, after: ThreadCpu, requests: int) -> str:
    def per_request(role: str) -> str:
        spent = getattr(after, role) - getattr(before, role)
        return f"{spent * 1000 / max(1, requests):.3f}"

    return "\n".join(
        [
            "| gateway CPU ms/request | main loop (accept, poll, keep-alive) |"
            " request threads (parse, app, relay, write) | master |",
            "|---|---:|---:|---:|",
            f"| {scenario}, unprofiled | {per_request('main_loop')} |"
            f" {per_request('request_threads')} | {per_request('master')} |",
        ]
    )


def function_name(key: FunctionKey) -> str:
    filename, line, name = key
    if filename == "~":
        return name  # a C function: "{method 'acquire' of '_thread.lock' objects}"
    return f"{name} ({_SITE.sub('', filename)}:{line})"


def package(filename: str) -> str:
    """'…/site-packages/flask_limiter/x.py' -> 'flask_limiter'; stdlib keeps its module."""
    if "/site-packages/" in filename:
        return filename.split("/site-packages/", 1)[1].split("/", 1)[0].removesuffix(".py")
    if (stdlib := re.search(r"/lib/python3\.\d+/([^/]+)", filename)) is not None:
        return "stdlib " + stdlib.group(1).removesuffix(".py")
    if "/gateway/" in filename:
        return "gateway (this repo)"
    return filename


def _own_by_package(stats: Mapping[FunctionKey, tuple]) -> Counter[str]:
    """Own time per package; a C function's time goes to the package that called it."""
    owners: Counter[str] = Counter()
    for (filename, _, _), (_, _, own, _, callers) in stats.items():
        if filename != "~":
            owners[package(filename)] += own
            continue
        for caller, caller_stats in callers.items():
            owners[package(caller[0]) if caller[0] != "~" else "C builtins"] += caller_stats[2]
    return owners


def _requests_served(stats: Mapping[FunctionKey, tuple]) -> int:
    """Calls of gunicorn's handle_request: every request the profiled worker served."""
    return sum(
        entry[1]
        for (filename, _, name), entry in stats.items()
        if name == "handle_request" and filename.endswith("gunicorn/workers/gthread.py")
    )


def functions_markdown(pstats_path: Path, top: int = 15) -> str:
    stats: Mapping[FunctionKey, tuple] = pstats.Stats(str(pstats_path)).stats  # type: ignore[attr-defined]
    total_cpu = sum(entry[2] for entry in stats.values())
    requests = max(1, _requests_served(stats))
    own = sorted(stats.items(), key=lambda item: item[1][2], reverse=True)[:top]
    cumulative = sorted(
        (item for item in stats.items() if not any(w in item[0][0] for w in _WRAPPERS)),
        key=lambda item: item[1][3],
        reverse=True,
    )[:top]

    def share(seconds: float) -> str:
        return f"{100 * seconds / total_cpu:.1f}"

    lines = [
        f"Profiled CPU: {total_cpu:.2f} s in request threads for {requests} requests"
        f" (cProfile, thread CPU clock; raw: `{pstats_path}`).",
        "",
        "| % own | % total | calls/request | function |",
        "|---:|---:|---:|---|",
    ]
    lines += [
        f"| {share(e[2])} | {share(e[3])} | {e[1] / requests:.1f} | `{function_name(k)}` |"
        for k, e in own
    ]
    lines += ["", "By total (inclusive) time:", "", "| % total | % own | function |"]
    lines += ["|---:|---:|---|"]
    lines += [f"| {share(e[3])} | {share(e[2])} | `{function_name(k)}` |" for k, e in cumulative]
    lines += ["", "Own time by package (C calls charged to their caller):", ""]
    lines += ["| % own | package |", "|---:|---|"]
    lines += [
        f"| {share(seconds)} | {name} |"
        for name, seconds in _own_by_package(stats).most_common(top)
    ]
    return "\n".join(lines)
