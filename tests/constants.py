"""Keys used by every tier. They look like real keys so a leak into a log would be caught."""

GATEWAY_KEY = "gw-test-key-7f3a9c1e5b2d4f6a"
SECOND_GATEWAY_KEY = "gw-test-key-second-0c4e8a2f"
UPSTREAM_KEY = "sk-upstream-secret-9d8c7b6a5f4e"
UNIT_UPSTREAM = "http://upstream.test/v1"
