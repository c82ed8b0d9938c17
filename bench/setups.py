"""How a scenario's gateway is set up: plain, or with what teams run (issue #18).

`PLAIN` is the gateway of json-c64 and stream-200: GATEWAY_API_KEYS with one request limit
from RATE_LIMIT_REQUESTS_PER_MINUTE, in memory. A `config` set-up gives it the GATEWAY_CONFIG
file a team would write (`teams_config`): two providers (both the bench's fake upstream),
an alias that rewrites the model, and a key with rpm, tpm and a daily token quota, all far
above what the bench reaches, so that every check runs and none refuses. `redis` keeps the
limits in a redis-server the bench starts; `workers` > 1 leaves the gateway unpinned.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from bench.procs import cpu_seconds, process_tree, start_redis
from bench.report import LimitCheck
from bench.streams import Expected, run_streams, stream_request

# The public name teams send; both deployments ask the upstream for `bench-model`.
TEAM_MODEL = "team-chat"
TEAM_KEY = "gw-bench-team-7f41c2e9a8d3"
# A second key of the same file, limited to EXACT_RPM requests a minute: `check_limit`.
EXACT_KEY = "gw-bench-exact-2c95b7e1f064"
EXACT_RPM = 60


@dataclass(frozen=True)
class Setup:
    """What differs from the plain gateway. Hashable: measurements are reused by it."""

    config: bool = False  # the teams' GATEWAY_CONFIG file
    redis: bool = False  # limits and token windows in a redis-server, else memory://
    workers: int = 1  # more than one: PROMETHEUS_MULTIPROC_DIR set, the gateway not pinned
    # Several workers, each on a core of its own (GUNICORN_PIN_WORKERS=true, the gateway's
    # own setting): their threads stop migrating between cores.
    pin_workers: bool = False

    @property
    def pinned(self) -> bool:
        """One worker is pinned to the gateway core; several get every core."""
        return self.workers == 1

    def describe(self) -> str:
        parts = [
            "teams config" if self.config else "plain gateway",
            "redis://" if self.redis else "memory://",
            f"{self.workers} worker{'s' if self.workers > 1 else ''}",
            self._placement(),
        ]
        return ", ".join(parts)

    def _placement(self) -> str:
        if self.pinned:
            return "pinned to 1 core"
        return "each pinned to a core of its own" if self.pin_workers else "not pinned"


PLAIN = Setup()
TEAMS = Setup(config=True)
TEAMS_REDIS = Setup(config=True, redis=True)
TEAMS_REDIS_2 = Setup(config=True, redis=True, workers=2)
TEAMS_REDIS_2_PINNED = Setup(config=True, redis=True, workers=2, pin_workers=True)
# long-4000-redis: the plain gateway on two workers sharing a redis-server.
REDIS_2 = Setup(redis=True, workers=2)


def teams_config(upstream_port: int) -> str:
    """The YAML a team would write; limits high enough never to refuse during the bench."""
    base_url = f"http://127.0.0.1:{upstream_port}/v1"
    return f"""\
providers:
  primary:
    base_url: {base_url}
    api_key_env: BENCH_UPSTREAM_KEY
  secondary:                  # the same fake upstream: a second pool, a fallback
    base_url: {base_url}
    api_key: ${{BENCH_UPSTREAM_KEY}}
models:
  {TEAM_MODEL}:
    - {{provider: primary, model: bench-model, weight: 3}}
    - {{provider: secondary, model: bench-model, weight: 1}}
keys:
  - name: bench-team
    key_env: BENCH_TEAM_KEY
    models: [{TEAM_MODEL}]
    rpm: 100000000
    tpm: 10000000000
    tokens_per_day: 1000000000000
  - name: bench-exact
    key_env: BENCH_EXACT_KEY
    models: [{TEAM_MODEL}]
    rpm: {EXACT_RPM}
"""


@dataclass
class Prepared:
    """The gateway's extra environment, and the processes started for it (a redis-server)."""

    env: dict[str, str] = field(default_factory=dict)
    side_pids: tuple[int, ...] = ()


@contextmanager
def prepared(
    setup: Setup, upstream_port: int, upstream_key: str, redis_log: Path, redis_core: int | None
) -> Iterator[Prepared]:
    """Writes the config file (in a temporary directory), starts a redis-server if asked;
    stops and removes them on the way out."""
    with ExitStack() as stack:
        directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-gw-")))
        found = Prepared()
        if setup.config:
            config = directory / "gateway.yaml"
            config.write_text(teams_config(upstream_port))
            found.env |= {
                "GATEWAY_CONFIG": str(config),
                "GATEWAY_API_KEYS": "",  # only the file's keys
                "BENCH_UPSTREAM_KEY": upstream_key,
                "BENCH_TEAM_KEY": TEAM_KEY,
                "BENCH_EXACT_KEY": EXACT_KEY,
                # memory:// keeps token windows in this file: a fresh one per gateway, never
                # the default /tmp one that other runs (and their day's quota) share.
                "TOKEN_STORE_FILE": str(directory / "tokens.sqlite3"),
            }
        if setup.redis:
            redis = start_redis(redis_log, redis_core)
            stack.callback(redis.started.stop)
            found.env["RATE_LIMIT_STORAGE_URI"] = f"redis://127.0.0.1:{redis.port}/0"
            found.side_pids = (redis.started.pid,)
        if setup.workers > 1:
            metrics_dir = directory / "prometheus"
            metrics_dir.mkdir()
            found.env |= {
                "GUNICORN_WORKERS": str(setup.workers),
                "GUNICORN_PIN_WORKERS": "true" if setup.pin_workers else "false",
                "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
            }
        yield found


def check_limit(port: int, server_pid: int, body: bytes, expected: Expected) -> LimitCheck:
    """EXACT_KEY sends 3 x EXACT_RPM requests at once, each on its own connection: exactly
    EXACT_RPM may pass, whichever worker each one reaches. Each worker's CPU time during
    the burst shows whether both took part."""
    workers = [pid for pid in process_tree(server_pid) if pid != server_pid]
    before = [cpu_seconds([pid]) for pid in workers]
    sent = 3 * EXACT_RPM
    stats = asyncio.run(
        run_streams(
            port,
            request=stream_request(port, EXACT_KEY, body),
            expected=expected,
            concurrency=sent,
            seconds=30,
            per_connection=1,
            stream_timeout=10,
        )
    )
    refused = stats.errors.pop("status 429", 0)
    return LimitCheck(
        limit=EXACT_RPM,
        sent=sent,
        admitted=stats.completed,
        refused=refused,
        other=", ".join(f"{kind}: {n}" for kind, n in stats.errors.most_common()),
        worker_cpu=tuple(cpu_seconds([pid]) - b for pid, b in zip(workers, before, strict=True)),
    )
