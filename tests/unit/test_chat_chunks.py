"""A streamed token's chunk from its pre-encoded ends is byte for byte the chunk the structs make."""

import msgspec
from hypothesis import given
from hypothesis import strategies as st

from gguf_serve.chat import encode_chunk, text_chunk_ends
from gguf_serve.protocol import ChunkChoice, Delta


@given(text=st.text(min_size=1), index=st.integers(0, 8),
       model=st.sampled_from(["SmolLM2-135M-Instruct", 'a "quoted" \\ name', "\x00", "nul\x00in the name", "é🙂"]))
def test_text_chunk_from_its_ends_equals_the_struct_encoding(text, index, model):
    head = dict(id="chatcmpl-0123", object="chat.completion.chunk", created=1700000000, model=model)
    before, after = text_chunk_ends(head, index)
    assert before + msgspec.json.encode(text) + after == encode_chunk(head, ChunkChoice(index=index, delta=Delta(content=text)))
