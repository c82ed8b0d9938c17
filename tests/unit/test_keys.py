"""Per-key rules: allow-lists, expiry and disabling, per-key rpm, and how keys resolve."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import responses

from gateway.config import KeyDefaults, KeyPolicy, load_settings
from gateway.policy.keys import Caller, KeyRing, key_id
from tests.constants import GATEWAY_KEY, SECOND_GATEWAY_KEY, UNIT_UPSTREAM, UPSTREAM_KEY
from tests.unit.support import MakeApp, assert_openai_error

TEAM_KEY = "team-a-key-0123456789"
CHAT = "/v1/chat/completions"
UPSTREAM_CHAT = f"{UNIT_UPSTREAM}/chat/completions"
ANSWER = {"id": "c1", "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}


def policy(**fields: Any) -> KeyPolicy:
    digest = hashlib.sha256(TEAM_KEY.encode()).hexdigest()
    return KeyPolicy.model_validate({"name": "team-a", "key": f"sha256:{digest}", **fields})


def team() -> dict[str, str]:
    return {"Authorization": f"Bearer {TEAM_KEY}"}


@pytest.mark.parametrize(
    ("models", "model", "allowed"),
    [
        (("qwen-plus",), "qwen-plus", True),
        (("qwen-plus",), "qwen-plus-latest", False),
        (("qwen-plus",), "QWEN-PLUS", False),
        (("qwen-*",), "qwen-max", True),
        (("qwen-*",), "qwen-", True),
        (("qwen-*",), "deepseek-chat", False),
        (("*-chat",), "deepseek-chat", True),
        (("Qwen/*",), "Qwen/Qwen2.5-7B-Instruct", True),
        (("q.n",), "qwn", False),  # '.' is a character, not a regex
        (("a+",), "aa", False),
        (("*",), "anything/at all", True),
        ((), "qwen-plus", False),
        (("gpt-4o", "qwen-*"), "gpt-4o", True),
        (("gpt-4o", "qwen-*"), "gpt-4o-mini", False),
        (("qwen-*",), "qwen-max\nx", True),  # '*' spans any character
    ],
)
def test_allow_list_matches_names_and_wildcards(
    models: tuple[str, ...], model: str, allowed: bool
) -> None:
    assert Caller("key_x", models=models).allows(model) is allowed


def test_keys_resolve_their_own_rules_then_the_defaults_then_the_environment() -> None:
    defaults = KeyDefaults(models=("qwen-*",), tpm=500, tokens_per_month=9000)
    ring = KeyRing((GATEWAY_KEY,), (policy(rpm=7, tokens_per_day=100),), defaults, 60)

    env_key = ring.identify(GATEWAY_KEY)
    team_key = ring.identify(TEAM_KEY)
    assert env_key == Caller(key_id(GATEWAY_KEY), None, ("qwen-*",), 60, 500, 0, 9000, None, True)
    assert team_key is not None
    assert (team_key.name, team_key.label, team_key.key_id) == (
        "team-a",
        "team-a",
        key_id(TEAM_KEY),
    )
    assert (team_key.rpm, team_key.tpm, team_key.tokens_per_day) == (7, 500, 100)
    assert team_key.tokens_per_month == 9000 and team_key.models == ("qwen-*",)
    assert env_key.label == key_id(GATEWAY_KEY)
    assert ring.identify(SECOND_GATEWAY_KEY) is None


def test_a_key_file_with_expiry_and_models_loads(tmp_path: Path) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(
        "defaults:\n  rpm: 30\n"
        "keys:\n  - name: team-a\n    key_env: TEAM_A_KEY\n    models: [qwen-*]\n"
        "    expires_at: 2030-01-01\n    enabled: false\n"
    )
    env = {"ENV_FILE": "", "GATEWAY_CONFIG": str(path), "TARGET_API_KEY": UPSTREAM_KEY}
    settings = load_settings({**env, "GATEWAY_API_KEYS": GATEWAY_KEY, "TEAM_A_KEY": TEAM_KEY})
    ring = KeyRing(settings.gateway_api_keys, settings.key_policies, settings.key_defaults, 60)

    caller = ring.identify(TEAM_KEY)
    assert caller is not None and caller.models == ("qwen-*",) and caller.rpm == 30
    assert caller.expires_at == datetime(2030, 1, 1, tzinfo=UTC).timestamp()
    assert caller.enabled is False


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("keys:\n  - name: a\n    key_env: TEAM_A_KEY\n    tpm: -1\n", "keys.0.tpm: Input should"),
        ("keys:\n  - name: a\n    key_env: TEAM_A_KEY\n    expires_at: soon\n", "expires_at"),
        ("keys:\n  - name: a\n    key_env: TEAM_A_KEY\n    models: qwen\n", "keys.0.models"),
        ("keys:\n  - name: a\n    key_env: TEAM_A_KEY\n    enabled: maybe\n", "keys.0.enabled"),
        ("defaults:\n  tpm: lots\n", "defaults.tpm"),
        (
            "keys:\n  - name: a\n    key_env: TEAM_A_KEY\n  - name: a\n    key_env: TEAM_A_KEY\n",
            "name 'a' is used twice",
        ),
        (
            "keys:\n  - name: a\n    key_env: TEAM_A_KEY\n  - name: b\n    key_env: TEAM_A_KEY\n",
            "the same key is configured twice",
        ),
    ],
)
def test_bad_key_rules_are_refused_in_one_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    env = {"ENV_FILE": "", "GATEWAY_CONFIG": str(path), "TARGET_API_KEY": UPSTREAM_KEY}
    with pytest.raises(SystemExit) as raised:
        load_settings({**env, "GATEWAY_API_KEYS": GATEWAY_KEY, "TEAM_A_KEY": TEAM_KEY})
    found = str(raised.value)
    assert message in found and "\n" not in found


def test_a_model_outside_the_list_is_403_without_an_upstream_call(
    make_app: MakeApp, upstream: responses.RequestsMock
) -> None:
    client = make_app(key_policies=(policy(models=("qwen-*",)),)).test_client()
    response = client.post(CHAT, json={"model": "gpt-4o", "messages": []}, headers=team())

    error = assert_openai_error(response, 403, "model_not_allowed")
    assert error["type"] == "permission_denied"
    assert "'gpt-4o'" in error["message"] and error["param"] == "model"
    assert len(upstream.calls) == 0
    upstream.post(UPSTREAM_CHAT, json=ANSWER)
    allowed = client.post(CHAT, json={"model": "qwen-max", "messages": []}, headers=team())
    assert allowed.status_code == 200 and len(upstream.calls) == 1


@pytest.mark.parametrize(
    ("rules", "code", "says"),
    [
        ({"enabled": False}, "api_key_disabled", "disabled"),
        ({"expires_at": datetime.now(UTC) - timedelta(seconds=1)}, "api_key_expired", "expired"),
    ],
)
def test_a_disabled_or_expired_key_is_401_saying_so(
    make_app: MakeApp,
    upstream: responses.RequestsMock,
    rules: dict[str, Any],
    code: str,
    says: str,
) -> None:
    client = make_app(key_policies=(policy(**rules),)).test_client()
    response = client.get("/v1/models", headers=team())

    error = assert_openai_error(response, 401, code)
    assert says in error["message"]
    assert len(upstream.calls) == 0
    scraped = client.get("/metrics").get_data(as_text=True)
    assert f'gateway_key_rejections_total{{key="team-a",reason="{says}"}} 1.0' in scraped


def test_a_key_not_yet_expired_is_served(
    make_app: MakeApp, upstream: responses.RequestsMock
) -> None:
    later = datetime.now(UTC) + timedelta(hours=1)
    client = make_app(key_policies=(policy(expires_at=later),)).test_client()
    upstream.get(f"{UNIT_UPSTREAM}/models", json={"object": "list", "data": []})

    assert client.get("/v1/models", headers=team()).status_code == 200


def test_each_key_has_its_own_rpm(make_app: MakeApp, upstream: responses.RequestsMock) -> None:
    upstream.get(f"{UNIT_UPSTREAM}/models", json={"object": "list", "data": []})
    client = make_app(rate_limit_per_minute=5, key_policies=(policy(rpm=2),)).test_client()

    team_statuses = [client.get("/v1/models", headers=team()).status_code for _ in range(4)]
    env = {"Authorization": f"Bearer {GATEWAY_KEY}"}
    env_statuses = [client.get("/v1/models", headers=env).status_code for _ in range(6)]

    assert team_statuses == [200, 200, 429, 429]
    assert env_statuses == [200] * 5 + [429]
    scraped = client.get("/metrics").get_data(as_text=True)
    assert 'gateway_key_rejections_total{key="team-a",reason="rpm"} 2.0' in scraped


def test_a_key_with_rpm_0_has_no_request_limit(
    make_app: MakeApp, upstream: responses.RequestsMock
) -> None:
    upstream.get(f"{UNIT_UPSTREAM}/models", json={"object": "list", "data": []})
    client = make_app(rate_limit_per_minute=2, key_policies=(policy(rpm=0),)).test_client()

    assert {client.get("/v1/models", headers=team()).status_code for _ in range(5)} == {200}


def test_the_example_file_loads_with_the_readme_command() -> None:
    example = Path(__file__).resolve().parents[2] / "gateway.example.yaml"
    env = {"ENV_FILE": "", "GATEWAY_CONFIG": str(example), "GATEWAY_ADMIN_KEY": "admin-secret-1"}
    env |= {"DASHSCOPE_API_KEY": UPSTREAM_KEY, "DASHSCOPE_INTL_API_KEY": UPSTREAM_KEY}
    settings = load_settings(env)
    ring = KeyRing((), settings.key_policies, settings.key_defaults, 60)

    search = ring.identify("team-search-key-example-1")  # as the README says
    assert search is not None and search.name == "team-search"
    assert search.allows("qwen3-max") and not search.allows("deepseek-chat")
    assert (search.rpm, search.tpm, search.tokens_per_day) == (120, 200000, 2000000)
    names = {c.name: c for c in ring.callers}
    assert names["intern-bot"].expires_at is not None and not names["old-app"].enabled


def test_memory_storage_with_several_workers_is_refused_when_a_key_has_a_request_limit(
    tmp_path: Path,
) -> None:
    # (Token limits are held in the TOKEN_STORE_FILE the workers share: see
    # tests/unit/test_token_storage_durable.py.)
    path = tmp_path / "gateway.yaml"
    path.write_text("keys:\n  - name: a\n    key_env: TEAM_A_KEY\n    rpm: 100\n")
    env = {"ENV_FILE": "", "GATEWAY_CONFIG": str(path), "TARGET_API_KEY": UPSTREAM_KEY}
    env |= {"TEAM_A_KEY": TEAM_KEY, "RATE_LIMIT_REQUESTS_PER_MINUTE": "0"}
    env |= {"GUNICORN_WORKERS": "2", "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}

    with pytest.raises(SystemExit, match="RATE_LIMIT_STORAGE_URI"):
        load_settings(env)
