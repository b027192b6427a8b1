"""The Responses API's wire format (/v1/responses): input items, tools, output items, the response
object and its stream's events, as the openai SDK's `types/responses` describe them.

Types only, no serving logic: responses.py serves these on chat's path (a request becomes a
ChatRequest).
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from .protocol import ContentPart, GrammarText, Positive, Temperature, TopLogprobs, TopP


class LocalShellAction(msgspec.Struct, kw_only=True):
    """A `local_shell_call`'s `action`: the command an agent runs on its machine."""

    type: Literal["exec"] = "exec"
    command: list[str]
    env: dict[str, str] | None = None
    timeout_ms: int | None = None
    working_directory: str | None = None
    user: str | None = None


class InputItem(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One item of `input`: a message (its `type` may be left out), a call the model made (to
    a function, a custom tool, the local shell), or that call's output. One struct for every
    type, so that a missing or misplaced field is a 400 naming `input[i].<field>` rather than a
    failed union match."""

    type: str = "message"
    role: Literal["user", "system", "developer", "assistant"] | None = None
    content: str | list[ContentPart] | None = None
    summary: list[ContentPart] | None = None  # a reasoning item's
    encrypted_content: str | None = None  # a reasoning item's, from OpenAI's own models: meaningless here
    id: str | None = None
    status: str | None = None
    call_id: str | None = None
    name: str | None = None
    namespace: str | None = None  # a call to a tool of a `namespace` tool
    arguments: str | None = None  # a function call's
    input: str | None = None  # a custom tool call's
    action: LocalShellAction | None = None  # a local shell call's
    output: str | list[ContentPart] | None = None


class CustomToolFormat(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A custom tool's `format`: free text, or a grammar its input must follow."""

    type: Literal["text", "grammar"]
    syntax: Literal["lark", "regex"] | None = None
    definition: GrammarText | None = None


class ResponsesTool(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A tool: a function (`name`, `description`, `parameters`, `strict`), a `namespace` of
    functions and custom tools (`name`, `description`, `tools`), a `custom` tool (`name`,
    `description`, `format`), `local_shell`; other types (OpenAI's hosted tools) decode too, to
    be left out (responses_tools.py) or refused by name."""

    type: str
    name: str | None = None
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None
    tools: list[ResponsesTool] | None = None  # a namespace's
    format: CustomToolFormat | None = None  # a custom tool's


class ResponsesToolChoice(msgspec.Struct, kw_only=True, omit_defaults=True):
    type: str
    name: str | None = None


class TextFormat(msgspec.Struct, kw_only=True, omit_defaults=True):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema: dict | None = None
    strict: bool | None = None
    description: str | None = None


class TextConfig(msgspec.Struct, kw_only=True, omit_defaults=True):
    format: TextFormat = msgspec.field(default_factory=lambda: TextFormat(type="text"))
    verbosity: Literal["low", "medium", "high"] | None = None


class ReasoningConfig(msgspec.Struct, kw_only=True):
    """`reasoning`: `effort` as chat's `reasoning_effort` (none/minimal switch thinking off where
    the template can); no summaries are written, so `summary` is accepted and echoed only."""

    effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    summary: Literal["auto", "concise", "detailed"] | None = None


class ResponsesInput(msgspec.Struct, kw_only=True):
    """What makes a Responses prompt: the fields POST /v1/responses/input_tokens takes too."""

    model: str | None = None
    input: str | list[InputItem] | None = None
    instructions: str | None = None
    previous_response_id: str | None = None
    tools: list[ResponsesTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | ResponsesToolChoice | None = None
    parallel_tool_calls: bool = True
    text: TextConfig | None = None
    reasoning: ReasoningConfig | None = None
    # OpenAI features this server has no part of: refused, never ignored.
    conversation: str | dict | None = None
    prompt: dict | None = None


class ResponsesRequest(ResponsesInput, kw_only=True):
    """POST /v1/responses. Unknown fields are ignored as on chat (`truncation`,
    `prompt_cache_key`...); `stop` and the penalties are not Responses fields."""

    model: str
    stream: bool = False
    include: list[str] | None = None  # of what OpenAI may add, only "message.output_text.logprobs" means anything here
    top_logprobs: TopLogprobs | None = None
    store: bool = True
    max_output_tokens: Positive | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    seed: int | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    background: bool = False
    # llama.cpp's extensions, as on chat
    top_k: Annotated[int, msgspec.Meta(ge=0)] | None = None
    min_p: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    repeat_penalty: Annotated[float, msgspec.Meta(gt=0, le=10)] | None = None


class OutputText(msgspec.Struct, kw_only=True, tag_field="type", tag="output_text"):
    text: str
    annotations: list = []
    logprobs: list = []


class OutputMessage(msgspec.Struct, kw_only=True, tag_field="type", tag="message"):
    id: str
    status: Literal["in_progress", "completed", "incomplete"]
    role: str = "assistant"
    content: list[OutputText]


class NamedCallItem(msgspec.Struct, kw_only=True):
    """What a function's and a custom tool's call items share."""

    id: str
    status: Literal["in_progress", "completed", "incomplete"]
    call_id: str
    name: str
    namespace: str | msgspec.UnsetType = msgspec.UNSET  # a namespace tool's: its namespace apart


class FunctionCallItem(NamedCallItem, kw_only=True, tag_field="type", tag="function_call"):
    arguments: str


class CustomToolCallItem(NamedCallItem, kw_only=True, tag_field="type", tag="custom_tool_call"):
    input: str


class LocalShellCallItem(msgspec.Struct, kw_only=True, tag_field="type", tag="local_shell_call"):
    id: str
    status: Literal["in_progress", "completed", "incomplete"]
    call_id: str
    action: LocalShellAction


class ReasoningText(msgspec.Struct, kw_only=True, tag_field="type", tag="reasoning_text"):
    text: str


class ReasoningItem(msgspec.Struct, kw_only=True, tag_field="type", tag="reasoning"):
    """A thinking model's reasoning: its own words (`content`), no summary."""

    id: str
    status: Literal["in_progress", "completed", "incomplete"]
    summary: list = []
    content: list[ReasoningText]


CallItem = FunctionCallItem | CustomToolCallItem | LocalShellCallItem
OutputItem = ReasoningItem | OutputMessage | FunctionCallItem | CustomToolCallItem | LocalShellCallItem


class InputTokensDetails(msgspec.Struct, kw_only=True):
    cached_tokens: int  # prompt tokens whose KV was reused rather than computed
    cache_write_tokens: int = 0  # OpenAI's billed prompt-cache writes: none here


class OutputTokensDetails(msgspec.Struct, kw_only=True):
    reasoning_tokens: int = 0


class ResponseUsage(msgspec.Struct, kw_only=True):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class IncompleteDetails(msgspec.Struct, kw_only=True):
    reason: Literal["max_output_tokens"]


class ResponseError(msgspec.Struct, kw_only=True):
    code: str
    message: str


class ResponseObject(msgspec.Struct, kw_only=True):
    """A response as OpenAI returns it: the answer's output items, its usage, and the
    request's settings echoed (sampling as applied, the model's defaults included)."""

    id: str
    object: str = "response"
    created_at: int
    completed_at: int | None = None
    status: Literal["in_progress", "completed", "incomplete", "failed"]
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    model: str
    output: list[OutputItem]
    usage: ResponseUsage | None = None
    instructions: str | None
    max_output_tokens: int | None
    temperature: float
    top_p: float
    tools: list[ResponsesTool]
    tool_choice: str | ResponsesToolChoice
    parallel_tool_calls: bool
    text: TextConfig
    top_logprobs: int | None = None
    previous_response_id: str | None
    store: bool
    metadata: dict[str, str]
    user: str | None
    background: bool = False
    truncation: str = "disabled"
    service_tier: str = "default"
    reasoning: ReasoningConfig = msgspec.field(default_factory=ReasoningConfig)


class StreamEvent(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One server-sent event of a streamed response: `type` says which of the other fields it has."""

    type: str
    sequence_number: int
    response: ResponseObject | None = None
    output_index: int | None = None
    item_id: str | None = None
    content_index: int | None = None
    item: OutputItem | None = None
    part: OutputText | ReasoningText | None = None
    delta: str | None = None
    text: str | None = None
    arguments: str | None = None
    input: str | None = None  # response.custom_tool_call_input.done's
    logprobs: list | None = None


class InputTokenCount(msgspec.Struct, kw_only=True):
    object: str = "response.input_tokens"
    input_tokens: int


class DeletedResponse(msgspec.Struct, kw_only=True):
    id: str
    object: str = "response"
    deleted: bool = True
