"""The processes the benchmark starts, and what it reads about them from /proc.

Every process is started here, remembered by PID, and stopped by that PID (never by name).
CPU time comes from /proc/<pid>/stat (utime + stime of every process in the tree): steadier
than wall-clock, and it counts all threads of a process.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = REPO / ".venv" / "bin"
_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class Cores:
    """Where each side runs: the gateway alone on one core, everything else on another."""

    gateway: int | None
    load: int | None
    # What `nproc` says: the cores this process may use, before it pins itself.
    available: int

    @classmethod
    def detect(cls) -> Cores:
        available = sorted(os.sched_getaffinity(0))
        if len(available) >= 2 and shutil.which("taskset"):
            return cls(gateway=available[0], load=available[1], available=len(available))
        return cls(gateway=None, load=None, available=len(available))

    @property
    def pinned(self) -> bool:
        return self.gateway is not None

    def describe(self) -> str:
        if not self.pinned:
            return "not pinned (fewer than 2 cores or no taskset)"
        return f"gateway on core {self.gateway}; upstream and load generators on core {self.load}"


# The cores this process may use before it pins itself to the load core (run.py, plateau.py).
_EVERY_CORE = sorted(os.sched_getaffinity(0))


def pinned(command: Sequence[str], core: int | None) -> list[str]:
    """`command` on `core`, or on every core: a child inherits the bench's own pinning to
    the load core, which put "unpinned" gateways (the scale-* workers) on that one core."""
    if core is not None:
        return ["taskset", "-c", str(core), *command]
    if shutil.which("taskset") and sorted(os.sched_getaffinity(0)) != _EVERY_CORE:
        return ["taskset", "-c", ",".join(map(str, _EVERY_CORE)), *command]
    return list(command)


def wait_for_workers(server_pid: int, workers: int, threads: int, timeout: float = 60) -> None:
    """Until `workers` workers each run their `threads` request threads (they start them at
    boot, before accepting): a load started earlier lands on the first worker alone, its
    keep-alive connections staying there for the run."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = [pid for pid in process_tree(server_pid) if pid != server_pid]
        if len(found) >= workers and all(_threads(pid) >= threads for pid in found):
            time.sleep(0.5)  # from threads started to accepting
            return
        time.sleep(0.1)
    raise RuntimeError(
        f"{workers} workers with {threads} threads each did not start in {timeout} s"
    )


def _threads(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return 0


def _children_by_parent() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        stat = _read_stat(int(entry.name))
        if stat is not None:
            children.setdefault(int(stat[1]), []).append(int(entry.name))
    return children


def process_tree(root: int) -> list[int]:
    """`root` and all its descendants that are alive now."""
    children = _children_by_parent()
    tree, pending = [], [root]
    while pending:
        pid = pending.pop()
        tree.append(pid)
        pending.extend(children.get(pid, ()))
    return tree


def _read_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name: [state, ppid, ...]."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def cpu_seconds(pids: Sequence[int]) -> float:
    """utime + stime of these processes (all their threads), in seconds."""
    ticks = 0
    for pid in pids:
        stat = _read_stat(pid)
        if stat is not None:
            ticks += int(stat[11]) + int(stat[12])
    return ticks / _TICK


def rss_bytes(pids: Sequence[int]) -> int:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE
    return total


def pss_bytes(pids: Sequence[int]) -> int:
    """Proportional set size: pages shared by the master and its workers counted once."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
                    break
    return total


class PeakRss:
    """Samples the memory of a process tree in a thread; keeps the largest samples.

    `peak` is the sum of RSS (what the targets use: an upper bound, since a forked worker's
    pages shared with its master count twice); `peak_pss` is the sum of PSS, read less
    often because the kernel walks the page tables to compute it.
    """

    def __init__(self, root: int, interval: float = 0.05, pss_every: int = 5) -> None:
        self.root = root
        self.interval = interval
        self.pss_every = pss_every
        self.peak = 0
        self.peak_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _sample(self) -> None:
        tree, listed = process_tree(self.root), time.monotonic()
        samples = 0
        while not self._stop.is_set():
            # The tree is re-listed once a second: gunicorn may replace a worker.
            if time.monotonic() - listed > 1:
                tree, listed = process_tree(self.root), time.monotonic()
            self.peak = max(self.peak, rss_bytes(tree))
            if samples % self.pss_every == 0:
                self.peak_pss = max(self.peak_pss, pss_bytes(tree))
            samples += 1
            self._stop.wait(self.interval)


def busy_seconds() -> tuple[float, float]:
    """(CPU seconds every process on the machine used, CPU seconds this run used) so far.

    This run: this process and the children it has waited for (gateways, wrk, upstream).
    The difference tells how much other work shared the machine, i.e. how noisy it was.
    """
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    own = os.times()
    mine = own.user + own.system + own.children_user + own.children_system
    return (sum(fields[:8]) - idle) / _TICK, mine


@dataclass
class Started:
    """A process this run started: stopped by its PID (and its descendants' PIDs)."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path | None = None
    descendants: list[int] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.process.pid

    def tree(self) -> list[int]:
        return process_tree(self.pid)

    def log_tail(self, lines: int = 20) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def stop(self, timeout: float = 20) -> None:
        if self.process.poll() is None:
            self.descendants = [pid for pid in self.tree() if pid != self.pid]
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        # A worker that outlived its master (it should not) is still ours to stop.
        for pid in self.descendants:
            stat = _read_stat(pid)
            if stat is not None and stat[0] != "Z":
                os.kill(pid, signal.SIGKILL)


def start_upstream(core: int | None) -> tuple[Started, int]:
    command = pinned([str(BIN / "python"), "-m", "bench.upstream", "--port", "0"], core)
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE)
    started = Started("upstream", process)
    assert process.stdout is not None
    line = process.stdout.readline().decode()
    if not line.startswith("listening on "):
        started.stop()
        raise RuntimeError(f"the fake upstream did not start: {line!r}")
    return started, int(line.split()[-1])


PRODUCTION_COMMAND = ("gunicorn", "-c", "gunicorn.conf.py", "app:app")


def start_gateway(
    env: dict[str, str],
    core: int | None,
    log_path: Path,
    command: Sequence[str] = PRODUCTION_COMMAND,
    port: int | None = None,
) -> Started:
    """By default `gunicorn -c gunicorn.conf.py app:app` from the repo root, as in production.

    Ready when GET /health answers 200 on $PORT, or, given `port` (a relay without a
    health route), when that port accepts connections.
    """
    command = pinned(command, core)
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    started = Started("gateway", process, log_path)
    try:
        if port is None:
            _wait_healthy(started, f"http://127.0.0.1:{env['PORT']}/health")
        else:
            _wait_listening(started, port)
    except BaseException:
        started.stop()
        raise
    return started


def _wait_healthy(started: Started, url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if started.process.poll() is not None:
            raise RuntimeError(f"the gateway exited at start-up:\n{started.log_tail()}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"the gateway did not become healthy:\n{started.log_tail()}")


def _wait_listening(started: Started, port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if started.process.poll() is not None:
            raise RuntimeError(f"{started.name} exited at start-up:\n{started.log_tail()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
            return
        time.sleep(0.1)
    raise RuntimeError(f"{started.name} did not listen on {port}:\n{started.log_tail()}")


def raise_open_files_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit: one process holds every client socket."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 65536 if hard == resource.RLIM_INFINITY else hard
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


@dataclass(frozen=True)
class Redis:
    started: Started
    port: int


def start_redis(log_path: Path, core: int | None = None) -> Redis:
    """A throw-away redis-server on loopback: no persistence, stopped by its PID; on `core`
    if given (the load generators' core: it must not take the pinned gateway's)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed: `apt-get install redis-server`")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly"]
    command += ["no", "--maxclients", "10000"]
    with log_path.open("wb") as log:
        process = subprocess.Popen(pinned(command, core), stdout=log, stderr=subprocess.STDOUT)
    started = Started("redis-server", process, log_path)
    try:
        _wait_listening(started, port)
    except BaseException:
        started.stop()
        raise
    return Redis(started, port)
