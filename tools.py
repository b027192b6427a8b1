"""Tools and structured output: which tool call a request forces, the grammar an answer must
follow (a forced call, JSON mode, a JSON Schema), and the tool calls found in a model's text.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import NamedTuple

import msgspec

import engine
from model import Model
from protocol import (APIError, AssistantMessage, ChatRequest, FunctionCall, FunctionName, NamedToolChoice, ToolCall,
                      ToolDef)

# Structured output: JSON Schema -> a llama.cpp grammar, with llama-cpp-python's converter.
SCHEMA_KEYWORDS = {
    "type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems", "maxItems",
    "enum", "const", "anyOf", "oneOf", "allOf", "$ref", "$defs", "definitions", "pattern", "minLength",
    "maxLength", "format", "title", "description", "default", "examples", "$schema", "$id", "$comment",
}
SCHEMA_FORMATS = {"date", "time", "date-time", "uuid"}


def schema_grammar(schema: dict, param: str) -> str:
    """The GBNF for a JSON Schema, or a 400 naming the features the converter can't enforce."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    unsupported = sorted(schema_features(schema) - SCHEMA_KEYWORDS)
    if unsupported:
        raise APIError(400, f"JSON Schema features not supported: {', '.join(unsupported)}", param, "unsupported_schema")
    try:
        grammar = json_schema_to_gbnf(msgspec.json.encode(schema).decode())
    except Exception as e:  # the converter raises assorted errors on schemas it can't handle
        raise APIError(400, f"JSON Schema not supported: {e}", param, "unsupported_schema") from None
    # The converter's string characters admit raw control characters (newlines...), which JSON
    # forbids inside strings; llama.cpp's own converter has since excluded them.
    return grammar.replace(r'char ::= [^"\\] |', r'char ::= [^"\\\x7F\x00-\x1F] |')


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
        except ValueError:
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
