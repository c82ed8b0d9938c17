"""Namespace tools flattened to plain chat functions, and the namespace put back on the calls.

Codex sends `{"type": "namespace", "name": ns, "tools": [functions]}`; chat only has flat
function names, matching `[a-zA-Z0-9_-]{1,64}` on OpenAI. The flat name is derived from the
request alone, so a call replayed from history flattens to the same name the model saw.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable

from gateway.protocols.responses.request import Tool

SEPARATOR = "__"
MAX_NAME = 64
_INVALID = re.compile(r"[^a-zA-Z0-9_-]")


def flat_name(namespace: str, name: str) -> str:
    flat = _INVALID.sub("_", f"{namespace}{SEPARATOR}{name}")
    if len(flat) <= MAX_NAME:
        return flat
    # Too long: keep a readable prefix and tell names apart by a digest of the original.
    digest = hashlib.sha256(f"{namespace}\0{name}".encode()).hexdigest()[:10]
    return f"{flat[: MAX_NAME - 11]}_{digest}"


def namespaced(tools: Iterable[Tool]) -> dict[str, tuple[str, str]]:
    """Flat function name -> (namespace, name) for every function inside a namespace tool."""
    names: dict[str, tuple[str, str]] = {}
    for tool in tools:
        if tool.type == "namespace" and tool.name:
            for inner in tool.tools or ():
                if inner.type == "function" and inner.name:
                    names[flat_name(tool.name, inner.name)] = (tool.name, inner.name)
    return names


def restore(flat: str, names: dict[str, tuple[str, str]]) -> tuple[str, str | None]:
    """(name, namespace) of a function the model called, as OpenAI would report it."""
    found = names.get(flat)
    if found is None:
        return flat, None
    return found[1], found[0]
