"""What grows with open streams: `python -m bench.plateau --streams 200,1000,2000`.

For each count N, a fresh gateway (GUNICORN_THREADS above N, so that no stream queues)
relays N long streams at once. Once every stream is open and before any ends, the worker's
threads are sampled from /proc over a fixed window: CPU per relayed chunk by thread role
(gunicorn's main loop, request threads, the disconnect watcher, the master) and context
switches per chunk. A chunk rate that stays the same per stream while CPU per chunk grows
with N is the cost that grows with open streams. `--py-spy` then records the worker with
`--gil --idle` (sampling perturbs it, so after the CPU window) and prints the top frames.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import orjson

from bench.procs import BIN, Cores, process_tree, raise_open_files_limit, start_upstream
from bench.run import GATEWAY_KEY, MODEL, RESULTS, Bench, parse_args
from bench.streams import StreamStats, run_streams, stream_request
from bench.upstream import expected_stream

CHUNKS, DELAY, RAMP = 100, 0.2, 2.0  # 20 s streams: a plateau of ~15 s with all open
# The CPU window opens once every stream has its first byte (at the latest this long after
# the first client, so that it still closes before the first stream ends) and lasts WINDOW.
OPEN_BY, WINDOW = 13.0, 5.0
PY_SPY_SECONDS = 5


@dataclass(frozen=True)
class TaskSample:
    cpu: dict[int, float]  # tid -> CPU seconds
    switches: dict[int, tuple[int, int]]  # tid -> (voluntary, involuntary)


def sample(pid: int) -> TaskSample:
    """CPU and context switches of every thread of `pid`.

    CPU from schedstat (nanoseconds), not stat: stat's per-thread ticks are truncated, and
    a thousand threads that each run a few ms per second would sum to almost nothing.
    """
    cpu, switches = {}, {}
    for tid in (int(t) for t in _listdir(f"/proc/{pid}/task")):
        try:
            schedstat = Path(f"/proc/{pid}/task/{tid}/schedstat").read_text()
            status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        except OSError:
            continue
        cpu[tid] = int(schedstat.split()[0]) / 1e9
        found = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        switches[tid] = (
            int(found["voluntary_ctxt_switches"]),
            int(found["nonvoluntary_ctxt_switches"]),
        )
    return TaskSample(cpu, switches)


def process_user_sys(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a whole process: where the time goes, app or kernel."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def _listdir(path: str) -> list[str]:
    try:
        return [entry.name for entry in Path(path).iterdir()]
    except OSError:
        return []


def thread_names(pid: int) -> dict[int, str]:
    """Python thread names by OS thread id, from one `py-spy dump` (empty without py-spy)."""
    py_spy = shutil.which("py-spy", path=str(BIN)) or shutil.which("py-spy")
    if py_spy is None:
        return {}
    found = subprocess.run(
        [py_spy, "dump", "--pid", str(pid)], capture_output=True, text=True, timeout=60, check=False
    )
    names = {}
    for line in found.stdout.splitlines():
        # Thread 12345 (idle): "disconnect-watcher"
        if line.startswith("Thread ") and '"' in line:
            ident = line.split()[1]
            name = line.split('"')[1]
            if ident.isdigit():
                names[int(ident)] = name
    return names


def role(tid: int, worker: int, names: dict[int, str]) -> str:
    if tid == worker:
        return "main loop"
    name = names.get(tid, "")
    if name == "disconnect-watcher":
        return "disconnect watcher"
    if name.startswith("ThreadPoolExecutor"):
        return "request threads"
    return f"other ({name or 'unnamed'})"


def py_spy_top(pid: int, out: Path, top: int = 12) -> list[tuple[float, str]]:
    """Share of samples per leaf frame, and per frame anywhere on the stack."""
    py_spy = shutil.which("py-spy", path=str(BIN)) or "py-spy"
    subprocess.run(
        [
            *(py_spy, "record", "--pid", str(pid), "--duration", str(PY_SPY_SECONDS)),
            *("--rate", "200", "--gil", "--idle", "--format", "raw", "--output", str(out)),
            "--nonblocking",
        ],
        capture_output=True,
        timeout=PY_SPY_SECONDS + 60,
        check=False,
    )
    leaves: Counter[str] = Counter()
    total = 0
    for line in out.read_text().splitlines() if out.exists() else []:
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        leaves[frames[-1]] += int(count)
        total += int(count)
    return [(100 * n / max(1, total), frame) for frame, n in leaves.most_common(top)]


def _body(chunks: int) -> bytes:
    return orjson.dumps(
        {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": "Hello"}]}
        | {"fake": {"chunks": chunks, "delay": DELAY}}
    )


def _warm(port: int, streams: int) -> None:
    """N overlapping 2 s streams: N threads started and N upstream connections pooled."""
    asyncio.run(
        run_streams(
            port,
            request=stream_request(port, GATEWAY_KEY, _body(10)),
            expected=expected_stream(MODEL, 10),
            concurrency=streams,
            seconds=RAMP + 1,
            per_connection=1,
            stream_timeout=30,
            ramp=RAMP,
        )
    )


def measure(bench: Bench, streams: int, use_py_spy: bool, calibration: bool, warm: bool) -> str:
    shape_body = _body(CHUNKS)
    relay = bench.calibration if calibration else bench.gateway
    with relay(f"plateau-{streams}") as target:
        if warm:
            _warm(target.port, streams)
        worker = next(p for p in process_tree(target.server_pid) if p != target.server_pid)
        found: dict[str, object] = {"start": sample(worker)}
        stats = StreamStats()

        def sampler(started: float) -> None:
            while stats.first_bytes_so_far < streams and time.monotonic() < started + OPEN_BY:
                time.sleep(0.05)
            # Reading thousands of threads takes a while: the window runs from the start of
            # one reading to the start of the next, chunks counted over the same span.
            window_start, events = time.monotonic(), stats.events_so_far
            found["open"], user_sys = sample(worker), process_user_sys(worker)
            found["opened"] = (stats.first_bytes_so_far, window_start - started)
            time.sleep(WINDOW)
            window_end, found["chunks"] = time.monotonic(), stats.events_so_far - events
            found["end"] = sample(worker)
            found["window"] = window_end - window_start
            found["user_sys"] = [
                b - a for a, b in zip(user_sys, process_user_sys(worker), strict=True)
            ]
            found["names"] = thread_names(worker)
            if use_py_spy:
                out = RESULTS / f"py-spy-{streams}.txt"
                found["py-spy"] = py_spy_top(worker, out)

        thread = threading.Thread(target=sampler, args=(time.monotonic(),), daemon=True)
        thread.start()
        asyncio.run(
            run_streams(
                target.port,
                request=stream_request(target.port, GATEWAY_KEY, shape_body),
                expected=expected_stream(MODEL, CHUNKS),
                concurrency=streams,
                seconds=RAMP + 1,
                per_connection=1,
                stream_timeout=CHUNKS * DELAY + 20,
                ramp=RAMP,
                stats=stats,
            )
        )
        thread.join(PY_SPY_SECONDS + 90)
    errors = ", ".join(f"{kind}: {n}" for kind, n in stats.errors.most_common())
    return _report(
        streams, f"{stats.error_count} errors" + (f": {errors}" if errors else ""), found
    )


def _by_role(
    before: TaskSample, after: TaskSample, worker: int, names: dict[int, str]
) -> tuple[Counter[str], Counter[str]]:
    """CPU seconds and (voluntary + involuntary) context switches per thread role."""
    cpu: Counter[str] = Counter()
    switches: Counter[str] = Counter()
    for tid, seconds in after.cpu.items():
        name = role(tid, worker, names)
        cpu[name] += seconds - before.cpu.get(tid, 0.0)
        v0, n0 = before.switches.get(tid, (0, 0))
        switches[name] += after.switches[tid][0] - v0 + after.switches[tid][1] - n0
    return cpu, switches


def _system_share(found: dict[str, object]) -> str:
    user, system = found["user_sys"]  # type: ignore[misc]
    return f"{100 * system / max(1e-9, user + system):.0f}%"


def _report(streams: int, errors: str, found: dict[str, object]) -> str:
    start, opened, end = found["start"], found["open"], found["end"]
    assert isinstance(start, TaskSample) and isinstance(opened, TaskSample)
    assert isinstance(end, TaskSample)
    names = found.get("names") or {}
    assert isinstance(names, dict)
    worker = min(end.cpu)  # the main thread's tid is the process id, the smallest
    window = found["window"]
    assert isinstance(window, float)
    first_bytes, open_after = found["opened"]  # type: ignore[misc]
    # Chunks the client received in the window: fewer than streams x window / delay when
    # the relay falls behind or streams failed.
    chunks = found["chunks"]
    assert isinstance(chunks, int) and chunks > 0
    open_cpu, _ = _by_role(start, opened, worker, names)
    cpu, switches = _by_role(opened, end, worker, names)
    total = sum(cpu.values())
    lines = [
        f"### {streams} streams ({errors})",
        "",
        f"Opening them ({first_bytes} had a first byte {open_after:.1f} s after the first client):"
        f" {1e3 * sum(open_cpu.values()) / streams:.2f} ms CPU per stream. Then for"
        f" {window:.1f} s: worker CPU"
        f" {100 * total / window:.0f}% of a core, {1e6 * total / chunks:.1f} µs per chunk,"
        f" {chunks / window:,.0f} chunks/s (all on time: {streams / DELAY:,.0f}),"
        f" {sum(switches.values()) / chunks:.2f} context switches per chunk;"
        f" {_system_share(found)} of it in the kernel.",
        "",
        "| thread role | opening: ms/stream | open: µs/chunk | open: switches/chunk |",
        "|---|---:|---:|---:|",
        *(
            f"| {name} | {1e3 * open_cpu[name] / streams:.3f} | {1e6 * s / chunks:.1f}"
            f" | {switches[name] / chunks:.2f} |"
            for name, s in cpu.most_common()
        ),
    ]
    if spy := found.get("py-spy"):
        assert isinstance(spy, list)
        lines += ["", "py-spy --gil --idle, leaf frames:", "", "| % samples | frame |"]
        lines += ["|---:|---|", *(f"| {pct:.1f} | `{frame}` |" for pct, frame in spy)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.plateau", description=__doc__)
    parser.add_argument("--streams", default="200,1000,2000")
    parser.add_argument("--py-spy", action="store_true", help="also record with py-spy")
    parser.add_argument(
        "--calibration", action="store_true", help="the calibration relay instead of the gateway"
    )
    parser.add_argument(
        "--warm",
        action="store_true",
        help="first start the threads and upstream connections (N short streams), so that"
        " opening measures requests, not thread and connection start-up",
    )
    parser.add_argument("--gateway-env", action="append", default=[], metavar="NAME=VALUE")
    args = parser.parse_args()
    counts = [int(n) for n in args.streams.split(",")]
    threads = max(counts) + 64
    bench_args = parse_args(
        ["--threads", str(threads), *(f"--gateway-env={e}" for e in args.gateway_env)]
    )
    raise_open_files_limit()
    RESULTS.mkdir(parents=True, exist_ok=True)
    cores = Cores.detect()
    if cores.load is not None:
        os.sched_setaffinity(0, {cores.load})
    upstream, port = start_upstream(cores.load)
    try:
        bench = Bench(bench_args, cores, port)
        sections = [measure(bench, n, args.py_spy, args.calibration, args.warm) for n in counts]
    finally:
        upstream.stop()
    relay = "calibration relay" if args.calibration else "gateway"
    print(f"\n## Open streams through the {relay}", end="")
    warmed = ", threads and connections warmed first" if args.warm else ""
    print(f" (GUNICORN_THREADS={threads}, {CHUNKS} x {DELAY * 1000:g} ms{warmed})\n")
    print("\n\n".join(sections))


if __name__ == "__main__":
    main()
