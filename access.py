"""What every HTTP request passes through: a request id, the API key, refusal while draining,
and afterwards one JSON log line and the request metrics."""

from __future__ import annotations

import hmac
import time
import uuid

import msgspec

from config import Config
from protocol import APIError, error_body, retry_after


def request_info(request) -> dict:
    """The fields a request adds to its log line (tokens, time to first token, prompt)."""
    return request.scope["state"].setdefault("gguf", {})


ENDPOINTS = {"/v1/chat/completions", "/v1/completions", "/v1/models", "/apply-template", "/health", "/ready", "/metrics",
             "/openapi.json", "/v1/responses", "/v1/responses/input_tokens", "/v1/embeddings"}


def gate(app):
    """The ASGI app around `app` (a Litestar app) that every HTTP request passes through, routed
    or not (Litestar's own middleware runs only once a route is found, so a 404 or 405 would
    escape it): a request id, the API key on /v1/*, 503 while draining, and afterwards one JSON
    log line and the request metrics."""

    async def gated(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        state, started = app.state, time.perf_counter()
        info = scope.setdefault("state", {}).setdefault("gguf", {})
        config: Config = state.config
        headers = dict(scope["headers"])
        rid = headers.get(b"x-request-id", b"").decode(errors="replace")[:128] or uuid.uuid4().hex
        path, status = scope["path"], 500

        # Not a coroutine: every streamed token's chunk passes here, and returning send's awaitable
        # saves making a coroutine for each (one of the per-chunk cuts measured together with
        # bench/threadtime.py, see README).
        def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            return send(message)

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
            endpoint = endpoint_of(path)
            state.metrics.requests.labels(endpoint, str(status)).inc()
            line = {"request_id": rid, "model": config.model_id, "endpoint": endpoint, "method": scope["method"],
                    "status": status, **info, "duration_s": round(time.perf_counter() - started, 4)}
            print(msgspec.json.encode(line).decode(), flush=True)

    return gated


def endpoint_of(path: str) -> str:
    """The metric label and log name of a path: an endpoint, its template for ids, or "other"."""
    if path in ENDPOINTS:
        return path
    for prefix in ("/v1/models/", "/v1/responses/"):
        if path.startswith(prefix):
            return prefix + "{id}"
    return "other"


def authorized(header: bytes, keys: tuple[str, ...]) -> bool:
    """`Bearer <key>` with one of the keys, compared in constant time (every key is tried)."""
    given = header.removeprefix(b"Bearer ").strip()
    return bool(header.startswith(b"Bearer ")) & any([hmac.compare_digest(given, k.encode()) for k in keys])
