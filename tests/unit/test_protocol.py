"""Request decoding: strict types, OpenAI-shaped errors that name the field."""

import pytest

from gguf_serve.bodies import decode
from gguf_serve.errors import APIError, error_body
from gguf_serve.protocol import ChatRequest, CompletionRequest


@pytest.mark.parametrize("body,param", [
    (b'{"model": "m", "messages": []}', "messages"),
    (b'{"model": "m", "messages": [{"role": "wizard", "content": "x"}]}', "messages[0].role"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"}', "temperature"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 2.5}', "temperature"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 9}', "n"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": ["a", "b", "c", "d", "e"]}', "stop"),
])
def test_bad_fields_are_400_naming_the_field(body, param):
    with pytest.raises(APIError) as e:
        decode(body, ChatRequest)
    assert e.value.status == 400 and e.value.param == param


@pytest.mark.parametrize("body,param", [
    (b'{"messages": [{"role": "user", "content": "x"}]}', "model"),  # as the fleet's proxy names it too
    (b'{"model": "m"}', "messages"),
    (b'{"model": "m", "messages": [{"content": "x"}]}', "messages[0].role"),
    (b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {}}]}',
     "tools[0].function.name"),
])
def test_a_missing_field_is_worded_as_openai_words_it(body, param):
    with pytest.raises(APIError) as e:
        decode(body, ChatRequest)
    assert (e.value.message, e.value.param, e.value.code) == (
        f"Missing required parameter: '{param}'.", param, "missing_required_parameter")


@pytest.mark.parametrize("body", [b"{", b'{"model": "m", "prompt": "\xff"}', b"[]"])
def test_invalid_json_is_400(body):
    with pytest.raises(APIError) as e:
        decode(body, CompletionRequest)
    assert e.value.status == 400


def test_unknown_fields_are_ignored():
    body = decode(b'{"model": "m", "prompt": "x", "store": true, "metadata": {"a": 1}}', CompletionRequest)
    assert body.prompt == "x"


def test_error_body_shape():
    error = error_body(APIError(429, "busy", None, "queue_full")).error
    assert (error.type, error.code, error.param) == ("rate_limit_exceeded", "queue_full", None)
    assert error_body(APIError(503, "x")).error.type == "server_error"
    assert error_body(APIError(404, "x")).error.type == "invalid_request_error"
