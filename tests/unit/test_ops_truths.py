"""Operations that stay true (issue 19 items 3, 6-11): a metrics key, bounded quota series,
the storage gauge written by each process, YAML aliases bounded, no interpolated value in a
config error, admin-key guessing throttled, /v1/models telling an outage, README truths."""

from __future__ import annotations

import hashlib
import re
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import requests
import responses
from flask import Flask

from gateway import create_app
from gateway.config import ConfigError, Settings, load_settings
from gateway.config.schema import Deployment, KeyPolicy, ModelRoute, Provider
from gateway.upstream import ModelCatalog
from tests.constants import GATEWAY_KEY, UNIT_UPSTREAM, UPSTREAM_KEY
from tests.unit.support import MakeApp, assert_openai_error

REPO = Path(__file__).resolve().parents[2]
METRICS_KEY = "metrics-key-0123456789"
ADMIN_KEY = "admin-key-0123456789"


def load(tmp_path: Path, text: str, **env: str) -> Settings:
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    base = {"ENV_FILE": "", "GATEWAY_CONFIG": str(path), "GATEWAY_API_KEYS": GATEWAY_KEY}
    return load_settings({**base, "TARGET_API_KEY": UPSTREAM_KEY, **env})


def refusal(tmp_path: Path, text: str, **env: str) -> str:
    with pytest.raises(ConfigError) as raised:
        load(tmp_path, text, **env)
    return raised.value.message


# --- item 6: /metrics behind METRICS_KEY, scrapes that do not grow with configured keys ---
def test_metrics_need_the_metrics_key_when_one_is_set(make_app: MakeApp) -> None:
    client = make_app(metrics_key=METRICS_KEY).test_client()

    anonymous = client.get("/metrics")
    wrong = client.get("/metrics", headers={"Authorization": "Bearer not-the-metrics-key"})
    gateway_key = client.get("/metrics", headers={"Authorization": f"Bearer {GATEWAY_KEY}"})
    scraped = client.get("/metrics", headers={"Authorization": f"Bearer {METRICS_KEY}"})

    for refused in (anonymous, wrong, gateway_key):
        assert_openai_error(refused, 401, "invalid_api_key")
        assert b"gateway_" not in refused.data
    assert scraped.status_code == 200
    assert b"gateway_rate_limit_storage_up 1.0" in scraped.data


def test_without_a_metrics_key_metrics_stay_public(client: Any) -> None:
    assert client.get("/metrics").status_code == 200


def test_the_metrics_key_is_validated_and_redacted() -> None:
    env = {"ENV_FILE": "", "TARGET_API_KEY": UPSTREAM_KEY, "GATEWAY_API_KEYS": GATEWAY_KEY}
    with pytest.raises(ConfigError, match="METRICS_KEY must be at least"):
        load_settings({**env, "METRICS_KEY": "short"})
    settings = load_settings({**env, "METRICS_KEY": METRICS_KEY})
    assert METRICS_KEY in settings.secrets
    assert METRICS_KEY not in repr(settings)


def _team_keys(count: int, **rules: Any) -> tuple[KeyPolicy, ...]:
    digests = [hashlib.sha256(f"team-key-{i:05}".encode()).hexdigest() for i in range(count)]
    return tuple(
        KeyPolicy.model_validate({"name": f"team-{i}", "key": f"sha256:{d}", **rules})
        for i, d in enumerate(digests)
    )


def test_a_scrape_with_2000_keys_neither_reads_nor_exports_their_quotas(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dataclasses import replace

    app = create_app(replace(settings, key_policies=_team_keys(2000)))
    reads: list[int] = []
    budget = app.extensions["gateway.tokens"]
    original = budget.read

    def read(callers: list[object], *_: object) -> list[list[int]]:
        reads.append(len(callers))
        return []

    monkeypatch.setattr(budget, "read", read)
    scraped = app.test_client().get("/metrics").data
    monkeypatch.setattr(budget, "read", original)

    # Before: 4,000 quota series and a storage read of 2,000 keys on every scrape.
    assert reads == []
    assert b"gateway_key_quota_used_tokens{" not in scraped
    assert len(scraped) < 20_000


# --- item 3: each process writes its own storage gauge --------------------------------
def test_a_forked_worker_writes_its_own_storage_gauge(
    app: Flask, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = app.extensions["gateway.limit_storage"]
    gauge = app.extensions["gateway.metrics"].rate_limit_storage_up
    state.observe()
    # What a fork does with PROMETHEUS_MULTIPROC_DIR: the child's file starts at 0.
    gauge.set(0)
    monkeypatch.setattr("gateway.limits.os.getpid", lambda: 999_999)

    scraped = app.test_client().get("/metrics").data

    assert b"gateway_rate_limit_storage_up 1.0" in scraped


# --- item 7: aliases bounded before anything is built ---------------------------------
def alias_bomb(levels: int) -> str:
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for level in range(1, levels + 1):
        lines.append(f"a{level}: &a{level} [{', '.join([f'*a{level - 1}'] * 10)}]")
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_is_refused_in_milliseconds_with_bounded_memory(tmp_path: Path) -> None:
    tracemalloc.start()
    started = time.perf_counter()
    try:
        message = refusal(tmp_path, alias_bomb(8))
        elapsed = time.perf_counter() - started
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

    assert "more than 100,000 values once its aliases are expanded" in message
    assert elapsed < 0.5
    assert peak < 10 * 1024 * 1024


def test_an_alias_inside_itself_is_refused(tmp_path: Path) -> None:
    assert "refers to a value that contains it" in refusal(tmp_path, "keys: &k [*k]\n")


def test_ordinary_anchors_and_merge_keys_still_work(tmp_path: Path) -> None:
    text = """
providers:
  a: &base {base_url: "http://127.0.0.1:9/v1", api_key_env: TARGET_API_KEY, read_timeout: 7}
  b:
    <<: *base
    base_url: http://127.0.0.1:10/v1
models:
  "*": [a, b]
"""
    settings = load(tmp_path, text)
    assert [p.read_timeout for p in settings.providers] == [7, 7]


# --- item 8: an interpolated value never in a config error ----------------------------
SECRET = "sk-PROVKEY-A-0123456789abcdef"


@pytest.mark.parametrize(
    ("text", "where"),
    [
        (
            "providers:\n  a: {preset: dashscope, api_key_env: TARGET_API_KEY}\n"
            'models:\n  m: "${PROV_A_KEY}"\n',
            "models.m: provider '${PROV_A_KEY}'",
        ),
        (
            "providers:\n  a: {preset: '${PROV_A_KEY}', api_key_env: TARGET_API_KEY}\n",
            "providers.a.preset: unknown preset '${PROV_A_KEY}'",
        ),
        (
            "providers:\n  a: {base_url: 'x${PROV_A_KEY}', api_key_env: TARGET_API_KEY}\n",
            "providers.a.base_url",
        ),
        ("routing:\n  strategy: ${PROV_A_KEY}\n", "routing.strategy"),
    ],
)
def test_no_interpolated_value_appears_in_a_config_error(
    tmp_path: Path, text: str, where: str
) -> None:
    message = refusal(tmp_path, text, PROV_A_KEY=SECRET)

    assert where in message
    assert SECRET not in message and "PROVKEY" not in message


# --- item 9: admin-key guessing throttled per address, and logged ---------------------
def test_wrong_admin_keys_are_throttled_per_address_and_logged(
    make_app: MakeApp, capsys: pytest.CaptureFixture[str]
) -> None:
    client = make_app(admin_api_key=ADMIN_KEY).test_client()

    def usage(key: str, address: str = "203.0.113.7") -> Any:
        headers = {"Authorization": f"Bearer {key}"}
        return client.get("/v1/usage", headers=headers, environ_base={"REMOTE_ADDR": address})

    guesses = [usage(f"guess-{i:04}-xxxxxxxx").status_code for i in range(10)]
    throttled = usage("guess-9999-xxxxxxxx")
    right_key_meanwhile = usage(ADMIN_KEY)
    elsewhere = usage(ADMIN_KEY, address="198.51.100.9")

    assert guesses == [401] * 10
    assert_openai_error(throttled, 429, "rate_limit_exceeded")
    assert 1 <= int(throttled.headers["Retry-After"]) <= 60
    assert right_key_meanwhile.status_code == 429  # no key is compared while throttled
    assert elsewhere.status_code == 200
    logged = capsys.readouterr().out
    assert logged.count("wrong admin key for /v1/usage from 203.0.113.7") == 10
    assert "guess-" not in logged


def test_the_throttle_forgets_failures_after_the_window() -> None:
    from gateway.usage import MAX_FAILURES, WINDOW_SECONDS, FailedAttempts

    now = [1000.0]
    attempts = FailedAttempts(clock=lambda: now[0])
    for _ in range(MAX_FAILURES):
        attempts.failed("a")
    assert attempts.retry_after("a") == pytest.approx(WINDOW_SECONDS)
    now[0] += WINDOW_SECONDS
    assert attempts.retry_after("a") == 0


# --- item 10: /v1/models tells an outage ----------------------------------------------
MODELS = f"{UNIT_UPSTREAM}/models"


@pytest.mark.parametrize(
    "answer", [{"body": requests.ConnectionError("down")}, {"status": 503, "json": {}}]
)
def test_models_are_a_502_when_no_provider_could_list_them(
    client: Any, auth: dict[str, str], upstream: responses.RequestsMock, answer: dict[str, Any]
) -> None:
    upstream.get(MODELS, **answer)

    response = client.get("/v1/models", headers=auth)

    error = assert_openai_error(response, 502, "upstream_unavailable")
    assert "default" in error["message"]


def test_a_failed_listing_is_kept_seconds_not_a_minute(
    app: Flask, auth: dict[str, str], upstream: responses.RequestsMock
) -> None:
    now = [0.0]
    app.extensions["gateway.models"] = ModelCatalog(
        app.extensions["gateway.upstream"], clock=lambda: now[0]
    )
    client = app.test_client()
    upstream.get(MODELS, body=requests.ConnectionError("down"))
    assert client.get("/v1/models", headers=auth).status_code == 502
    upstream.replace(responses.GET, MODELS, json={"data": [{"id": "qwen-plus"}]})

    now[0] = 2.0
    still_cached = client.get("/v1/models", headers=auth).status_code
    now[0] = 6.0
    back = client.get("/v1/models", headers=auth)

    assert still_cached == 502
    assert back.status_code == 200
    assert [m["id"] for m in back.get_json()["data"]] == ["qwen-plus"]


def test_a_configured_name_keeps_the_list_200_while_its_provider_is_down(
    make_app: MakeApp, auth: dict[str, str], upstream: responses.RequestsMock
) -> None:
    provider = Provider(name="p", base_url=UNIT_UPSTREAM, api_key=UPSTREAM_KEY)
    routes = (
        ModelRoute(name="qwen-plus", deployments=(Deployment(provider="p"),)),
        ModelRoute(name="*", deployments=(Deployment(provider="p"),)),
    )
    client = make_app(providers=(provider,), routes=routes).test_client()
    upstream.get(MODELS, body=requests.ConnectionError("down"))

    response = client.get("/v1/models", headers=auth)

    assert response.status_code == 200
    assert [m["id"] for m in response.get_json()["data"]] == ["qwen-plus"]


# --- item 11: small truths ------------------------------------------------------------
README = (REPO / "README.md").read_text()


def test_the_readme_labels_models_as_the_code_does(settings: Settings) -> None:
    from gateway.metrics import GatewayMetrics

    metrics = GatewayMetrics(settings)
    # No configured names here: an unrouted model and a `*`-routed one are both `other`.
    assert metrics.model_label("no-such-model") == metrics.model_label("qwen-plus") == "other"
    assert metrics.model_label(None) == "none"
    flat = " ".join(README.split())
    assert (
        "`other` (any other model asked for, whether a `*` route matched it or no route "
        "did), or `none` (the request named no model)" in flat
    )


def test_the_readme_documents_the_provider_headers_field() -> None:
    assert re.search(r"`headers:`[^.]*extra headers sent with every request", README)
    assert set(Provider.model_fields) - {"name", "api_key", "proxies"} <= {
        field for field in Provider.model_fields if re.search(rf"`{field}[`:]", README)
    }


def test_an_unknown_preset_names_its_field(tmp_path: Path) -> None:
    message = refusal(tmp_path, "providers:\n  x: {preset: dashscope-mars}\n")
    assert "providers.x.preset: unknown preset 'dashscope-mars'" in message


def test_the_readme_opening_counts_the_lines_of_python() -> None:
    found = re.search(r"about ([\d,]+) lines of Python in `gateway/`", README)
    assert found, "the opening states the size of gateway/"
    stated = int(found.group(1).replace(",", ""))
    actual = sum(len(p.read_text().splitlines()) for p in (REPO / "gateway").rglob("*.py"))
    assert 0.75 * actual <= stated <= 1.25 * actual, actual
