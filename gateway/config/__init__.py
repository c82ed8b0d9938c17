"""Configuration, read once at start-up (and on SIGHUP), then frozen.

- `settings.py`: `Settings` and `load_settings`, the only reader of the environment and
  `.env`;
- `schema.py`: the optional `GATEWAY_CONFIG` YAML file (providers, models, routing, keys,
  teams, prices), validated with pydantic; `file.py` reads it, interpolates `${VAR}` and turns a
  validation failure into one line naming the field.

Imports nothing else of the gateway: every other module may import it.
"""

from gateway.config.schema import (
    Deployment,
    KeyDefaults,
    KeyPolicy,
    ModelRoute,
    Price,
    Pricing,
    Provider,
    RoutingPolicy,
    Team,
)
from gateway.config.settings import (
    DEFAULT_PROVIDER,
    DEFAULT_TARGET_API_URL,
    ENVIRONMENT_VARIABLES,
    SERVICE_NAME,
    VERSION,
    ConfigError,
    Settings,
    load_settings,
)

__all__ = [
    "DEFAULT_PROVIDER",
    "DEFAULT_TARGET_API_URL",
    "ENVIRONMENT_VARIABLES",
    "SERVICE_NAME",
    "VERSION",
    "ConfigError",
    "Deployment",
    "KeyDefaults",
    "KeyPolicy",
    "ModelRoute",
    "Price",
    "Pricing",
    "Provider",
    "RoutingPolicy",
    "Settings",
    "Team",
    "load_settings",
]
