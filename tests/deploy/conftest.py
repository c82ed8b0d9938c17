"""Fixtures for the deployment checks: the files parsed once, gunicorn's settings as it
reads them, and apps built from the settings a manifest would give the container."""

from __future__ import annotations

import dataclasses
import re
import runpy
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml
from flask import Flask

from gateway import create_app
from gateway.config import ENVIRONMENT_VARIABLES, Settings
from tests.constants import GATEWAY_KEY, UPSTREAM_KEY
from tests.deploy.parsers import Instruction, dockerfile_instructions

REPO = Path(__file__).resolve().parents[2]
# Stand-ins for the two secrets when a test loads settings from a deployment file.
SECRETS = {"TARGET_API_KEY": UPSTREAM_KEY, "GATEWAY_API_KEYS": GATEWAY_KEY}
# Variables load_settings also honours in lower case (requests' proxy convention).
_LOWER_CASE_PROXIES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


def variables_named_by(gateway_config: str) -> set[str]:
    """The environment variables a GATEWAY_CONFIG file names: providers' `api_key_env`,
    keys' `key_env`, and every `${VAR}` in a value (comments are not the file)."""

    def walk(value: Any) -> Iterator[str]:
        if isinstance(value, dict):
            for field, item in value.items():
                if field in ("api_key_env", "key_env") and isinstance(item, str):
                    yield item
                else:
                    yield from walk(item)
        elif isinstance(value, list):
            for item in value:
                yield from walk(item)
        elif isinstance(value, str):
            yield from re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", value)

    return set(walk(yaml.safe_load(gateway_config)))


def run_gunicorn_config(env: Mapping[str, str]) -> dict[str, Any]:
    """gunicorn.conf.py executed the way gunicorn loads it, with only `env` set."""
    with pytest.MonkeyPatch.context() as patch:
        for name in (*ENVIRONMENT_VARIABLES, *_LOWER_CASE_PROXIES):
            patch.delenv(name, raising=False)
        patch.setenv("ENV_FILE", "")
        for name, value in env.items():
            patch.setenv(name, value)
        patch.chdir(REPO)
        return runpy.run_path(str(REPO / "gunicorn.conf.py"))


def bind_port(gunicorn_config: Mapping[str, Any]) -> int:
    return int(str(gunicorn_config["bind"]).rsplit(":", 1)[1])


@contextmanager
def app_for(settings: Settings) -> Iterator[Flask]:
    """The app a container with `settings` would serve; counters in memory, so no Redis."""
    app = create_app(dataclasses.replace(settings, rate_limit_storage_uri="memory://"))
    try:
        yield app
    finally:
        app.extensions["gateway.upstream"].close()


@pytest.fixture(scope="session")
def dockerfile() -> list[Instruction]:
    return dockerfile_instructions((REPO / "Dockerfile").read_text())


@pytest.fixture(scope="session")
def compose() -> dict[str, Any]:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


@pytest.fixture(scope="session")
def k8s_documents() -> list[dict[str, Any]]:
    with (REPO / "k8s-deployment.yaml").open() as manifest:
        return [document for document in yaml.safe_load_all(manifest) if document]


@pytest.fixture(scope="session")
def gunicorn_defaults() -> dict[str, Any]:
    """gunicorn's settings when nothing but the two required secrets is set."""
    return run_gunicorn_config(SECRETS)
