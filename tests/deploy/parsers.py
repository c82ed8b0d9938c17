"""Small readers for the deployment files: Dockerfile, .dockerignore, compose, Makefile.

Just enough of each format for the drift tests; the real linters and schemas run too.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

# --- Dockerfile ---------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str


def dockerfile_instructions(text: str) -> list[Instruction]:
    """Instructions in order, continuation lines joined and comments dropped."""
    instructions: list[Instruction] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, arguments = (pending + line).partition(" ")
        instructions.append(Instruction(keyword.upper(), " ".join(arguments.split())))
        pending = ""
    return instructions


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    """The instructions from the last FROM on: what the image is made of."""
    starts = [i for i, instruction in enumerate(instructions) if instruction.keyword == "FROM"]
    return instructions[starts[-1] :]


def exec_form(arguments: str) -> list[str]:
    """A JSON-array argument (CMD ["a", "b"]); raises ValueError for the shell form."""
    parsed = json.loads(arguments)
    if not isinstance(parsed, list) or not all(isinstance(part, str) for part in parsed):
        raise ValueError(f"not an exec-form array: {arguments}")
    return parsed


def env_assignments(arguments: str) -> dict[str, str]:
    """ENV A=1 B=2 (or the legacy ENV A 1)."""
    words = shlex.split(arguments)
    if "=" not in words[0]:
        return {words[0]: " ".join(words[1:])}
    return dict(word.split("=", 1) for word in words)


def copy_sources(arguments: str) -> tuple[list[str], str]:
    """COPY [--flags] src... dest -> (sources, dest)."""
    words = [word for word in shlex.split(arguments) if not word.startswith("--")]
    return words[:-1], words[-1]


def healthcheck_command(arguments: str) -> list[str]:
    """The exec-form command of HEALTHCHECK [options] CMD [...]."""
    _, separator, command = arguments.partition("CMD ")
    if not separator:
        raise ValueError(f"HEALTHCHECK without CMD: {arguments}")
    return exec_form(command)


# --- .dockerignore --------------------------------------------------------------------


@dataclass(frozen=True)
class IgnoreRule:
    pattern: str
    regex: re.Pattern[str]
    keep: bool


def dockerignore_rules(text: str) -> list[IgnoreRule]:
    rules = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        keep = line.startswith("!")
        pattern = os.path.normpath(line.removeprefix("!").strip().strip("/"))
        rules.append(IgnoreRule(pattern, _pattern_regex(pattern), keep))
    return rules


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    """Go's filepath.Match syntax plus `**` (any number of folders), as Docker reads it."""
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out.append(pattern[i : end + 1])  # Go and re share [abc] and [^abc]
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def is_ignored(path: str, rules: list[IgnoreRule]) -> bool:
    """Docker's rule: the last pattern matching the path, or one of its folders, decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for rule in rules:
        if any(rule.regex.match(candidate) for candidate in candidates):
            ignored = not rule.keep
    return ignored


def build_context(root: Path, rules: list[IgnoreRule]) -> Iterator[str]:
    """Every file `docker build` would send, as a path relative to `root`."""
    for folder, subfolders, files in os.walk(root):
        relative = Path(folder).relative_to(root).as_posix()
        prefix = "" if relative == "." else relative + "/"
        # Skip a folder no rule can bring back (.git, .venv): walking them costs seconds.
        subfolders[:] = [
            name
            for name in subfolders
            if not is_ignored(prefix + name, rules)
            or any(rule.keep and rule.pattern.startswith(prefix + name + "/") for rule in rules)
        ]
        for name in files:
            if not is_ignored(prefix + name, rules):
                yield prefix + name


# --- docker-compose.yml ---------------------------------------------------------------


class MissingVariableError(Exception):
    """A ${NAME:?message} (or ${NAME?message}) whose variable is unset."""


_VARIABLE = re.compile(
    r"\$\$|\$\{(?P<name>[A-Za-z_]\w*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|\$(?P<bare>[A-Za-z_]\w*)"
)


def interpolate(value: str, env: Mapping[str, str]) -> str:
    """Compose's variable substitution: $NAME, ${NAME}, ${NAME:-default}, ${NAME:?error}."""

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group("name") or match.group("bare")
        op, arg = match.group("op"), match.group("arg") or ""
        current = env.get(name)
        missing = current is None or (op is not None and op.startswith(":") and not current)
        if op in (":?", "?") and missing:
            raise MissingVariableError(f"{name}: {arg}")
        if op in (":-", "-") and missing:
            return arg
        return current or ""

    return _VARIABLE.sub(substitute, value)


def compose_environment(service: Mapping[str, object]) -> dict[str, str]:
    """A service's `environment`, as a mapping whether it was written as a list or a map."""
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in raw)
    assert isinstance(raw, dict)
    return {str(name): "" if value is None else str(value) for name, value in raw.items()}


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(h|ms|us|m|s)")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 0.000001}


def duration_seconds(text: str) -> float:
    """A compose duration ("130s", "2m10s", "1h") in seconds."""
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        raise ValueError(f"not a compose duration: {text!r}")
    return sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts)


# --- Makefile -----------------------------------------------------------------------


def make_recipe(text: str, target: str) -> list[str]:
    """The command lines of `target`'s recipe, with make's @/- prefixes removed."""
    lines = text.splitlines()
    header = re.compile(rf"^{re.escape(target)}\s*:(?!=)")
    for index, line in enumerate(lines):
        if header.match(line):
            recipe = []
            for body in lines[index + 1 :]:
                if not body.startswith("\t"):
                    break
                recipe.append(body.strip().lstrip("@-"))
            return recipe
    raise LookupError(f"no {target!r} target")
