"""/v1/embeddings' pure logic: `input` in each of OpenAI's shapes to tokens (and every refusal a
400 naming the input), `dimensions`, normalisation, base64."""

import base64

import numpy as np
import pytest

from gguf_serve.embeddings_api import check_dimensions, encoded, input_tokens, normalized, shortened
from gguf_serve.bodies import decode
from gguf_serve.errors import APIError
from gguf_serve.protocol import EmbeddingRequest


def tokenize(text: str) -> list[int]:
    return [ord(c) for c in text]  # a stand-in tokenizer: one token a character


def tokens(given, n_vocab=1000, limit=10):
    return input_tokens(given, tokenize, n_vocab, limit)


def refusal(given, **kwargs) -> APIError:
    with pytest.raises(APIError) as e:
        tokens(given, **kwargs)
    assert e.value.status == 400
    return e.value


def test_each_of_openais_input_shapes():
    assert tokens("ab") == [[97, 98]]
    assert tokens(["ab", "c"]) == [[97, 98], [99]]
    assert tokens([5, 6, 7]) == [[5, 6, 7]]
    assert tokens([[5, 6], [7]]) == [[5, 6], [7]]


def test_empty_inputs_are_400_naming_them():
    assert refusal("").param == "input"
    assert refusal(["a", ""]).param == "input[1]"
    assert refusal([[1], []]).param == "input[1]"


def test_mixed_kinds_are_400():
    assert refusal(["a", [1]]).param == "input[1]"
    assert refusal([[1], "a"]).param == "input[1]"
    assert refusal([[1], 2]).param == "input[1]"
    assert refusal([1, [2]]).param == "input[0]"


def test_ids_outside_the_vocabulary_point_at_langchains_setting():
    e = refusal([[1, 100_000]])  # what OpenAIEmbeddings sends by default: tiktoken's ids
    assert e.param == "input[0]" and "check_embedding_ctx_length=False" in e.message
    assert refusal([-1]).param == "input"


def test_an_input_longer_than_the_context_names_its_index():
    e = refusal(["short", "x" * 11], limit=10)
    assert e.param == "input[1]" and e.code == "context_length_exceeded" and "11 tokens" in e.message
    assert tokens("x" * 10, limit=10) == [[120] * 10]


def test_the_request_struct_bounds_input_and_format():
    assert decode(b'{"model": "m", "input": [[1, 2], [3]]}', EmbeddingRequest).input == [[1, 2], [3]]
    for body, param in [(b'{"model": "m", "input": []}', "input"), (b'{"model": "m"}', "input"),
                        (b'{"model": "m", "input": "a", "encoding_format": "hex"}', "encoding_format"),
                        (b'{"model": "m", "input": "a", "dimensions": 0}', "dimensions"),
                        (b'{"model": "m", "input": [' + b",".join([b'"a"'] * 2049) + b"]}", "input")]:
        with pytest.raises(APIError) as e:
            decode(body, EmbeddingRequest)
        assert e.value.status == 400 and e.value.param == param


def test_dimensions_shorten_and_renormalise_only_where_the_model_allows():
    check_dimensions(None, 8, False)
    check_dimensions(8, 8, False)
    for dims, matryoshka in [(4, False), (9, True)]:
        with pytest.raises(APIError) as e:
            check_dimensions(dims, 8, matryoshka)
        assert e.value.status == 400 and e.value.param == "dimensions"
    check_dimensions(4, 8, True)
    v = np.stack([normalized(np.arange(1, 9, dtype=np.float32))])
    short = shortened(v, 4)
    assert short.shape == (1, 4) and np.isclose(np.linalg.norm(short[0]), 1)
    assert np.allclose(short[0], normalized(v[0, :4]))


def test_normalised_and_base64_as_the_sdk_decodes_it():
    v = normalized(np.array([3, 4], dtype=np.float32))
    assert np.allclose(v, [0.6, 0.8])
    assert not normalized(np.zeros(3, dtype=np.float32)).any()  # zero stays zero, no NaN
    assert np.array_equal(np.frombuffer(base64.b64decode(encoded(v, "base64")), dtype="float32"), v)
    assert encoded(v, "float") == v.tolist()
