"""The OpenAI wire format of Chat Completions, Completions, embeddings and models: request and
answer structs (the Responses API's are responses_protocol.py's, Anthropic's anthropic_protocol.py's).

Types only, no serving logic (as vLLM's `protocol`). Every struct is msgspec's: requests are
decoded strictly (bodies.decode) and answers encoded without a detour through dicts.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from .errors import APIError

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


class FunctionCallDelta(msgspec.Struct, kw_only=True):
    name: str | msgspec.UnsetType = msgspec.UNSET  # in a call's first delta
    arguments: str


class ToolCallDelta(msgspec.Struct, kw_only=True):
    """A function call streamed: its id, type and name in its first delta, its arguments delta by delta."""

    index: int
    id: str | msgspec.UnsetType = msgspec.UNSET
    type: str | msgspec.UnsetType = msgspec.UNSET
    function: FunctionCallDelta


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
    token-id lists (one union array, as msgspec allows; embeddings_api.input_tokens sorts them out)."""

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
