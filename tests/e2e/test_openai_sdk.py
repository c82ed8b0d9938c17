"""The official openai SDK against real gunicorn: it must not tell the gateway from OpenAI."""

from __future__ import annotations

import openai
import pytest

from tests.constants import GATEWAY_KEY, UPSTREAM_KEY
from tests.e2e.conftest import Gateway, GatewayFactory
from tests.fake_upstream import FakeUpstream


def sdk(gateway: Gateway, key: str = GATEWAY_KEY) -> openai.OpenAI:
    # max_retries=0: a retry would hide the status the gateway answered.
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0, timeout=30)


def test_chat_completion(gateway: Gateway, fake_upstream: FakeUpstream) -> None:
    completion = sdk(gateway).chat.completions.create(
        model="qwen-plus", messages=[{"role": "user", "content": "hi"}]
    )
    assert completion.choices[0].message.content == "Hello from the fake upstream."
    assert completion.usage is not None and completion.usage.total_tokens == 11
    received = fake_upstream.requests[-1]
    assert received.path == "/v1/chat/completions"
    assert received.headers["authorization"] == f"Bearer {UPSTREAM_KEY}"


def test_chat_stream(gateway: Gateway) -> None:
    stream = sdk(gateway).chat.completions.create(
        model="qwen-plus",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        extra_body={"fake": {"chunks": 5, "delay": 0.01}},
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == "tok0 tok1 tok2 tok3 tok4 "


def test_models_list_and_retrieve(gateway: Gateway) -> None:
    client = sdk(gateway)
    assert [m.id for m in client.models.list()] == ["qwen-plus"]
    assert client.models.retrieve("qwen-plus").id == "qwen-plus"
    with pytest.raises(openai.NotFoundError):  # answered from the same list
        client.models.retrieve("qwen-max")


def test_embeddings(gateway: Gateway) -> None:
    result = sdk(gateway).embeddings.create(
        model="text-embedding-v3", input="hello", extra_body={"fake": {"embedding_size": 16}}
    )
    assert len(result.data[0].embedding) == 16
    assert result.usage.prompt_tokens == 3


def test_completions_legacy_endpoint(gateway: Gateway) -> None:
    result = sdk(gateway).completions.create(model="qwen-plus", prompt="hi")
    assert result.model == "qwen-plus"


def test_wrong_key_is_authentication_error(gateway: Gateway) -> None:
    with pytest.raises(openai.AuthenticationError) as caught:
        sdk(gateway, key="not-a-gateway-key").models.list()
    assert caught.value.status_code == 401
    assert caught.value.code == "invalid_api_key"


def test_rate_limit_is_rate_limit_error(start_gateway: GatewayFactory) -> None:
    gateway = start_gateway(RATE_LIMIT_REQUESTS_PER_MINUTE="1")
    client = sdk(gateway)
    client.models.list()
    with pytest.raises(openai.RateLimitError) as caught:
        client.models.list()
    headers = caught.value.response.headers
    assert int(headers["retry-after"]) >= 1
    assert headers["x-ratelimit-remaining-requests"] == "0"


def test_upstream_5xx_is_relayed_untouched(gateway: Gateway) -> None:
    dashscope_error = {
        "error": {"message": "overloaded", "type": "server_error", "code": "Throttling"},
        "request_id": "ds-123",
    }
    with pytest.raises(openai.InternalServerError) as caught:
        sdk(gateway).chat.completions.create(
            model="qwen-plus",
            messages=[{"role": "user", "content": "hi"}],
            extra_body={"fake": {"status": 503, "error_body": dashscope_error}},
        )
    assert caught.value.status_code == 503
    assert caught.value.response.json() == dashscope_error


def test_upstream_4xx_is_bad_request_error(gateway: Gateway) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        sdk(gateway).chat.completions.create(
            model="qwen-plus",
            messages=[{"role": "user", "content": "hi"}],
            extra_body={"fake": {"status": 400}},
        )
    assert caught.value.response.json()["request_id"] == "fake-req-1"


def test_mid_stream_failure_raises_api_error(gateway: Gateway) -> None:
    stream = sdk(gateway).chat.completions.create(
        model="qwen-plus",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        extra_body={"fake": {"chunks": 6, "die_after": 2}},
    )
    seen: list[str] = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in stream:
            seen.append(chunk.choices[0].delta.content or "")
    assert seen == ["tok0 ", "tok1 "]
    assert "closed the stream" in caught.value.message
