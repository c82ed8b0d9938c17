"""Per-key policy: who is calling, what their key may do, and what it has used.

- `keys.py`: `KeyRing` (gateway keys in, a `Caller` out) and `Caller`'s rules: its model
  allow-list, request and token limits, quotas, expiry;
- `tokens.py`: `TokenBudget`, the token counters per key and window (minute, day, month)
  in the limits' storage (memory:// or redis://), reserved before a call and settled after;
- `usage.py`: what an answer costs (its reported usage, or an estimate when there is none);
- `enforce.py`: the checks a view asks for before relaying, and the x-ratelimit-*-tokens
  headers on every authenticated response.

May import gateway.config, errors, record and metrics; never a blueprint or the upstream.
"""

from gateway.policy.keys import Caller, KeyRing, key_id
from gateway.policy.tokens import TokenBudget

__all__ = ["Caller", "KeyRing", "TokenBudget", "key_id"]
