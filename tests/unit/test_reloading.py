"""What the reload's log line says: which settings changed, never a value."""

from __future__ import annotations

import dataclasses

from gateway.config import Settings
from gateway.server.reloading import describe_changes
from tests.constants import GATEWAY_KEY, SECOND_GATEWAY_KEY, UPSTREAM_KEY

ROTATED_KEY = "gw-test-key-rotated-5e1d9b7c"


def test_rotated_keys_are_counted_and_never_shown(settings: Settings) -> None:
    rotated = dataclasses.replace(
        settings,
        gateway_api_keys=(GATEWAY_KEY, ROTATED_KEY),
        target_api_key=UPSTREAM_KEY + "-new",
        rate_limit_per_minute=5,
    )
    line = describe_changes(settings, rotated)
    assert line == (
        "3 settings changed: target_api_key, gateway_api_keys (1 added, 1 removed), "
        "rate_limit_per_minute"
    )
    for secret in (GATEWAY_KEY, SECOND_GATEWAY_KEY, ROTATED_KEY, UPSTREAM_KEY):
        assert secret not in line


def test_an_unchanged_configuration_says_so(settings: Settings) -> None:
    assert describe_changes(settings, dataclasses.replace(settings)) == "no setting changed"
