"""The OpenAI Responses API bridged to Chat Completions, for providers that only speak chat.

`request` decodes and checks the client's body; `chat_body` builds the provider's; `answer`
turns a chat completion into a `response` object; `stream` does the same event by event.
Imports only `gateway.protocols.common` from the gateway.
"""

from gateway.protocols.responses.answer import Reply, from_chat
from gateway.protocols.responses.chat_body import ChatRequest, to_chat, tool_types_dropped
from gateway.protocols.responses.names import SEPARATOR, flat_name
from gateway.protocols.responses.request import (
    ResponsesRequest,
    input_items,
    new_id,
    parse,
)
from gateway.protocols.responses.stream import StreamTranslator, failed_event

__all__ = [
    "SEPARATOR",
    "ChatRequest",
    "Reply",
    "ResponsesRequest",
    "StreamTranslator",
    "failed_event",
    "flat_name",
    "from_chat",
    "input_items",
    "new_id",
    "parse",
    "to_chat",
    "tool_types_dropped",
]
