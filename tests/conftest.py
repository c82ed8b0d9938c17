"""Unit-tier fixtures, as in Flask's tutorial: settings, app and client per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import responses
from flask import Flask
from flask.testing import FlaskClient

from gateway import create_app
from gateway.config import Settings
from tests.constants import GATEWAY_KEY, SECOND_GATEWAY_KEY, UNIT_UPSTREAM, UPSTREAM_KEY


@pytest.fixture
def settings() -> Settings:
    return Settings(
        target_api_key=UPSTREAM_KEY,
        gateway_api_keys=(GATEWAY_KEY, SECOND_GATEWAY_KEY),
        target_api_url=UNIT_UPSTREAM,
        rate_limit_per_minute=1000,
        upstream_connect_timeout=1,
        upstream_read_timeout=2,
    )


@pytest.fixture
def app(settings: Settings) -> Iterator[Flask]:
    app = create_app(settings)
    yield app
    app.extensions["gateway.upstream"].close()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {GATEWAY_KEY}"}


@pytest.fixture
def upstream() -> Iterator[responses.RequestsMock]:
    """Scripts the provider: every call the gateway makes must be expected by the test."""
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        yield mock
