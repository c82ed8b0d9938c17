"""A scripted fake provider on loopback speaking three dialects, for the coding agents' tests.

It plays the model for one agent task: while the conversation holds no tool result and the
request offers a shell-like tool (Claude Code's `Bash`, Codex's `shell`/`shell_command`/
`exec_command`), it answers with ONE call to that tool running `AgentScript.command`; once
the tool's result is in the conversation, it answers with a final text quoting that result.
Requests without such a tool (titles, summaries, quota probes) get a short plain text.

Dialects, each on its own routes, enabled per instance (`dialects`), so that a fake in
`{"chat"}` mode is a chat-only provider that the gateway must translate for:

- `messages`: `POST /v1/messages` (streamed and not; streaming is decided by the body's
  `stream`, since Claude Code sends `Accept: application/json` either way) and
  `POST /v1/messages/count_tokens`;
- `responses`: `POST /v1/responses` (streamed and not), `GET`/`DELETE /v1/responses/{id}`
  and `GET /v1/responses/{id}/input_items` for stored responses;
- `chat`: `POST /v1/chat/completions`, streams in OpenAI's exact shape (a usage chunk with
  `"choices": []` only when `stream_options.include_usage` asks for it).

`HEAD /` and `GET /v1/models` always answer. Streams are real chunked SSE with tool-call
arguments split in several pieces and usage last. Every request is recorded (`requests`).
Run it alone with `python -m tests.fake_dialects --port 9200`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

DIALECTS = frozenset({"messages", "responses", "chat"})
# Tool names the agents give their shell, by preference.
SHELL_TOOLS = ("Bash", "shell_command", "exec_command", "shell", "local_shell")
PLAIN_ANSWER = "OK"
REASONING = "The user wants the command run: call the shell tool, then report its output."
Json = dict[str, Any]


@dataclass
class Received:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


@dataclass(frozen=True)
class AgentScript:
    """What the scripted model does: run `command`, then report its output."""

    command: str = "echo gateway-ok > result.txt && cat result.txt"
    answer_prefix: str = "The command printed: "
    # Pause between two SSE events, so that streams arrive in several reads.
    delay: float = 0.002
    # Reason first, as thinking models do: a `thinking` block with a signature (Messages,
    # when the request enables thinking), a `reasoning` item (Responses, when it asks for
    # reasoning), DashScope's `reasoning_content` (Chat). The agents then replay it.
    reasoning: bool = False


@dataclass(frozen=True)
class Tool:
    name: str
    schema: Json
    kind: str = "function"  # or "local_shell" (Responses' built-in shell)


@dataclass(frozen=True)
class Turn:
    """The model's next answer: a text, or one tool call with JSON `arguments`."""

    text: str = ""
    tool: Tool | None = None
    arguments: str = ""


def shell_arguments(tool: Tool, command: str) -> Json:
    """Arguments for the agent's shell tool, shaped by the schema it declared."""
    properties = tool.schema.get("properties") or {}
    if "cmd" in properties:
        return {"cmd": command}
    if (properties.get("command") or {}).get("type") == "array" or tool.kind == "local_shell":
        return {"command": ["bash", "-lc", command]}
    arguments: Json = {"command": command}
    if "description" in properties:
        arguments["description"] = "Run the requested command"
    return arguments


def next_turn(script: AgentScript, tools: list[Tool], tool_output: str | None) -> Turn:
    if tool_output is not None:
        return Turn(text=script.answer_prefix + tool_output.strip())
    by_name = {tool.name: tool for tool in tools}
    shell = next((by_name[name] for name in SHELL_TOOLS if name in by_name), None)
    if shell is None:
        return Turn(text=PLAIN_ANSWER)
    return Turn(tool=shell, arguments=json.dumps(shell_arguments(shell, script.command)))


def text_of(content: Any) -> str:
    """The text in a string or a list of text-like blocks (any dialect)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(text_of(block.get("text", "")) for block in content if "text" in block)
    return ""


def pieces(text: str, parts: int = 4) -> list[str]:
    """`text` in `parts` uneven pieces (split mid-token, as providers do)."""
    size = max(1, -(-len(text) // parts))
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


def estimate_tokens(body: bytes) -> int:
    return max(1, len(body) // 4)


# --- Anthropic Messages ------------------------------------------------------------------
def messages_turn(script: AgentScript, payload: Json) -> Turn:
    tools = [Tool(t["name"], t.get("input_schema") or {}) for t in payload.get("tools") or []]
    output = None
    for message in payload.get("messages") or []:
        for block in message.get("content") or []:
            if isinstance(block, dict) and block.get("type") == "tool_result":
                output = text_of(block.get("content"))
    return next_turn(script, tools, output)


def messages_blocks(turn: Turn, payload: Json, script: AgentScript, number: int) -> list[Json]:
    blocks: list[Json] = []
    thinking = (payload.get("thinking") or {}).get("type") in ("enabled", "adaptive")
    if script.reasoning and thinking:
        signature = f"fake-signature-{number:06d}"
        blocks.append({"type": "thinking", "thinking": REASONING, "signature": signature})
    if turn.tool is None:
        return [*blocks, {"type": "text", "text": turn.text}]
    arguments = json.loads(turn.arguments)
    call = {"type": "tool_use", "id": f"toolu_fake{number:06d}", "name": turn.tool.name}
    return [*blocks, {**call, "input": arguments}]


def messages_answer(payload: Json, blocks: list[Json], input_tokens: int, number: int) -> Json:
    stop = "tool_use" if blocks[-1]["type"] == "tool_use" else "end_turn"
    return {
        "id": f"msg_fake{number:06d}",
        "type": "message",
        "role": "assistant",
        "model": payload.get("model", "m"),
        "content": blocks,
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": {
            "input_tokens": input_tokens,
            "output_tokens": 12,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
        },
    }


def block_deltas(block: Json) -> tuple[Json, list[Json]]:
    """A content block as opened by `content_block_start`, and its deltas."""
    if block["type"] == "tool_use":
        arguments = json.dumps(block["input"])
        deltas = [{"type": "input_json_delta", "partial_json": p} for p in pieces(arguments)]
        return {**block, "input": {}}, deltas
    if block["type"] == "thinking":
        deltas = [{"type": "thinking_delta", "thinking": p} for p in pieces(block["thinking"])]
        deltas.append({"type": "signature_delta", "signature": block["signature"]})
        return {**block, "thinking": "", "signature": ""}, deltas
    deltas = [{"type": "text_delta", "text": p} for p in pieces(block["text"], 3)]
    return {**block, "text": ""}, deltas


def messages_events(answer: Json) -> Iterator[tuple[str, Json]]:
    start = {**answer, "content": [], "stop_reason": None}
    start["usage"] = {**answer["usage"], "output_tokens": 1}
    yield "message_start", {"type": "message_start", "message": start}
    for index, block in enumerate(answer["content"]):
        opened, deltas = block_deltas(block)
        started = {"type": "content_block_start", "index": index, "content_block": opened}
        yield "content_block_start", started
        if index == 0:
            yield "ping", {"type": "ping"}
        for delta in deltas:
            event = {"type": "content_block_delta", "index": index, "delta": delta}
            yield "content_block_delta", event
        yield "content_block_stop", {"type": "content_block_stop", "index": index}
    delta = {"stop_reason": answer["stop_reason"], "stop_sequence": None}
    usage = {"output_tokens": answer["usage"]["output_tokens"]}
    yield "message_delta", {"type": "message_delta", "delta": delta, "usage": usage}
    yield "message_stop", {"type": "message_stop"}


# --- OpenAI Responses --------------------------------------------------------------------
def responses_turn(script: AgentScript, payload: Json) -> Turn:
    tools = []
    for tool in payload.get("tools") or []:
        if tool.get("type") == "function":
            tools.append(Tool(tool["name"], tool.get("parameters") or {}))
        elif tool.get("type") == "local_shell":
            tools.append(Tool("local_shell", {}, kind="local_shell"))
    output = None
    items = payload.get("input")
    for item in items if isinstance(items, list) else []:
        if item.get("type") in ("function_call_output", "local_shell_call_output"):
            output = text_of(item.get("output"))
    return next_turn(script, tools, output)


def responses_items(turn: Turn, payload: Json, script: AgentScript, number: int) -> list[Json]:
    items: list[Json] = []
    if script.reasoning and payload.get("reasoning"):
        summary = [{"type": "summary_text", "text": REASONING}]
        reasoning: Json = {"id": f"rs_fake{number:06d}", "type": "reasoning", "summary": summary}
        if "reasoning.encrypted_content" in (payload.get("include") or []):
            reasoning["encrypted_content"] = f"fake-encrypted-{number:06d}"
        items.append(reasoning)
    if turn.tool is None:
        text = {"type": "output_text", "text": turn.text, "annotations": [], "logprobs": []}
        message = {"id": f"msg_fake{number:06d}", "type": "message", "status": "completed"}
        return [*items, {**message, "role": "assistant", "content": [text]}]
    call_id = f"call_fake{number:06d}"
    if turn.tool.kind == "local_shell":
        action = {"type": "exec", "command": json.loads(turn.arguments)["command"], "env": {}}
        call = {"id": f"lsh_fake{number:06d}", "type": "local_shell_call", "action": action}
        return [*items, {**call, "status": "completed", "call_id": call_id}]
    call = {"id": f"fc_fake{number:06d}", "type": "function_call", "status": "completed"}
    return [
        *items,
        {**call, "call_id": call_id, "name": turn.tool.name, "arguments": turn.arguments},
    ]


def responses_answer(payload: Json, items: list[Json], input_tokens: int, number: int) -> Json:
    return {
        "id": f"resp_fake{number:06d}",
        "object": "response",
        "created_at": int(time.time()),
        "status": "completed",
        "error": None,
        "incomplete_details": None,
        "instructions": payload.get("instructions"),
        "model": payload.get("model", "m"),
        "output": items,
        "parallel_tool_calls": payload.get("parallel_tool_calls", True),
        "previous_response_id": payload.get("previous_response_id"),
        "store": payload.get("store", True),
        "tool_choice": payload.get("tool_choice", "auto"),
        "tools": payload.get("tools") or [],
        "metadata": payload.get("metadata") or {},
        "usage": {
            "input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": 12,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + 12,
        },
    }


def responses_events(answer: Json) -> Iterator[Json]:
    """The events of a streamed response, without their `sequence_number`."""
    pending = {**answer, "status": "in_progress", "output": [], "usage": None}
    yield {"type": "response.created", "response": pending}
    yield {"type": "response.in_progress", "response": pending}
    for index, item in enumerate(answer["output"]):
        yield from item_events(item, index)
        yield {"type": "response.output_item.done", "output_index": index, "item": item}
    yield {"type": "response.completed", "response": answer}


def item_events(item: Json, index: int) -> Iterator[Json]:
    """An output item's `output_item.added` and deltas (not its `output_item.done`)."""
    where = {"item_id": item["id"], "output_index": index}
    added = {"type": "response.output_item.added", "output_index": index}
    if item["type"] == "message":
        part = item["content"][0]
        yield {**added, "item": {**item, "status": "in_progress", "content": []}}
        at = {**where, "content_index": 0}
        yield {"type": "response.content_part.added", **at, "part": {**part, "text": ""}}
        for piece in pieces(part["text"], 3):
            yield {"type": "response.output_text.delta", **at, "delta": piece, "logprobs": []}
        yield {"type": "response.output_text.done", **at, "text": part["text"], "logprobs": []}
        yield {"type": "response.content_part.done", **at, "part": part}
    elif item["type"] == "function_call":
        yield {**added, "item": {**item, "status": "in_progress", "arguments": ""}}
        for piece in pieces(item["arguments"]):
            yield {"type": "response.function_call_arguments.delta", **where, "delta": piece}
        arguments = item["arguments"]
        yield {"type": "response.function_call_arguments.done", **where, "arguments": arguments}
    elif item["type"] == "reasoning":
        yield {**added, "item": {**item, "summary": []}}
        at = {**where, "summary_index": 0}
        part = item["summary"][0]
        yield {"type": "response.reasoning_summary_part.added", **at, "part": {**part, "text": ""}}
        for piece in pieces(part["text"]):
            yield {"type": "response.reasoning_summary_text.delta", **at, "delta": piece}
        yield {"type": "response.reasoning_summary_text.done", **at, "text": part["text"]}
        yield {"type": "response.reasoning_summary_part.done", **at, "part": part}
    else:
        yield {**added, "item": item}


def input_items(payload: Json) -> list[Json]:
    items = payload.get("input")
    if isinstance(items, str):
        items = [{"type": "message", "role": "user", "content": [{"type": "input_text"}]}]
        items[0]["content"][0]["text"] = payload["input"]
    listed = []
    for number, item in enumerate(items or []):
        listed.append({"id": f"in_fake{number:06d}", "type": "message", **item})
    return listed


# --- OpenAI Chat Completions -------------------------------------------------------------
def chat_turn(script: AgentScript, payload: Json) -> Turn:
    tools = [
        Tool(t["function"]["name"], t["function"].get("parameters") or {})
        for t in payload.get("tools") or []
        if t.get("type") == "function"
    ]
    output = None
    for message in payload.get("messages") or []:
        if message.get("role") == "tool":
            output = text_of(message.get("content"))
    return next_turn(script, tools, output)


def chat_answer(payload: Json, turn: Turn, script: AgentScript, number: int) -> Json:
    message: Json = {"role": "assistant", "content": turn.text or None, "refusal": None}
    if script.reasoning:  # DashScope's field for a thinking model's reasoning
        message["reasoning_content"] = REASONING
    if turn.tool is not None:
        function = {"name": turn.tool.name, "arguments": turn.arguments}
        message["tool_calls"] = [
            {"id": f"call_fake{number:06d}", "type": "function", "function": function}
        ]
    return {
        "id": f"chatcmpl-fake{number:06d}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": payload.get("model", "m"),
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": "stop" if turn.tool is None else "tool_calls",
            }
        ],
    }


def chat_chunks(answer: Json, include_usage: bool) -> Iterator[Json]:
    """OpenAI's chunks for `answer`: role first, pieces, finish_reason, then usage."""
    message = answer["choices"][0]["message"]
    head = {k: answer[k] for k in ("id", "created", "model")}

    def chunk(delta: Json, finish: str | None = None) -> Json:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        body: Json = {**head, "object": "chat.completion.chunk", "choices": [choice]}
        if include_usage:
            body["usage"] = None
        return body

    reasoning = message.get("reasoning_content")
    if reasoning:  # DashScope sends the reasoning first, with the role
        first, *rest = pieces(reasoning)
        yield chunk({"role": "assistant", "content": None, "reasoning_content": first})
        for piece in rest:
            yield chunk({"reasoning_content": piece})
    calls = message.get("tool_calls")
    if calls:
        call = calls[0]
        function = {"name": call["function"]["name"], "arguments": ""}
        opened = {"index": 0, "id": call["id"], "type": "function", "function": function}
        yield chunk({"role": "assistant", "content": None, "tool_calls": [opened]})
        for piece in pieces(call["function"]["arguments"]):
            yield chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
    else:
        yield chunk({"role": "assistant", "content": "", "refusal": None})
        for piece in pieces(message["content"], 3):
            yield chunk({"content": piece})
    yield chunk({}, answer["choices"][0]["finish_reason"])
    if include_usage:
        usage = {**head, "object": "chat.completion.chunk", "choices": [], "usage": None}
        usage["usage"] = answer["usage"]
        yield usage


# --- the server --------------------------------------------------------------------------
@dataclass
class FakeDialects:
    """The fake provider. `url` is the OpenAI-style base (…/v1), `base_url` Anthropic's."""

    dialects: frozenset[str] = DIALECTS
    script: AgentScript = field(default_factory=AgentScript)
    host: str = "127.0.0.1"
    port: int = 0
    requests: list[Received] = field(default_factory=list)
    stored: dict[str, tuple[Json, Json]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = set(self.dialects) - DIALECTS
        if unknown:
            raise ValueError(f"unknown dialects: {sorted(unknown)}")
        self.ids = itertools.count(1)
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return self.base_url + "/v1"

    def start(self) -> FakeDialects:
        server = ThreadingHTTPServer((self.host, self.port), DialectHandler)
        server.daemon_threads = True
        server.fake = self  # type: ignore[attr-defined]
        self._server = server
        self.port = server.server_address[1]
        threading.Thread(target=server.serve_forever, name="fake-dialects", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def __enter__(self) -> FakeDialects:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def record(self, received: Received) -> None:
        with self.lock:
            self.requests.append(received)

    def received(self, path: str, method: str = "POST") -> list[Received]:
        """The requests made to `path` (query string ignored)."""
        return [r for r in self.requests if r.method == method and urlsplit(r.path).path == path]

    def next_id(self) -> int:
        with self.lock:
            return next(self.ids)


class DialectHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "fake-dialects/1"

    @property
    def fake(self) -> FakeDialects:
        return self.server.fake  # type: ignore[attr-defined,no-any-return]

    def log_message(self, format: str, *args: Any) -> None:  # quiet: requests are recorded
        pass

    def do_HEAD(self) -> None:
        self.answer()

    def do_GET(self) -> None:
        self.answer()

    def do_POST(self) -> None:
        self.answer()

    def do_DELETE(self) -> None:
        self.answer()

    def answer(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {name.lower(): value for name, value in self.headers.items()}
        self.fake.record(Received(self.command, self.path, headers, body))
        route = urlsplit(self.path).path.rstrip("/")
        payload = json.loads(body) if body.startswith(b"{") else {}
        if self.command == "HEAD":
            self.send_bytes(200, b"", "text/plain")
        elif self.command == "GET" and route in ("", "/v1/models"):
            self.send_json(200, models_list())
        elif route.startswith("/v1/messages") and "messages" in self.fake.dialects:
            self.serve_messages(route, payload, body)
        elif route.startswith("/v1/responses") and "responses" in self.fake.dialects:
            self.serve_responses(route, payload, body)
        elif route == "/v1/chat/completions" and "chat" in self.fake.dialects:
            self.serve_chat(payload, body)
        else:
            error = {"message": f"no route {self.command} {route}", "type": "not_found"}
            self.send_json(404, {"error": error})

    def serve_messages(self, route: str, payload: Json, body: bytes) -> None:
        if route == "/v1/messages/count_tokens":
            self.send_json(200, {"input_tokens": estimate_tokens(body)})
            return
        if route != "/v1/messages" or self.command != "POST":
            error = {"type": "not_found_error", "message": f"no route {route}"}
            self.send_json(404, {"type": "error", "error": error})
            return
        script, number = self.fake.script, self.fake.next_id()
        blocks = messages_blocks(messages_turn(script, payload), payload, script, number)
        answer = messages_answer(payload, blocks, estimate_tokens(body), number)
        if payload.get("stream") is not True:
            self.send_json(200, answer)
            return
        events = (
            f"event: {name}\ndata: {json.dumps(data)}\n\n" for name, data in messages_events(answer)
        )
        self.send_stream(events)

    def serve_responses(self, route: str, payload: Json, body: bytes) -> None:
        parts = route.split("/")  # "", "v1", "responses", id?, "input_items"?
        if len(parts) > 3:
            self.serve_stored(parts[3], parts[4:], payload)
            return
        script, number = self.fake.script, self.fake.next_id()
        items = responses_items(responses_turn(script, payload), payload, script, number)
        answer = responses_answer(payload, items, estimate_tokens(body), number)
        if payload.get("store", True) is not False:
            with self.fake.lock:
                self.fake.stored[answer["id"]] = (answer, payload)
        if payload.get("stream") is not True:
            self.send_json(200, answer)
            return
        events = (
            f"event: {event['type']}\ndata: {json.dumps({**event, 'sequence_number': n})}\n\n"
            for n, event in enumerate(responses_events(answer))
        )
        self.send_stream(events)

    def serve_stored(self, response_id: str, rest: list[str], payload: Json) -> None:
        with self.fake.lock:
            found = self.fake.stored.get(response_id)
            if found is not None and self.command == "DELETE":
                del self.fake.stored[response_id]
        if found is None:
            error = {
                "message": f"No response with id '{response_id}'.",
                "type": "invalid_request_error",
            }
            self.send_json(404, {"error": {**error, "param": None, "code": None}})
        elif self.command == "DELETE":
            self.send_json(200, {"id": response_id, "object": "response", "deleted": True})
        elif rest == ["input_items"]:
            data = input_items(found[1])
            first, last = (data[0]["id"], data[-1]["id"]) if data else (None, None)
            listed = {"object": "list", "data": data, "first_id": first, "last_id": last}
            self.send_json(200, {**listed, "has_more": False})
        else:
            self.send_json(200, found[0])

    def serve_chat(self, payload: Json, body: bytes) -> None:
        script = self.fake.script
        answer = chat_answer(payload, chat_turn(script, payload), script, self.fake.next_id())
        tokens = estimate_tokens(body)
        answer["usage"] = {"prompt_tokens": tokens, "completion_tokens": 12}
        answer["usage"]["total_tokens"] = tokens + 12
        if payload.get("stream") is not True:
            self.send_json(200, answer)
            return
        options = payload.get("stream_options") or {}
        chunks = chat_chunks(answer, options.get("include_usage") is True)
        events = itertools.chain(
            (f"data: {json.dumps(c)}\n\n" for c in chunks), ["data: [DONE]\n\n"]
        )
        self.send_stream(events)

    def send_json(self, status: int, answer: Json) -> None:
        self.send_bytes(status, json.dumps(answer).encode(), "application/json")

    def send_bytes(self, status: int, data: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("request-id", f"req_fake{self.fake.next_id():06d}")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def send_stream(self, events: Iterator[str]) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for number, event in enumerate(events):
            if number and self.fake.script.delay:
                time.sleep(self.fake.script.delay)
            data = event.encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()


def models_list() -> Json:
    """One list readable both as OpenAI's and as Anthropic's `/v1/models`."""
    names = ["claude-sonnet-4-5", "gpt-5-codex", "qwen3-coder-plus"]
    data = [
        {"id": n, "object": "model", "type": "model", "display_name": n, "owned_by": "fake"}
        for n in names
    ]
    return {
        "object": "list",
        "data": data,
        "has_more": False,
        "first_id": names[0],
        "last_id": names[-1],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description="Scripted fake Messages/Responses/Chat provider")
    parser.add_argument("--port", type=int, default=9200)
    parser.add_argument("--dialects", default=",".join(sorted(DIALECTS)))
    parser.add_argument("--command", default=AgentScript.command)
    args = parser.parse_args()
    fake = FakeDialects(
        frozenset(args.dialects.split(",")), AgentScript(command=args.command), port=args.port
    ).start()
    print(f"fake dialects {sorted(fake.dialects)} on {fake.base_url}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        fake.stop()


if __name__ == "__main__":
    main()
