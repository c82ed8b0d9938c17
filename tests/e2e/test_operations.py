"""What operators rely on: start-up errors, logs without secrets, request ids, metrics, 5xx."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import orjson
import requests

from tests.constants import GATEWAY_KEY, SECOND_GATEWAY_KEY, UPSTREAM_KEY
from tests.e2e.conftest import REPO, START_COMMAND, Gateway, GatewayFactory, base_env, free_port
from tests.fake_upstream import FakeUpstream

SECRETS = (GATEWAY_KEY, SECOND_GATEWAY_KEY, UPSTREAM_KEY)


def run_start_command(command: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    full_env = base_env(**{"PORT": str(free_port()), **env})
    for name in [k for k, v in env.items() if v == "<unset>"]:
        del full_env[name]
    return subprocess.run(
        command, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=60, check=False
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], variable: str) -> None:
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert variable in lines[0]
    assert "Traceback" not in result.stderr + result.stdout


def test_missing_target_key_stops_gunicorn_with_one_line() -> None:
    result = run_start_command(START_COMMAND, TARGET_API_KEY="<unset>")
    assert_one_line_error(result, "TARGET_API_KEY")


def test_malformed_port_stops_gunicorn_with_one_line() -> None:
    result = run_start_command(START_COMMAND, PORT="eighty")
    assert_one_line_error(result, "PORT")


def test_a_provider_key_that_cannot_be_sent_stops_gunicorn_with_one_line() -> None:
    # A curly quote pasted from a document: every request would have failed with a 400.
    pasted = UPSTREAM_KEY + "\u201d"
    result = run_start_command(START_COMMAND, TARGET_API_KEY=pasted)
    assert_one_line_error(result, "TARGET_API_KEY")
    assert "U+201D" in result.stderr
    assert UPSTREAM_KEY not in result.stderr + result.stdout


def test_missing_gateway_keys_stops_the_dev_server_with_one_line() -> None:
    result = run_start_command([sys.executable, "app.py"], GATEWAY_API_KEYS="<unset>")
    assert_one_line_error(result, "GATEWAY_API_KEYS")


def test_request_id_is_echoed_forwarded_and_logged(
    gateway: Gateway, auth: dict[str, str], fake_upstream: FakeUpstream
) -> None:
    headers = {**auth, "X-Request-ID": "trace-abc-123"}
    body = {"model": "qwen-plus", "messages": []}
    url = gateway.url + "/v1/chat/completions"
    response = requests.post(url, json=body, headers=headers, timeout=10)
    assert response.headers["X-Request-ID"] == "trace-abc-123"
    assert fake_upstream.requests[-1].headers["x-request-id"] == "trace-abc-123"
    # The access line is written once the response is sent: wait for it, bounded.
    deadline = time.monotonic() + 10
    access: list[dict] = []
    while not access and time.monotonic() < deadline:
        access = [e for e in log_entries(gateway) if e.get("request_id") == "trace-abc-123"]
        time.sleep(0.05)
    assert access and access[-1]["upstream_request_id"].startswith("upstream-")


def test_access_lines_and_no_secret_in_any_log_line(
    start_gateway: GatewayFactory, auth: dict[str, str]
) -> None:
    gateway = start_gateway(LOG_LEVEL="TRACE", RATE_LIMIT_REQUESTS_PER_MINUTE="5")
    # The client does not ask for usage: the gateway does, and logs it.
    body = {"model": "qwen-plus", "messages": [], "stream": True}
    requests.post(gateway.url + "/v1/chat/completions", json=body, headers=auth, timeout=10)
    wrong = {"Authorization": f"Bearer {GATEWAY_KEY}x"}
    requests.get(gateway.url + "/v1/models", headers=wrong, timeout=10)
    error = {"model": "qwen-plus", "fake": {"status": 500}}
    requests.post(gateway.url + "/v1/chat/completions", json=error, headers=auth, timeout=10)
    for _ in range(5):
        requests.get(gateway.url + "/v1/models", headers=auth, timeout=10)
    gateway.stop()
    text = gateway.logs()
    for secret in SECRETS:
        assert secret not in text
    entries = log_entries(gateway)  # every line is one JSON object
    access = [e for e in entries if e.get("event") == "access"]
    statuses = sorted(e["status"] for e in access if e["path"] != "/health")
    assert statuses == [200, 200, 200, 200, 401, 429, 429, 500]
    stream = next(e for e in access if e["stream"])
    assert stream["usage"] == {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}
    assert stream["ttfb_ms"] >= 0 and stream["model"] == "qwen-plus"
    assert stream["key_id"].startswith("key_") and stream["upstream_status"] == 200


def test_unreachable_upstream_is_502(start_gateway: GatewayFactory, auth: dict[str, str]) -> None:
    gateway = start_gateway(TARGET_API_URL=f"http://127.0.0.1:{free_port()}/v1")
    body = {"model": "qwen-plus", "messages": []}
    url = gateway.url + "/v1/chat/completions"
    response = requests.post(url, json=body, headers=auth, timeout=10)
    assert response.status_code == 502
    assert response.json()["error"]["code"] == "upstream_unavailable"


def test_slow_upstream_is_504(start_gateway: GatewayFactory, auth: dict[str, str]) -> None:
    gateway = start_gateway(UPSTREAM_READ_TIMEOUT="0.5")
    body = {"model": "qwen-plus", "fake": {"sleep_before": 3}}
    response = requests.post(
        gateway.url + "/v1/chat/completions", json=body, headers=auth, timeout=10
    )
    assert response.status_code == 504
    assert response.json()["error"]["type"] == "server_error"


def test_oversized_body_is_413_also_when_chunked(
    start_gateway: GatewayFactory, auth: dict[str, str]
) -> None:
    gateway = start_gateway(MAX_REQUEST_BODY_BYTES="1000")
    big = orjson.dumps({"model": "qwen-plus", "messages": [{"content": "x" * 5000}]})
    url = gateway.url + "/v1/chat/completions"
    response = requests.post(url, data=big, headers=auth, timeout=10)
    assert response.status_code == 413
    chunked = requests.post(url, data=iter([big[:3000], big[3000:]]), headers=auth, timeout=10)
    assert chunked.status_code == 413
    assert chunked.json()["error"]["code"] == "request_too_large"


def test_metrics_count_requests_and_streams(gateway: Gateway, auth: dict[str, str]) -> None:
    body = {"model": "qwen-plus", "messages": [], "stream": True}
    requests.post(gateway.url + "/v1/chat/completions", json=body, headers=auth, timeout=10)
    text = requests.get(gateway.url + "/metrics", timeout=10).text
    # Without GATEWAY_CONFIG every model goes to the "default" provider through "*".
    counted = (
        'gateway_requests_total{method="POST",model="other",provider="default",'
        'route="/v1/chat/completions",status="200"}'
    )
    assert counted in text
    assert "gateway_stream_ttfb_seconds_count" in text
    assert "gateway_streams_in_flight 0.0" in text


def test_readme_quick_start_uses_the_tested_start_command() -> None:
    readme = (REPO / "README.md").read_text()
    assert " ".join(START_COMMAND) in readme
    assert "make test" in readme and "make run" in readme


def log_entries(gateway: Gateway) -> list[dict]:
    return [orjson.loads(line) for line in gateway.logs().splitlines() if line.strip()]


def test_requests_gunicorn_rejects_get_openai_shaped_errors(gateway: Gateway) -> None:
    huge = requests.get(gateway.url + "/health", headers={"X-Big": "a" * 9000}, timeout=10)
    assert huge.status_code == 431
    assert huge.json()["error"]["type"] == "invalid_request_error"

    with socket.create_connection(("127.0.0.1", int(gateway.url.rsplit(":", 1)[1])), 10) as raw:
        raw.sendall(b"GARBAGE\r\n\r\n")
        answer = b""
        while chunk := raw.recv(4096):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b"application/json" in head
    assert orjson.loads(body)["error"]["message"]


def test_gunicorns_own_rejections_carry_their_statuss_reason_phrase(gateway: Gateway) -> None:
    # gunicorn answers an unsupported transfer coding with 501 but says "Bad Request".
    port = int(gateway.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), 10) as raw:
        raw.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: br\r\n\r\n"
        )
        answer = b""
        while chunk := raw.recv(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 501 Not Implemented\r\n"), answer[:100]
    assert orjson.loads(answer.partition(b"\r\n\r\n")[2])["error"]["message"]
