"""The gateway in front of a real provider nobody on the team wrote: llama.cpp's llama-server.

One llama-server (a 270M model: nonsense words, real protocol framing) serves the module
under two providers: `llama-native` gets Messages and Responses relayed as sent,
`llama-chat` gets them translated to Chat Completions. The official `anthropic` and `openai`
SDKs must parse what comes back either way, and the gateway's access log must carry the
provider's own usage. llama-server is started with an API key, so a request that reached it
with anything but the provider's key would fail with 401.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
import requests

from tests import llama_server
from tests.constants import GATEWAY_KEY
from tests.e2e.conftest import Gateway, GatewayFactory
from tests.llama_server import MODEL_ALIAS, LlamaServer

# The first test's setup may pip-install llama-server and the model (seconds from
# ../shared/wheels, up to INSTALL_TIMEOUT on a slow network).
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(llama_server.INSTALL_TIMEOUT + 120)]

LLAMA_KEY = "sk-llama-provider-e2e-4c5d6e7f8a9b"
# Public names -> the two providers; every route rewrites the model to llama's alias.
CLAUDE = {"native": "claude-native", "bridged": "claude-bridged"}
GPT = {"native": "gpt-native", "bridged": "gpt-bridged"}
LEGS = ["native", "bridged"]
# llama-server is started so that the model ends its turn after a few tokens (see
# tests/llama_server.py): ENOUGH lets it, CUT stops it first. ~50 tokens a second.
ENOUGH = 16
CUT = 2
PROMPT = "Name three colours."


def config(llama_url: str) -> str:
    return f"""
providers:
  llama-native:
    base_url: {llama_url}/v1
    api_key_env: LLAMA_KEY
    native: [messages, responses]
  llama-chat:
    base_url: {llama_url}/v1
    api_key_env: LLAMA_KEY
    native: []
models:
  {CLAUDE["native"]}: {{provider: llama-native, model: {MODEL_ALIAS}}}
  {CLAUDE["bridged"]}: {{provider: llama-chat, model: {MODEL_ALIAS}}}
  {GPT["native"]}: {{provider: llama-native, model: {MODEL_ALIAS}}}
  {GPT["bridged"]}: {{provider: llama-chat, model: {MODEL_ALIAS}}}
"""


@pytest.fixture(scope="session")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LlamaServer]:
    try:
        llama_server.ensure_installed()
    except llama_server.NotInstalledError as exc:
        pytest.skip(str(exc))
    log = tmp_path_factory.mktemp("llama") / "llama-server.log"
    server = llama_server.start(log, LLAMA_KEY)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory, llama: LlamaServer) -> Iterator[Gateway]:
    factory = GatewayFactory(Path(tmp_path_factory.mktemp("real-provider")), llama.url + "/v1")
    yield factory(
        config(llama.url),
        LLAMA_KEY=LLAMA_KEY,
        TARGET_API_KEY=LLAMA_KEY,
        RATE_LIMIT_REQUESTS_PER_MINUTE="0",
    )
    factory.stop_all()


def claude(gateway: Gateway) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gateway.url, api_key=GATEWAY_KEY, max_retries=0, timeout=60)


def gpt(gateway: Gateway) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=gateway.url + "/v1", api_key=GATEWAY_KEY, max_retries=0, timeout=60
    )


def ask(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


def tagged() -> tuple[str, dict[str, str]]:
    request_id = uuid.uuid4().hex
    return request_id, {"X-Request-ID": request_id}


def assert_provider_usage(gateway: Gateway, request_id: str, path: str) -> dict[str, Any]:
    """The request was answered by llama and billed with the usage llama reported."""
    line = gateway.access_line(request_id)
    assert line["status"] == 200 and line["path"] == path, line
    usage = line["usage"]
    assert usage["prompt_tokens"] > 0, line
    assert 0 < usage["completion_tokens"] < ENOUGH, line
    assert "usage_estimated" not in line, line
    return line


# --- Anthropic Messages --------------------------------------------------------------------
@pytest.mark.parametrize("leg", LEGS)
def test_messages_create(gw: Gateway, leg: str) -> None:
    request_id, headers = tagged()

    message = claude(gw).messages.create(
        model=CLAUDE[leg], max_tokens=ENOUGH, messages=ask(PROMPT), extra_headers=headers
    )

    assert message.type == "message" and message.role == "assistant"
    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].text  # type: ignore[union-attr]
    assert message.stop_reason == "end_turn"
    assert message.usage.input_tokens > 0
    assert 0 < message.usage.output_tokens < ENOUGH
    line = assert_provider_usage(gw, request_id, "/v1/messages")
    assert line["usage"]["completion_tokens"] == message.usage.output_tokens


@pytest.mark.parametrize("leg", LEGS)
def test_messages_stream(gw: Gateway, leg: str) -> None:
    request_id, headers = tagged()

    with claude(gw).messages.stream(
        model=CLAUDE[leg], max_tokens=ENOUGH, messages=ask(PROMPT), extra_headers=headers
    ) as stream:
        events = [event.type for event in stream]
        message = stream.get_final_message()

    assert events[0] == "message_start" and events[-1] == "message_stop"
    assert "content_block_delta" in events and "message_delta" in events
    assert message.type == "message" and message.content[0].type == "text"
    assert message.content[0].text
    assert message.stop_reason == "end_turn"
    assert 0 < message.usage.output_tokens < ENOUGH
    line = assert_provider_usage(gw, request_id, "/v1/messages")
    assert line["usage"]["completion_tokens"] == message.usage.output_tokens


@pytest.mark.parametrize("leg", LEGS)
def test_a_cut_message_says_max_tokens(gw: Gateway, leg: str) -> None:
    message = claude(gw).messages.create(model=CLAUDE[leg], max_tokens=CUT, messages=ask(PROMPT))

    assert message.stop_reason == "max_tokens"
    assert message.usage.output_tokens == CUT


def test_count_tokens_is_relayed_to_the_native_provider(gw: Gateway, llama: LlamaServer) -> None:
    direct = requests.post(
        llama.url + "/v1/messages/count_tokens",
        json={"model": MODEL_ALIAS, "messages": ask(PROMPT)},
        headers={"x-api-key": LLAMA_KEY, "anthropic-version": "2023-06-01"},
        timeout=10,
    )
    assert direct.status_code == 200, direct.text

    counted = claude(gw).messages.count_tokens(model=CLAUDE["native"], messages=ask(PROMPT))

    # llama's tokenizer and chat template, not the gateway's four characters a token.
    assert counted.input_tokens == direct.json()["input_tokens"]
    assert counted.input_tokens != len(PROMPT) // 4


def test_count_tokens_is_estimated_for_the_bridged_provider(gw: Gateway) -> None:
    counted = claude(gw).messages.count_tokens(model=CLAUDE["bridged"], messages=ask(PROMPT))

    assert counted.input_tokens == len(PROMPT) // 4


# --- OpenAI Responses ----------------------------------------------------------------------
@pytest.mark.parametrize("leg", LEGS)
def test_responses_create(gw: Gateway, leg: str) -> None:
    request_id, headers = tagged()

    response = gpt(gw).responses.create(
        model=GPT[leg], input=PROMPT, max_output_tokens=ENOUGH, extra_headers=headers
    )

    assert response.object == "response" and response.status == "completed"
    assert [item.type for item in response.output] == ["message"]
    assert response.output_text
    assert response.usage is not None and response.usage.input_tokens > 0
    assert 0 < response.usage.output_tokens < ENOUGH
    line = assert_provider_usage(gw, request_id, "/v1/responses")
    assert line["usage"]["completion_tokens"] == response.usage.output_tokens


@pytest.mark.parametrize("leg", LEGS)
def test_responses_stream_events(gw: Gateway, leg: str) -> None:
    """The events as they come (the SDK's plain iterator, which checks no indexes)."""
    request_id, headers = tagged()

    with gpt(gw).responses.create(
        model=GPT[leg], input=PROMPT, max_output_tokens=ENOUGH, stream=True, extra_headers=headers
    ) as stream:
        events = list(stream)

    kinds = [event.type for event in events]
    assert kinds[0] == "response.created", kinds
    assert kinds[-1] == "response.completed", kinds
    assert "response.output_text.delta" in kinds
    completed = events[-1].response  # type: ignore[union-attr]
    assert completed.output_text and completed.usage is not None
    line = assert_provider_usage(gw, request_id, "/v1/responses")
    assert line["usage"]["completion_tokens"] == completed.usage.output_tokens


# llama-server's Responses stream has no `output_index` on response.output_item.added/.done
# nor `output_index`/`content_index` on content_part.*/output_text.*, and no
# `sequence_number` anywhere: the SDK's `responses.stream()` helper indexes its snapshot
# with them (TypeError). Relayed as sent, so the same through the gateway as direct.
LLAMA_STREAM_INDEXES = pytest.mark.xfail(
    raises=TypeError, strict=True, reason="llama-server omits output_index/content_index"
)


@pytest.mark.parametrize("leg", [pytest.param("native", marks=LLAMA_STREAM_INDEXES), "bridged"])
def test_responses_stream_helper(gw: Gateway, leg: str) -> None:
    with gpt(gw).responses.stream(model=GPT[leg], input=PROMPT, max_output_tokens=ENOUGH) as s:
        kinds = [event.type for event in s]
        response = s.get_final_response()

    assert kinds[0] == "response.created" and kinds[-1] == "response.completed", kinds
    assert response.status == "completed" and response.output_text


def test_a_cut_bridged_stream_ends_incomplete(gw: Gateway) -> None:
    with gpt(gw).responses.create(
        model=GPT["bridged"], input=PROMPT, max_output_tokens=CUT, stream=True
    ) as stream:
        events = list(stream)

    assert events[0].type == "response.created"
    last = events[-1]
    assert last.type == "response.incomplete", [event.type for event in events]
    assert last.response.incomplete_details is not None
    assert last.response.incomplete_details.reason == "max_output_tokens"


def test_a_bridged_response_can_be_retrieved(gw: Gateway) -> None:
    client = gpt(gw)
    created = client.responses.create(model=GPT["bridged"], input=PROMPT, max_output_tokens=ENOUGH)

    retrieved = client.responses.retrieve(created.id)

    assert retrieved.id == created.id and retrieved.status == "completed"
    assert retrieved.output_text == created.output_text
    items = client.responses.input_items.list(created.id)
    assert [item.type for item in items.data] == ["message"]


def test_a_bridged_conversation_continues_by_previous_response_id(gw: Gateway) -> None:
    client = gpt(gw)
    first = client.responses.create(model=GPT["bridged"], input=PROMPT, max_output_tokens=ENOUGH)

    second = client.responses.create(
        model=GPT["bridged"],
        input="And three more.",
        previous_response_id=first.id,
        max_output_tokens=ENOUGH,
    )

    assert second.status == "completed" and second.previous_response_id == first.id
    # The earlier turn was replayed to llama: the prompt is longer than the first one.
    assert second.usage is not None and first.usage is not None
    assert second.usage.input_tokens > first.usage.input_tokens


def test_llamas_refusal_of_previous_response_id_reaches_the_client(gw: Gateway) -> None:
    """llama-server keeps no responses: relayed as sent, its 400 (and words) come back."""
    client = gpt(gw)
    first = client.responses.create(model=GPT["native"], input=PROMPT, max_output_tokens=ENOUGH)

    with pytest.raises(openai.BadRequestError, match="previous_response_id"):
        client.responses.create(
            model=GPT["native"],
            input="more",
            previous_response_id=first.id,
            max_output_tokens=ENOUGH,
        )


def test_a_native_response_is_looked_up_at_llama_which_keeps_none(gw: Gateway) -> None:
    """Retrieve goes to the provider that made the response; llama-server stores none and
    says 404, which reaches the client as a 404 (not a 5xx, not the gateway's store)."""
    client = gpt(gw)
    created = client.responses.create(model=GPT["native"], input=PROMPT, max_output_tokens=ENOUGH)

    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(created.id)


# --- Chat Completions, on the same server --------------------------------------------------
def test_chat_completions_still_work(gw: Gateway) -> None:
    request_id, headers = tagged()

    completion = gpt(gw).chat.completions.create(
        model=GPT["bridged"],
        messages=ask(PROMPT),
        max_tokens=ENOUGH,
        extra_headers=headers,
    )

    assert completion.object == "chat.completion"
    assert completion.model == MODEL_ALIAS
    assert completion.choices[0].message.content
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and completion.usage.prompt_tokens > 0
    line = assert_provider_usage(gw, request_id, "/v1/chat/completions")
    assert line["usage"]["completion_tokens"] == completion.usage.completion_tokens


def test_chat_completions_stream_reports_usage(gw: Gateway) -> None:
    request_id, headers = tagged()

    chunks = list(
        gpt(gw).chat.completions.create(
            model=GPT["native"],
            messages=ask(PROMPT),
            max_tokens=ENOUGH,
            stream=True,
            stream_options={"include_usage": True},
            extra_headers=headers,
        )
    )

    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens > 0
    assert_provider_usage(gw, request_id, "/v1/chat/completions")
