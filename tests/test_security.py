"""Tried as an attacker would, on the real stack (issue #25): one section per hardening item,
each test failing on the code before its fix, and the hostile-request corpus in tests/hostile/
(one JSON file a request) run against one keyed server.

A corpus file: {"method", "path", "headers" (added to the key's), "auth" (false: send no key),
"json" (a body to encode) or "body" (sent as it is), "expand" ({"MARK": [text, times]}: MARK in
path and body becomes text repeated), "compress" (gzip, deflate or zstd: the body, expanded, is
sent in that coding, with its Content-Encoding unless "headers" names one), "status", optionally
"code" and "param" of the error, and "absent_headers" (names the answer must not carry)}.
Every answer of 400 or more must be OpenAI's error object; the server answers a chat afterwards.
"""

from __future__ import annotations

import gzip
import http.client
import json
import re
import threading
import time
import zlib
from pathlib import Path

import httpx
import pytest
import zstandard

from conftest import MODEL, Server, refused_start, smollm2_path, with_template
from gguf_serve.model import Model

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
                timeout: float = 60) -> tuple[int, bytes, dict[str, str]]:
    """One request with its path sent exactly as given (httpx and the SDKs normalize paths): the
    answer's status, body and headers (names lowercased)."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        connection.putrequest(method, path, skip_accept_encoding=True)
        for name, value in {**({"Content-Type": "application/json"} if body is not None else {}), **headers}.items():
            connection.putheader(name, value)
        connection.putheader("Content-Length", str(len(body or b"")))
        connection.endheaders(body)
        answer = connection.getresponse()
        return answer.status, answer.read(), {name.lower(): value for name, value in answer.getheaders()}
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
    if coding := case.get("compress"):
        body = {"gzip": gzip.compress, "deflate": zlib.compress, "zstd": zstandard.compress}[coding](body)
        headers = {"Content-Encoding": coding, **headers}
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
    status, body, headers = raw_request(keyed.url, *corpus_request(case))
    assert status == case["status"], body[:500]
    assert not set(case.get("absent_headers", [])) & set(headers), headers
    if status >= 400:
        assert_openai_error(status, body, case.get("code"), case.get("param"))
    assert keyed.proc.poll() is None, "the server died"


def test_after_the_corpus_the_server_still_answers(keyed):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0}
    r = httpx.post(f"{keyed.url}/v1/chat/completions", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    assert keyed.metric("gguf_running") == 0 and keyed.metric("gguf_queue_depth") == 0


# --- 1, 11, 12, 15. The key on the path as routed, admission, load failures, deploy defaults ---


def chat_body(**extra) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "temperature": 0, **extra}


@pytest.mark.parametrize("path", ["//v1/responses/{id}", "/%2Fv1/responses/{id}"])
def test_a_stored_response_is_read_with_the_key_only_however_the_path_is_spelled(keyed, path):
    made = httpx.post(f"{keyed.url}/v1/responses", json={"model": MODEL, "input": "Hi", "max_output_tokens": 2,
                                                        "temperature": 0}, headers=AUTH, timeout=60)
    path = path.format(id=made.json()["id"])
    status, body, _ = raw_request(keyed.url, "GET", path, {}, None)
    assert status == 401 and assert_openai_error(status, body, "invalid_api_key")
    status, body, _ = raw_request(keyed.url, "GET", path, AUTH, None)
    assert status == 200 and json.loads(body)["id"] == made.json()["id"]


def test_a_path_that_only_routes_to_a_route_is_named_by_it_in_the_metrics(keyed):
    def count(endpoint: str, status: str) -> float:
        return keyed.metric("gguf_requests_total", endpoint=endpoint, status=status)

    before = count("/v1/models/{model_id}", "200"), count("other", "401")
    assert raw_request(keyed.url, "GET", f"//v1/models/{MODEL}", AUTH, None)[0] == 200  # routed: its route's label
    assert raw_request(keyed.url, "GET", "//v1/models/any/thing", {}, None)[0] == 401  # refused unrouted: "other"
    assert (count("/v1/models/{model_id}", "200"), count("other", "401")) == (before[0] + 1, before[1] + 1)


@pytest.fixture(scope="module")
def one_place():
    """A keyed server that holds one request (PARALLEL=1, MAX_QUEUE=0) and lets /metrics be scraped without the key."""
    s = Server({"N_THREADS": "2", "API_KEY": KEY, "PARALLEL": "1", "MAX_QUEUE": "0", "PUBLIC_PATHS": "/metrics"}).wait_ready()
    yield s
    s.stop()


def test_template_and_token_counts_wait_their_turn_in_the_queue(one_place):
    """Rendering and tokenizing run in worker threads: unadmitted, they would pile up there unbounded."""
    url = one_place.url
    endless = chat_body(max_tokens=1000, stream=True, logit_bias={"0": -100, "2": -100})  # no end-of-text, no <|im_end|>
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=endless, headers=AUTH, timeout=60) as stream:
        lines = stream.iter_lines()  # kept: an iterator dropped closes the stream
        next(lines)  # it holds the one place
        for path, body in [("/apply-template", {"messages": [{"role": "user", "content": "Hi"}]}),
                           ("/v1/responses/input_tokens", {"model": MODEL, "input": "Hi"})]:
            r = httpx.post(f"{url}{path}", json=body, headers=AUTH, timeout=60)
            assert r.status_code == 429 and assert_openai_error(429, r.content, "queue_full"), path
    one_place.wait_metric("gguf_running", 0)
    r = httpx.post(f"{url}/apply-template", json={"messages": [{"role": "user", "content": "Hi"}]}, headers=AUTH, timeout=60)
    assert r.status_code == 200 and r.json()["prompt"].endswith("<|im_start|>assistant\n")


def test_metrics_and_openapi_need_the_key_unless_public_paths_names_them(keyed, one_place):
    for url, public in [(keyed.url, ()), (one_place.url, ("/metrics",))]:
        for path in ("/metrics", "/openapi.json"):
            r = httpx.get(f"{url}{path}", timeout=10)
            if path in public:
                assert r.status_code == 200
            else:
                assert r.status_code == 401 and assert_openai_error(401, r.content, "invalid_api_key")
                assert httpx.get(f"{url}{path}", headers=AUTH, timeout=10).status_code == 200


def test_a_model_whose_metadata_cant_be_read_stops_the_start_with_one_line(tmp_path):
    """A metadata key that is not UTF-8 (llama.cpp loads it; reading it raises UnicodeDecodeError):
    the process ends non-zero, saying why, rather than staying unready for ever."""
    garbled = tmp_path / "garbled.gguf"
    data = smollm2_path().read_bytes()
    assert data.count(b"general.license") == 1
    garbled.write_bytes(data.replace(b"general.license", b"general.licens\xff"))
    line, output = refused_start({"MODEL": str(garbled), "N_THREADS": "2"})
    assert str(garbled) in line and "UnicodeDecodeError" in line
    assert "Traceback" not in output


# --- 5, 6, 7, 8. Stored responses bounded and scoped; embeddings bounded ------------------------
# (metadata beyond OpenAI's limits and an embedding request of too many tokens: tests/hostile/05-*, 07-*)

K1, K2 = {"Authorization": "Bearer k1"}, {"Authorization": "Bearer k2"}


@pytest.fixture(scope="module")
def short_lived():
    """Stored responses live 3 s and hold 6 kB in all; an embedding may take 1 s."""
    s = Server({"N_THREADS": "2", "RESPONSES_STORE_TTL_S": "3", "RESPONSES_STORE_MAX_BYTES": "6000",
                "EMBEDDINGS_TIMEOUT_S": "1"}).wait_ready()
    yield s
    s.stop()


def create_response(url: str, headers: dict[str, str] | None = None, **fields) -> httpx.Response:
    body = {"model": MODEL, "input": "Say hi.", "max_output_tokens": 1, "temperature": 0, **fields}
    return httpx.post(f"{url}/v1/responses", json=body, headers=headers, timeout=60)


def test_a_stored_response_is_the_key_s_that_made_it(two_keys):
    url = two_keys.url
    made = create_response(url, K1).json()["id"]
    unknown = httpx.get(f"{url}/v1/responses/resp_unknown", headers=K1, timeout=10)
    assert unknown.status_code == 404
    for key in (K2, K1):  # another key: as for an id never stored; then its own key: the response
        got = httpx.get(f"{url}/v1/responses/{made}", headers=key, timeout=10)
        continued = create_response(url, key, previous_response_id=made)
        counted = httpx.post(f"{url}/v1/responses/input_tokens", headers=key, timeout=10,
                             json={"model": MODEL, "input": "And?", "previous_response_id": made})
        if key is K2:
            assert got.status_code == 404 and got.json()["error"]["code"] == unknown.json()["error"]["code"]
            assert got.json()["error"]["message"] == unknown.json()["error"]["message"].replace("resp_unknown", made)
            for r in (continued, counted):
                assert r.status_code == 404
                assert_openai_error(r.status_code, r.content, "previous_response_not_found", "previous_response_id")
            gone = httpx.delete(f"{url}/v1/responses/{made}", headers=K2, timeout=10)
            assert gone.status_code == 404 and gone.json() == got.json()
        else:
            assert got.status_code == 200 and got.json()["id"] == made
            assert continued.status_code == 200 and counted.status_code == 200
            assert httpx.delete(f"{url}/v1/responses/{made}", headers=K1, timeout=10).json()["deleted"]


def test_a_stored_response_read_since_still_expires(short_lived):
    """The first response, read after each new one is stored (so that a fresh one is always less
    recently used than it), still goes once its 3 s are up: the old store kept it as long as the
    reads went on. The cycles go on until it goes, however many a host's speed makes of the 3 s (a
    fixed count of them was all done within 3 s on a fast host), and it must not go before."""
    url = short_lived.url
    sent = time.monotonic()
    first = create_response(url).json()["id"]
    while True:
        assert create_response(url).status_code == 200
        read = httpx.get(f"{url}/v1/responses/{first}", timeout=10)
        if read.status_code == 404:
            break
        assert time.monotonic() < sent + 300, "a response read all along was never forgotten"
    assert time.monotonic() - sent >= 3  # finished after `sent`: forgotten for its age, not before it
    assert_openai_error(read.status_code, read.content, "response_not_found")


def test_a_response_larger_than_the_store_is_answered_not_kept(short_lived):
    metadata = {f"key{i}": "v" * 512 for i in range(16)}  # within OpenAI's limits, echoed: 8 kB, over the 6 kB store
    r = create_response(short_lived.url, metadata=metadata)
    assert r.status_code == 200 and r.json()["store"] is False
    assert httpx.get(f"{short_lived.url}/v1/responses/{r.json()['id']}", timeout=10).status_code == 404
    small = create_response(short_lived.url).json()
    assert small["store"] is True
    assert httpx.get(f"{short_lived.url}/v1/responses/{small['id']}", timeout=10).status_code == 200


def test_an_embedding_past_its_deadline_is_a_504_and_frees_its_place(short_lived):
    inputs = [" ".join([f"Line {i} of a long document about mountains."] * 40) for i in range(9)]  # ~3,600 tokens
    r = httpx.post(f"{short_lived.url}/v1/embeddings", json={"model": MODEL, "input": inputs}, timeout=120)
    assert r.status_code == 504, r.text[:300]
    assert "EMBEDDINGS_TIMEOUT_S" in assert_openai_error(r.status_code, r.content, "timeout")["message"]
    short_lived.wait_metric("gguf_running", 0)
    assert short_lived.metric("gguf_queue_depth") == 0
    after = httpx.post(f"{short_lived.url}/v1/embeddings", json={"model": MODEL, "input": "a"}, timeout=60)
    assert after.status_code == 200


# --- 2, 3. A schema's grammar and stop strings are bounded ------------------------------------

def nested(objects: int) -> dict:
    """A string inside `objects` nested objects: 1 + 2 x objects JSON levels (an object is two,
    itself and its `properties`)."""
    schema = {"type": "string"}
    for _ in range(objects):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


def enums(values: int) -> dict:
    """An object of enums of 256 values each (tools.MAX_ENUM), `values` values in all."""
    sizes = [256] * (values // 256) + ([values % 256] if values % 256 else [])
    return {"type": "object", "properties": {f"p{i}": {"enum": [f"v{j}" for j in range(n)]} for i, n in enumerate(sizes)}}


# (the largest accepted schema of a kind, the smallest refused one): tools.MAX_REPEAT, MAX_SCHEMA_DEPTH,
# MAX_PROPERTIES, MAX_ENUM, MAX_ALTERNATIVES and MAX_BRANCHES
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
    "alternatives": ({"anyOf": [{"type": "string"}] * 64}, {"anyOf": [{"type": "string"}] * 65}),
    "branches": (enums(1000), enums(1001)),
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
    answers; one step over it is a 400, before any grammar is built."""
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


def test_the_longest_stop_strings_still_stop_the_text(server):
    """Stop strings of the longest length allowed, one of them matching the whole answer but its
    last character: held back as it grows, then sent; one the answer ends with: cut there. On the
    session's server: without keyed's 20 s deadline, for answers compared whole."""
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Write a long story."}], "max_tokens": 30,
            "temperature": 0, "n": 2}
    text = post(server, "/v1/chat/completions", {**body, "n": 1}).json()["choices"][0]["message"]["content"]
    almost = text[:-1] + "#" * (1001 - len(text))
    for stops, answer, reason in (
        (["y" * 1000, almost, "z" * 1000, "\x00" * 1000], text, "length"),
        (["y" * 1000, almost, "z" * 1000, text[20:]], text[: text.find(text[20:])], "stop"),
    ):
        r = post(server, "/v1/chat/completions", {**body, "stop": stops})
        assert r.status_code == 200, r.text
        assert [(c["message"]["content"], c["finish_reason"]) for c in r.json()["choices"]] == [(answer, reason)] * 2


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


# --- Issue 34, items 1, 3 and 6: a grammar's work a token is bounded; the others never wait on it ---

AMBIGUOUS = {"type": "string", "pattern": "^(a?){0,300}$"}  # froze llama.cpp's grammar sampler for minutes


def hostile_grammars(schema: dict, tokens: int = 24) -> list[tuple[str, dict]]:
    """`schema` by every door to the output grammar: chat's json_schema, a forced tool's parameters,
    Responses' text.format, Messages' output_config.format."""
    chat = {"model": MODEL, "messages": [{"role": "user", "content": "Write a's."}], "max_tokens": tokens}
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"s": schema},
                                                                         "required": ["s"]}}}
    return [
        ("/v1/chat/completions", {**chat, "response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": schema}}}),
        ("/v1/chat/completions", {**chat, "tools": [tool], "tool_choice": "required"}),
        ("/v1/responses", {"model": MODEL, "input": "Write a's.", "max_output_tokens": tokens,
                           "text": {"format": {"type": "json_schema", "name": "t", "schema": schema}}}),
        ("/v1/messages", {"model": MODEL, "max_tokens": tokens, "messages": [{"role": "user", "content": "Write a's."}],
                          "output_config": {"format": {"type": "json_schema", "schema": schema}}}),
    ]


class Neighbour:
    """A streamed completion that never ends by itself (end-of-generation tokens banned), beside
    hostile requests: counts the tokens it gets, in a thread, until stopped."""

    def __init__(self, server):
        model = Model(smollm2_path(), vocab_only=True)
        never_ends = {str(t): -100 for t in range(model.n_vocab) if model.is_end_of_generation(t)}
        self.body = {"model": MODEL, "prompt": "Count: 1, 2, 3,", "max_tokens": 1500, "temperature": 0,
                     "stream": True, "logit_bias": never_ends}
        self.url, self.tokens, self.stopped, self.error = server.url, 0, threading.Event(), None
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        try:
            with httpx.stream("POST", f"{self.url}/v1/completions", json=self.body, headers=AUTH, timeout=300) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        self.tokens += 1
                    if self.stopped.is_set():
                        return
        except httpx.HTTPError as e:
            self.error = e

    def wait_for_tokens(self, more_than: int) -> int:
        """Polls until the stream has more than `more_than` tokens; a stream that stopped fails."""
        while self.tokens <= more_than:
            assert self.thread.is_alive() and self.error is None, f"the neighbour's stream ended: {self.error}"
            self.thread.join(0.05)
        return self.tokens

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(60)


@pytest.fixture
def neighbour(keyed):
    stream = Neighbour(keyed)
    stream.wait_for_tokens(0)
    yield stream
    stream.stop()


def test_an_ambiguous_pattern_is_answered_on_every_route_while_a_neighbour_streams(keyed, neighbour):
    """`^(a?){0,300}$` held the decode thread, and every stream, in llama.cpp's grammar for minutes.
    Now each route answers it (what it wrote follows the pattern), and the neighbour's stream got
    tokens while each of them ran: progress asserted, not a time."""
    for path, body in hostile_grammars(AMBIGUOUS):
        before = neighbour.tokens
        r = post(keyed, path, body)
        assert r.status_code == 200, (path, r.text)
        assert neighbour.wait_for_tokens(before) > before
        if path == "/v1/chat/completions" and "tools" not in body and r.json()["choices"][0]["finish_reason"] == "stop":
            assert re.fullmatch("a{0,300}", json.loads(r.json()["choices"][0]["message"]["content"]))
    assert keyed.proc.poll() is None


@pytest.mark.parametrize("name,schema", [
    ("5,000 strings", {"anyOf": [{"type": "string"}] * 5000}),
    ("5,000 consts", {"oneOf": [{"const": f"c{i}"} for i in range(5000)]}),
    ("20 enums of 256", enums(20 * 256)),
])
def test_unbounded_alternatives_are_refused_before_any_token(keyed, name, schema):
    """Accepted before, each of these stalled every other stream 5-9 s a token: now a 400 on every
    route, from the schema's own bounds, before any grammar is built."""
    params = ["response_format.json_schema.schema", "tools", "text.format.schema", "output_config.format.schema"]
    for (path, body), param in zip(hostile_grammars(schema), params):
        r = post(keyed, path, body)
        assert r.status_code == 400, (name, path, r.text)
        if path == "/v1/messages":
            assert r.json()["type"] == "error" and r.json()["error"]["type"] == "invalid_request_error"
        else:
            assert assert_openai_error(400, r.content, "unsupported_schema", param)


def test_a_remote_ref_is_refused_by_the_server_whatever_python_optimises(tmp_path):
    """A `$ref` to a URL was refused only by an `assert` in llama-cpp-python's converter: under
    PYTHONOPTIMIZE=1 the server fetched what the client named. A server run that way refuses it
    itself, before anything could be fetched."""
    server = Server({"N_THREADS": "2", "PYTHONOPTIMIZE": "1"}).wait_ready()
    try:
        for ref in ("https://127.0.0.1:9/schema.json", "file:///etc/passwd"):
            schema = {"type": "object", "properties": {"a": {"$ref": ref}}}
            r = httpx.post(f"{server.url}/v1/chat/completions", json=chat_schema(schema), timeout=60)
            error = assert_openai_error(400, r.content, "unsupported_schema", "response_format.json_schema.schema")
            assert "$ref" in error["message"]
    finally:
        server.stop()


def test_sigterm_ends_the_server_within_its_grace_while_hostile_grammars_run():
    """SIGTERM stopped the listening but never the process while the decode thread was in the
    grammar. With hostile grammars in flight the process now drains and exits."""
    server = Server({"N_THREADS": "2", "SHUTDOWN_GRACE_S": "2"}).wait_ready()
    try:
        threads = [threading.Thread(target=httpx.post, args=(f"{server.url}{path}",), daemon=True,
                                    kwargs={"json": body, "timeout": 120})
                   for path, body in hostile_grammars(AMBIGUOUS, tokens=1000)]
        for thread in threads:
            thread.start()
        server.wait_metric("gguf_running", len(threads))
        server.proc.terminate()
        assert server.proc.wait(60) == 0, server.output()
    finally:
        server.stop()


# --- Issue 34, item 7. What a client without a valid key learns ---------------------------------
# (/ready and the response store: tests/test_fleet_store.py; the fleet proxy: tests/test_deploy.py)


def test_only_a_refused_key_hides_the_instance(keyed, one_place):
    """x-instance-id (host:pid) is on every answer, probes and errors included, but a 401 for a
    missing or wrong key (tests/hostile/34-*): a client without a key learns nothing of the host."""
    for url, path, headers, status in ((keyed.url, "/v1/models", AUTH, 200), (keyed.url, "/v2/nothing", AUTH, 404),
                                       (keyed.url, "/health", {}, 200), (keyed.url, "/ready", {}, 200),
                                       (one_place.url, "/metrics", {}, 200)):  # a PUBLIC_PATHS name
        r = httpx.get(f"{url}{path}", headers=headers, timeout=10)
        assert r.status_code == status and r.headers["x-instance-id"].rpartition(":")[2].isdigit(), path
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"x-api-key": "wrong"}, {"Authorization": KEY}):
        r = httpx.get(f"{keyed.url}/v1/models", headers=headers, timeout=10)
        assert r.status_code == 401 and "x-instance-id" not in r.headers and "x-request-id" in r.headers


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
def test_an_unknown_model_is_echoed_cut_short(keyed, path):
    """As the fleet proxy's: the 404 names at most 256 characters of the model asked for, not the
    4 MB a body may hold (tests/hostile/34-model-name-4mb.json)."""
    for name in ("gpt-4o", "g" * 256, "g" * ((4 << 20) - 200)):
        body = {"model": name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
        r = httpx.post(f"{keyed.url}{path}", json=body, headers=AUTH, timeout=60)
        assert r.status_code == 404 and len(r.content) < 1000, r.content[:300]
        message = r.json()["error"]["message"]
        assert (f"`{name}` does not exist" in message if len(name) <= 256 else
                f"`{name[:256]}`... (cut to its first 256 of {len(name)} characters)" in message)
