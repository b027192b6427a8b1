"""One recorded engine event sequence, fed to the three encoders of chat_steps (chat's chunks, the
Responses stream, Anthropic's stream): they agree on the reasoning, the content, each tool call
and its arguments piece by piece, and the finish, whole too (chat_steps.answer)."""

import asyncio
import json
from types import SimpleNamespace

import msgspec
import pytest

from test_responses_items import in_progress  # the response a stream starts from
from gguf_serve import anthropic_messages, chat, chat_steps, chat_tools, responses
from gguf_serve.anthropic_protocol import MessagesRequest
from gguf_serve.events import Event
from gguf_serve.protocol import ChatRequest, CompletionTokensDetails, PromptTokensDetails, Usage
from gguf_serve.responses_protocol import ResponsesRequest
from gguf_serve.runs import Choice
from gguf_serve.tools import tool_plan

SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
SERVED = SimpleNamespace(config=SimpleNamespace(reasoning_format="deepseek", model_id="m"), model=None)
ASK = [{"role": "user", "content": "Weather in Paris and Rome?"}]


class RecordedRun:
    """A run of one choice whose events are the recorded ones."""

    generations, thinking, n_prompt, n_completion = [None], True, 5, 9

    def __init__(self, events: list[Event]):
        self.events = events

    async def __aiter__(self):
        for event in self.events:
            yield 0, event

    def usage(self) -> Usage:
        return Usage(prompt_tokens=5, completion_tokens=9, total_tokens=14, prompt_tokens_details=PromptTokensDetails(0),
                     completion_tokens_details=CompletionTokensDetails(2))


def collect(stream) -> list[bytes]:
    async def sent():
        return [b async for b in stream]

    return asyncio.run(sent())


def data_of(sent: list[bytes]) -> list[dict]:
    return [json.loads(line[6:]) for block in sent for line in block.decode().split("\n")
            if line.startswith("data: {")]


def via_chat(events: list[Event], forced: bool, parallel: bool) -> tuple:
    body = msgspec.convert({"model": "m", "messages": ASK, "stream": True, "parallel_tool_calls": parallel, "tools": [
        {"type": "function", "function": {"name": "get_weather", "parameters": SCHEMA}}],
        **({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}} if forced else {})}, ChatRequest)
    body, customs, free_form = chat_tools.function_view(body)
    plan = tool_plan(body)._replace(free_form=free_form)
    chunks = data_of(collect(chat.chunks(SERVED, RecordedRun(events), body, {"id": "c", "object": "o", "created": 0,
                                                                                 "model": "m"}, plan, customs)))
    deltas = [c["choices"][0] for c in chunks if c["choices"]]
    reasoning = "".join(d["delta"].get("reasoning_content") or "" for d in deltas)
    content = "".join(d["delta"].get("content") or "" for d in deltas)
    calls = {}
    for d in deltas:
        for call in d["delta"].get("tool_calls") or ():
            name, pieces = calls.get(call["index"], (None, []))
            calls[call["index"]] = (call["function"].get("name") or name, pieces + [call["function"]["arguments"]])
    calls = [(name, [p for p in pieces if p]) for name, pieces in calls.values()]
    return reasoning, content, calls, [d["finish_reason"] for d in deltas if d.get("finish_reason")], plan


def via_responses(events: list[Event], forced: bool, parallel: bool) -> tuple:
    body = msgspec.convert({"model": "m", "input": ASK, "stream": True, "store": False, "parallel_tool_calls": parallel,
                            "tools": [{"type": "function", "name": "get_weather", "parameters": SCHEMA}],
                            **({"tool_choice": {"type": "function", "name": "get_weather"}} if forced else {})},
                           ResponsesRequest)
    chat_body, agent, plan = responses.prepared(body, [], "m")
    response = in_progress(parallel)
    sent = data_of(collect(responses.events(None, RecordedRun(events), body, chat_body, plan, agent, response, [])))
    reasoning = "".join(e["delta"] for e in sent if e["type"] == "response.reasoning_text.delta")
    content = "".join(e["delta"] for e in sent if e["type"] == "response.output_text.delta")
    calls = {}
    for e in sent:
        if e["type"] == "response.output_item.added" and e["item"]["type"] == "function_call":
            calls[e["output_index"]] = (e["item"]["name"], [])
        elif e["type"] == "response.function_call_arguments.delta":
            calls[e["output_index"]][1].append(e["delta"])
    return reasoning, content, list(calls.values()), [sent[-1]["response"]["status"]], plan


def via_messages(events: list[Event], forced: bool, parallel: bool) -> tuple:
    choice = {"type": "tool", "name": "get_weather"} if forced else {"type": "auto"}
    body = msgspec.convert({"model": "m", "max_tokens": 64, "messages": ASK, "stream": True,
                            "tools": [{"name": "get_weather", "input_schema": SCHEMA}],
                            "tool_choice": {**choice, "disable_parallel_tool_use": not parallel}}, MessagesRequest)
    chat_body, _, _ = anthropic_messages.chat_request(body, "m")
    plan = tool_plan(chat_body)
    sent = data_of(collect(anthropic_messages.events(RecordedRun(events), body, plan,
                                                     anthropic_messages.new_message(SERVED))))
    deltas = [e["delta"] for e in sent if e["type"] == "content_block_delta"]
    calls = [(e["content_block"]["name"], [d["delta"]["partial_json"] for d in sent if d["type"] == "content_block_delta"
                                           and d["index"] == e["index"]])
             for e in sent if e["type"] == "content_block_start" and e["content_block"]["type"] == "tool_use"]
    return ("".join(d.get("thinking", "") for d in deltas), "".join(d.get("text", "") for d in deltas), calls,
            [sent[-2]["delta"]["stop_reason"]], plan)


THOUGHT = [Event("", reasoning="Paris, "), Event("", reasoning="then Rome.")]
FORCED = [*THOUGHT, Event('{"name": "get_'), Event('weather", "arguments": {"ci'), Event('ty": "Par'),
          Event('is"}}', finish_reason="stop")]
CUT = [*THOUGHT, Event('{"name": "get_weather", "arguments": {"ci'), Event('ty": "Pa', finish_reason="length")]
TWO_CALLS = [*THOUGHT, Event("Let me look. <tool_"),
             Event('call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>\n<tool_call>'),
             Event('{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>', finish_reason="stop")]
PLAIN = [*THOUGHT, Event("Sunny"), Event(" in both.", finish_reason="stop")]
PARIS, ROME = {"city": "Paris"}, {"city": "Rome"}  # a call parsed at the end: its arguments whole (Anthropic's re-encoded)


def read(calls: list) -> list:
    """Calls as (name, argument pieces), a call sent in one piece as the value it holds."""
    return [(name, [json.loads(pieces[0])] if len(pieces) == 1 else pieces) for name, pieces in calls]


@pytest.mark.parametrize("events, forced, parallel, content, calls, finishes", [
    # a forced call: its arguments streamed as the model wrote them, on all three
    (FORCED, True, True, "", [("get_weather", ['{"ci', 'ty": "Par', 'is"}'])], ["tool_calls", "completed", "tool_use"]),
    # cut by the budget: the call it began, as far as written
    (CUT, True, True, "", [("get_weather", ['{"ci', 'ty": "Pa'])], ["length", "incomplete", "max_tokens"]),
    # offered tools, two calls written: both, or with parallel_tool_calls off the first, on all three
    (TWO_CALLS, False, True, "Let me look. ", [("get_weather", [PARIS]), ("get_weather", [ROME])],
     ["tool_calls", "completed", "tool_use"]),
    (TWO_CALLS, False, False, "Let me look. ", [("get_weather", [PARIS])], ["tool_calls", "completed", "tool_use"]),
    (PLAIN, False, True, "Sunny in both.", [], ["stop", "completed", "end_turn"]),
])
def test_the_three_encoders_agree_on_one_recorded_generation(events, forced, parallel, content, calls, finishes):
    got = [encode(events, forced, parallel) for encode in (via_chat, via_responses, via_messages)]
    for (reasoning, said, made, finish, _), expected_finish in zip(got, finishes):
        assert (reasoning, said, read(made), finish) == ("Paris, then Rome.", content, calls, [expected_finish])
    # whole: the same steps folded, for each API's plan
    whole = Choice(text="".join(e.text for e in events), finish_reason=events[-1].finish_reason,
                   reasoning="Paris, then Rome.")
    for *_, plan in got:
        answer = chat_steps.answer(plan, whole)
        assert (answer.reasoning, answer.content or "") == ("Paris, then Rome.", content)
        assert [(c.function.name, c.function.arguments) for c in answer.calls] == [
            (name, "".join(pieces) if isinstance(pieces[0], str) else json.dumps(pieces[0])) for name, pieces in calls]
        assert answer.finished.reason == finishes[0]
