"""A generation that asks for more than the context holds, as coding agents ask it (Claude Code:
a 20k-token prompt and max_tokens 32000): answered, ended at the context's end and said so on
each API; only a prompt that leaves no room for one token is refused. A server with N_CTX=512,
prompts that leave a few dozen tokens of it (each test costs its prompt and those tokens) and
32000 asked are that case, small; the real SDKs read the answers."""

import asyncio

import anthropic
import openai
import pytest

from gguf_serve import engine
from gguf_serve.model import Model
from conftest import MODEL, Server, smollm2_path

N_CTX = 512
ASKED = 32000  # Claude Code's max_tokens


def counting(last: int) -> str:
    """Greedy SmolLM2 goes on counting for more tokens than the context leaves it here: the
    generation ends at the context's end, not at an end of turn (each test asserts which)."""
    numbers = ", ".join(map(str, range(1, last + 1)))
    return f"Continue counting, one number after another, and never stop: {numbers},"


COUNTING = counting(110)  # 454 tokens, 484 as a chat prompt: 28 left
LONG = "word " * 600  # over the context by itself
GREEDY = {"temperature": 0}  # the anthropic SDK has no argument for it


@pytest.fixture(scope="module")
def small_context():
    s = Server({"N_THREADS": "2", "N_CTX": str(N_CTX), "PARALLEL": "2"}).wait_ready()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def oai(small_context):
    return openai.OpenAI(base_url=f"{small_context.url}/v1", api_key="unused", max_retries=0, timeout=600)


@pytest.fixture(scope="module")
def claude(small_context):
    return anthropic.Anthropic(base_url=small_context.url, api_key="unused", max_retries=0, timeout=600)


@pytest.fixture(scope="module")
def vocab():
    return Model(smollm2_path(), vocab_only=True)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def prompt_tokens(oai, text: str) -> int:
    """The prompt's tokens as counted apart from any generation (the Responses API's count)."""
    return oai.responses.input_tokens.count(model=MODEL, input=text).input_tokens


# --- the engine: which limit ended a generation ------------------------------------------------


def test_the_engine_says_when_the_context_not_max_tokens_ended_a_generation():
    model = Model(smollm2_path(), n_ctx=32, n_threads=2, parallel=3)
    never_ends = {t: float("-inf") for t in range(model.n_vocab) if model.is_end_of_generation(t)}
    prompt = model.tokenize_prompt("Tell me a story about a dragon.")
    room = model.n_ctx - len(prompt)

    async def run() -> list[engine.Event]:
        loop = asyncio.get_running_loop()
        eng = engine.Engine(model, 3, loop)
        ended = [loop.create_future() for _ in range(3)]
        for max_tokens, future in zip((ASKED, room, room - 1), ended):
            eng.submit(engine.Generation(prompt, max_tokens, engine.Sampling(temperature=0, logit_bias=never_ends),
                                         lambda e, f=future: e.finish_reason and f.set_result(e)))
        try:
            return await asyncio.wait_for(asyncio.gather(*ended), 600)  # a guard against a hang, not a time limit
        finally:
            eng.close()

    full, exact, short = asyncio.run(run())
    assert (full.finish_reason, full.completion_tokens, full.context_full) == ("length", room, True)
    assert (exact.finish_reason, exact.completion_tokens, exact.context_full) == ("length", room, False)
    assert (short.finish_reason, short.completion_tokens, short.context_full) == ("length", room - 1, False)


# --- chat completions ------------------------------------------------------------------------------


def test_chat_is_clamped_to_the_context_left(oai):
    n_prompt = prompt_tokens(oai, COUNTING)
    assert n_prompt < N_CTX < n_prompt + ASKED
    r = oai.chat.completions.create(model=MODEL, messages=user(COUNTING), max_tokens=ASKED, temperature=0,
                                    logprobs=True)
    [choice] = r.choices
    assert choice.finish_reason == "length"
    assert r.usage.prompt_tokens == n_prompt
    assert r.usage.completion_tokens == len(choice.logprobs.content) == N_CTX - n_prompt  # the context, full
    assert r.usage.total_tokens == N_CTX


def test_chat_max_completion_tokens_streamed_and_n2_are_clamped_too(oai):
    n_prompt = prompt_tokens(oai, COUNTING)
    stream = oai.chat.completions.create(model=MODEL, messages=user(COUNTING), max_completion_tokens=ASKED, n=2,
                                         temperature=0, stream=True, stream_options={"include_usage": True})
    finished, usage = {}, None
    for chunk in stream:
        for c in chunk.choices:
            if c.finish_reason:
                finished[c.index] = c.finish_reason
        usage = chunk.usage or usage
    assert finished == {0: "length", 1: "length"}
    assert usage.prompt_tokens == n_prompt and usage.completion_tokens == 2 * (N_CTX - n_prompt)  # each fills it


def test_chat_prompt_over_the_context_is_still_a_400(oai):
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as e:
            oai.chat.completions.create(model=MODEL, messages=user(LONG), max_tokens=5, stream=stream)
        assert e.value.status_code == 400 and e.value.code == "context_length_exceeded"
        assert e.value.body["param"] == "messages" and f"maximum context length is {N_CTX} tokens" in e.value.message


# --- completions -----------------------------------------------------------------------------------


def test_completions_clamp_each_prompt_to_its_own_room(oai, vocab):
    """Two prompts of 480 and 496 tokens in one request: each choice ends at its own context's end."""
    ids = vocab.tokenize(counting(200))
    r = oai.completions.create(model=MODEL, prompt=[ids[:480], ids[:496]], max_tokens=ASKED, temperature=0, logprobs=0)
    assert [c.finish_reason for c in r.choices] == ["length", "length"]
    assert [len(c.logprobs.tokens) for c in r.choices] == [N_CTX - 480, N_CTX - 496]
    assert r.usage.prompt_tokens == 976 and r.usage.completion_tokens == 2 * N_CTX - 976


def test_completions_at_the_edge_one_token_fits_and_none_is_a_400(oai, vocab):
    ids = vocab.tokenize(counting(200))
    stream = oai.completions.create(model=MODEL, prompt=ids[:N_CTX - 1], max_tokens=ASKED, temperature=0, stream=True,
                                    stream_options={"include_usage": True})
    chunks = list(stream)
    assert [c.finish_reason for chunk in chunks for c in chunk.choices if c.finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens == 1 and chunks[-1].usage.total_tokens == N_CTX
    with pytest.raises(openai.BadRequestError) as e:
        oai.completions.create(model=MODEL, prompt=ids[:N_CTX], max_tokens=1)
    assert e.value.code == "context_length_exceeded" and e.value.body["param"] == "prompt"
    assert f"the prompt has {N_CTX} tokens" in e.value.message


# --- the Responses API -----------------------------------------------------------------------------


def test_responses_end_incomplete_at_the_context_streamed_and_not(oai):
    n_prompt = prompt_tokens(oai, COUNTING)
    r = oai.responses.create(model=MODEL, input=COUNTING, max_output_tokens=ASKED, temperature=0, store=False)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.input_tokens == n_prompt and r.usage.total_tokens == N_CTX
    events = list(oai.responses.create(model=MODEL, input=COUNTING, max_output_tokens=ASKED, temperature=0,
                                       store=False, stream=True))
    assert events[-1].type == "response.incomplete"  # the SDK's stream helper waits for a response.completed
    final = events[-1].response
    assert final.status == "incomplete" and final.incomplete_details.reason == "max_output_tokens"
    assert final.usage.input_tokens == n_prompt and final.usage.output_tokens == N_CTX - n_prompt
    assert final.output_text == r.output_text


def test_a_responses_continuation_is_clamped_and_one_past_the_context_refused(oai):
    first = oai.responses.create(model=MODEL, input="Say hello.", max_output_tokens=8, temperature=0)
    r = oai.responses.create(model=MODEL, previous_response_id=first.id, input=counting(106), max_output_tokens=ASKED,
                             temperature=0)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.input_tokens > first.usage.total_tokens and r.usage.total_tokens == N_CTX
    with pytest.raises(openai.BadRequestError) as e:  # that conversation, and more, has no room left
        oai.responses.create(model=MODEL, previous_response_id=r.id, input=COUNTING, max_output_tokens=ASKED)
    assert e.value.code == "context_length_exceeded" and e.value.body["param"] == "input"


# --- the Anthropic Messages API --------------------------------------------------------------------


def test_messages_stop_at_the_context_window_not_at_max_tokens(claude):
    n_prompt = claude.messages.count_tokens(model=MODEL, messages=user(COUNTING)).input_tokens
    m = claude.messages.create(model=MODEL, max_tokens=ASKED, messages=user(COUNTING), extra_body=GREEDY)
    assert m.stop_reason == "model_context_window_exceeded" and m.stop_sequence is None
    assert m.usage.input_tokens == n_prompt and m.usage.output_tokens == N_CTX - n_prompt
    with claude.messages.stream(model=MODEL, max_tokens=ASKED, messages=user(COUNTING), extra_body=GREEDY) as s:
        streamed = s.get_final_message()
    assert streamed.stop_reason == "model_context_window_exceeded"
    assert (streamed.usage.input_tokens, streamed.usage.output_tokens) == (n_prompt, N_CTX - n_prompt)
    assert streamed.content[0].text == m.content[0].text
    # asking exactly what is left: max_tokens is what ended it (it fills the context too)
    exact = claude.messages.create(model=MODEL, max_tokens=N_CTX - n_prompt, messages=user(COUNTING), extra_body=GREEDY)
    assert exact.stop_reason == "max_tokens" and exact.usage.output_tokens == N_CTX - n_prompt


def test_messages_prompt_over_the_context_is_anthropics_prompt_too_long(claude):
    n_prompt = claude.messages.count_tokens(model=MODEL, messages=user(LONG)).input_tokens
    assert n_prompt >= N_CTX
    for stream in (False, True):
        with pytest.raises(anthropic.BadRequestError) as e:
            claude.messages.create(model=MODEL, max_tokens=ASKED, messages=user(LONG), stream=stream)
        assert e.value.status_code == 400
        assert e.value.body == {"type": "error", "error": {
            "type": "invalid_request_error", "message": f"prompt is too long: {n_prompt} tokens > {N_CTX - 1} maximum"}}


def test_n_ctx_set_past_the_training_length_is_taken_as_asked():
    """SmolLM2 trained at 8,192 tokens; a coding agent's prompt (Claude Code's is 20k) needs more, and
    llama.cpp serves past the training length when told to: N_CTX set is taken as asked, the
    catalogue's default stays capped."""
    from gguf_serve.model import Model

    trained = Model(smollm2_path(), n_ctx=512).n_ctx_train  # a vocabulary-only load has none
    asked = Model(smollm2_path(), n_ctx=trained + 1024, past_training=True)
    assert asked.n_ctx == trained + 1024
    assert Model(smollm2_path(), n_ctx=trained + 1024).n_ctx == trained


# --- MAX_TOKENS: the operator's cap ----------------------------------------------------------------


def test_max_tokens_setting_lowers_what_a_request_asks_on_each_api():
    """MAX_TOKENS=8 (llama-server's --n-predict): 32000 asked, or none, gets 8; 3 asked gets 3."""
    s = Server({"N_THREADS": "2", "N_CTX": str(N_CTX), "PARALLEL": "1", "MAX_TOKENS": "8"}).wait_ready()
    try:
        oai = openai.OpenAI(base_url=f"{s.url}/v1", api_key="unused", max_retries=0, timeout=600)
        for asked, got in ((ASKED, 8), (None, 8), (3, 3)):
            r = oai.chat.completions.create(model=MODEL, messages=user(COUNTING), temperature=0,
                                            **({"max_tokens": asked} if asked else {}))
            assert (r.choices[0].finish_reason, r.usage.completion_tokens) == ("length", got)
        r = oai.responses.create(model=MODEL, input=COUNTING, max_output_tokens=ASKED, temperature=0, store=False)
        assert r.incomplete_details.reason == "max_output_tokens" and r.usage.output_tokens == 8
        claude = anthropic.Anthropic(base_url=s.url, api_key="unused", max_retries=0, timeout=600)
        m = claude.messages.create(model=MODEL, max_tokens=ASKED, messages=user(COUNTING), extra_body=GREEDY)
        assert (m.stop_reason, m.usage.output_tokens) == ("max_tokens", 8)
    finally:
        s.stop()
