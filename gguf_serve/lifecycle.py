"""One request's life, the same for chat, completions, responses and embeddings: admitted against the queue
(a 429 before any work), its slow work (render, tokenize, compile a grammar) done in a worker
thread (of the render lane when it renders the model's own template), its work submitted to the
engine, then streamed (the stream owns the run until its last event) or collected (a client
that leaves first gets a 499); however it ends, leaving the run stops what still runs, as
llama.cpp's server cancels a reader's tasks when it goes out of scope.
"""

from __future__ import annotations

import asyncio
import contextvars
from concurrent.futures import Executor
from contextlib import AsyncExitStack
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

from litestar import Request, Response

from .access import api_of, request_info
from .embedder import EmbeddingJob
from .errors import CLIENT_CLOSED
from .jobs import Job
from .loading import Served
from .runs import Choice, Run
from .state import ServerState
from .streaming import event_stream

Work = TypeVar("Work", Job, EmbeddingJob)
Result = TypeVar("Result")


def server_state(request: Request) -> ServerState:
    return request.app.state.server


async def off_loop(work: Callable[..., Result], *args, lane: Executor | None = None) -> Result:
    """A request's slow work in a worker thread of `lane` (None: asyncio's shared pool, as
    asyncio.to_thread): the event loop, and with it every running stream, goes on meanwhile."""
    return await asyncio.get_running_loop().run_in_executor(lane, contextvars.copy_context().run, work, *args)


def admitted(request: Request, served: Served, n: int) -> Run:
    """The request's place in the queue, for `async with`: n generations, or a 429 past
    PARALLEL + MAX_QUEUE."""
    state = server_state(request)
    return Run(state.runs, served, n, state.metrics, request_info(request))


async def queued(request: Request, served: Served, work: Callable[..., Result], *args) -> Result:
    """Work that renders a chat but generates nothing, in the render lane, bounded as a
    generation is (it takes a place in the queue while it runs)."""
    async with admitted(request, served, 1):
        return await off_loop(work, *args, lane=served.render_lane)


async def serve(request: Request, served: Served, n: int, prepare: Callable[[], Work],
                answer: Callable[[Run, Work, list[Choice]], Awaitable[Any]],
                stream: Callable[[Run, Work], AsyncIterator[bytes]] | None = None, renders: bool = False) -> Any:
    """One request's life: admitted for `n` generations, `prepare` (its slow work, returning what
    the engine runs) in a worker thread (of the render lane if it `renders` a chat), submitted,
    then `stream`'s events (when given) or `answer` made from the finished choices."""
    async with AsyncExitStack() as owner:
        run = await owner.enter_async_context(admitted(request, served, n))
        work = await off_loop(prepare, lane=served.render_lane if renders else None)
        run.submit(work)
        if stream is not None:
            keepalive_s = served.config.sse_keepalive_s
            return event_stream(owner.pop_all(), stream(run, work), api_of(request.scope), keepalive_s)
        choices = await run.collect_unless_disconnected(request.receive)
    if choices is None:
        return Response(b"", status_code=CLIENT_CLOSED)
    return await answer(run, work, choices)
