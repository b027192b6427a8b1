"""The core service through a real granian process, the real SmolLM2 GGUF and the real SDKs."""

import json
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from conftest import MODEL, ROOT, refused_start, smollm2_path
HELLO = [{"role": "user", "content": "Say hello."}]


# --- /v1/models ---


def test_models_list_has_openai_shape(base_url):
    r = httpx.get(f"{base_url}/v1/models")
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list"
    [card] = body["data"]
    assert card["id"] == MODEL and card["object"] == "model" and card["owned_by"] == "local"
    assert isinstance(card["created"], int) and card["root"] == MODEL
    assert "permission" in card and "parent" in card


def test_models_with_sdk(client):
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    assert client.models.retrieve("smollm2").id == MODEL  # an alias
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


# --- chat ---


def test_chat_answers_with_openai_shape(client):
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=40, temperature=0)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == MODEL
    [choice] = r.choices
    assert choice.index == 0 and choice.message.role == "assistant"
    assert "hello" in choice.message.content.lower()
    assert choice.finish_reason == "stop"  # ended by <|im_end|>, which never shows in the text
    assert "<|im_end|>" not in choice.message.content
    assert r.usage.completion_tokens < 40
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_usage_counts_with_the_models_tokenizer(client, base_url):
    from gguf_serve.model import Model

    prompt = httpx.post(f"{base_url}/apply-template", json={"model": MODEL, "messages": HELLO}).json()["prompt"]
    vocab = Model(smollm2_path(), vocab_only=True)
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5, temperature=0)
    assert r.usage.prompt_tokens == len(vocab.tokenize(prompt, special=True))
    assert r.usage.completion_tokens == 5


def test_finish_reason_length_when_the_limit_ends_it(client):
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Write a long story about a dragon."}], max_tokens=7
    )
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 7


def test_chat_stream_sse_shape(base_url):
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 40, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{base_url}/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert all("usage" not in c for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert "hello" in text.lower()


def test_stream_equals_non_stream_with_sdk(client):
    kwargs = dict(model=MODEL, messages=HELLO, max_tokens=30, temperature=0)
    whole = client.chat.completions.create(**kwargs).choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kwargs))
    assert streamed == whole


def test_chinese_round_trips(client):
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "请解释人工智能的概念"}], max_tokens=20, temperature=0
    )
    assert r.choices[0].message.content  # decoded as UTF-8, no replacement characters
    assert "\ufffd" not in r.choices[0].message.content


# --- completions ---


def test_completion_defaults_to_16_tokens(client):
    r = client.completions.create(model=MODEL, prompt="Once upon a time, in a land far away,", temperature=0)
    assert r.id.startswith("cmpl-") and r.object == "text_completion"
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 16
    assert r.choices[0].text


def test_completion_stream(client):
    kwargs = dict(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(stream=True, **kwargs))
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].object == "text_completion"
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason == "length"


# --- errors ---


def test_wrong_model_is_404_model_not_found(client, base_url):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=HELLO)
    assert e.value.code == "model_not_found"
    r = httpx.post(f"{base_url}/v1/completions", json={"model": "other", "prompt": "x"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


BAD_REQUESTS = [
    # body, the param the error must name
    (b'{"model": "smollm2", "messages": [', None),
    (b'\xff\xfe\x00', None),
    (b"[]", None),
    (json.dumps({"messages": HELLO}).encode(), None),  # no model
    (json.dumps({"model": MODEL}).encode(), "messages"),  # no messages
    (json.dumps({"model": MODEL, "messages": []}).encode(), "messages"),
    (json.dumps({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}).encode(), "messages[0].role"),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": 5}]}).encode(), "messages[0].content"),
    (json.dumps({"model": MODEL, "messages": [{"role": "user"}]}).encode(), "messages[0].content"),
    (json.dumps({"model": MODEL, "messages": HELLO, "max_tokens": 0}).encode(), "max_tokens"),
    (json.dumps({"model": MODEL, "messages": HELLO, "max_tokens": -3}).encode(), "max_tokens"),
    (json.dumps({"model": MODEL, "messages": HELLO, "max_tokens": "5"}).encode(), "max_tokens"),
    (json.dumps({"model": MODEL, "messages": HELLO, "temperature": "hot"}).encode(), "temperature"),
    (json.dumps({"model": MODEL, "messages": HELLO, "stream": "yes"}).encode(), "stream"),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}).encode(),
     "messages[0].content[0]"),
]


@pytest.mark.parametrize("body,param", BAD_REQUESTS)
def test_bad_chat_requests_get_openai_shaped_400(base_url, body, param):
    r = httpx.post(f"{base_url}/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]
    if param:
        assert error["param"] == param


def test_a_missing_field_is_worded_as_openai_words_it_and_the_server_keeps_serving(base_url):
    r = httpx.post(f"{base_url}/v1/chat/completions", json={"model": MODEL, "messages": [{"content": "x"}]})
    assert r.status_code == 400 and r.json()["error"] == {
        "message": "Missing required parameter: 'messages[0].role'.", "type": "invalid_request_error",
        "param": "messages[0].role", "code": "missing_required_parameter"}
    ok = httpx.post(f"{base_url}/v1/chat/completions", json={"model": MODEL, "messages": HELLO, "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


def test_bad_request_with_sdk_and_server_keeps_serving(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[], max_tokens=5)
    assert e.value.body["param"] == "messages"
    assert client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3, temperature=0).usage.completion_tokens == 3


def test_unknown_route_and_method_are_openai_shaped_logged_and_counted(server, base_url):
    counted = server.metric("gguf_requests_total")
    r = httpx.get(f"{base_url}/v1/nothing", headers={"x-request-id": "lost-404"})
    assert r.status_code == 404 and r.json()["error"]["message"] and r.headers["x-request-id"] == "lost-404"
    r = httpx.delete(f"{base_url}/v1/models", headers={"x-request-id": "wrong-405"})
    assert r.status_code == 405 and r.json()["error"]["message"] and r.headers["x-request-id"] == "wrong-405"
    assert server.metric("gguf_requests_total") >= counted + 2
    deadline = time.monotonic() + 5
    while "wrong-405" not in server.output() and time.monotonic() < deadline:  # the log line follows the answer
        time.sleep(0.02)
    lines = [json.loads(line) for line in server.output().splitlines() if line.startswith("{")]
    assert {(e.get("request_id"), e.get("status")) for e in lines} >= {("lost-404", 404), ("wrong-405", 405)}


# --- the event loop never waits on the model ---


def test_models_and_health_answer_while_a_long_generation_runs(base_url):
    done = threading.Event()

    def generate():
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 400,
                "temperature": 0, "stream": False}
        httpx.post(f"{base_url}/v1/chat/completions", json={**body, "ignore": True}, timeout=120)
        done.set()

    thread = threading.Thread(target=generate)
    thread.start()
    try:
        assert not done.wait(0.5)  # generation is under way
        for _ in range(20):
            assert httpx.get(f"{base_url}/v1/models", timeout=2).status_code == 200
            assert httpx.get(f"{base_url}/health", timeout=2).json() == {"status": "ok"}
        assert not done.is_set()  # all 40 answers came back while the model was busy generating
    finally:
        thread.join()


# --- LangChain ---


def test_langchain_invoke_and_stream(base_url):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=f"{base_url}/v1", api_key="unused", model=MODEL, temperature=0, max_tokens=30)
    answer = llm.invoke("Say hello.")
    assert "hello" in answer.content.lower()
    streamed = "".join(chunk.content for chunk in llm.stream("Say hello."))
    assert streamed == answer.content


# --- startup ---


def test_a_refused_start_exits_non_zero_with_one_line():
    """What create_app refuses (tests/unit/test_refusals.py has every case, in process) stops
    granian's worker with one line, not a traceback, and the process exits non-zero."""
    line, output = refused_start({"MODEL": "no-such-model"})
    assert "no-such-model" in line and "qwen-7b-chat" in line  # lists the catalogue's keys
    assert "Traceback" not in output


def test_threads_default_to_the_cores_this_process_may_use():
    code = "import os; os.sched_setaffinity(0, {0}); from gguf_serve import config; print(config.available_cpus())"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "1"
