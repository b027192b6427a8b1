"""POST /v1/messages and /v1/messages/count_tokens: Anthropic's Messages API on chat's path. A
request's system prompt, messages and settings become a ChatRequest, which runs exactly as on
/v1/chat/completions (the template, tools, grammar, reasoning, queue, run and engine:
`jobs.chat_job`, `lifecycle.serve`); the answer becomes content blocks (thinking, text,
tool_use), whole or as Anthropic's stream of events.
"""

from __future__ import annotations

import functools
import re
import uuid
from typing import AsyncIterator

import msgspec
from litestar import Request, Response

from . import chat_steps, jobs, lifecycle
from .access import ignore_tools
from .anthropic_protocol import (ContentBlock, ContentBlockParam, CountTokensRequest, InputJSONDelta, MessageDelta,
                                 MessageParam, MessageResponse, MessagesRequest, MessagesUsage, OutputUsage, StreamEvent,
                                 TextBlock, TextDelta, ThinkingBlock, ThinkingDelta, TokenCount, ToolUseBlock)
from .chat_steps import CallArguments, CallEnded, CallStarted, ChatSteps, Content, Finished, Reasoning
from .cut_calls import written
from .errors import APIError
from .jobs import Job
from .loading import Served
from .protocol import (ChatMessage, ChatRequest, FunctionCall, FunctionDef, FunctionName, JSONSchemaFormat,
                       NamedToolChoice, ResponseFormat, ToolCall, ToolDef)
from .runs import Choice, Run
from .streaming import PING, TEXT_MARK, around_text, named_sse
from .tools import ToolPlan, tool_plan

BLOCK_JOINER = "\n\n"  # between a message's text blocks (an agent's system prompt comes as several)
TOOL_CHOICES = {"auto": "auto", "any": "required", "none": "none"}  # Anthropic's -> chat's (`tool`: a named one)
STOP_REASONS = {"length": "max_tokens", "tool_calls": "tool_use"}  # chat's finish reasons -> Anthropic's
# Claude Code's first system block: `x-anthropic-billing-header: cc_version=...; cc_entrypoint=...;` (and a `cch=`
# hash in some versions), metadata for Anthropic's billing that changes between requests and sits before
# everything else, so that a prompt rendered with it never shares a prefix with the one before (vLLM leaves it
# out; llama.cpp's server overwrites the hash). Its line is left out of the rendered system message.
BILLING_LINE = re.compile(r"\Ax-anthropic-billing-header:[^\n]*\n?")


# --- Request -> chat request ------------------------------------------------------------------


def refuse_block(block: ContentBlockParam, where: str) -> None:
    raise APIError(400, f"content block type `{block.type}` is not supported here; this server takes text, tool_use, "
                        "tool_result and thinking blocks", f"{where}.type")


def required(block: ContentBlockParam, fields: tuple[str, ...], where: str) -> None:
    for field in fields:
        if getattr(block, field) is None:
            raise APIError(400, f"`{field}` is required in a `{block.type}` block", f"{where}.{field}")


def text_of(content: str | list[ContentBlockParam], where: str) -> str:
    """Content that may only be text: a string, or text blocks joined."""
    if isinstance(content, str):
        return content
    for j, block in enumerate(content):
        if block.type != "text":
            refuse_block(block, f"{where}[{j}]")
        required(block, ("text",), f"{where}[{j}]")
    return BLOCK_JOINER.join(block.text for block in content)


def tool_result(block: ContentBlockParam, where: str) -> ChatMessage:
    """A tool_result block as chat's tool message; a failed call's output says so, since a chat
    template has no field for it."""
    required(block, ("tool_use_id",), where)
    output = text_of(block.content or "", f"{where}.content")
    return ChatMessage(role="tool", content=f"Error: {output}" if block.is_error else output, tool_call_id=block.tool_use_id)


def assistant_message(blocks: list[ContentBlockParam], where: str) -> ChatMessage:
    """An assistant turn: its text, its tool_use blocks as tool calls, its thinking as the
    `reasoning_content` the template may keep (redacted thinking, another server's encrypted
    reasoning, can't be read: it is dropped)."""
    texts, calls, thought = [], [], []
    for j, block in enumerate(blocks):
        at = f"{where}[{j}]"
        if block.type == "text":
            required(block, ("text",), at)
            texts.append(block.text)
        elif block.type == "tool_use":
            required(block, ("id", "name", "input"), at)
            calls.append(ToolCall(id=block.id, function=FunctionCall(block.name, msgspec.json.encode(block.input).decode())))
        elif block.type == "thinking":
            required(block, ("thinking",), at)
            thought.append(block.thinking)
        elif block.type != "redacted_thinking":
            refuse_block(block, at)
    return ChatMessage(role="assistant", content=BLOCK_JOINER.join(texts), tool_calls=calls or None,
                       reasoning_content=BLOCK_JOINER.join(thought) or None)


def append_message(out: list[ChatMessage], origins: list[str], message: MessageParam, where: str) -> None:
    """A message as chat messages (`origins` gets where each came from): a user turn's
    tool_result blocks become tool messages, in their place among its text."""
    before = len(out)
    if isinstance(message.content, str):
        out.append(ChatMessage(role=message.role, content=message.content))
    elif message.role == "assistant":
        out.append(assistant_message(message.content, f"{where}.content"))
    else:
        texts = []
        for j, block in enumerate(message.content):
            at = f"{where}.content[{j}]"
            if block.type == "tool_result" and message.role == "user":
                if texts:
                    out.append(ChatMessage(role="user", content=BLOCK_JOINER.join(texts)))
                    texts = []
                out.append(tool_result(block, at))
            elif block.type == "text":
                required(block, ("text",), at)
                texts.append(block.text)
            else:
                refuse_block(block, at)
        if texts or len(out) == before:
            out.append(ChatMessage(role=message.role, content=BLOCK_JOINER.join(texts)))
    origins += [where] * (len(out) - before)


def system_text(system: str | list[ContentBlockParam]) -> str:
    """The system prompt's text, without a billing-header line at the start of a block."""
    if isinstance(system, str):
        return BILLING_LINE.sub("", system)
    text_of(system, "system")  # only text blocks
    return BLOCK_JOINER.join(text for text in (BILLING_LINE.sub("", block.text) for block in system) if text)


def chat_messages(body: CountTokensRequest) -> tuple[list[ChatMessage], list[str]]:
    """The conversation as chat messages, and the field each came from."""
    out, origins = [], []
    if body.system and (text := system_text(body.system)):
        out.append(ChatMessage(role="system", content=text))
        origins.append("system")
    for i, message in enumerate(body.messages):
        append_message(out, origins, message, f"messages[{i}]")
    if body.messages[-1].role == "assistant":  # a template would close that turn, not continue it
        raise APIError(400, "a last message from the assistant (a prefill to continue) is not supported; end with a "
                            "user message", f"messages[{len(body.messages) - 1}].role")
    return out, origins


# Anthropic's server tools (its docs' tool reference: executed on Anthropic's side), and computer
# use, a client tool whose every result is a screenshot (image blocks are refused here): none can
# run here. Offered, they are left out of the prompt and named (access.ignore_tools); forced, a 400.
SERVER_TOOLS = re.compile(r"(web_search|web_fetch|code_execution|advisor|tool_search_tool_(regex|bm25)|computer)_\d{8}"
                          r"|mcp_toolset", re.ASCII)
TEXT_EDITOR_COMMANDS = ["view", "create", "str_replace", "insert", "undo_edit"]
# The client tools whose schemas Anthropic publishes and its models know without being shown:
# another model is shown them, as their docs describe them, and no other field (a forced call's
# grammar holds it to these: SmolLM2 forced to call `bash` with extra fields allowed wrote the
# schema's own words, "type", "properties", as fields). Lengths are not bounded: a real command
# or file can be long, and a call the budget cuts comes back as the call (cut_calls.py).
ANTHROPIC_CLIENT_TOOLS = {
    "bash": ("Runs a command in a persistent bash shell and returns its output; `restart` restarts the shell.",
             {"type": "object", "properties": {"command": {"type": "string"}, "restart": {"type": "boolean"}},
              "additionalProperties": False}),
    "text_editor": ("Views, creates and edits files: `view` a file or directory (`view_range` [start, end] lines), "
                    "`create` one with `file_text`, `str_replace` its `old_str` with `new_str`, `insert` `new_str` "
                    "after line `insert_line`, `undo_edit` the last edit.",
                    {"type": "object", "properties": {
                        "command": {"type": "string", "enum": TEXT_EDITOR_COMMANDS}, "path": {"type": "string"},
                        "file_text": {"type": "string"}, "old_str": {"type": "string"}, "new_str": {"type": "string"},
                        "insert_line": {"type": "integer"}, "view_range": {"type": "array", "items": {"type": "integer"}}},
                     "required": ["command", "path"], "additionalProperties": False}),
    "memory": ("Reads and writes files in the /memories directory: `view`, `create` (`file_text`), `str_replace`, "
               "`insert` (`insert_line`, `insert_text`), `delete`, `rename` (`old_path`, `new_path`).",
               {"type": "object", "properties": {
                   "command": {"type": "string", "enum": ["view", "create", "str_replace", "insert", "delete", "rename"]},
                   "path": {"type": "string"}, "file_text": {"type": "string"}, "old_str": {"type": "string"},
                   "new_str": {"type": "string"}, "insert_line": {"type": "integer"}, "insert_text": {"type": "string"},
                   "old_path": {"type": "string"}, "new_path": {"type": "string"}},
                "required": ["command"], "additionalProperties": False}),
}
ANTHROPIC_CLIENT_TOOL = re.compile(r"(bash|text_editor|memory)_\d{8}", re.ASCII)


def function_tools(body: CountTokensRequest) -> tuple[list[ToolDef] | None, dict[str, str]]:
    """Client tools as chat's function tools (Anthropic's bash, text editor and memory tools
    with their published schemas), and the server tools left out, by name: their type. Any other
    type is a 400 naming it."""
    defs, ignored = [], {}
    for i, tool in enumerate(body.tools or ()):
        if tool.type and SERVER_TOOLS.fullmatch(tool.type):
            ignored[tool.name or tool.type] = tool.type
            continue
        if not tool.name:
            raise APIError(400, "a tool needs a `name`", f"tools[{i}].name")
        if tool.type and ANTHROPIC_CLIENT_TOOL.fullmatch(tool.type):
            description, schema = ANTHROPIC_CLIENT_TOOLS[tool.type.rsplit("_", 1)[0]]
            defs.append(ToolDef(function=FunctionDef(tool.name, description, schema)))
            continue
        if tool.type not in (None, "custom"):
            raise APIError(400, f"tool type `{tool.type}` is not supported by this server; it runs client tools "
                                "(name, description, input_schema), Anthropic's bash, text editor and memory tools, "
                                "and leaves server tools out", f"tools[{i}].type")
        if tool.input_schema is None or tool.input_schema.get("type") != "object":  # a call's input is an object
            raise APIError(400, "`input_schema` must be a JSON Schema of type object", f"tools[{i}].input_schema.type")
        defs.append(ToolDef(function=FunctionDef(tool.name, tool.description, tool.input_schema, tool.strict)))
    return defs or None, ignored


def chat_tool_choice(body: CountTokensRequest, tools: list[ToolDef] | None,
                     ignored: dict[str, str]) -> str | NamedToolChoice | None:
    """`tool_choice` as chat's; one that forces a server tool (by name, or `any` with only
    server tools) is a 400 naming it."""
    choice = body.tool_choice
    if choice is None:
        return None
    forced = (ignored.get(choice.name) if choice.type == "tool" else
              ", ".join(ignored.values()) if choice.type == "any" and ignored and not tools else None)
    if forced:
        raise APIError(400, f"tool_choice forces `{forced}`: a server tool this server can't run (offered, it is left "
                            "out; it can't be required)", "tool_choice", "unsupported_tool")
    if choice.type != "tool":
        return TOOL_CHOICES[choice.type]
    if not choice.name:
        raise APIError(400, "`name` is required with tool_choice type tool", "tool_choice.name")
    return NamedToolChoice(function=FunctionName(choice.name))


def response_format(body: CountTokensRequest) -> ResponseFormat | None:
    """`output_config.format` as chat's `response_format`, so that the same grammar enforces it."""
    fmt = body.output_config and body.output_config.format
    return fmt and ResponseFormat(type="json_schema", json_schema=JSONSchemaFormat(name="output", schema=fmt.schema))


def reasoning_effort(body: CountTokensRequest) -> str | None:
    """Thinking only when asked for (enabled, or adaptive: the template's own default), as on
    Anthropic's API (a thinking model's template is told `enable_thinking` false otherwise).
    `budget_tokens` is checked as Anthropic checks it (below max_tokens) but not counted apart:
    max_tokens bounds the thinking and the answer together."""
    thinking = body.thinking
    if thinking is None or thinking.type == "disabled":
        return "none"
    if thinking.type == "adaptive":
        return None
    if thinking.budget_tokens is None:
        raise APIError(400, "`budget_tokens` is required with thinking type enabled", "thinking.budget_tokens")
    if isinstance(body, MessagesRequest) and thinking.budget_tokens >= body.max_tokens:
        raise APIError(400, "`budget_tokens` must be less than max_tokens", "thinking.budget_tokens")
    return None


def chat_request(body: CountTokensRequest, model: str) -> tuple[ChatRequest, list[str], list[str]]:
    """The chat request this Messages request is, where each of its messages came from, and the
    server tools it offered that the prompt leaves out."""
    for field in ("mcp_servers", "container"):
        if getattr(body, field):
            raise APIError(400, f"`{field}` is not supported by this server", field)
    messages, origins = chat_messages(body)
    sampling = {} if not isinstance(body, MessagesRequest) else dict(
        max_tokens=body.max_tokens, temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
        stop=body.stop_sequences)
    parallel = not (body.tool_choice and body.tool_choice.disable_parallel_tool_use)
    tools, ignored = function_tools(body)
    request = ChatRequest(model=model, messages=messages, tools=tools, tool_choice=chat_tool_choice(body, tools, ignored),
                          parallel_tool_calls=parallel, response_format=response_format(body),
                          reasoning_effort=reasoning_effort(body), **sampling)
    return request, origins, list(dict.fromkeys(ignored.values()))


CHAT_MESSAGE = re.compile(r"messages\[(\d+)\]")


def as_messages_error(e: APIError, origins: list[str]) -> APIError:
    """An error from chat's code, a chat message it names renamed to the field it came from
    (and `response_format` to `output_config.format`); a prompt over the context worded as
    Anthropic words it, which agents built for Anthropic's API match to compact a conversation."""
    if isinstance(e, jobs.ContextExceeded):
        e.message, e.param = f"prompt is too long: {e.prompt_tokens} tokens > {e.n_ctx - 1} maximum", None
        return e
    if e.param and e.param.startswith("response_format"):
        e.param = "output_config.format"
    found = CHAT_MESSAGE.match(e.param or "")
    if found and int(found.group(1)) < len(origins):
        e.param = origins[int(found.group(1))]
    return e


# --- The answer -------------------------------------------------------------------------------


def tool_input(arguments: str) -> dict:
    """A call's arguments as tool_use's `input` object (of a call cut by max_tokens, the object
    they began: cut_calls.written); arguments that are not one (a model's own JSON can be
    anything) are kept whole under `arguments`."""
    value = written(arguments)
    return value if isinstance(value, dict) else {"arguments": arguments if value is None else value}


def tool_use_block(call_id: str, name: str, arguments: str) -> ToolUseBlock:
    return ToolUseBlock(id=f"toolu_{call_id.removeprefix('call_')}", name=name, input=tool_input(arguments))


def stop_reason(finished: Finished, body: MessagesRequest) -> tuple[str, str | None]:
    """Anthropic's stop_reason and stop_sequence: the engine's "stop" is a stop sequence's when a
    stop string the request gave ended the text (the model's own end-of-turn strings are also
    stop strings to the engine), else the end of the turn. A "length" the context's end forced
    before max_tokens is Anthropic's "model_context_window_exceeded" (the response filled the
    context window: truncated, and no larger max_tokens would have helped)."""
    if finished.reason == "length" and finished.context_full:
        return "model_context_window_exceeded", None
    if finished.reason in STOP_REASONS:
        return STOP_REASONS[finished.reason], None
    if finished.stop_string is not None and finished.stop_string in (body.stop_sequences or ()):
        return "stop_sequence", finished.stop_string
    return "end_turn", None


def new_message(served: Served) -> MessageResponse:
    return MessageResponse(id=f"msg_{uuid.uuid4().hex}", model=served.config.model_id, content=[],
                           usage=MessagesUsage(input_tokens=0, output_tokens=0))


async def respond(request: Request, served: Served, body: MessagesRequest) -> Response:
    chat_body, origins, ignored = chat_request(body, served.config.model_id)
    ignore_tools(request, ignored)
    plan = tool_plan(chat_body)
    message = new_message(served)

    async def whole(run: Run, job: Job, results: list[Choice]) -> Response:
        [choice] = results
        said = chat_steps.answer(plan, choice)
        content: list[ContentBlock] = [ThinkingBlock(thinking=said.reasoning)] if said.reasoning else []
        if said.content:
            content.append(TextBlock(text=said.content))
        content += [tool_use_block(call.id, call.function.name, call.function.arguments) for call in said.calls]
        message.content = content
        message.stop_reason, message.stop_sequence = stop_reason(said.finished, body)
        message.usage = MessagesUsage(input_tokens=run.n_prompt, output_tokens=run.n_completion)
        return Response(message)

    def streamed(run: Run, job: Job) -> AsyncIterator[bytes]:
        return events(run, body, plan, message)

    try:  # the request runs exactly as on /v1/chat/completions
        return await lifecycle.serve(request, served, 1, functools.partial(jobs.chat_job, served, chat_body, plan), whole,
                                   streamed if body.stream else None, renders=True)
    except APIError as e:
        raise as_messages_error(e, origins) from None


def event(kind: str, **fields) -> bytes:
    return named_sse(kind, msgspec.json.encode(StreamEvent(type=kind, **fields)))



class Blocks:
    """The stream's content blocks: one open at a time, each started, given its deltas, and
    stopped, indexed in order. A text delta, the event of nearly every token, is written around
    its text encoded once for the block (streaming.around_text)."""

    def __init__(self):
        self.index, self.open = -1, None  # the open block's index and type

    def start(self, block: ContentBlock) -> list[bytes]:
        sent = self.stop()
        self.index, self.open = self.index + 1, type(block)
        if isinstance(block, TextBlock):
            self.text_ends = around_text(event("content_block_delta", index=self.index, delta=TextDelta(text=TEXT_MARK)))
        return [*sent, event("content_block_start", index=self.index, content_block=block)]

    def stop(self) -> list[bytes]:
        if self.open is None:
            return []
        self.open = None
        return [event("content_block_stop", index=self.index)]

    def text(self, text: str) -> list[bytes]:
        started = self.start(TextBlock(text="")) if self.open is not TextBlock else []
        before, after = self.text_ends
        return [*started, before + msgspec.json.encode(text) + after]

    def thinking(self, thought: str) -> list[bytes]:
        return [*(self.start(ThinkingBlock(thinking="")) if self.open is not ThinkingBlock else []),
                event("content_block_delta", index=self.index, delta=ThinkingDelta(thinking=thought))]

    def tool_input(self, partial: str) -> bytes:
        return event("content_block_delta", index=self.index, delta=InputJSONDelta(partial_json=partial))

    def tool_use(self, block: ToolUseBlock) -> list[bytes]:
        """A call parsed at the end of the answer (as chat sends its tool calls): its input in
        one input_json_delta."""
        started = self.start(ToolUseBlock(id=block.id, name=block.name, input={}))
        return [*started, self.tool_input(msgspec.json.encode(block.input).decode()), *self.stop()]


async def events(run: Run, body: MessagesRequest, plan: ToolPlan, message: MessageResponse) -> AsyncIterator[bytes]:
    """Anthropic's stream: message_start and a ping, then content blocks as they come (a
    thinking model's thinking, then the text delta by delta; a forced call's tool_use block as
    soon as its name is written, its input as the model writes it; other calls are spotted as
    on chat, the text that may begin one held, and sent as tool_use blocks at the end), then
    message_delta with the stop reason and output tokens, and message_stop; an error midway is
    an `error` event (streaming.error_events, as the route's API says)."""
    message.usage = MessagesUsage(input_tokens=run.n_prompt, output_tokens=0)
    yield event("message_start", message=message)
    yield PING
    steps, blocks = ChatSteps(plan), Blocks()
    call, arguments, finished = None, "", Finished(reason="stop")  # a call held until it ends, its arguments
    async for _, event_ in run:
        for step in steps.feed(event_):
            if isinstance(step, Reasoning):
                for sent in blocks.thinking(step.text):
                    yield sent
            elif isinstance(step, Content) and step.text:
                for sent in blocks.text(step.text):
                    yield sent
            elif isinstance(step, CallStarted):
                call, arguments = step, ""
                if not step.whole:  # streamed as the model writes it (a forced call)
                    for sent in blocks.start(tool_use_block(step.id, step.name, "{}")):
                        yield sent
            elif isinstance(step, CallArguments):
                if call.whole:
                    arguments += step.text
                else:
                    yield blocks.tool_input(step.text)
            elif isinstance(step, CallEnded):
                for sent in blocks.tool_use(tool_use_block(call.id, call.name, arguments)) if call.whole else blocks.stop():
                    yield sent
            elif isinstance(step, Finished):
                finished = step
    for sent in blocks.stop():
        yield sent
    stopped, sequence = stop_reason(finished, body)
    yield event("message_delta", delta=MessageDelta(stop_reason=stopped, stop_sequence=sequence),
                usage=OutputUsage(output_tokens=run.n_completion))
    yield event("message_stop")


def count_tokens(request: Request, served: Served, body: CountTokensRequest) -> TokenCount:
    """The prompt's tokens as POST /v1/messages would run it (tools included, server tools left
    out and named as there), nothing generated."""
    chat_body, origins, ignored = chat_request(body, served.config.model_id)
    ignore_tools(request, ignored)
    plan = tool_plan(chat_body)
    try:
        prompt = jobs.chat_prompt(served, chat_body.messages, plan.tools, jobs.template_kwargs(served, chat_body))
    except APIError as e:
        raise as_messages_error(e, origins) from None
    return TokenCount(input_tokens=len(prompt.tokens))
