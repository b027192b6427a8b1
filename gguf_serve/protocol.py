"""The OpenAI wire format: request and response structs, errors, and strict body decoding.

Types only, no serving logic (as vLLM's `protocol`). Every struct is msgspec's: requests are
decoded strictly and answers encoded without a detour through dicts.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

import msgspec

Temperature = Annotated[float, msgspec.Meta(ge=0, le=2)]
TopP = Annotated[float, msgspec.Meta(ge=0, le=1)]
Penalty = Annotated[float, msgspec.Meta(ge=-2, le=2)]
Positive = Annotated[int, msgspec.Meta(ge=1)]
# Stop strings: OpenAI's four, each at most MAX_STOP_CHARS long (the engine builds a matcher
# of each for every choice, in the decode thread: 4 x 1,000 characters take 0.3 ms).
MAX_STOP_CHARS = 1000
StopString = Annotated[str, msgspec.Meta(max_length=MAX_STOP_CHARS)]
Stop = StopString | Annotated[list[StopString], msgspec.Meta(max_length=4)]
TopLogprobs = Annotated[int, msgspec.Meta(ge=0, le=20)]


class ContentPart(msgspec.Struct):
    type: str
    text: str | None = None


class FunctionCall(msgspec.Struct):
    name: str
    arguments: str


class CustomCall(msgspec.Struct):
    """A Chat Completions custom tool's call: the free-form input the model wrote."""

    name: str
    input: str


class ToolCall(msgspec.Struct, kw_only=True):
    """A call to a function (`function`), or on Chat Completions to a custom tool (`custom`):
    chat_tools.function_view makes every call a client sends a function call before any other
    code reads it, and chat_tools.custom_calls turns the model's back."""

    id: str
    type: Literal["function", "custom"] = "function"
    function: FunctionCall | msgspec.UnsetType = msgspec.UNSET
    custom: CustomCall | msgspec.UnsetType = msgspec.UNSET


class ChatMessage(msgspec.Struct, omit_defaults=True):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    function_call: FunctionCall | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None  # a thinking model's earlier reasoning, sent back
    reasoning: str | None = None  # the same, as vLLM and Ollama name it


class FunctionDef(msgspec.Struct):
    name: str
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


# A custom tool's grammar, as long as a client may send: Codex's apply_patch grammar is 0.6 kB.
# Compiling one is bounded by grammar.LIMITS whatever its length; this bounds the text parsed.
MAX_GRAMMAR_CHARS = 65536
GrammarText = Annotated[str, msgspec.Meta(max_length=MAX_GRAMMAR_CHARS)]


class CustomGrammar(msgspec.Struct):
    definition: GrammarText
    syntax: Literal["lark", "regex"]


class ChatCustomFormat(msgspec.Struct, kw_only=True):
    """A Chat Completions custom tool's `format`: free text, or `grammar` its input must follow
    (the Responses API has the grammar's two fields beside `type` instead: CustomToolFormat)."""

    type: Literal["text", "grammar"]
    grammar: CustomGrammar | None = None


class CustomToolDef(msgspec.Struct, kw_only=True):
    name: Annotated[str, msgspec.Meta(min_length=1)]
    description: str | None = None
    format: ChatCustomFormat | None = None


class ToolDef(msgspec.Struct):
    """A function tool (`function`), or on Chat Completions a custom tool (`custom`), which
    chat_tools.function_view shows the model as a function before any other code reads it."""

    function: FunctionDef | msgspec.UnsetType = msgspec.UNSET
    type: Literal["function", "custom"] = "function"
    custom: CustomToolDef | msgspec.UnsetType = msgspec.UNSET


class FunctionName(msgspec.Struct):
    name: str


class NamedToolChoice(msgspec.Struct):
    """A forced function, or on Chat Completions a forced custom tool (`custom`)."""

    function: FunctionName | msgspec.UnsetType = msgspec.UNSET
    type: Literal["function", "custom"] = "function"
    custom: FunctionName | msgspec.UnsetType = msgspec.UNSET


class JSONSchemaFormat(msgspec.Struct):
    name: str
    schema: dict = {}
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(msgspec.Struct):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class Sampled(msgspec.Struct, kw_only=True):
    """Fields both endpoints share. Unknown fields are ignored, as OpenAI's newer SDK fields
    (store, metadata, user...) must be; known ones that can't be honoured are refused."""

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: Positive | None = None
    n: Annotated[int, msgspec.Meta(ge=1, le=8)] = 1
    stop: Stop | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    logit_bias: dict[str, Annotated[float, msgspec.Meta(ge=-100, le=100)]] | None = None
    seed: int | None = None
    # llama.cpp's extensions
    top_k: Annotated[int, msgspec.Meta(ge=0)] | None = None
    min_p: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    repeat_penalty: Annotated[float, msgspec.Meta(gt=0, le=10)] | None = None


class ChatRequest(Sampled, kw_only=True):
    messages: Annotated[list[ChatMessage], msgspec.Meta(min_length=1)]
    max_completion_tokens: Positive | None = None
    logprobs: bool = False
    top_logprobs: TopLogprobs | None = None
    response_format: ResponseFormat | None = None
    tools: list[ToolDef] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    functions: list[FunctionDef] | None = None
    function_call: Literal["none", "auto"] | FunctionName | None = None
    # thinking models: any keys the template reads (enable_thinking...), as at llama.cpp's server
    chat_template_kwargs: dict | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None
    # OpenAI fields whose meaning a local text model can't honour: refused, never ignored.
    modalities: list[Literal["text"]] | None = None
    audio: dict | None = None
    prediction: dict | None = None
    # web search offered (a search model's): left out and named, as a hosted tool is (chat.respond)
    web_search_options: dict | None = None

    def refuse_unsupported(self) -> None:
        for field in ("audio", "prediction"):
            if getattr(self, field) is not None:
                raise APIError(400, f"`{field}` is not supported by this server", field, "unsupported_parameter")


class CompletionRequest(Sampled, kw_only=True):
    prompt: str | list[str | int | list[int]]
    logprobs: TopLogprobs | None = None
    echo: bool = False
    suffix: str | None = None


class TemplateRequest(msgspec.Struct, kw_only=True):
    model: str | None = None
    messages: Annotated[list[ChatMessage], msgspec.Meta(min_length=1)]
    tools: list[ToolDef] | None = None
    chat_template_kwargs: dict | None = None
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high"] | None = None


class PromptTokensDetails(msgspec.Struct):
    cached_tokens: int


class CompletionTokensDetails(msgspec.Struct):
    reasoning_tokens: int


class Usage(msgspec.Struct, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails
    completion_tokens_details: CompletionTokensDetails | msgspec.UnsetType = msgspec.UNSET  # thinking models


class TopLogprob(msgspec.Struct, kw_only=True):
    token: str
    logprob: float
    bytes: list[int]


class TokenInfo(TopLogprob, kw_only=True):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(msgspec.Struct, kw_only=True):
    content: list[TokenInfo]
    refusal: None = None


class TextLogprobs(msgspec.Struct, kw_only=True):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class AssistantMessage(msgspec.Struct, kw_only=True):
    role: str = "assistant"
    content: str | None
    refusal: None = None
    tool_calls: list[ToolCall] | msgspec.UnsetType = msgspec.UNSET
    function_call: FunctionCall | msgspec.UnsetType = msgspec.UNSET  # the legacy `functions` API's answer
    reasoning_content: str | None | msgspec.UnsetType = msgspec.UNSET  # thinking models (REASONING_FORMAT)
    reasoning: str | None | msgspec.UnsetType = msgspec.UNSET


class ChatChoice(msgspec.Struct, kw_only=True):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: ChatLogprobs | None = None


class ToolCallDelta(msgspec.Struct, kw_only=True):
    index: int
    id: str
    type: str = "function"
    function: FunctionCall


class CustomCallDelta(msgspec.Struct, kw_only=True):
    name: str | msgspec.UnsetType = msgspec.UNSET  # in a call's first delta
    input: str


class CustomToolCallDelta(msgspec.Struct, kw_only=True):
    """A custom tool's call streamed on Chat Completions: its id and name in the first delta,
    its input delta by delta (the shape OpenAI streams; its SDK's types know only functions'
    deltas, and keep these fields as they come)."""

    index: int
    id: str | msgspec.UnsetType = msgspec.UNSET  # in a call's first delta
    type: str = "custom"
    custom: CustomCallDelta


class Delta(msgspec.Struct, kw_only=True, omit_defaults=True):
    role: str | None = None
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[ToolCallDelta | CustomToolCallDelta] | None = None
    function_call: FunctionCall | None = None


class ChunkChoice(msgspec.Struct, kw_only=True):
    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: ChatLogprobs | None = None


class TextChoice(msgspec.Struct, kw_only=True):
    index: int
    text: str
    finish_reason: str | None = None
    logprobs: TextLogprobs | None = None


class Completion(msgspec.Struct, kw_only=True):
    """Every completion object: chat.completion, chat.completion.chunk, text_completion."""

    id: str
    object: str
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice] | list[ChunkChoice] | list[TextChoice]
    usage: Usage | msgspec.UnsetType = msgspec.UNSET  # streamed chunks carry it only when asked, last


class ModelCard(msgspec.Struct, kw_only=True):
    id: str
    object: str = "model"
    created: int
    owned_by: str = "local"
    root: str
    parent: str | None = None
    permission: list = []


class ModelList(msgspec.Struct, kw_only=True):
    object: str = "list"
    data: list[ModelCard]


class ApplyTemplateResponse(msgspec.Struct):
    prompt: str


class EmbeddingRequest(msgspec.Struct, kw_only=True):
    """POST /v1/embeddings. `input`: a string, a list of strings, a list of token ids or a list of
    token-id lists (one union array, as msgspec allows; embeddings.input_tokens sorts them out)."""

    model: str
    input: str | Annotated[list[str | int | list[int]], msgspec.Meta(min_length=1, max_length=2048)]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Positive | None = None
    user: str | None = None


class EmbeddingData(msgspec.Struct, kw_only=True):
    object: str = "embedding"
    index: int
    embedding: list[float] | str  # base64: little-endian float32


class EmbeddingUsage(msgspec.Struct, kw_only=True):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(msgspec.Struct, kw_only=True):
    object: str = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


class ErrorBody(msgspec.Struct, kw_only=True):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(msgspec.Struct, kw_only=True):
    error: ErrorBody


class APIError(Exception):
    """An OpenAI-shaped error: raised anywhere in a request, answered by `error_response`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}  # the answer's own headers, past Retry-After


CLIENT_CLOSED = 499  # as nginx logs it: the client went away before the answer (nobody reads this status)
ERROR_TYPES = {429: "rate_limit_exceeded"}  # OpenAI types a 401 as invalid_request_error too


def retry_after(exc: APIError) -> dict[str, str]:
    """A queue that is full or a model still loading clear within about a second."""
    return {"retry-after": "1"} if exc.status in (429, 503) else {}


def error_body(exc: APIError) -> ErrorResponse:
    kind = ERROR_TYPES.get(exc.status, "server_error" if exc.status >= 500 else "invalid_request_error")
    return ErrorResponse(error=ErrorBody(message=exc.message, type=kind, param=exc.param, code=exc.code))


MISSING = re.compile(r"Object missing required field `(\w+)`(?: - at `\$\.?(.*)`)?")


def decode(body: bytes, kind: type[msgspec.Struct]):
    """Decode a request body strictly (a string is not a number), naming the offending field."""
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as e:
        message = str(e)
        if missing := MISSING.fullmatch(message):  # worded as OpenAI words it, the field's path its param
            field, within = missing.groups()
            param = f"{within}.{field}" if within else field
            raise APIError(400, f"Missing required parameter: '{param}'.", param, "missing_required_parameter") from None
        param = message.rsplit("at `$.", 1)[1].rstrip("`") if "at `$." in message else None
        raise APIError(400, message, param) from None
    except (msgspec.DecodeError, UnicodeDecodeError) as e:  # invalid UTF-8 in a string is the latter
        raise APIError(400, f"the body is not valid JSON: {e}") from None


JSON_TOKEN = re.compile(rb'"(?:[^"\\]|\\.)*"|[\[\]{}]')


def deep_field(body: bytes, depth_limit: int = 256) -> str | None:
    """The top-level field of a JSON object whose value first nests deeper than `depth_limit`,
    for a body that failed to decode for its nesting (msgspec recurses as deep as Python's
    recursion limit allows, ignored fields too: a RecursionError). A Python scan, 0.5-0.7 s for
    4 MB of brackets: run it off the event loop."""
    depth, key, last_string = 0, None, None
    for token in JSON_TOKEN.finditer(body):
        text = token.group()
        if text[0] == ord('"'):
            last_string = text
        elif text in (b"[", b"{"):
            if depth == 1:
                key = last_string
            depth += 1
            if depth > depth_limit:
                return msgspec.json.decode(key) if key else None
        else:
            depth -= 1
    return None


# --- The Responses API (/v1/responses) -----------------------------------------------------
# Its requests are served on chat's path (responses.py turns one into a ChatRequest); these are
# its own wire shapes, as the openai SDK's `types/responses` describe them.


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


class FunctionCallItem(msgspec.Struct, kw_only=True, tag_field="type", tag="function_call"):
    id: str
    status: Literal["in_progress", "completed", "incomplete"]
    call_id: str
    name: str
    namespace: str | msgspec.UnsetType = msgspec.UNSET  # a namespace tool's function: its namespace apart
    arguments: str


class CustomToolCallItem(msgspec.Struct, kw_only=True, tag_field="type", tag="custom_tool_call"):
    id: str
    status: Literal["in_progress", "completed", "incomplete"]
    call_id: str
    name: str
    namespace: str | msgspec.UnsetType = msgspec.UNSET
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

