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
# The most values (scalars, lists, mappings) the document may hold once its aliases are
# expanded. Aliases share one node per anchor, but interpolation and validation walk each
# use: 468 bytes of nested aliases once cost 7.4 s and 289 MB, ten times more per level.
# 2,000 keys of a few fields each are some 20,000 values.
MAX_VALUES = 100_000
# Interpolated values this short (a number, a flag) are hidden in errors only as whole words.
_SHORT_VALUE = 6


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
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise FileError("not UTF-8 text") from None
    document = _parsed_yaml(text)
    if not isinstance(document, dict):
        raise FileError("the top level must be a mapping (providers:, models:, keys: ...)")
    _refuse_written_secrets(document)
    raw_providers = document.get("providers")
    substituted: dict[str, str] = {}
    document = _interpolate(document, env, (), substituted)
    try:
        parsed = GatewayFile.model_validate(document, context={"env": env})
    except ValidationError as exc:
        raise FileError(_without_values(_first_problem(exc), substituted)) from None
    return parsed, _header_secrets(raw_providers, env)


def _parsed_yaml(text: str) -> Any:
    """The document, built only once its size with aliases expanded is known to be sane."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return {}
        _count_values(node)
        return loader.construct_document(node) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise FileError(f"{where}{problem}") from None
    except RecursionError:
        raise FileError("nested too deeply") from None
    finally:
        loader.dispose()


def _count_values(root: yaml.Node) -> int:
    """How many values `root` holds with every alias expanded, counted on the composed
    nodes (an alias is the anchored node itself, shared), each node once: linear in the
    file's size, whatever the aliases multiply to."""
    sizes: dict[int, int] = {}  # -1: counting its children (met again below: a cycle)
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, counted = stack.pop()
        if not counted:
            if id(node) in sizes:
                if sizes[id(node)] < 0:
                    raise FileError("an alias (*name) refers to a value that contains it")
                continue
            sizes[id(node)] = -1
            stack.append((node, True))
            stack.extend((child, False) for child in _children(node))
            continue
        total = 1 + sum(sizes[id(child)] for child in _children(node))
        if total > MAX_VALUES:
            raise FileError(f"more than {MAX_VALUES:,} values once its aliases are expanded")
        sizes[id(node)] = total
    return sizes[id(root)]


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return list(node.value) if isinstance(node, yaml.SequenceNode) else []


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


def _interpolate(
    value: Any, env: Mapping[str, str], where: tuple[str, ...], substituted: dict[str, str]
) -> Any:
    """`${VAR}` in any string value becomes the variable's value. An unset or empty one is
    an error: an empty Secret entry would otherwise start a provider with no key at all.
    `substituted` collects each value put in, and the variable it came from."""
    if isinstance(value, dict):
        return {k: _interpolate(v, env, (*where, str(k)), substituted) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env, (*where, str(i)), substituted) for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value

    def substitute(found: re.Match[str]) -> str:
        name = found.group(1)
        if not env.get(name, "").strip():
            raise FileError(f"{'.'.join(where)}: ${{{name}}} is not set in the environment")
        substituted[env[name].strip()] = name
        return env[name].strip()

    return _VARIABLE.sub(substitute, value)


def _without_values(message: str, substituted: Mapping[str, str]) -> str:
    """`message` with every interpolated value written back as its `${VAR}`: any of them may
    be a secret (`provider: "${PROV_KEY}"` by mistake), and an error line ends up in logs
    whose redactor does not know it for one. Longest first, so no part of a value is left;
    a short value (a number) only as a whole word, so that `keys.0.rpm` stays readable."""
    for value in sorted(substituted, key=len, reverse=True):
        name = "${" + substituted[value] + "}"
        for form in dict.fromkeys((value, repr(value)[1:-1])):
            if len(form) >= _SHORT_VALUE:
                message = message.replace(form, name)
            else:
                whole = rf"(?<![\w.]){re.escape(form)}(?![\w.])"
                message = re.sub(whole, name, message)  # a name has no backslash
    return message


def _first_problem(exc: ValidationError) -> str:
    error = exc.errors(include_url=False, include_input=False)[0]
    location = ".".join(str(part) for part in error["loc"])
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "not a known field"
    elif error["type"] == "missing":
        message = "required"
    return f"{location}: {message}" if location else message
