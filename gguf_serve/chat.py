"""POST /v1/chat/completions: a chat request through its run to an answer or a stream of chunks."""

from __future__ import annotations

import functools
import time
import uuid
from typing import AsyncIterator

import msgspec
from litestar import Request, Response

from . import chat_steps, chat_tools, jobs, lifecycle
from .access import ignore_tools
from .chat_steps import CallArguments, CallEnded, CallStarted, ChatSteps, Content, Reasoning
from .jobs import Job
from .loading import Served
from .logprobs import chat_logprobs
from .protocol import (AssistantMessage, ChatChoice, ChatRequest, ChunkChoice, Completion, CustomCallDelta,
                       CustomToolCallDelta, Delta, FunctionCall, FunctionCallDelta, ToolCallDelta)
from .responses_tools import custom_input
from .runs import Choice, Run
from .streaming import TEXT_MARK, around_text, include_usage, sse
from .tools import ToolPlan, tool_plan


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
            said = chat_steps.answer(plan, c)
            calls = said.calls
            if plan.legacy:
                message = AssistantMessage(content=said.content, function_call=calls[0].function if calls else msgspec.UNSET)
            else:
                message = chat_tools.custom_calls(AssistantMessage(content=said.content, tool_calls=calls or msgspec.UNSET),
                                                  customs)
            if run.thinking is not None:
                message = msgspec.structs.replace(message, **reasoning_fields(served, said.reasoning or None))
            logprobs = chat_logprobs(served.model, said.logprobs) if body.logprobs else None
            choices.append(ChatChoice(index=i, message=message, finish_reason=said.finished.reason, logprobs=logprobs))
        return Response(Completion(**head, object="chat.completion", choices=choices, usage=run.usage()))

    def streamed(run: Run, job: Job) -> AsyncIterator[bytes]:
        return chunks(served, run, body, {**head, "object": "chat.completion.chunk"}, plan, customs)

    return await lifecycle.serve(request, served, body.n, functools.partial(jobs.chat_job, served, body, plan), whole,
                                 streamed if body.stream else None, renders=True)


class CallDeltas:
    """One choice's tool calls as chunks' deltas: a call streamed as the model writes it (a forced
    one) gets its id and name in its first delta and its arguments (a forced custom tool's input)
    delta by delta; a call whose arguments must be whole first (parsed at the end, a custom tool's
    input read from them, the legacy `function_call`) in one delta once it has ended."""

    def __init__(self, plan: ToolPlan, customs: chat_tools.Customs):
        self.plan, self.customs = plan, customs
        self.index = -1  # the open call's index among the choice's calls
        self.call: CallStarted | None = None
        self.arguments = ""  # of a call held until it ends

    def held(self) -> bool:
        call = self.call
        return call.whole or self.plan.legacy or (call.name in self.customs and not call.free_form)

    def started(self, call: CallStarted) -> Delta | None:
        self.index, self.call, self.arguments = self.index + 1, call, ""
        if self.held():
            return None
        if call.free_form:
            return Delta(tool_calls=[CustomToolCallDelta(index=self.index, id=call.id,
                                                         custom=CustomCallDelta(name=call.name, input=""))])
        return Delta(tool_calls=[ToolCallDelta(index=self.index, id=call.id, type="function",
                                               function=FunctionCallDelta(name=call.name, arguments=""))])

    def arguments_delta(self, text: str) -> Delta | None:
        if self.held():
            self.arguments += text
            return None
        if self.call.free_form:
            return Delta(tool_calls=[CustomToolCallDelta(index=self.index, custom=CustomCallDelta(input=text))])
        return Delta(tool_calls=[ToolCallDelta(index=self.index, function=FunctionCallDelta(arguments=text))])

    def ended(self) -> Delta | None:
        if not self.held():
            return None
        call, arguments = self.call, self.arguments
        if self.plan.legacy:
            return Delta(function_call=FunctionCall(call.name, arguments))
        if call.name in self.customs:
            return Delta(tool_calls=[CustomToolCallDelta(index=self.index, id=call.id, custom=CustomCallDelta(
                name=call.name, input=custom_input(arguments)))])
        return Delta(tool_calls=[ToolCallDelta(index=self.index, id=call.id, type="function",
                                               function=FunctionCallDelta(name=call.name, arguments=arguments))])


async def chunks(served: Served, run: Run, body: ChatRequest, head: dict, plan: ToolPlan,
                 customs: chat_tools.Customs) -> AsyncIterator[bytes]:
    """Chunks as the choices' steps come (chat_steps): reasoning and content deltas, tool calls'
    deltas (CallDeltas), each choice's finish reason in a chunk of its own."""

    def chunk(*choices: ChunkChoice, usage=msgspec.UNSET) -> bytes:
        return encode_chunk(head, *choices, usage=usage)

    plain = [text_chunk_ends(head, i) for i in range(len(run.generations))]
    for i in range(len(run.generations)):
        yield chunk(ChunkChoice(index=i, delta=Delta(role="assistant", content="")))
    steps = [ChatSteps(plan) for _ in run.generations]
    calls = [CallDeltas(plan, customs) for _ in run.generations]
    async for i, event in run:
        for step in steps[i].feed(event):
            delta = finish = logprobs = None
            if isinstance(step, Content):
                if step.text and not step.logprobs:  # nearly every token's: only the text encoded
                    yield plain[i][0] + msgspec.json.encode(step.text) + plain[i][1]
                    continue
                delta = Delta(content=step.text or None)
                logprobs = chat_logprobs(served.model, step.logprobs) if body.logprobs and step.logprobs else None
            elif isinstance(step, Reasoning):
                delta = Delta(**reasoning_fields(served, step.text))
            elif isinstance(step, CallStarted):
                delta = calls[i].started(step)
            elif isinstance(step, CallArguments):
                delta = calls[i].arguments_delta(step.text)
            elif isinstance(step, CallEnded):
                delta = calls[i].ended()
            else:
                delta, finish = Delta(), step.reason
            if delta is not None and (delta != Delta() or finish or logprobs):
                yield chunk(ChunkChoice(index=i, delta=delta, finish_reason=finish, logprobs=logprobs))
    if include_usage(body):
        yield chunk(usage=run.usage())
    yield sse(b"[DONE]")


def encode_chunk(head: dict, *choices: ChunkChoice, usage=msgspec.UNSET) -> bytes:
    return sse(msgspec.json.encode(Completion(**head, choices=list(choices), usage=usage)))


def text_chunk_ends(head: dict, index: int) -> tuple[bytes, bytes]:
    """A token's usual chunk (text for choice `index`, nothing else) as what comes before and after
    the text (streaming.around_text)."""
    return around_text(encode_chunk(head, ChunkChoice(index=index, delta=Delta(content=TEXT_MARK))))
