"""POST /v1/completions: a raw prompt (or several) through its run to text choices or a stream."""

from __future__ import annotations

import functools
import time
import uuid
from typing import AsyncIterator

import msgspec
from litestar import Request, Response

from . import jobs, lifecycle
from .errors import APIError
from .jobs import Job
from .loading import Served
from .logprobs import text_logprobs
from .protocol import Completion, CompletionRequest, TextChoice
from .runs import Choice, Run
from .streaming import include_usage, sse


async def respond(request: Request, served: Served, body: CompletionRequest) -> Response:
    if body.echo and body.stream:
        raise APIError(400, "`echo` can't be combined with `stream`", "echo")
    listed = isinstance(body.prompt, list) and body.prompt and not isinstance(body.prompt[0], int)
    n_prompts = len(body.prompt) if listed else 1
    head = dict(id=f"cmpl-{uuid.uuid4().hex}", object="text_completion", created=int(time.time()), model=served.config.model_id)

    async def whole(run: Run, job: Job, results: list[Choice]) -> Response:
        choices = []
        for i, c in enumerate(results):
            echoed = served.model.detokenize(job.prompts[i // body.n]) if body.echo else ""
            logprobs = text_logprobs(served.model, c.logprobs, len(echoed)) if body.logprobs is not None else None
            choices.append(TextChoice(index=i, text=echoed + c.text, finish_reason=c.finish_reason, logprobs=logprobs))
        return Response(Completion(**head, choices=choices, usage=run.usage()))

    def streamed(run: Run, job: Job) -> AsyncIterator[bytes]:
        return chunks(served, run, body, head)

    return await lifecycle.serve(request, served, n_prompts * body.n, functools.partial(jobs.completion_job, served, body),
                               whole, streamed if body.stream else None)


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
