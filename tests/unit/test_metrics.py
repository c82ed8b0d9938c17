"""/metrics: Prometheus text, counting requests, upstream failures and tokens."""

from __future__ import annotations

import requests
import responses
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families

from gateway.auth import key_id
from tests.constants import GATEWAY_KEY, UNIT_UPSTREAM

CHAT = "/v1/chat/completions"
UPSTREAM_CHAT = f"{UNIT_UPSTREAM}/chat/completions"


def _scrape(client: FlaskClient) -> dict[tuple[str, frozenset], float]:
    """Every sample of /metrics, keyed by name and labels."""
    response = client.get("/metrics")
    assert response.status_code == 200
    families = text_string_to_metric_families(response.get_data(as_text=True))
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in families
        for sample in family.samples
    }


def _requests(
    route: str, method: str, status: int, provider: str = "none", model: str = "none"
) -> tuple[str, frozenset]:
    labels = {
        "route": route,
        "method": method,
        "status": str(status),
        "provider": provider,
        "model": model,
    }
    return ("gateway_requests_total", frozenset(labels.items()))


def test_metrics_is_prometheus_text(client: FlaskClient) -> None:
    response = client.get("/metrics")

    assert response.status_code == 200
    assert response.mimetype == "text/plain"
    assert "version=" in response.headers["Content-Type"]
    text = response.get_data(as_text=True)
    assert "# TYPE gateway_requests_total counter" in text
    assert "# TYPE gateway_request_duration_seconds histogram" in text
    assert "gateway_streams_in_flight 0.0" in text


def test_requests_are_counted_by_route_and_status(
    client: FlaskClient, auth: dict[str, str], upstream: responses.RequestsMock
) -> None:
    upstream.get(f"{UNIT_UPSTREAM}/models", json={"data": []})
    for response in (
        client.get("/v1/models", headers=auth),
        client.get("/v1/models", headers=auth),
        client.get("/v1/models"),
        client.get("/nope"),
        client.get("/health"),
    ):
        response.close()

    samples = _scrape(client)

    assert samples[_requests("/v1/models", "GET", 200)] == 2
    assert samples[_requests("/v1/models", "GET", 401)] == 1
    assert samples[_requests("unmatched", "GET", 404)] == 1
    assert samples[_requests("/health", "GET", 200)] == 1
    labels = {"route": "/v1/models", "provider": "none", "model": "none"}
    latency = ("gateway_request_duration_seconds_count", frozenset(labels.items()))
    assert samples[latency] == 3


def test_upstream_errors_are_counted_by_kind(
    client: FlaskClient, auth: dict[str, str], upstream: responses.RequestsMock
) -> None:
    upstream.post(UPSTREAM_CHAT, body=requests.ConnectionError("refused"))
    client.post(CHAT, json={"model": "qwen-plus"}, headers=auth).close()
    upstream.replace(responses.POST, UPSTREAM_CHAT, body=requests.ReadTimeout("slow"))
    client.post(CHAT, json={"model": "qwen-plus"}, headers=auth).close()

    samples = _scrape(client)

    # The default route is "*": a model that is not a configured name is "other".
    assert samples[_requests(CHAT, "POST", 502, "default", "other")] == 1
    assert samples[_requests(CHAT, "POST", 504, "default", "other")] == 1
    for kind in ("connect", "timeout"):
        labels = {"kind": kind, "provider": "default", "model": "other"}
        assert samples[("gateway_upstream_errors_total", frozenset(labels.items()))] == 1


def test_tokens_reported_by_the_upstream_are_counted(
    client: FlaskClient, auth: dict[str, str], upstream: responses.RequestsMock
) -> None:
    usage = {"prompt_tokens": 12, "completion_tokens": 30, "total_tokens": 42}
    upstream.post(UPSTREAM_CHAT, json={"id": "c1", "usage": usage})
    for _ in range(2):
        client.post(CHAT, json={"model": "qwen-plus"}, headers=auth).close()

    samples = _scrape(client)

    # "*" routes every model in these settings: the model label is "other".
    labels = {("key", key_id(GATEWAY_KEY)), ("model", "other"), ("provider", "default")}
    prompt = frozenset({("kind", "prompt"), *labels})
    assert samples[("gateway_tokens_total", prompt)] == 24
    assert samples[("gateway_tokens_total", frozenset({("kind", "completion"), *labels}))] == 60
    requests = frozenset({("status", "200"), *labels})
    assert samples[("gateway_key_requests_total", requests)] == 2


def test_finished_stream_is_no_longer_in_flight(
    client: FlaskClient, auth: dict[str, str], upstream: responses.RequestsMock
) -> None:
    upstream.post(UPSTREAM_CHAT, body=b"data: [DONE]\n\n", content_type="text/event-stream")
    response = client.post(CHAT, json={"model": "qwen-plus", "stream": True}, headers=auth)
    response.get_data()

    in_flight = ("gateway_streams_in_flight", frozenset())
    assert _scrape(client)[in_flight] == 1
    response.close()
    assert _scrape(client)[in_flight] == 0
    ttfb = frozenset({("provider", "default"), ("model", "other")})
    assert _scrape(client)[("gateway_stream_ttfb_seconds_count", ttfb)] == 1
