"""Per-key policy: who is calling, what their key may do, and what it has used.

- `keys.py`: `KeyRing` (gateway keys in, a `Caller` out) and `Caller`'s rules: its model
  allow-list, request and token limits, quotas, budgets, team, expiry;
- `tokens.py`: `TokenBudget`, the token and money counters per key and team and window
  (minute, day, month; money day, month, total) in the limits' storage (memory:// or
  redis://), reserved in one atomic step before a call and settled after;
- `usage.py`: what an answer costs in tokens (its reported usage, or an estimate when there
  is none); `prices.py`: what it costs in money (the file's prices, exact nano-units);
- `counters.py`, `sqlite_counters.py`: where the token and money windows live, with their
  reservations and deadlines; `report.py`: /v1/usage and the quota and budget gauges;
- `enforce.py`: the checks a view asks for before relaying, and the x-ratelimit-*-tokens
  headers on every authenticated response.

May import gateway.config, errors, record and metrics; never a blueprint or the upstream.
"""

from gateway.policy.keys import Caller, KeyRing, key_id
from gateway.policy.tokens import TokenBudget

__all__ = ["Caller", "KeyRing", "TokenBudget", "key_id"]
