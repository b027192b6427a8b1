"""Tools and structured output: which tool call a request forces, the grammar an answer must
follow (a forced call, JSON mode, a JSON Schema), and the tool calls found in a model's text.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import NamedTuple

import msgspec

from . import reasoning
from .errors import APIError
from .grammar import GrammarError, check_grammar, json_schema_grammar
from .model import Model
from .protocol import AssistantMessage, ChatRequest, FunctionCall, FunctionName, NamedToolChoice, ToolCall, ToolDef

# Structured output: JSON Schema -> llguidance's grammar (grammar.py). Bounds on what a client's
# schema may ask, each a size it controls, checked before anything is compiled; the per-token
# work the grammar can cost is bounded by grammar.LIMITS whatever the schema.
SCHEMA_KEYWORDS = {
    "type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems", "maxItems",
    "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "$defs", "definitions", "pattern", "minLength",
    "maxLength", "format", "title", "description", "default", "examples", "$schema", "$id", "$comment",
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
}
SCHEMA_FORMATS = {"date", "time", "date-time", "uuid", "email"}
# - a count of repetitions (minLength, maxLength, minItems, maxItems, a pattern's {n,m}): each
#   is a counter in the grammar's automaton; 1,000 compiles in milliseconds;
MAX_REPEAT = 1000
REPEAT_KEYWORDS = ("minLength", "maxLength", "minItems", "maxItems")
# - JSON nesting (two levels an object: the schema, its `properties`): the compiler recurses
#   through it; OpenAI's structured outputs allow 10 levels of objects;
MAX_SCHEMA_DEPTH = 64
# - properties of one object, values of one enum and alternatives of one anyOf/oneOf/allOf, and
#   the alternatives of the whole schema: each is a branch the parser may follow at every token
#   (issue #34: 5,000 `{"type": "string"}` alternatives were accepted and cost every other stream
#   5-9 s a token under llama.cpp's grammar); OpenAI allows 1,000 enum values in a schema.
MAX_PROPERTIES = 128
MAX_ENUM = 256
MAX_ALTERNATIVES = 64
MAX_BRANCHES = 1000
_QUANTIFIER = re.compile(r"\{\s*(\d*)\s*(?:,\s*(\d*)\s*)?\}")


def schema_grammar(schema: dict, param: str) -> str:
    """The grammar for a JSON Schema, or a 400 naming the features it can't enforce or the bound
    the schema is over."""
    check_schema_size(schema, param)
    unsupported = sorted(schema_features(schema) - SCHEMA_KEYWORDS)
    if unsupported:
        raise APIError(400, f"JSON Schema features not supported: {', '.join(unsupported)}", param, "unsupported_schema")
    return json_schema_grammar(closed(schema))


def closed(schema):
    """`schema` with `additionalProperties: false` wherever an object lists its `properties` and
    says nothing of others, as llama.cpp's converter reads it: left open (JSON Schema's default),
    SmolLM2 forced to call `get_weather(city)` went on inventing properties until its tokens ran
    out, and a call cut short is no call. A schema that allows more says so."""
    if isinstance(schema, list):
        return [closed(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: value if key in ("enum", "const", "default", "examples") else
           {name: closed(sub) for name, sub in value.items()} if key in ("properties", "$defs", "definitions")
           and isinstance(value, dict) else closed(value) for key, value in schema.items()}
    if isinstance(out.get("properties"), dict) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def check_schema_size(schema, param: str) -> None:
    """A 400 naming the bound (above) a schema is over, or a `$ref` that is not to a definition
    inside it (a remote one would be fetched: the server never does)."""
    branches = 0

    def refuse(message: str):
        raise APIError(400, f"JSON Schema not supported: {message}", param, "unsupported_schema")

    def walk(node, depth: int) -> None:
        nonlocal branches
        if not isinstance(node, (dict, list)):
            return
        if depth > MAX_SCHEMA_DEPTH:
            refuse(f"nested more than {MAX_SCHEMA_DEPTH} levels deep")
        if isinstance(node, list):
            for item in node:
                walk(item, depth + 1)
            return
        counts = [(key, node[key]) for key in REPEAT_KEYWORDS if key in node]
        if isinstance(node.get("pattern"), str):
            counts += [("pattern", int(n) if len(n) < 10 else MAX_REPEAT + 1)
                       for bounds in _QUANTIFIER.findall(node["pattern"]) for n in bounds if n]
        for key, count in counts:
            if not isinstance(count, int) or not 0 <= count <= MAX_REPEAT:
                refuse(f"`{key}` must count from 0 to {MAX_REPEAT} repetitions")
        if "$ref" in node and not (isinstance(node["$ref"], str) and node["$ref"].startswith("#")):
            refuse("a `$ref` must point inside the schema (`#/$defs/...`)")
        for key, value in node.items():
            if key in ("properties", "$defs", "definitions") and isinstance(value, dict):
                if len(value) > MAX_PROPERTIES:
                    refuse(f"`{key}` has {len(value)} entries; at most {MAX_PROPERTIES}")
                for sub in value.values():
                    walk(sub, depth + 2)
            elif key in ("enum", "anyOf", "oneOf", "allOf") and isinstance(value, list):
                bound = MAX_ENUM if key == "enum" else MAX_ALTERNATIVES
                if len(value) > bound:
                    refuse(f"`{key}` has {len(value)} {'values' if key == 'enum' else 'alternatives'}; at most {bound}")
                branches += len(value)
                if branches > MAX_BRANCHES:
                    refuse(f"its enums and alternatives have over {MAX_BRANCHES} branches together")
                if key != "enum":
                    walk(value, depth + 1)
            elif key not in ("const", "default", "examples", "required", "pattern"):
                walk(value, depth + 1)

    walk(schema, 1)


def schema_features(schema) -> set[str]:
    """Every keyword a schema uses (property names and definitions' names excluded)."""
    if isinstance(schema, list):
        return set().union(*(schema_features(s) for s in schema))
    if not isinstance(schema, dict):
        return set()
    found = set(schema)
    if schema.get("format") not in (None, *SCHEMA_FORMATS):
        found.add(f"format: {schema['format']}")
    for key, value in schema.items():
        if key in ("properties", "$defs", "definitions") and isinstance(value, dict):
            found |= schema_features(list(value.values()))
        elif key not in ("enum", "const", "default", "examples", "required"):
            found |= schema_features(value)
    return found


class FreeForm(NamedTuple):
    """A forced call to a tool whose input is free text (a Responses API `custom` tool): the
    whole answer is its input, following the tool's grammar when it has one (else any text)."""

    name: str
    grammar: str | None = None


class ToolPlan(NamedTuple):
    """The tools the model is told about, which call is forced (None, "required" or a name),
    whether the legacy `functions` API asked, a forced free-form call, and whether an answer may
    hold more than one call (`parallel_tool_calls`: else its first is answered)."""

    tools: list[ToolDef] | None = None
    forced: str | None = None
    legacy: bool = False
    free_form: FreeForm | None = None
    parallel: bool = True


def tool_plan(body: ChatRequest) -> ToolPlan:
    legacy = bool(body.functions)
    tools = body.tools or ([ToolDef(function=f) for f in body.functions] if legacy else None)
    choice = body.function_call if legacy else body.tool_choice
    parallel = body.parallel_tool_calls is not False and not legacy  # the legacy API answers one call
    if not tools or choice == "none":
        return ToolPlan(legacy=legacy, parallel=parallel)
    names = [t.function.name for t in tools]
    if isinstance(choice, (NamedToolChoice, FunctionName)):
        name = choice.function.name if isinstance(choice, NamedToolChoice) else choice.name
        if name not in names:
            raise APIError(400, f"tool_choice names `{name}`, which is not among the tools", "tool_choice")
        return ToolPlan(tools, name, legacy, parallel=parallel)
    return ToolPlan(tools, "required" if choice == "required" else None, legacy, parallel=parallel)


def output_grammar(model: Model, body: ChatRequest, plan: ToolPlan) -> str | None:
    """The grammar a chat answer must follow: a forced tool call, JSON mode, a JSON Schema, or a
    forced free-form call's own grammar."""
    if plan.free_form:
        if plan.free_form.grammar is None:
            return None
        grammar = plan.free_form.grammar
    elif plan.forced:
        calls = [
            {"type": "object", "properties": {"name": {"const": t.function.name},
                                              "arguments": t.function.parameters or {"type": "object"}},
             "required": ["name", "arguments"], "additionalProperties": False}
            for t in plan.tools if plan.forced in ("required", t.function.name)
        ]
        grammar = schema_grammar(calls[0] if len(calls) == 1 else {"anyOf": calls}, "tools")
    elif body.response_format is None or body.response_format.type == "text":
        return None
    elif body.response_format.type == "json_object":
        grammar = json_schema_grammar({"type": "object"})
    else:
        if body.response_format.json_schema is None:
            raise APIError(400, "`json_schema` is required with type json_schema", "response_format.json_schema")
        grammar = schema_grammar(body.response_format.json_schema.schema, "response_format.json_schema.schema")
    try:
        check_grammar(model, grammar)
    except GrammarError as e:
        if plan.free_form:
            raise APIError(400, f"the grammar of tool `{plan.free_form.name}` can't be compiled: {e}", "tools",
                           "unsupported_grammar") from None
        raise APIError(400, f"the output constraint can't be compiled: {e}", "response_format", "unsupported_schema") from None
    return grammar


_TOOL_CALL_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def parse_tool_calls(text: str, names: list[str], whole_json: bool = False) -> tuple[str | None, list[tuple[str, str]]]:
    """A model's answer -> (its remaining text or None, [(function name, arguments as JSON)]).

    Reads Hermes/Qwen `<tool_call>{...}</tool_call>` blocks, or an answer that is one JSON call
    as Llama 3.1 writes it (`{"name": ..., "parameters": {...}}`); `whole_json` is for answers
    a grammar forced to be exactly `{"name": ..., "arguments": {...}}`. Calls to functions not
    in `names` are left as text."""

    def call(source: str) -> tuple[str, str] | None:
        try:
            obj = json.loads(source)
        except (ValueError, RecursionError):  # the model's own text: it can nest past Python's limit
            return None
        if not isinstance(obj, dict) or obj.get("name") not in names:
            return None
        arguments = obj.get("arguments", obj.get("parameters", {}))
        return obj["name"], arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)

    if whole_json or not _TOOL_CALL_BLOCK.search(text):
        found = call(text.strip().removeprefix("<|python_tag|>"))
        return (None, [found]) if found else (text, [])
    calls = [c for c in (call(m.group(1)) for m in _TOOL_CALL_BLOCK.finditer(text)) if c]
    if not calls:
        return text, []
    rest = _TOOL_CALL_BLOCK.sub("", text).strip()
    return rest or None, calls


def answer(text: str, finish_reason: str, plan: ToolPlan) -> tuple[AssistantMessage, str]:
    """The assistant's message: its text, or the tool calls found in it (a forced free-form
    call's input is the whole text, as `{"input": text}`: a custom tool as the model sees it)."""
    if plan.free_form:
        call = FunctionCall(plan.free_form.name, json.dumps({"input": text}, ensure_ascii=False))
        return (AssistantMessage(content=None, tool_calls=[ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", function=call)]),
                finish_reason if finish_reason == "length" else "tool_calls")
    if not plan.tools:
        return AssistantMessage(content=text), finish_reason
    names = [t.function.name for t in plan.tools]
    content, calls = parse_tool_calls(text, names, whole_json=plan.forced is not None)
    if not calls:
        return AssistantMessage(content=text), finish_reason
    tool_calls = [
        ToolCall(id=f"call_{uuid.uuid4().hex[:24]}", function=FunctionCall(name, arguments)) for name, arguments in calls
    ]
    if plan.legacy:
        return AssistantMessage(content=content, function_call=tool_calls[0].function), "function_call"
    return AssistantMessage(content=content, tool_calls=tool_calls), "tool_calls"


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


_FORCED_CALL_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:')


class ForcedCallReader:
    """A forced call's text read as it streams. The grammar (output_grammar) makes it exactly
    `{"name": ..., "arguments": ...}`, name first, so that once the name is written the rest,
    up to the arguments' end, is the arguments' JSON as the model writes it."""

    def __init__(self):
        self.pending = ""  # the text before the arguments, until the name is known
        self.name: str | None = None
        self.depth, self.in_string, self.escaped, self.done = 0, False, False, False

    def feed(self, text: str) -> tuple[str | None, str]:
        """(the call's name, the moment it is known, else None; the arguments' next text)."""
        if self.done:
            return None, ""
        named = None
        if self.name is None:
            self.pending += text
            head = _FORCED_CALL_HEAD.match(self.pending)
            if not head:
                return None, ""
            self.name = named = msgspec.json.decode(head.group(1))
            text, self.pending = self.pending[head.end():], ""
        for i, char in enumerate(text):
            if self.in_string:
                self.escaped, self.in_string = (False, True) if self.escaped else (char == "\\", char != '"')
            elif char == '"':
                self.in_string = True
            elif char in "{[":
                self.depth += 1
            elif char in "}]":
                self.depth -= 1
                if self.depth == 0:  # the arguments' object has closed: what follows closes the call
                    self.done = True
                    return named, text[: i + 1]
        return named, text

