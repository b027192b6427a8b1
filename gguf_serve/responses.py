"""POST /v1/responses: OpenAI's Responses API on chat's path. A request's input items become chat
messages and its settings a ChatRequest, which runs exactly as on /v1/chat/completions (the
template, tools, grammar, queue, run and engine: `jobs.chat_job`, `lifecycle.serve`); the
answer becomes output items, whole or as the Responses stream of events. A finished response is
kept in the store (response_store), so that the next request can continue from it
(`previous_response_id`).
"""

from __future__ import annotations

import functools
import itertools
import re
import time
import uuid
from typing import AsyncIterator

import msgspec
from litestar import Request, Response

from . import chat_steps, jobs, lifecycle
from .access import api_key, ignore_tools, request_info
from .chat_steps import CallArguments, CallStarted, ChatSteps, Content, Finished, Reasoning
from .errors import APIError
from .jobs import Job
from .loading import Served
from .logprobs import chat_logprobs
from .protocol import (ChatMessage, ChatRequest, ContentPart, FunctionCall, JSONSchemaFormat, ResponseFormat, TokenInfo,
                       ToolCall, Usage)
from .response_store import ScopedStore, owner_hash
from .responses_protocol import (CallItem, CustomToolCallItem, FunctionCallItem, IncompleteDetails, InputItem,
                                 InputTokenCount, InputTokensDetails, LocalShellCallItem, OutputItem, OutputMessage,
                                 OutputText, OutputTokensDetails, ReasoningConfig, ReasoningItem, ReasoningText,
                                 ResponseError, ResponseObject, ResponseUsage, ResponsesInput, ResponsesRequest,
                                 StreamEvent, TextConfig)
from .responses_tools import AgentTools, agent_tools, call_item, chat_call, chat_tool_choice, free_form, input_item
from .runs import Choice, Run
from .streaming import named_sse
from .tools import ToolPlan, tool_plan

TEXT_PARTS = ("input_text", "output_text", "text", "reasoning_text", "summary_text")
LOGPROBS = "message.output_text.logprobs"  # in `include`: the answer's tokens' logprobs, as chat's `logprobs`

# Where chat's code names a field, the field this API calls it.
CHAT_PARAMS = {"messages": "input", "response_format": "text.format", "max_tokens": "max_output_tokens"}


# --- Input items -> chat messages -----------------------------------------------------------


def text_of(content: str | list, param: str) -> str:
    """A message's or a call output's content: a string, or text parts (`input_text`,
    `output_text`); any other part (images, files, refusals) is a 400 naming it."""
    if isinstance(content, str):
        return content
    for j, part in enumerate(content):
        if part.type not in TEXT_PARTS or part.text is None:
            raise APIError(400, f"content part type `{part.type}` is not supported; only text", f"{param}[{j}]",
                           "unsupported_content")
    return "".join(part.text for part in content)


def required(item: InputItem, fields: tuple[str, ...], param: str) -> None:
    for field in fields:
        if getattr(item, field) is None:
            raise APIError(400, f"`{field}` is required in a `{item.type}` item", f"{param}.{field}")


CALL_FIELDS = {"function_call": ("call_id", "name", "arguments"), "custom_tool_call": ("call_id", "name", "input"),
               "local_shell_call": ("call_id", "action")}
OUTPUT_TYPES = ("function_call_output", "custom_tool_call_output", "local_shell_call_output")


def append_messages(messages: list[ChatMessage], items: list[InputItem], param: str) -> None:
    """Each item as chat messages: a message as itself, a call (to a function, a namespace's
    function, a custom tool, the local shell) as an assistant tool call as the model would have
    written it (responses_tools.chat_call; the calls of one turn, and the text before them, in
    one assistant message, as chat templates expect), a call's output as a tool message, and a
    reasoning item as the `reasoning_content` of the assistant turn that follows it (the
    template decides whether to keep it: Qwen3's keeps only the reasoning after the last user
    message)."""
    thought = None  # the reasoning items just before this item
    for i, item in enumerate(items):
        where = f"{param}[{i}]"
        last = messages[-1] if messages else None
        if item.type == "reasoning":
            thought = (thought or "") + text_of(item.content or item.summary or [], f"{where}.content")
            continue
        if item.type == "message":
            required(item, ("role", "content"), where)
            messages.append(ChatMessage(role=item.role, content=text_of(item.content, f"{where}.content")))
        elif item.type in CALL_FIELDS:
            required(item, CALL_FIELDS[item.type], where)
            call = chat_call(item)
            if last is not None and last.role == "assistant" and thought is None:
                last.tool_calls = [*(last.tool_calls or []), call]
            else:
                messages.append(ChatMessage(role="assistant", tool_calls=[call]))
        elif item.type in OUTPUT_TYPES:
            # a local shell call's output names its call by `id` (OpenAI's shape) or `call_id`
            call_id = item.call_id or (item.id if item.type == "local_shell_call_output" else None)
            if call_id is None:
                required(item, ("call_id",), where)
            required(item, ("output",), where)
            messages.append(ChatMessage(role="tool", content=text_of(item.output, f"{where}.output"), tool_call_id=call_id))
        else:
            raise APIError(400, f"input item type `{item.type}` is not supported; use message, reasoning, "
                                f"{', '.join(CALL_FIELDS)} or {', '.join(OUTPUT_TYPES)}", f"{where}.type",
                           "unsupported_item")
        if messages[-1].role == "assistant" and thought is not None:
            messages[-1].reasoning_content = thought
        thought = None


def input_items(body: ResponsesInput) -> list[InputItem]:
    if body.input is None or body.input == [] or body.input == "":
        raise APIError(400, "`input` is required: a string or a list of items", "input")
    return [InputItem(role="user", content=body.input)] if isinstance(body.input, str) else body.input


def chat_request(body: ResponsesInput, history: list[InputItem], model: str, agent: AgentTools) -> ChatRequest:
    """The chat request this Responses request is: `instructions` as the first (system)
    message, then the previous response's conversation, then `input`; the tools as `agent`
    shows them to the model."""
    generates = isinstance(body, ResponsesRequest)  # not only counting input tokens
    for field in ("conversation", "prompt", *(("background",) if generates else ())):
        if getattr(body, field):
            raise APIError(400, f"`{field}` is not supported by this server", field, "unsupported_parameter")
    messages = [ChatMessage(role="system", content=body.instructions)] if body.instructions else []
    append_messages(messages, history, "previous_response_id")
    append_messages(messages, input_items(body), "input")
    sampling = {} if not generates else dict(
        max_tokens=body.max_output_tokens, temperature=body.temperature, top_p=body.top_p, seed=body.seed,
        top_k=body.top_k, min_p=body.min_p, repeat_penalty=body.repeat_penalty,
        logprobs=LOGPROBS in (body.include or ()), top_logprobs=body.top_logprobs)
    return ChatRequest(model=model, messages=messages, tools=agent.tools,
                       tool_choice=chat_tool_choice(body.tool_choice, agent), parallel_tool_calls=body.parallel_tool_calls,
                       response_format=response_format(body), reasoning_effort=body.reasoning and body.reasoning.effort,
                       **sampling)


def prepared(body: ResponsesInput, history: list[InputItem], model: str) -> tuple[ChatRequest, AgentTools, ToolPlan]:
    """The chat request, the tools as the model sees them, and the plan its answer follows (a
    forced custom tool's: the whole answer is that call)."""
    agent = agent_tools(body.tools)
    chat_body = chat_request(body, history, model, agent)
    return chat_body, agent, tool_plan(chat_body)._replace(free_form=free_form(body.tool_choice, agent))


def response_format(body: ResponsesInput) -> ResponseFormat | None:
    """`text.format` as chat's `response_format`, so that the same grammar enforces it."""
    fmt = body.text.format if body.text else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return ResponseFormat(type="json_object")
    for field in ("name", "schema"):
        if getattr(fmt, field) is None:
            raise APIError(400, f"`{field}` is required with type json_schema", f"text.format.{field}")
    return ResponseFormat(type="json_schema", json_schema=JSONSchemaFormat(fmt.name, fmt.schema, fmt.strict, fmt.description))


def as_responses_error(e: APIError) -> APIError:
    """An error from chat's code, its param renamed to this API's field."""
    if e.param:
        head = e.param.split(".")[0].split("[")[0]
        if head in CHAT_PARAMS:
            e.param = CHAT_PARAMS[head] + ("" if head == "messages" else e.param[len(head):].replace(".json_schema", ""))
    return e


# --- Output items ---------------------------------------------------------------------------


def reasoning_item(thought: str, status: str) -> ReasoningItem:
    return ReasoningItem(id=f"rs_{uuid.uuid4().hex}", status=status, content=[ReasoningText(text=thought)])


def message_item(text: str, status: str, logprobs: list[TokenInfo] = ()) -> OutputMessage:
    return OutputMessage(id=f"msg_{uuid.uuid4().hex}", status=status, content=[OutputText(text=text, logprobs=list(logprobs))])


def output_logprobs(run: Run, body: ChatRequest, entries: list) -> list[TokenInfo]:
    """Chat's logprobs entries are the Responses API's too (token, logprob, bytes, top_logprobs)."""
    return chat_logprobs(run.served.model, entries).content if body.logprobs and entries else []


def status_of(finish_reason: str) -> str:
    return "incomplete" if finish_reason == "length" else "completed"


def finish(response: ResponseObject, output: list[OutputItem], finish_reason: str, usage: Usage) -> None:
    """`response` as it ended: its output, status and usage."""
    response.output = output
    response.status = status_of(finish_reason)
    response.completed_at = int(time.time())
    if response.status == "incomplete":
        response.incomplete_details = IncompleteDetails(reason="max_output_tokens")
    response.usage = ResponseUsage(
        input_tokens=usage.prompt_tokens,
        input_tokens_details=InputTokensDetails(cached_tokens=usage.prompt_tokens_details.cached_tokens),
        output_tokens=usage.completion_tokens,
        output_tokens_details=OutputTokensDetails(reasoning_tokens=usage.completion_tokens_details.reasoning_tokens
                                                  if usage.completion_tokens_details else 0),
        total_tokens=usage.total_tokens,
    )


def as_input(output: list[OutputItem]) -> list[InputItem]:
    """Output items as the input items that give them back to the model."""
    items = []
    for item in output:
        if isinstance(item, ReasoningItem):
            items.append(InputItem(type="reasoning", content=[ContentPart("reasoning_text", item.content[0].text)]))
        elif isinstance(item, OutputMessage):
            items.append(InputItem(role="assistant", content=item.content[0].text))
        else:
            items.append(input_item(item))
    return items


# --- The store ------------------------------------------------------------------------------


def store(request: Request) -> ScopedStore:
    """The app's store (service.response_store: this process's, or RESPONSES_STORE_URL's) as
    the request's API key sees it."""
    state = lifecycle.server_state(request)
    key = api_key(dict(request.scope["headers"])).decode(errors="replace")
    return ScopedStore(state.responses, owner_hash(key, state.config.api_keys))


async def keep(request: Request, response: ResponseObject, conversation: list[InputItem]) -> None:
    """Store a finished response; one larger than the whole store is answered all the same,
    its `store` false (it can't be retrieved or continued), and its log line says why."""
    if not await store(request).put(response, [*conversation, *as_input(response.output)]):
        response.store = False
        request_info(request)["response_not_stored"] = "larger than RESPONSES_STORE_MAX_BYTES"


# --- Serving --------------------------------------------------------------------------------


async def history(request: Request, body: ResponsesInput) -> list[InputItem]:
    if body.previous_response_id is None:
        return []
    return (await store(request).get(body.previous_response_id, "previous_response_id")).conversation


async def check_store(request: Request, body: ResponsesRequest) -> None:
    """A response to be stored, refused at once (503) while the store is unreachable: not after
    its whole generation."""
    if body.store:
        reason = await lifecycle.server_state(request).responses.status()
        if reason:
            raise APIError(503, reason, None, "responses_store_unavailable")


METADATA_PAIRS, METADATA_KEY_CHARS, METADATA_VALUE_CHARS = 16, 64, 512  # OpenAI's limits


def check_metadata(metadata: dict[str, str] | None) -> None:
    """OpenAI's limits on `metadata`, worded as OpenAI words them (a key too long is shown cut:
    an error must not echo megabytes back)."""
    if not metadata:
        return
    if len(metadata) > METADATA_PAIRS:
        raise APIError(400, f"Invalid 'metadata': too many properties. Expected an object with at most {METADATA_PAIRS} "
                            f"properties, but got an object with {len(metadata)} properties instead.", "metadata")
    for key, value in metadata.items():
        if len(key) > METADATA_KEY_CHARS:
            shown = key[:METADATA_KEY_CHARS] + "..."
            raise APIError(400, f"Invalid property name in 'metadata': '{shown}' is too long. Expected a string with "
                                f"maximum length {METADATA_KEY_CHARS}, but got a string with length {len(key)} instead.",
                           "metadata")
        if len(value) > METADATA_VALUE_CHARS:
            raise APIError(400, f"Invalid 'metadata.{key}': string too long. Expected a string with maximum length "
                                f"{METADATA_VALUE_CHARS}, but got a string with length {len(value)} instead.",
                           f"metadata.{key}")


# The fleet's proxy names the conversation a request belongs to (deploy/fleet.js: 8 hex digits).
AFFINITY_KEY = re.compile(r"[0-9a-f]{8}")


def response_id(request: Request) -> str:
    """`resp_` and 32 hex digits. Behind the fleet's proxy the first 8 are the conversation's affinity
    key (its `X-Affinity-Key`), so that a continuation naming this id is routed, with no store lookup,
    to the instance that holds the conversation's KV cache; the other 24 are random, so ids stay unique."""
    key, digits = request.headers.get("x-affinity-key", ""), uuid.uuid4().hex
    return f"resp_{key if AFFINITY_KEY.fullmatch(key) else digits[:8]}{digits[8:]}"


def new_response(request: Request, served: Served, body: ResponsesRequest, chat_body: ChatRequest) -> ResponseObject:
    sampling = jobs.sampling(served, chat_body, None)
    return ResponseObject(
        id=response_id(request), created_at=int(time.time()), status="in_progress", model=served.config.model_id,
        output=[], instructions=body.instructions, max_output_tokens=body.max_output_tokens,
        temperature=sampling.temperature, top_p=sampling.top_p, tools=body.tools or [], tool_choice=body.tool_choice or "auto",
        parallel_tool_calls=body.parallel_tool_calls, text=body.text or TextConfig(), reasoning=body.reasoning or ReasoningConfig(),
        top_logprobs=body.top_logprobs,
        previous_response_id=body.previous_response_id, store=body.store, metadata=body.metadata or {}, user=body.user,
    )


async def respond(request: Request, served: Served, body: ResponsesRequest) -> Response:
    check_metadata(body.metadata)
    await check_store(request, body)
    earlier = await history(request, body)
    chat_body, agent, plan = prepared(body, earlier, served.config.model_id)
    ignore_tools(request, agent.ignored)
    response = new_response(request, served, body, chat_body)
    conversation = [*earlier, *input_items(body)]

    async def whole(run: Run, job: Job, results: list[Choice]) -> Response:
        [choice] = results
        said = chat_steps.answer(plan, choice)
        status = status_of(said.finished.reason)
        thought_status = "completed" if said.content or said.calls else status  # or it was cut off while thinking
        output = [*([reasoning_item(said.reasoning, thought_status)] if said.reasoning else []),
                  *([message_item(said.content or "", status, output_logprobs(run, chat_body, said.logprobs))]
                    if said.content or not said.calls else []),
                  *(call_item(call, agent, status) for call in said.calls)]
        finish(response, output, said.finished.reason, run.usage())
        if body.store:
            await keep(request, response, conversation)
        return Response(response)

    def streamed(run: Run, job: Job) -> AsyncIterator[bytes]:
        return events(request, run, body, chat_body, plan, agent, response, conversation)

    try:  # the request runs exactly as on /v1/chat/completions
        return await lifecycle.serve(request, served, 1, functools.partial(jobs.chat_job, served, chat_body, plan), whole,
                                   streamed if body.stream else None, renders=True)
    except APIError as e:
        raise as_responses_error(e) from None


async def events(request: Request, run: Run, body: ResponsesRequest, chat_body: ChatRequest, plan: ToolPlan,
                 agent: AgentTools, response: ResponseObject, conversation: list[InputItem]) -> AsyncIterator[bytes]:
    """The Responses stream: the response created and in progress, then its output items as
    its steps come (chat_steps: a thinking model's reasoning item, then the message's text delta
    by delta; a forced call's arguments, or a forced custom tool's input, as the model writes
    them; calls parsed at the end as whole call items, as is a call whose item needs all its
    arguments: a custom tool's input, a shell action), then the response completed, incomplete,
    or failed."""
    numbers = itertools.count()

    def event(kind: str, **fields) -> bytes:
        data = msgspec.json.encode(StreamEvent(type=kind, sequence_number=next(numbers), **fields))
        return named_sse(kind, data)

    # An item with a text part (a reasoning item's reasoning_text, a message's output_text):
    # opened, its text sent delta by delta, closed. `kind` names its events.
    def opened(item: ReasoningItem | OutputMessage) -> list[bytes]:
        output.append(item)
        where = dict(output_index=len(output) - 1)
        return [event("response.output_item.added", **where, item=item),
                event("response.content_part.added", item_id=item.id, **where, content_index=0,
                      part=type(item.content[0])(text=""))]

    def delta(item: ReasoningItem | OutputMessage, kind: str, text: str, logprobs: list[TokenInfo] = ()) -> bytes:
        item.content[0].text += text
        extra = {"logprobs": list(logprobs)} if kind == "output_text" else {}
        if logprobs:
            item.content[0].logprobs += logprobs
        return event(f"response.{kind}.delta", item_id=item.id, output_index=output.index(item), content_index=0,
                     delta=text, **extra)

    def closed(item: ReasoningItem | OutputMessage, kind: str, status: str) -> list[bytes]:
        item.status, part, where = status, item.content[0], dict(output_index=output.index(item))
        extra = {"logprobs": part.logprobs} if kind == "output_text" else {}
        return [event(f"response.{kind}.done", item_id=item.id, **where, content_index=0, text=part.text, **extra),
                event("response.content_part.done", item_id=item.id, **where, content_index=0, part=part),
                event("response.output_item.done", **where, item=item)]

    # A call item: added, its arguments (a function's) or input (a custom tool's) sent delta by
    # delta, done; a local shell call is added and done whole, as OpenAI sends it.
    def call_opened(item: CallItem) -> bytes:
        output.append(item)
        return event("response.output_item.added", output_index=len(output) - 1, item=item)

    def call_delta(item: FunctionCallItem | CustomToolCallItem, text: str) -> bytes:
        if isinstance(item, CustomToolCallItem):
            item.input, kind = item.input + text, "custom_tool_call_input"
        else:
            item.arguments, kind = item.arguments + text, "function_call_arguments"
        return event(f"response.{kind}.delta", item_id=item.id, output_index=output.index(item), delta=text)

    def call_closed(item: CallItem, status: str) -> list[bytes]:
        item.status, where = status, dict(output_index=output.index(item))
        if isinstance(item, CustomToolCallItem):
            done = [event("response.custom_tool_call_input.done", item_id=item.id, **where, input=item.input)]
        elif isinstance(item, FunctionCallItem):
            done = [event("response.function_call_arguments.done", item_id=item.id, **where, arguments=item.arguments)]
        else:
            done = []
        return [*done, event("response.output_item.done", **where, item=item)]

    def call_sent(item: CallItem, status: str) -> list[bytes]:
        """A call known whole (parsed at the end of the answer, or its item made from all its
        arguments): its text in one delta."""
        if isinstance(item, LocalShellCallItem):
            return [call_opened(item), *call_closed(item, status)]
        field = "input" if isinstance(item, CustomToolCallItem) else "arguments"
        text = getattr(item, field)
        setattr(item, field, "")
        return [call_opened(item), call_delta(item, text), *call_closed(item, status)]

    yield event("response.created", response=response)
    yield event("response.in_progress", response=response)
    steps, output = ChatSteps(plan), []
    thought, message, reason = None, None, "stop"
    streamed, whole = [], []  # calls: items streamed as written (to close), and calls held until the end
    holding = False  # the current call is held until the end
    entries = []  # logprobs of tokens whose text has not been sent yet
    try:
        async for _, event_ in run:
            for step in steps.feed(event_):
                if isinstance(step, Reasoning):
                    if thought is None:
                        thought = reasoning_item("", "in_progress")
                        for sent in opened(thought):
                            yield sent
                    yield delta(thought, "reasoning_text", step.text)
                    continue
                if isinstance(step, (Content, CallStarted)) and thought is not None and thought.status == "in_progress" \
                        and (not isinstance(step, Content) or step.text):
                    for sent in closed(thought, "reasoning_text", "completed"):
                        yield sent
                if isinstance(step, Content):
                    entries += step.logprobs
                    if step.text:
                        if message is None:
                            message = message_item("", "in_progress")
                            for sent in opened(message):
                                yield sent
                        yield delta(message, "output_text", step.text, output_logprobs(run, chat_body, entries))
                        entries = []
                elif isinstance(step, CallStarted):
                    call = ToolCall(id=step.id, function=FunctionCall(step.name, '{"input": ""}' if step.free_form else ""))
                    item = call_item(call, agent, "in_progress")
                    holding = not (step.free_form or (not step.whole and isinstance(item, FunctionCallItem)))
                    if not holding:
                        streamed.append(item)
                        yield call_opened(item)
                    else:  # its item is made from all its arguments (a custom tool's input, a shell action)
                        whole.append(call)
                elif isinstance(step, CallArguments):
                    if holding:
                        whole[-1].function.arguments += step.text
                    else:
                        yield call_delta(streamed[-1], step.text)
                elif isinstance(step, Finished):
                    reason = step.reason
    except APIError as e:
        response.status, response.error = "failed", ResponseError(code=e.code or "server_error", message=e.message)
        yield event("response.failed", response=response)
        return
    status = status_of(reason)
    if thought is not None and thought.status == "in_progress":  # cut off while thinking
        for sent in closed(thought, "reasoning_text", status):
            yield sent
    if message is None and not streamed and not whole:
        message = message_item("", "in_progress")
        for sent in opened(message):
            yield sent
    if message is not None:
        for sent in closed(message, "output_text", status):
            yield sent
    for item in streamed:
        for sent in call_closed(item, status):
            yield sent
    for call in whole:
        for sent in call_sent(call_item(call, agent, "in_progress"), status):
            yield sent
    finish(response, output, reason, run.usage())
    if body.store:
        try:
            await keep(request, response, conversation)
        except APIError as e:  # the store was lost while this ran: the answer can't be continued
            response.status, response.error = "failed", ResponseError(code=e.code, message=e.message)
    yield event(f"response.{response.status}", response=response)


def count_input_tokens(request: Request, served: Served, body: ResponsesInput,
                       earlier: list[InputItem]) -> InputTokenCount:
    """The prompt's tokens as POST /v1/responses would run it (tools included, hosted ones left
    out and named as there), nothing generated."""
    chat_body, agent, plan = prepared(body, earlier, served.config.model_id)
    ignore_tools(request, agent.ignored)
    try:
        prompt = jobs.chat_prompt(served, chat_body.messages, plan.tools, jobs.template_kwargs(served, chat_body))
    except APIError as e:
        raise as_responses_error(e) from None
    return InputTokenCount(input_tokens=len(prompt.tokens))
