"""Server-sent events: framing, and the stream that owns a run until its last event."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from typing import AsyncIterator

import msgspec
from litestar.response import Stream

from .errors import APIError
from .protocol import Sampled
from .routes import API, error_body

HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}  # proxies pass events through at once
# What a stream sends when it has had nothing to send for SSE_KEEPALIVE_S: a comment line, which
# SSE clients skip (the OpenAI SDKs, eventsource parsers); on Anthropic's API, its `ping` event,
# which its streams may carry any number of times.
COMMENT = b": keep-alive\n\n"
PING = b'event: ping\ndata: {"type":"ping"}\n\n'


def sse(data: bytes) -> bytes:
    return b"data: " + data + b"\n\n"


def named_sse(kind: str, data: bytes) -> bytes:
    """An event with its name (`event:`), as the Responses and Anthropic streams send them."""
    return b"event: " + kind.encode() + b"\n" + sse(data)


TEXT_MARK = "\0"  # a text no model writes, in an event encoded once to be split around it


def around_text(encoded: bytes) -> tuple[bytes, bytes]:
    """An encoded event whose last string is TEXT_MARK -> what comes before and after that
    string: a token's event is then `before + msgspec.json.encode(text) + after`, only the text
    encoded per token, not the event's structs. The text being the event's last string, the
    split is there whatever the strings before it hold."""
    before, _, after = encoded.rpartition(b'"\\u0000"')
    return before, after


def event_stream(owner: AsyncExitStack, events: AsyncIterator[bytes], api: API, keepalive_s: float) -> Stream:
    """A streamed answer that holds `owner` (the request's run) until it ends: an error midway
    (the engine failed, the server is shutting down) ends it with `api`'s error event, and
    however it ends, even by the client leaving, the run is left and its generations stop.
    While no event comes for `keepalive_s` (a long prompt computed, a queue waited in), it sends
    `api`'s keep-alive: clients and proxies cut a stream silent for long (nginx after
    proxy_read_timeout; Claude Code's byte watchdog, while its 20k-token prompt is computed)."""
    return Stream(_guarded(owner, events, api, keepalive_s), media_type="text/event-stream", headers=HEADERS)


async def _guarded(owner: AsyncExitStack, events: AsyncIterator[bytes], api: API,
                   keepalive_s: float) -> AsyncIterator[bytes]:
    keepalive = PING if api == "anthropic" else COMMENT
    async with owner:
        pending: asyncio.Future | None = None
        try:
            while True:
                pending = pending or asyncio.ensure_future(anext(events))
                done, _ = await asyncio.wait((pending,), timeout=keepalive_s)
                if not done:
                    yield keepalive
                    continue
                data, pending = pending, None
                try:
                    yield data.result()
                except StopAsyncIteration:
                    return
        except APIError as e:
            for data in error_events(api, e):
                yield data
        finally:
            if pending is not None:  # the client left while the events' next one was awaited
                pending.cancel()
                await asyncio.gather(pending, return_exceptions=True)
            await events.aclose()


def error_events(api: API, error: APIError) -> list[bytes]:
    """How a stream of `api` ends on an error: OpenAI's, its error object then `[DONE]`; Anthropic's,
    an `error` event."""
    encoded = msgspec.json.encode(error_body(api, error))
    return [named_sse("error", encoded)] if api == "anthropic" else [sse(encoded), sse(b"[DONE]")]


def include_usage(body: Sampled) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)
