"""Token windows that outlive a worker: reservations with a deadline, quotas in a SQLite file.

(Redis, the same rules in Lua: tests/e2e/test_quota_durability.py, with a real redis-server.)
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.config import ConfigError, load_settings
from gateway.policy.keys import Caller
from gateway.policy.tokens import TokenBudget
from tests.constants import UPSTREAM_KEY

# 2027-01-15T08:00:00Z: hours from a day's end, so one day and month window throughout.
T = 1_800_000_000.0
HOLD = 60.0
Budget = Callable[[], TokenBudget]


@pytest.fixture(params=["memory", "sqlite"])
def budget(request: pytest.FixtureRequest, tmp_path: Path) -> Budget:
    """A new budget on the same counters each call (for SQLite: another worker, a restart)."""
    store = str(tmp_path / "tokens.sqlite3") if request.param == "sqlite" else None
    only = TokenBudget("memory://", store, HOLD)
    return (lambda: TokenBudget("memory://", store, HOLD)) if store else (lambda: only)


def test_a_reservation_never_settled_is_released_at_its_deadline(budget: Budget) -> None:
    caller = Caller("key_killed", tokens_per_day=1000)
    budget().reserve(caller, 400, now=T)  # its worker dies: never settled

    assert budget().read([caller], now=T + HOLD - 1)[0][1:] == [400, 400]  # still in flight
    assert budget().read([caller], now=T + HOLD)[0][1:] == [0, 0]  # not for 33 days


def test_a_settle_after_the_deadline_releases_nothing_twice(budget: Budget) -> None:
    caller = Caller("key_slow", tokens_per_month=10_000)
    late = budget().reserve(caller, 400, now=T)
    budget().reserve(caller, 300, now=T + 30)  # another, still in flight

    budget().settle(late, 10, now=T + HOLD + 5)  # its 400 was already released at T + 60

    assert budget().read([caller], now=T + HOLD + 5)[0][2] == 300 + 10


def test_a_dead_reservation_no_longer_blocks_the_quota(budget: Budget) -> None:
    caller = Caller("key_quota", tokens_per_day=500)
    budget().reserve(caller, 500, now=T)

    assert budget().reserve(caller, 10, now=T + 1).full == "day"
    assert budget().reserve(caller, 10, now=T + HOLD).full is None


def test_the_store_file_keeps_the_windows_for_the_next_workers(tmp_path: Path) -> None:
    store = str(tmp_path / "tokens.sqlite3")
    caller = Caller("key_kept", tokens_per_month=1000)
    before = TokenBudget("memory://", store)
    before.settle(before.reserve(caller, 100, now=T), 700, now=T + 1)

    after = TokenBudget("memory://", store)  # a reload's new workers, or a restart

    assert after.read([caller], now=T + 2)[0][2] == 700
    assert after.reserve(caller, 400, now=T + 2).full is None  # 700 < 1000: admitted
    assert after.reserve(caller, 1, now=T + 3).full == "month"


def test_workers_sharing_a_store_file_admit_exactly_the_limit(tmp_path: Path) -> None:
    store = str(tmp_path / "tokens.sqlite3")
    workers = [TokenBudget("memory://", store) for _ in range(3)]  # one connection each
    caller = Caller("key_burst", tpm=100, tokens_per_day=100)
    admitted: list[int] = []
    barrier = threading.Barrier(21)

    def one(budget: TokenBudget) -> None:
        barrier.wait()
        for _ in range(10):
            if budget.reserve(caller, 7).full is None:
                admitted.append(7)

    threads = [threading.Thread(target=one, args=(workers[i % 3],)) for i in range(21)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    assert sum(admitted) == 105  # 15 admitted: the 15th found 98 < 100
    assert all(w.up for w in workers)


def test_an_unwritable_store_fails_open_into_memory(tmp_path: Path) -> None:
    store = tmp_path / "tokens.sqlite3"
    budget = TokenBudget("memory://", str(store))
    caller = Caller("key_gone", tpm=10)
    store.unlink()
    store.mkdir()  # the file is now a directory: every step fails

    assert [budget.reserve(caller, 4).full for _ in range(4)] == [None, None, None, "minute"]
    assert not budget.up


def settings_env(tmp_path: Path, rule: str, **env: str) -> dict[str, str]:
    path = tmp_path / "gateway.yaml"
    path.write_text(f"keys:\n  - name: a\n    key_env: TEAM_A_KEY\n    {rule}\n")
    return {
        "ENV_FILE": "",
        "GATEWAY_CONFIG": str(path),
        "TARGET_API_KEY": UPSTREAM_KEY,
        "TEAM_A_KEY": "team-a-key-0123456789",
        "RATE_LIMIT_REQUESTS_PER_MINUTE": "0",
        "GUNICORN_WORKERS": "2",
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path),
        **env,
    }


def test_token_limits_with_several_workers_on_memory_share_the_store_file(
    tmp_path: Path,
) -> None:
    settings = load_settings(settings_env(tmp_path, "tokens_per_day: 1000"))

    assert settings.token_store_file == "/tmp/ai-gateway-tokens.sqlite3"
    assert settings.token_reservation_ttl == 900.0
    with pytest.raises(ConfigError, match="RATE_LIMIT_STORAGE_URI"):  # rpm: per process
        load_settings(settings_env(tmp_path, "rpm: 10"))


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("TOKEN_RESERVATION_TTL", "0"),
        ("TOKEN_RESERVATION_TTL", "inf"),
        ("TOKEN_STORE_FILE", "/nope/x"),
    ],
)
def test_bad_token_store_settings_are_refused(tmp_path: Path, name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        load_settings(settings_env(tmp_path, "tpm: 10", GUNICORN_WORKERS="1", **{name: value}))


def test_a_store_locked_by_another_process_costs_the_limits_not_the_answers(
    tmp_path: Path,
) -> None:
    import sqlite3
    import time

    path = tmp_path / "tokens.sqlite3"
    budget = TokenBudget("memory://", str(path))
    caller = Caller("k1", tpm=1000)
    budget.settle(budget.reserve(caller, 10), 10)  # the file exists and works
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # an operator's sqlite3 shell, a frozen worker
    try:
        took: list[float] = []

        def one() -> None:
            started = time.monotonic()
            budget.settle(budget.reserve(caller, 10), 10)
            took.append(time.monotonic() - started)

        threads = [threading.Thread(target=one) for _ in range(12)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert len(took) == 12
        # Each waits at most the short busy timeout once, then memory holds the counts.
        assert max(took) < 3, took
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def test_a_store_file_planted_as_a_symlink_is_refused_at_start_up(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.sqlite3"
    target.write_bytes(b"")
    store = tmp_path / "tokens.sqlite3"
    store.symlink_to(target)
    with pytest.raises(ConfigError, match="symlink or belongs to another user"):
        TokenBudget("memory://", str(store))


def test_a_new_store_file_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    store = tmp_path / "tokens.sqlite3"
    TokenBudget("memory://", str(store))
    assert store.stat().st_mode & 0o777 == 0o600
