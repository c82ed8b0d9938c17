"""/health (liveness) and /ready (readiness): public, no upstream call."""

from __future__ import annotations

import socket
from datetime import datetime

import responses
from flask import Flask
from flask.testing import FlaskClient

from gateway.config import SERVICE_NAME, VERSION
from tests.constants import UNIT_UPSTREAM
from tests.unit.support import MakeApp, assert_openai_error


def test_health(client: FlaskClient, upstream: responses.RequestsMock) -> None:
    response = client.get("/health")

    assert response.status_code == 200
    body = response.get_json()
    assert set(body) == {"status", "service", "version", "timestamp"}
    assert body["status"] == "healthy"
    assert body["service"] == SERVICE_NAME
    assert body["version"] == VERSION
    assert datetime.fromisoformat(body["timestamp"]).utcoffset() is not None
    assert len(upstream.calls) == 0


def test_ready(client: FlaskClient) -> None:
    response = client.get("/ready")

    assert response.status_code == 200
    assert response.get_json() == {
        "status": "ready",
        "checks": {"config": "ok", "rate_limit_storage": "ok", "shutdown": "no"},
    }


def test_not_ready_while_draining(app: Flask, client: FlaskClient) -> None:
    app.extensions["gateway.draining"].set()

    response = client.get("/ready")

    assert response.status_code == 503
    body = response.get_json()
    assert body["status"] == "not_ready"
    assert body["checks"]["shutdown"] == "draining"
    assert client.get("/health").status_code == 200  # alive, just not taking new work


def test_a_storage_outage_is_reported_but_ready_stays_200(
    make_app: MakeApp, upstream: responses.RequestsMock, auth: dict[str, str]
) -> None:
    # Every replica shares one Redis: failing readiness on it would empty the Service.
    upstream.get(f"{UNIT_UPSTREAM}/models", json={"object": "list", "data": []})
    app = make_app(rate_limit_storage_uri=f"redis://127.0.0.1:{_closed_port()}/0")
    client = app.test_client()

    answered = client.get("/v1/models", headers=auth)
    ready = client.get("/ready")

    assert answered.status_code == 200  # the limit is lost, the answer is not
    assert ready.status_code == 200
    assert ready.get_json()["status"] == "ready"
    assert ready.get_json()["checks"]["rate_limit_storage"].startswith("unreachable")
    assert b"gateway_rate_limit_storage_up 0.0" in client.get("/metrics").data


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_health_check_can_be_turned_off(make_app: MakeApp) -> None:
    client = make_app(health_check_enabled=False).test_client()

    assert_openai_error(client.get("/health"), 404, "not_found")
    assert_openai_error(client.get("/ready"), 404, "not_found")
    assert client.get("/metrics").status_code == 200


def test_ready_never_waits_for_a_redis_that_never_answers(make_app: MakeApp) -> None:
    # A socket that accepts connections and never replies: the failure that hangs for the
    # kernel's TCP timeout unless the Redis client has timeouts of its own. /ready does
    # not ask the storage at all (a probe must not wait on the network).
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        app = make_app(rate_limit_storage_uri=f"redis://127.0.0.1:{port}/0")
        response = app.test_client().get("/ready")

    assert response.status_code == 200
    assert response.json["checks"]["rate_limit_storage"] == "ok"  # nothing seen failing yet
    redis = app.extensions["gateway.limiter"].storage.storage
    assert redis.connection_pool.connection_kwargs["socket_timeout"] == 1
