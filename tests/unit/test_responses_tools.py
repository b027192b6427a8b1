"""The Responses API's agent tools (namespace, custom, local_shell, hosted) as chat's tools and
back, and their stream of events: pure logic, no model."""

import asyncio
import json

import msgspec
import pytest

from test_responses_items import RecordedRun, in_progress  # the same stand-ins
from gguf_serve import responses, responses_tools
from gguf_serve.events import Event
from gguf_serve.errors import APIError
from gguf_serve.protocol import FunctionCall, ToolCall
from gguf_serve.responses_protocol import ResponsesRequest

SPAWN = {"type": "function", "name": "spawn_agent", "description": "Start a sub-agent",
         "parameters": {"type": "object", "properties": {"task": {"type": "string"}}, "required": ["task"]}}
NAMESPACE = {"type": "namespace", "name": "multi_agent_v1", "description": "Sub-agents", "tools": [SPAWN]}
PATCH = {"type": "custom", "name": "apply_patch", "description": "Edit files",
         "format": {"type": "grammar", "syntax": "lark", "definition": 'start: "*** Begin Patch" /.+/'}}
SHELL = {"type": "local_shell"}


def request(**fields) -> ResponsesRequest:
    return msgspec.convert({"model": "m", "input": "Hi", **fields}, ResponsesRequest)


def prepared(**fields):
    return responses.prepared(request(**fields), [], "m")


def test_namespace_custom_and_shell_tools_are_function_tools_the_model_sees():
    body, agent, plan = prepared(tools=[NAMESPACE, PATCH, SHELL, {"type": "web_search", "external_web_access": False},
                                        {"type": "web_search_preview_2025_03_11"}, {"type": "mcp", "server_label": "x"}])
    seen = {t.function.name: t.function for t in body.tools}
    assert list(seen) == ["multi_agent_v1__spawn_agent", "apply_patch", "local_shell"]
    assert seen["multi_agent_v1__spawn_agent"].parameters == SPAWN["parameters"]
    assert seen["apply_patch"].parameters["properties"] == {"input": {"type": "string"}}
    assert seen["apply_patch"].description.startswith("Edit files\n\n") and PATCH["format"]["definition"] in seen[
        "apply_patch"].description
    assert seen["local_shell"].parameters["required"] == ["command"]
    assert agent.ignored == ["web_search", "web_search_preview_2025_03_11", "mcp"]
    assert plan.free_form is None and plan.forced is None


def test_a_namespaced_function_is_forced_by_its_qualified_or_own_name():
    for name in ("spawn_agent", "multi_agent_v1__spawn_agent"):
        body, _, plan = prepared(tools=[NAMESPACE], tool_choice={"type": "function", "name": name})
        assert body.tool_choice.function.name == plan.forced == "multi_agent_v1__spawn_agent"
    other = {**NAMESPACE, "name": "other"}
    with pytest.raises(APIError, match="more than one tool"):
        prepared(tools=[NAMESPACE, other], tool_choice={"type": "function", "name": "spawn_agent"})


def test_a_forced_custom_tool_is_a_free_form_call_under_its_grammar():
    _, _, plan = prepared(tools=[PATCH], tool_choice={"type": "custom", "name": "apply_patch"})
    assert plan.forced is None and plan.free_form.name == "apply_patch"
    assert json.loads(plan.free_form.grammar) == {"grammars": [{"lark_grammar": PATCH["format"]["definition"]}]}
    regex = {**PATCH, "format": {"type": "grammar", "syntax": "regex", "definition": "[a-z]+"}}
    assert "[a-z]+" in prepared(tools=[regex], tool_choice={"type": "custom", "name": "apply_patch"})[2].free_form.grammar
    text = {**PATCH, "format": {"type": "text"}}
    assert prepared(tools=[text], tool_choice={"type": "custom", "name": "apply_patch"})[2].free_form.grammar is None
    _, _, shell = prepared(tools=[SHELL], tool_choice={"type": "local_shell"})
    assert shell.forced == "local_shell"


@pytest.mark.parametrize("fields, param", [
    ({"tools": [SHELL], "tool_choice": {"type": "web_search_preview"}}, "tool_choice"),
    ({"tools": [{"type": "web_search"}], "tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "mcp", "server_label": "x"}], "tool_choice": {"type": "mcp", "server_label": "x"}}, "tool_choice"),
    ({"tools": [PATCH], "tool_choice": {"type": "custom", "name": "nope"}}, "tool_choice"),
    ({"tools": [SHELL], "tool_choice": {"type": "allowed_tools"}}, "tool_choice"),
    ({"tools": [{"type": "namespace", "name": "a__b", "tools": [SPAWN]}]}, "tools[0].name"),
    ({"tools": [{"type": "namespace", "name": "ns", "tools": [SHELL]}]}, "tools[0].tools[0].type"),
    ({"tools": [{"type": "apply_patch"}]}, "tools[0].type"),
    ({"tools": [{**SPAWN, "name": "ns__f"}, {"type": "namespace", "name": "ns", "tools": [{**SPAWN, "name": "f"}]}]},
     "tools[1].tools[0].name"),
    ({"tools": [{"type": "custom"}]}, "tools[0].name"),
])
def test_refusals_name_the_field(fields, param):
    with pytest.raises(APIError) as e:
        prepared(**fields)
    assert e.value.status == 400 and e.value.param == param


def test_a_hosted_tool_forced_is_named_in_the_refusal():
    with pytest.raises(APIError, match="`file_search`: a hosted tool"):
        prepared(tools=[{"type": "file_search"}], tool_choice={"type": "file_search"})


def test_calls_come_back_as_their_tools_items():
    _, agent, _ = prepared(tools=[NAMESPACE, PATCH, SHELL, SPAWN])
    item = lambda name, arguments: msgspec.to_builtins(  # noqa: E731
        responses_tools.call_item(ToolCall(id="c", function=FunctionCall(name, arguments)), agent, "completed"))
    namespaced = item("multi_agent_v1__spawn_agent", '{"task": "x"}')
    assert {k: namespaced[k] for k in ("type", "name", "namespace", "arguments", "call_id")} == {
        "type": "function_call", "name": "spawn_agent", "namespace": "multi_agent_v1", "arguments": '{"task": "x"}',
        "call_id": "c"}
    assert "namespace" not in item("spawn_agent", "{}")  # a plain function's call is as before
    custom = item("apply_patch", '{"input": "*** Begin Patch\\n"}')
    assert (custom["type"], custom["name"], custom["input"], custom["id"][:4]) == (
        "custom_tool_call", "apply_patch", "*** Begin Patch\n", "ctc_")
    assert item("apply_patch", '"bare"')["input"] == '"bare"'  # not an object: the text itself
    shell = item("local_shell", '{"command": ["ls", "-la"], "workdir": "/tmp", "timeout_ms": 5000}')
    assert shell["type"] == "local_shell_call" and shell["action"] == {
        "type": "exec", "command": ["ls", "-la"], "env": {}, "timeout_ms": 5000, "working_directory": "/tmp", "user": None}
    assert item("local_shell", '{"command": "ls"}')["action"]["command"] == ["ls"]


def test_replayed_calls_are_what_the_model_would_have_written():
    body, _, _ = prepared(tools=[NAMESPACE, PATCH, SHELL], input=[
        {"role": "user", "content": "Go"},
        {"type": "function_call", "call_id": "c1", "name": "spawn_agent", "namespace": "multi_agent_v1",
         "arguments": '{"task": "t"}'},
        {"type": "function_call_output", "call_id": "c1", "output": "spawned"},
        {"type": "custom_tool_call", "call_id": "c2", "name": "apply_patch", "input": "*** Begin Patch\n"},
        {"type": "custom_tool_call_output", "call_id": "c2", "output": "Done!"},
        {"type": "local_shell_call", "call_id": "c3", "status": "completed",
         "action": {"type": "exec", "command": ["ls"], "timeout_ms": None, "working_directory": "/w", "env": None,
                    "user": None}},
        {"type": "local_shell_call_output", "id": "c3", "output": '{"output": "a.txt"}'},
    ])
    calls = [(m.tool_calls[0].id, m.tool_calls[0].function.name, json.loads(m.tool_calls[0].function.arguments))
             for m in body.messages if m.tool_calls]
    assert calls == [("c1", "multi_agent_v1__spawn_agent", {"task": "t"}),
                     ("c2", "apply_patch", {"input": "*** Begin Patch\n"}),
                     ("c3", "local_shell", {"command": ["ls"], "workdir": "/w"})]
    assert [(m.tool_call_id, m.content) for m in body.messages if m.role == "tool"] == [
        ("c1", "spawned"), ("c2", "Done!"), ("c3", '{"output": "a.txt"}')]


@pytest.mark.parametrize("item, param", [
    ({"type": "custom_tool_call", "call_id": "c", "name": "f"}, "input[0].input"),
    ({"type": "local_shell_call", "call_id": "c"}, "input[0].action"),
    ({"type": "local_shell_call_output", "output": "x"}, "input[0].call_id"),
    ({"type": "custom_tool_call_output", "call_id": "c"}, "input[0].output"),
])
def test_incomplete_call_items_are_400s_naming_the_field(item, param):
    with pytest.raises(APIError) as e:
        prepared(input=[item])
    assert e.value.param == param


def test_output_call_items_go_back_as_the_input_items_that_replay_them():
    _, agent, _ = prepared(tools=[NAMESPACE, PATCH, SHELL])
    made = [responses_tools.call_item(ToolCall(id=f"c{i}", function=FunctionCall(name, arguments)), agent, "completed")
            for i, (name, arguments) in enumerate([("multi_agent_v1__spawn_agent", "{}"), ("apply_patch", '{"input": "p"}'),
                                                   ("local_shell", '{"command": ["ls"]}')])]
    history = responses.as_input(made)
    assert [(i.type, i.name, i.namespace) for i in history] == [
        ("function_call", "spawn_agent", "multi_agent_v1"), ("custom_tool_call", "apply_patch", None),
        ("local_shell_call", None, None)]
    body = responses.prepared(request(tools=[NAMESPACE, PATCH, SHELL]), history, "m")[0]
    assert [c.function.name for c in body.messages[0].tool_calls] == ["multi_agent_v1__spawn_agent", "apply_patch",
                                                                      "local_shell"]


def streamed(engine_events, **fields) -> list[dict]:
    body = request(stream=True, store=False, **fields)
    chat_body, agent, plan = responses.prepared(body, [], "m")
    response = in_progress()

    async def sent():
        return [b async for b in responses.events(None, RecordedRun(engine_events), body, chat_body, plan, agent,
                                                  response, [])]

    return [msgspec.json.decode(block.split(b"\ndata: ")[1]) for block in asyncio.run(sent())]


def test_a_forced_custom_tools_input_streams_as_it_is_written():
    events = streamed([Event("*** Begin"), Event(" Patch"), Event("\n", finish_reason="stop")],
                      tools=[PATCH], tool_choice={"type": "custom", "name": "apply_patch"})
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.custom_tool_call_input.delta", "response.custom_tool_call_input.delta",
        "response.custom_tool_call_input.delta", "response.custom_tool_call_input.done", "response.output_item.done",
        "response.completed"]
    assert events[2]["item"]["input"] == "" and events[2]["item"]["status"] == "in_progress"
    assert "".join(e["delta"] for e in events[3:6]) == events[6]["input"] == "*** Begin Patch\n"
    [item] = events[-1]["response"]["output"]
    assert (item["type"], item["name"], item["input"], item["status"]) == (
        "custom_tool_call", "apply_patch", "*** Begin Patch\n", "completed")
    assert events[-1]["response"]["status"] == "completed"


def test_calls_found_at_the_end_stream_as_their_items():
    text = ('<tool_call>{"name": "multi_agent_v1__spawn_agent", "arguments": {"task": "t"}}</tool_call>'
            '<tool_call>{"name": "apply_patch", "arguments": {"input": "p"}}</tool_call>'
            '<tool_call>{"name": "local_shell", "arguments": {"command": ["ls"]}}</tool_call>')
    events = streamed([Event(text, finish_reason="stop")], tools=[NAMESPACE, PATCH, SHELL])
    kinds = [(e["type"], e.get("output_index")) for e in events]
    assert kinds == [("response.created", None), ("response.in_progress", None),
                     ("response.output_item.added", 0), ("response.function_call_arguments.delta", 0),
                     ("response.function_call_arguments.done", 0), ("response.output_item.done", 0),
                     ("response.output_item.added", 1), ("response.custom_tool_call_input.delta", 1),
                     ("response.custom_tool_call_input.done", 1), ("response.output_item.done", 1),
                     ("response.output_item.added", 2), ("response.output_item.done", 2),
                     ("response.completed", None)]
    assert events[2]["item"]["namespace"] == "multi_agent_v1" and events[2]["item"]["arguments"] == ""
    assert events[4]["arguments"] == '{"task": "t"}' and events[8]["input"] == "p"
    assert events[11]["item"]["action"]["command"] == ["ls"]
