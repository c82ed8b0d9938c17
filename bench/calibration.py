"""The gunicorn values the gateway really runs with, and the calibration relay's command.

The values come from executing gunicorn.conf.py in a child process with the gateway's
environment: whatever that file computes (defaults, GUNICORN_THREADS, GUNICORN_WORKERS)
is what the calibration relay gets, and the calibration master never imports the gateway.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass

from bench.procs import BIN, REPO

_READ_CONF = """\
import json, runpy
conf = runpy.run_path("gunicorn.conf.py")
keys = ("workers", "threads", "worker_connections", "keepalive", "timeout", "graceful_timeout")
print("BENCH " + json.dumps({k: conf[k] for k in keys}))
"""


@dataclass(frozen=True)
class GunicornValues:
    workers: int
    threads: int
    worker_connections: int
    keepalive: int
    timeout: int
    graceful_timeout: int


def gunicorn_values(env: Mapping[str, str]) -> GunicornValues:
    """What gunicorn.conf.py sets under this environment."""
    found = subprocess.run(
        [str(BIN / "python"), "-c", _READ_CONF],
        cwd=REPO,
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    for line in found.stdout.splitlines():
        if line.startswith("BENCH "):
            return GunicornValues(**json.loads(line[6:]))
    raise RuntimeError(f"gunicorn.conf.py did not load:\n{found.stderr[-2000:]}")


def calibration_command(values: GunicornValues, port: int) -> list[str]:
    """Plain gthread (not the gateway's worker subclass) with the gateway's numbers."""
    return [
        str(BIN / "gunicorn"),
        "--worker-class=gthread",
        f"--workers={values.workers}",
        f"--threads={values.threads}",
        f"--worker-connections={values.worker_connections}",
        f"--keep-alive={values.keepalive}",
        f"--timeout={values.timeout}",
        f"--graceful-timeout={values.graceful_timeout}",
        "--preload",
        "--worker-tmp-dir=/dev/shm",
        f"--bind=127.0.0.1:{port}",
        "--log-level=warning",
        "--no-control-socket",
        "bench.calibration_app:app",
    ]
