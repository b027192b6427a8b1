"""A forced call cut by the token budget, answered as that call; JSON cut short read as the value
it began; Chat Completions' custom tools as function tools and back: pure logic, no model."""

import json

import msgspec
import pytest
from hypothesis import given, strategies as st

from gguf_serve import chat_steps, chat_tools, cut_calls
from gguf_serve.chat_steps import CallEnded, ChatSteps
from gguf_serve.events import Event
from gguf_serve.errors import APIError
from gguf_serve.protocol import ChatRequest, FunctionCall, FunctionDef, ToolCall, ToolDef
from gguf_serve.runs import Choice
from gguf_serve.tools import ToolPlan

SHELL = ToolDef(function=FunctionDef("local_shell", None, {"type": "object"}))
CUT = '{"name": "local_shell", "arguments": {"command": ["bash", "-lc", "ls -l'


@pytest.mark.parametrize("text, value", [
    ('{"a": 1, "b": [true, null]}', {"a": 1, "b": [True, None]}),  # whole
    ('{"a": 1, "b', {"a": 1}),  # a key cut: left out
    ('{"a": 1, "b": ', {"a": 1}),
    ('{"a": tru', {}),  # a literal cut: left out
    ('{"a": "x\\', {"a": "x"}),  # a string cut in an escape: kept, less the half escape
    ('{"a": "x\\u00e', {"a": "x"}),
    ('{"command": ["bash", "-l', {"command": ["bash", "-l"]}),
    ('[{"a": {"b": [', [{"a": {"b": []}}]),
    ("", None), ("{oops", None), ("hello", None), ("nul", None),  # no JSON's start
])
def test_written_is_the_value_a_cut_text_began(text, value):
    assert cut_calls.written(text) == value


SCALARS = st.one_of(st.text(max_size=8), st.integers(), st.booleans(), st.none(), st.lists(st.text(max_size=4), max_size=3))


@given(st.dictionaries(st.text(max_size=6), SCALARS, max_size=4), st.data())
def test_written_keeps_every_value_finished_before_the_cut(value, data):
    text = json.dumps(value)
    assert cut_calls.written(text) == value
    cut = data.draw(st.integers(1, len(text)))
    got = cut_calls.written(text[:cut])
    assert isinstance(got, dict) and set(got) <= set(value)
    for key, item in value.items():
        whole = f"{json.dumps(key)}: {json.dumps(item)}"
        if text.find(whole) + len(whole) <= cut and text.find(whole) >= 0:
            assert got[key] == item  # written before the cut: kept as it was
        elif key in got and isinstance(item, str):
            assert item.startswith(got[key])  # a string cut: what was written of it


def said(text: str, reason: str, plan: ToolPlan) -> chat_steps.Answer:
    return chat_steps.answer(plan, Choice(text=text, finish_reason=reason))


def test_a_forced_call_cut_by_the_budget_is_that_call():
    plan = ToolPlan([SHELL], "local_shell")
    answer = said(CUT, "length", plan)
    [call] = answer.calls
    assert (answer.finished.reason, answer.content, call.function.name) == ("length", None, "local_shell")
    assert call.function.arguments == '{"command": ["bash", "-lc", "ls -l'  # as far as written, as OpenAI's
    # cut before its name was written: the forced name, no arguments yet
    answer = said('{"name": "loc', "length", plan)
    assert [(c.function.name, c.function.arguments) for c in answer.calls] == [("local_shell", "")]
    # `required` cut before any name: no call to answer, its text stays
    answer = said('{"na', "length", ToolPlan([SHELL], "required"))
    assert answer.content == '{"na' and not answer.calls and answer.finished.reason == "length"
    # not forced: the text, which parses as no call
    assert said(CUT, "length", ToolPlan([SHELL])).content == CUT
    # the legacy functions API: one call, its finish reason its own when whole
    answer = said(CUT + '"]}}', "stop", ToolPlan([SHELL], "local_shell", legacy=True))
    assert answer.finished.reason == "function_call" and json.loads(answer.calls[0].function.arguments)["command"][2] == "ls -l"


def test_a_cut_forced_call_streams_as_that_call():
    steps = ChatSteps(ToolPlan([SHELL], "local_shell"))
    assert steps.feed(Event(CUT[:20])) == []  # the name not whole yet
    started, arguments, ended, finished = steps.feed(Event(CUT[20:], "length"))
    assert (started.name, arguments.text, ended, finished.reason) == ("local_shell", CUT[37:], CallEnded(), "length")


GRAMMAR = {"type": "grammar", "grammar": {"syntax": "regex", "definition": "[A-Z]{3}-[0-9]{2}"}}
TICKET = {"type": "custom", "custom": {"name": "ticket", "description": "Open a ticket", "format": GRAMMAR}}
WEATHER = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}


def chat(**fields) -> ChatRequest:
    return msgspec.convert({"model": "m", "messages": [{"role": "user", "content": "Hi"}], **fields}, ChatRequest)


def test_chat_custom_tools_are_function_tools_of_one_string():
    body, customs, free_form = chat_tools.function_view(chat(tools=[WEATHER, TICKET, {"type": "custom", "custom": {
        "name": "note"}}]))
    seen = {t.function.name: t.function for t in body.tools}
    assert list(seen) == ["weather", "ticket", "note"] and all(t.type == "function" for t in body.tools)
    assert seen["ticket"].parameters == {"type": "object", "properties": {"input": {"type": "string"}},
                                         "required": ["input"], "additionalProperties": False}
    assert seen["ticket"].description.startswith("Open a ticket\n\n") and "[A-Z]{3}-[0-9]{2}" in seen["ticket"].description
    assert set(customs) == {"ticket", "note"} and customs["note"] is None and free_form is None


def test_a_forced_chat_custom_tool_is_a_free_form_call_under_its_grammar():
    body, _, free_form = chat_tools.function_view(chat(tools=[TICKET], tool_choice={"type": "custom",
                                                                                    "custom": {"name": "ticket"}}))
    assert body.tool_choice is None and free_form.name == "ticket" and "[A-Z]{3}-[0-9]{2}" in free_form.grammar
    body, _, free_form = chat_tools.function_view(chat(tools=[{"type": "custom", "custom": {"name": "note"}}],
                                                       tool_choice={"type": "custom", "custom": {"name": "note"}}))
    assert free_form.grammar is None  # free text


def test_chat_custom_calls_go_back_and_come_back_as_custom_calls():
    sent = chat(tools=[TICKET], messages=[
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "tool_calls": [{"id": "c1", "type": "custom", "custom": {"name": "ticket", "input": "ABC-12"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "opened"}])
    body, customs, _ = chat_tools.function_view(sent)
    [call] = body.messages[1].tool_calls
    assert (call.type, call.function.name, json.loads(call.function.arguments)) == ("function", "ticket", {"input": "ABC-12"})
    answer = chat_tools.custom_calls(msgspec.convert({"content": None, "tool_calls": [
        {"id": "c2", "function": {"name": "ticket", "arguments": '{"input": "XYZ-99"}'}},
        {"id": "c3", "function": {"name": "weather", "arguments": "{}"}}]}, chat_tools.AssistantMessage), customs)
    custom, function = msgspec.to_builtins(answer.tool_calls)
    assert custom == {"id": "c2", "type": "custom", "custom": {"name": "ticket", "input": "XYZ-99"}}
    assert function == {"id": "c3", "type": "function", "function": {"name": "weather", "arguments": "{}"}}


@pytest.mark.parametrize("fields, param", [
    ({"tools": [{"type": "custom"}]}, "tools[0].custom"),
    ({"tools": [{"type": "function"}]}, "tools[0].function"),
    ({"tools": [{"type": "custom", "custom": {"name": "x", "format": {"type": "grammar"}}}]}, "tools[0].custom.format.grammar"),
    ({"tools": [WEATHER, {"type": "custom", "custom": {"name": "weather"}}]}, "tools[1].custom.name"),
    ({"tools": [TICKET], "tool_choice": {"type": "custom", "custom": {"name": "weather"}}}, "tool_choice"),
    ({"tools": [TICKET], "tool_choice": {"type": "custom"}}, "tool_choice.custom"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "custom"}]}]}, "messages[0].tool_calls[0].custom"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c"}]}]}, "messages[0].tool_calls[0].function"),
])
def test_chat_tool_refusals_name_the_field(fields, param):
    with pytest.raises(APIError) as e:
        chat_tools.function_view(chat(**fields))
    assert (e.value.status, e.value.param) == (400, param)


def test_a_function_call_passes_unchanged():
    call = ToolCall(id="c", function=FunctionCall("weather", "{}"))
    body, _, _ = chat_tools.function_view(chat(tools=[WEATHER], messages=[{"role": "assistant", "tool_calls": [
        msgspec.to_builtins(call)]}]))
    assert body.messages[0].tool_calls == [call]
