"""Requests -> what the engine runs (a Job): prompt tokens (chat rendered through the model's
format, or a completion's raw prompt), the token budget, sampling parameters and stop strings.
Slow work (render, tokenize, compile a grammar): the endpoints run it in a worker thread.
"""

from __future__ import annotations

import functools
import re
from typing import NamedTuple

import msgspec

from . import engine, reasoning, templates
from .errors import APIError
from .loading import Served
from .model import Model
from .protocol import ChatMessage, ChatRequest, CompletionRequest, Sampled, TemplateRequest, ToolCall, ToolDef
from .tools import ToolPlan, output_grammar


class Job(NamedTuple):
    """What one request asks of the engine: n choices for each prompt."""

    prompts: list[list[int]]
    n: int
    max_tokens: int
    sampling: engine.Sampling
    stop: list[str]
    top_logprobs: int | None = None  # each token's logprob and this many alternatives (None: none)
    thinking: bool | None = None  # a thinking model's prompt: see engine.Generation.thinking
    logged: str | list | None = None  # the prompt as LOG_PROMPTS logs it
    located_by_search: bool = False  # the template moved the span markers: user text was found by search


def chat_job(served: Served, body: ChatRequest, plan: ToolPlan) -> Job:
    """A chat request (or a Responses request as one), rendered, tokenized, its grammar compiled."""
    prompt = chat_prompt(served, body.messages, plan.tools, template_kwargs(served, body))
    grammar = output_grammar(served.model, body, plan)
    max_tokens = token_budget(served, [prompt.tokens], body.max_completion_tokens or body.max_tokens, None, "messages")
    top_logprobs = (body.top_logprobs or 0) if body.logprobs else None
    return Job([prompt.tokens], body.n, max_tokens, sampling(served, body, grammar), [*served.stops, *stop_strings(body)],
               top_logprobs, prompt.thinking, prompt.text, not prompt.marked)


def completion_job(served: Served, body: CompletionRequest) -> Job:
    """A completion request's prompts, tokenized, and each choice's token budget."""
    tokens = completion_prompts(served, body)
    max_tokens = token_budget(served, tokens, body.max_tokens, 16, "prompt")
    return Job(tokens, body.n, max_tokens, sampling(served, body, None), stop_strings(body), body.logprobs,
               logged=body.prompt)


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


def message_dicts(messages: list[ChatMessage]) -> list[dict]:
    """OpenAI messages -> the plain dicts chat templates expect (text content, system roles,
    tool-call arguments as objects)."""
    out = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise APIError(400, f"content part type `{part.type}` is not supported; only text", f"messages[{i}].content[{j}]")
            content = "".join(part.text for part in content)
        calls = m.tool_calls or ([ToolCall(id="call_0", function=m.function_call)] if m.function_call else None)
        if content is None and not (m.role == "assistant" and calls):
            raise APIError(400, "`content` is required for this role", f"messages[{i}].content")
        role = {"developer": "system", "function": "tool"}.get(m.role, m.role)
        message = {"role": role, "content": content or ""}
        if calls:
            message["tool_calls"] = [
                {"id": c.id, "type": c.type, "function": {
                    "name": c.function.name,
                    "arguments": _json_or_text(c.function.arguments, f"messages[{i}].tool_calls[{j}].function.arguments")}}
                for j, c in enumerate(calls)
            ]
        if m.tool_call_id or m.name:
            message["tool_call_id"] = m.tool_call_id or m.name
        if m.reasoning_content or m.reasoning:  # a thinking model's template decides whether it is kept
            message["reasoning_content"] = m.reasoning_content or m.reasoning
        out.append(message)
    return out


def _json_or_text(text: str, param: str):
    try:
        value = msgspec.json.decode(text)
    except msgspec.DecodeError:
        return text
    except RecursionError:
        raise APIError(400, f"`{param}` nests arrays and objects more than {MAX_NESTING} deep", param) from None
    _check_nesting(value, param)
    return value


# How deep arrays and objects may nest in tools, tool-call arguments and template kwargs:
# preparing a prompt walks them recursively (Python allows 1,000 frames, and a comprehension
# takes two a level). OpenAI's structured outputs take 5 levels of schema.
MAX_NESTING = 64


def _check_nesting(value, param: str) -> None:
    """A 400 naming `param` if `value` nests deeper than MAX_NESTING (found without recursing)."""
    stack = [(value, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth == MAX_NESTING:
                raise APIError(400, f"`{param}` nests arrays and objects more than {MAX_NESTING} deep", param)
            stack.extend((v, depth + 1) for v in (value.values() if isinstance(value, dict) else value))


class ChatPrompt(NamedTuple):
    text: str
    tokens: list[int]
    marked: bool  # what users typed was located exactly (see templates.render_with_spans)
    thinking: bool | None  # a thinking model: whether the prompt opened its think block (else None)


def chat_prompt(served: Served, messages: list[ChatMessage], tools: list[ToolDef] | None = None,
                template_kwargs: dict | None = None) -> ChatPrompt:
    """The rendered prompt and its tokens. Tools go to a template that knows them; for one that
    doesn't, they are described in the system message, and for one that drops tool turns those are
    written as text. `template_kwargs` reach the model's own template (a hand-written family takes
    none)."""
    if len(messages) > served.config.max_messages:
        raise APIError(400, f"{len(messages)} messages; at most {served.config.max_messages} are accepted", "messages")
    dicts = message_dicts(messages)
    if not served.renders_tool_turns:
        dicts = templates.with_tool_turns_as_text(dicts)
    extra = dict(template_kwargs or {}) if served.own_template else {}
    for key, value in extra.items():
        _check_nesting(value, f"chat_template_kwargs.{key}")
    if tools:
        tool_dicts = [msgspec.to_builtins(t) for t in tools]
        for k, tool in enumerate(tool_dicts):
            _check_nesting(tool, f"tools[{k}]")
        if served.template_takes_tools:
            extra["tools"] = tool_dicts
        else:
            dicts = templates.with_tools_in_system(dicts, tool_dicts)
    try:
        prompt, spans, marked = templates.render_with_spans(served.render, dicts, extra, special_texts(served.model))
    except templates.TemplateError as e:
        raise APIError(400, str(e), "messages", "template_error") from None
    except templates.RenderBusy as e:
        raise APIError(429, str(e), "messages", "render_busy") from None
    thinking = reasoning.opens_thinking(prompt) if served.thinks else None
    return ChatPrompt(prompt, served.model.tokenize_prompt(prompt, spans), marked, thinking)


@functools.cache
def special_texts(model: Model) -> re.Pattern | None:
    """What finds the model's special-token texts in a string (None: it has none)."""
    return re.compile("|".join(map(re.escape, model.special))) if model.special else None


def completion_prompts(served: Served, body: CompletionRequest) -> list[list[int]]:
    """`prompt` as a string, a list of strings, a list of token ids, or a list of those; a
    raw prompt is the client's own text, special tokens included, as at llama.cpp's server."""
    model, prompt = served.model, body.prompt
    if isinstance(prompt, str) or all(isinstance(p, str) for p in prompt):
        prompts = [model.tokenize(p, special=True) for p in ([prompt] if isinstance(prompt, str) else prompt)]
    elif all(isinstance(p, int) for p in prompt):
        prompts = [prompt]
    elif all(isinstance(p, list) for p in prompt):
        prompts = prompt
    else:
        raise APIError(400, "`prompt` must be a string, a list of strings, or token ids", "prompt")
    if not prompts or not all(prompts):
        raise APIError(400, "`prompt` is empty: give at least one token of text", "prompt")
    if any(not 0 <= t < model.n_vocab for p in prompts for t in p):
        raise APIError(400, "`prompt` holds a token id outside the vocabulary", "prompt")
    if body.suffix is not None:
        return [infill(served, p, body.suffix) for p in prompts]
    return [[model.bos, *p] if model.add_bos and p[:1] != [model.bos] else p for p in prompts]


def infill(served: Served, prefix: list[int], suffix: str) -> list[int]:
    """Fill-in-the-middle, in the prefix-suffix-middle order FIM models are trained on."""
    model = served.model
    if model.fim is None:
        raise APIError(400, "`suffix` needs a model trained for fill-in-the-middle; this one is not", "suffix")
    pre, suf, mid = model.fim
    return [*([model.bos] if model.add_bos else []), pre, *prefix, suf, *model.tokenize(suffix), mid]


def sampling(served: Served, body: Sampled, grammar: str | None) -> engine.Sampling:
    d = served.config.sampling
    bias = {}
    n_vocab = served.model.n_vocab
    for token, value in (body.logit_bias or {}).items():
        # ASCII digits only: str.isdigit takes "²", and int() refuses that and anything over 4,300 digits
        if not (token.isascii() and token.isdigit() and len(token) <= len(str(n_vocab)) and int(token) < n_vocab):
            raise APIError(400, f"logit_bias key {token[:32]!r} is not a token id of this model", "logit_bias")
        bias[int(token)] = -float("inf") if value <= -100 else value
    return engine.Sampling(
        temperature=d.temperature if body.temperature is None else body.temperature,
        top_p=d.top_p if body.top_p is None else body.top_p,
        top_k=d.top_k if body.top_k is None else body.top_k,
        min_p=d.min_p if body.min_p is None else body.min_p,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        repeat_penalty=d.repeat_penalty if body.repeat_penalty is None else body.repeat_penalty,
        seed=body.seed,
        logit_bias=bias,
        grammar=grammar,
    )


def token_budget(served: Served, prompts: list[list[int]], requested: int | None, default: int | None,
                 param: str) -> int:
    """Tokens each choice may generate. A prompt that leaves no room for one token is refused
    before any work; a `max_tokens` past the room left is not: the engine ends the generation at
    the context's end (finish_reason "length", Event.context_full), as llama.cpp's server does
    with context shift off (its default: the slot stops with STOP_TYPE_LIMIT, `truncated`) and as
    Anthropic's API does (stop_reason "model_context_window_exceeded"). vLLM refuses that request
    instead (400 "'max_tokens' or 'max_completion_tokens' is too large"), which coding agents that
    send a fixed max_tokens (Claude Code: 32000) can't get past on a context smaller than that.
    MAX_TOKENS, when set, lowers what is asked to it (llama.cpp's server: --n-predict)."""
    n_ctx, longest = served.model.n_ctx, max(len(p) for p in prompts)
    if longest >= n_ctx:
        raise ContextExceeded(longest, n_ctx, param)
    budget = requested or default or n_ctx
    return min(budget, served.config.max_tokens) if served.config.max_tokens else budget


class ContextExceeded(APIError):
    """A prompt that leaves no room in the context for one token of answer."""

    def __init__(self, prompt_tokens: int, n_ctx: int, param: str):
        super().__init__(400, f"This model's maximum context length is {n_ctx} tokens; the prompt has {prompt_tokens} "
                              "tokens, which leaves no room for one token of answer.", param, "context_length_exceeded")
        self.prompt_tokens, self.n_ctx = prompt_tokens, n_ctx


def stop_strings(body: Sampled) -> list[str]:
    return [body.stop] if isinstance(body.stop, str) else body.stop or []
