"""The `GATEWAY_CONFIG` file's schema: providers, models, routing and keys.

The models are both the validator and the runtime objects: once validated (with the
environment as context, to resolve key references) they are frozen and shared by every
request. Secrets are never written in the file: a provider key is named by its environment
variable (`api_key_env: DASHSCOPE_API_KEY` or `api_key: ${DASHSCOPE_API_KEY}`), a gateway
key by its variable or its SHA-256 (`sha256:<hex>`), so the file can sit in git and in a
ConfigMap.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

MIN_KEY_LENGTH = 8
# Ready-made base URLs. A DashScope key works only in its own region.
PRESETS: Mapping[str, str] = {
    "dashscope": "https://dashscope.aliyuncs.com/compatible-mode/v1",  # Beijing
    "dashscope-beijing": "https://dashscope.aliyuncs.com/compatible-mode/v1",
    "dashscope-singapore": "https://dashscope-intl.aliyuncs.com/compatible-mode/v1",
    "dashscope-intl": "https://dashscope-intl.aliyuncs.com/compatible-mode/v1",
    "dashscope-us": "https://dashscope-us.aliyuncs.com/compatible-mode/v1",  # Virginia
    "dashscope-hongkong": "https://cn-hongkong.dashscope.aliyuncs.com/compatible-mode/v1",
    "openai": "https://api.openai.com/v1",
    "deepseek": "https://api.deepseek.com/v1",
    "vllm": "http://127.0.0.1:8000/v1",
    "ollama": "http://127.0.0.1:11434/v1",
    "anthropic": "https://api.anthropic.com/v1",
}
Kind = Literal[
    "dashscope", "openai", "deepseek", "vllm", "ollama", "anthropic", "openai-compatible"
]
# The dialects besides Chat Completions a provider may serve itself: a request in one of
# them is relayed to it as sent; to any other provider it is translated to Chat Completions.
Dialect = Literal["messages", "responses"]
# What each kind serves natively unless `native:` says otherwise. DashScope serves both
# (Messages under /apps/anthropic; Responses for qwen3-max, qwen3.5-plus and newer: a route
# to an older Qwen model sets `native: []` on its provider); vLLM, llama.cpp and Ollama only
# when configured, since it depends on their version.
NATIVE_BY_KIND: Mapping[str, tuple[Dialect, ...]] = {
    "dashscope": ("messages", "responses"),
    "openai": ("responses",),
    "anthropic": ("messages",),
}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SHA256 = re.compile(r"sha256:([0-9a-f]{64})")
# Only what a client could not have asked for itself; Authorization is the provider key's.
_FORBIDDEN_PROVIDER_HEADERS = frozenset({"authorization", "host", "content-length"})

Seconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]
Count = Annotated[int, Field(ge=0)]
# Amounts of money in the file's currency: exact decimals (YAML's 0.1 is read as written).
# Counted in nano-units that Redis's Lua must hold exactly (below 2**53, about 9e15): a
# budget of at most 9 million, a price of at most 10,000 per million tokens (10**8 tokens,
# the most an answer is believed to use, then cost at most 10**15 nano-units).
Money = Annotated[Decimal, Field(ge=0, le=9_000_000, allow_inf_nan=False)]
Rate = Annotated[Decimal, Field(ge=0, le=10_000, allow_inf_nan=False)]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _env(info: ValidationInfo) -> Mapping[str, str]:
    return (info.context or {}).get("env", {})


def _header_safe(value: str, what: str) -> str:
    """A key travels in an `Authorization` header: printable ASCII, no spaces."""
    for position, char in enumerate(value, 1):
        if not "!" <= char <= "~":
            raise ValueError(
                f"{what} contains a character that cannot be sent in an HTTP header "
                f"(U+{ord(char):04X} at position {position})"
            )
    return value


class Provider(_Frozen):
    """An OpenAI-compatible service: where to send, with which key."""

    name: str = ""  # filled from the mapping key
    preset: str | None = None
    base_url: str = ""
    # Resolved from api_key_env (or `${VAR}`) at load; never written in the file.
    api_key: str = Field(default="", repr=False)
    api_key_env: str | None = None
    kind: Kind = "openai-compatible"
    headers: Mapping[str, str] = Field(default_factory=dict)
    connect_timeout: Seconds | None = None
    read_timeout: Seconds | None = None
    max_concurrent: Annotated[int, Field(ge=1)] | None = None
    # Whether a stream may be sent `stream_options.include_usage` the client did not ask
    # for: some OpenAI-compatible servers refuse the field. Off, its usage is estimated.
    stream_usage: bool = True
    # HTTP(S) proxy for this provider, resolved from HTTPS_PROXY/NO_PROXY at load.
    proxies: Mapping[str, str] = Field(default_factory=dict, repr=False)
    # The dialects it serves itself (None: its kind's, NATIVE_BY_KIND).
    native: tuple[Dialect, ...] | None = None
    # Where its Messages API lives, as ANTHROPIC_BASE_URL would be set (without /v1):
    # DashScope's is /apps/anthropic on the same host; by default base_url without /v1.
    anthropic_base_url: str = ""

    def serves(self, dialect: Dialect) -> bool:
        native = NATIVE_BY_KIND.get(self.kind, ()) if self.native is None else self.native
        return dialect in native

    @model_validator(mode="before")
    @classmethod
    def _resolve(cls, data: Any, info: ValidationInfo) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        preset = data.get("preset")
        # An unknown one is refused by _preset, where the error names providers.x.preset.
        if isinstance(preset, str) and preset in PRESETS:
            data.setdefault("base_url", PRESETS[preset])
            data.setdefault("kind", preset.split("-")[0])
        if "api_key" in data and "api_key_env" in data:
            raise ValueError("give api_key_env or api_key: ${VAR}, not both")
        env_name = data.get("api_key_env")
        if env_name is not None:
            if not isinstance(env_name, str) or not _ENV_NAME.fullmatch(env_name):
                raise ValueError("api_key_env must be the name of an environment variable")
            value = _env(info).get(env_name, "").strip()
            if not value:
                raise ValueError(f"api_key_env: {env_name} is not set in the environment")
            data["api_key"] = value
        return data

    @field_validator("preset")
    @classmethod
    def _preset(cls, value: str | None) -> str | None:
        if value is not None and value not in PRESETS:
            raise ValueError(f"unknown preset {value!r}; one of {', '.join(PRESETS)}")
        return value

    @field_validator("base_url", "anthropic_base_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value:  # anthropic_base_url is derived when absent (see _kind)
            return value
        url = urlsplit(value)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError("not a URL (http:// or https:// with a host)")
        # Paths such as /chat/completions are appended to it: a query would end up between.
        if url.query or url.fragment:
            raise ValueError("must not have a ?query or #fragment")
        return value.rstrip("/")

    @field_validator("api_key")
    @classmethod
    def _key(cls, value: str) -> str:
        return _header_safe(value, "the key")

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: Mapping[str, str]) -> Mapping[str, str]:
        for name, header in value.items():
            if name.lower() in _FORBIDDEN_PROVIDER_HEADERS:
                raise ValueError(f"{name} is set by the gateway")
            if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", name):
                raise ValueError(f"{name!r} is not a header name")
            if any(c in header for c in "\r\n\0"):
                raise ValueError(f"the value of {name} has a line break")
        return dict(value)

    @model_validator(mode="after")
    def _kind(self) -> Provider:
        if not self.base_url:
            raise ValueError("base_url (or a preset) is required")
        host = urlsplit(self.base_url).hostname or ""
        if self.kind == "openai-compatible" and host.endswith("dashscope.aliyuncs.com"):
            object.__setattr__(self, "kind", "dashscope")
        if not self.anthropic_base_url:
            object.__setattr__(self, "anthropic_base_url", _anthropic_base(self))
        return self


def _anthropic_base(provider: Provider) -> str:
    """The Messages API's base URL where the provider's config does not give it."""
    url = provider.base_url
    if provider.kind == "dashscope" and url.endswith("/compatible-mode/v1"):
        return url.removesuffix("/compatible-mode/v1") + "/apps/anthropic"
    return url.removesuffix("/v1")


class Deployment(_Frozen):
    """One way to serve a public model: a provider and the provider's own model name."""

    provider: str
    # The provider's model name; None sends the client's own (wildcard routes).
    model: str | None = None
    weight: Annotated[float, Field(gt=0, allow_inf_nan=False)] = 1.0
    # The most output tokens this model gives: a translated Messages request's max_tokens
    # (Claude Code asks 32,000-64,000) is lowered to it rather than refused by the provider.
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return {"provider": data} if isinstance(data, str) else data


class ModelRoute(_Frozen):
    """A public model name (or a `*` pattern) and the deployments that serve it."""

    name: str
    deployments: tuple[Deployment, ...] = Field(min_length=1)

    @property
    def is_pattern(self) -> bool:
        return "*" in self.name


class RoutingPolicy(_Frozen):
    """How deployments of one model share load and fall back before the first byte."""

    strategy: Literal["weighted", "least-in-flight"] = "weighted"
    # Deployments tried for one request, the first included.
    max_attempts: Annotated[int, Field(ge=1, le=10)] = 3
    # No new attempt starts this long after the request arrived.
    deadline: Seconds = 30.0
    # Which failures before the first byte try the next deployment. `timeout`: a connect
    # timeout, or a stream's before its first chunk. `read_timeout` (not by default): a
    # non-streamed request's after it was sent, which the provider may still be generating:
    # sent elsewhere it may be generated, and billed, twice.
    fallback_on: tuple[Literal["connect", "timeout", "read_timeout", "429", "5xx"], ...] = (
        "connect",
        "timeout",
        "429",
        "5xx",
    )
    # A deployment failing this many times in a row is skipped for `cooldown`.
    failures_before_cooldown: Annotated[int, Field(ge=1)] = 3
    cooldown: Seconds = 30.0
    # A 429 without Retry-After (DashScope sends none) cools the deployment down this long.
    rate_limited_cooldown: Seconds = 10.0
    # A provider's Retry-After is believed up to this long.
    max_cooldown: Seconds = 300.0


class PriceTier(_Frozen):
    """The price of prompts longer than `above` tokens (DashScope prices by prompt size)."""

    above: Annotated[int, Field(ge=1)]
    input: Rate
    cached_input: Rate | None = None  # None: the tier's input price
    output: Rate


class Price(_Frozen):
    """What a model costs, per million tokens, in the file's currency."""

    input: Rate
    # Prompt tokens the provider read from its context cache (DashScope reports them in
    # prompt_tokens_details.cached_tokens); None: the input price.
    cached_input: Rate | None = None
    output: Rate
    tiers: tuple[PriceTier, ...] = ()

    @field_validator("tiers")
    @classmethod
    def _ascending(cls, value: tuple[PriceTier, ...]) -> tuple[PriceTier, ...]:
        bounds = [tier.above for tier in value]
        if bounds != sorted(set(bounds)):
            raise ValueError("tiers must be in ascending order of `above`, each once")
        return value


class DeploymentPrice(Price):
    """The price of one deployment (a provider and its own model name): wins over the
    public model's."""

    provider: str
    model: str


class Pricing(_Frozen):
    """`prices:` — one currency for the whole file."""

    currency: str = Field(default="USD", pattern=r"^[A-Z]{3}$")
    # The output a request that sends no max_tokens reserves against a budget.
    default_max_tokens: Annotated[int, Field(ge=1, le=10_000_000)] = 4096
    models: Mapping[str, Price] = Field(default_factory=dict)
    deployments: tuple[DeploymentPrice, ...] = ()


class Budgets(_Frozen):
    """Money a key or team may spend per UTC day, per UTC month, and in all (no reset)."""

    budget_per_day: Money | None = None
    budget_per_month: Money | None = None
    budget_total: Money | None = None


class Team(Budgets):
    """Keys that share windows: each request must fit its key's and its team's."""

    name: str
    tpm: Count | None = None
    tokens_per_day: Count | None = None
    tokens_per_month: Count | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.fullmatch(value):
            raise ValueError("letters, digits, '.', '_' and '-', at most 64")
        return value


class KeyDefaults(_Frozen):
    """Rules for keys without their own: every GATEWAY_API_KEYS key, and unset fields."""

    models: tuple[str, ...] = ("*",)
    rpm: Count | None = None  # None: RATE_LIMIT_REQUESTS_PER_MINUTE
    tpm: Count | None = None  # None: no token limit
    tokens_per_day: Count | None = None
    tokens_per_month: Count | None = None


class KeyPolicy(Budgets):
    """One gateway key and its rules. `digest` is the SHA-256 of the key."""

    name: str
    key_env: str | None = None
    key: str | None = Field(default=None, repr=False)  # "sha256:<hex>" only
    digest: bytes = Field(default=b"", repr=False)
    models: tuple[str, ...] | None = None
    rpm: Count | None = None
    tpm: Count | None = None
    tokens_per_day: Count | None = None
    tokens_per_month: Count | None = None
    expires_at: datetime | None = None
    enabled: bool = True
    team: str | None = None  # a name under `teams:`

    @model_validator(mode="before")
    @classmethod
    def _digest(cls, data: Any, info: ValidationInfo) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        if ("key" in data) == ("key_env" in data):
            raise ValueError("give exactly one of key_env (a variable name) or key: sha256:<hex>")
        if "key" in data:
            found = _SHA256.fullmatch(str(data["key"]).strip().lower())
            if found is None:
                raise ValueError(
                    "key must be sha256:<64 hex digits> (write the key itself in an "
                    "environment variable and name it with key_env)"
                )
            data["digest"] = bytes.fromhex(found.group(1))
        else:
            env_name = data["key_env"]
            if not isinstance(env_name, str) or not _ENV_NAME.fullmatch(env_name):
                raise ValueError("key_env must be the name of an environment variable")
            value = _env(info).get(env_name, "").strip()
            if not value:
                raise ValueError(f"key_env: {env_name} is not set in the environment")
            if len(value) < MIN_KEY_LENGTH:
                raise ValueError(f"key_env: {env_name} must be at least {MIN_KEY_LENGTH} chars")
            _header_safe(value, f"key_env: {env_name}")
            data["digest"] = hashlib.sha256(value.encode()).digest()
        return data

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not _NAME.fullmatch(value):
            raise ValueError("letters, digits, '.', '_' and '-', at most 64")
        return value

    @field_validator("expires_at")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        # A date without a zone is UTC, as everywhere else in the gateway.
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class GatewayFile(_Frozen):
    """The whole file. Every section is optional."""

    providers: Mapping[str, Provider] = Field(default_factory=dict)
    models: Mapping[str, tuple[Deployment, ...]] = Field(default_factory=dict)
    routing: RoutingPolicy = Field(default_factory=RoutingPolicy)
    defaults: KeyDefaults = Field(default_factory=KeyDefaults)
    keys: tuple[KeyPolicy, ...] = ()
    teams: tuple[Team, ...] = ()
    prices: Pricing = Field(default_factory=Pricing)

    @field_validator("providers", mode="before")
    @classmethod
    def _named(cls, value: Any) -> Any:
        if isinstance(value, dict):
            for name, provider in value.items():
                if not isinstance(name, str) or not _NAME.fullmatch(name):
                    raise ValueError(f"{name!r}: letters, digits, '.', '_' and '-', at most 64")
                if isinstance(provider, dict):
                    provider.setdefault("name", name)
        return value

    @field_validator("models", mode="before")
    @classmethod
    def _lists(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return {
                name: deployments if isinstance(deployments, list) else [deployments]
                for name, deployments in value.items()
            }
        return value

    @model_validator(mode="after")
    def _references(self) -> GatewayFile:
        for public, deployments in self.models.items():
            if not deployments:
                raise ValueError(f"models.{public}: needs at least one deployment")
            for deployment in deployments:
                if deployment.provider not in self.providers:
                    raise ValueError(
                        f"models.{public}: provider {deployment.provider!r} is not defined "
                        "under providers"
                    )
        names = [key.name for key in self.keys]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"keys: name {duplicates[0]!r} is used twice")
        digests = [key.digest for key in self.keys]
        if len(set(digests)) != len(digests):
            raise ValueError("keys: the same key is configured twice")
        teams = [team.name for team in self.teams]
        if len(set(teams)) != len(teams):
            raise ValueError("teams: a name is used twice")
        for key in self.keys:
            if key.team is not None and key.team not in teams:
                raise ValueError(f"keys.{key.name}: team {key.team!r} is not under teams")
        # Without providers the one provider is built from TARGET_API_URL, as "default".
        known = set(self.providers) or {"default"}
        for price in self.prices.deployments:
            if price.provider not in known:
                raise ValueError(f"prices.deployments: provider {price.provider!r} is not defined")
        return self

    def routes(self) -> tuple[ModelRoute, ...]:
        return tuple(ModelRoute(name=n, deployments=d) for n, d in self.models.items())
