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


# --- 2, 3. A schema's grammar and stop strings are bounded ------------------------------------

def nested(objects: int) -> dict:
    """A string inside `objects` nested objects: 1 + 2 x objects JSON levels (an object is two,
    itself and its `properties`)."""
    schema = {"type": "string"}
    for _ in range(objects):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


def strings(n: int) -> dict:
    return {"type": "object", "properties": {f"p{i}": {"type": "string", "maxLength": 1000} for i in range(n)}}


# (the largest accepted schema of a kind, the smallest refused one): tools.MAX_REPEAT, MAX_SCHEMA_DEPTH,
# MAX_PROPERTIES, MAX_ENUM and MAX_GRAMMAR_BYTES (13 strings of maxLength 1000 are estimated at 247 KB)
SCHEMA_BOUNDS = {
    "maxLength": ({"type": "string", "maxLength": 1000}, {"type": "string", "maxLength": 1001}),
    "minLength": ({"type": "string", "minLength": 1000}, {"type": "string", "minLength": 1001}),
    "maxItems": ({"type": "array", "items": {"type": "integer"}, "maxItems": 1000},
                 {"type": "array", "items": {"type": "integer"}, "maxItems": 1001}),
    "minItems": ({"type": "array", "items": {"type": "integer"}, "minItems": 1000},
                 {"type": "array", "items": {"type": "integer"}, "minItems": 1001}),
    "pattern": ({"type": "string", "pattern": "^a{0,1000}$"}, {"type": "string", "pattern": "^a{0,1001}$"}),
    "depth": (nested(31), nested(32)),  # 63 levels, 65
    "properties": ({"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(128)}},
                   {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(129)}}),
    "enum": ({"enum": [f"v{i}" for i in range(256)]}, {"enum": [f"v{i}" for i in range(257)]}),
    "size": (strings(13), strings(14)),
}


def chat_schema(schema: dict) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Answer in JSON."}], "max_tokens": 2,
            "temperature": 0, "response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": schema}}}


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, headers=AUTH, timeout=300)


def test_a_schema_that_segfaulted_is_refused_on_every_route(keyed):
    """`maxLength: 20000` became 20,000 nested groups, and llama.cpp's grammar parser overflowed
    the C stack (SIGSEGV): by chat's response_format, a forced tool's parameters, and Responses."""
    deep = {"type": "object", "properties": {"s": {"type": "string", "maxLength": 20000}}, "required": ["s"]}
    tool = {"name": "f", "parameters": deep}
    requests = [
        ("/v1/chat/completions", chat_schema(deep), "response_format.json_schema.schema"),
        ("/v1/chat/completions", {**chat_schema(deep), "response_format": None, "tools": [{"type": "function", "function": tool}],
                                  "tool_choice": "required"}, "tools"),
        ("/v1/responses", {"model": MODEL, "input": "Hi", "max_output_tokens": 2,
                           "text": {"format": {"type": "json_schema", "name": "t", "schema": deep}}}, "text.format.schema"),
    ]
    for path, body, param in requests:
        try:
            r = post(keyed, path, body)
        except httpx.TransportError as e:
            pytest.fail(f"{path} ({param}): no answer, the server died ({e}): exit {keyed.proc.wait(5)}")
        assert r.status_code == 400, r.text
        assert "maxLength" in assert_openai_error(400, r.content, "unsupported_schema", param)["message"]
    assert keyed.proc.poll() is None


@pytest.mark.parametrize("kind", SCHEMA_BOUNDS)
def test_the_largest_accepted_schema_compiles_and_one_more_is_refused(keyed, kind):
    """The bound's own schema compiles, in the request's check and in the decode thread, and
    answers; one step over it is a 400 that names the field, before any grammar is built."""
    largest, over = SCHEMA_BOUNDS[kind]
    r = post(keyed, "/v1/chat/completions", chat_schema(largest))
    assert r.status_code == 200, r.text
    r = post(keyed, "/v1/chat/completions", chat_schema(over))
    assert r.status_code == 400, r.text
    assert_openai_error(400, r.content, "unsupported_schema", "response_format.json_schema.schema")
    assert keyed.proc.poll() is None


def test_stop_strings_over_the_cap_are_refused_on_chat_and_completions(keyed):
    long = "x" * 1001  # protocol.MAX_STOP_CHARS + 1
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    completion = {"model": MODEL, "prompt": "Hi", "max_tokens": 2}
    for path, body in (("/v1/chat/completions", chat), ("/v1/completions", completion)):
        for stop, param in ((long, "stop"), (["a", long], "stop[1]")):
            r = post(keyed, path, {**body, "stop": stop})
            assert r.status_code == 400, r.text
            assert "1000" in assert_openai_error(400, r.content, param=param)["message"]


@pytest.fixture(scope="module")
def untimed():
    """A server without keyed's 20 s deadline, for answers compared whole."""
    s = Server({"N_THREADS": "2"}).wait_ready()
    yield s
    s.stop()


def test_the_longest_stop_strings_still_stop_the_text(untimed):
    """Stop strings of the longest length allowed, one of them matching the whole answer but its
    last character: held back as it grows, then sent; one the answer ends with: cut there."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Write a long story."}], "max_tokens": 30,
            "temperature": 0, "n": 2}
    text = post(untimed, "/v1/chat/completions", {**body, "n": 1}).json()["choices"][0]["message"]["content"]
    almost = text[:-1] + "#" * (1001 - len(text))
    for stops, answer, reason in (
        (["y" * 1000, almost, "z" * 1000, "\x00" * 1000], text, "length"),
        (["y" * 1000, almost, "z" * 1000, text[20:]], text[: text.find(text[20:])], "stop"),
    ):
        r = post(untimed, "/v1/chat/completions", {**body, "stop": stops})
        assert r.status_code == 200, r.text
        assert [(c["message"]["content"], c["finish_reason"]) for c in r.json()["choices"]] == [(answer, reason)] * 2
