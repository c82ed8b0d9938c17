"""The relay: what goes to the provider, what comes back, and how its failures are translated."""

from __future__ import annotations

import gzip

import pytest
import requests
import responses
from flask.testing import FlaskClient

from tests.constants import GATEWAY_KEY, UNIT_UPSTREAM, UPSTREAM_KEY
from tests.unit.support import MakeApp, ScriptedAnswer, assert_openai_error

CHAT = "/v1/chat/completions"
UPSTREAM_CHAT = f"{UNIT_UPSTREAM}/chat/completions"
ANSWER = {"id": "chatcmpl-1", "object": "chat.completion", "choices": []}
# A DashScope error: OpenAI's shape plus the provider's own request id.
DASHSCOPE_ERROR = (
    b'{"error":{"message":"Model not exist.","type":"invalid_request_error",'
    b'"param":null,"code":"model_not_found"},"request_id":"2f6d1e0a-8c1b-9d8e-a7b6-4c3d2e1f0a9b"}'
)


def test_upstream_gets_the_target_key_never_the_clients(
    client: FlaskClient, auth: dict[str, str], upstream: responses.RequestsMock
) -> None:
    upstream.post(UPSTREAM_CHAT, json=ANSWER)

    response = client.post(CHAT, json={"model": "qwen-plus"}, headers=auth)

    assert response.status_code == 200
    sent = upstream.calls[0].request
    assert sent.headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert all(GATEWAY_KEY not in value for value in sent.headers.values())
    assert GATEWAY_KEY.encode() not in sent.body


def test_client_identity_and_credentials_are_not_forwarded(
    client: FlaskClient, auth: dict[str, str], upstream: responses.RequestsMock
) -> None:
    upstream.post(UPSTREAM_CHAT, json=ANSWER)
    headers = {
        **auth,
        "Cookie": "session=client-cookie",
        "Host": "gateway.example",
        "x-api-key": GATEWAY_KEY,
        "api-key": GATEWAY_KEY,
        "X-Forwarded-For": "203.0.113.9",
        "OpenAI-Beta": "assistants=v2",
    }

    client.post(CHAT, json={"model": "qwen-plus"}, headers=headers)

    sent = upstream.calls[0].request.headers
    for name in ("Cookie", "Host", "x-api-key", "api-key", "X-Forwarded-For"):
        assert name not in sent
    assert sent["OpenAI-Beta"] == "assistants=v2"  # other headers do pass
    assert sent["Content-Type"] == "application/json"


def test_request_id_is_forwarded(
    client: FlaskClient, auth: dict[str, str], upstream: responses.RequestsMock
) -> None:
    upstream.post(UPSTREAM_CHAT, json=ANSWER)

    response = client.post(
        CHAT, json={"model": "qwen-plus"}, headers={**auth, "X-Request-ID": "client-req-42"}
    )

    assert upstream.calls[0].request.headers["X-Request-ID"] == "client-req-42"
    assert response.headers["X-Request-ID"] == "client-req-42"


def test_body_reaches_the_upstream_byte_identical(
    client: FlaskClient, auth: dict[str, str], upstream: responses.RequestsMock
) -> None:
    upstream.post(UPSTREAM_CHAT, json=ANSWER)
    body = (
        b'{ "temperature" : 0.70,\n\t"model":"qwen-plus" ,"messages":[{"content":'
        b'"h\\u00e9llo  w\xc3\xb6rld","role":"user"}],  "extra_body": {"enable_search":true} }\n'
    )

    client.post(CHAT, data=body, headers=auth, content_type="application/json")

    assert upstream.calls[0].request.body == body


def test_upstream_response_headers_are_filtered(
    client: FlaskClient, auth: dict[str, str], upstream: responses.RequestsMock
) -> None:
    upstream.post(
        UPSTREAM_CHAT,
        body=b'{"id": "chatcmpl-1"}',
        content_type="application/json; charset=utf-8",
        headers={
            "Set-Cookie": "acw_tc=provider-cookie; path=/",
            "x-ratelimit-limit-requests": "99999",
            "x-ratelimit-remaining-tokens": "12345",
            "Connection": "keep-alive",
            "Keep-Alive": "timeout=5",
            "Upgrade": "h2c",
            "Trailer": "Expires",
            "Server": "istio-envoy",
            "Access-Control-Allow-Origin": "https://provider.example",
            "openai-processing-ms": "321",
        },
    )

    browser = {**auth, "Origin": "https://app.example"}
    response = client.post(CHAT, json={"model": "qwen-plus"}, headers=browser)

    headers = response.headers
    assert headers["Content-Type"] == "application/json; charset=utf-8"
    assert headers["openai-processing-ms"] == "321"
    for name in ("Set-Cookie", "x-ratelimit-remaining-tokens", "Keep-Alive", "Upgrade"):
        assert name not in headers
    assert "Trailer" not in headers
    assert headers.get("Server") != "istio-envoy"
    assert headers.get("Connection") != "keep-alive"
    assert headers["Access-Control-Allow-Origin"] == "https://app.example"  # ours
    assert headers["x-ratelimit-limit-requests"] == "1000"  # ours, not the provider's


def test_compressed_upstream_body_is_relayed_decoded(
    client: FlaskClient, auth: dict[str, str], upstream: responses.RequestsMock
) -> None:
    plain = b'{"id": "chatcmpl-1", "choices": []}'
    upstream.post(
        UPSTREAM_CHAT,
        body=gzip.compress(plain),
        content_type="application/json",
        headers={"Content-Encoding": "gzip"},
    )

    response = client.post(CHAT, json={"model": "qwen-plus"}, headers=auth)

    assert response.data == plain
    assert "Content-Encoding" not in response.headers
    assert response.headers["Content-Length"] == str(len(plain))
    assert "gzip" in upstream.calls[0].request.headers["Accept-Encoding"]


# 401/403 are the gateway's own key refused: test_provider_failures.
@pytest.mark.parametrize("status", [400, 404, 422, 429, 500, 503])
def test_upstream_errors_are_relayed_untouched(
    client: FlaskClient, auth: dict[str, str], upstream: responses.RequestsMock, status: int
) -> None:
    upstream.post(
        UPSTREAM_CHAT, status=status, body=DASHSCOPE_ERROR, content_type="application/json"
    )

    response = client.post(CHAT, json={"model": "qwen-nope"}, headers=auth)

    assert response.status_code == status
    assert response.data == DASHSCOPE_ERROR
    assert response.mimetype == "application/json"


def test_unreachable_upstream_is_502(
    make_app: MakeApp, auth: dict[str, str], upstream: responses.RequestsMock
) -> None:
    # What urllib3 says through a proxy: the proxy URL, credentials and all.
    proxy = "http://corp-user:proxy-pass-77aa@proxy.internal:3128"
    failure = requests.ConnectionError(
        f"HTTPConnectionPool(host='upstream.test', port=80): Max retries exceeded "
        f"(Caused by ProxyError('Unable to connect to proxy {proxy}', "
        f"'Authorization: Bearer {UPSTREAM_KEY}'))"
    )
    upstream.post(UPSTREAM_CHAT, body=failure)
    client = make_app(upstream_proxies={"http": proxy}).test_client()

    response = client.post(CHAT, json={"model": "qwen-plus"}, headers=auth)

    error = assert_openai_error(response, 502, "upstream_unavailable")
    assert error["type"] == "server_error"
    text = response.get_data(as_text=True)
    for leak in (UPSTREAM_KEY, GATEWAY_KEY, "proxy-pass-77aa", "proxy.internal", "upstream.test"):
        assert leak not in text


@pytest.mark.parametrize(
    ("failure", "seconds"),
    [
        (requests.ConnectTimeout("connect timed out"), "1 s"),
        (requests.ReadTimeout("read timed out"), "2 s"),
        (requests.Timeout("timed out"), "2 s"),
    ],
)
def test_upstream_timeout_is_504(
    client: FlaskClient,
    auth: dict[str, str],
    upstream: responses.RequestsMock,
    failure: Exception,
    seconds: str,
) -> None:
    upstream.post(UPSTREAM_CHAT, body=failure)

    response = client.post(CHAT, json={"model": "qwen-plus"}, headers=auth)

    error = assert_openai_error(response, 504, "upstream_timeout")
    assert seconds in error["message"]  # the timeout that fired (connect 1 s, read 2 s)
    assert UPSTREAM_KEY not in error["message"]
    assert "upstream.test" not in error["message"]


def test_upstream_stalling_mid_body_is_504(
    client: FlaskClient, auth: dict[str, str], upstream: responses.RequestsMock
) -> None:
    upstream.add(
        ScriptedAnswer(
            "POST",
            UPSTREAM_CHAT,
            [b'{"id": "chatcmpl-1", '],
            TimeoutError("timed out"),
            content_type="application/json",
        )
    )

    response = client.post(CHAT, json={"model": "qwen-plus"}, headers=auth)

    assert_openai_error(response, 504, "upstream_timeout")


def test_upstream_dropping_mid_body_is_502(
    client: FlaskClient, auth: dict[str, str], upstream: responses.RequestsMock
) -> None:
    upstream.add(
        ScriptedAnswer(
            "POST",
            UPSTREAM_CHAT,
            [b'{"id": "chatcmpl-1", '],
            ConnectionResetError("connection reset by peer"),
            content_type="application/json",
        )
    )

    response = client.post(CHAT, json={"model": "qwen-plus"}, headers=auth)

    assert_openai_error(response, 502)
    assert b"chatcmpl-1" not in response.data


@pytest.mark.parametrize("path", ["/completions", "/embeddings"])
def test_completions_and_embeddings_are_relayed(
    client: FlaskClient, auth: dict[str, str], upstream: responses.RequestsMock, path: str
) -> None:
    answer = b'{"object":"list","usage":{"prompt_tokens":3,"total_tokens":3}}'
    upstream.post(f"{UNIT_UPSTREAM}{path}", body=answer, content_type="application/json")
    body = b'{"model":"text-embedding-v3","input":"hello"}'

    response = client.post(f"/v1{path}", data=body, headers=auth, content_type="application/json")

    assert response.status_code == 200
    assert response.data == answer
    sent = upstream.calls[0].request
    assert sent.url == f"{UNIT_UPSTREAM}{path}"
    assert sent.body == body


def test_an_answer_declared_longer_than_the_cap_is_a_502_before_any_byte(
    make_app: MakeApp, auth: dict[str, str], upstream: responses.RequestsMock
) -> None:
    upstream.post(UPSTREAM_CHAT, body=b"x" * 2048, content_type="application/json")
    client = make_app(max_response_body_bytes=1024).test_client()

    response = client.post(CHAT, json={"model": "qwen-plus"}, headers=auth)

    assert_openai_error(response, 502, "upstream_unavailable")


def test_a_long_answer_is_relayed_whole_as_it_arrives(
    client: FlaskClient, auth: dict[str, str], upstream: responses.RequestsMock
) -> None:
    long = b'{"data": "' + b"e" * (3 * 1024 * 1024) + b'", "usage": {"prompt_tokens": 3}}'
    upstream.post(UPSTREAM_CHAT, body=long, content_type="application/json")

    response = client.post(CHAT, json={"model": "qwen-plus"}, headers=auth)

    assert response.is_streamed  # not read whole into memory first
    assert response.data == long
    assert "Content-Length" not in response.headers  # it may change: secrets are masked


def test_an_echoed_provider_key_is_masked_in_a_relayed_error(
    client: FlaskClient, auth: dict[str, str], upstream: responses.RequestsMock
) -> None:
    echo = f'{{"error": {{"message": "Invalid key Bearer {UPSTREAM_KEY}"}}}}'
    upstream.post(UPSTREAM_CHAT, status=400, body=echo, content_type="application/json")

    response = client.post(CHAT, json={"model": "qwen-plus"}, headers=auth)

    assert response.status_code == 400
    assert UPSTREAM_KEY.encode() not in response.data
    assert response.json["error"]["message"] == "Invalid key Bearer sk-...5f4e"


@pytest.mark.parametrize("coding", ["br", "compress", "gzip, zstd-unknown"])
def test_an_answer_in_a_coding_the_gateway_cannot_decode_is_a_502(
    client: FlaskClient, auth: dict[str, str], upstream: responses.RequestsMock, coding: str
) -> None:
    upstream.post(UPSTREAM_CHAT, body=b"\x1f\x8b opaque", headers={"Content-Encoding": coding})

    response = client.post(CHAT, json={"model": "qwen-plus"}, headers=auth)

    assert_openai_error(response, 502, "upstream_unavailable")
