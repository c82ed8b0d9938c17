"""The GATEWAY_CONFIG file: read, interpolated, validated, and refused in one line."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from gateway.config import DEFAULT_PROVIDER, ConfigError, Settings, load_settings
from gateway.upstream import Router
from tests.constants import GATEWAY_KEY, UPSTREAM_KEY

DASHSCOPE_KEY = "sk-dashscope-cn-0123456789abcdef"
INTL_KEY = "sk-dashscope-intl-0123456789abcdef"
TEAM_KEY = "team-a-key-0123456789"


def load(tmp_path: Path, text: str, **env: str) -> Settings:
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    base = {"ENV_FILE": "", "GATEWAY_CONFIG": str(path), "GATEWAY_API_KEYS": GATEWAY_KEY}
    return load_settings({**base, **env})


def refusal(tmp_path: Path, text: str, **env: str) -> str:
    with pytest.raises(ConfigError) as raised:
        load(tmp_path, text, **env)
    return raised.value.message


EXAMPLE = """
providers:
  cn:
    preset: dashscope
    api_key_env: DASHSCOPE_API_KEY
  intl:
    preset: dashscope-singapore
    api_key: ${DASHSCOPE_INTL_API_KEY}
    max_concurrent: 50
  vllm:
    base_url: http://127.0.0.1:8000/v1/
    read_timeout: 120
models:
  gpt-4o-mini:
    - {provider: cn, model: qwen-plus, weight: 3}
    - {provider: intl, model: qwen-plus}
  qwen-*: cn
  "*": [vllm]
routing:
  max_attempts: 2
keys:
  - name: team-a
    key_env: TEAM_A_KEY
    models: [qwen-*]
    tpm: 1000
"""


def test_the_example_file_becomes_providers_routes_and_keys(tmp_path: Path) -> None:
    settings = load(
        tmp_path,
        EXAMPLE,
        DASHSCOPE_API_KEY=DASHSCOPE_KEY,
        DASHSCOPE_INTL_API_KEY=INTL_KEY,
        TEAM_A_KEY=TEAM_KEY,
    )

    cn, intl, vllm = settings.providers
    assert (cn.name, cn.kind, cn.api_key) == ("cn", "dashscope", DASHSCOPE_KEY)
    assert cn.base_url == "https://dashscope.aliyuncs.com/compatible-mode/v1"
    assert intl.base_url == "https://dashscope-intl.aliyuncs.com/compatible-mode/v1"
    assert (intl.api_key, intl.max_concurrent) == (INTL_KEY, 50)
    assert (vllm.base_url, vllm.api_key, vllm.read_timeout) == ("http://127.0.0.1:8000/v1", "", 120)
    assert [r.name for r in settings.routes] == ["gpt-4o-mini", "qwen-*", "*"]
    alias = settings.routes[0].deployments
    assert [(d.provider, d.model, d.weight) for d in alias] == [
        ("cn", "qwen-plus", 3),
        ("intl", "qwen-plus", 1),
    ]
    assert settings.routes[1].deployments[0].model is None
    assert settings.routing.max_attempts == 2
    router = Router(settings)
    for model, route, upstream_model in (
        ("gpt-4o-mini", "gpt-4o-mini", "qwen-plus"),
        ("qwen-max-latest", "qwen-*", "qwen-max-latest"),
        ("llama3", "*", "llama3"),
    ):
        plan = router.plan(model)
        assert plan is not None
        assert (plan.route, plan.candidates[0].upstream_model) == (route, upstream_model)
    (team,) = settings.key_policies
    assert team.digest == hashlib.sha256(TEAM_KEY.encode()).digest()
    assert (team.models, team.tpm) == (("qwen-*",), 1000)
    # Every key the file names is a secret for the log redactor and the answer scrubber.
    assert {DASHSCOPE_KEY, INTL_KEY, TEAM_KEY} <= set(settings.secrets)
    assert {DASHSCOPE_KEY, INTL_KEY} <= set(settings.upstream_secrets)
    assert TEAM_KEY not in repr(settings) and DASHSCOPE_KEY not in repr(settings)


def test_without_a_file_the_environment_is_the_one_provider() -> None:
    settings = load_settings(
        {"ENV_FILE": "", "TARGET_API_KEY": UPSTREAM_KEY, "GATEWAY_API_KEYS": GATEWAY_KEY}
    )

    (provider,) = settings.providers
    assert (provider.name, provider.api_key, provider.kind) == (
        DEFAULT_PROVIDER,
        UPSTREAM_KEY,
        "dashscope",
    )
    assert [(r.name, r.deployments[0].provider) for r in settings.routes] == [
        ("*", DEFAULT_PROVIDER)
    ]


def test_a_file_with_only_keys_keeps_the_environments_provider(tmp_path: Path) -> None:
    digest = hashlib.sha256(TEAM_KEY.encode()).hexdigest()
    text = f"keys:\n  - name: team-b\n    key: sha256:{digest}\n    tokens_per_day: 5\n"
    settings = load(tmp_path, text, TARGET_API_KEY=UPSTREAM_KEY, GATEWAY_API_KEYS="")

    assert settings.providers[0].name == DEFAULT_PROVIDER
    assert settings.key_policies[0].digest.hex() == digest
    assert settings.gateway_api_keys == ()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("providers:\n  x:\n    base_url: ftp//nope\n", "providers.x.base_url: not a URL"),
        ("providers:\n  x:\n    preset: dashscope-mars\n", "providers.x.preset: unknown preset"),
        (
            "providers:\n  x:\n    base_url: http://a\n    colour: red\n",
            "providers.x.colour: not a",
        ),
        (
            "providers:\n  x:\n    base_url: http://a\n    api_key_env: NOPE_KEY\n",
            "NOPE_KEY is not set",
        ),
        (
            "providers:\n  x:\n    base_url: http://a\n    api_key: sk-literal-1234\n",
            "api_key: write ${",
        ),
        (
            "providers:\n  x:\n    base_url: http://a\n    max_concurrent: 0\n",
            "max_concurrent: Input should be greater",
        ),
        (
            "providers:\n  x:\n    base_url: http://a\nmodels:\n  m: [y]\n",
            "provider 'y' is not defined",
        ),
        (
            "providers:\n  x:\n    base_url: http://a\n"
            "models:\n  m:\n    - {provider: x, weight: -1}\n",
            "models.m.0.weight",
        ),
        ("routing:\n  strategy: random\n", "routing.strategy"),
        (
            "providers:\n  x:\n    base_url: http://a\n    stream_usage: sometimes\n",
            "providers.x.stream_usage: Input should be a valid boolean",
        ),
        ("keys:\n  - name: a\n    key: plain-secret-key\n", "keys.0: key must be sha256:"),
        ("keys:\n  - name: a b\n    key_env: TEAM_A_KEY\n", "keys.0.name: letters"),
        ("keys:\n  - name: a\n", "keys.0: give exactly one of key_env"),
        ("models: [1, 2\n", "line 2: expected"),
        ("- just\n- a list\n", "the top level must be a mapping"),
        (
            "providers:\n  x:\n    base_url: ${MISSING_URL}\n",
            "providers.x.base_url: ${MISSING_URL} is not set",
        ),
    ],
)
def test_a_bad_file_is_refused_with_the_field_and_the_problem(
    tmp_path: Path, text: str, message: str
) -> None:
    found = refusal(tmp_path, text, TARGET_API_KEY=UPSTREAM_KEY, TEAM_A_KEY=TEAM_KEY)

    assert found.startswith(f"GATEWAY_CONFIG {tmp_path / 'gateway.yaml'}: ")
    assert message in found
    assert "\n" not in found


def test_a_missing_file_is_refused(tmp_path: Path) -> None:
    settings_env = {
        "ENV_FILE": "",
        "GATEWAY_CONFIG": str(tmp_path / "absent.yaml"),
        "TARGET_API_KEY": UPSTREAM_KEY,
        "GATEWAY_API_KEYS": GATEWAY_KEY,
    }
    with pytest.raises(ConfigError, match="cannot read it: No such file"):
        load_settings(settings_env)


def test_a_key_named_by_a_variable_never_appears_in_the_refusal(tmp_path: Path) -> None:
    short = "tiny"
    text = "keys:\n  - name: a\n    key_env: SHORT_KEY\n"
    found = refusal(tmp_path, text, TARGET_API_KEY=UPSTREAM_KEY, SHORT_KEY=short)

    assert "at least 8" in found and short not in found


def test_the_committed_example_file_is_valid() -> None:
    example = Path(__file__).resolve().parents[2] / "gateway.example.yaml"
    env = {
        "ENV_FILE": "",
        "GATEWAY_CONFIG": str(example),
        "GATEWAY_API_KEYS": GATEWAY_KEY,
        "DASHSCOPE_API_KEY": DASHSCOPE_KEY,
        "DASHSCOPE_INTL_API_KEY": INTL_KEY,
    }

    settings = load_settings(env)

    assert [p.name for p in settings.providers] == ["dashscope-cn", "dashscope-intl", "local"]
    assert [p.kind for p in settings.providers] == ["dashscope", "dashscope", "vllm"]
    names = [r.name for r in settings.routes]
    assert names == ["gpt-4o-mini", "gpt-4o", "qwen-plus", "qwen-*", "*"]
    assert settings.routing.max_attempts == 2
    router = Router(settings)
    for model, route, upstream_model in (
        ("gpt-4o-mini", "gpt-4o-mini", "qwen-plus"),
        ("qwen-max-latest", "qwen-*", "qwen-max-latest"),
        ("llama3", "*", "llama3"),
    ):
        plan = router.plan(model)
        assert plan is not None
        assert (plan.route, plan.candidates[0].upstream_model) == (route, upstream_model)


def test_a_variable_in_a_provider_header_is_a_secret_like_a_key(tmp_path: Path) -> None:
    azure = "azure-api-key-0123456789abcdef"
    text = (
        "providers:\n  azure:\n    base_url: https://x.openai.azure.com/openai/v1\n"
        "    headers: {api-key: '${AZURE_KEY}', X-Title: my-app-title-long}\n"
    )
    settings = load(tmp_path, text, AZURE_KEY=azure)

    assert settings.providers[0].headers["api-key"] == azure
    assert azure in settings.secrets and azure in settings.upstream_secrets
    # A header written in the file is no secret: masking it would corrupt answers.
    assert "my-app-title-long" not in settings.upstream_secrets


def test_an_empty_variable_is_refused_like_an_unset_one(tmp_path: Path) -> None:
    text = "providers:\n  intl:\n    preset: dashscope-singapore\n    api_key: ${INTL_KEY}\n"

    found = refusal(tmp_path, text, INTL_KEY="")

    assert "providers.intl.api_key: ${INTL_KEY} is not set in the environment" in found


def test_stream_usage_is_on_unless_a_provider_turns_it_off(tmp_path: Path) -> None:
    text = (
        "providers:\n  plain:\n    base_url: http://a\n"
        "  strict:\n    base_url: http://b\n    stream_usage: false\n"
    )

    settings = load(tmp_path, text, TARGET_API_KEY=UPSTREAM_KEY)

    assert [(p.name, p.stream_usage) for p in settings.providers] == [
        ("plain", True),
        ("strict", False),
    ]
