"""Settings: read from the environment once, validated, then frozen.

`load_settings` is the only place in the project that reads `os.environ` (and `.env`).
Everything else receives a `Settings` object; tests build one directly.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any
from urllib.parse import unquote, urlsplit

import requests.utils
from dotenv import dotenv_values

from gateway.config.file import FileError, read_gateway_file
from gateway.config.schema import (
    MIN_KEY_LENGTH,
    Deployment,
    KeyDefaults,
    KeyPolicy,
    ModelRoute,
    Pricing,
    Provider,
    RoutingPolicy,
    Team,
)

SERVICE_NAME = "ai-gateway"
VERSION = "0.1.0"

DEFAULT_TARGET_API_URL = "https://dashscope.aliyuncs.com/compatible-mode/v1"
LOG_LEVELS = ("TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL")
LOG_FORMATS = ("json", "text")
RATE_LIMIT_STRATEGIES = ("fixed-window", "moving-window", "sliding-window-counter")
MAX_GUNICORN_WORKERS = 64
MAX_GUNICORN_THREADS = 16384
# Every variable load_settings reads (documented in .env.example; deployment files are
# tested against this list).
ENVIRONMENT_VARIABLES = (
    "PORT",
    "TARGET_API_URL",
    "TARGET_API_KEY",
    "GATEWAY_API_KEYS",
    "RATE_LIMIT_REQUESTS_PER_MINUTE",
    "RATE_LIMIT_STORAGE_URI",
    "RATE_LIMIT_STRATEGY",
    "TOKEN_STORE_FILE",
    "TOKEN_RESERVATION_TTL",
    "LOG_LEVEL",
    "LOG_FORMAT",
    "HEALTH_CHECK_ENABLED",
    "CORS_ALLOWED_ORIGINS",
    "UPSTREAM_CONNECT_TIMEOUT",
    "UPSTREAM_READ_TIMEOUT",
    "UPSTREAM_TOTAL_TIMEOUT",
    "MAX_REQUEST_BODY_BYTES",
    "MAX_RESPONSE_BODY_BYTES",
    "GUNICORN_WORKERS",
    "GUNICORN_THREADS",
    "GUNICORN_PIN_WORKERS",
    "WEB_CONCURRENCY",
    "ENV_FILE",
    "HTTPS_PROXY",
    "HTTP_PROXY",
    "ALL_PROXY",
    "NO_PROXY",
    "https_proxy",
    "http_proxy",
    "all_proxy",
    "no_proxy",
    "REQUESTS_CA_BUNDLE",
    "SSL_CERT_FILE",
    "PROMETHEUS_MULTIPROC_DIR",
    "CLIENT_HEADER_TIMEOUT",
    "CLIENT_WRITE_TIMEOUT",
    "QUEUE_TIMEOUT",
    "GIL_SWITCH_INTERVAL",
    "RESPONSES_STORE_TTL",
    "RESPONSES_STORE_MEMORY_BYTES",
    "GATEWAY_CONFIG",
    "GATEWAY_ADMIN_KEY",
    "METRICS_KEY",
)
# /tmp: writable in the image (a tmpfs or emptyDir there: it outlives workers and reloads,
# not the container; with Redis the token windows live in Redis instead).
DEFAULT_TOKEN_STORE_FILE = "/tmp/ai-gateway-tokens.sqlite3"
# The provider built from TARGET_API_URL/TARGET_API_KEY when no file names any.
DEFAULT_PROVIDER = "default"


class ConfigError(SystemExit):
    """A missing or malformed setting.

    A `SystemExit` on purpose: raised anywhere during start-up (gunicorn.conf.py, app.py),
    Python prints the one-line message to stderr and exits with status 1, no traceback.
    """

    def __init__(self, message: str) -> None:
        super().__init__(f"configuration error: {message}")
        self.message = message


@dataclass(frozen=True)
class Settings:
    target_api_key: str = field(repr=False)
    gateway_api_keys: tuple[str, ...] = field(repr=False)
    target_api_url: str = DEFAULT_TARGET_API_URL
    port: int = 8080
    rate_limit_per_minute: int = 60
    # repr=False: a redis:// URI may carry a password.
    rate_limit_storage_uri: str = field(default="memory://", repr=False)
    rate_limit_strategy: str = "moving-window"
    # With memory://, the SQLite file holding the token windows, shared by the workers of
    # the host and kept across reloads and restarts (None: each process's memory).
    token_store_file: str | None = None
    # A reservation not settled by then (its worker was killed) is released: the longest
    # non-streamed answer by default. A longer stream is still charged in full at its end.
    token_reservation_ttl: float = 900.0
    log_level: str = "INFO"
    log_format: str = "json"
    health_check_enabled: bool = True
    cors_allowed_origins: tuple[str, ...] = ("*",)
    upstream_connect_timeout: float = 10.0
    # Longest silence between two upstream bytes: reasoning models can think for minutes.
    upstream_read_timeout: float = 600.0
    # Longest a non-streamed answer may take in all, however the provider paces its bytes.
    upstream_total_timeout: float = 900.0
    max_request_body_bytes: int = 10 * 1024 * 1024
    # The most (decoded) bytes relayed for one answer: 1 MB of gzip can inflate to 1 GB.
    max_response_body_bytes: int = 256 * 1024 * 1024
    gunicorn_workers: int = 1  # at most MAX_GUNICORN_WORKERS
    # Threads per worker = streams it serves at once (a stream holds its thread). 2,048: a
    # fresh start holds 2,000 open streams; idle threads cost ~19 KB each (see README).
    gunicorn_threads: int = 2048
    # Each worker on a core of its own (gateway/server/pinning.py): off by default.
    gunicorn_pin_workers: bool = False
    # Proxies for the upstream URL, resolved once from HTTPS_PROXY/NO_PROXY at start-up.
    # repr=False: a proxy URL may carry a password.
    upstream_proxies: Mapping[str, str] = field(
        default_factory=lambda: MappingProxyType({}), repr=False
    )
    upstream_ca_bundle: str | None = None
    prometheus_multiproc_dir: str | None = None
    # Capacity guards of the gunicorn worker (gateway/server/): see the README's "Capacity".
    # A client gets this long to send a request's head; no thread waits for it meanwhile.
    client_header_timeout: float = 10.0
    # A client that accepts no byte of the answer for this long is dropped (and its stream's
    # provider connection closed): long enough for a slow mobile link, short enough that a
    # stalled reader frees its thread within a minute.
    client_write_timeout: float = 60.0
    # A complete request waits this long for a free thread, then gets a 503 with Retry-After:
    # SDKs retry it (elsewhere, behind a load balancer) instead of hanging.
    queue_timeout: float = 5.0
    # How long a thread may hold the GIL before a waiting one forces a hand-off. Python's
    # 5 ms default makes each waiting stream thread wake and force a switch: at 2,000 open
    # streams on one core the hand-offs per chunk ran away (1,908 of 2,000 streams failed,
    # probes timed out); 50 ms held all 2,000 with probes at p50 5 ms, max 0.2-0.35 s
    # (20 ms and 100 ms were worse). The threads are I/O-bound: they yield at every syscall.
    gil_switch_interval: float = 0.05
    # The GATEWAY_CONFIG file, if any, and what it describes. Without providers, one
    # provider ("default") is built from TARGET_API_URL/TARGET_API_KEY; without models,
    # every model goes to the first provider.
    gateway_config: str | None = None
    providers: tuple[Provider, ...] = ()
    routes: tuple[ModelRoute, ...] = ()
    routing: RoutingPolicy = field(default_factory=RoutingPolicy)
    key_policies: tuple[KeyPolicy, ...] = ()
    key_defaults: KeyDefaults = field(default_factory=KeyDefaults)
    teams: tuple[Team, ...] = ()
    pricing: Pricing = field(default_factory=Pricing)
    # The values of the keys named by key_env in the file: redacted from logs like the rest.
    key_secrets: tuple[str, ...] = field(default=(), repr=False)
    # Values `${VAR}` put into providers' extra headers (an Azure-style `api-key`): provider
    # credentials, masked in answers and redacted from logs like the provider keys.
    header_secrets: tuple[str, ...] = field(default=(), repr=False)
    # Guards the usage API (/v1/usage); empty: that API is off.
    admin_api_key: str = field(default="", repr=False)
    # Guards /metrics (`Authorization: Bearer <key>`); empty: /metrics is public.
    metrics_key: str = field(default="", repr=False)
    # Stored Responses (`store: true`, the default): kept this long in the limits' storage
    # (Redis: seen by every replica), and in memory at most this many bytes per worker.
    responses_ttl: float = 86400.0
    responses_memory_bytes: int = 64 * 1024 * 1024

    def __post_init__(self) -> None:
        _validate_target(self)
        if not self.providers and self.target_api_key:
            default = Provider(
                name=DEFAULT_PROVIDER,
                base_url=self.target_api_url,
                api_key=self.target_api_key,
                proxies=dict(self.upstream_proxies),
            )
            object.__setattr__(self, "providers", (default,))
        if not self.routes and self.providers:
            everything = ModelRoute(
                name="*", deployments=(Deployment(provider=self.providers[0].name),)
            )
            object.__setattr__(self, "routes", (everything,))
        _validate(self)

    def provider(self, name: str) -> Provider:
        return next(p for p in self.providers if p.name == name)

    @property
    def secrets(self) -> tuple[str, ...]:
        """Every value that must never appear in a log line or an error message."""
        found = [
            self.target_api_key,
            *self.gateway_api_keys,
            *self.key_secrets,
            *self.header_secrets,
            self.admin_api_key,
            self.metrics_key,
            *(p.api_key for p in self.providers),
        ]
        proxies = [u for p in self.providers for u in p.proxies.values()]
        for uri in (self.rate_limit_storage_uri, *self.upstream_proxies.values(), *proxies):
            password = urlsplit(uri).password or ""
            found.extend((password, unquote(password)))
        return tuple(s for s in found if s)

    @property
    def upstream_secrets(self) -> tuple[str, ...]:
        """The secrets a provider (or the proxy in front of it) could echo back to a client."""
        # Unquoted: the proxy receives (and could echo) the decoded password.
        proxies = {
            *self.upstream_proxies.values(),
            *(u for p in self.providers for u in p.proxies.values()),
        }
        proxy_passwords = (unquote(urlsplit(uri).password or "") for uri in proxies)
        keys = (self.target_api_key, *(p.api_key for p in self.providers), *self.header_secrets)
        return tuple(dict.fromkeys(s for s in (*keys, *proxy_passwords) if s))


def _validate(s: Settings) -> None:
    _validate_upstream_and_keys(s)
    _validate_limits_and_server(s)
    _validate_capacity(s)


def _validate_target(s: Settings) -> None:
    """TARGET_API_URL/TARGET_API_KEY, checked before the default provider is built of them."""
    if s.target_api_key:
        _require_header_safe("TARGET_API_KEY", (s.target_api_key,))
    url = urlsplit(s.target_api_url)
    if url.scheme not in ("http", "https") or not url.hostname:
        raise ConfigError("TARGET_API_URL must be an http:// or https:// URL with a host")
    # Paths such as /chat/completions are appended to it: a query would end up in between.
    _require(not url.query and not url.fragment, "TARGET_API_URL must not have a ?query or #")


def _validate_upstream_and_keys(s: Settings) -> None:
    if not s.providers:
        raise ConfigError("TARGET_API_KEY is required (the key sent to the upstream provider)")
    if not all(s.gateway_api_keys) or not (s.gateway_api_keys or s.key_policies):
        raise ConfigError("GATEWAY_API_KEYS is required: comma-separated keys clients may use")
    _require(
        not s.admin_api_key or len(s.admin_api_key) >= MIN_KEY_LENGTH,
        f"GATEWAY_ADMIN_KEY must be at least {MIN_KEY_LENGTH} characters",
    )
    _require_header_safe("GATEWAY_ADMIN_KEY", (s.admin_api_key,))
    _require(
        not s.metrics_key or len(s.metrics_key) >= MIN_KEY_LENGTH,
        f"METRICS_KEY must be at least {MIN_KEY_LENGTH} characters",
    )
    _require_header_safe("METRICS_KEY", (s.metrics_key,))
    # Short keys are guessable, and the log redactor would blank every word containing one.
    _require(
        all(len(key) >= MIN_KEY_LENGTH for key in s.gateway_api_keys),
        f"GATEWAY_API_KEYS: every key must be at least {MIN_KEY_LENGTH} characters",
    )
    _require_header_safe("GATEWAY_API_KEYS", s.gateway_api_keys)
    _require(s.upstream_connect_timeout > 0, "UPSTREAM_CONNECT_TIMEOUT must be > 0")
    _require(s.upstream_read_timeout > 0, "UPSTREAM_READ_TIMEOUT must be > 0")
    _require(
        0 < s.upstream_total_timeout < float("inf"), "UPSTREAM_TOTAL_TIMEOUT must be finite and > 0"
    )


def _validate_limits_and_server(s: Settings) -> None:
    _require(1 <= s.port <= 65535, "PORT must be between 1 and 65535")
    _require(s.rate_limit_per_minute >= 0, "RATE_LIMIT_REQUESTS_PER_MINUTE must be >= 0")
    _require(
        s.rate_limit_strategy in RATE_LIMIT_STRATEGIES,
        f"RATE_LIMIT_STRATEGY must be one of {', '.join(RATE_LIMIT_STRATEGIES)}",
    )
    storage = urlsplit(s.rate_limit_storage_uri).scheme
    _require(
        storage in ("memory", "redis", "rediss", "redis+sentinel", "redis+cluster"),
        "RATE_LIMIT_STORAGE_URI must be memory:// or a redis:// URI",
    )
    _require(s.log_level in LOG_LEVELS, f"LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}")
    _require(s.log_format in LOG_FORMATS, "LOG_FORMAT must be json or text")
    _require(s.max_request_body_bytes > 0, "MAX_REQUEST_BODY_BYTES must be > 0")
    _require(s.max_response_body_bytes > 0, "MAX_RESPONSE_BODY_BYTES must be > 0")
    _require(s.gunicorn_workers >= 1, "GUNICORN_WORKERS must be >= 1")
    _require(s.gunicorn_threads >= 1, "GUNICORN_THREADS must be >= 1")
    # Upper bounds: beyond them a worker cannot boot on any machine this runs on (each
    # thread reserves 1 MiB of stack: 16,384 threads are 16 GiB of address space per
    # worker), and more workers than cores only multiply the threads.
    _require(
        s.gunicorn_workers <= MAX_GUNICORN_WORKERS,
        f"GUNICORN_WORKERS must be <= {MAX_GUNICORN_WORKERS} (scale with replicas beyond it)",
    )
    _require(
        s.gunicorn_threads <= MAX_GUNICORN_THREADS,
        f"GUNICORN_THREADS must be <= {MAX_GUNICORN_THREADS} (one stream per thread; "
        "scale with workers or replicas beyond it)",
    )
    _require(0 < s.responses_ttl <= 366 * 86400, "RESPONSES_STORE_TTL must be > 0 and <= a year")
    _require(s.responses_memory_bytes >= 0, "RESPONSES_STORE_MEMORY_BYTES must be >= 0")
    _require(
        0 < s.token_reservation_ttl < float("inf"), "TOKEN_RESERVATION_TTL must be finite and > 0"
    )
    _require(
        s.token_store_file is None or os.path.isdir(os.path.dirname(s.token_store_file) or "."),
        "TOKEN_STORE_FILE must be a file in an existing directory",
    )
    # memory:// counters live inside one process: a second worker would double the limit
    # (token windows in a TOKEN_STORE_FILE are shared by the host's workers; requests are not).
    _require(
        storage != "memory" or s.gunicorn_workers == 1 or not _any_limit(s),
        "GUNICORN_WORKERS > 1 needs RATE_LIMIT_STORAGE_URI=redis://...: with memory:// "
        "each worker keeps its own counters and the limit would not hold",
    )
    # Each scrape reaches one worker: without shared files /metrics would show only its part.
    _require(
        s.gunicorn_workers == 1 or s.prometheus_multiproc_dir is not None,
        "GUNICORN_WORKERS > 1 needs PROMETHEUS_MULTIPROC_DIR (a writable directory) so that "
        "/metrics adds up all workers",
    )
    _require(
        s.prometheus_multiproc_dir is None or os.path.isdir(s.prometheus_multiproc_dir),
        "PROMETHEUS_MULTIPROC_DIR must be an existing directory",
    )


def _any_limit(s: Settings) -> bool:
    """Whether any key has a limit whose counters memory:// keeps per process."""
    rules = (s.key_defaults, *s.key_policies)
    fields = (
        ("rpm",) if s.token_store_file else ("rpm", "tpm", "tokens_per_day", "tokens_per_month")
    )
    return s.rate_limit_per_minute > 0 or any(getattr(r, f) for r in rules for f in fields)


def _require_header_safe(name: str, keys: tuple[str, ...]) -> None:
    """A key travels in an `Authorization` header: printable ASCII, no spaces.

    A curly quote or a non-breaking space pasted from a document would otherwise fail every
    request later, with an error that blames the client. The message names the character's
    position and code point, never the key.
    """
    for key in keys:
        for position, char in enumerate(key, 1):
            if not "!" <= char <= "~":
                raise ConfigError(
                    f"{name} contains a character that cannot be sent in an HTTP header "
                    f"(U+{ord(char):04X} at position {position}); copy the key again"
                )


def _validate_capacity(s: Settings) -> None:
    # Finite: they become socket timeouts and deadlines ("inf" would not be one).
    for name, seconds in (
        ("CLIENT_HEADER_TIMEOUT", s.client_header_timeout),
        ("CLIENT_WRITE_TIMEOUT", s.client_write_timeout),
        ("QUEUE_TIMEOUT", s.queue_timeout),
        ("GIL_SWITCH_INTERVAL", s.gil_switch_interval),
    ):
        _require(0 < seconds < float("inf"), f"{name} must be a number of seconds > 0")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Build `Settings` from the environment, with `.env` (or `$ENV_FILE`) filling gaps."""
    env = dict(os.environ if environ is None else environ)
    env_file = env.get("ENV_FILE", ".env")
    if env_file and os.path.isfile(env_file):
        file_values = {k: v for k, v in dotenv_values(env_file).items() if v is not None}
        env = {**file_values, **env}
    reader = _Reader(env)
    target_api_url = reader.text("TARGET_API_URL", DEFAULT_TARGET_API_URL).rstrip("/")
    workers = reader.integer("GUNICORN_WORKERS", reader.integer("WEB_CONCURRENCY", 1))
    file_settings = _file_settings(reader.text("GATEWAY_CONFIG", ""), env)
    return Settings(
        **file_settings,
        admin_api_key=reader.text("GATEWAY_ADMIN_KEY", ""),
        metrics_key=reader.text("METRICS_KEY", ""),
        target_api_key=reader.text("TARGET_API_KEY", ""),
        gateway_api_keys=reader.csv("GATEWAY_API_KEYS", ()),
        target_api_url=target_api_url,
        port=reader.integer("PORT", 8080),
        rate_limit_per_minute=reader.integer("RATE_LIMIT_REQUESTS_PER_MINUTE", 60),
        rate_limit_storage_uri=reader.text("RATE_LIMIT_STORAGE_URI", "memory://"),
        rate_limit_strategy=reader.text("RATE_LIMIT_STRATEGY", "moving-window").lower(),
        token_store_file=reader.text("TOKEN_STORE_FILE", DEFAULT_TOKEN_STORE_FILE),
        token_reservation_ttl=reader.number("TOKEN_RESERVATION_TTL", 900.0),
        log_level=reader.text("LOG_LEVEL", "INFO").upper(),
        log_format=reader.text("LOG_FORMAT", "json").lower(),
        health_check_enabled=reader.boolean("HEALTH_CHECK_ENABLED", True),
        cors_allowed_origins=reader.csv("CORS_ALLOWED_ORIGINS", ("*",)),
        upstream_connect_timeout=reader.number("UPSTREAM_CONNECT_TIMEOUT", 10.0),
        upstream_read_timeout=reader.number("UPSTREAM_READ_TIMEOUT", 600.0),
        upstream_total_timeout=reader.number("UPSTREAM_TOTAL_TIMEOUT", 900.0),
        max_request_body_bytes=reader.integer("MAX_REQUEST_BODY_BYTES", 10 * 1024 * 1024),
        max_response_body_bytes=reader.integer("MAX_RESPONSE_BODY_BYTES", 256 * 1024 * 1024),
        gunicorn_workers=workers,
        gunicorn_threads=reader.integer("GUNICORN_THREADS", 2048),
        gunicorn_pin_workers=reader.boolean("GUNICORN_PIN_WORKERS", False),
        upstream_proxies=MappingProxyType(_proxies_for(target_api_url, env)),
        upstream_ca_bundle=env.get("REQUESTS_CA_BUNDLE") or env.get("SSL_CERT_FILE") or None,
        prometheus_multiproc_dir=_multiproc_dir(env, environ),
        client_header_timeout=reader.number("CLIENT_HEADER_TIMEOUT", 10.0),
        client_write_timeout=reader.number("CLIENT_WRITE_TIMEOUT", 60.0),
        queue_timeout=reader.number("QUEUE_TIMEOUT", 5.0),
        gil_switch_interval=reader.number("GIL_SWITCH_INTERVAL", 0.05),
        responses_ttl=reader.number("RESPONSES_STORE_TTL", 86400.0),
        responses_memory_bytes=reader.integer("RESPONSES_STORE_MEMORY_BYTES", 64 * 1024 * 1024),
    )


def _file_settings(path: str, env: Mapping[str, str]) -> dict[str, Any]:
    """The Settings fields the GATEWAY_CONFIG file gives, if one is named."""
    if not path:
        return {}
    try:
        parsed, header_secrets = read_gateway_file(path, env)
    except FileError as exc:
        raise ConfigError(f"GATEWAY_CONFIG {path}: {exc}") from None
    providers = tuple(
        p.model_copy(update={"proxies": _proxies_for(p.base_url, env)})
        for p in parsed.providers.values()
    )
    key_secrets = tuple(env[k.key_env].strip() for k in parsed.keys if k.key_env)
    return {
        "gateway_config": path,
        "providers": providers,
        "routes": parsed.routes(),
        "routing": parsed.routing,
        "key_policies": parsed.keys,
        "key_defaults": parsed.defaults,
        "teams": parsed.teams,
        "pricing": parsed.prices,
        "key_secrets": key_secrets,
        "header_secrets": header_secrets,
    }


def _multiproc_dir(env: Mapping[str, str], environ: Mapping[str, str] | None) -> str | None:
    """prometheus-client reads PROMETHEUS_MULTIPROC_DIR from the real environment when it is
    imported, so a value given only in .env would be silently ignored: refuse it instead."""
    value = env.get("PROMETHEUS_MULTIPROC_DIR") or None
    process_env = os.environ if environ is None else environ
    if value and process_env.get("PROMETHEUS_MULTIPROC_DIR") != value:
        raise ConfigError(
            "PROMETHEUS_MULTIPROC_DIR must be set in the process environment, not in .env"
        )
    return value


def _proxies_for(url: str, env: Mapping[str, str]) -> dict[str, str]:
    """Resolve HTTP(S)_PROXY / NO_PROXY for the upstream once, so requests need not per call."""
    scheme = urlsplit(url).scheme
    proxy = env.get(f"{scheme}_proxy") or env.get(f"{scheme.upper()}_PROXY")
    proxy = proxy or env.get("all_proxy") or env.get("ALL_PROXY")
    no_proxy = env.get("no_proxy") or env.get("NO_PROXY")
    # no_proxy="" rather than None: requests would otherwise read os.environ itself.
    if not proxy or requests.utils.should_bypass_proxies(url, no_proxy=no_proxy or ""):
        return {}
    return {scheme: proxy}


class _Reader:
    """Typed access to environment values, failing with the variable's name."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env

    def text(self, name: str, default: str) -> str:
        value = self.env.get(name, "").strip()
        return value or default

    def csv(self, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = self.env.get(name, "").strip()
        if not value:
            return default
        return tuple(part.strip() for part in value.split(",") if part.strip())

    def integer(self, name: str, default: int) -> int:
        value = self.env.get(name, "").strip()
        if not value:
            return default
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{name} must be an integer, got {value!r}") from None

    def number(self, name: str, default: float) -> float:
        value = self.env.get(name, "").strip()
        if not value:
            return default
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{name} must be a number of seconds, got {value!r}") from None

    def boolean(self, name: str, default: bool) -> bool:
        value = self.env.get(name, "").strip().lower()
        if not value:
            return default
        if value in ("1", "true", "yes", "on"):
            return True
        if value in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name} must be true or false, got {value!r}")
