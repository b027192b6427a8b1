"""Responses requests -> chat requests, output items -> input items, and the bounded store:
pure logic, no model."""

import asyncio

import msgspec
import pytest

from gguf_serve import responses
from gguf_serve.events import Event
from gguf_serve.errors import APIError
from gguf_serve.protocol import CompletionTokensDetails, PromptTokensDetails, Usage
from gguf_serve.responses_protocol import (FunctionCallItem, OutputMessage, OutputText, ReasoningItem, ReasoningText,
                                           ResponseObject, ResponsesRequest)

WEATHER = {"type": "function", "name": "get_weather", "parameters": {"type": "object"}}


def request(**fields) -> ResponsesRequest:
    return msgspec.convert({"model": "m", "input": "Hi", **fields}, ResponsesRequest)


def chat(history=(), **fields):
    return responses.prepared(request(**fields), list(history), "m")[0]


def test_string_input_is_one_user_message_after_the_instructions():
    body = chat(instructions="Be brief.", max_output_tokens=7, temperature=0.5, top_p=0.9, top_k=3)
    assert [(m.role, m.content) for m in body.messages] == [("system", "Be brief."), ("user", "Hi")]
    assert (body.max_tokens, body.temperature, body.top_p, body.top_k, body.n) == (7, 0.5, 0.9, 3, 1)


def test_items_become_messages_and_a_turns_calls_one_assistant_message():
    body = chat(input=[
        {"role": "developer", "content": [{"type": "input_text", "text": "Sys "}, {"type": "input_text", "text": "two"}]},
        {"type": "message", "role": "user", "content": "Weather?"},
        {"role": "assistant", "content": [{"type": "output_text", "text": "Checking.", "annotations": []}]},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call", "call_id": "c2", "name": "get_weather", "arguments": '{"city": "Rome"}'},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "rain"}]},
    ])
    roles = [m.role for m in body.messages]
    assert roles == ["developer", "user", "assistant", "tool", "tool"]
    assert body.messages[0].content == "Sys two"
    assistant = body.messages[2]
    assert assistant.content == "Checking." and [c.id for c in assistant.tool_calls] == ["c1", "c2"]
    assert [(m.tool_call_id, m.content) for m in body.messages[3:]] == [("c1", "sunny"), ("c2", "rain")]


def test_a_call_with_no_text_before_it_is_its_own_assistant_message():
    body = chat(input=[{"role": "user", "content": "Hi"},
                       {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}])
    assert body.messages[-1].role == "assistant" and body.messages[-1].content is None


def test_a_reasoning_item_is_the_reasoning_content_of_the_assistant_turn_after_it():
    # as the Agents SDK sends a thinking model's output back: reasoning, message, call
    body = chat(input=[
        {"role": "user", "content": "Weather?"},
        {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "Use the tool."}]},
        {"role": "assistant", "content": "Checking."},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
        {"type": "reasoning", "id": "rs_2", "summary": [{"type": "summary_text", "text": "Sunny: say so."}]},
        {"type": "function_call", "call_id": "c2", "name": "get_weather", "arguments": "{}"},
        {"type": "reasoning", "id": "rs_3", "summary": [], "encrypted_content": "opaque"},  # nothing to give
        {"role": "user", "content": "Thanks"},
    ])
    assert [m.role for m in body.messages] == ["user", "assistant", "tool", "assistant", "user"]
    first, second = body.messages[1], body.messages[3]
    assert (first.reasoning_content, first.content, [c.id for c in first.tool_calls]) == ("Use the tool.", "Checking.", ["c1"])
    assert (second.reasoning_content, second.tool_calls[0].id) == ("Sunny: say so.", "c2")
    assert body.messages[4].reasoning_content is None


def test_reasoning_effort_is_chats():
    assert chat(reasoning={"effort": "none", "summary": "auto"}).reasoning_effort == "none"
    assert chat().reasoning_effort is None
    with pytest.raises(msgspec.ValidationError, match="reasoning.effort"):
        request(reasoning={"effort": "extreme"})


def test_a_reasoning_output_item_goes_back_as_a_reasoning_input_item():
    history = responses.as_input([
        ReasoningItem(id="rs_1", status="completed", content=[ReasoningText(text="Hmm.")]),
        OutputMessage(id="msg_1", status="completed", content=[OutputText(text="Hello!")]),
    ])
    body = chat([msgspec.convert({"role": "user", "content": "Hey"}, responses.InputItem), *history])
    assert [(m.role, m.reasoning_content, m.content) for m in body.messages] == [
        ("user", None, "Hey"), ("assistant", "Hmm.", "Hello!"), ("user", None, "Hi")]


def test_history_comes_between_instructions_and_input():
    history = responses.as_input([
        OutputMessage(id="msg_1", status="completed", content=[OutputText(text="Hello!")]),
        FunctionCallItem(id="fc_1", status="completed", call_id="c", name="f", arguments="{}"),
    ])
    body = chat([msgspec.convert({"role": "user", "content": "Hey"}, responses.InputItem), *history], instructions="S")
    assert [m.role for m in body.messages] == ["system", "user", "assistant", "user"]
    assert body.messages[2].content == "Hello!" and body.messages[2].tool_calls[0].id == "c"


@pytest.mark.parametrize("fields,param", [
    ({"input": [{"type": "file_search_call"}]}, "input[0].type"),
    ({"input": [{"type": "function_call_output", "call_id": "c"}]}, "input[0].output"),
    ({"input": [{"content": "no role"}]}, "input[0].role"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "input[0].content[0]"),
    ({"input": []}, "input"),
    ({"tools": [{"type": "apply_patch"}]}, "tools[0].type"),
    ({"tools": [{"type": "function"}]}, "tools[0].name"),
    ({"tool_choice": {"type": "web_search_preview"}}, "tool_choice"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
    ({"conversation": "conv_1"}, "conversation"),
    ({"background": True}, "background"),
])
def test_refusals_name_the_field(fields, param):
    with pytest.raises(APIError) as e:
        chat(**fields)
    assert e.value.status == 400 and e.value.param == param


def test_tools_tool_choice_and_text_format_in_chat_shapes():
    body = chat(tools=[WEATHER], tool_choice={"type": "function", "name": "get_weather"},
                text={"format": {"type": "json_schema", "name": "n", "schema": {"type": "object"}, "strict": True}})
    assert body.tools[0].function.name == "get_weather" and body.tool_choice.function.name == "get_weather"
    assert body.response_format.type == "json_schema" and body.response_format.json_schema.name == "n"
    assert chat(text={"format": {"type": "json_object"}}).response_format.type == "json_object"
    assert chat(text={"format": {"type": "text"}}).response_format is None
    assert chat(tools=[WEATHER], tool_choice="required").tool_choice == "required"


def test_chat_params_are_renamed():
    assert responses.as_responses_error(APIError(400, "x", "messages[3].content")).param == "input"
    assert responses.as_responses_error(APIError(400, "x", "response_format.json_schema.schema")).param == "text.format.schema"
    assert responses.as_responses_error(APIError(400, "x", "tools")).param == "tools"


class RecordedRun:
    """A run's events as the engine sent them for a thinking model that finished its thought."""

    def __init__(self, events):
        self.events = events

    async def __aiter__(self):
        for event in self.events:
            yield 0, event

    def usage(self):
        return Usage(prompt_tokens=5, completion_tokens=4, total_tokens=9, prompt_tokens_details=PromptTokensDetails(0),
                     completion_tokens_details=CompletionTokensDetails(2))


def in_progress(parallel_tool_calls: bool = True) -> ResponseObject:
    """The response a stream starts from (responses.new_response's, without a request)."""
    return msgspec.convert({"id": "resp_1", "created_at": 0, "status": "in_progress", "model": "m", "output": [],
                            "instructions": None, "max_output_tokens": None, "temperature": 1, "top_p": 1,
                            "tools": [], "tool_choice": "auto", "parallel_tool_calls": parallel_tool_calls,
                            "text": {}, "previous_response_id": None, "store": False, "metadata": {}, "user": None},
                           ResponseObject)


def test_a_thought_then_an_answer_stream_as_two_items():
    body = request(stream=True, store=False)
    chat_body, agent, plan = responses.prepared(body, [], "m")
    run = RecordedRun([Event("", reasoning="Two and"), Event("", reasoning=" two."), Event("Four"),
                       Event(".", finish_reason="stop")])
    response = in_progress()

    async def sent():
        return [b async for b in responses.events(None, run, body, chat_body, plan, agent, response, [])]

    events = [msgspec.json.decode(block.split(b"\ndata: ")[1]) for block in asyncio.run(sent())]
    assert [(e["type"], e.get("output_index")) for e in events] == [
        ("response.created", None), ("response.in_progress", None),
        ("response.output_item.added", 0), ("response.content_part.added", 0),
        ("response.reasoning_text.delta", 0), ("response.reasoning_text.delta", 0),
        ("response.reasoning_text.done", 0), ("response.content_part.done", 0), ("response.output_item.done", 0),
        ("response.output_item.added", 1), ("response.content_part.added", 1),
        ("response.output_text.delta", 1), ("response.output_text.delta", 1),
        ("response.output_text.done", 1), ("response.content_part.done", 1), ("response.output_item.done", 1),
        ("response.completed", None)]
    assert events[6]["text"] == "Two and two." and events[8]["item"]["status"] == "completed"
    final = events[-1]["response"]
    assert [item["type"] for item in final["output"]] == ["reasoning", "message"]
    assert final["output"][0]["content"] == [{"type": "reasoning_text", "text": "Two and two."}]
    assert final["output"][1]["content"][0]["text"] == "Four."
    assert final["usage"]["output_tokens_details"] == {"reasoning_tokens": 2}
