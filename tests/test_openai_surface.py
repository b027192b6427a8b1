"""The full OpenAI request surface, with the real openai SDK against SmolLM2 in granian.
Each test asserts what the parameter does to the answer, not only that it was accepted."""

import json

import httpx
import openai
import pytest

from gguf_serve.model import Model
from conftest import MODEL, smollm2_path
HELLO = [{"role": "user", "content": "Say hello."}]
STORY = [{"role": "user", "content": "Write a long story about a dragon."}]


@pytest.fixture(scope="module")
def vocab():
    return Model(smollm2_path(), vocab_only=True)


def chat(client, **kwargs):
    return client.chat.completions.create(**{"model": MODEL, "messages": HELLO, **kwargs})


def text(response) -> str:
    return response.choices[0].message.content


# --- 1. sampling parameters, range-checked ---


@pytest.mark.parametrize(
    "field,value",
    [("temperature", 2.5), ("temperature", -0.1), ("top_p", 1.5), ("presence_penalty", 3), ("frequency_penalty", -2.5),
     ("top_k", -1), ("min_p", 1.5), ("repeat_penalty", 0), ("n", 9), ("n", 0), ("top_logprobs", 21),
     ("logit_bias", {"5": 200}), ("logit_bias", {"not-a-token": 1}), ("logit_bias", {"99999999": 1}), ("seed", "x")],
)
def test_out_of_range_sampling_is_400_naming_the_field(client, field, value):
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, max_tokens=2, **{field: value} if field in ("temperature", "top_p", "presence_penalty",
                                                                  "frequency_penalty", "n", "logit_bias", "seed",
                                                                  "top_logprobs")
             else {"extra_body": {field: value}})
    assert e.value.body["param"].startswith(field)


def test_logit_bias_bans_a_token(client, vocab):
    kwargs = dict(model=MODEL, prompt="The capital of France is", max_tokens=3, temperature=0)
    assert client.completions.create(**kwargs).choices[0].text.startswith(" Paris")
    [paris] = vocab.tokenize(" Paris")
    banned = client.completions.create(logit_bias={str(paris): -100}, **kwargs).choices[0].text
    assert not banned.startswith(" Paris")
    # the same through a llama.cpp sampler chain (greedy with no penalty is a numpy argmax)
    chained = client.completions.create(logit_bias={str(paris): -100}, extra_body={"top_k": 1},
                                        **{**kwargs, "temperature": 1.0}).choices[0].text
    assert chained == banned


def test_extensions_top_k_min_p_repeat_penalty_change_sampling(client):
    base = text(chat(client, messages=STORY, max_tokens=40, temperature=0))
    penalised = text(chat(client, messages=STORY, max_tokens=40, temperature=0, extra_body={"repeat_penalty": 1.8}))
    assert penalised != base
    # top_k=1 is greedy whatever the temperature
    assert text(chat(client, messages=STORY, max_tokens=40, temperature=1.5, seed=3, extra_body={"top_k": 1})) == base


# --- 2. determinism ---


def test_greedy_repeats_exactly_whatever_ran_before(client):
    first = text(chat(client, messages=STORY, max_tokens=30, temperature=0))
    chat(client, messages=[{"role": "user", "content": "Something else entirely."}], max_tokens=10, temperature=0.9)
    assert text(chat(client, messages=STORY, max_tokens=30, temperature=0)) == first


def test_same_seed_same_text_other_seed_other_text(client):
    a = text(chat(client, messages=STORY, max_tokens=30, temperature=1.0, seed=42))
    b = text(chat(client, messages=STORY, max_tokens=30, temperature=1.0, seed=42))
    c = text(chat(client, messages=STORY, max_tokens=30, temperature=1.0, seed=7))
    assert a == b != c


def test_default_temperature_is_one_so_unseeded_answers_vary(client):
    answers = {text(chat(client, messages=STORY, max_tokens=20)) for _ in range(3)}
    assert len(answers) > 1


def test_cached_prompt_tokens_are_reported(client):
    messages = [{"role": "user", "content": "A question nobody asked before: why is the sky green?"}]
    first = chat(client, messages=messages, max_tokens=3, temperature=0)
    again = chat(client, messages=messages, max_tokens=3, temperature=0)
    # All of the prompt but its last token (decoded again for its logits) comes from the cache.
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 1
    assert first.usage.prompt_tokens_details.cached_tokens < again.usage.prompt_tokens_details.cached_tokens
    assert text(again) == text(first)


# --- 3. limits ---


def test_max_completion_tokens(client):
    r = chat(client, messages=STORY, max_completion_tokens=6)
    assert r.usage.completion_tokens == 6 and r.choices[0].finish_reason == "length"


def test_context_length_exceeded_before_generation(client, base_url, vocab):
    """A prompt over the context by itself; one that fits with a max_tokens that doesn't is
    answered, ended at the context's end (tests/test_context_limit.py)."""
    long = [{"role": "user", "content": "word " * 3000}]
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, messages=long, max_tokens=5)
    assert e.value.code == "context_length_exceeded"
    prompt = httpx.post(f"{base_url}/apply-template", json={"messages": long}, timeout=60).json()["prompt"]
    counted = len(vocab.tokenize_prompt(prompt))  # the prompt as the server renders and tokenizes it
    assert counted > 2048 and f"maximum context length is 2048 tokens; the prompt has {counted} tokens" in e.value.message


# --- 4. stop strings ---


def test_stop_string_multi_token_never_returned(client):
    full = text(chat(client, messages=STORY, max_tokens=40, temperature=0))
    stop = full[10:22]  # a stop string spanning several tokens, taken from inside the answer
    r = chat(client, messages=STORY, max_tokens=40, temperature=0, stop=["zzzz", stop])
    assert text(r) == full[: full.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    streamed = [c.choices[0].delta.content or "" for c in chat(client, messages=STORY, max_tokens=40, temperature=0,
                                                                stop=stop, stream=True) if c.choices]
    assert "".join(streamed) == full[: full.index(stop)]  # no fragment of the stop string was ever sent


def test_stop_as_one_string_on_completions(client):
    kwargs = dict(model=MODEL, prompt="1, 2, 3, 4, 5,", max_tokens=12, temperature=0)
    full = client.completions.create(**kwargs).choices[0].text
    assert " 7" in full
    r = client.completions.create(stop=" 7", **kwargs)
    assert r.choices[0].text == full[: full.index(" 7")] and r.choices[0].finish_reason == "stop"


# --- 5. n ---


def test_n_choices(client):
    r = chat(client, messages=STORY, max_tokens=8, n=3, temperature=1.0, seed=1)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.message.content for c in r.choices}) > 1
    assert r.usage.completion_tokens == 24


def test_n_choices_streamed(client):
    chunks = list(chat(client, messages=STORY, max_tokens=5, n=2, stream=True, stream_options={"include_usage": True}))
    finished = {c.choices[0].index: c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason}
    assert finished == {0: "length", 1: "length"}
    assert chunks[-1].usage.completion_tokens == 10


def test_n_choices_compute_their_prompt_once(client, server):
    """The first choice computes the prompt; the others copy its KV cache (counted in
    gguf_prompt_tokens_reused) instead of computing it again, and agree with it at temperature 0."""
    # a prompt no sequence holds yet, long enough that only a copy explains the count
    words = " ".join(f"w{i}" for i in range(60))
    before = server.metric("gguf_prompt_tokens_reused_total")
    r = chat(client, messages=[{"role": "user", "content": f"Repeat after me: {words}"}], max_tokens=6, n=4, temperature=0)
    assert server.metric("gguf_prompt_tokens_reused_total") - before >= 3 * (r.usage.prompt_tokens - 1)
    assert len({c.message.content for c in r.choices}) == 1


# --- 6. logprobs ---


def test_chat_logprobs(client):
    r = chat(client, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 5 and "".join(t.token for t in content) == text(r)
    for t in content:
        assert t.logprob <= 0 and bytes(t.bytes).decode(errors="replace") == t.token
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].token == t.token  # greedy: the best one
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob >= t.top_logprobs[2].logprob
    streamed = [t for c in chat(client, max_tokens=5, temperature=0, logprobs=True, stream=True)
                if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in content]
    assert chat(client, max_tokens=2).choices[0].logprobs is None


def test_completion_logprobs(client):
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(4)]
    assert all(len(top) == 2 and max(top.values()) == top[tok] for tok, top in zip(lp.tokens, lp.top_logprobs))


# --- 7. usage in streams ---


def test_usage_only_in_a_final_chunk_when_asked(client):
    chunks = list(chat(client, messages=STORY, max_tokens=5, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 5
    assert all(c.usage is None for c in chunks[:-1])
    assert all(c.usage is None for c in chat(client, max_tokens=5, stream=True))


# --- 8. structured output ---


def test_json_mode_output_parses(client):
    r = chat(client, messages=[{"role": "user", "content": "Describe a cat as JSON."}], max_tokens=60,
             response_format={"type": "json_object"}, temperature=0.7, seed=5)
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text(r)), dict)
    else:
        assert text(r).lstrip().startswith("{")


PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer"},
                   "pets": {"type": "array", "items": {"enum": ["cat", "dog"]}, "maxItems": 2}},
    "required": ["name", "age", "pets"],
    "additionalProperties": False,
}


def test_json_schema_output_validates(client):
    for seed in (1, 2, 3):
        r = chat(client, messages=[{"role": "user", "content": "Invent a person."}], max_tokens=80, seed=seed,
                 response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}})
        assert r.choices[0].finish_reason == "stop"
        person = json.loads(text(r))
        assert set(person) == {"name", "age", "pets"}
        assert isinstance(person["name"], str) and len(person["name"]) <= 20 and isinstance(person["age"], int)
        assert set(person["pets"]) <= {"cat", "dog"} and len(person["pets"]) <= 2


def test_unsupported_schema_features_are_named(client):
    schema = {"type": "object", "properties": {"n": {"type": "array", "uniqueItems": True, "contains": {"const": 2}}}}
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    assert "uniqueItems" in e.value.message and "contains" in e.value.message
    assert e.value.code == "unsupported_schema"


def test_numeric_bounds_are_enforced(client):
    """`minimum` and `maximum` hold in what the model writes (llguidance compiles them to the grammar)."""
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 700, "maximum": 705}},
              "required": ["n"], "additionalProperties": False}
    r = chat(client, max_tokens=24, temperature=0,
             response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
    assert 700 <= json.loads(r.choices[0].message.content)["n"] <= 705


# --- 9. tools ---

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
                       "required": ["city", "unit"]},
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
ASK = [{"role": "user", "content": "What's the weather in Paris?"}]


def test_forced_tool_call(client):
    r = chat(client, messages=ASK, tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_weather"}},
             max_tokens=100, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    assert isinstance(arguments["city"], str) and arguments["unit"] in ("C", "F")


def test_required_tool_call_names_one_of_the_tools(client):
    r = chat(client, messages=ASK, tools=[WEATHER, TIME], tool_choice="required", max_tokens=100, temperature=0)
    [call] = r.choices[0].message.tool_calls
    assert call.function.name in ("get_weather", "get_time")
    json.loads(call.function.arguments)


def test_forced_tool_call_streams_as_tool_call_deltas(client):
    chunks = list(chat(client, messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=100, temperature=0, stream=True))
    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert deltas and deltas[0].function.name == "get_weather" and deltas[0].id
    assert json.loads("".join(d.function.arguments for d in deltas))["city"]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_text_streams_as_it_comes_when_tools_are_offered(client):
    """A LangChain agent always sends tools: a plain answer must still stream token by token,
    with its logprobs, and equal the answer not streamed."""
    ask = [{"role": "user", "content": "Tell me a short story about a cat."}]
    whole = chat(client, messages=ask, tools=[WEATHER], max_tokens=30, temperature=0)
    assert whole.choices[0].message.tool_calls is None
    chunks = list(chat(client, messages=ask, tools=[WEATHER], max_tokens=30, temperature=0, stream=True, logprobs=True))
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(texts) > 3 and "".join(texts) == whole.choices[0].message.content
    assert sum(len(c.choices[0].logprobs.content) for c in chunks if c.choices and c.choices[0].logprobs) == whole.usage.completion_tokens


def test_tool_choice_none_answers_in_text(client):
    r = chat(client, messages=ASK, tools=[WEATHER], tool_choice="none", max_tokens=10)
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content


def test_tool_results_go_back_through_the_template(client, base_url):
    messages = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "C"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
    ]
    prompt = httpx.post(f"{base_url}/apply-template", json={"messages": messages, "tools": [WEATHER]}).json()["prompt"]
    assert '"name": "get_weather"' in prompt and '{"temperature": 21}' in prompt  # tools described, result passed back
    r = chat(client, messages=messages, tools=[WEATHER], max_tokens=20)
    assert r.choices[0].message.content or r.choices[0].message.tool_calls


def test_unknown_forced_tool_is_400(client):
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "nope"}})
    assert e.value.body["param"] == "tool_choice"


def test_legacy_functions(client):
    r = chat(client, messages=ASK, functions=[WEATHER["function"]], function_call={"name": "get_weather"}, max_tokens=100, temperature=0)
    assert r.choices[0].finish_reason == "function_call"
    assert r.choices[0].message.function_call.name == "get_weather"
    assert json.loads(r.choices[0].message.function_call.arguments)["city"]


# --- 10. completions extras ---


def test_prompt_forms(client, vocab):
    kwargs = dict(model=MODEL, max_tokens=4, temperature=0)
    one = client.completions.create(prompt="The capital of France is", **kwargs).choices[0].text
    as_ids = client.completions.create(prompt=vocab.tokenize("The capital of France is"), **kwargs).choices[0].text
    assert as_ids == one
    r = client.completions.create(prompt=["The capital of France is", "Once upon a time"], n=2, **kwargs)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text == one
    assert r.usage.completion_tokens == 16
    again = client.completions.create(prompt=["The capital of France is", "Once upon a time"], **kwargs)
    # Both prompts are cached now, in sequences of their own: each counts its reused tokens.
    assert again.usage.prompt_tokens_details.cached_tokens == again.usage.prompt_tokens - 2


def test_echo_and_suffix(client):
    r = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=3, temperature=0, echo=True)
    assert r.choices[0].text.startswith("The capital of France is ")
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="def f(", suffix="    return x", max_tokens=3)
    assert e.value.body["param"] == "suffix"  # SmolLM2 has no fill-in-the-middle tokens


# --- 11. unknown and unsupported fields ---


def test_unknown_fields_are_ignored(client):
    r = chat(client, max_tokens=3, temperature=0, store=False, metadata={"k": "v"}, user="u1", extra_body={"brand_new_field": 1})
    assert r.usage.completion_tokens == 3


@pytest.mark.parametrize("field,value", [("audio", {"voice": "alloy", "format": "wav"}), ("modalities", ["text", "audio"]),
                                         ("prediction", {"type": "content", "content": "x"})])
def test_known_fields_that_cant_be_honoured_are_400(client, field, value):
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, max_tokens=3, **{field: value})
    assert e.value.body["param"].startswith(field)
