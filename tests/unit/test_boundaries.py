"""What a gateway key must not be able to do with the provider key behind it."""

from __future__ import annotations

import pytest
import responses
from flask.testing import FlaskClient

from tests.constants import UNIT_UPSTREAM
from tests.unit.support import assert_openai_error

CHAT = "/v1/chat/completions"
UPSTREAM_CHAT = f"{UNIT_UPSTREAM}/chat/completions"
BODY = {"model": "qwen-plus", "messages": []}


@pytest.mark.parametrize(
    "model_path", ["%2e%2e/%2e%2e/dashboard/api/keys", "../files", "a//b", "./x", "qwen/.."]
)
def test_model_ids_cannot_walk_to_other_upstream_routes(
    client: FlaskClient,
    auth: dict[str, str],
    upstream: responses.RequestsMock,
    model_path: str,
) -> None:
    upstream.get(f"{UNIT_UPSTREAM}/models", json={"data": [{"id": "qwen-plus"}]})

    response = client.get(f"/v1/models/{model_path}", headers=auth)

    assert_openai_error(response, 404)
    assert response.json["error"]["code"] == "model_not_found"
    # Answered from the model list: the id never becomes part of an upstream path.
    assert [call.request.url for call in upstream.calls] == [f"{UNIT_UPSTREAM}/models"]


def test_model_id_with_a_slash_is_found(
    client: FlaskClient, auth: dict[str, str], upstream: responses.RequestsMock
) -> None:
    upstream.get(f"{UNIT_UPSTREAM}/models", json={"data": [{"id": "Qwen/Qwen2.5-7B-Instruct"}]})

    response = client.get("/v1/models/Qwen/Qwen2.5-7B-Instruct", headers=auth)

    assert response.status_code == 200
    assert response.json["id"] == "Qwen/Qwen2.5-7B-Instruct"


@pytest.mark.parametrize(
    "header",
    ["OpenAI-Organization", "OpenAI-Project", "X-DashScope-WorkSpace", "X-HTTP-Method-Override"],
)
def test_headers_that_steer_the_provider_account_are_not_forwarded(
    client: FlaskClient, auth: dict[str, str], upstream: responses.RequestsMock, header: str
) -> None:
    upstream.post(UPSTREAM_CHAT, json={"id": "c"})

    client.post(CHAT, json=BODY, headers={**auth, header: "someone-elses"})

    assert header not in upstream.calls[0].request.headers


def test_sdk_headers_are_forwarded(
    client: FlaskClient, auth: dict[str, str], upstream: responses.RequestsMock
) -> None:
    upstream.post(UPSTREAM_CHAT, json={"id": "c"})
    sdk = {"User-Agent": "OpenAI/Python 3.51.0", "X-Stainless-Lang": "python"}

    client.post(CHAT, json=BODY, headers={**auth, **sdk})

    sent = upstream.calls[0].request.headers
    assert sent["User-Agent"] == "OpenAI/Python 3.51.0"
    assert sent["X-Stainless-Lang"] == "python"


def test_headers_named_in_the_upstream_connection_header_are_dropped(
    client: FlaskClient, auth: dict[str, str], upstream: responses.RequestsMock
) -> None:
    upstream.post(
        UPSTREAM_CHAT,
        json={"id": "c"},
        headers={"Connection": "X-Internal", "X-Internal": "upstream-secret", "X-Kept": "1"},
    )

    response = client.post(CHAT, json=BODY, headers=auth)

    assert "X-Internal" not in response.headers
    assert response.headers["X-Kept"] == "1"


def test_upstream_redirect_is_a_502_not_relayed(
    client: FlaskClient, auth: dict[str, str], upstream: responses.RequestsMock
) -> None:
    upstream.post(UPSTREAM_CHAT, status=302, headers={"Location": "http://evil.example/steal"})

    response = client.post(CHAT, json=BODY, headers=auth)

    assert_openai_error(response, 502)
    assert "Location" not in response.headers


def test_client_query_string_is_forwarded(
    client: FlaskClient, auth: dict[str, str], upstream: responses.RequestsMock
) -> None:
    upstream.post(f"{UPSTREAM_CHAT}?api-version=2", json={"id": "c"})

    client.post(f"{CHAT}?api-version=2", json=BODY, headers=auth)

    assert upstream.calls[0].request.url == f"{UPSTREAM_CHAT}?api-version=2"


def test_double_slash_is_an_openai_404_not_a_redirect(
    client: FlaskClient, auth: dict[str, str]
) -> None:
    assert_openai_error(client.post("/v1//chat/completions", json=BODY, headers=auth), 404)


def test_invented_methods_share_one_metric_label(client: FlaskClient) -> None:
    for method in ("ZZ1", "ZZ2", "ZZ3"):
        client.open("/anything", method=method).close()

    metrics = client.get("/metrics").text
    assert 'method="OTHER"' in metrics
    assert "ZZ1" not in metrics
