"""`python -m bench.run`: the gateway against a direct call to the same upstream, one table.

    make bench                                      # the defaults, about 6 minutes
    .venv/bin/python -m bench.run --quick           # a smoke run, under 3 minutes
    .venv/bin/python -m bench.run --threads 1024 --scenarios stream-1000
    .venv/bin/python -m bench.run --scenarios teams-json-c64,scale-json   # issue #18
    .venv/bin/python -m bench.run --profile         # plus where the worker spends its CPU

Each scenario runs twice: straight at the fake upstream (bench/upstream.py), then through a
fresh gateway started as in production (`gunicorn -c gunicorn.conf.py app:app`); teams-*
and scale-* also through a baseline gateway set up otherwise (bench/setups.py). The tables
go to stdout and to bench/results/latest.md; gateway logs and profiles sit beside them.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import platform
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache
from pathlib import Path

import orjson

from bench import profile
from bench.baseline import baseline_ratios, baseline_table
from bench.calibration import calibration_command, gunicorn_values
from bench.dialects import DIALECTS
from bench.procs import (
    BIN,
    PRODUCTION_COMMAND,
    REPO,
    Cores,
    PeakRss,
    Started,
    busy_seconds,
    cpu_seconds,
    process_tree,
    raise_open_files_limit,
    start_gateway,
    start_upstream,
    wait_for_workers,
)
from bench.report import (
    LEGEND,
    Measurement,
    Result,
    dialect_ratios,
    dialect_table,
    floor_ratios,
    percentile,
    table,
)
from bench.setups import (
    PLAIN,
    REDIS_2,
    TEAM_KEY,
    TEAM_MODEL,
    TEAMS,
    TEAMS_REDIS,
    TEAMS_REDIS_2,
    TEAMS_REDIS_2_PINNED,
    Setup,
    check_limit,
    prepared,
)
from bench.streams import StreamStats, run_streams, stream_request
from bench.upstream import completion, expected_stream, scripted_model
from bench.wrk import require_wrk, run_wrk

RESULTS = REPO / "bench" / "results"
GATEWAY_KEY = "gw-bench-key-3b9e71c0d5a2"
UPSTREAM_KEY = "sk-bench-upstream-5c8d2e"
MODEL = "bench-model"
CHUNKS, CHUNK_DELAY = 20, 0.02


# `model`: the name the client sends. Through an alias (bench/setups.py) the upstream is
# asked for MODEL and echoes it: every answer is still compared with MODEL's bytes.
@cache
def chat_body(model: str) -> bytes:
    return orjson.dumps({"model": model, "messages": [{"role": "user", "content": "Hello"}]})


@cache
def stream_body(model: str, chunks: int = CHUNKS, delay: float = CHUNK_DELAY) -> bytes:
    return orjson.dumps(
        {
            "model": model,
            "stream": True,
            "messages": [{"role": "user", "content": "Hello"}],
            "fake": {"chunks": chunks, "delay": delay},
        }
    )


CHAT_BODY = chat_body(MODEL)


@dataclass(frozen=True)
class Scenario:
    name: str
    # "json" (wrk), "stream" (short streams back to back) or "long" (one long stream per
    # client, every client arriving within the ramp)
    kind: str
    concurrency: int
    # Also measure the calibration relay (bench/calibration_app.py); `calib-<name>` sets it.
    calibrate: bool = False
    # How the gateway is set up (bench/setups.py): config file, Redis, workers.
    setup: Setup = PLAIN
    # The same load through the gateway set up this way too, compared in bench/baseline.py;
    # reused when an earlier scenario of the run measured it.
    baseline: Setup | None = None
    # After the measured load, a key limited to N requests a minute sends 3N at once.
    exact_limit: bool = False
    # Streams in a dialect of bench.dialects ("messages", "responses"), each compared with
    # the same chat stream relayed by the same gateway; None: the chat stream of stream-N.
    dialect: str | None = None
    # Only when asked for by name: too slow for `make bench`.
    by_name: bool = False


SCENARIOS = {
    s.name: s
    for s in (
        Scenario("json-c16", "json", 16),
        Scenario("json-c64", "json", 64, calibrate=True),
        Scenario("stream-50", "stream", 50),
        Scenario("stream-200", "stream", 200, calibrate=True),  # issue #18: <= 2x calibration
        Scenario("stream-1000", "stream", 1000),
        Scenario("messages-stream-50", "stream", 50, dialect="messages"),
        Scenario("messages-stream-200", "stream", 200, dialect="messages"),
        Scenario("responses-stream-50", "stream", 50, dialect="responses"),
        Scenario("responses-stream-200", "stream", 200, dialect="responses"),
        Scenario("long-1000", "long", 1000, calibrate=True),
        Scenario("long-2000", "long", 2000, calibrate=True),
        Scenario("long-4000-redis", "long", 4000, setup=REDIS_2, by_name=True),
        # Issue #18: what teams run, against the plain gateway of json-c64 and stream-200.
        Scenario("teams-json-c64", "json", 64, setup=TEAMS, baseline=PLAIN),
        Scenario("teams-stream-200", "stream", 200, setup=TEAMS, baseline=PLAIN),
        Scenario("teams-json-c64-redis", "json", 64, setup=TEAMS_REDIS, baseline=PLAIN),
        Scenario("teams-stream-200-redis", "stream", 200, setup=TEAMS_REDIS, baseline=PLAIN),
        # Two workers against one (teams-json-c64-redis's gateway), then the limit's check.
        Scenario(
            "scale-json", "json", 64, setup=TEAMS_REDIS_2, baseline=TEAMS_REDIS, exact_limit=True
        ),
        # The same with each worker pinned to a core of its own: unpinned, a worker's threads
        # migrate between cores and hand its GIL over from one core to the other.
        Scenario("scale-json-pinned", "json", 64, setup=TEAMS_REDIS_2_PINNED, baseline=TEAMS_REDIS),
        Scenario(
            "scale-long", "long", 2000, setup=TEAMS_REDIS_2, baseline=TEAMS_REDIS, by_name=True
        ),
    )
}
# The long Redis scenarios need a minute or more each: asked for by name only; of the
# dialect scenarios, the defaults run the 200-stream ones.
DEFAULT_SCENARIOS = [
    name
    for name, s in SCENARIOS.items()
    if not s.by_name and not (s.dialect and s.concurrency != 200)
]


@dataclass(frozen=True)
class LongStreams:
    """The shape of a long-stream scenario: chunks x delay per stream, clients' arrival."""

    chunks: int
    delay: float
    ramp: float
    # A stream still queued, or unfinished, this long after its expected end is an error.
    grace: float

    @property
    def seconds(self) -> float:
        return self.chunks * self.delay

    def describe(self) -> str:
        return (
            f"{self.chunks} chunks x {self.delay * 1000:g} ms, clients start within {self.ramp:g} s"
        )


@dataclass(frozen=True)
class Durations:
    json: float
    stream: float
    warmup: float
    long: LongStreams


FULL = Durations(json=10, stream=8, warmup=2, long=LongStreams(50, delay=0.2, ramp=2, grace=10))
QUICK = Durations(json=2, stream=2, warmup=1, long=LongStreams(10, delay=0.2, ramp=1, grace=5))


@dataclass(frozen=True)
class Target:
    """Where load goes and whose CPU and memory it costs."""

    port: int
    key: str
    server_pid: int
    # The model name its clients send.
    model: str = MODEL
    # Processes started for it besides the server (a redis-server): the bench's CPU.
    side_pids: tuple[int, ...] = ()


class Bench:
    """Runs scenarios against the direct target and fresh gateways; one per `bench.run`."""

    def __init__(
        self,
        args: argparse.Namespace,
        cores: Cores,
        upstream_port: int,
        upstream_pid: int | None = None,
    ) -> None:
        self.args = args
        self.cores = cores
        self.upstream_port = upstream_port
        self.upstream_pid = upstream_pid
        self.durations = QUICK if args.quick else FULL
        # What this run measured, to reuse for the same load: direct calls by (kind,
        # concurrency, dialect); gateways by (setup, kind, concurrency), with the scenario.
        self.directs: dict[tuple[str, int, str | None], Measurement] = {}
        self.gateways: dict[tuple[Setup, str, int], tuple[str, Measurement]] = {}

    def run(self, scenario: Scenario, direct: Target) -> Result:
        if scenario.dialect is not None:
            return self.run_dialect(scenario, direct)
        direct_measurement = self.measure_direct(scenario, direct)
        print(f"== {scenario.name}: gateway ({scenario.setup.describe()})", flush=True)
        limit = None
        with self.gateway(scenario.name, setup=scenario.setup) as gateway:
            gateway_measurement = self.measure(scenario, gateway)
            if scenario.exact_limit:
                print(f"== {scenario.name}: the rpm limit, across workers", flush=True)
                limit = check_limit(
                    gateway.port, gateway.server_pid, chat_body(gateway.model), completion(MODEL)
                )
        measured = (scenario.setup, scenario.kind, scenario.concurrency)
        self.gateways.setdefault(measured, (scenario.name, gateway_measurement))
        baseline, baseline_note = self.measure_baseline(scenario)
        calibration_measurement = None
        if scenario.calibrate:
            print(f"== {scenario.name}: calibration relay", flush=True)
            with self.calibration(scenario.name) as calibration:
                calibration_measurement = self.measure(scenario, calibration)
        return Result(
            scenario.name,
            direct_measurement,
            gateway_measurement,
            self.gateway_cores(scenario.setup),
            calibration=calibration_measurement,
            note=self.note(scenario, baseline_note),
            baseline=baseline,
            baseline_cores=self.gateway_cores(scenario.baseline or PLAIN),
            limit=limit,
        )

    def gateway_cores(self, setup: Setup) -> int:
        """Pinned, the gateway has one core; unpinned, it may use them all."""
        return 1 if self.cores.pinned and setup.pinned else self.cores.available

    def measure_direct(self, scenario: Scenario, direct: Target) -> Measurement:
        """The load straight at the upstream, once per run for each shape of load."""
        shape = (scenario.kind, scenario.concurrency, scenario.dialect)
        if shape in self.directs:
            print(f"== {scenario.name}: direct (measured earlier in this run)", flush=True)
        else:
            print(f"== {scenario.name}: direct", flush=True)
            self.directs[shape] = self.measure(scenario, direct)
        return self.directs[shape]

    def measure_baseline(self, scenario: Scenario) -> tuple[Measurement | None, str]:
        """The same load through the scenario's baseline set-up; where it comes from."""
        setup = scenario.baseline
        if setup is None:
            return None, ""
        measured = (setup, scenario.kind, scenario.concurrency)
        if measured in self.gateways:
            name, found = self.gateways[measured]
            print(f"== {scenario.name}: baseline is {name}'s gateway, this run", flush=True)
            return found, f"{name}'s gateway, this run"
        print(f"== {scenario.name}: baseline gateway ({setup.describe()})", flush=True)
        with self.gateway(f"{scenario.name}-baseline", setup=setup) as gateway:
            found = self.measure(scenario, gateway)
        self.gateways[measured] = (f"{scenario.name}-baseline", found)
        return found, "measured within this scenario"

    def run_dialect(self, scenario: Scenario, direct: Target) -> Result:
        """The chat stream direct, then through one gateway both relayed and in the dialect.

        Through the gateway the two alternate, chat / dialect / dialect / chat, each for half
        the stream duration, so that other load on a shared machine and whatever the
        process's age changes fall on both alike.
        """
        chat = dataclasses.replace(scenario, dialect="chat")
        direct_measurement = self.measure_direct(chat, direct)
        half = self.durations.stream / 2
        stats = {"chat": StreamStats(), "dialect": StreamStats()}
        cpu = dict.fromkeys(stats, 0.0)
        with self.gateway(scenario.name) as gateway, PeakRss(gateway.server_pid) as rss:
            self._stream_stats(chat, gateway, 0, warmup=True)
            self._stream_stats(scenario, gateway, 0, warmup=True)
            tree = process_tree(gateway.server_pid)
            for role in ("chat", "dialect", "dialect", "chat"):
                print(f"== {scenario.name}: gateway, {role} ({half:g} s)", flush=True)
                before = cpu_seconds(tree)
                self._stream_stats(chat if role == "chat" else scenario, gateway, half, stats[role])
                cpu[role] += cpu_seconds(tree) - before
        chat_measurement, dialect_measurement = (
            dataclasses.replace(
                _stream_measurement(stats[role]),
                cpu_seconds=cpu[role],
                peak_rss=rss.peak,
                peak_pss=rss.peak_pss,
            )
            for role in ("chat", "dialect")
        )
        return Result(
            scenario.name,
            direct_measurement,
            dialect_measurement,
            1 if self.cores.pinned else self.cores.available,
            chat=chat_measurement,
        )

    def note(self, scenario: Scenario, baseline_note: str = "") -> str:
        notes = []
        if scenario.baseline is not None:
            notes.append(f"gateway: {scenario.setup.describe()}")
            notes.append(f"baseline: {scenario.baseline.describe()} ({baseline_note})")
        elif scenario.setup != PLAIN:
            notes.append(scenario.setup.describe())
        if not scenario.setup.pinned and self.cores.pinned:
            notes.append(
                f"its workers share core {self.cores.load} with the upstream, the load"
                " generator and redis-server"
            )
        if scenario.kind == "long" and self.args.quick:
            notes.append(f"--quick: {self.durations.long.seconds:g} s streams, no warm-up")
        return "; ".join(notes)

    def environment(self, port: int, extra_env: Mapping[str, str] | None = None) -> dict[str, str]:
        return {
            **gateway_env(port, self.upstream_port, self.args.threads),
            **self.args.gateway_env,
            **(extra_env or {}),
        }

    @contextmanager
    def calibration(self, label: str) -> Iterator[Target]:
        """The calibration relay, with the gunicorn values the gateway would have here."""
        port = _free_port()
        env = self.environment(port)
        values = gunicorn_values(env)
        env["BENCH_POOL_SIZE"] = str(values.threads)
        log_path = RESULTS / f"calibration-{label}.log"
        command = calibration_command(values, port)
        started = start_gateway(env, self.cores.gateway, log_path, command, port=port)
        try:
            check_answers(port, GATEWAY_KEY)
            yield Target(port, GATEWAY_KEY, started.pid)
        finally:
            started.stop()

    @contextmanager
    def gateway(
        self,
        label: str,
        command: Sequence[str] = PRODUCTION_COMMAND,
        extra_env: Mapping[str, str] | None = None,
        setup: Setup = PLAIN,
    ) -> Iterator[Target]:
        port = _free_port()
        key, model = (TEAM_KEY, TEAM_MODEL) if setup.config else (GATEWAY_KEY, MODEL)
        redis_log = RESULTS / f"redis-{label}.log"
        with prepared(setup, self.upstream_port, UPSTREAM_KEY, redis_log, self.cores.load) as ready:
            env = self.environment(port, {**ready.env, **(extra_env or {})})
            log_path = RESULTS / f"gateway-{label}.log"
            core = self.cores.gateway if setup.pinned else None
            started = start_gateway(env, core, log_path, command)
            try:
                if setup.workers > 1:  # load on the first ready worker only would measure one
                    wait_for_workers(started.pid, setup.workers, gunicorn_values(env).threads)
                check_answers(port, key, chat_body(model))
                yield Target(port, key, started.pid, model, ready.side_pids)
            finally:
                started.stop()
                _report_log_problems(started)

    def measure(self, scenario: Scenario, target: Target) -> Measurement:
        with PeakRss(target.server_pid) as rss:
            # --quick skips the long-N warm-up (thousands of short streams through too few
            # threads take longer than the 2 s streams measured); the note says so.
            if not (scenario.kind == "long" and self.args.quick):
                self.load(scenario, target, self.durations.warmup, warmup=True)
            tree = process_tree(target.server_pid)
            # Each worker's own share: keep-alive connections stay with the worker that
            # accepted them, so several workers may not share the load evenly.
            workers = [pid for pid in tree if pid != target.server_pid]
            cpu_before, bench_before = cpu_seconds(tree), self.bench_cpu(target)
            workers_before = [cpu_seconds([pid]) for pid in workers]
            measurement = self.load(scenario, target, self.seconds(scenario))
            cpu = cpu_seconds(tree) - cpu_before
            bench_cpu = self.bench_cpu(target) - bench_before
            worker_cpu = tuple(
                cpu_seconds([pid]) - before
                for pid, before in zip(workers, workers_before, strict=True)
            )
        return dataclasses.replace(
            measurement,
            cpu_seconds=cpu,
            peak_rss=rss.peak,
            peak_pss=rss.peak_pss,
            bench_cpu_seconds=bench_cpu,
            worker_cpu_seconds=worker_cpu,
        )

    def bench_cpu(self, target: Target) -> float:
        """CPU so far of the bench's side: this process (the stream client), its finished
        children (wrk), the upstream unless it is the target, and the target's helpers."""
        own = os.times()
        others = list(target.side_pids)
        if self.upstream_pid is not None and self.upstream_pid != target.server_pid:
            others.append(self.upstream_pid)
        mine = own.user + own.system + own.children_user + own.children_system
        return mine + cpu_seconds(others)

    def seconds(self, scenario: Scenario) -> float:
        if scenario.kind == "long":
            return self.durations.long.seconds
        return self.durations.json if scenario.kind == "json" else self.durations.stream

    def load(
        self, scenario: Scenario, target: Target, seconds: float, warmup: bool = False
    ) -> Measurement:
        if scenario.kind == "json":
            return self._json_load(scenario, target, seconds)
        if scenario.kind == "long":
            return self._long_load(scenario, target, warmup)
        return self._stream_load(scenario, target, seconds, warmup)

    def _json_load(self, scenario: Scenario, target: Target, seconds: float) -> Measurement:
        found = run_wrk(
            f"http://127.0.0.1:{target.port}/v1/chat/completions",
            body=chat_body(target.model),
            key=target.key,
            connections=scenario.concurrency,
            seconds=seconds,
            core=self.cores.load,
        )
        detail = ", ".join(f"{kind}: {n}" for kind, n in found.errors.items())
        return Measurement(
            requests=found.requests,
            seconds=found.seconds,
            p50=found.p50,
            p99=found.p99,
            errors=found.error_count,
            error_detail=f" ({detail})" if detail else "",
            cpu_seconds=0.0,
            peak_rss=0,
        )

    def _stream_load(
        self, scenario: Scenario, target: Target, seconds: float, warmup: bool
    ) -> Measurement:
        return _stream_measurement(self._stream_stats(scenario, target, seconds, warmup=warmup))

    def _stream_stats(
        self,
        scenario: Scenario,
        target: Target,
        seconds: float,
        stats: StreamStats | None = None,
        warmup: bool = False,
    ) -> StreamStats:
        """Streams back to back on `concurrency` connections; added to `stats` if given."""
        stats = StreamStats() if stats is None else stats
        earlier = stats.seconds
        if scenario.dialect is None:
            request = stream_request(target.port, target.key, stream_body(target.model))
            expected = expected_stream(MODEL, CHUNKS)
        else:
            dialect = DIALECTS[scenario.dialect]
            model = scripted_model(MODEL, CHUNKS, CHUNK_DELAY)
            request = dialect.request(target.port, target.key, model)
            expected = dialect.expected(model, CHUNKS)
        # A warm-up is one stream per connection: it starts the gateway's threads and pool.
        stats = asyncio.run(
            run_streams(
                target.port,
                request=request,
                expected=expected,
                concurrency=scenario.concurrency,
                seconds=60 if warmup else seconds,
                per_connection=1 if warmup else 10_000,
                stats=stats,
            )
        )
        stats.seconds += earlier  # run_streams sets the time of its own run
        return stats

    def _long_load(self, scenario: Scenario, target: Target, warmup: bool) -> Measurement:
        """One stream per client, all arriving within the ramp; each bounded by a timeout.

        The warm-up sends short streams the same way: it starts the threads and fills the
        upstream pool that the long streams will find, in well under their duration.
        """
        shape = self.durations.long
        chunks = CHUNKS if warmup else shape.chunks
        body = stream_body(target.model, chunks, CHUNK_DELAY if warmup else shape.delay)
        seconds = CHUNKS * CHUNK_DELAY if warmup else shape.seconds
        stats = asyncio.run(
            run_streams(
                target.port,
                request=stream_request(target.port, target.key, body),
                expected=expected_stream(MODEL, chunks),
                concurrency=scenario.concurrency,
                # The deadline only stops new streams: every client starts within the ramp.
                seconds=shape.ramp + 1,
                per_connection=1,
                stream_timeout=seconds + shape.grace,
                ramp=shape.ramp,
            )
        )
        # Every event of the upstream's stream, its [DONE] included, is one relayed chunk.
        return dataclasses.replace(
            _stream_measurement(stats), chunks=chunks + 1, events=stats.events
        )


def _stream_measurement(stats: StreamStats) -> Measurement:
    detail = ", ".join(f"{kind}: {n}" for kind, n in stats.errors.most_common())
    return Measurement(
        requests=stats.completed,
        seconds=stats.seconds,
        p50=percentile(stats.total, 50),
        p99=percentile(stats.total, 99),
        errors=stats.error_count,
        error_detail=f" ({detail})" if detail else "",
        cpu_seconds=0.0,
        peak_rss=0,
        ttfb_p50=percentile(stats.ttfb_all, 50),
        ttfb_p99=percentile(stats.ttfb_all, 99),
    )


def gateway_env(port: int, upstream_port: int, threads: int | None) -> dict[str, str]:
    """A clean environment: nothing from the shell (proxies!) or a local .env leaks in."""
    env = {
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
        "HOME": os.environ.get("HOME", "/tmp"),
        "ENV_FILE": "",
        "PORT": str(port),
        "TARGET_API_URL": f"http://127.0.0.1:{upstream_port}/v1",
        "TARGET_API_KEY": UPSTREAM_KEY,
        "GATEWAY_API_KEYS": GATEWAY_KEY,
        # Far above any rate the bench reaches: the limiter is checked, never triggered.
        "RATE_LIMIT_REQUESTS_PER_MINUTE": "100000000",
        "LOG_LEVEL": "INFO",
    }
    if threads is not None:
        env["GUNICORN_THREADS"] = str(threads)
    return env


def check_answers(port: int, key: str, body: bytes = CHAT_BODY) -> None:
    """Before timing anything: one JSON answer must arrive byte-identical."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=body,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        body = response.read()
    if body != completion(MODEL):
        raise RuntimeError(f"port {port} answered {body[:200]!r}, not the upstream's body")


def _report_log_problems(started: Started) -> None:
    if started.log_path is None:
        return
    text = started.log_path.read_text(errors="replace")
    problems = sum(
        1 for line in text.splitlines() if '"level":"warning"' in line or '"level":"error"' in line
    )
    if problems:
        print(f"   note: {problems} warning/error lines in {started.log_path}", flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine_header(args: argparse.Namespace, cores: Cores, durations: Durations) -> str:
    # What gunicorn.conf.py makes of this environment: the defaults may change under us.
    values = gunicorn_values(gateway_env(_free_port(), 1, args.threads) | args.gateway_env)
    threads_set = args.threads or "GUNICORN_THREADS" in args.gateway_env
    threads = f"{values.threads}" + ("" if threads_set else " (default)")
    commit = _git("rev-parse", "--short", "HEAD")
    dirty = " (uncommitted changes)" if _git("status", "--porcelain") else ""
    return "\n".join(
        [
            f"# Gateway benchmark, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
            "",
            f"- machine: {os.cpu_count()} cores (`nproc`: {cores.available}),"
            f" {_cpu_model()}; Python {platform.python_version()}",
            f"- commit {commit}{dirty}; GUNICORN_THREADS={threads};"
            f" {values.workers} gunicorn worker(s), worker_connections"
            f" {values.worker_connections}, keepalive {values.keepalive} s",
            *(
                [f"- extra gateway environment: {' '.join(f'{k}={v}' for k, v in extra.items())}"]
                if (extra := args.gateway_env)
                else []
            ),
            f"- pinning: {cores.describe()}",
            f"- durations: JSON {durations.json:g} s, streams {durations.stream:g} s"
            f" ({CHUNKS} chunks x {CHUNK_DELAY * 1000:g} ms), warm-up {durations.warmup:g} s"
            + (" (--quick)" if args.quick else ""),
            f"- long-N: {durations.long.describe()}, one stream per client, a stream not done"
            f" {durations.long.grace:g} s after its expected end is an error"
            + (" (--quick: shorter than the targets' 10 s)" if args.quick else ""),
        ]
    )


def other_load(before: tuple[float, float], after: tuple[float, float], seconds: float) -> str:
    """A header line on CPU used by processes this run did not start, if any."""
    others = (after[0] - before[0]) - (after[1] - before[1])
    share = others / seconds if seconds else 0.0
    if share < 0.05:
        return f"\n- other processes on the machine: {share:.0%} of a core (quiet)"
    return (
        f"\n- **other processes on the machine used {share:.0%} of a core during this run:"
        " req/s and latencies are noisy; CPU per request and RSS much less so**"
    )


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def _git(*args: str) -> str:
    try:
        found = subprocess.run(
            ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10, check=False
        )
    except OSError:
        return ""
    return found.stdout.strip()


def run_profile(bench: Bench, scenario: Scenario) -> str:
    """The scenario twice more, apart from the measured runs: threads split, then cProfile."""
    print(f"== profile: {scenario.name}, CPU by gunicorn thread role", flush=True)
    seconds = bench.seconds(scenario)
    with bench.gateway("profile-threads", setup=scenario.setup) as target:
        bench.load(scenario, target, bench.durations.warmup, warmup=True)
        workers = [pid for pid in process_tree(target.server_pid) if pid != target.server_pid]
        before = profile.thread_cpu(target.server_pid, workers)
        found = bench.load(scenario, target, seconds)
        split = profile.thread_split_markdown(
            scenario.name, before, profile.thread_cpu(target.server_pid, workers), found.requests
        )
    print(f"== profile: {scenario.name}, cProfile in every request thread", flush=True)
    out_dir = RESULTS / "profile"
    for stale in out_dir.glob("worker-*.pstats"):
        stale.unlink()
    command = [str(BIN / "python"), "-m", "bench.cpuprofile", "-c", "gunicorn.conf.py", "app:app"]
    extra = {"BENCH_PROFILE_DIR": str(out_dir)}
    with bench.gateway("profile-cprofile", command, extra, scenario.setup) as target:
        bench.load(scenario, target, bench.durations.warmup, warmup=True)
        bench.load(scenario, target, seconds)
    dumps = sorted(out_dir.glob("worker-*.pstats"))
    if not dumps:
        raise RuntimeError(f"the profiled worker wrote nothing to {out_dir}")
    return "\n\n".join(
        [
            f"## Profile: gateway worker, {scenario.name}",
            split,
            profile.functions_markdown(dumps[-1]),
        ]
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description="Benchmark the gateway against a direct call to the same fake upstream.",
    )
    parser.add_argument("--quick", action="store_true", help="short durations (a smoke run)")
    parser.add_argument(
        "--threads", type=int, help="GUNICORN_THREADS for the gateway (default: its own)"
    )
    parser.add_argument(
        "--scenarios",
        default=",".join(DEFAULT_SCENARIOS),
        help=f"comma-separated subset of: {', '.join(SCENARIOS)}; calib-<name> also measures"
        " the calibration relay in that scenario (json-c64 and long-* always do)",
    )
    parser.add_argument(
        "--gateway-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the gateway, to try a setting (repeatable), e.g. "
        "LOG_LEVEL=WARNING or MALLOC_ARENA_MAX=2",
    )
    parser.add_argument(
        "--profile",
        nargs="?",
        const="json-c64",
        choices=list(SCENARIOS),
        help="also profile the gateway worker in one scenario (default json-c64): CPU by "
        "gunicorn thread, then cProfile by function",
    )
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    unknown = [n for n in names if n.removeprefix("calib-") not in SCENARIOS]
    if unknown or not names:
        parser.error(f"unknown scenario(s) {unknown}; choose from {', '.join(SCENARIOS)}")
    args.scenarios = [
        dataclasses.replace(SCENARIOS[n.removeprefix("calib-")], calibrate=True)
        if n.startswith("calib-")
        else SCENARIOS[n]
        for n in names
    ]
    if bad := [item for item in args.gateway_env if "=" not in item]:
        parser.error(f"--gateway-env takes NAME=VALUE, got {bad}")
    args.gateway_env = dict(item.split("=", 1) for item in args.gateway_env)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    profiled = [SCENARIOS[args.profile]] if args.profile else []
    if any(s.kind == "json" for s in [*args.scenarios, *profiled]):
        require_wrk()
    RESULTS.mkdir(parents=True, exist_ok=True)
    # Thousands of client sockets in this process (the stream client).
    raise_open_files_limit()
    cores = Cores.detect()
    if cores.load is not None:
        # This process runs the stream client: it belongs with the upstream, off the gateway.
        os.sched_setaffinity(0, {cores.load})
    started_at = time.monotonic()
    busy_before = busy_seconds()
    upstream, upstream_port = start_upstream(cores.load)
    try:
        check_answers(upstream_port, UPSTREAM_KEY)
        bench = Bench(args, cores, upstream_port, upstream.pid)
        direct = Target(upstream_port, UPSTREAM_KEY, upstream.pid)
        results = [bench.run(scenario, direct) for scenario in args.scenarios]
        profile_section = run_profile(bench, SCENARIOS[args.profile]) if args.profile else ""
    finally:
        upstream.stop()
    seconds = time.monotonic() - started_at
    header = machine_header(args, cores, bench.durations)
    header += other_load(busy_before, busy_seconds(), seconds)
    report = render(header, results, profile_section, seconds)
    print("\n" + report)
    (RESULTS / "latest.md").write_text(report + "\n")
    print(f"\n(written to {RESULTS / 'latest.md'})")
    return 0


def render(header: str, results: list[Result], profile_section: str, seconds: float) -> str:
    rendered, missed = table([r for r in results if r.chat is None and r.baseline is None])
    dialects, dialects_missed = dialect_table([r for r in results if r.chat is not None])
    baselines, baselines_missed = baseline_table([r for r in results if r.baseline is not None])
    missed += dialects_missed + baselines_missed
    verdict = (
        "All targets in this run are met."
        if not missed
        else "Targets missed: " + "; ".join(missed) + "."
    )
    parts = (
        header,
        rendered if len(rendered.splitlines()) > 2 else "",
        dialects,
        baselines,
        verdict,
        floor_ratios(results),
        dialect_ratios(results),
        baseline_ratios(results),
        LEGEND,
        profile_section,
        f"Whole run: {seconds:.0f} s.",
    )
    return "\n\n".join(part for part in parts if part)


if __name__ == "__main__":
    sys.exit(main())
