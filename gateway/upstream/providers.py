"""What differs from one provider to the next: where and how to reach it, and what its
answers mean for fallback. (What it is sent is the dialect's: see dialect.py.)"""

from __future__ import annotations

import datetime
import email.utils
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import orjson
import requests

from gateway.config import Provider, Settings

# A failed attempt's outcome (gateway_upstream_attempts_total{outcome},
# gateway_fallbacks_total{reason}) and the routing.fallback_on value that lets it fall back.
# An account in arrears serves nobody, and a provider refusing the gateway's own key (401,
# 403) serves nobody either: both fall back as a 5xx does.
FALLBACK_SETTING = {
    "connect": "connect",
    "timeout": "timeout",
    "rate_limited": "429",
    "server_error": "5xx",
    "arrearage": "5xx",
    "provider_auth": "5xx",
    # A stream that broke (or ended) before its first piece: nothing reached the client.
    "stream_broken": "5xx",
}


class AttemptObserver(Protocol):
    """Told of every attempt and fallback as it happens (the metrics, in the app)."""

    def attempted(self, provider: str, model: str, outcome: str) -> None: ...

    def fell_back(self, provider: str, model: str, reason: str) -> None: ...


class NoObserver:
    def attempted(self, provider: str, model: str, outcome: str) -> None:
        del provider, model, outcome

    def fell_back(self, provider: str, model: str, reason: str) -> None:
        del provider, model, reason


@dataclass(frozen=True)
class Target:
    """How to reach one provider, computed once at start-up."""

    base_url: str  # normalised once, as requests would send it
    headers: Mapping[str, str]  # the provider's extra headers, then its Authorization
    timeout: tuple[float, float]
    proxies: Mapping[str, str]

    @classmethod
    def of(cls, provider: Provider, settings: Settings) -> Target:
        headers = dict(provider.headers)
        if provider.api_key:  # a local vLLM or Ollama may need none
            headers["Authorization"] = f"Bearer {provider.api_key}"
        timeout = (
            provider.connect_timeout or settings.upstream_connect_timeout,
            provider.read_timeout or settings.upstream_read_timeout,
        )
        return cls(normalized_url(provider.base_url), headers, timeout, dict(provider.proxies))


def normalized_url(url: str) -> str:
    """The base URL as requests would send it (IDNA host, quoted path), computed once."""
    prepared = requests.PreparedRequest()
    prepared.prepare_url(url, None)
    return (prepared.url or url).rstrip("/")


def is_stream(upstream: requests.Response) -> bool:
    return upstream.headers.get("Content-Type", "").startswith("text/event-stream")


def status_failure(status: int) -> str | None:
    """The outcome a provider's status is, when it is the provider's failure (not 429)."""
    if status in (401, 403):  # the gateway's own key for this provider, not the client's
        return "provider_auth"
    if status >= 500:
        return "server_error"
    return None


def retry_after(value: str | None) -> float | None:
    """Retry-After in seconds: digits (RFC 9110's delay-seconds) or an HTTP date; None (the
    default cooldown) for anything else: float() would take "nan", "-5", "1_000" or "٣"."""
    value = (value or "").strip()
    if value.isascii() and value.isdigit():
        return float(value)  # a huge one is capped by max_cooldown
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # "-0000": UTC, with no claim about the local zone
        when = when.replace(tzinfo=datetime.UTC)
    return max(0.0, when.timestamp() - time.time())


def in_arrears(body: bytes) -> bool:
    """Whether a DashScope 400 says the account is in arrears (it then serves nobody)."""
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    if not isinstance(answer, dict):
        return False
    error = answer.get("error")
    code = error.get("code") if isinstance(error, dict) else answer.get("code")
    return code == "Arrearage"
