"""POST /v1/chat/completions: a chat request through its run to an answer or a stream of chunks."""

from __future__ import annotations

import functools
import time
import uuid
from typing import AsyncIterator

import msgspec
from litestar import Request, Response

from . import chat_tools, cut_calls, prompts, serving
from .access import ignore_tools
from .loading import Served
from .logprobs import chat_logprobs
from .prompts import Job
from .protocol import (AssistantMessage, ChatChoice, ChatRequest, ChunkChoice, Completion, CustomCallDelta,
                       CustomToolCallDelta, Delta, ToolCallDelta)
from .runs import Choice, Run
from .streaming import TEXT_MARK, around_text, include_usage, sse
from .tools import CallSpotter, ToolPlan, tool_plan


def reasoning_fields(served: Served, thought: str | None) -> dict:
    """A thinking model's reasoning under the names REASONING_FORMAT gives it."""
    return {"reasoning_content": thought, **({"reasoning": thought} if served.config.reasoning_format == "both" else {})}


async def respond(request: Request, served: Served, body: ChatRequest) -> Response:
    body.refuse_unsupported()
    if body.web_search_options is not None:  # an offer of OpenAI's hosted search, which can't run here
        ignore_tools(request, ["web_search"])
    body, customs, free_form = chat_tools.function_view(body)
    plan = tool_plan(body)._replace(free_form=free_form)
    head = dict(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=served.config.model_id)

    async def whole(run: Run, job: Job, results: list[Choice]) -> Response:
        choices = []
        for i, c in enumerate(results):
            message, reason = cut_calls.answer(c.text, c.finish_reason, plan)
            message = chat_tools.custom_calls(message, customs)
            if run.thinking is not None:
                message = msgspec.structs.replace(message, **reasoning_fields(served, c.reasoning or None))
            logprobs = chat_logprobs(served.model, c.logprobs) if body.logprobs else None
            choices.append(ChatChoice(index=i, message=message, finish_reason=reason, logprobs=logprobs))
        return Response(Completion(**head, object="chat.completion", choices=choices, usage=run.usage()))

    def streamed(run: Run, job: Job) -> AsyncIterator[bytes]:
        return chunks(served, run, body, {**head, "object": "chat.completion.chunk"}, plan, customs)

    return await serving.serve(request, served, body.n, functools.partial(prompts.chat_job, served, body, plan), whole,
                               streamed if body.stream else None, renders=True)


async def chunks(served: Served, run: Run, body: ChatRequest, head: dict, plan: ToolPlan,
                 customs: chat_tools.Customs) -> AsyncIterator[bytes]:
    """Chunks as tokens come. With tools, text streams as content until a tool call may be
    starting; from there it is held, and sent at the end as tool-call deltas (or as content,
    if it was no call after all). A forced custom tool's input streams as the model writes it."""

    def chunk(*choices: ChunkChoice, usage=msgspec.UNSET) -> bytes:
        return encode_chunk(head, *choices, usage=usage)

    plain = [text_chunk_ends(head, i) for i in range(len(run.generations))]
    for i in range(len(run.generations)):
        yield chunk(ChunkChoice(index=i, delta=Delta(role="assistant", content="")))
    spotters = [CallSpotter(forced=plan.forced is not None) for _ in run.generations]
    free_calls: list[str | None] = [None for _ in run.generations]  # each choice's forced custom call, once begun
    async for i, event in run:
        logprobs = chat_logprobs(served.model, event.logprobs) if body.logprobs and event.logprobs else None
        text, reason = event.text, event.finish_reason
        if event.reasoning:
            yield chunk(ChunkChoice(index=i, delta=Delta(**reasoning_fields(served, event.reasoning))))
        if plan.free_form:  # the whole answer is the call's input
            if text or (reason and free_calls[i] is None):
                first = free_calls[i] is None
                free_calls[i] = free_calls[i] or f"call_{uuid.uuid4().hex[:24]}"
                delta = CustomToolCallDelta(index=0, id=free_calls[i] if first else msgspec.UNSET,
                                            custom=CustomCallDelta(name=plan.free_form.name if first else msgspec.UNSET,
                                                                   input=text))
                yield chunk(ChunkChoice(index=i, delta=Delta(tool_calls=[delta]), logprobs=logprobs))
            if reason:
                finish = "length" if reason == "length" else "tool_calls"
                yield chunk(ChunkChoice(index=i, delta=Delta(), finish_reason=finish))
            continue
        if plan.tools:
            text, message, reason = cut_calls.step(spotters[i], text, reason, plan)
            if message:
                calls = call_deltas(chat_tools.custom_calls(message, customs))
                if calls or message.function_call:
                    delta = Delta(content=text or None, tool_calls=calls or None, function_call=message.function_call or None)
                    yield chunk(ChunkChoice(index=i, delta=delta, logprobs=logprobs))
                    text, logprobs = "", None
        if text and not (reason or logprobs):
            yield plain[i][0] + msgspec.json.encode(text) + plain[i][1]
        elif text or reason or logprobs:
            yield chunk(ChunkChoice(index=i, delta=Delta(content=text or None), finish_reason=reason, logprobs=logprobs))
    if include_usage(body):
        yield chunk(usage=run.usage())
    yield sse(b"[DONE]")


def call_deltas(message: AssistantMessage) -> list[ToolCallDelta | CustomToolCallDelta]:
    """An answer's calls, each whole in one delta."""
    return [CustomToolCallDelta(index=k, id=c.id, custom=CustomCallDelta(name=c.custom.name, input=c.custom.input))
            if c.type == "custom" else ToolCallDelta(index=k, id=c.id, function=c.function)
            for k, c in enumerate(message.tool_calls or [])]


def encode_chunk(head: dict, *choices: ChunkChoice, usage=msgspec.UNSET) -> bytes:
    return sse(msgspec.json.encode(Completion(**head, choices=list(choices), usage=usage)))


def text_chunk_ends(head: dict, index: int) -> tuple[bytes, bytes]:
    """A token's usual chunk (text for choice `index`, nothing else) as what comes before and after
    the text (streaming.around_text)."""
    return around_text(encode_chunk(head, ChunkChoice(index=index, delta=Delta(content=TEXT_MARK))))
