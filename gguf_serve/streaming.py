"""Server-sent events: framing, and the stream that owns a run until its last event."""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import AsyncIterator

import msgspec
from litestar.response import Stream

from .protocol import APIError, Sampled, error_body

HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}  # proxies pass events through at once


def sse(data: bytes) -> bytes:
    return b"data: " + data + b"\n\n"


def event_stream(owner: AsyncExitStack, events: AsyncIterator[bytes]) -> Stream:
    """A streamed answer that holds `owner` (the request's run) until it ends: an error midway
    (the engine failed, the server is shutting down) ends it with an OpenAI error event, and
    however it ends, even by the client leaving, the run is left and its generations stop."""
    return Stream(_guarded(owner, events), media_type="text/event-stream", headers=HEADERS)


async def _guarded(owner: AsyncExitStack, events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    async with owner:
        try:
            async for data in events:
                yield data
        except APIError as e:
            yield sse(msgspec.json.encode(error_body(e)))
            yield sse(b"[DONE]")


def include_usage(body: Sampled) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)
