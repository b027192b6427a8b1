"""Thinking models end to end: SmolLM2's real weights with official thinking templates written
into copies of its GGUF (conftest.with_template), through a real granian and the OpenAI SDK."""

import json

import httpx
import jinja2
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment
from openai import OpenAI

from conftest import SHARED, Server, smollm2_path, with_template
from gguf_serve.model import Model

R1 = (SHARED / "chat-templates" / "deepseek-ai-DeepSeek-R1-Distill-Qwen-32B.jinja").read_text()
QWEN3 = (SHARED / "chat-templates" / "Qwen-Qwen3-0.6B.jinja").read_text()
ASK = [{"role": "user", "content": "What is 2 + 2?"}]


def serve(tmp_path_factory, name: str, template: str, **env) -> Server:
    model = with_template(tmp_path_factory.mktemp(name), name, template)
    return Server({"MODEL": str(model), "N_THREADS": "2", **env}).wait_ready()


@pytest.fixture(scope="module")
def r1(tmp_path_factory):
    """The R1 distill template: with thinking on, its generation prompt opens `<think>`, so
    everything SmolLM2 writes before a `</think>` is reasoning."""
    s = serve(tmp_path_factory, "r1", R1)
    yield s
    s.stop()


def sdk(server: Server) -> OpenAI:
    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_the_prompt_opens_thinking_unless_it_is_switched_off(r1):
    def prompt(**extra):
        return httpx.post(f"{r1.url}/apply-template", json={"messages": ASK, **extra}).json()["prompt"]

    assert prompt().endswith("<｜Assistant｜><think>\n")
    assert prompt(chat_template_kwargs={"enable_thinking": False}).endswith("<think>\n</think>")
    assert prompt(reasoning_effort="none").endswith("<think>\n</think>")
    r = httpx.post(f"{r1.url}/apply-template", json={"messages": ASK, "chat_template_kwargs": [1]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template_kwargs"


def test_what_it_writes_while_thinking_is_reasoning_content(r1):
    r = sdk(r1).chat.completions.create(model="r1", messages=ASK, max_tokens=24, temperature=0)
    message = r.choices[0].message
    thought = message.model_extra["reasoning_content"]
    assert thought and "<think>" not in thought and "</think>" not in thought
    assert not message.content  # it never closed the block: no answer yet
    assert r.usage.completion_tokens_details.reasoning_tokens == r.usage.completion_tokens == 24
    assert "reasoning" not in message.model_extra  # only with REASONING_FORMAT=both


def test_streamed_reasoning_equals_the_whole(r1):
    whole = sdk(r1).chat.completions.create(model="r1", messages=ASK, max_tokens=24, temperature=0)
    chunks = list(sdk(r1).chat.completions.create(model="r1", messages=ASK, max_tokens=24, temperature=0, stream=True,
                                                  stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.model_extra.get("reasoning_content") or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.model_extra["reasoning_content"]
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage.completion_tokens_details.reasoning_tokens == 24


def test_stop_strings_do_not_fire_inside_the_reasoning(r1):
    whole = sdk(r1).chat.completions.create(model="r1", messages=ASK, max_tokens=24, temperature=0)
    thought = whole.choices[0].message.model_extra["reasoning_content"]
    word = thought.split()[1]  # a word it writes while thinking
    stopped = sdk(r1).chat.completions.create(model="r1", messages=ASK, max_tokens=24, temperature=0, stop=[word])
    assert stopped.choices[0].message.model_extra["reasoning_content"] == thought
    assert stopped.choices[0].finish_reason == "length"


def test_thinking_off_answers_in_content(r1):
    r = sdk(r1).chat.completions.create(model="r1", messages=ASK, max_tokens=8, temperature=0, reasoning_effort="minimal")
    assert r.choices[0].message.content and r.usage.completion_tokens_details.reasoning_tokens == 0


# --- the Responses API ---


def test_responses_give_the_reasoning_as_a_reasoning_item(r1):
    chat = sdk(r1).chat.completions.create(model="r1", messages=ASK, max_tokens=24, temperature=0)
    r = sdk(r1).responses.create(model="r1", input=ASK[0]["content"], max_output_tokens=24, temperature=0)
    thought, message = r.output
    assert thought.type == "reasoning" and thought.id.startswith("rs_") and thought.summary == []
    assert thought.content[0].type == "reasoning_text"
    assert thought.content[0].text == chat.choices[0].message.model_extra["reasoning_content"]
    assert thought.status == "incomplete"  # cut off by max_output_tokens while still thinking
    assert message.type == "message" and r.output_text == ""
    assert r.usage.output_tokens_details.reasoning_tokens == r.usage.output_tokens == 24
    assert r.reasoning.effort is None


def test_responses_stream_the_reasoning_before_the_message(r1):
    whole = sdk(r1).responses.create(model="r1", input=ASK[0]["content"], max_output_tokens=24, temperature=0)
    # the SDK's stream helper, which accumulates the events into items as they come
    with sdk(r1).responses.stream(model="r1", input=ASK[0]["content"], max_output_tokens=24, temperature=0) as stream:
        events = list(stream)
    final = events[-1].response
    kinds = [e.type for e in events]
    deltas = [e.delta for e in events if e.type == "response.reasoning_text.delta"]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[4:4 + len(deltas)] == ["response.reasoning_text.delta"] * len(deltas)
    assert kinds[4 + len(deltas):4 + len(deltas) + 3] == ["response.reasoning_text.done", "response.content_part.done",
                                                          "response.output_item.done"]
    assert events[2].item.type == "reasoning" and events[3].part.type == "reasoning_text"
    assert "".join(deltas) == whole.output[0].content[0].text == final.output[0].content[0].text
    message_added = events[4 + len(deltas) + 3]
    assert message_added.type == "response.output_item.added" and message_added.output_index == 1
    assert final.usage.output_tokens_details.reasoning_tokens == 24 and kinds[-1] == "response.incomplete"


def test_responses_take_their_reasoning_back_and_effort_none_switches_it_off(r1):
    client = sdk(r1)
    first = client.responses.create(model="r1", input=ASK[0]["content"], max_output_tokens=8, temperature=0)
    # as the Agents SDK and manual context management do: the output items back as input
    again = client.responses.create(model="r1", max_output_tokens=8, temperature=0, reasoning={"effort": "none"},
                                    input=[*ASK, *[item.model_dump(exclude_none=True) for item in first.output],
                                           {"role": "user", "content": "And 3 + 3?"}])
    assert [item.type for item in again.output] == ["message"] and again.output_text
    assert again.usage.output_tokens_details.reasoning_tokens == 0 and again.reasoning.effort == "none"
    continued = client.responses.create(model="r1", previous_response_id=first.id, input="And 3 + 3?",
                                        max_output_tokens=8, temperature=0)
    assert continued.output[0].type == "reasoning" and continued.usage.input_tokens_details.cached_tokens > 0


@pytest.mark.parametrize("fmt,fields", [("both", {"reasoning_content", "reasoning"}), ("none", set())])
def test_reasoning_format(tmp_path_factory, fmt, fields):
    s = serve(tmp_path_factory, f"r1-{fmt}", R1, REASONING_FORMAT=fmt)
    try:
        r = httpx.post(f"{s.url}/v1/chat/completions", timeout=60,
                       json={"model": f"r1-{fmt}", "messages": ASK, "max_tokens": 8, "temperature": 0}).json()
        message = r["choices"][0]["message"]
        assert {k for k in ("reasoning_content", "reasoning") if k in message} == fields
        if fmt == "none":
            assert message["content"] and "completion_tokens_details" not in r["usage"]
        else:
            assert message["reasoning"] == message["reasoning_content"] and message["content"] == ""
    finally:
        s.stop()


def official_qwen3(messages, **extra) -> str:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda v, indent=None: json.dumps(v, ensure_ascii=False, indent=indent)
    return env.from_string(QWEN3).render(messages=messages, add_generation_prompt=True, bos_token="", eos_token="",
                                         raise_exception=jinja2.TemplateError, **extra)


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    """Qwen3's template: its generation prompt leaves the model free to open `<think>` itself."""
    s = serve(tmp_path_factory, "qwen3", QWEN3)
    yield s
    s.stop()


def test_qwen3_prompt_with_thinking_off_and_history_is_the_official_one(qwen3):
    history = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!", "reasoning_content": "The user greets me."},
        {"role": "user", "content": "What is 2 + 2?"},
    ]

    def prompt(**extra):
        return httpx.post(f"{qwen3.url}/apply-template", json={"messages": history, **extra}).json()["prompt"]

    assert prompt(chat_template_kwargs={"enable_thinking": False}) == official_qwen3(history, enable_thinking=False)
    assert prompt() == official_qwen3(history)  # thinking on: the template's default
    # the reasoning of a turn before the last user message is dropped, as Qwen3's authors wrote
    assert "The user greets me." not in prompt()


# --- a grammar is the answer's: it starts when the thinking ends ---

JSON_ASK = [{"role": "user", "content": "What is 2 + 2? Answer in JSON."}]


def first_token(text: str) -> str:
    return str(Model(smollm2_path(), vocab_only=True).tokenize(text)[0])


def test_a_json_answer_starts_where_the_thinking_ends(r1):
    # SmolLM2 never closes a think block by itself: a bias on the first token of `</think>` makes it
    r = sdk(r1).chat.completions.create(model="r1", messages=JSON_ASK, max_tokens=30, temperature=0,
                                        response_format={"type": "json_object"}, logit_bias={first_token("</think>"): 5})
    message = r.choices[0].message
    thought = message.model_extra["reasoning_content"]
    assert thought and not thought.startswith("{")  # thought freely, outside the grammar
    assert message.content.startswith("{")  # then answered under it


def test_qwen3_may_open_its_think_block_under_a_grammar(qwen3):
    def ask(**extra):
        return sdk(qwen3).chat.completions.create(model="qwen3", messages=JSON_ASK, max_tokens=16, temperature=0,
                                                  response_format={"type": "json_object"}, **extra).choices[0].message

    answered = ask()  # what SmolLM2 does: answers at once, under the grammar from its first token
    assert answered.content.startswith("{") and answered.model_extra["reasoning_content"] is None
    # pushed towards `<`, it opens the block (the grammar lets `<think>` through) and thinks freely
    opened = ask(logit_bias={first_token("<think>"): 10})
    assert opened.model_extra["reasoning_content"].startswith("<") and opened.content == ""
