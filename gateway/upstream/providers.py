"""What differs from one provider to the next: where and how to reach it, and what its
answers mean for fallback. (What it is sent is the dialect's: see dialect.py.)"""

from __future__ import annotations

import datetime
import email.utils
import re
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
# 403) serves nobody either: both fall back as a 5xx does. `timeout` is a connect timeout
# or a stream's before its first chunk (nothing generated is lost); `read_timeout` is a
# non-streamed request's once sent: the provider may be generating it still, so sending it
# elsewhere may have it generated (and billed) twice, and only `read_timeout` allows that.
FALLBACK_SETTING = {
    "connect": "connect",
    "timeout": "timeout",
    "read_timeout": "read_timeout",
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


# Failures one request can cause by itself (a parameter the provider crashes on, a long
# generation): counted against a deployment only when different request bodies fail.
BODY_DEPENDENT = frozenset({"server_error", "read_timeout"})
# A 401/403 about the gateway's own credentials or account (OpenAI's "Incorrect API key
# provided", DashScope's "InvalidApiKey", "Workspace.AccessDenied", an unsupported region).
_CREDENTIALS = re.compile(
    r"api[ _-]?key|apikey|access[ _-]?key|access[ _-]?token|authenticat|unauthori[sz]ed|"
    r"credential|token expired|invalid[ _-]?token|account|organi[sz]ation|workspace|"
    r"region|country",
    re.IGNORECASE,
)
# A 401/403 about what the request asked for, whatever else it says: Anthropic's "Your API
# key does not have permission to use the specified resource" (a beta, a tool) and content
# filters refuse one request, not every tenant.
_REQUEST_SCOPED = re.compile(
    r"permission to use|specified resource|content[ _-]?(?:filter|policy|management)|"
    r"blocked|flagged|inappropriate|safety",
    re.IGNORECASE,
)
# A 429 about the request's size, not the account's rate: OpenAI's "Request too large for
# gpt-4o ... on tokens per min", DashScope's "Range of input length should be [1, 30720]",
# context-length wordings. ("Rate limit reached ... Requested 2000" is a rate.)
_TOO_LARGE = re.compile(
    r"too large|too long|input length|context[ _-]?length|context window|maximum context|"
    r"exceeds? (?:the )?(?:maximum|max|limit|context)|string_above_max_length|"
    r"reduce the length",
    re.IGNORECASE,
)


def status_failure(status: int) -> str | None:
    """The outcome a provider's status is, when it is the provider's failure whatever it
    says (a 401, 403 or 429 is read first: see `refuses_gateway_key`, `request_too_large`)."""
    if status >= 500:
        return "server_error"
    return None


def refuses_gateway_key(status: int, body: bytes, model: str) -> bool:
    """Whether a 401/403 is about the gateway's own credentials (every tenant is refused)
    rather than the request (the client's, relayed as it is).

    The request's: anything naming a model ("does not have access to model",
    `model_not_found`, DashScope's `Model.AccessDenied`). The gateway's: a 401 otherwise
    (the client's key never reaches the provider, and no client header can steer the
    account), or a 403 about keys, tokens, the account or its region. Any other 403 (a
    file, a resource, a filter) is the request's. The requested model's own name is left
    out first: a client cannot name a model "invalid api key" to cool a provider."""
    said = _without_quoted(_error_text(body), model)
    if "model" in said.lower() or _REQUEST_SCOPED.search(said):
        return False
    return status == 401 or _CREDENTIALS.search(said) is not None


def request_too_large(body: bytes, model: str) -> bool:
    """Whether a 429 says the request is too large (the request's: relayed, cools nothing)."""
    said = _without_quoted(_error_text(body), model)
    return _TOO_LARGE.search(said) is not None


def _without_quoted(text: str, model: str) -> str:
    """`text` without the model name where it is quoted (as providers name it). Only there:
    a client naming its model "model" must not erase that word from every message."""
    if not model:
        return text
    for quote in ("'", '"', "`"):
        text = text.replace(f"{quote}{model}{quote}", " ")
    return text


def _error_text(body: bytes) -> str:
    """An error answer's code, type and message (OpenAI's `{"error": {...}}` or DashScope's
    top-level `code`/`message`), or its first bytes when it is not JSON."""
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body[:4096].decode("utf-8", "replace")
    if not isinstance(answer, dict):
        return ""
    error = answer.get("error")
    if isinstance(error, str):
        return error[:4096]
    fields = error if isinstance(error, dict) else answer
    return " ".join(str(fields.get(name) or "")[:4096] for name in ("code", "type", "message"))


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
