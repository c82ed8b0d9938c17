"""SqliteCounters (one UPSERT per step, a purge at most twice a second) against MemoryCounters.

Both are driven by the same calls on one clock: the `now` the steps are given, and the
`time.time()` the counters' expiry reads.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import pytest

import gateway.policy.counters
import gateway.policy.sqlite_counters
from gateway.policy.counters import Hold, MemoryCounters
from gateway.policy.sqlite_counters import SqliteCounters

# 2027-01-15T08:00:00Z
T0 = 1_800_000_000.0


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    clock = Clock(T0)
    monkeypatch.setattr(gateway.policy.counters, "time", clock)
    monkeypatch.setattr(gateway.policy.sqlite_counters, "time", clock)
    return clock


@dataclass
class Pair:
    memory: MemoryCounters
    sqlite: SqliteCounters


@pytest.fixture
def pair(tmp_path: Path, clock: Clock) -> Pair:
    return Pair(MemoryCounters(), SqliteCounters(str(tmp_path / "tokens.sqlite3")))


def _keys(owner: str, now: float) -> list[str]:
    """An owner's counters as tokens.py names them: minute, day, month, and money."""
    minute, day, month = int(now // 60), int(now // 86400), int(now // (86400 * 30))
    tag = f"ai-gateway:tokens:{{{owner}}}"
    return [
        f"{tag}:minute:{minute}",
        f"{tag}:day:{day}",
        f"{tag}:month:{month}",
        f"{tag}:cost-day:{day}",
        f"{tag}:cost-total:all",
    ]


# Per window: tokens refuse once the counter has reached the limit, money (negative) when
# the counter plus the amount would pass it, 0 is none.
LIMITS = [40, 300, 0, -500, -2000]


def _hold(rng: random.Random, owner: str, now: float, n: int, far: bool) -> Hold:
    amounts = tuple(rng.choice([0, 1, 5, 10, 30]) for _ in LIMITS)
    if rng.random() < 0.1:
        amounts = (0,) * len(LIMITS)  # holds nothing (a window already full upstream)
    deadline = now + (1e6 if far else rng.choice([0.5, 2, 5, 20, 200]))
    return Hold(f"{owner}-{n}", tuple(_keys(owner, now)), amounts, deadline)


def _random_run(
    pair: Pair, clock: Clock, seed: int, steps: int, least_gap: float, far: bool = False
) -> int:
    """Same calls on both; every answer compared. Returns how many reserves were refused."""
    rng = random.Random(seed)
    holds: list[Hold] = []
    refused = 0
    for n in range(steps):
        clock.now += least_gap + rng.choice([0.0, rng.uniform(0, 2), rng.uniform(0, 40)])
        now = clock.now
        owner = rng.choice(["alpha", "beta", "gamma"])
        action = rng.random()
        if action < 0.45:
            hold = _hold(rng, owner, now, n, far)
            limits = [lim if rng.random() < 0.8 else 0 for lim in LIMITS]
            expected = pair.memory.reserve(hold, limits, now)
            assert pair.sqlite.reserve(hold, limits, now) == expected, n
            refused += expected[0] != 0
            if expected[0] == 0:
                holds.append(hold)
        elif action < 0.8:
            # Settle one of the holds (maybe already released at its deadline, maybe settled
            # before: released never twice), or none; charge what was really used.
            settled = rng.choice(holds) if holds and rng.random() < 0.9 else None
            keys = _keys(owner, now) if settled is None else list(settled.keys)
            charges = [(k, rng.choice([0, 0, 3, 12, 50])) for k in rng.sample(keys, 3)]
            pair.memory.settle(settled, charges, now)
            pair.sqlite.settle(settled, charges, now)
        else:
            keys = _keys(owner, now) + _keys(rng.choice(["alpha", "beta"]), now - 90)
            assert pair.sqlite.read(keys, now) == pair.memory.read(keys, now), n
    everything = sorted({k for hold in holds for k in hold.keys})
    assert pair.sqlite.read(everything, clock.now) == pair.memory.read(everything, clock.now)
    return refused


@pytest.mark.parametrize("seed", range(5))
def test_answers_as_the_memory_counters_when_steps_are_half_a_second_apart(
    pair: Pair, clock: Clock, seed: int
) -> None:
    # Half a second or more between steps: each step purges, as every step did before.
    refused = _random_run(pair, clock, seed, steps=1500, least_gap=0.5)
    assert refused > 20  # the limits were reached, not only passed under


@pytest.mark.parametrize("seed", range(3))
def test_answers_as_the_memory_counters_with_bursts_and_no_hold_reaching_its_deadline(
    pair: Pair, clock: Clock, seed: int
) -> None:
    # Steps closer than half a second (purges skipped) change nothing while no reservation
    # is past its deadline.
    _random_run(pair, clock, seed, steps=1500, least_gap=0.0, far=True)


def test_a_hold_past_its_deadline_is_released_at_the_first_step_half_a_second_after_a_purge(
    pair: Pair, clock: Clock
) -> None:
    keys = tuple(_keys("alpha", T0))
    hold = Hold("h", keys, (10, 10, 10, 0, 0), T0 + 10)
    assert pair.sqlite.reserve(hold, LIMITS, T0)[0] == 0  # purges at T0
    held = [10, 10, 10, 0, 0]

    assert pair.sqlite.read(list(keys), T0 + 9.8) == held  # a purge at 9.8: not yet due
    assert pair.sqlite.read(list(keys), T0 + 10.0) == held  # due, but 0.2 s after a purge
    assert pair.sqlite.read(list(keys), T0 + 10.29) == held  # 0.49 s after
    assert pair.sqlite.read(list(keys), T0 + 10.3) == [0] * 5  # 0.5 s after: purged
    # The memory counters release it at the first step at or past its deadline.
    pair.memory.reserve(hold, LIMITS, T0)
    assert pair.memory.read(list(keys), T0 + 10.0) == [0] * 5


def test_a_step_with_an_earlier_now_still_purges_what_is_due_by_then(
    pair: Pair, clock: Clock
) -> None:
    # Steps come from threads racing for the lock: one with an earlier `now` can follow.
    keys = tuple(_keys("alpha", T0))
    early = Hold("early", keys, (5, 0, 0, 0, 0), T0 + 1)
    pair.sqlite.reserve(early, LIMITS, T0)
    pair.sqlite.read(list(keys), T0 + 0.9)  # purges (0.9 s after the last), nothing due

    assert pair.sqlite.read(list(keys), T0 + 0.6)[0] == 5  # earlier: purges, nothing due
    assert pair.sqlite.read(list(keys), T0 + 1.2)[0] == 0  # 0.6 s after that purge: released


def test_a_settle_releases_its_hold_once_even_between_purges(pair: Pair, clock: Clock) -> None:
    keys = tuple(_keys("alpha", T0))
    first = Hold("first", keys, (10, 10, 10, 0, 0), T0 + 1)
    second = Hold("second", keys, (4, 4, 4, 0, 0), T0 + 100)
    for counters in (pair.memory, pair.sqlite):
        counters.reserve(first, LIMITS, T0)
        counters.reserve(second, LIMITS, T0 + 0.1)
        counters.settle(first, [(keys[0], 7)], T0 + 0.2)  # released by its settle
        counters.settle(first, [(keys[0], 1)], T0 + 2)  # again, past its deadline: not twice

    assert pair.sqlite.read(list(keys), T0 + 3) == pair.memory.read(list(keys), T0 + 3)
    assert pair.sqlite.read(list(keys), T0 + 3)[:3] == [4 + 7 + 1, 4, 4]


def test_one_step_writes_every_window_and_a_key_twice_in_one_hold_counts_twice(
    pair: Pair, clock: Clock
) -> None:
    key = _keys("alpha", T0)[0]
    twice = Hold("twice", (key, key), (3, 4), T0 + 60)
    for counters in (pair.memory, pair.sqlite):
        assert counters.reserve(twice, [0, 0], T0) == [0, 3, 7]
        counters.settle(None, [(key, 5), (key, 6)], T0 + 1)
    assert pair.sqlite.read([key], T0 + 2) == pair.memory.read([key], T0 + 2) == [18]


def test_an_expired_window_starts_again_from_what_is_added(pair: Pair, clock: Clock) -> None:
    minute = _keys("alpha", T0)[0]  # kept 120 s from its first write
    for counters in (pair.memory, pair.sqlite):
        counters.settle(None, [(minute, 30)], T0)
    clock.now = T0 + 119
    assert pair.sqlite.read([minute], clock.now) == pair.memory.read([minute], clock.now) == [30]
    clock.now = T0 + 120
    assert pair.sqlite.read([minute], clock.now) == pair.memory.read([minute], clock.now) == [0]
    for counters in (pair.memory, pair.sqlite):
        counters.settle(None, [(minute, 2)], clock.now)
    clock.now = T0 + 200
    assert pair.sqlite.read([minute], clock.now) == pair.memory.read([minute], clock.now) == [2]
