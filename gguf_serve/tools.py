"""Tools and structured output: which tool call a request forces, the grammar an answer must
follow (a forced call, JSON mode, a JSON Schema), and the tool calls found in a model's text.
"""

from __future__ import annotations

import itertools
import json
import re
import uuid
from typing import NamedTuple

import msgspec

from . import engine, reasoning
from .model import Model
from .protocol import (APIError, AssistantMessage, ChatRequest, FunctionCall, FunctionName, NamedToolChoice, ToolCall,
                      ToolDef)

# Structured output: JSON Schema -> a llama.cpp grammar, with llama-cpp-python's converter.
SCHEMA_KEYWORDS = {
    "type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems", "maxItems",
    "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "$defs", "definitions", "pattern", "minLength",
    "maxLength", "format", "title", "description", "default", "examples", "$schema", "$id", "$comment",
}
SCHEMA_FORMATS = {"date", "time", "date-time", "uuid"}

# Bounds on a schema, so that neither the converter nor llama.cpp's grammar parser is given more
# than it can take (issue #25: `"maxLength": 20000` became 20,000 nested groups, and the parser,
# which recurses once per group, overflowed the C stack: SIGSEGV). Measured on llama-cpp-python
# 0.3.36, whose parser takes about 450 bytes of stack a nesting level (an 8 MiB stack overflows
# between 10,000 and 20,000 levels, 1 MiB below 5,000):
# - a count the converter writes as nested optional copies (maxLength, maxItems, a pattern's {n,m})
#   or flat ones (minLength, minItems, {n}): the parser refuses more than 1,000 nested copies
#   ("exceeds sane defaults"), only after recursing through them all; 1,000 compiles in 9 ms;
MAX_REPEAT = 1000
REPEAT_KEYWORDS = ("minLength", "maxLength", "minItems", "maxItems")
# - JSON nesting (two levels an object: the schema, its `properties`): the converter recurses
#   through it; OpenAI's structured outputs allow 10 levels of objects;
MAX_SCHEMA_DEPTH = 64
# - properties of one object (the converter's time grows with the square of the optional ones:
#   900 took 1.6 s) and values of one enum: each is an alternative that llama.cpp's grammar
#   sampler tries against the whole vocabulary at each token, in the decode thread every stream
#   waits on (SmolLM2, 49k tokens: 128 optional properties up to 0.18 s a token, 256 values
#   sharing a prefix up to 0.4 s, 1,000 values 1.3 s);
MAX_PROPERTIES = 128
MAX_ENUM = 256
# - the grammar's size: it is compiled in the request and again in the decode thread, where
#   every stream waits for it (an 800 KB grammar took 0.4 s); estimated from the schema before
#   the converter runs, so that the converter's own work is bounded too, then checked;
MAX_GRAMMAR_BYTES = 256 << 10
# - the grammar's nesting of groups, whatever made it: what the parser recurses through, well
#   within engine.GRAMMAR_STACK (16 MiB: about 35,000 levels).
MAX_GRAMMAR_DEPTH = 2 * MAX_REPEAT
_QUANTIFIER = re.compile(r"\{\s*(\d*)\s*(?:,\s*(\d*)\s*)?\}")
_LITERALS = re.compile(r'"(?:\\.|[^"\\])*"|\[(?:\\.|[^\]\\])*\]')  # a GBNF's strings and character classes


def schema_grammar(schema: dict, param: str) -> str:
    """The GBNF for a JSON Schema, or a 400 naming the features the converter can't enforce or
    the bound the schema is over."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    check_schema_size(schema, param)
    unsupported = sorted(schema_features(schema) - SCHEMA_KEYWORDS)
    if unsupported:
        raise APIError(400, f"JSON Schema features not supported: {', '.join(unsupported)}", param, "unsupported_schema")
    try:
        grammar = json_schema_to_gbnf(msgspec.json.encode(schema).decode())
    except Exception as e:  # the converter raises assorted errors on schemas it can't handle
        raise APIError(400, f"JSON Schema not supported: {e}", param, "unsupported_schema") from None
    if len(grammar) > MAX_GRAMMAR_BYTES or grammar_depth(grammar) > MAX_GRAMMAR_DEPTH:
        raise APIError(400, f"JSON Schema not supported: its grammar is over {MAX_GRAMMAR_BYTES} bytes or nests "
                            f"over {MAX_GRAMMAR_DEPTH} groups deep", param, "unsupported_schema")
    # The converter's string characters admit raw control characters (newlines...), which JSON
    # forbids inside strings; llama.cpp's own converter has since excluded them.
    return grammar.replace(r'char ::= [^"\\] |', r'char ::= [^"\\\x7F\x00-\x1F] |')


def check_schema_size(schema, param: str) -> None:
    """A 400 naming the bound (above) a schema is over. The grammar's size is estimated as the
    converter writes it: each schema's rule names grow with the property names on its path, and
    a count of copies writes that many of them."""
    size = 0

    def refuse(message: str):
        raise APIError(400, f"JSON Schema not supported: {message}", param, "unsupported_schema")

    def walk(node, depth: int, name: int) -> None:
        nonlocal size
        if not isinstance(node, (dict, list)):
            return
        if depth > MAX_SCHEMA_DEPTH:
            refuse(f"nested more than {MAX_SCHEMA_DEPTH} levels deep")
        if isinstance(node, list):
            for item in node:
                walk(item, depth + 1, name)
            return
        counts = [(key, node[key]) for key in REPEAT_KEYWORDS if key in node]
        if isinstance(node.get("pattern"), str):
            counts += [("pattern", int(n) if len(n) < 10 else MAX_REPEAT + 1)
                       for bounds in _QUANTIFIER.findall(node["pattern"]) for n in bounds if n]
        for key, count in counts:
            if not isinstance(count, int) or not 0 <= count <= MAX_REPEAT:
                refuse(f"`{key}` must count from 0 to {MAX_REPEAT} repetitions (each is written out in the grammar)")
        size += (name + 16) * (1 + sum(count for _, count in counts))
        for key, value in node.items():
            if key in ("properties", "$defs", "definitions") and isinstance(value, dict):
                if len(value) > MAX_PROPERTIES:
                    refuse(f"`{key}` has {len(value)} entries; at most {MAX_PROPERTIES}")
                for entry, sub in value.items():
                    walk(sub, depth + 2, name + len(entry) + 1)
            elif key in ("enum", "const"):
                if key == "enum" and isinstance(value, list) and len(value) > MAX_ENUM:
                    refuse(f"`enum` has {len(value)} values; at most {MAX_ENUM}")
                size += 2 * len(msgspec.json.encode(value))  # escaped again, as GBNF literals
            elif key not in ("default", "examples", "required", "pattern"):
                walk(value, depth + 1, name + len(key) + 1)
        if size > MAX_GRAMMAR_BYTES:
            refuse(f"its grammar would be over {MAX_GRAMMAR_BYTES} bytes")

    walk(schema, 1, 0)


def grammar_depth(grammar: str) -> int:
    """How deep a GBNF's groups nest."""
    parens = (1 if c == "(" else -1 for c in _LITERALS.sub("", grammar) if c in "()")
    return max(itertools.accumulate(parens), default=0)


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


class ToolPlan(NamedTuple):
    """The tools the model is told about, which call is forced (None, "required" or a name),
    and whether the legacy `functions` API asked."""

    tools: list[ToolDef] | None = None
    forced: str | None = None
    legacy: bool = False


def tool_plan(body: ChatRequest) -> ToolPlan:
    legacy = bool(body.functions)
    tools = body.tools or ([ToolDef(function=f) for f in body.functions] if legacy else None)
    choice = body.function_call if legacy else body.tool_choice
    if not tools or choice == "none":
        return ToolPlan(legacy=legacy)
    names = [t.function.name for t in tools]
    if isinstance(choice, (NamedToolChoice, FunctionName)):
        name = choice.function.name if isinstance(choice, NamedToolChoice) else choice.name
        if name not in names:
            raise APIError(400, f"tool_choice names `{name}`, which is not among the tools", "tool_choice")
        return ToolPlan(tools, name, legacy)
    return ToolPlan(tools, "required" if choice == "required" else None, legacy)


def output_grammar(model: Model, body: ChatRequest, plan: ToolPlan) -> str | None:
    """The grammar a chat answer must follow: a forced tool call, JSON mode or a JSON Schema."""
    if plan.forced:
        calls = [
            {"type": "object", "properties": {"name": {"const": t.function.name},
                                              "arguments": t.function.parameters or {"type": "object"}},
             "required": ["name", "arguments"]}
            for t in plan.tools if plan.forced in ("required", t.function.name)
        ]
        grammar = schema_grammar(calls[0] if len(calls) == 1 else {"anyOf": calls}, "tools")
    elif body.response_format is None or body.response_format.type == "text":
        return None
    elif body.response_format.type == "json_object":
        from llama_cpp.llama_grammar import JSON_GBNF

        grammar = JSON_GBNF
    else:
        if body.response_format.json_schema is None:
            raise APIError(400, "`json_schema` is required with type json_schema", "response_format.json_schema")
        grammar = schema_grammar(body.response_format.json_schema.schema, "response_format.json_schema.schema")
    try:
        engine.check_grammar(model, grammar)
    except ValueError as e:
        raise APIError(400, f"the output constraint can't be compiled: {e}", "response_format") from None
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
    """The assistant's message: its text, or the tool calls found in it."""
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

