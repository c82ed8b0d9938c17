"""Unit-tier helpers on top of tests/conftest.py: apps built from variations of `settings`."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask

from gateway import create_app
from gateway.config import Settings
from tests.unit.support import MakeApp


@pytest.fixture
def make_app(settings: Settings) -> Iterator[MakeApp]:
    """`make_app(rate_limit_per_minute=2)`: an app whose settings differ from `settings`."""
    built: list[Flask] = []

    def make(**changes: Any) -> Flask:
        app = create_app(dataclasses.replace(settings, **changes))
        built.append(app)
        return app

    yield make
    for app in built:
        app.extensions["gateway.upstream"].close()
