"""Anthropic's Messages API, translated to and from Chat Completions, or relayed natively.

- `request`: the whitelist of Messages fields, `parse` and `count_tokens`;
- `chat_request`: `to_chat`, the request as a Chat Completions body;
- `answer`: `from_chat`, a chat completion as a Messages answer, and the stop/usage rules;
- `stream`: `StreamTranslator`, a chat stream as Messages events, one chunk at a time;
- `native`: `native_body` and `known_betas` for providers that speak Messages themselves;
- `errors`: Anthropic's error shape, and providers' context-length refusals in its wording.

Pure code: imports nothing from the gateway but `gateway.protocols.common`.
"""

from gateway.protocols.anthropic.answer import Reply, from_chat, reply_for, stop_reason_for
from gateway.protocols.anthropic.chat_request import to_chat
from gateway.protocols.anthropic.errors import (
    error_body,
    error_event,
    error_from_chat,
    error_type,
)
from gateway.protocols.anthropic.native import known_betas, native_body
from gateway.protocols.anthropic.request import MessagesRequest, count_tokens, parse
from gateway.protocols.anthropic.stream import StreamTranslator
from gateway.protocols.common import ProtocolError

__all__ = [
    "MessagesRequest",
    "ProtocolError",
    "Reply",
    "StreamTranslator",
    "count_tokens",
    "error_body",
    "error_event",
    "error_from_chat",
    "error_type",
    "from_chat",
    "known_betas",
    "native_body",
    "parse",
    "reply_for",
    "stop_reason_for",
    "to_chat",
]
