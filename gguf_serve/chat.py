"""POST /v1/chat/completions: a chat request through its run to an answer or a stream of chunks."""

from __future__ import annotations

import time
import uuid
from contextlib import AsyncExitStack
from typing import AsyncIterator, NamedTuple

import msgspec
from litestar import Request, Response

from . import prompts, reasoning, templates
from .access import request_info
from .logprobs import chat_logprobs
from .protocol import (CLIENT_CLOSED, APIError, AssistantMessage, ChatChoice, ChatRequest, ChunkChoice, Completion, Delta,
                      TemplateRequest, ToolCallDelta)
from .runs import Run
from .loading import Served
from .streaming import event_stream, include_usage, sse
from .tools import ToolPlan, answer, output_grammar, tool_plan


class Job(NamedTuple):
    """What a chat request runs, prepared off the event loop."""

    prompt: prompts.ChatPrompt
    grammar: str | None
    max_tokens: int


def prepare(served: Served, body: ChatRequest, plan: ToolPlan) -> Job:
    """Render, tokenize and compile the grammar: the request's slow work, for a worker thread."""
    prompt = prompts.chat_prompt(served, body.messages, plan.tools, template_kwargs(served, body))
    grammar = output_grammar(served.model, body, plan)
    max_tokens = prompts.token_budget(served, [prompt.tokens], body.max_completion_tokens or body.max_tokens, None)
    return Job(prompt, grammar, max_tokens)


async def start(owner: AsyncExitStack, request: Request, served: Served, body: ChatRequest, plan: ToolPlan) -> Run:
    """The request's run, entered into `owner` (a 429 here if the queue is full, before any
    work), its prompt prepared off the event loop and its generations submitted."""
    state, info = request.app.state, request_info(request)
    run = await owner.enter_async_context(Run(state.runs, served, body.n, state.metrics, info))
    job = await prompts.off_loop(prepare, served, body, plan)
    if served.config.log_prompts:
        info["prompt"] = job.prompt.text
    if not job.prompt.marked:  # the template moved the span markers: user text was located by search
        info["content_located_by_search"] = True
        state.metrics.spans_searched.inc()
    top_logprobs = (body.top_logprobs or 0) if body.logprobs else None
    run.submit([job.prompt.tokens], body.n, job.max_tokens, prompts.sampling(served, body, job.grammar),
               [*served.stops, *prompts.stop_strings(body)], top_logprobs, job.prompt.thinking)
    return run


def template_kwargs(served: Served, body: ChatRequest | TemplateRequest) -> dict | None:
    """What the template is given beyond the messages: a thinking model thinks unless asked not to.
    A key may not replace what the server itself gives the template (llama.cpp lets it, and a
    `messages` or `tools` from there would bypass every check on the real ones)."""
    for key in body.chat_template_kwargs or ():
        if key in templates.TEMPLATE_VARIABLES:
            raise APIError(400, f"`{key}` is set by the server; it can't be a chat template kwarg",
                           f"chat_template_kwargs.{key}")
    if served.thinks:
        return reasoning.template_kwargs(body.chat_template_kwargs, body.reasoning_effort)
    return body.chat_template_kwargs


def reasoning_fields(served: Served, thought: str | None) -> dict:
    """A thinking model's reasoning under the names REASONING_FORMAT gives it."""
    return {"reasoning_content": thought, **({"reasoning": thought} if served.config.reasoning_format == "both" else {})}


async def respond(request: Request, served: Served, body: ChatRequest) -> Response:
    body.refuse_unsupported()
    plan = tool_plan(body)
    async with AsyncExitStack() as owner:
        run = await start(owner, request, served, body, plan)
        head = dict(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=served.config.model_id)
        if body.stream:
            return event_stream(owner.pop_all(), chunks(served, run, body, {**head, "object": "chat.completion.chunk"}, plan))
        results = await run.collect_unless_disconnected(request.receive)
    if results is None:
        return Response(b"", status_code=CLIENT_CLOSED)
    choices = []
    for i, c in enumerate(results):
        message, reason = answer(c.text, c.finish_reason, plan)
        if run.thinking is not None:
            message = msgspec.structs.replace(message, **reasoning_fields(served, c.reasoning or None))
        logprobs = chat_logprobs(served.model, c.logprobs) if body.logprobs else None
        choices.append(ChatChoice(index=i, message=message, finish_reason=reason, logprobs=logprobs))
    return Response(Completion(**head, object="chat.completion", choices=choices, usage=run.usage()))


async def chunks(served: Served, run: Run, body: ChatRequest, head: dict, plan: ToolPlan) -> AsyncIterator[bytes]:
    """Chunks as tokens come. With tools, text streams as content until a tool call may be
    starting; from there it is held, and sent at the end as tool-call deltas (or as content,
    if it was no call after all)."""

    def chunk(*choices: ChunkChoice, usage=msgspec.UNSET) -> bytes:
        return encode_chunk(head, *choices, usage=usage)

    plain = [text_chunk_ends(head, i) for i in range(len(run.generations))]
    for i in range(len(run.generations)):
        yield chunk(ChunkChoice(index=i, delta=Delta(role="assistant", content="")))
    spotters = [CallSpotter(forced=plan.forced is not None) for _ in run.generations]
    async for i, event in run:
        logprobs = chat_logprobs(served.model, event.logprobs) if body.logprobs and event.logprobs else None
        text, reason = event.text, event.finish_reason
        if event.reasoning:
            yield chunk(ChunkChoice(index=i, delta=Delta(**reasoning_fields(served, event.reasoning))))
        if plan.tools:
            text, message, reason = spotters[i].step(text, reason, plan)
            if message:
                calls = [ToolCallDelta(index=k, id=c.id, function=c.function) for k, c in enumerate(message.tool_calls or [])]
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


def encode_chunk(head: dict, *choices: ChunkChoice, usage=msgspec.UNSET) -> bytes:
    return sse(msgspec.json.encode(Completion(**head, choices=list(choices), usage=usage)))


def text_chunk_ends(head: dict, index: int) -> tuple[bytes, bytes]:
    """A token's usual chunk (text for choice `index`, nothing else) as what comes before and after
    the text, encoded once: only the text is encoded per token, not the chunk's structs. The text
    is the chunk's last string, so whatever the id or model name hold, the split is there."""
    before, _, after = encode_chunk(head, ChunkChoice(index=index, delta=Delta(content="\0"))).rpartition(b'"\\u0000"')
    return before, after


class CallSpotter:
    """Decides, as a choice's text streams, where a tool call may begin: an answer opening with
    a call's first characters (`<tool_call>`, `<|python_tag|>`, or `{` for Llama 3.1's JSON
    call), or a `<tool_call>` block later in the text. Text before that streams at once."""

    OPENINGS = ("<tool_call>", "<|python_tag|>", "{")
    BLOCK = "<tool_call>"

    def __init__(self, forced: bool):
        self.held = ""  # from where a call may begin: parsed at the end
        self.pending = ""  # text not yet known to be content
        self.holding = forced  # a forced call is all call
        self.opened = forced  # the answer's opening has been seen

    def feed(self, text: str) -> str:
        """The part of `text` (with what was pending) that is content for sure."""
        if self.holding:
            self.held += text
            return ""
        self.pending += text
        if not self.opened:
            head = self.pending.lstrip()
            if not head or any(opening.startswith(head) for opening in self.OPENINGS):
                return ""  # blank so far, or a call's opening so far: undecided
            self.opened = True
            if head.startswith(self.OPENINGS):
                self.holding, self.held, self.pending = True, self.pending, ""
                return ""
        start = self.pending.find(self.BLOCK)
        if start >= 0:
            out, self.held, self.pending = self.pending[:start], self.pending[start:], ""
            self.holding = True
            return out
        keep = reasoning.partial_tail(self.pending, self.BLOCK)
        out, self.pending = self.pending[: len(self.pending) - keep], self.pending[len(self.pending) - keep :]
        return out

    def flush(self) -> str:
        """What was pending at the end: content, since no call began in it."""
        out, self.pending = self.pending, ""
        return out

    def step(self, text: str, finish_reason: str | None, plan: ToolPlan) -> tuple[str, AssistantMessage | None, str | None]:
        """A choice's next text -> (what is content for sure, the answer parsed from the held text
        once the choice has finished, its finish reason); the held text's own content, if any,
        is in the first."""
        text = self.feed(text) + (self.flush() if finish_reason else "")
        if not (finish_reason and self.held):
            return text, None, finish_reason
        message, finish_reason = answer(self.held, finish_reason, plan)
        return text + (message.content or ""), message, finish_reason
