"""/v1/embeddings' cap on the tokens of one request, all inputs together (EMBEDDINGS_MAX_TOKENS)."""

import pytest

from gguf_serve.embeddings_api import check_total
from gguf_serve.errors import APIError


def test_all_inputs_together_within_the_cap_pass():
    check_total([[1] * 60, [2] * 40], 100)


def test_more_is_a_400_naming_input_in_openais_words():
    with pytest.raises(APIError) as e:
        check_total([[1] * 60, [2] * 41], 100)
    assert (e.value.status, e.value.param, e.value.code) == (400, "input", "max_tokens_per_request")
    assert e.value.message.startswith("Requested 101 tokens, max 100 tokens per request")
