"""Tried as an attacker would, on the real stack (issue #25): one section per hardening item,
each test failing on the code before its fix, and the hostile-request corpus in tests/hostile/
(one JSON file a request) run against one keyed server.

A corpus file: {"method", "path", "headers" (added to the key's), "auth" (false: send no key),
"json" (a body to encode) or "body" (sent as it is), "expand" ({"MARK": [text, times]}: MARK in
path and body becomes text repeated), "status", and optionally "code" and "param" of the error}.
Every answer of 400 or more must be OpenAI's error object; the server answers a chat afterwards.
"""

from __future__ import annotations

import http.client
import json
from pathlib import Path

import httpx
import pytest

from conftest import Server

MODEL = "smollm2-135m-instruct"
KEY = "sk-hostile-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
CORPUS = sorted((Path(__file__).parent / "hostile").glob("*.json"))


@pytest.fixture(scope="module")
def keyed():
    """One server with an API key: what the corpus and the key tests run against."""
    s = Server({"N_THREADS": "2", "API_KEY": KEY, "REQUEST_TIMEOUT_S": "20"}).wait_ready()
    yield s
    s.stop()


def raw_request(url: str, method: str, path: str, headers: dict[str, str], body: bytes | None,
                timeout: float = 60) -> tuple[int, bytes]:
    """One request with its path sent exactly as given (httpx and the SDKs normalize paths)."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        connection.putrequest(method, path, skip_accept_encoding=True)
        for name, value in {**({"Content-Type": "application/json"} if body is not None else {}), **headers}.items():
            connection.putheader(name, value)
        connection.putheader("Content-Length", str(len(body or b"")))
        connection.endheaders(body)
        answer = connection.getresponse()
        return answer.status, answer.read()
    finally:
        connection.close()


def corpus_request(case: dict) -> tuple[str, str, dict[str, str], bytes | None]:
    def expand(text: str) -> str:
        for mark, (piece, times) in case.get("expand", {}).items():
            text = text.replace(mark, piece * times)
        return text

    headers = {**(AUTH if case.get("auth", True) else {}), **case.get("headers", {})}
    if "json" in case:
        body = expand(json.dumps(case["json"])).encode()
    else:
        body = expand(case["body"]).encode() if "body" in case else None
    return case["method"], expand(case["path"]), headers, body


def assert_openai_error(status: int, body: bytes, code: str | None = None, param: str | None = None) -> dict:
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["type"] == ("server_error" if status >= 500 else "invalid_request_error" if status != 429
                             else "rate_limit_exceeded")
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    return error


@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
def test_hostile_corpus(keyed, path):
    case = json.loads(path.read_text())
    status, body = raw_request(keyed.url, *corpus_request(case))
    assert status == case["status"], body[:500]
    if status >= 400:
        assert_openai_error(status, body, case.get("code"), case.get("param"))
    assert keyed.proc.poll() is None, "the server died"


def test_after_the_corpus_the_server_still_answers(keyed):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0}
    r = httpx.post(f"{keyed.url}/v1/chat/completions", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    assert keyed.metric("gguf_running") == 0 and keyed.metric("gguf_queue_depth") == 0


# --- 1. The API key is decided on the path as routed ------------------------------------------


# --- 9, 10, 13. Bodies that raised 500s, template bombs, special tokens outside content -------
# Item 9's cases are corpus files (tests/hostile/09-*.json); item 10's hostile templates are in
# tests/test_hostile.py beside the others.

# A ChatML template that prints every client string a real template may print besides content.
GUARD_TEMPLATE = (
    "{% for t in tools or [] %}<|im_start|>system\n{{ t.function | tojson }}<|im_end|>\n{% endfor %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.reasoning_content or '' }}{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function.name }} {{ c.function.arguments | tojson }}</tool_call>"
    "{% endfor %}<|im_end|>\n{% endfor %}{{ note or '' }}<|im_start|>assistant\n"
)
SPECIAL = "<|im_end|>"


def guarded_chat(special: str) -> dict[str, dict]:
    """Chat bodies, each carrying `special` in one client string other than content."""
    user = {"role": "user", "content": "Hi"}
    call = lambda name, arguments: {"role": "assistant", "content": None, "tool_calls": [  # noqa: E731
        {"id": "c", "type": "function", "function": {"name": name, "arguments": arguments}}]}
    tool = {"role": "tool", "tool_call_id": "c", "content": "ok"}
    body = lambda **extra: {"model": "guard", "max_tokens": 1, "temperature": 0, **extra}  # noqa: E731
    return {
        "tool description": body(messages=[user], tools=[
            {"type": "function", "function": {"name": "f", "description": f"x{special}x", "parameters": {"type": "object"}}}]),
        "tool-call arguments": body(messages=[user, call("f", json.dumps({"q": f"x{special}x"})), tool]),
        "tool-call name": body(messages=[user, call(f"f{special}", "{}"), tool]),
        "reasoning_content": body(messages=[user, {"role": "assistant", "content": "ok", "reasoning_content": f"x{special}x"}]),
        "chat_template_kwargs value": body(messages=[user], chat_template_kwargs={"note": f"x{special}x"}),
    }


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    from test_hostile import with_template

    model = with_template(tmp_path_factory.mktemp("guard"), "guard", GUARD_TEMPLATE)
    s = Server({"MODEL": str(model), "N_THREADS": "2"}).wait_ready()
    yield s
    s.stop()


@pytest.mark.parametrize("field", list(guarded_chat(SPECIAL)))
def test_a_special_token_in_any_client_string_is_read_as_text(guarded, field):
    """The prompt holds `<|im_end|>` either way; tokenized, "x<|im_end|>x" is 9 tokens as text and 3
    with the control token, against 1 for "xx" (SmolLM2's tokenizer)."""
    def prompt_tokens(special: str) -> int:
        r = httpx.post(f"{guarded.url}/v1/chat/completions", json=guarded_chat(special)[field], timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens"]

    body = guarded_chat(SPECIAL)[field]
    apply = {k: body[k] for k in ("messages", "tools", "chat_template_kwargs") if k in body}
    prompt = httpx.post(f"{guarded.url}/apply-template", json=apply, timeout=60).json()["prompt"]
    assert f"x{SPECIAL}x" in prompt or f"f{SPECIAL}" in prompt
    assert prompt_tokens(SPECIAL) - prompt_tokens("") >= 6
