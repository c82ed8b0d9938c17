"""Settings: defaults, parsing, validation messages, .env files and proxy resolution."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.config import (
    DEFAULT_TARGET_API_URL,
    ENVIRONMENT_VARIABLES,
    ConfigError,
    Settings,
    load_settings,
)
from gateway.config import settings as config
from tests.constants import GATEWAY_KEY, SECOND_GATEWAY_KEY, UPSTREAM_KEY

REQUIRED = {"ENV_FILE": "", "TARGET_API_KEY": UPSTREAM_KEY, "GATEWAY_API_KEYS": GATEWAY_KEY}
REDIS = "redis://:redis-pass-4b2e@cache.internal:6379/0"
PROXY = "http://proxy.internal:3128"


def load(**variables: str) -> Settings:
    return load_settings({**REQUIRED, **variables})


def test_defaults() -> None:
    settings = load()

    assert settings.target_api_key == UPSTREAM_KEY
    assert settings.gateway_api_keys == (GATEWAY_KEY,)
    assert settings.target_api_url == DEFAULT_TARGET_API_URL
    assert settings.port == 8080
    assert settings.rate_limit_per_minute == 60
    assert settings.rate_limit_storage_uri == "memory://"
    assert settings.rate_limit_strategy == "moving-window"
    assert settings.log_level == "INFO"
    assert settings.log_format == "json"
    assert settings.health_check_enabled is True
    assert settings.cors_allowed_origins == ("*",)
    assert settings.upstream_connect_timeout == 10.0
    assert settings.upstream_read_timeout == 600.0
    assert settings.max_request_body_bytes == 10 * 1024 * 1024
    assert settings.upstream_total_timeout == 900.0
    assert settings.max_response_body_bytes == 256 * 1024 * 1024
    assert settings.gil_switch_interval == 0.05
    assert settings.gunicorn_workers == 1
    assert settings.gunicorn_threads == 2048
    assert dict(settings.upstream_proxies) == {}
    assert settings.upstream_ca_bundle is None
    assert settings.prometheus_multiproc_dir is None


def test_every_variable_is_parsed(tmp_path: Path) -> None:
    settings = load(
        TARGET_API_URL=" https://llm.example.com/api/v1/ ",
        GATEWAY_API_KEYS=f" {GATEWAY_KEY} ,, {SECOND_GATEWAY_KEY} ,",
        PORT="9090",
        RATE_LIMIT_REQUESTS_PER_MINUTE="17",
        RATE_LIMIT_STORAGE_URI=REDIS,
        RATE_LIMIT_STRATEGY="Fixed-Window",
        LOG_LEVEL="debug",
        LOG_FORMAT="TEXT",
        HEALTH_CHECK_ENABLED="off",
        CORS_ALLOWED_ORIGINS="https://a.example, https://b.example",
        UPSTREAM_CONNECT_TIMEOUT="2.5",
        UPSTREAM_READ_TIMEOUT="90",
        MAX_REQUEST_BODY_BYTES="2048",
        UPSTREAM_TOTAL_TIMEOUT="120",
        MAX_RESPONSE_BODY_BYTES="4096",
        GIL_SWITCH_INTERVAL="0.02",
        GUNICORN_WORKERS="3",
        GUNICORN_THREADS="32",
        REQUESTS_CA_BUNDLE="/etc/ssl/corp.pem",
        PROMETHEUS_MULTIPROC_DIR=str(tmp_path),
    )

    assert settings.target_api_url == "https://llm.example.com/api/v1"
    assert settings.gateway_api_keys == (GATEWAY_KEY, SECOND_GATEWAY_KEY)
    assert settings.port == 9090
    assert settings.rate_limit_per_minute == 17
    assert settings.rate_limit_storage_uri == REDIS
    assert settings.rate_limit_strategy == "fixed-window"
    assert settings.log_level == "DEBUG"
    assert settings.log_format == "text"
    assert settings.health_check_enabled is False
    assert settings.cors_allowed_origins == ("https://a.example", "https://b.example")
    assert settings.upstream_connect_timeout == 2.5
    assert settings.upstream_read_timeout == 90.0
    assert settings.max_request_body_bytes == 2048
    assert settings.upstream_total_timeout == 120.0
    assert settings.max_response_body_bytes == 4096
    assert settings.gil_switch_interval == 0.02
    assert settings.gunicorn_workers == 3
    assert settings.gunicorn_threads == 32
    assert settings.upstream_ca_bundle == "/etc/ssl/corp.pem"
    assert settings.prometheus_multiproc_dir == str(tmp_path)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("1", True),
        ("true", True),
        ("YES", True),
        ("On", True),
        ("0", False),
        ("False", False),
        ("no", False),
        (" off ", False),
    ],
)
def test_booleans(value: str, expected: bool) -> None:
    assert load(HEALTH_CHECK_ENABLED=value).health_check_enabled is expected


def test_ssl_cert_file_is_the_ca_bundle_when_requests_ca_bundle_is_unset() -> None:
    assert load(SSL_CERT_FILE="/etc/ssl/other.pem").upstream_ca_bundle == "/etc/ssl/other.pem"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("PORT", "http"),
        ("PORT", "0"),
        ("PORT", "65536"),
        ("RATE_LIMIT_REQUESTS_PER_MINUTE", "ten"),
        ("RATE_LIMIT_REQUESTS_PER_MINUTE", "-1"),
        ("RATE_LIMIT_STORAGE_URI", "mongodb://db.internal"),
        ("RATE_LIMIT_STRATEGY", "token-bucket"),
        ("LOG_LEVEL", "verbose"),
        ("LOG_FORMAT", "xml"),
        ("HEALTH_CHECK_ENABLED", "maybe"),
        ("UPSTREAM_CONNECT_TIMEOUT", "soon"),
        ("UPSTREAM_CONNECT_TIMEOUT", "0"),
        ("UPSTREAM_READ_TIMEOUT", "-5"),
        ("UPSTREAM_READ_TIMEOUT", "nan"),
        ("MAX_REQUEST_BODY_BYTES", "10MB"),
        ("MAX_REQUEST_BODY_BYTES", "0"),
        ("UPSTREAM_TOTAL_TIMEOUT", "later"),
        ("UPSTREAM_TOTAL_TIMEOUT", "0"),
        ("MAX_RESPONSE_BODY_BYTES", "1GB"),
        ("MAX_RESPONSE_BODY_BYTES", "-1"),
        # Keys travel in an Authorization header: pasted curly quotes, spaces, accents.
        ("TARGET_API_KEY", UPSTREAM_KEY + "\u201d"),
        ("TARGET_API_KEY", "sk-two words-0123456789"),
        ("TARGET_API_KEY", "sk-upstream\u00a0secret-0123456789"),
        ("GATEWAY_API_KEYS", GATEWAY_KEY + "\u00e9"),
        ("GUNICORN_WORKERS", "two"),
        ("GUNICORN_WORKERS", "0"),
        ("GUNICORN_THREADS", "0"),
        ("GUNICORN_THREADS", "100000"),
        ("GUNICORN_WORKERS", "1000"),
        ("WEB_CONCURRENCY", "lots"),
        ("TARGET_API_URL", "ftp://llm.example.com/v1"),
        ("TARGET_API_URL", "llm.example.com/v1"),
        ("TARGET_API_URL", "https://"),
    ],
)
def test_malformed_value_names_the_variable(variable: str, value: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load(**{variable: value})

    assert variable in raised.value.message
    assert value.strip() not in raised.value.message or "KEY" not in variable  # never a key


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("TARGET_API_KEY", None),
        ("TARGET_API_KEY", "   "),
        ("GATEWAY_API_KEYS", None),
        ("GATEWAY_API_KEYS", " , ,"),
    ],
)
def test_missing_required_value_names_the_variable(variable: str, value: str | None) -> None:
    environ = {k: v for k, v in REQUIRED.items() if k != variable}
    if value is not None:
        environ[variable] = value

    with pytest.raises(ConfigError) as raised:
        load_settings(environ)

    assert variable in raised.value.message


def test_config_error_is_a_one_line_system_exit() -> None:
    with pytest.raises(SystemExit) as raised:
        load(PORT="eighty")

    assert isinstance(raised.value, ConfigError)
    assert raised.value.code == "configuration error: PORT must be an integer, got 'eighty'"


def test_start_up_with_bad_config_prints_one_line_and_no_traceback() -> None:
    script = "from gateway.config import load_settings; load_settings({'ENV_FILE': ''})"
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=Path(config.__file__).parents[2],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "configuration error: TARGET_API_KEY is required (the key sent to the upstream provider)"
    ]


def test_memory_storage_with_several_workers_is_refused() -> None:
    with pytest.raises(ConfigError) as raised:
        load(GUNICORN_WORKERS="2")

    assert "GUNICORN_WORKERS" in raised.value.message
    assert "RATE_LIMIT_STORAGE_URI" in raised.value.message


def test_redis_storage_with_several_workers_is_allowed(tmp_path: Path) -> None:
    settings = load(
        GUNICORN_WORKERS="4", RATE_LIMIT_STORAGE_URI=REDIS, PROMETHEUS_MULTIPROC_DIR=str(tmp_path)
    )
    assert settings.gunicorn_workers == 4


def test_memory_storage_with_several_workers_is_allowed_when_limits_are_off(
    tmp_path: Path,
) -> None:
    settings = load(
        GUNICORN_WORKERS="4",
        RATE_LIMIT_REQUESTS_PER_MINUTE="0",
        PROMETHEUS_MULTIPROC_DIR=str(tmp_path),
    )

    assert settings.gunicorn_workers == 4


def test_repr_hides_keys_and_storage_password() -> None:
    settings = load(
        GATEWAY_API_KEYS=f"{GATEWAY_KEY},{SECOND_GATEWAY_KEY}", RATE_LIMIT_STORAGE_URI=REDIS
    )

    text = repr(settings)

    assert "Settings(" in text
    for secret in (UPSTREAM_KEY, GATEWAY_KEY, SECOND_GATEWAY_KEY, "redis-pass-4b2e"):
        assert secret not in text


def test_secrets_lists_keys_and_storage_password() -> None:
    settings = load(
        GATEWAY_API_KEYS=f"{GATEWAY_KEY},{SECOND_GATEWAY_KEY}", RATE_LIMIT_STORAGE_URI=REDIS
    )

    assert set(settings.secrets) == {
        UPSTREAM_KEY,
        GATEWAY_KEY,
        SECOND_GATEWAY_KEY,
        "redis-pass-4b2e",
    }


def test_repr_hides_proxy_password() -> None:
    settings = load(
        TARGET_API_URL="https://llm.example.com/v1",
        HTTPS_PROXY="http://corp-user:proxy-pass-77aa@proxy.internal:3128",
        NO_PROXY="localhost",
    )

    assert dict(settings.upstream_proxies)  # the proxy was resolved...
    assert "proxy-pass-77aa" not in repr(settings)  # ...but its password is not shown


def test_env_file_fills_gaps_and_the_real_environment_wins(tmp_path: Path) -> None:
    env_file = tmp_path / "gateway.env"
    env_file.write_text(
        f"TARGET_API_KEY={UPSTREAM_KEY}\n"
        f'GATEWAY_API_KEYS="{GATEWAY_KEY},{SECOND_GATEWAY_KEY}"\n'
        "PORT=9000\n"
        "LOG_LEVEL=debug\n"
    )

    settings = load_settings({"ENV_FILE": str(env_file), "PORT": "7000"})

    assert settings.target_api_key == UPSTREAM_KEY
    assert settings.gateway_api_keys == (GATEWAY_KEY, SECOND_GATEWAY_KEY)
    assert settings.log_level == "DEBUG"
    assert settings.port == 7000


def test_empty_env_file_setting_reads_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A .env in the working directory is the default ENV_FILE; "" must switch it off.
    (tmp_path / ".env").write_text("PORT=9000\n")
    monkeypatch.chdir(tmp_path)

    assert load().port == 8080
    assert load_settings({k: v for k, v in REQUIRED.items() if k != "ENV_FILE"}).port == 9000


def test_web_concurrency_is_the_worker_count_fallback(tmp_path: Path) -> None:
    shared = {"RATE_LIMIT_STORAGE_URI": REDIS, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    assert load(WEB_CONCURRENCY="3", **shared).gunicorn_workers == 3
    both = load(WEB_CONCURRENCY="3", GUNICORN_WORKERS="2", **shared)
    assert both.gunicorn_workers == 2


def test_several_workers_need_shared_metrics_files() -> None:
    with pytest.raises(ConfigError) as refused:
        load(GUNICORN_WORKERS="2", RATE_LIMIT_STORAGE_URI=REDIS)
    assert "PROMETHEUS_MULTIPROC_DIR" in refused.value.message


@pytest.mark.parametrize(
    ("url", "variables", "expected"),
    [
        ("https://llm.example.com/v1", {"HTTPS_PROXY": PROXY}, {"https": PROXY}),
        ("https://llm.example.com/v1", {"https_proxy": PROXY}, {"https": PROXY}),
        ("https://llm.example.com/v1", {"ALL_PROXY": PROXY}, {"https": PROXY}),
        ("http://llm.example.com/v1", {"HTTP_PROXY": PROXY}, {"http": PROXY}),
        ("http://llm.example.com/v1", {"HTTPS_PROXY": PROXY}, {}),
        ("https://llm.example.com/v1", {}, {}),
    ],
)
def test_proxy_for_the_upstream_scheme(url: str, variables: dict, expected: dict) -> None:
    # An explicit NO_PROXY that does not match keeps the result independent of the machine.
    settings = load(TARGET_API_URL=url, NO_PROXY="localhost,127.0.0.1", **variables)

    assert dict(settings.upstream_proxies) == expected


@pytest.mark.parametrize(
    "no_proxy", ["llm.example.com", "localhost, llm.example.com", ".example.com", "*"]
)
def test_no_proxy_matching_the_upstream_bypasses_the_proxy(no_proxy: str) -> None:
    settings = load(
        TARGET_API_URL="https://llm.example.com/v1", HTTPS_PROXY=PROXY, NO_PROXY=no_proxy
    )

    assert dict(settings.upstream_proxies) == {}


def test_proxy_resolution_reads_only_the_given_mapping(monkeypatch: pytest.MonkeyPatch) -> None:
    # The process environment says "bypass"; the mapping passed in says nothing about it.
    monkeypatch.setenv("NO_PROXY", "llm.example.com")
    monkeypatch.setenv("no_proxy", "llm.example.com")

    settings = load(TARGET_API_URL="https://llm.example.com/v1", HTTPS_PROXY=PROXY)

    assert dict(settings.upstream_proxies) == {"https": PROXY}


def _variables_read_by_config() -> set[str]:
    """Names passed as string literals to `reader.*(...)` or `env.get(...)` in config."""
    tree = ast.parse(inspect.getsource(config))
    names = set()
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        if node.func.attr not in {"text", "csv", "integer", "number", "boolean", "get"}:
            continue
        if node.args and isinstance(node.args[0], ast.Constant):
            name = node.args[0].value
            if isinstance(name, str) and (name.isupper() or name.endswith("_proxy")):
                names.add(name)
    return names


def test_environment_variables_lists_every_variable_read() -> None:
    read = _variables_read_by_config()

    assert {"TARGET_API_KEY", "ENV_FILE", "NO_PROXY", "WEB_CONCURRENCY"} <= read  # scan works
    assert read - set(ENVIRONMENT_VARIABLES) == set()


def test_environment_variables_lists_nothing_unread() -> None:
    # HTTP(S)_PROXY and http(s)_proxy are read through f"{scheme}_proxy" spellings.
    listed = set(ENVIRONMENT_VARIABLES) - {"HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"}

    assert listed - _variables_read_by_config() == set()
    assert len(ENVIRONMENT_VARIABLES) == len(set(ENVIRONMENT_VARIABLES))


@pytest.mark.parametrize("document", [".env.example", "README.md"])
def test_every_variable_is_documented(document: str) -> None:
    text = (Path(__file__).resolve().parents[2] / document).read_text()
    missing = [name for name in ENVIRONMENT_VARIABLES if name.isupper() and name not in text]
    assert missing == []


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("TARGET_API_URL", "https://example.openai.azure.com/openai?api-version=2024-06-01"),
        ("GATEWAY_API_KEYS", f"{GATEWAY_KEY},short"),
        ("PROMETHEUS_MULTIPROC_DIR", "/nonexistent/prometheus"),
    ],
)
def test_values_that_would_misbehave_are_refused(variable: str, value: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load(**{variable: value})
    assert variable in refused.value.message


def test_multiproc_dir_only_in_dotenv_is_refused(tmp_path: Path) -> None:
    # prometheus-client reads it from the real environment at import: .env alone is ignored.
    env_file = tmp_path / ".env"
    env_file.write_text(f"PROMETHEUS_MULTIPROC_DIR={tmp_path}\n")
    environ = {**REQUIRED, "ENV_FILE": str(env_file)}
    with pytest.raises(ConfigError) as refused:
        load_settings(environ)
    assert "PROMETHEUS_MULTIPROC_DIR" in refused.value.message
    assert load_settings({**environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)})


@pytest.mark.parametrize(
    ("variable", "value", "bound"),
    [("GUNICORN_THREADS", "16385", "16384"), ("GUNICORN_WORKERS", "65", "64")],
)
def test_thread_and_worker_counts_have_an_upper_bound(
    variable: str, value: str, bound: str
) -> None:
    # A count no machine can boot is refused with the bound, not found out by a worker
    # failing to start its threads.
    with pytest.raises(ConfigError) as raised:
        load(**{variable: value, "RATE_LIMIT_STORAGE_URI": "redis://127.0.0.1:6379"})
    assert f"{variable} must be <= {bound}" in raised.value.message
    assert load(GUNICORN_THREADS="16384").gunicorn_threads == 16384
