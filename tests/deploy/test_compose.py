"""docker-compose.yml: valid against the Compose Specification, and in step with the code."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest

from gateway.config import ENVIRONMENT_VARIABLES, load_settings
from tests.deploy.conftest import REPO, app_for, bind_port, run_gunicorn_config
from tests.deploy.parsers import (
    Instruction,
    MissingVariableError,
    compose_environment,
    duration_seconds,
    final_stage,
    healthcheck_command,
    interpolate,
)
from tests.e2e.conftest import START_COMMAND

SCHEMA = json.loads((REPO / "tests/deploy/schemas/compose-spec.json").read_text())
# What `docker compose up` would find in the shell or .env for the required variables.
SHELL = {"DASHSCOPE_API_KEY": "sk-compose-test-1f2e3d", "GATEWAY_API_KEYS": "gw-compose-test-4c5b"}


def validate(document: dict[str, Any]) -> None:
    # The schema names draft 2019-09 by a URL jsonschema does not know (http, trailing #).
    jsonschema.Draft201909Validator(SCHEMA).validate(document)


def gateway_env(compose: dict[str, Any], shell: dict[str, str]) -> dict[str, str]:
    raw = compose_environment(compose["services"]["gateway"])
    return {name: interpolate(value, shell) for name, value in raw.items()}


def test_matches_the_compose_specification(compose: dict[str, Any]) -> None:
    jsonschema.Draft201909Validator.check_schema(SCHEMA)
    validate(compose)


def test_schema_rejects_a_misspelt_key(compose: dict[str, Any]) -> None:
    # Guards the check above against a schema that accepts anything.
    broken = json.loads(json.dumps(compose))
    broken["services"]["gateway"]["stop_grace_periods"] = "130s"
    with pytest.raises(jsonschema.ValidationError):
        validate(broken)


def test_gateway_and_redis_services(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"gateway", "redis"}
    gateway = compose["services"]["gateway"]
    # Built from this repository's Dockerfile, so its USER (non-root) applies.
    assert gateway["build"] in (".", {"context": "."})
    assert str(gateway.get("user", "10001")).partition(":")[0] not in ("0", "root")


def test_command_is_the_readme_start_command(compose: dict[str, Any]) -> None:
    gateway = compose["services"]["gateway"]
    assert "entrypoint" not in gateway
    # No command means the image's CMD, which test_dockerfile holds to the same list.
    assert gateway.get("command", START_COMMAND) == START_COMMAND


def test_sets_only_variables_the_gateway_reads(compose: dict[str, Any]) -> None:
    names = set(compose_environment(compose["services"]["gateway"]))
    assert names, "the gateway needs at least its keys"
    assert names <= set(ENVIRONMENT_VARIABLES)


@pytest.mark.parametrize("secret", ["TARGET_API_KEY", "GATEWAY_API_KEYS"])
def test_secrets_come_from_the_environment(compose: dict[str, Any], secret: str) -> None:
    value = compose_environment(compose["services"]["gateway"])[secret]
    # ${NAME:?...}: compose refuses to start without it, and the file holds no key.
    with pytest.raises(MissingVariableError):
        interpolate(value, {})
    assert interpolate(value, SHELL) in SHELL.values()


def test_provider_key_is_read_from_dashscope_api_key(compose: dict[str, Any]) -> None:
    value = compose_environment(compose["services"]["gateway"])["TARGET_API_KEY"]
    assert value.startswith("${DASHSCOPE_API_KEY:?")


def test_settings_load_and_probe_routes_answer(compose: dict[str, Any]) -> None:
    settings = load_settings({**gateway_env(compose, SHELL), "ENV_FILE": ""})
    assert settings.target_api_key == SHELL["DASHSCOPE_API_KEY"]
    with app_for(settings) as app:
        assert app.test_client().get("/health").status_code == 200


def test_rate_limits_are_shared_through_the_redis_service(compose: dict[str, Any]) -> None:
    uri = urlsplit(gateway_env(compose, SHELL)["RATE_LIMIT_STORAGE_URI"])
    assert uri.scheme == "redis"
    assert uri.hostname == "redis" and uri.port == 6379
    assert "--port" not in compose["services"]["redis"].get("command", [])
    assert compose["services"]["gateway"]["depends_on"] == {
        "redis": {"condition": "service_healthy"}
    }


def test_published_port_is_the_port_gunicorn_binds(compose: dict[str, Any]) -> None:
    env = gateway_env(compose, SHELL)
    port = bind_port(run_gunicorn_config(env))
    targets = [
        str(mapping).rsplit(":", 1)[-1] for mapping in compose["services"]["gateway"]["ports"]
    ]
    assert targets == [str(port)]


@pytest.mark.parametrize("service", ["gateway", "redis"])
def test_services_restart_and_report_health(compose: dict[str, Any], service: str) -> None:
    definition = compose["services"][service]
    assert definition["restart"] in ("always", "unless-stopped", "on-failure")
    healthcheck = definition["healthcheck"]
    assert not healthcheck.get("disable", False)
    assert healthcheck["test"][0] in ("CMD", "CMD-SHELL")


def test_gateway_healthcheck_is_the_images(
    compose: dict[str, Any], dockerfile: list[Instruction]
) -> None:
    image_check = next(i for i in final_stage(dockerfile) if i.keyword == "HEALTHCHECK")
    test = compose["services"]["gateway"]["healthcheck"]["test"]
    assert test == ["CMD", *healthcheck_command(image_check.arguments)]


def test_stop_grace_period_outlasts_gunicorns_drain(compose: dict[str, Any]) -> None:
    graceful = run_gunicorn_config(gateway_env(compose, SHELL))["graceful_timeout"]
    grace = duration_seconds(compose["services"]["gateway"]["stop_grace_period"])
    assert grace > graceful


@pytest.mark.parametrize(
    ("text", "seconds"), [("130s", 130), ("2m10s", 130), ("1h", 3600), ("1.5s", 1.5)]
)
def test_duration_parser(text: str, seconds: float) -> None:
    assert duration_seconds(text) == seconds


@pytest.mark.parametrize(
    ("value", "expected"),
    [("${A:-x}", "x"), ("${B:-x}", "b"), ("$B-${B}", "b-b"), ("$$B", "$B"), ("${E-x}", "")],
)
def test_interpolation(value: str, expected: str) -> None:
    assert interpolate(value, {"B": "b", "E": ""}) == expected


def test_the_commented_providers_file_is_the_example_mounted_where_documented() -> None:
    text = (REPO / "docker-compose.yml").read_text()
    assert "#   - ./gateway.example.yaml:/etc/ai-gateway/gateway.yaml:ro" in text
    assert "# GATEWAY_CONFIG: /etc/ai-gateway/gateway.yaml" in text
    assert (REPO / "gateway.example.yaml").is_file()
