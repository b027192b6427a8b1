"""The Anthropic Messages API's wire format (/v1/messages): request and answer structs, the
stream's events, and its error shape.

Types only, no serving logic, as protocol.py is for OpenAI's API: anthropic_messages.py serves these on
chat's path. Named as the `anthropic` SDK's `types` name them (the *Param ones are requests).
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from .errors import APIError
from .protocol import MAX_STOP_CHARS, Positive, TopP

# Stop sequences: more than OpenAI's four (agents send a few), each bounded as chat's are (the
# engine builds a matcher of each for the generation, in the decode thread).
MAX_STOP_SEQUENCES = 16


class ContentBlockParam(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One block of a message's content. `type` says which fields it has; anthropic_messages.py accepts
    text, tool_use, tool_result and thinking, and refuses the rest (image, document...) by name."""

    type: str
    text: str | None = None
    id: str | None = None  # tool_use
    name: str | None = None
    input: dict | None = None
    tool_use_id: str | None = None  # tool_result
    content: str | list[ContentBlockParam] | None = None
    is_error: bool | None = None
    thinking: str | None = None  # thinking
    signature: str | None = None
    data: str | None = None  # redacted_thinking: another server's encrypted reasoning
    cache_control: dict | None = None  # a prompt-caching hint: this server reuses cached prefixes by itself


class MessageParam(msgspec.Struct, kw_only=True):
    role: Literal["user", "assistant", "system"]  # system: as some agents send it inside `messages`
    content: str | list[ContentBlockParam]


class ToolParam(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A client tool (`type` absent or "custom"), or one of Anthropic's own tools by its dated
    `type`: the client tools whose schema Anthropic publishes (bash, text editor, memory), and
    server tools (web search, code execution...) that anthropic_messages.py leaves out."""

    name: str | None = None  # every tool's but an MCP toolset's
    description: str | None = None
    input_schema: dict | None = None  # a client tool's: a JSON Schema of type object, as Anthropic requires
    strict: bool | None = None
    type: str | None = None
    cache_control: dict | None = None


class ToolChoiceParam(msgspec.Struct, kw_only=True):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None  # with type tool
    disable_parallel_tool_use: bool = False


class ThinkingParam(msgspec.Struct, kw_only=True):
    type: Literal["enabled", "adaptive", "disabled"]  # adaptive: the model decides (Qwen3's template lets it)
    budget_tokens: Positive | None = None  # with enabled


class OutputFormatParam(msgspec.Struct, kw_only=True):
    type: Literal["json_schema"]
    schema: dict


class OutputConfigParam(msgspec.Struct, kw_only=True):
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None  # one effort here: accepted, the same
    format: OutputFormatParam | None = None


class MetadataParam(msgspec.Struct, kw_only=True):
    user_id: str | None = None


class CountTokensRequest(msgspec.Struct, kw_only=True):
    """What makes a prompt: /v1/messages/count_tokens takes this, /v1/messages all of it and more."""

    model: str
    messages: Annotated[list[MessageParam], msgspec.Meta(min_length=1)]
    system: str | list[ContentBlockParam] | None = None
    tools: list[ToolParam] | None = None
    tool_choice: ToolChoiceParam | None = None
    thinking: ThinkingParam | None = None
    output_config: OutputConfigParam | None = None
    # Anthropic's hosted features, which a local model can't honour: refused, never ignored.
    mcp_servers: list | None = None
    container: str | dict | None = None


class MessagesRequest(CountTokensRequest, kw_only=True):
    max_tokens: Positive  # required, as Anthropic requires it
    stream: bool = False
    temperature: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    top_p: TopP | None = None
    top_k: Annotated[int, msgspec.Meta(ge=0)] | None = None
    stop_sequences: Annotated[list[Annotated[str, msgspec.Meta(max_length=MAX_STOP_CHARS)]],
                              msgspec.Meta(max_length=MAX_STOP_SEQUENCES)] | None = None
    metadata: MetadataParam | None = None
    service_tier: str | None = None  # one tier here: any is served the same


# --- The answer ---------------------------------------------------------------------------


class TextBlock(msgspec.Struct, kw_only=True, tag_field="type", tag="text"):
    text: str


class ThinkingBlock(msgspec.Struct, kw_only=True, tag_field="type", tag="thinking"):
    thinking: str
    signature: str = ""  # Anthropic signs its thinking; this server has nothing to sign it with


class ToolUseBlock(msgspec.Struct, kw_only=True, tag_field="type", tag="tool_use"):
    id: str
    name: str
    input: dict


ContentBlock = TextBlock | ThinkingBlock | ToolUseBlock


# model_context_window_exceeded: the answer filled the context window before max_tokens
StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use", "model_context_window_exceeded"]


class MessagesUsage(msgspec.Struct, kw_only=True):
    input_tokens: int
    output_tokens: int


class MessageResponse(msgspec.Struct, kw_only=True):
    id: str
    type: str = "message"
    role: str = "assistant"
    model: str
    content: list[ContentBlock]
    stop_reason: StopReason | None = None
    stop_sequence: str | None = None
    usage: MessagesUsage


class TokenCount(msgspec.Struct, kw_only=True):
    input_tokens: int


# --- The stream -------------------------------------------------------------------------------


class TextDelta(msgspec.Struct, kw_only=True, tag_field="type", tag="text_delta"):
    text: str


class ThinkingDelta(msgspec.Struct, kw_only=True, tag_field="type", tag="thinking_delta"):
    thinking: str


class InputJSONDelta(msgspec.Struct, kw_only=True, tag_field="type", tag="input_json_delta"):
    partial_json: str


class MessageDelta(msgspec.Struct, kw_only=True):
    stop_reason: StopReason | None
    stop_sequence: str | None


class OutputUsage(msgspec.Struct, kw_only=True):
    output_tokens: int


class ErrorDetail(msgspec.Struct, kw_only=True):
    type: str
    message: str


class StreamEvent(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One server-sent event of a streamed message: `type` says which of the other fields it has."""

    type: str
    message: MessageResponse | None = None
    index: int | None = None
    content_block: ContentBlock | None = None
    delta: TextDelta | ThinkingDelta | InputJSONDelta | MessageDelta | None = None
    usage: OutputUsage | None = None
    error: ErrorDetail | None = None


# --- Errors -----------------------------------------------------------------------------------


class ErrorResponse(msgspec.Struct, kw_only=True):
    type: str = "error"
    error: ErrorDetail


ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error"}


def error_detail(exc: APIError) -> ErrorDetail:
    """An error as Anthropic types it; the field at fault leads the message, as Anthropic's own
    messages name it (its errors have no `param`)."""
    kind = ERROR_TYPES.get(exc.status, "api_error" if exc.status >= 500 else "invalid_request_error")
    named = exc.param and exc.param not in exc.message
    return ErrorDetail(type=kind, message=f"{exc.param}: {exc.message}" if named else exc.message)


def error_body(exc: APIError) -> ErrorResponse:
    return ErrorResponse(error=error_detail(exc))
