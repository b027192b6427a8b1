"""Chat Completions' custom tools (`{"type": "custom", "custom": {"name", "description",
"format"}}`: free-form input, a grammar's when the format has one) served as the Responses API's
are (responses_tools.py): shown to the model as a function of one string, `input`; a call to one
comes back as `{"type": "custom", "custom": {"name", "input"}}`; forced (`tool_choice`
`{"type": "custom", "custom": {"name"}}`), the whole answer is its input, under its grammar
(tools.FreeForm). A custom call a client sends back is the function call the model would have
written. Everything past `function_view` sees function tools and function calls only.
"""

from __future__ import annotations

import json

import msgspec

from .errors import APIError
from .grammar import free_form_grammar
from .protocol import (AssistantMessage, ChatMessage, ChatRequest, CustomCall, CustomGrammar, FunctionCall, FunctionDef,
                       TemplateRequest, ToolCall, ToolDef)
from .responses_tools import CUSTOM_INPUT, custom_description, custom_input
from .tools import FreeForm

Customs = dict[str, CustomGrammar | None]  # a request's custom tools: name -> its input's grammar (None: free text)


def function_tools(tools: list[ToolDef] | None) -> tuple[list[ToolDef] | None, Customs]:
    """The request's tools as function tools, and its custom tools by name."""
    if not tools:
        return tools, {}
    defs, customs = [], {}
    for i, tool in enumerate(tools):
        if tool.type == "function":
            if tool.function is msgspec.UNSET:
                raise APIError(400, "a function tool needs `function`", f"tools[{i}].function")
            defs.append(tool)
            continue
        custom = tool.custom
        if custom is msgspec.UNSET:
            raise APIError(400, "a custom tool needs `custom`", f"tools[{i}].custom")
        grammar = custom.format.grammar if custom.format and custom.format.type == "grammar" else None
        if custom.format and custom.format.type == "grammar" and grammar is None:
            raise APIError(400, "a grammar format needs `grammar` (its `syntax` and `definition`)",
                           f"tools[{i}].custom.format.grammar")
        if custom.name in customs or any(d.function.name == custom.name for d in defs):
            raise APIError(400, f"two tools are named `{custom.name}`", f"tools[{i}].custom.name")
        customs[custom.name] = grammar
        description = custom_description(custom.description, *((grammar.syntax, grammar.definition) if grammar
                                                                 else (None, None)))
        defs.append(ToolDef(function=FunctionDef(custom.name, description, CUSTOM_INPUT)))
    return defs, customs


def function_messages(messages: list[ChatMessage]) -> list[ChatMessage]:
    """The messages with each custom tool call the client sends back as the function call the
    model would have written (`{"input": ...}`); a call without its own field is a 400."""
    out = []
    for i, message in enumerate(messages):
        calls = []
        for j, call in enumerate(message.tool_calls or ()):
            where = f"messages[{i}].tool_calls[{j}]"
            if call.type == "function":
                if call.function is msgspec.UNSET:
                    raise APIError(400, "a function call needs `function`", f"{where}.function")
                calls.append(call)
            elif call.custom is msgspec.UNSET:
                raise APIError(400, "a custom tool call needs `custom`", f"{where}.custom")
            else:
                arguments = json.dumps({"input": call.custom.input}, ensure_ascii=False)
                calls.append(ToolCall(id=call.id, function=FunctionCall(call.custom.name, arguments)))
        out.append(msgspec.structs.replace(message, tool_calls=calls) if message.tool_calls else message)
    return out


def function_view(body: ChatRequest) -> tuple[ChatRequest, Customs, FreeForm | None]:
    """The request as function tools and calls only, its custom tools, and a forced custom
    tool's call (the tool_choice that forced it left out: the whole answer is that call)."""
    tools, customs = function_tools(body.tools)
    choice, free_form = body.tool_choice, None
    if not isinstance(choice, str) and choice is not None:
        field = choice.custom if choice.type == "custom" else choice.function
        if field is msgspec.UNSET:
            raise APIError(400, f"a {choice.type} tool_choice needs `{choice.type}`", f"tool_choice.{choice.type}")
        if choice.type == "custom":
            if field.name not in customs:
                raise APIError(400, f"tool_choice names custom tool `{field.name}`, which is not among the tools",
                               "tool_choice")
            grammar = customs[field.name]
            choice = None
            free_form = FreeForm(field.name, grammar and free_form_grammar(grammar.syntax, grammar.definition))
    body = msgspec.structs.replace(body, tools=tools, tool_choice=choice, messages=function_messages(body.messages))
    return body, customs, free_form


def template_view(body: TemplateRequest) -> TemplateRequest:
    """/apply-template's request as function tools and calls only, as chat's prompt renders them."""
    return msgspec.structs.replace(body, tools=function_tools(body.tools)[0], messages=function_messages(body.messages))


def custom_calls(message: AssistantMessage, customs: Customs) -> AssistantMessage:
    """The answer with each call to a custom tool as a custom tool call (its `input` string)."""
    if not customs or not message.tool_calls:
        return message
    calls = [ToolCall(id=c.id, type="custom", custom=CustomCall(c.function.name, custom_input(c.function.arguments)))
             if c.function.name in customs else c for c in message.tool_calls]
    return msgspec.structs.replace(message, tool_calls=calls)
