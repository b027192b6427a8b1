"""Tool plans, output grammars and tool-call parsing: pure logic, no model weights (the vocabulary alone
where a grammar masks tokens)."""

import msgspec
import numpy as np
import pytest

from conftest import smollm2_path
from gguf_serve import grammar, tools
from gguf_serve.model import Model
from gguf_serve.errors import APIError
from gguf_serve.protocol import ChatRequest

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


def request(**fields) -> ChatRequest:
    return msgspec.convert({"model": "m", "messages": [{"role": "user", "content": "Hi"}], **fields}, ChatRequest)


@pytest.mark.parametrize("fields,forced,told", [
    ({}, None, False),
    ({"tools": [WEATHER]}, None, True),
    ({"tools": [WEATHER], "tool_choice": "none"}, None, False),
    ({"tools": [WEATHER, TIME], "tool_choice": "required"}, "required", True),
    ({"tools": [WEATHER, TIME], "tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "get_time", True),
])
def test_tool_plan(fields, forced, told):
    plan = tools.tool_plan(request(**fields))
    assert plan.forced == forced and bool(plan.tools) == told and not plan.legacy


def test_legacy_functions_plan():
    plan = tools.tool_plan(request(functions=[WEATHER["function"]], function_call={"name": "get_weather"}))
    assert plan.legacy and plan.forced == "get_weather" and plan.tools[0].function.name == "get_weather"


def test_forcing_an_unknown_tool_is_400():
    with pytest.raises(APIError) as e:
        tools.tool_plan(request(tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "rm"}}))
    assert e.value.status == 400 and e.value.param == "tool_choice"


def test_schema_features_the_grammar_cant_enforce_are_named():
    with pytest.raises(APIError) as e:
        tools.schema_grammar({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "p")
    assert "uniqueItems" in e.value.message and e.value.param == "p" and e.value.code == "unsupported_schema"


def test_a_remote_ref_is_refused_by_the_server_itself():
    """llguidance would not fetch it either, but nothing but a `#` reference reaches it (issue #34:
    llama-cpp-python's converter refused one only by an `assert`, gone under PYTHONOPTIMIZE)."""
    for ref in ("https://example.com/schema.json", "file:///etc/passwd", "other.json#/a"):
        with pytest.raises(APIError) as e:
            tools.schema_grammar({"type": "object", "properties": {"a": {"$ref": ref}}}, "p")
        assert "$ref" in e.value.message and e.value.code == "unsupported_schema"
    tools.schema_grammar({"$defs": {"a": {"type": "string"}}, "type": "object", "properties": {"a": {"$ref": "#/$defs/a"}}}, "p")


def test_a_schema_string_takes_no_raw_control_characters():
    model = Model(smollm2_path(), vocab_only=True)
    matcher = grammar.Matcher(model, tools.schema_grammar(
        {"type": "object", "properties": {"s": {"type": "string"}}, "required": ["s"]}, "p"))
    for token in model.tokenize('{"s": "a'):
        assert not matcher.accept(token)
    logits = np.zeros(model.n_vocab, dtype=np.float32)
    matcher.mask(logits)
    newline, letter = model.tokenize("\n")[0], model.tokenize("b")[0]
    assert logits[newline] == -np.inf and logits[letter] == 0


TOOL_CALLS = [
    # model output, forced (grammar) or not, expected (content, calls)
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', False,
     (None, [("get_weather", '{"city": "Paris"}')])),
    ('Let me check.\n<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>\n'
     '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>', False,
     ("Let me check.", [("get_weather", '{"city": "Rome"}'), ("get_time", "{}")])),
    ('{"name": "get_weather", "parameters": {"city": "Oslo"}}', False, (None, [("get_weather", '{"city": "Oslo"}')])),
    ('<|python_tag|>{"name": "get_time", "parameters": {}}', False, (None, [("get_time", "{}")])),
    ('<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>', False,
     ('<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>', [])),
    ("The weather is fine.", False, ("The weather is fine.", [])),
    ('{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}', True,
     (None, [("get_weather", '{"city": "Paris", "unit": "C"}')])),
    ("<tool_call>not json</tool_call>", False, ("<tool_call>not json</tool_call>", [])),
]


@pytest.mark.parametrize("text,forced,expected", TOOL_CALLS)
def test_parse_tool_calls(text, forced, expected):
    assert tools.parse_tool_calls(text, ["get_weather", "get_time"], whole_json=forced) == expected




def test_answer_turns_a_call_into_tool_calls_or_legacy_function_call():
    plan = tools.tool_plan(request(tools=[WEATHER]))
    message, reason = tools.answer('<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>', "stop", plan)
    assert reason == "tool_calls" and message.content is None
    assert message.tool_calls[0].function.arguments == '{"city": "Oslo"}' and message.tool_calls[0].id.startswith("call_")
    legacy = tools.tool_plan(request(functions=[WEATHER["function"]]))
    message, reason = tools.answer('{"name": "get_weather", "parameters": {"city": "Oslo"}}', "stop", legacy)
    assert reason == "function_call" and message.function_call.name == "get_weather"
    assert tools.answer("plain text", "length", plan)[1] == "length"


from gguf_serve.tools import CallSpotter  # noqa: E402


def spot(chunks: list[str], forced: bool = False) -> tuple[list[str], str]:
    spotter = CallSpotter(forced)
    streamed = [spotter.feed(c) for c in chunks]
    streamed[-1] += spotter.flush()
    return streamed, spotter.held


@pytest.mark.parametrize("chunks,streamed,held", [
    (["Hel", "lo ", "there"], ["Hel", "lo ", "there"], ""),  # decided at the first letter that opens no call
    ([" ", "\n", "Hi"], ["", "", " \nHi"], ""),
    (["<tool", "_call>", '{"name": "f"}', "</tool_call>"], ["", "", "", ""], '<tool_call>{"name": "f"}</tool_call>'),
    (["<t", "able>"], ["", "<table>"], ""),
    (['{"name"', ': "f"}'], ["", ""], '{"name": "f"}'),
    (["<|python", "_tag|>{}"], ["", ""], "<|python_tag|>{}"),
    (["Let me check.\n<tool", "_call>{}</tool_call>"], ["Let me check.\n", ""], "<tool_call>{}</tool_call>"),
    (["a <tool", "box"], ["a ", "<toolbox"], ""),
    (["a <tool"], ["a <tool"], ""),
])
def test_call_spotter_streams_text_until_a_call_may_begin(chunks, streamed, held):
    assert spot(chunks) == (streamed, held)


def test_call_spotter_holds_everything_of_a_forced_call():
    assert spot(["x", "y"], forced=True) == (["", ""], "xy")


def test_objects_that_list_their_properties_allow_no_others_unless_they_say_so():
    schema = {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "string"}}},
                                               "c": {"type": "object", "properties": {}, "additionalProperties": True},
                                               "d": {"type": "object"}, "properties": {"const": {"properties": 1}}}}
    out = tools.closed(schema)
    assert out["additionalProperties"] is False and out["properties"]["a"]["additionalProperties"] is False
    assert out["properties"]["c"]["additionalProperties"] is True and "additionalProperties" not in out["properties"]["d"]
    assert out["properties"]["properties"] == {"const": {"properties": 1}}  # a property named so, and a const, untouched
    assert schema["properties"]["a"] == {"type": "object", "properties": {"b": {"type": "string"}}}  # not changed in place
