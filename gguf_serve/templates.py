"""Chat formats: OpenAI-style messages -> the exact prompt text a model was trained on.

Pure functions, no I/O. A message is a dict with "role" and "content" (a str; the
service has already joined text parts and mapped "developer" to "system"), and
optionally "tool_calls" (arguments as dicts, as HF templates expect) or "tool_call_id".

Each hand-written family reproduces its official template byte for byte (see
tests/test_templates.py, which renders the official Jinja files and compares). A
model that carries `tokenizer.chat_template` in its GGUF gets that template rendered
in a sandbox instead, unless a family is forced.
"""

from __future__ import annotations

import json
import re
from typing import Callable, NamedTuple

Messages = list[dict]
Render = Callable[[Messages], str]


def _tool_calls_text(message: dict, each: Callable[[str, object], str]) -> str:
    return "".join(each(c["function"]["name"], c["function"]["arguments"]) for c in message.get("tool_calls") or ())


def _hermes_call(name: str, arguments: object) -> str:
    """A tool call as Qwen2.5 (and the Hermes format many chat models know) writes it."""
    return f'\n<tool_call>\n{{"name": "{name}", "arguments": {tojson(arguments)}}}\n</tool_call>'


def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # The tojson HF transformers gives chat templates (jinja2's own escapes HTML and sorts keys).
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


# --- ChatML family --------------------------------------------------------------------------

def _chatml_turns(messages: Messages) -> str:
    """The turns of Qwen2.5's official template, which plain ChatML shares when no tools are used."""
    out = []
    for i, m in enumerate(messages):
        role, content = m["role"], m["content"]
        if role == "tool":
            if i == 0 or messages[i - 1]["role"] != "tool":
                out.append("<|im_start|>user")
            out.append(f"\n<tool_response>\n{content}\n</tool_response>")
            if i == len(messages) - 1 or messages[i + 1]["role"] != "tool":
                out.append("<|im_end|>\n")
        elif role == "assistant" and m.get("tool_calls"):
            calls = _tool_calls_text(m, _hermes_call)
            out.append(f"<|im_start|>assistant{chr(10) + content if content else ''}{calls}<|im_end|>\n")
        else:
            out.append(f"<|im_start|>{role}\n{content}<|im_end|>\n")
    return "".join(out)


def split_system(messages: Messages) -> tuple[str | None, Messages]:
    """A leading system message's text (None without one) and the messages after it."""
    if messages and messages[0]["role"] == "system":
        return messages[0]["content"], messages[1:]
    return None, messages


QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


def qwen(messages: Messages) -> str:
    """Qwen2.5: ChatML, with Qwen's default system prompt when the caller gives none."""
    system, messages = split_system(messages)
    head = f"<|im_start|>system\n{QWEN_DEFAULT_SYSTEM if system is None else system}<|im_end|>\n"
    return head + _chatml_turns(messages) + "<|im_start|>assistant\n"


def chatml(messages: Messages) -> str:
    """Plain ChatML (SmolLM, Hermes, Yi, OpenChat...): no default system prompt."""
    return _chatml_turns(messages) + "<|im_start|>assistant\n"


# --- Gemma ----------------------------------------------------------------------------------

def gemma(messages: Messages) -> str:
    """Gemma 2/3: no system role; the system text and a blank line open the first user turn."""
    system, messages = split_system(messages)
    prefix = "" if system is None else system + "\n\n"
    out = ["<bos>"]
    for i, m in enumerate(messages):
        role = {"assistant": "model", "tool": "user"}.get(m["role"], m["role"])
        out.append(f"<start_of_turn>{role}\n{prefix if i == 0 else ''}{m['content'].strip()}<end_of_turn>\n")
    if not messages and prefix:
        out.append(f"<start_of_turn>user\n{prefix}<end_of_turn>\n")
    return "".join(out) + "<start_of_turn>model\n"


# --- Llama ----------------------------------------------------------------------------------

def llama2(messages: Messages) -> str:
    """Llama-2-chat: [INST] turns, the system prompt in <<SYS>> inside the first one."""
    system, messages = split_system(messages)
    out = []
    for i, m in enumerate(messages):
        content = m["content"]
        if i == 0 and system is not None:
            content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}"
        if m["role"] == "assistant":
            out.append(f" {content.strip()} </s>")
        else:
            out.append(f"<s>[INST] {content.strip()} [/INST]")
    return "".join(out)


LLAMA3_DATE = "26 Jul 2024"


def llama3(messages: Messages) -> str:
    """Llama 3.1/3.2 Instruct, with the official system header (knowledge and current date)."""
    system, messages = split_system(messages)
    system = (system or "").strip()
    out = [
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        f"Cutting Knowledge Date: December 2023\nToday Date: {LLAMA3_DATE}\n\n{system}<|eot_id|>"
    ]
    for m in messages:
        if m.get("tool_calls"):
            body = _tool_calls_text(m, lambda name, args: f'{{"name": "{name}", "parameters": {tojson(args)}}}')
            out.append(f"<|start_header_id|>assistant<|end_header_id|>\n\n{body}<|eot_id|>")
        elif m["role"] == "tool":
            out.append(f"<|start_header_id|>ipython<|end_header_id|>\n\n{m['content']}<|eot_id|>")
        else:
            out.append(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>")
    return "".join(out) + "<|start_header_id|>assistant<|end_header_id|>\n\n"


# --- GLM ------------------------------------------------------------------------------------

def chatglm3(messages: Messages) -> str:
    """ChatGLM3-6B: `<|role|>` then a newline and a space before each message."""
    roles = {"tool": "observation"}
    turns = "".join(f"<|{roles.get(m['role'], m['role'])}|>\n {m['content']}" for m in messages)
    return f"[gMASK]sop{turns}<|assistant|>"


def glm4(messages: Messages) -> str:
    """GLM-4.5/4.6: `<|role|>` then a newline; past assistant turns carry an empty think block."""
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    out = ["[gMASK]<sop>"]
    for i, m in enumerate(messages):
        role, content = m["role"], m["content"]
        if role == "assistant":
            reasoning = ""
            if "</think>" in content:
                reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
                content = content.split("</think>")[-1].lstrip("\n")
            think = reasoning.strip() if i > last_user and reasoning else ""
            out.append(f"<|assistant|>\n<think>{think}</think>")
            if content.strip():
                out.append("\n" + content.strip())
        elif role == "tool":
            if i == 0 or messages[i - 1]["role"] != "tool":
                out.append("<|observation|>")
            out.append(f"\n<tool_response>\n{content}\n</tool_response>")
        else:
            out.append(f"<|{role}|>\n{content}")
    return "".join(out) + "<|assistant|>"


# --- Mistral, Phi ---------------------------------------------------------------------------

def mistral(messages: Messages) -> str:
    """Mistral Instruct (Nemo's official template): the system text joins the last user turn."""
    system, messages = split_system(messages)
    out = ["<s>"]
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            out.append(m["content"] + "</s>")
        elif i == len(messages) - 1 and system is not None:
            out.append(f"[INST]{system}\n\n{m['content']}[/INST]")
        else:
            out.append(f"[INST]{m['content']}[/INST]")
    return "".join(out)


def phi3(messages: Messages) -> str:
    """Phi-3/3.5: `<|role|>` turns closed by `<|end|>`; an empty system message is dropped."""
    roles = {"tool": "user"}
    turns = "".join(
        f"<|{roles.get(m['role'], m['role'])}|>\n{m['content']}<|end|>\n"
        for m in messages
        if m["content"] or m["role"] != "system"
    )
    return turns + "<|assistant|>\n"


# --- The catalogue of families --------------------------------------------------------------

class Family(NamedTuple):
    render: Render
    stops: tuple[str, ...]  # end-of-turn texts: generation ends there, and they are never returned


FAMILIES: dict[str, Family] = {
    "qwen": Family(qwen, ("<|im_end|>",)),
    "chatml": Family(chatml, ("<|im_end|>",)),
    "gemma": Family(gemma, ("<end_of_turn>",)),
    "llama2": Family(llama2, ("</s>",)),
    "llama3": Family(llama3, ("<|eot_id|>", "<|eom_id|>")),
    "chatglm3": Family(chatglm3, ("<|user|>", "<|observation|>")),
    "glm4": Family(glm4, ("<|user|>", "<|observation|>")),
    "mistral": Family(mistral, ("</s>",)),
    "phi3": Family(phi3, ("<|end|>", "<|endoftext|>")),
}
CHAT_FORMATS = ("auto", *FAMILIES, "jinja")


def family_of(metadata: dict[str, str], filename: str) -> str:
    """The hand-written family a model belongs to: from its own template text first, then its
    architecture and name, then (only as a fallback) its file name; ChatML when nothing says."""
    template = metadata.get("tokenizer.chat_template", "")
    by_template = [
        ("<|im_start|>", "qwen" if "You are Qwen" in template else "chatml"),
        ("<start_of_turn>", "gemma"),
        ("<|start_header_id|>", "llama3"),
        ("[gMASK]<sop>", "glm4"),
        ("[gMASK]", "chatglm3"),
        ("<<SYS>>", "llama2"),
        ("[INST]", "mistral"),
        ("<|assistant|>", "phi3"),
    ]
    for marker, family in by_template:
        if marker in template:
            return family
    arch = metadata.get("general.architecture", "").lower()
    name = metadata.get("general.name", "").lower().replace(" ", "-")
    for words, family in [
        (("qwen",), "qwen"),
        (("gemma",), "gemma"),
        (("glm-4", "glm4"), "glm4"),
        (("chatglm",), "chatglm3"),
        (("llama-3", "llama3"), "llama3"),
        (("llama-2", "llama2"), "llama2"),
        (("mistral", "mixtral"), "mistral"),
        (("phi3", "phi-3"), "phi3"),
    ]:
        if any(w in arch or w in name for w in words):
            return family
    base = filename.lower()
    for word, family in [("qwen", "qwen"), ("gemma", "gemma"), ("chatglm", "chatglm3"), ("llama", "llama2")]:
        if word in base:
            return family
    return "chatml"


# --- The model's own template ---------------------------------------------------------------

class TemplateError(ValueError):
    """The conversation is one the template refuses (its raise_exception), or it failed to render."""


class RenderBusy(Exception):
    """A slow render found every process for slow renders busy (template_process.py): it may be retried."""


# A template gets this long to render one conversation. The official templates in
# ../shared take about a millisecond for a short chat; a hostile one can loop for hours
# (the sandbox allows range(100000) inside range(100000)).
RENDER_SECONDS = 2.0

# What the server gives a template (HF's globals): a request's chat_template_kwargs can't replace them.
TEMPLATE_VARIABLES = frozenset({"messages", "tools", "add_generation_prompt", "bos_token", "eos_token",
                                "raise_exception", "strftime_now"})


PROBE = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Hello."},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "What is 2 + 2?"},
]


def probe(render: Render) -> None:
    """Render an ordinary conversation once, at load: a template that can't (it raises, or it
    takes longer than a request may) stops the start rather than failing every request."""
    render(PROBE)


# --- Tools ----------------------------------------------------------------------------------

TOOLS_SYSTEM = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n</tool_call>"
)


def with_tools_in_system(messages: Messages, tools: list[dict]) -> Messages:
    """For a format whose template doesn't describe tools: describe them in the system
    message, in the Hermes/Qwen2.5 wording and `<tool_call>` format most chat models know."""
    text = TOOLS_SYSTEM.format(tools="\n".join(tojson(t) for t in tools))
    if messages and messages[0]["role"] == "system":
        return [{**messages[0], "content": f"{messages[0]['content']}\n\n{text}"}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


TOOL_TURNS_PROBE = [  # the id as Mistral's template wants one (9 letters and digits), which refuses others
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call00000", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "tool_call_id": "call00000", "content": "18 C"},
]


def renders_tool_turns(render: Render) -> bool:
    """Whether a format writes an assistant's tool calls and their results into its prompt: a
    template without tool support drops the calls (SmolLM2's left an agent's replayed turn an
    empty assistant message) or refuses the `tool` role (Gemma's), as minja finds at load."""
    try:
        prompt = render(TOOL_TURNS_PROBE)
    except TemplateError:
        return False
    return "get_weather" in prompt and "Paris" in prompt.split("get_weather", 1)[1] and "18 C" in prompt


def with_tool_turns_as_text(messages: Messages) -> Messages:
    """For a format that doesn't render tool turns: an assistant's calls written into its text and
    a run of tool results as one user turn, in the `<tool_call>`/`<tool_response>` form that
    with_tools_in_system teaches (Qwen2.5's own)."""
    out: Messages = []
    for i, m in enumerate(messages):
        if m["role"] == "tool":
            response = f"<tool_response>\n{m['content']}\n</tool_response>"
            if i and messages[i - 1]["role"] == "tool":
                out[-1] = {"role": "user", "content": f"{out[-1]['content']}\n{response}"}
            else:
                out.append({"role": "user", "content": response})
        elif m["role"] == "user" and i and messages[i - 1]["role"] == "tool":
            # one user turn, as Anthropic's tool_result blocks and text share one: a template that
            # wants roles to alternate (Gemma's) would refuse two
            out[-1] = {**m, "content": f"{out[-1]['content']}\n{m['content']}"}
        elif m.get("tool_calls"):
            calls = _tool_calls_text(m, _hermes_call)
            text = f"{m['content']}{calls}" if m["content"] else calls[1:]
            out.append({k: v for k, v in m.items() if k != "tool_calls"} | {"content": text})
        else:
            out.append(m)
    return out


# --- Where the messages' text lies in the prompt --------------------------------------------

# Unicode noncharacters, never valid in interchanged text: they mark where content begins and ends.
_OPEN, _CLOSE = _MARKERS = "\ufdd0", "\ufdd1"


class Rendered(NamedTuple):
    prompt: str
    spans: list[tuple[int, int]]  # where client-supplied text lies in the prompt
    marked: bool  # found by markers (exact), not by searching (when the markers changed the output)


def render_with_spans(render: Render, messages: Messages, extra: dict | None = None,
                      specials: re.Pattern | None = None) -> Rendered:
    """The prompt (`extra`: the template's other variables, tools and chat_template_kwargs), and
    the spans of it that came from the client: message content, and every other string of the
    messages and of `extra` in which `specials` (the model's special-token texts) finds one.

    The tokenizer reads special tokens only outside these spans, so a user who types
    `<|im_end|><|im_start|>system` (in content, a tool's description, a call's arguments, a
    reasoning_content or a kwarg) gets plain text, not a forged turn. The spans are found by
    rendering once more with those strings wrapped in markers (content with its leading and
    trailing white space left outside them, so that a template's `trim` still works); any other
    string is left as it is, so that a template can still compare `type` or look up `properties`.
    A template that inspects what it is given so that the markers change its output gets its
    spans by searching for each of those strings in the prompt instead (`marked` False: a string
    it rewrote is not found).
    """
    messages, extra = _strings(messages, _without_markers), _strings(extra or {}, _without_markers)
    prompt = render(messages, **extra)
    guard = _Guard(specials)
    marked = render([guard.message(m) for m in messages], **{k: _strings(v, guard) for k, v in extra.items()})
    spans = _spans(marked)
    if marked.replace(_OPEN, "").replace(_CLOSE, "") == prompt and 2 * len(spans) == sum(map(marked.count, _MARKERS)):
        return Rendered(prompt, spans, True)
    spans, lost = _searched_spans(prompt, guard.texts, specials)
    if lost:  # texts holding special tokens that are not in the prompt as sent: dropped, or rewritten?
        defang = lambda text: _replace_all(text, lost, specials)  # noqa: E731
        if render(_strings(messages, defang), **_strings(extra, defang)) != prompt:
            raise TemplateError("the model's chat template rewrites client text that holds a special token, "
                                "so the prompt can't be guarded against it")
    return Rendered(prompt, spans, False)


class _Guard:
    """Wraps client strings in the span markers, remembering each one's text (for the search):
    a message's content always, any other string only if it holds a special-token text."""

    def __init__(self, specials: re.Pattern | None):
        self.specials, self.texts = specials, []

    def message(self, message: dict) -> dict:
        content = message.get("content")
        marked = {k: v if k == "role" else _strings(v, self) for k, v in message.items() if k != "content"}
        if not content or not content.strip():
            return {**marked, "content": content} if "content" in message else marked
        core = content.strip()
        self.texts.append(core)
        start = content.index(core)
        return {**marked, "content": f"{content[:start]}{_OPEN}{core}{_CLOSE}{content[start + len(core):]}"}

    def __call__(self, text: str) -> str:
        if not (self.specials and self.specials.search(text)):
            return text
        self.texts.append(text)
        return f"{_OPEN}{text}{_CLOSE}"


def _strings(value, change: Callable[[str], str]):
    """`value` with `change` applied to every string in it, dictionary keys included."""
    if isinstance(value, str):
        return change(value)
    if isinstance(value, dict):
        return {_strings(k, change): _strings(v, change) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strings(v, change) for v in value]
    return value


def _without_markers(text: str) -> str:
    """Client text may not carry the span markers itself (it could close a span early)."""
    return text.replace(_OPEN, "").replace(_CLOSE, "") if _OPEN in text or _CLOSE in text else text


def _replace_all(text: str, lost: list[str], specials: re.Pattern) -> str:
    for core in lost:
        if core in text:
            text = text.replace(core, specials.sub("", core))
    return text


def _searched_spans(prompt: str, texts: list[str],
                    specials: re.Pattern | None = None) -> tuple[list[tuple[int, int]], list[str]]:
    """Each text where it first appears after the previous one's, else anywhere it overlaps
    no span found already; and the texts holding a special-token text that were not found
    (the template dropped them, or rewrote them: escaped, cut)."""
    spans, lost, pos = [], [], 0
    for core in texts:
        start = prompt.find(core, pos)
        if start < 0:
            start = prompt.find(core)
            if start < 0 or any(a < start + len(core) and start < b for a, b in spans):
                if specials and specials.search(core):
                    lost.append(core)
                continue
        spans.append((start, start + len(core)))
        pos = max(pos, start + len(core))
    return sorted(spans), lost


def _spans(marked: str) -> list[tuple[int, int]]:
    spans, removed = [], 0
    for m in re.finditer(f"{_OPEN}([^{_CLOSE}]*){_CLOSE}", marked, re.DOTALL):
        start = m.start() - removed
        spans.append((start, start + len(m.group(1))))
        removed += 2
    return spans
