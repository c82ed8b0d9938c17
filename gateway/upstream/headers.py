"""Which headers cross the gateway, in each direction."""

from __future__ import annotations

from collections.abc import Mapping

from gateway.upstream.scrub import SecretMask

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
# The only client headers sent upstream: an allow-list, because anything else could steer
# the provider account the gateway pays with (OpenAI-Organization, OpenAI-Project,
# X-DashScope-WorkSpace...) or smuggle hop-by-hop and credential headers through.
# anthropic-version and -beta go to a provider serving Messages itself (a translated leg
# drops them); `x-api-key` is the caller's gateway key and never leaves.
_FORWARDED_FROM_CLIENT = frozenset(
    {"content-type", "accept", "user-agent", "openai-beta", "anthropic-version", "anthropic-beta"}
)
# The openai SDKs' telemetry headers (X-Stainless-Lang, -Retry-Count...): harmless, useful.
_FORWARDED_PREFIXES = ("x-stainless-",)
_DROP_FROM_UPSTREAM = HOP_BY_HOP | {
    # Framing and integrity that no longer match: the body is decoded (and may be masked).
    "content-length",
    "content-encoding",
    "content-md5",
    "digest",
    "content-digest",
    "repr-digest",
    # The provider's cookies, and headers the gateway sets itself (request id, CORS, limits).
    "set-cookie",
    "set-cookie2",
    "server",
    "date",
    "x-request-id",
    # Meant for the provider's own origin: relayed, they would tell the caller's browser or
    # SDK about the gateway's origin (HSTS, Alt-Svc, Clear-Site-Data, reporting), send it to
    # the provider's URLs (Location, Refresh), or ask for the provider's credentials.
    "strict-transport-security",
    "alt-svc",
    "clear-site-data",
    "public-key-pins",
    "public-key-pins-report-only",
    "expect-ct",
    "nel",
    "report-to",
    "reporting-endpoints",
    "location",
    "content-location",
    "refresh",
    "www-authenticate",
}
_DROP_PREFIXES = ("access-control-", "x-ratelimit-")
_UPSTREAM_ID_HEADERS = (
    "x-request-id",
    "x-dashscope-request-id",
    "request-id",
    "x-amzn-requestid",
)


def forwarded(lowered_name: str) -> bool:
    return lowered_name in _FORWARDED_FROM_CLIENT or lowered_name.startswith(_FORWARDED_PREFIXES)


def relayable_headers(headers: Mapping[str, str], mask: SecretMask) -> dict[str, str]:
    # Headers the provider names in its Connection header are hop-by-hop too (RFC 9110 7.6.1).
    listed = {name.strip().lower() for name in headers.get("Connection", "").split(",")}
    kept = {}
    for name, value in headers.items():
        lowered = name.lower()
        if lowered in _DROP_FROM_UPSTREAM or lowered in listed:
            continue
        if not lowered.startswith(_DROP_PREFIXES):
            kept[name] = mask.text(value)
    return kept


def upstream_request_id(headers: Mapping[str, str]) -> str | None:
    for name in _UPSTREAM_ID_HEADERS:
        if value := headers.get(name):
            return value[:128]
    return None
