"""gguf-serve: one GGUF model behind the OpenAI HTTP API.

    gguf-serve --model smollm2-135m-instruct     # or: granian --interface asgi gguf_serve.service:app

Read top to bottom: the app factory, its lifespan (model load, drain on SIGTERM), the routes,
and the route table that lists them once for Litestar, the access gate and /openapi.json.
Each route decodes its body (protocol), finds the served model and hands over to the module
that serves it (chat, completions, responses, messages). Importing this module does nothing else: the app is made
when `gguf_serve.service:app` is first asked for.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
import traceback
from contextlib import asynccontextmanager
from typing import AsyncIterator, get_type_hints

import msgspec
import prometheus_client
from litestar import Litestar, Request, Response
from litestar.datastructures import State
from litestar.config.cors import CORSConfig
from litestar.exceptions import HTTPException
from litestar.handlers import HTTPRouteHandler

from . import anthropic_messages, chat, chat_tools, completions, connections, embeddings_api, jobs, loading, responses
from .access import api_key, api_of, authorized, gate
from .anthropic_protocol import CountTokensRequest, MessagesRequest, TokenCount
from .bodies import decode, deep_field, read_body
from .config import Config, ConfigError, load_config
from .errors import APIError, retry_after
from .lifecycle import off_loop, queued, server_state
from .loading import Served
from .model import ModelFileError, check_model_file
from .protocol import (ApplyTemplateResponse, ChatRequest, CompletionRequest, EmbeddingRequest, ModelCard, ModelList,
                       TemplateRequest)
from .response_store import MemoryStore, ResponseStore
from .responses_protocol import DeletedResponse, InputTokenCount, ResponseObject, ResponsesInput, ResponsesRequest
from .routes import Route, error_body, openapi
from .runs import Runs
from .state import ServerState

# --- The app --------------------------------------------------------------------------------


def create_app(env: dict[str, str] = os.environ, started: loading.Loading | None = None, config: Config | None = None):
    """The ASGI app for one model, configured from `env`: Litestar's, inside the access gate.
    `started`: its loading, and `config` what it loads, if the caller began it (`gguf-serve` does, before
    importing this: the configuration is not read twice, a Hub model not looked up twice).
    Raises ConfigError or ModelFileError with one line when the configuration can't work."""
    if config is None:
        config = load_config(env)
        check_model_file(config.model_path)
    started = started or loading.start_loading(config)  # overlaps building the app and starting the server
    state = ServerState(config, started, response_store(config), Runs(config.parallel + config.max_queue))
    app = Litestar(
        [route_handler(route) for route in ROUTES],
        lifespan=[lifespan],
        exception_handlers={Exception: error_response},
        cors_config=CORSConfig(allow_origins=list(config.cors_origins)) if config.cors_origins else None,
        request_max_body_size=config.max_body_bytes,
        openapi_config=None,
        state=State({"server": state}),
    )
    return gate(app, state, ROUTES)


def response_store(config: Config) -> ResponseStore:
    """The store RESPONSES_STORE_URL names (Redis or Valkey), or this process's own."""
    bounds = (config.responses_store_max, config.responses_store_ttl_s, config.responses_store_max_bytes)
    if config.responses_store_url:
        from .redis_store import RedisStore  # only then: a server that doesn't use it doesn't import redis-py

        return RedisStore(config.responses_store_url, *bounds, config.responses_store_timeout_s)
    return MemoryStore(*bounds)


def __getattr__(name: str):
    """`app`, made when first asked for (by granian's worker): a configuration that
    can't work stops the process with one line, not a traceback."""
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    global app
    try:
        app = create_app()
    except (ConfigError, ModelFileError) as e:
        sys.exit(f"gguf-serve: {e}")
    return app


def error_response(request: Request, exc: Exception) -> Response:
    if not isinstance(exc, APIError):
        if isinstance(exc, HTTPException):
            exc = APIError(exc.status_code, exc.detail)
        else:
            traceback.print_exception(exc)  # a defect: its traceback goes to the log
            exc = APIError(500, f"internal error: {type(exc).__name__}")
    return Response(error_body(api_of(request.scope), exc), status_code=exc.status,
                    headers={**retry_after(exc), **exc.headers})


# --- Lifespan: load, serve, drain -----------------------------------------------------------


@asynccontextmanager
async def lifespan(app: Litestar) -> AsyncIterator[None]:
    """The model loads in the background, so that /health answers at once and /ready turns 200
    only once the model is loaded and has produced a token. A load that fails ends the process
    with one line. On SIGTERM the service drains: see `drain`. Connections that send nothing are
    closed after IDLE_TIMEOUT_S (connections.py), here, so in `granian ... service:app`'s worker too."""
    state: ServerState = app.state.server
    load = asyncio.create_task(load_model(state))
    on_termination(asyncio.get_running_loop(), lambda: drain(state))
    connections.raise_fd_limit()
    silent = connections.watch(state.config.idle_timeout_s)
    try:
        yield
    finally:
        silent.set()
        load.cancel()
        if state.served:
            ends = state.drain_ends or time.monotonic() + state.config.shutdown_grace_s
            await asyncio.to_thread(loading.stop, state.served, ends)


async def load_model(state: ServerState) -> None:
    config = state.config
    try:
        on_failure = lambda reason: fail(state, reason)  # noqa: E731
        served = await loading.load(config, state.loading, on_failure)
    except (ConfigError, ModelFileError, loading.StartError) as e:
        exit_at_start(str(e))
    except Exception as e:  # anything else a hostile or broken file raises (metadata it can't read...)
        exit_at_start(f"{config.model_path}: can't be loaded ({type(e).__name__}: {e})")
    state.metrics.model_load.set(served.timings["load"])
    state.served = served
    # One line, as the request log's: how long this cold start took, step by step.
    seconds = {**{step: round(s, 3) for step, s in served.timings.items()}, "ready": loading.since_process_start()}
    print(msgspec.json.encode({"event": "ready", "model": config.model_id, "seconds": seconds}).decode(), flush=True)


def exit_at_start(reason: str) -> None:
    """A failed load ends the process at once, non-zero, with one line (not an ASGI traceback,
    and not a task dying quietly while /ready stays 503 for ever)."""
    print(f"gguf-serve: {reason}", file=sys.stderr, flush=True)
    os._exit(1)


def fail(state: ServerState, reason: str) -> None:
    """The decode thread died, having failed every generation in flight with an error event:
    this process can't serve any more, so it leaves, non-zero, for the platform to restart it,
    once those events have had a moment to reach their clients."""
    state.served = None  # /ready 503, new requests 503
    print(f"gguf-serve: {reason}; exiting so that the process is restarted", file=sys.stderr, flush=True)
    asyncio.get_running_loop().call_later(1.0, os._exit, 1)


def on_termination(loop: asyncio.AbstractEventLoop, callback) -> None:
    """Also call `callback` when this worker is told to stop. granian's own handlers stay: they
    are registered with the event loop, which learns of a signal through its wakeup fd whatever
    Python-level handler is set, so the handler set here runs beside them."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: loop.call_soon_threadsafe(callback))


def drain(state: ServerState) -> None:
    """Stop taking requests (503) and give those in flight SHUTDOWN_GRACE_S to finish; any
    still running then end with an error event rather than a silent cut."""
    if state.draining:
        return
    state.draining, state.drain_ends = True, time.monotonic() + state.config.shutdown_grace_s
    shutting_down = APIError(503, "the server is shutting down; retry on another instance", None, "server_shutting_down")
    asyncio.get_running_loop().call_later(state.config.shutdown_grace_s, state.runs.abort, shutting_down)


# --- Routes ---------------------------------------------------------------------------------


def ready(request: Request) -> Served:
    served = server_state(request).served
    if served is None:
        raise APIError(503, "the model is still loading; retry shortly", None, "model_loading")
    return served


def served_model(request: Request, name: str | None) -> Served:
    """The served model, if `name` names it (endpoints where `model` is optional pass None)."""
    served = ready(request)
    if name is not None and name not in served.config.aliases:
        raise APIError(404, f"The model {echoed(name)} does not exist; this server serves `{served.config.model_id}`.",
                       "model", "model_not_found")
    return served


ECHOED = 256  # the most of a client's model name an error echoes: the body may hold MAX_BODY_BYTES of it


def echoed(name: str) -> str:
    if len(name) <= ECHOED:
        return f"`{name}`"
    return f"`{name[:ECHOED]}`... (cut to its first {ECHOED} of {len(name)} characters)"


def generating_model(request: Request, name: str | None) -> Served:
    """The served model for an endpoint that generates text: not an embedding model."""
    served = served_model(request, name)
    if served.model.embedding_only:
        raise APIError(400, f"`{served.config.model_id}` is an embedding model: it serves /v1/embeddings only", "model",
                       "model_not_supported")
    return served


async def parse(request: Request, kind: type[msgspec.Struct]):
    body = await read_body(request, server_state(request).config.max_body_bytes)
    try:
        return decode(body, kind)
    except RecursionError:
        param = await off_loop(deep_field, body)  # a scan that would hold every stream for 0.5 s
        raise APIError(400, "the body nests arrays and objects too deeply", param) from None


def health() -> dict[str, str]:
    """Liveness: 200 as soon as the process serves HTTP; never waits on the model."""
    return {"status": "ok"}


async def readiness(request: Request) -> dict[str, str]:
    """Readiness: 200 once the model is loaded and has made a warm-up token; 503 before, and while
    draining.

    So a platform or proxy only routes to ready instances. A shared response store that can't be
    reached is said here: a 503 with RESPONSES_STORE_REQUIRED=1, else the instance serves (all but
    stored responses) and says so.

    Which database and what error only to a client that sends a valid API key; to any other,
    "unavailable" (the store logs the details once, when it goes down). With no API_KEY set
    nobody can prove to be the operator, so nobody gets them: /ready is the path a platform's
    probes, monitors and whatever else reaches the port call without any key, and a database's
    address and error are of use only to the operator, who has the log."""
    state = server_state(request)
    if state.draining:
        raise APIError(503, "the server is shutting down", None, "server_shutting_down")
    ready(request)
    store_down = await state.responses.status()
    if not store_down:
        return {"status": "ready"}
    detailed = authorized(api_key(dict(request.scope["headers"])), state.config.api_keys)
    if state.config.responses_store_required:
        raise APIError(503, store_down if detailed else "the response store is unavailable", None,
                       "responses_store_unavailable")
    return {"status": "ready", "responses_store": store_down if detailed else "unavailable"}


def metrics(request: Request) -> Response:
    """Prometheus metrics."""
    return Response(prometheus_client.generate_latest(server_state(request).metrics.registry),
                    media_type=prometheus_client.CONTENT_TYPE_LATEST)


def list_models(request: Request) -> ModelList:
    """The served model, in a list of one."""
    return ModelList(data=[model_card(ready(request))])


def get_model(request: Request, model_id: str) -> ModelCard:
    """The served model; an alias finds it too."""
    return model_card(served_model(request, model_id.lstrip("/")))


def model_card(served: Served) -> ModelCard:
    return ModelCard(id=served.config.model_id, created=served.created, root=served.config.model_id)


def openapi_document(request: Request) -> dict:
    """This server's OpenAPI 3.1 description.

    Generated on first ask from the route table and protocol's structs."""
    state = server_state(request)
    if state.openapi is None:
        state.openapi = openapi(ROUTES, sorted(state.config.aliases))
    return state.openapi


async def chat_completions(request: Request, body: ChatRequest) -> Response:
    """Chat, streamed (server-sent events) or not: tools, `response_format`, logprobs, `n`, thinking models."""
    return await chat.respond(request, generating_model(request, body.model), body)


async def completions_route(request: Request, body: CompletionRequest) -> Response:
    """Raw text completion (default `max_tokens` 16, as at OpenAI), `echo`, `suffix`, logprobs."""
    return await completions.respond(request, generating_model(request, body.model), body)


async def apply_template(request: Request, body: TemplateRequest) -> ApplyTemplateResponse:
    """The prompt a chat request would produce, `{"prompt": ...}` (as llama.cpp's server answers)."""
    body = chat_tools.template_view(body)
    served = generating_model(request, body.model or None)
    prompt = await queued(request, served, jobs.chat_prompt, served, body.messages, body.tools,
                          jobs.template_kwargs(served, body))
    return ApplyTemplateResponse(prompt.text)


async def create_response(request: Request, body: ResponsesRequest) -> Response:
    """OpenAI's Responses API on chat's engine path, streamed (named events) or not; stored by default."""
    return await responses.respond(request, generating_model(request, body.model), body)


async def count_input_tokens(request: Request, body: ResponsesInput) -> InputTokenCount:
    """A Responses request's input tokens, counted without generating."""
    served = generating_model(request, body.model or None)
    return await queued(request, served, responses.count_input_tokens, request, served, body,
                        await responses.history(request, body))


async def retrieve_response(request: Request, response_id: str) -> ResponseObject:
    """A stored response (the API key's that made it)."""
    return (await responses.store(request).get(response_id)).response


async def delete_response(request: Request, response_id: str) -> DeletedResponse:
    """Deletes a stored response."""
    await responses.store(request).delete(response_id)
    return DeletedResponse(id=response_id)


async def create_message(request: Request, body: MessagesRequest) -> Response:
    """Anthropic's Messages API on chat's engine path, streamed (Anthropic's events) or not; errors in its shape."""
    return await anthropic_messages.respond(request, generating_model(request, body.model), body)


async def count_message_tokens(request: Request, body: CountTokensRequest) -> TokenCount:
    """A Messages request's input tokens, counted without generating."""
    served = generating_model(request, body.model)
    return await queued(request, served, anthropic_messages.count_tokens, request, served, body)


async def embeddings_route(request: Request, body: EmbeddingRequest) -> Response:
    """One L2-normalised vector per input (float or base64; `dimensions` on matryoshka models)."""
    return await embeddings_api.respond(request, served_model(request, body.model), body)


# --- The route table ------------------------------------------------------------------------
# Every route, once: Litestar routes these, the access gate keys them (all but the probes) and
# names them in metrics, and /openapi.json describes them.

ROUTES = (
    Route("GET", "/health", health, public=True),
    Route("GET", "/ready", readiness, public=True),
    Route("GET", "/metrics", metrics),
    Route("GET", "/openapi.json", openapi_document),
    Route("GET", "/v1/models", list_models),
    Route("GET", "/v1/models/{model_id:path}", get_model),
    Route("POST", "/v1/chat/completions", chat_completions),
    Route("POST", "/v1/completions", completions_route),
    Route("POST", "/apply-template", apply_template),
    Route("POST", "/v1/responses", create_response),
    Route("POST", "/v1/responses/input_tokens", count_input_tokens),
    Route("GET", "/v1/responses/{response_id:str}", retrieve_response),
    Route("DELETE", "/v1/responses/{response_id:str}", delete_response),
    Route("POST", "/v1/embeddings", embeddings_route),
    Route("POST", "/v1/messages", create_message, api="anthropic"),
    Route("POST", "/v1/messages/count_tokens", count_message_tokens, api="anthropic"),
)


def route_handler(route: Route) -> HTTPRouteHandler:
    """Litestar's handler for a route: its body decoded (`parse`) for a handler that takes one; 200
    on success (not POST's 201 or DELETE's 204); a plain function (each is quick) runs on the event loop."""
    handler, kind = route.handler, route.body
    if kind is not None:
        async def decoded(request: Request):
            return await handler(request, await parse(request, kind))

        # Litestar names an operation by its function, and lets a handler typed to return a Response
        # (a stream's) keep its own media type, where any other type would make it JSON's.
        decoded.__name__ = handler.__name__
        decoded.__annotations__ = {"request": Request, "return": get_type_hints(handler)["return"]}
    in_loop = {} if asyncio.iscoroutinefunction(handler) else {"sync_to_thread": False}
    return HTTPRouteHandler(route.path, http_method=route.method, status_code=200, **in_loop)(
        decoded if kind is not None else handler)
