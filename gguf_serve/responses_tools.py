"""The Responses API's tools as a chat template's function tools, and the model's calls back as
the items an agent runs, as vLLM, SGLang and Ollama map them:

- a `namespace` tool's functions and custom tools are flattened into tools named
  `<namespace>__<name>` (vLLM's separator: OpenAI function names allow only letters, digits,
  `_` and `-`, so no dot), and a call to one comes back with `name` and `namespace` apart;
- a `custom` tool (free-form input, Codex's `apply_patch`) is shown as a function of one string,
  `input`, and its call comes back as a `custom_tool_call` whose `input` is that string; forced,
  the whole answer is its input, constrained by the tool's grammar (tools.FreeForm);
- `local_shell` is shown as a function of a command's argument list, and its call comes back as
  a `local_shell_call` with its `exec` action;
- hosted tools (web search, file search, code interpreter, image generation, computer use,
  remote MCP, tool search) can't run here: offered, they are left out and named (the
  `x-gguf-tools-ignored` header, the log line); forced, they are a 400 naming them.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import NamedTuple

import msgspec

from .cut_calls import written
from .errors import APIError
from .grammar import free_form_grammar
from .protocol import FunctionCall, FunctionDef, FunctionName, NamedToolChoice, ToolCall, ToolDef
from .responses_protocol import (CallItem, CustomToolCallItem, CustomToolFormat, FunctionCallItem, InputItem,
                                 LocalShellAction, LocalShellCallItem, ResponsesTool, ResponsesToolChoice)
from .tools import FreeForm

SEPARATOR = "__"
LOCAL_SHELL = "local_shell"
# OpenAI's hosted tool types, dated versions included (web_search_preview_2025_03_11,
# computer_use_preview...). Only these are left out: a type nobody knows stays a 400, and a
# name listed in a response header can only be one of these (no client text reaches a header).
HOSTED = re.compile(r"(web_search(_preview)?|computer(_use(_preview)?)?)(_\d{4}_\d{2}_\d{2})?"
                    r"|file_search|code_interpreter|image_generation|mcp|tool_search", re.ASCII)

CUSTOM_INPUT = {"type": "object", "properties": {"input": {"type": "string"}}, "required": ["input"],
                "additionalProperties": False}
SHELL_COMMAND = {
    "type": "object",
    "properties": {
        "command": {"type": "array", "items": {"type": "string"},
                    "description": "the program and its arguments, e.g. [\"bash\", \"-lc\", \"ls -la\"]"},
        "workdir": {"type": "string", "description": "the directory to run it in"},
        "timeout_ms": {"type": "integer", "description": "how long it may run, in milliseconds"},
    },
    "required": ["command"],
    "additionalProperties": False,  # the action's own fields only, as Anthropic's bash tool (anthropic_messages.py)
}
SHELL_DESCRIPTION = "Runs a command on the user's machine and returns its output."


class Target(NamedTuple):
    """What a tool the model sees stands for: a function, a custom tool or the local shell, by
    its own name and namespace."""

    kind: str  # "function", "custom" or "local_shell"
    name: str
    namespace: str | None = None
    format: CustomToolFormat | None = None  # a custom tool's


class AgentTools(NamedTuple):
    """A request's tools as the model sees them, what each stands for (by the name the model
    sees), and the hosted tools left out."""

    tools: list[ToolDef] | None
    targets: dict[str, Target]
    ignored: list[str]


def qualified(namespace: str | None, name: str) -> str:
    return f"{namespace}{SEPARATOR}{name}" if namespace else name


def agent_tools(tools: list[ResponsesTool] | None) -> AgentTools:
    """The request's tools flattened into function tools; any other type is a 400 naming it."""
    defs: list[ToolDef] = []
    targets: dict[str, Target] = {}
    ignored: list[str] = []

    def add(tool: ResponsesTool, namespace: str | None, where: str) -> None:
        if tool.type == LOCAL_SHELL and namespace is None:
            name, target = LOCAL_SHELL, Target(LOCAL_SHELL, LOCAL_SHELL)
            function = FunctionDef(LOCAL_SHELL, SHELL_DESCRIPTION, SHELL_COMMAND)
        elif tool.type in ("function", "custom"):
            if not tool.name:
                raise APIError(400, f"a {tool.type} tool needs a `name`", f"{where}.name")
            name = qualified(namespace, tool.name)
            target = Target(tool.type, tool.name, namespace, tool.format)
            if tool.type == "function":
                function = FunctionDef(name, tool.description, tool.parameters, tool.strict)
            else:
                function = FunctionDef(name, custom_description(tool.description, *grammar_of(tool.format)), CUSTOM_INPUT)
        else:
            raise APIError(400, f"tool type `{tool.type}` is not supported by this server; "
                                f"{'a namespace holds function and custom tools' if namespace else supported_types()}",
                           f"{where}.type", "unsupported_tool")
        if name in targets:
            raise APIError(400, f"two tools are named `{name}`", f"{where}.name")
        targets[name] = target
        defs.append(ToolDef(function=function))

    for i, tool in enumerate(tools or ()):
        if tool.type == "namespace":
            if not tool.name or SEPARATOR in tool.name:
                raise APIError(400, f"a namespace tool needs a `name` without `{SEPARATOR}`", f"tools[{i}].name")
            for j, inner in enumerate(tool.tools or ()):
                add(inner, tool.name, f"tools[{i}].tools[{j}]")
        elif HOSTED.fullmatch(tool.type):
            if tool.type not in ignored:
                ignored.append(tool.type)
        else:
            add(tool, None, f"tools[{i}]")
    return AgentTools(defs or None, targets, ignored)


def grammar_of(fmt: CustomToolFormat | None) -> tuple[str | None, str | None]:
    """A custom tool's grammar (syntax, definition), or (None, None) for free text."""
    return (None, None) if fmt is None or fmt.type == "text" else (fmt.syntax, fmt.definition)


def supported_types() -> str:
    return ("this server runs function, namespace, custom and local_shell tools, and leaves hosted tools "
            "(web_search, file_search, code_interpreter, image_generation, computer_use, mcp, tool_search) out")


def custom_description(description: str | None, syntax: str | None, definition: str | None) -> str:
    """A custom tool's description as the model reads it: its input's grammar said, since the
    model sees a function of one string."""
    if not definition:
        return description or ""
    rule = f"Its `input` must match this {syntax or 'lark'} grammar:\n{definition}"
    return f"{description}\n\n{rule}" if description else rule


# --- tool_choice ----------------------------------------------------------------------------


def chat_tool_choice(choice: str | ResponsesToolChoice | None, agent: AgentTools) -> str | NamedToolChoice | None:
    """`tool_choice` as chat's: none, auto, required, or a named function (by the name the model
    sees: a namespaced function may be named as `<namespace>__<name>` or, if no other tool has
    it, by its own name). A forced custom tool is a FreeForm (free_form below), not chat's.
    Forcing a hosted tool, or `required` with only hosted tools, is a 400 naming them."""
    if choice is None or choice in ("none", "auto"):
        return choice
    if choice == "required":
        if agent.tools is None and agent.ignored:
            raise hosted_refused(", ".join(agent.ignored))
        return choice
    if HOSTED.fullmatch(choice.type):
        raise hosted_refused(choice.type)
    if choice.type == LOCAL_SHELL:
        return NamedToolChoice(function=FunctionName(find(agent, LOCAL_SHELL, LOCAL_SHELL)))
    if choice.type == "function" and choice.name:
        return NamedToolChoice(function=FunctionName(find(agent, "function", choice.name)))
    if choice.type == "custom" and choice.name:
        find(agent, "custom", choice.name)
        return None
    raise APIError(400, f"tool_choice type `{choice.type}` is not supported; use none, auto, required, "
                        "{\"type\": \"function\" or \"custom\", \"name\": ...} or {\"type\": \"local_shell\"}",
                   "tool_choice", "unsupported_tool_choice")


def hosted_refused(types: str) -> APIError:
    return APIError(400, f"tool_choice forces `{types}`: a hosted tool this server can't run (offered, it is left "
                         "out; it can't be required)", "tool_choice", "unsupported_tool")


def find(agent: AgentTools, kind: str, name: str) -> str:
    """The name the model sees for the tool of `kind` a tool_choice names."""
    if agent.targets.get(name, Target("", "")).kind == kind:
        return name
    found = [seen for seen, target in agent.targets.items() if target.kind == kind and target.name == name]
    if len(found) == 1:
        return found[0]
    why = "names more than one tool: qualify it as `<namespace>__<name>`" if found else "is not among the tools"
    raise APIError(400, f"tool_choice names {kind} `{name}`, which {why}", "tool_choice")


def free_form(choice: str | ResponsesToolChoice | None, agent: AgentTools) -> FreeForm | None:
    """A forced custom tool: the call the whole answer is, and its input's grammar (None: any text)."""
    if isinstance(choice, str) or choice is None or choice.type != "custom":
        return None
    name = find(agent, "custom", choice.name)
    fmt = agent.targets[name].format
    if fmt is None or fmt.type == "text":
        return FreeForm(name)
    if not fmt.definition or not fmt.syntax:
        raise APIError(400, "a grammar format needs `syntax` (lark or regex) and `definition`", "tools")
    return FreeForm(name, free_form_grammar(fmt.syntax, fmt.definition))


# --- Calls, both ways -----------------------------------------------------------------------


def call_item(call: ToolCall, agent: AgentTools, status: str) -> CallItem:
    """A call the model made (by the name it sees) as the item of its tool's kind."""
    target = agent.targets.get(call.function.name, Target("function", call.function.name))
    namespace = target.namespace or msgspec.UNSET
    if target.kind == "custom":
        return CustomToolCallItem(id=f"ctc_{uuid.uuid4().hex}", status=status, call_id=call.id, name=target.name,
                                  namespace=namespace, input=custom_input(call.function.arguments))
    if target.kind == LOCAL_SHELL:
        return LocalShellCallItem(id=f"lsc_{uuid.uuid4().hex}", status=status, call_id=call.id,
                                  action=shell_action(call.function.arguments))
    return FunctionCallItem(id=f"fc_{uuid.uuid4().hex}", status=status, call_id=call.id, name=target.name,
                            namespace=namespace, arguments=call.function.arguments)


def arguments_object(arguments: str) -> dict:
    """The object a call's arguments are (or began, cut by the token budget: cut_calls.written);
    the model's own text can be anything else too, read as no arguments."""
    value = written(arguments)
    return value if isinstance(value, dict) else {}


def custom_input(arguments: str) -> str:
    """A custom tool's input from the arguments the model wrote: their `input` string, else the
    arguments themselves (a model that wrote the input bare)."""
    value = arguments_object(arguments).get("input")
    return value if isinstance(value, str) else arguments


def shell_action(arguments: str) -> LocalShellAction:
    """A local shell call's action from the arguments the model wrote (a command written as
    one string is run as that one string)."""
    args = arguments_object(arguments)
    command = args.get("command")
    command = [command] if isinstance(command, str) else [str(c) for c in command] if isinstance(command, list) else []
    timeout = args.get("timeout_ms")
    workdir = args.get("workdir")
    return LocalShellAction(command=command, env={}, timeout_ms=timeout if isinstance(timeout, int) else None,
                            working_directory=workdir if isinstance(workdir, str) else None)


def chat_call(item: InputItem) -> ToolCall:
    """A call item of `input` (or of a stored response) as the tool call the model would have
    written: a namespaced name qualified, a custom tool's input as `{"input": ...}`, a local
    shell action as the arguments local_shell takes."""
    if item.type == "custom_tool_call":
        arguments = json.dumps({"input": item.input}, ensure_ascii=False)
    elif item.type == "local_shell_call":
        action = item.action
        arguments = json.dumps({"command": action.command,
                                **({"workdir": action.working_directory} if action.working_directory else {}),
                                **({"timeout_ms": action.timeout_ms} if action.timeout_ms is not None else {})},
                               ensure_ascii=False)
        return ToolCall(id=item.call_id, function=FunctionCall(LOCAL_SHELL, arguments))
    else:
        arguments = item.arguments
    return ToolCall(id=item.call_id, function=FunctionCall(qualified(item.namespace, item.name), arguments))


def input_item(item: CallItem) -> InputItem:
    """An output call item as the input item that gives it back to the model."""
    namespace = item.namespace or None if not isinstance(item, LocalShellCallItem) else None
    if isinstance(item, CustomToolCallItem):
        return InputItem(type="custom_tool_call", call_id=item.call_id, name=item.name, namespace=namespace,
                         input=item.input)
    if isinstance(item, LocalShellCallItem):
        return InputItem(type="local_shell_call", call_id=item.call_id, action=item.action)
    return InputItem(type="function_call", call_id=item.call_id, name=item.name, namespace=namespace,
                     arguments=item.arguments)
