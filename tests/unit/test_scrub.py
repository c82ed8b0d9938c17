"""Masking the gateway's secrets in what a provider sends back, across piece boundaries."""

from __future__ import annotations

import pytest

from gateway.secrets import mask
from gateway.upstream.scrub import Scrubber, SecretMask
from tests.constants import UPSTREAM_KEY

KEY = UPSTREAM_KEY.encode()
MASKED = mask(UPSTREAM_KEY).encode()


def scrubbed(pieces: list[bytes]) -> tuple[bytes, list[bytes]]:
    scrubber = Scrubber(SecretMask((UPSTREAM_KEY,)))
    out = [scrubber.feed(piece) for piece in pieces]
    out.append(scrubber.flush())
    return b"".join(out), out


def test_the_mask_names_the_key_without_giving_it_away() -> None:
    assert MASKED == b"sk-...5f4e"
    assert mask("short-but-8") == "..."  # too short to show any of it


@pytest.mark.parametrize("split", range(1, len(KEY)))
def test_a_key_split_across_two_pieces_is_masked(split: int) -> None:
    body, _ = scrubbed([b"Invalid key Bearer " + KEY[:split], KEY[split:] + b" given"])
    assert body == b"Invalid key Bearer " + MASKED + b" given"


def test_a_key_split_over_many_pieces_is_masked() -> None:
    body, _ = scrubbed([b"x", *(bytes([b]) for b in KEY), b"y"])
    assert body == b"x" + MASKED + b"y"


def test_json_escaped_spellings_are_masked_too() -> None:
    secrets = SecretMask(('sk-with/slash"quote-0123456789',))
    assert secrets.whole(b'{"m": "sk-with\\/slash\\"quote-0123456789"}') == b'{"m": "sk-...6789"}'
    assert secrets.whole(b'{"m": "sk-with/slash\\"quote-0123456789"}') == b'{"m": "sk-...6789"}'


def test_sse_events_pass_at_once_and_whole() -> None:
    events = [b'data: {"delta": "sk"}\n\n', b"data: [DONE]\n\n"]
    body, out = scrubbed(events)
    assert out[:2] == events  # nothing held back: an event ends with a blank line
    assert body == b"".join(events)


def test_bytes_that_only_look_like_a_key_start_are_released_at_the_end() -> None:
    body, out = scrubbed([b"ends with sk-upstream"])
    assert out[0] == b"ends with "  # could be the start of the key: held
    assert body == b"ends with sk-upstream"


def test_header_values_are_masked() -> None:
    assert SecretMask((UPSTREAM_KEY,)).text(f"Bearer {UPSTREAM_KEY}") == "Bearer sk-...5f4e"


def test_a_short_secret_is_not_masked_in_answers() -> None:
    # A proxy password like "42" would turn every "prompt_tokens": 42 into invalid JSON.
    secrets = SecretMask(("42", UPSTREAM_KEY))
    assert secrets.whole(b'{"prompt_tokens": 42}') == b'{"prompt_tokens": 42}'
    assert secrets.whole(KEY) == MASKED


def test_a_percent_encoded_proxy_password_is_masked_as_the_proxy_sees_it() -> None:
    from dataclasses import replace
    from types import MappingProxyType

    from gateway.config import Settings
    from tests.constants import GATEWAY_KEY

    proxy = "http://user:long%40password-0123@proxy.internal:3128"
    settings = Settings(
        target_api_key=UPSTREAM_KEY,
        gateway_api_keys=(GATEWAY_KEY,),
    )
    settings = replace(settings, upstream_proxies=MappingProxyType({"https": proxy}))
    assert "long@password-0123" in settings.upstream_secrets
    assert "long@password-0123" in settings.secrets  # and redacted from logs
