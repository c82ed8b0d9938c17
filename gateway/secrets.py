"""How the gateway's secrets can be spelled in text, and their masked form.

Used by the log redactor and by the upstream client, which masks the secrets a provider
echoes back (a 401 body that repeats the `Authorization` header it received). Imports
nothing of ours.
"""

from __future__ import annotations

import orjson


def spellings(secret: str) -> tuple[str, ...]:
    """The secret as written, and as a JSON encoder escapes it inside a string."""
    escaped = orjson.dumps(secret).decode()[1:-1]
    # Some encoders (PHP's, Java's) also escape "/" as "\/".
    return tuple(dict.fromkeys((secret, escaped, escaped.replace("/", "\\/"))))


def mask(secret: str) -> str:
    """A key named without giving it away, as OpenAI does: `sk-...abcd`.

    Shows at most 7 characters, and only of a key long enough that they do not help guess
    the rest. ASCII, since it may stand in a header value.
    """
    if len(secret) < 20:
        return "..."
    head = secret[:3] if secret[2] in "-_" else ""
    return f"{head}...{secret[-4:]}"
