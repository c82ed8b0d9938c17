"""/v1/responses through real gunicorn, with the official `openai` SDK as the client.

Bridged: the gateway's default provider is a chat-only fake (`tests.fake_dialects` in chat
mode, which calls a tool named `shell` and then reports its output), so every request is
translated to Chat Completions and its answer stored by the gateway. Native: a provider
declared `native: [responses]` gets the request relayed and its bytes come back as sent.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
import requests
from openai.types.responses import FunctionToolParam, ResponseInputParam
from prometheus_client.mmap_dict import MmapedDict

from tests.constants import GATEWAY_KEY, SECOND_GATEWAY_KEY
from tests.e2e.conftest import Gateway, GatewayFactory
from tests.fake_dialects import PLAIN_ANSWER, AgentScript, FakeDialects

pytestmark = pytest.mark.e2e

COMMAND = "echo e2e"
SHELL: FunctionToolParam = {
    "type": "function",
    "name": "shell",
    "description": "Run a shell command",
    "parameters": {
        "type": "object",
        "properties": {"command": {"type": "string"}},
        "required": ["command"],
    },
    "strict": False,
}
# Fields a chat provider must never see: they have no meaning in Chat Completions.
RESPONSES_ONLY = {"metadata", "client_metadata", "include", "store", "text", "input", "reasoning"}


def sdk(gateway: Gateway, key: str = GATEWAY_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0)


def post(gateway: Gateway, body: Any, key: str = GATEWAY_KEY, **options: Any) -> requests.Response:
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    headers.update(options.pop("headers", {}))
    options.setdefault("timeout", 30)
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    return requests.post(gateway.url + "/v1/responses", data=data, headers=headers, **options)


def sse_events(body: bytes) -> list[dict[str, Any]]:
    """The JSON payloads of an SSE body, in order."""
    events = []
    for block in body.split(b"\n\n"):
        for line in block.split(b"\n"):
            if line.startswith(b"data: "):
                events.append(orjson.loads(line.removeprefix(b"data: ")))
    return events


def chat_bodies(fake: FakeDialects) -> list[dict[str, Any]]:
    return [r.json for r in fake.received("/v1/chat/completions")]


def call_of(response: Any) -> Any:
    (call,) = [item for item in response.output if item.type == "function_call"]
    return call


@pytest.fixture(scope="module")
def chat_fake() -> Iterator[FakeDialects]:
    fake = FakeDialects(frozenset({"chat"}), AgentScript(command=COMMAND)).start()
    yield fake
    fake.stop()


@pytest.fixture(scope="module")
def bridged(tmp_path_factory: pytest.TempPathFactory, chat_fake: FakeDialects) -> Iterator[Gateway]:
    factory = GatewayFactory(tmp_path_factory.mktemp("bridged"), chat_fake.url)
    yield factory(RATE_LIMIT_REQUESTS_PER_MINUTE="100000")
    factory.stop_all()


# --- bridged to a chat provider -----------------------------------------------------------
def test_create_answers_with_text_and_the_providers_usage(bridged: Gateway) -> None:
    response = sdk(bridged).responses.create(model="qwen-plus", input="Say OK")

    assert response.id.startswith("resp_") and response.status == "completed"
    assert response.output_text == PLAIN_ANSWER
    assert response.model == "qwen-plus"
    assert response.usage is not None
    # The fake reports prompt tokens = its body / 4 and 12 completion tokens.
    assert response.usage.input_tokens > 0 and response.usage.output_tokens == 12
    total = response.usage.input_tokens + response.usage.output_tokens
    assert response.usage.total_tokens == total


def test_stream_events_are_ordered_and_end_with_completed(bridged: Gateway) -> None:
    with sdk(bridged).responses.stream(model="qwen-plus", input="Say OK") as stream:
        events = list(stream)
        final = stream.get_final_response()

    types = [event.type for event in events]
    assert types[0] == "response.created" and types[1] == "response.in_progress"
    assert types[-1] == "response.completed"
    assert types.count("response.completed") == 1
    numbers = [event.sequence_number for event in events]
    assert numbers == sorted(set(numbers))  # strictly increasing
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == final.output_text == PLAIN_ANSWER
    assert final.usage is not None and final.usage.output_tokens == 12
    assert events[0].response.id == final.id  # type: ignore[union-attr]  # one id from the first event to the last


def test_a_tool_round_trip_by_full_input(bridged: Gateway, chat_fake: FakeDialects) -> None:
    client = sdk(bridged)
    first = client.responses.create(model="qwen-plus", input="run it", tools=[SHELL])
    call = call_of(first)
    assert call.name == "shell" and json.loads(call.arguments) == {"command": COMMAND}

    history: ResponseInputParam = [
        {"role": "user", "content": "run it"},
        call.model_dump(exclude_none=True),
        {"type": "function_call_output", "call_id": call.call_id, "output": "full-input-out"},
    ]
    second = client.responses.create(model="qwen-plus", input=history, tools=[SHELL])

    assert second.output_text == "The command printed: full-input-out"
    messages = chat_bodies(chat_fake)[-1]["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool"]
    assert messages[1]["tool_calls"][0]["id"] == call.call_id
    assert messages[1]["tool_calls"][0]["function"]["name"] == "shell"
    assert messages[2] == {
        "role": "tool",
        "tool_call_id": call.call_id,
        "content": "full-input-out",
    }


def test_a_tool_round_trip_by_previous_response_id(
    bridged: Gateway, chat_fake: FakeDialects
) -> None:
    client = sdk(bridged)
    first = client.responses.create(
        model="qwen-plus", input="run it", instructions="Be brief.", tools=[SHELL]
    )
    call = call_of(first)
    output: Any = {"type": "function_call_output", "call_id": call.call_id, "output": "prev-out"}

    second = client.responses.create(
        model="qwen-plus", previous_response_id=first.id, input=[output], tools=[SHELL]
    )

    assert second.output_text == "The command printed: prev-out"
    messages = chat_bodies(chat_fake)[-1]["messages"]
    # As OpenAI does, the earlier turn's `instructions` are not carried over.
    assert [m["role"] for m in messages] == ["user", "assistant", "tool"]
    assert messages[0]["content"] == "run it"
    assert messages[1]["tool_calls"][0]["id"] == call.call_id
    assert messages[2]["tool_call_id"] == call.call_id
    # A streamed turn continues from a stored one as well.
    with client.responses.stream(
        model="qwen-plus", previous_response_id=second.id, input="again?"
    ) as stream:
        third = stream.get_final_response()
    assert third.status == "completed"
    roles = [m["role"] for m in chat_bodies(chat_fake)[-1]["messages"]]
    assert roles == ["user", "assistant", "tool", "assistant", "user"]


def test_retrieve_input_items_and_delete_belong_to_their_key(bridged: Gateway) -> None:
    owner, other = sdk(bridged), sdk(bridged, SECOND_GATEWAY_KEY)
    made = owner.responses.create(model="qwen-plus", input="remember me")

    got = owner.responses.retrieve(made.id)
    assert got.id == made.id and got.output_text == made.output_text == PLAIN_ANSWER
    items = owner.responses.input_items.list(made.id)
    assert [item.type for item in items.data] == ["message"]
    assert items.data[0].content[0].text == "remember me"  # type: ignore[union-attr,index]

    # Another key is told it does not exist, for every call, and learns nothing of it.
    for call in (
        lambda: other.responses.retrieve(made.id),
        lambda: other.responses.input_items.list(made.id),
        lambda: other.responses.delete(made.id),
        lambda: other.responses.create(model="qwen-plus", previous_response_id=made.id, input="x"),
    ):
        with pytest.raises(openai.NotFoundError) as missing:
            call()
        assert "remember me" not in missing.value.response.text
        assert PLAIN_ANSWER not in missing.value.response.text
    assert owner.responses.retrieve(made.id).id == made.id  # the other key deleted nothing

    owner.responses.delete(made.id)
    with pytest.raises(openai.NotFoundError):
        owner.responses.retrieve(made.id)
    with pytest.raises(openai.NotFoundError):
        owner.responses.delete(made.id)


def test_a_response_not_stored_cannot_be_retrieved_or_continued(bridged: Gateway) -> None:
    client = sdk(bridged)
    made = client.responses.create(model="qwen-plus", input="forget me", store=False)
    assert made.output_text == PLAIN_ANSWER

    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(made.id)
    with pytest.raises(openai.NotFoundError) as missing:
        client.responses.create(model="qwen-plus", previous_response_id=made.id, input="x")
    assert missing.value.code == "previous_response_not_found"


def test_the_chat_provider_receives_only_chat_fields(
    bridged: Gateway, chat_fake: FakeDialects
) -> None:
    """What Codex sends, and what of it reaches a chat-only provider."""
    body = {
        "model": "qwen-plus",
        "stream": True,
        "store": False,
        "include": ["reasoning.encrypted_content"],
        "metadata": {"team": "x"},
        "client_metadata": {"session": "y"},
        "text": {"verbosity": "low"},
        "reasoning": {"summary": "auto"},
        "prompt_cache_key": "cache-1",
        "tool_choice": "auto",
        "parallel_tool_calls": True,
        "max_output_tokens": 300,
        "input": [
            {
                "type": "message",
                "role": "developer",
                "content": [{"type": "input_text", "text": "You are a coding agent."}],
            },
            {
                "type": "message",
                "role": "user",
                "content": [{"type": "input_text", "text": "hello"}],
            },
            {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": "opaque"},
        ],
        "tools": [
            {"type": "web_search"},
            {
                "type": "namespace",
                "name": "files",
                "description": "File tools",
                "tools": [{"type": "function", "name": "read", "parameters": {"type": "object"}}],
            },
            SHELL,
        ],
    }

    answer = post(bridged, body)

    assert answer.status_code == 200, answer.text
    events = sse_events(answer.content)
    assert events[-1]["type"] == "response.completed"
    sent = chat_bodies(chat_fake)[-1]
    assert not RESPONSES_ONLY & sent.keys(), sent.keys()
    assert "prompt_cache_key" not in sent  # an openai-compatible provider is not sent it
    assert sent["messages"][0] == {"role": "system", "content": "You are a coding agent."}
    assert sent["messages"][1] == {"role": "user", "content": "hello"}
    assert [t["function"]["name"] for t in sent["tools"]] == ["files__read", "shell"]
    assert all(t["type"] == "function" for t in sent["tools"])
    assert sent["max_tokens"] == 300 and sent["tool_choice"] == "auto"
    assert sent["stream_options"] == {"include_usage": True}
    # The shell call the fake made comes back as a Responses function_call item.
    (call,) = [i for i in events[-1]["response"]["output"] if i["type"] == "function_call"]
    assert call["name"] == "shell" and call["call_id"].startswith("call_")


# --- stored responses seen by every worker -------------------------------------------------
def test_stored_responses_are_seen_by_every_worker_through_redis(
    start_gateway: GatewayFactory, chat_fake: FakeDialects, redis_url: str, tmp_path: Path
) -> None:
    metrics_dir = tmp_path / "prometheus"
    metrics_dir.mkdir()
    gateway = start_gateway(
        TARGET_API_URL=chat_fake.url,
        RATE_LIMIT_STORAGE_URI=redis_url,
        RATE_LIMIT_REQUESTS_PER_MINUTE="100000",
        GUNICORN_WORKERS="2",
        PROMETHEUS_MULTIPROC_DIR=str(metrics_dir),
    )
    client = sdk(gateway)
    made = [client.responses.create(model="qwen-plus", input=f"n{i}") for i in range(4)]

    # Each call on a new connection: the kernel hands it to either worker.
    for _ in range(10):
        for response in made:
            got = requests.get(
                f"{gateway.url}/v1/responses/{response.id}",
                headers={"Authorization": f"Bearer {GATEWAY_KEY}", "Connection": "close"},
                timeout=10,
            )
            assert got.status_code == 200, got.text
            assert got.json()["output"][0]["content"][0]["text"] == PLAIN_ANSWER
    # The creates came on the SDK's one kept-alive connection, so one worker made them all;
    # the other answered retrieves of responses it never made.
    served = requests_by_worker(metrics_dir)
    assert len(served) == 2, served
    assert sum(gets for _, gets in served.values()) == 40
    assert any(posts == 0 and gets > 0 for posts, gets in served.values()), served


def requests_by_worker(metrics_dir: Path) -> dict[str, tuple[float, float]]:
    """Per worker (its metrics file): its answered creates and retrieves."""
    served: dict[str, tuple[float, float]] = {}
    for path in metrics_dir.glob("counter_*.db"):
        posts = gets = 0.0
        for key, value, *_ in MmapedDict.read_all_values_from_file(str(path)):
            _, name, labels, _ = json.loads(key)
            if name != "gateway_requests_total" or labels["status"] != "200":
                continue
            if labels["route"] == "/v1/responses":
                posts += value
            elif labels["route"] == "/v1/responses/<response_id>":
                gets += value
        served[path.name] = (posts, gets)
    return served


# --- a provider that serves Responses itself ------------------------------------------------
NATIVE_KEY = "sk-native-provider-0123456789abcdef"
IDS = re.compile(rb'"((?:resp|msg|fc|rs|call)_fake)\d{6}"|"created_at": \d+')


def native_config(url: str) -> str:
    return f"""
providers:
  native:
    base_url: {url}
    api_key_env: NATIVE_KEY
    native: [responses]
models:
  codex-alias:
    - {{provider: native, model: gpt-5-codex}}
  "*": native
"""


def same_but_ids(ours: bytes, theirs: bytes) -> bool:
    """Equal bytes once the fake's counter-based ids and clock are masked."""
    return IDS.sub(b"X", ours) == IDS.sub(b"X", theirs)


@pytest.fixture
def native_fake() -> Iterator[FakeDialects]:
    fake = FakeDialects(frozenset({"responses"}), AgentScript(command=COMMAND)).start()
    yield fake
    fake.stop()


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_native_provider_is_relayed_byte_for_byte_with_the_alias_rewritten(
    start_gateway: GatewayFactory, native_fake: FakeDialects, stream: bool
) -> None:
    gateway = start_gateway(native_config(native_fake.url), NATIVE_KEY=NATIVE_KEY)
    body = {"model": "codex-alias", "input": "run it", "tools": [SHELL], "stream": stream}

    answer = post(gateway, body)

    assert answer.status_code == 200, answer.text
    (received,) = native_fake.received("/v1/responses")
    assert received.json == {**body, "model": "gpt-5-codex"}
    assert received.headers["authorization"] == f"Bearer {NATIVE_KEY}"
    direct = requests.post(
        native_fake.url + "/responses",
        data=received.body,
        headers={"Content-Type": "application/json"},
        timeout=10,
    )
    assert same_but_ids(answer.content, direct.content)
    if stream:
        assert answer.headers["Content-Type"].startswith("text/event-stream")
        assert sse_events(answer.content)[-1]["type"] == "response.completed"


def test_native_retrieve_input_items_and_delete_go_to_the_provider(
    start_gateway: GatewayFactory, native_fake: FakeDialects
) -> None:
    gateway = start_gateway(native_config(native_fake.url), NATIVE_KEY=NATIVE_KEY)
    owner, other = sdk(gateway), sdk(gateway, SECOND_GATEWAY_KEY)
    made = owner.responses.create(model="codex-alias", input="keep me")
    assert made.id.startswith("resp_fake")

    assert owner.responses.retrieve(made.id).output_text == PLAIN_ANSWER
    items = owner.responses.input_items.list(made.id)
    assert items.data[0].content[0].text == "keep me"  # type: ignore[union-attr,index]
    path = f"/v1/responses/{made.id}"
    assert len(native_fake.received(path, "GET")) == 1
    assert len(native_fake.received(path + "/input_items", "GET")) == 1

    with pytest.raises(openai.NotFoundError):
        other.responses.retrieve(made.id)
    with pytest.raises(openai.NotFoundError):
        other.responses.delete(made.id)
    # Refused by the gateway: the provider, which would have answered, was never asked.
    assert len(native_fake.received(path, "GET")) == 1
    assert native_fake.received(path, "DELETE") == []

    owner.responses.delete(made.id)
    assert len(native_fake.received(path, "DELETE")) == 1
    with pytest.raises(openai.NotFoundError):
        owner.responses.retrieve(made.id)


def test_previous_response_id_of_a_native_response_is_relayed_as_sent(
    start_gateway: GatewayFactory, native_fake: FakeDialects
) -> None:
    gateway = start_gateway(native_config(native_fake.url), NATIVE_KEY=NATIVE_KEY)
    client = sdk(gateway)
    first = client.responses.create(model="codex-alias", input="run it", tools=[SHELL])
    call = call_of(first)
    output: Any = {"type": "function_call_output", "call_id": call.call_id, "output": "native-out"}

    second = client.responses.create(
        model="codex-alias", previous_response_id=first.id, input=[output], tools=[SHELL]
    )

    assert second.output_text == "The command printed: native-out"
    sent = native_fake.received("/v1/responses")[-1].json
    assert sent["previous_response_id"] == first.id and sent["model"] == "gpt-5-codex"
