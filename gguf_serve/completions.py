"""POST /v1/completions: a raw prompt (or several) through its run to text choices or a stream."""

from __future__ import annotations

import time
import uuid
from contextlib import AsyncExitStack
from typing import AsyncIterator

import msgspec
from litestar import Request, Response

from . import prompts
from .access import request_info
from .logprobs import text_logprobs
from .protocol import CLIENT_CLOSED, APIError, Completion, CompletionRequest, TextChoice
from .runs import Run
from .loading import Served
from .streaming import event_stream, include_usage, sse


def prepare(served: Served, body: CompletionRequest) -> tuple[list[list[int]], int]:
    """The prompts' tokens and each choice's token budget, for a worker thread."""
    tokens = prompts.completion_prompts(served, body)
    return tokens, prompts.token_budget(served, tokens, body.max_tokens, 16)


async def respond(request: Request, served: Served, body: CompletionRequest) -> Response:
    if body.echo and body.stream:
        raise APIError(400, "`echo` can't be combined with `stream`", "echo")
    state, info = request.app.state, request_info(request)
    listed = isinstance(body.prompt, list) and body.prompt and not isinstance(body.prompt[0], int)
    n_prompts = len(body.prompt) if listed else 1
    async with AsyncExitStack() as owner:
        run = await owner.enter_async_context(Run(state.runs, served, n_prompts * body.n, state.metrics, info))
        tokens, max_tokens = await prompts.off_loop(prepare, served, body)
        if served.config.log_prompts:
            info["prompt"] = body.prompt
        run.submit(tokens, body.n, max_tokens, prompts.sampling(served, body, None), prompts.stop_strings(body), body.logprobs)
        head = dict(id=f"cmpl-{uuid.uuid4().hex}", object="text_completion", created=int(time.time()), model=served.config.model_id)
        if body.stream:
            return event_stream(owner.pop_all(), chunks(served, run, body, head))
        results = await run.collect_unless_disconnected(request.receive)
    if results is None:
        return Response(b"", status_code=CLIENT_CLOSED)
    choices = []
    for i, c in enumerate(results):
        echoed = served.model.detokenize(tokens[i // body.n]) if body.echo else ""
        logprobs = text_logprobs(served.model, c.logprobs, len(echoed)) if body.logprobs is not None else None
        choices.append(TextChoice(index=i, text=echoed + c.text, finish_reason=c.finish_reason, logprobs=logprobs))
    return Response(Completion(**head, choices=choices, usage=run.usage()))


async def chunks(served: Served, run: Run, body: CompletionRequest, head: dict) -> AsyncIterator[bytes]:
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
