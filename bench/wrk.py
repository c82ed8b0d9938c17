"""JSON load from wrk: a POST per request (bench/chat.lua), results parsed from one line."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from bench.procs import pinned

SCRIPT = Path(__file__).with_name("chat.lua")


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    p50: float
    p99: float
    errors: dict[str, int]

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


def require_wrk() -> str:
    found = shutil.which("wrk")
    if found is None:
        raise SystemExit("wrk is not installed: run `make bench`, or `apt-get install wrk`")
    return found


def run_wrk(
    url: str, *, body: bytes, key: str, connections: int, seconds: float, core: int | None
) -> WrkResult:
    """wrk with one thread (it shares a core with the upstream), bounded by time."""
    command = pinned(
        [
            require_wrk(),
            "-t1",
            f"-c{connections}",
            f"-d{max(1, round(seconds))}s",
            "--timeout",
            "5s",
            "-s",
            str(SCRIPT),
            url,
        ],
        core,
    )
    env = {**os.environ, "BENCH_BODY": body.decode(), "BENCH_KEY": key}
    finished = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=seconds + 30, check=False
    )
    for line in finished.stdout.splitlines():
        if line.startswith("BENCH "):
            return _parse(line)
    raise RuntimeError(f"wrk failed ({finished.returncode}):\n{finished.stdout}{finished.stderr}")


def _parse(line: str) -> WrkResult:
    fields = dict(part.split("=", 1) for part in line.split()[1:])
    errors = {kind: int(fields[kind]) for kind in ("connect", "read", "write", "status", "timeout")}
    return WrkResult(
        requests=int(fields["requests"]),
        seconds=int(fields["duration_us"]) / 1e6,
        p50=float(fields["p50_us"]) / 1e6,
        p99=float(fields["p99_us"]) / 1e6,
        errors={kind: count for kind, count in errors.items() if count},
    )
