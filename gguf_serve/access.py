"""What every HTTP request passes through: a request id, the API key, refusal while draining,
a deadline for its body, and afterwards one JSON log line and the request metrics."""

from __future__ import annotations

import asyncio
import hmac
import os
import socket
import time
import uuid
from typing import TYPE_CHECKING

import msgspec

from .errors import APIError, retry_after
from .routes import API, Route, api_finder, endpoint_namer, error_body

if TYPE_CHECKING:
    from .state import ServerState


API_OF = "gguf_api"  # where the gate leaves, in a request's scope state, the API its route speaks


def api_of(scope) -> API:
    """The API whose shape the request's errors take (its route's: routes.api_finder), as the gate found it."""
    return scope["state"].get(API_OF, "openai")


def request_info(request) -> dict:
    """The fields a request adds to its log line (tokens, time to first token, prompt)."""
    return request.scope["state"].setdefault("gguf", {})


TOOLS_IGNORED = "tools_ignored"  # its log line's field, and (as x-gguf-tools-ignored) its answer's header


def ignore_tools(request, kinds: list[str]) -> None:
    """Hosted tools a request offered and the prompt left out (this server can't run them),
    named in its log line and in its answer's `x-gguf-tools-ignored` header, so that a client
    learns why the model never calls them. `kinds` are tool types matched against a fixed list
    (responses_tools.HOSTED, anthropic_messages.SERVER_TOOLS): no other client text reaches the header."""
    if kinds:
        request_info(request)[TOOLS_IGNORED] = kinds


def gate(app, state: ServerState, routes: tuple[Route, ...]):
    """The ASGI app around `app` (a Litestar app serving `routes`, with `state`) that every HTTP
    request passes through, routed or not (Litestar's own middleware runs only once a route is
    found, so a 404 or 405 would escape it): a request id, the API key, 503 while draining, a
    deadline for its body (BODY_TIMEOUT_S), and afterwards one JSON log line and the request metrics.

    Only the exact paths of the probes (and those PUBLIC_PATHS names) are open: Litestar routes
    a path after collapsing its slashes (`//v1/chat/completions`, `/%2Fv1/...` as granian
    decodes it), so any other path, whatever route it reaches, needs the key and is refused
    while draining. A CORS preflight (OPTIONS, never sent with a key) is Litestar's own answer,
    which runs no handler."""
    config = state.config
    probes = frozenset(route.path for route in routes if route.public)
    public = probes | frozenset(config.public_paths)
    endpoint_of, api_of_path = endpoint_namer(routes), api_finder(routes)
    # Which instance answered, on every answer but a refused key: behind a fleet, what a client or
    # a test reads to know where a request landed (the host name is the container's, the pid
    # granian's worker). A client without a valid key learns nothing of the host.
    instance = f"{socket.gethostname()}:{os.getpid()}".encode()

    async def gated(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        started = time.perf_counter()
        scope_state = scope.setdefault("state", {})
        info = scope_state.setdefault("gguf", {})
        api = scope_state[API_OF] = api_of_path(scope["path"])
        headers = dict(scope["headers"])
        rid = headers.get(b"x-request-id", b"").decode(errors="replace")[:128] or uuid.uuid4().hex
        path, status, named = scope["path"], 500, True
        arrival = BodyDeadline(receive, config.body_timeout_s)

        # Not a coroutine: every streamed token's chunk passes here, and returning send's awaitable
        # saves making a coroutine for each (one of the per-chunk cuts measured together with
        # `python -m bench threadtime`, see docs/performance.md).
        def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                ignored = info.get(TOOLS_IGNORED)
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode()),
                                      *([(b"x-instance-id", instance)] if named else []),
                                      *([(b"x-gguf-tools-ignored", ",".join(ignored).encode())] if ignored else [])]
                if arrival.expired:
                    message["headers"].append((b"connection", b"close"))
            return send(message)

        try:
            refusal = None
            if path not in probes and scope["method"] != "OPTIONS":
                if config.api_keys and path not in public and not authorized(api_key(headers), config.api_keys):
                    named = False
                    refusal = APIError(401, "Incorrect or missing API key: send `Authorization: Bearer <key>` or "
                                            "`x-api-key: <key>`.", None, "invalid_api_key")
                elif state.draining:
                    refusal = APIError(503, "the server is shutting down; retry on another instance", None, "server_shutting_down")
            if refusal:
                body = msgspec.json.encode(error_body(api, refusal))
                headers = [(b"content-type", b"application/json"), *((k.encode(), v.encode()) for k, v in retry_after(refusal).items())]
                await send_with_id({"type": "http.response.start", "status": refusal.status, "headers": headers})
                await send_with_id({"type": "http.response.body", "body": body})
            else:
                await app(scope, arrival.receive, send_with_id)
        finally:
            endpoint = endpoint_of(scope["path"])  # Litestar sets the path it routed on
            state.metrics.requests.labels(endpoint, str(status)).inc()
            line = {"request_id": rid, "model": config.model_id, "endpoint": endpoint, "method": scope["method"],
                    "status": status, **info, "duration_s": round(time.perf_counter() - started, 4)}
            print(msgspec.json.encode(line).decode(), flush=True)

    return gated


class BodyDeadline:
    """`receive` with a deadline for the request's body: what granian's server lacks, a bound on
    how long a client may take to send it (hyper bounds the head only). Past `timeout_s` after
    the head came, the request is a 408 (`code: "body_timeout"`), and its answer closes the
    connection (`expired`), so that a trickled body holds neither a request nor a connection.
    Once the body is in, `receive` is granian's own (a stream waits on it for the client to leave)."""

    def __init__(self, receive, timeout_s: float):
        self.granian_receive, self.timeout_s = receive, timeout_s
        self.deadline = asyncio.get_running_loop().time() + timeout_s
        self.arrived = self.expired = False

    async def receive(self):
        if self.arrived:
            return await self.granian_receive()
        try:
            async with asyncio.timeout_at(self.deadline):
                message = await self.granian_receive()
        except TimeoutError:
            self.expired = True
            raise APIError(408, f"the request body did not arrive within {self.timeout_s:g} s (BODY_TIMEOUT_S)", None,
                           "body_timeout") from None
        self.arrived = message["type"] != "http.request" or not message.get("more_body", False)
        return message


def api_key(headers: dict[bytes, bytes]) -> bytes:
    """The key a request sends: `Authorization: Bearer <key>` (OpenAI's clients) or `x-api-key`
    (Anthropic's); b"" if neither."""
    bearer = headers.get(b"authorization", b"")
    return bearer.removeprefix(b"Bearer ").strip() if bearer.startswith(b"Bearer ") else headers.get(b"x-api-key", b"").strip()


def authorized(given: bytes, keys: tuple[str, ...]) -> bool:
    """`given` is one of the keys, compared in constant time (every key is tried)."""
    return bool(given) & any([hmac.compare_digest(given, k.encode()) for k in keys])
