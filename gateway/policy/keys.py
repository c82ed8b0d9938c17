"""Gateway keys and their rules: the `KeyRing` finds the `Caller` a presented key belongs to.

Keys from GATEWAY_API_KEYS get the file's `defaults:`; keys from its `keys:` section get
their own rules, each unset field falling back to those defaults. Every key is held as its
SHA-256 digest only.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from dataclasses import dataclass, field
from functools import cached_property

from gateway.config import KeyDefaults, KeyPolicy, Team
from gateway.policy.prices import to_nanos

# The token windows a key may be limited in; "minute" is `tpm`, the others are quotas.
WINDOWS = ("minute", "day", "month")
# The money windows: per UTC day, per UTC month, and in all (no reset).
BUDGET_WINDOWS = ("day", "month", "total")


@dataclass(frozen=True)
class Caller:
    # A short, non-reversible id of the key: safe for logs, metrics and rate-limit keys.
    key_id: str
    # The configured name of the key (GATEWAY_CONFIG keys), else None.
    name: str | None = None
    # Public model names and `*` patterns this key may use.
    models: tuple[str, ...] = ("*",)
    # Requests per minute; 0: no request limit.
    rpm: int = 0
    # Tokens per minute, day (UTC) and month (UTC); 0: no limit in that window.
    tpm: int = 0
    tokens_per_day: int = 0
    tokens_per_month: int = 0
    expires_at: float | None = None  # a Unix time
    enabled: bool = True
    # Money per UTC day, month and in all, in nano-units of the prices' currency; 0: none.
    budget_per_day: int = 0
    budget_per_month: int = 0
    budget_total: int = 0
    # The team whose windows each request must fit too (a Caller whose key_id is "team:x").
    team: Caller | None = None
    _pattern: re.Pattern[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_pattern", _allow_list(self.models))

    @property
    def label(self) -> str:
        """How logs, metrics and the usage API name the key: its name, else its id."""
        return self.name or self.key_id

    def allows(self, model: str) -> bool:
        """Whether this key may use the public model `model` (its allow-list)."""
        return self._pattern.fullmatch(model) is not None

    def expired(self, now: float | None = None) -> bool:
        return self.expires_at is not None and (now or time.time()) >= self.expires_at

    def token_limit(self, window: str) -> int:
        return {"minute": self.tpm, "day": self.tokens_per_day, "month": self.tokens_per_month}[
            window
        ]

    def budget(self, window: str) -> int:
        return {
            "day": self.budget_per_day,
            "month": self.budget_per_month,
            "total": self.budget_total,
        }[window]

    @cached_property  # asked on every request; a Caller never changes
    def budgeted(self) -> bool:
        """Whether this key, or its team, has a budget: every answer must have a price."""
        own = any(self.budget(w) for w in BUDGET_WINDOWS)
        return own or (self.team is not None and self.team.budgeted)


def _allow_list(models: tuple[str, ...]) -> re.Pattern[str]:
    """One regex for the list: names match exactly, `*` matches any run of characters."""
    if not models:
        return re.compile(r"(?!)")  # an empty list allows nothing
    alternatives = (".*".join(re.escape(part) for part in name.split("*")) for name in models)
    return re.compile("|".join(f"(?:{a})" for a in alternatives), re.DOTALL)


def key_id(key: str) -> str:
    return _id_of(hashlib.sha256(key.encode()).digest())


def _id_of(digest: bytes) -> str:
    return "key_" + digest.hex()[:12]


class KeyRing:
    """The configured gateway keys, held as SHA-256 digests, each with its `Caller`."""

    def __init__(
        self,
        keys: tuple[str, ...],
        policies: tuple[KeyPolicy, ...] = (),
        defaults: KeyDefaults | None = None,
        default_rpm: int = 0,
        teams: tuple[Team, ...] = (),
    ) -> None:
        defaults = defaults or KeyDefaults()
        self.teams = {t.name: _team(t) for t in teams}
        rpm = defaults.rpm if defaults.rpm is not None else default_rpm
        entries: list[tuple[bytes, KeyPolicy | None]]
        entries = [(hashlib.sha256(k.encode()).digest(), None) for k in keys]
        entries += [(p.digest, p) for p in policies]
        self._entries = [(d, _caller(d, p, defaults, rpm, self.teams)) for d, p in entries]

    @property
    def callers(self) -> tuple[Caller, ...]:
        return tuple(dict.fromkeys(caller for _, caller in self._entries))

    def identify(self, presented: str) -> Caller | None:
        # Hashing first and comparing every entry keeps the time independent of the key.
        digest = hashlib.sha256(presented.encode()).digest()
        found = None
        for candidate, caller in self._entries:
            if hmac.compare_digest(digest, candidate):
                found = caller
        return found


def _team(team: Team) -> Caller:
    """A team as the windows it holds: a Caller no key identifies as."""
    return Caller(
        key_id=f"team:{team.name}",
        name=team.name,
        tpm=team.tpm or 0,
        tokens_per_day=team.tokens_per_day or 0,
        tokens_per_month=team.tokens_per_month or 0,
        budget_per_day=to_nanos(team.budget_per_day),
        budget_per_month=to_nanos(team.budget_per_month),
        budget_total=to_nanos(team.budget_total),
    )


def _caller(
    digest: bytes,
    policy: KeyPolicy | None,
    defaults: KeyDefaults,
    default_rpm: int,
    teams: dict[str, Caller],
) -> Caller:
    if policy is None:
        policy = KeyPolicy.model_construct(name="", digest=digest)

    def pick(own: int | None, fallback: int | None) -> int:
        return own if own is not None else (fallback or 0)

    return Caller(
        key_id=_id_of(digest),
        name=policy.name or None,
        models=policy.models if policy.models is not None else defaults.models,
        rpm=pick(policy.rpm, default_rpm),
        tpm=pick(policy.tpm, defaults.tpm),
        tokens_per_day=pick(policy.tokens_per_day, defaults.tokens_per_day),
        tokens_per_month=pick(policy.tokens_per_month, defaults.tokens_per_month),
        expires_at=policy.expires_at.timestamp() if policy.expires_at else None,
        enabled=policy.enabled,
        budget_per_day=to_nanos(policy.budget_per_day),
        budget_per_month=to_nanos(policy.budget_per_month),
        budget_total=to_nanos(policy.budget_total),
        team=teams.get(policy.team) if policy.team else None,
    )
