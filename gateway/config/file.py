"""Reading the `GATEWAY_CONFIG` YAML file: `${VAR}` interpolation, validation, one-line errors."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import yaml
from pydantic import ValidationError

from gateway.config.schema import GatewayFile

_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_ONLY_A_VARIABLE = re.compile(r"\s*\$\{[A-Za-z_][A-Za-z0-9_]*\}\s*")
# The longest file accepted: a config, not a data set.
_MAX_BYTES = 1024 * 1024


class FileError(ValueError):
    """What is wrong with the file, as one line: `providers.x.base_url: not a URL`."""


def read_gateway_file(path: str, env: Mapping[str, str]) -> tuple[GatewayFile, tuple[str, ...]]:
    """The validated file, and the values `${VAR}` put into provider headers: an
    `api-key: ${AZURE_KEY}` header is a secret to redact and mask like a provider key."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read(_MAX_BYTES + 1)
    except OSError as exc:
        raise FileError(f"cannot read it: {exc.strerror or exc}") from None
    if len(raw) > _MAX_BYTES:
        raise FileError("larger than 1 MiB")
    try:
        document = yaml.safe_load(raw.decode("utf-8")) or {}
    except UnicodeDecodeError:
        raise FileError("not UTF-8 text") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise FileError(f"{where}{problem}") from None
    if not isinstance(document, dict):
        raise FileError("the top level must be a mapping (providers:, models:, keys: ...)")
    _refuse_written_secrets(document)
    raw_providers = document.get("providers")
    document = _interpolate(document, env, ())
    try:
        parsed = GatewayFile.model_validate(document, context={"env": env})
    except ValidationError as exc:
        raise FileError(_first_problem(exc)) from None
    return parsed, _header_secrets(raw_providers, env)


def _refuse_written_secrets(document: dict[str, Any]) -> None:
    providers = document.get("providers")
    if not isinstance(providers, dict):
        return
    for name, provider in providers.items():
        if isinstance(provider, dict) and "api_key" in provider:
            value = provider["api_key"]
            if not isinstance(value, str) or not _ONLY_A_VARIABLE.fullmatch(value):
                raise FileError(
                    f"providers.{name}.api_key: write ${{VARIABLE}} or use api_key_env; "
                    "a key written in the file would end up in git and in ConfigMaps"
                )


def _header_secrets(providers: Any, env: Mapping[str, str]) -> tuple[str, ...]:
    found: list[str] = []
    for provider in (providers or {}).values() if isinstance(providers, dict) else ():
        headers = provider.get("headers") if isinstance(provider, dict) else None
        for value in (headers or {}).values() if isinstance(headers, dict) else ():
            if isinstance(value, str):
                found.extend(env[name] for name in _VARIABLE.findall(value) if env.get(name))
    return tuple(found)


def _interpolate(value: Any, env: Mapping[str, str], where: tuple[str, ...]) -> Any:
    """`${VAR}` in any string value becomes the variable's value. An unset or empty one is
    an error: an empty Secret entry would otherwise start a provider with no key at all."""
    if isinstance(value, dict):
        return {k: _interpolate(v, env, (*where, str(k))) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env, (*where, str(i))) for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value

    def substitute(found: re.Match[str]) -> str:
        name = found.group(1)
        if not env.get(name, "").strip():
            raise FileError(f"{'.'.join(where)}: ${{{name}}} is not set in the environment")
        return env[name].strip()

    return _VARIABLE.sub(substitute, value)


def _first_problem(exc: ValidationError) -> str:
    error = exc.errors(include_url=False, include_input=False)[0]
    location = ".".join(str(part) for part in error["loc"])
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "not a known field"
    elif error["type"] == "missing":
        message = "required"
    return f"{location}: {message}" if location else message
