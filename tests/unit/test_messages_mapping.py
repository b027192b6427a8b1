"""Anthropic Messages requests -> chat requests, chat's answers -> Anthropic's stop reasons,
blocks and errors, and the API key's two headers: pure logic, no model."""

import json

import msgspec
import pytest

from gguf_serve import anthropic_messages
from gguf_serve.access import api_key, authorized
from gguf_serve.chat_steps import Finished
from gguf_serve.routes import error_body
from gguf_serve.anthropic_protocol import CountTokensRequest, MessagesRequest, TextBlock, ThinkingBlock, ToolUseBlock
from gguf_serve.engine import StopScanner
from gguf_serve.errors import APIError
from gguf_serve.protocol import FunctionCall, NamedToolChoice, ToolCall
from gguf_serve.tools import ForcedCallReader

HI = {"role": "user", "content": "Hi"}
WEATHER = {"name": "get_weather", "description": "The weather", "input_schema": {"type": "object"}}


def request(**fields) -> MessagesRequest:
    return msgspec.convert({"model": "m", "max_tokens": 16, "messages": [{"role": "user", "content": "Hi"}], **fields},
                           MessagesRequest)


def chat(**fields):
    return anthropic_messages.chat_request(request(**fields), "m")[0]


def test_system_blocks_and_settings():
    body = chat(system=[{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind.", "cache_control": {}}],
                temperature=0.5, top_p=0.9, top_k=3, stop_sequences=["END"], metadata={"user_id": "u"})
    assert [(m.role, m.content) for m in body.messages] == [("system", "Be brief.\n\nBe kind."), ("user", "Hi")]
    assert (body.max_tokens, body.temperature, body.top_p, body.top_k, body.stop) == (16, 0.5, 0.9, 3, ["END"])


@pytest.mark.parametrize("billing", [
    "x-anthropic-billing-header: cc_version=2.1.197.c40; cc_entrypoint=sdk-cli;",
    "x-anthropic-billing-header: cc_version=2.1.332.0d9; cc_entrypoint=cli; cch=fa690;",
])
def test_claude_codes_billing_block_is_left_out_of_the_system_prompt(billing):
    """It changes between requests and came first: left in, no two requests shared a prefix."""
    prompt = [{"type": "text", "text": "You are Claude Code."}, {"type": "text", "text": "Be brief."}]
    as_blocks = chat(system=[{"type": "text", "text": billing}, *prompt])
    as_string = chat(system=f"{billing}\nYou are Claude Code.\n\nBe brief.")
    assert as_blocks.messages == as_string.messages == chat(system=prompt).messages
    assert [m.role for m in chat(system=[{"type": "text", "text": billing}]).messages] == ["user"]
    # only where Claude Code puts it: the start of a block
    quoted = chat(system=f"Never print {billing}").messages[0].content
    assert quoted == f"Never print {billing}"


def test_a_tool_round_trip_becomes_chats_tool_call_and_tool_message():
    body = chat(tools=[WEATHER], messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "Look it up.", "signature": ""},
                                          {"type": "text", "text": "Let me look."},
                                          {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "Sunny"}]},
                                     {"type": "tool_result", "tool_use_id": "toolu_2", "content": "boom", "is_error": True},
                                     {"type": "text", "text": "And tomorrow?"}]},
        {"role": "system", "content": "Answer in French."},
    ])
    roles = [(m.role, m.content, m.tool_call_id) for m in body.messages]
    assert roles == [("user", "Weather in Paris?", None), ("assistant", "Let me look.", None), ("tool", "Sunny", "toolu_1"),
                     ("tool", "Error: boom", "toolu_2"), ("user", "And tomorrow?", None), ("system", "Answer in French.", None)]
    assistant = body.messages[1]
    assert assistant.reasoning_content == "Look it up."
    assert assistant.tool_calls == [ToolCall(id="toolu_1", function=FunctionCall("get_weather", '{"city":"Paris"}'))]
    assert body.tools[0].function.name == "get_weather" and body.tools[0].function.parameters == {"type": "object"}


@pytest.mark.parametrize("choice, expected", [
    ({"type": "auto"}, "auto"), ({"type": "any"}, "required"), ({"type": "none"}, "none"),
    ({"type": "tool", "name": "get_weather"}, NamedToolChoice(function=msgspec.convert({"name": "get_weather"}, type=anthropic_messages.FunctionName)))])
def test_tool_choice_is_chats(choice, expected):
    body = chat(tools=[WEATHER], tool_choice=choice)
    assert body.tool_choice == expected and body.parallel_tool_calls
    assert not chat(tools=[WEATHER], tool_choice={**choice, "disable_parallel_tool_use": True}).parallel_tool_calls


def test_thinking_is_on_only_when_enabled():
    assert chat().reasoning_effort == "none" and chat(thinking={"type": "disabled"}).reasoning_effort == "none"
    assert chat(thinking={"type": "enabled", "budget_tokens": 8}).reasoning_effort is None


@pytest.mark.parametrize("fields, param", [
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "messages[0].content[0].type"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t",
                                                 "content": [{"type": "document"}]}]}]}, "messages[0].content[0].content[0].type"),
    ({"messages": [{"role": "system", "content": [{"type": "tool_result", "tool_use_id": "t"}]}]}, "messages[0].content[0].type"),
    ({"messages": [{"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f"}]}]}, "messages[0].content[0].input"),
    ({"messages": [HI, {"role": "assistant", "content": "The answer is"}]}, "messages[1].role"),
    ({"system": [{"type": "image"}]}, "system[0].type"),
    ({"tools": [{**WEATHER, "type": "web_search_2025"}]}, "tools[0].type"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}], "tool_choice": {"type": "tool", "name": "web_search"}},
     "tool_choice"),
    ({"tools": [{"type": "code_execution_20250825", "name": "code_execution"}], "tool_choice": {"type": "any"}},
     "tool_choice"),
    ({"tools": [{**WEATHER, "input_schema": {"type": "string"}}]}, "tools[0].input_schema.type"),
    ({"tools": [WEATHER], "tool_choice": {"type": "tool"}}, "tool_choice.name"),
    ({"thinking": {"type": "enabled"}}, "thinking.budget_tokens"),
    ({"thinking": {"type": "enabled", "budget_tokens": 16}}, "thinking.budget_tokens"),
    ({"mcp_servers": [{"url": "x"}]}, "mcp_servers"),
])
def test_unsupported_or_incomplete_input_is_a_400_naming_the_field(fields, param):
    with pytest.raises(APIError) as e:
        chat(**fields)
    assert e.value.status == 400 and e.value.param == param


def test_count_tokens_takes_no_max_tokens():
    body = msgspec.convert({"model": "m", "messages": [{"role": "user", "content": "Hi"}],
                            "thinking": {"type": "enabled", "budget_tokens": 9999}}, CountTokensRequest)
    chat_body, origins, _ = anthropic_messages.chat_request(body, "m")
    assert chat_body.max_tokens is None and origins == ["messages[0]"]


def test_a_chat_message_in_an_error_is_renamed_to_where_it_came_from():
    _, origins, _ = anthropic_messages.chat_request(request(system="S", messages=[
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "tool_result", "tool_use_id": "t", "content": "r"}]}]), "m")
    assert origins == ["system", "messages[0]", "messages[0]"]
    error = anthropic_messages.as_messages_error(APIError(400, "bad", "messages[2].tool_calls[0].function.arguments"), origins)
    assert error.param == "messages[0]"


@pytest.mark.parametrize("finish, stop_string, context_full, expected", [
    ("length", None, False, ("max_tokens", None)), ("length", None, True, ("model_context_window_exceeded", None)),
    ("tool_calls", None, False, ("tool_use", None)), ("tool_calls", None, True, ("tool_use", None)),
    ("stop", None, False, ("end_turn", None)), ("stop", "END", False, ("stop_sequence", "END")),
    ("stop", "<|im_end|>", False, ("end_turn", None))])
def test_stop_reason(finish, stop_string, context_full, expected):
    finished = Finished(reason=finish, stop_string=stop_string, context_full=context_full)
    assert anthropic_messages.stop_reason(finished, request(stop_sequences=["END"])) == expected


def test_the_stop_scanner_says_which_stop_string_ended_the_text():
    scanner = StopScanner(["world", "o wor"])
    assert scanner.feed("hello wo") == ("hell", False) and scanner.reached is None
    assert scanner.feed("rld") == ("", True) and scanner.reached == "o wor"  # the one that begins first
    scanner = StopScanner(["world", "o wor"])
    assert scanner.feed("a world") == ("a ", True) and scanner.reached == "world"


def test_a_forced_calls_arguments_are_read_as_they_stream():
    reader, text = ForcedCallReader(), '{ "name" : "get_weather", "arguments": {"city": "Pa\\"}ris", "n": [1, {"a": 2}]} }'
    read = [reader.feed(text[i:i + 3]) for i in range(0, len(text), 3)]
    assert [name for name, _ in read if name] == ["get_weather"] and read[12][0] == "get_weather"
    assert json.loads("".join(arguments for _, arguments in read)) == {"city": 'Pa"}ris', "n": [1, {"a": 2}]}
    assert reader.done and reader.feed("}") == (None, "")


def test_tool_input_is_an_object():
    assert anthropic_messages.tool_input('{"city": "Paris"}') == {"city": "Paris"}
    assert anthropic_messages.tool_input('"Paris"') == {"arguments": "Paris"}
    assert anthropic_messages.tool_input("{oops") == {"arguments": "{oops"}
    assert anthropic_messages.tool_use_block("call_abc", "f", "{}") == ToolUseBlock(id="toolu_abc", name="f", input={})


def events_of(sent: list[bytes]) -> list[dict]:
    return [json.loads(chunk.split(b"data: ", 1)[1]) for chunk in sent]


def test_blocks_are_started_and_stopped_in_order():
    blocks = anthropic_messages.Blocks()
    sent = [*blocks.thinking("Hmm"), *blocks.text("Hel"), *blocks.text("lo"), *blocks.stop(),
            *blocks.tool_use(ToolUseBlock(id="toolu_1", name="f", input={"a": 1})), *blocks.stop()]
    assert [(e["type"], e.get("index")) for e in events_of(sent)] == [
        ("content_block_start", 0), ("content_block_delta", 0), ("content_block_stop", 0),
        ("content_block_start", 1), ("content_block_delta", 1), ("content_block_delta", 1), ("content_block_stop", 1),
        ("content_block_start", 2), ("content_block_delta", 2), ("content_block_stop", 2)]
    deltas = [e["delta"] for e in events_of(sent) if e["type"] == "content_block_delta"]
    assert deltas == [{"type": "thinking_delta", "thinking": "Hmm"}, {"type": "text_delta", "text": "Hel"},
                      {"type": "text_delta", "text": "lo"}, {"type": "input_json_delta", "partial_json": '{"a":1}'}]
    assert events_of(sent)[3]["content_block"] == {"type": "text", "text": ""}
    assert msgspec.json.decode(msgspec.json.encode(ThinkingBlock(thinking="t"))) == {"type": "thinking", "thinking": "t", "signature": ""}
    assert msgspec.json.encode(TextBlock(text="\0")) == b'{"type":"text","text":"\\u0000"}'


def test_the_api_key_comes_as_bearer_or_x_api_key():
    assert api_key({b"authorization": b"Bearer k1"}) == b"k1" and api_key({b"x-api-key": b"k2"}) == b"k2"
    assert api_key({}) == b"" and api_key({b"authorization": b"k1"}) == b""
    assert authorized(b"k2", ("k1", "k2")) and not authorized(b"", ("k1",)) and not authorized(b"k3", ("k1",))


@pytest.mark.parametrize("status, kind", [(400, "invalid_request_error"), (401, "authentication_error"), (404, "not_found_error"),
                                          (413, "request_too_large"), (429, "rate_limit_error"), (500, "api_error"),
                                          (503, "overloaded_error")])
def test_errors_of_anthropic_routes_are_anthropics(status, kind):
    error = APIError(status, "no", "max_tokens")
    assert msgspec.to_builtins(error_body("anthropic", error)) == {
        "type": "error", "error": {"type": kind, "message": "max_tokens: no"}}
    assert "param" in msgspec.to_builtins(error_body("openai", error))["error"]  # OpenAI's
