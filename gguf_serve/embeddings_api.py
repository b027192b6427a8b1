"""POST /v1/embeddings: texts or token ids -> one L2-normalised vector each, computed in the
decode thread between generation steps (embedder.py).

Pooling: an embedding model (its GGUF gives `<arch>.pooling_type`: BERT-family encoders,
Qwen3-Embedding...) is pooled by llama.cpp in the graph, as the model defines it, each input
whole in one batch. A chat model has no pooling of its own: its last hidden state of every token
is read with embeddings switched on for that decode, and pooled here, by default the mean
(POOLING overrides): on SmolLM2 the mean separated paraphrases from unrelated sentences by 0.19
of cosine similarity on average over five pairs, the last token by 0.14. Pooled here, a long
input is computed in prompt-sized chunks through the KV cache like any prompt, and running
streams wait at most one chunk for it.

Same context, not a second one: a chat model embeds on its own context, in free sequences.
Measured with SmolLM2 (N_CTX 2048, PARALLEL 4, 2 threads), embedding 64 short texts cost that
context +25 MB (llama.cpp's output buffer: every token of an embedding batch is an output);
a second context with embeddings on cost +98 MB more (its own 2048-token KV cache, which for a
7B model is about 1 GiB) and was 10-20% faster on those texts (more sequences per batch), and
would still have to run in this one thread, since two threads decoding at once share the same
cores. The price of sharing: an embedding input takes a free sequence and forgets the prompt
that sequence had cached.
"""

from __future__ import annotations

import base64
import time
from typing import Callable

import numpy as np
from litestar import Request, Response

from . import lifecycle
from .embedder import EmbeddingJob, normalized
from .errors import APIError
from .loading import Served
from .protocol import EmbeddingData, EmbeddingList, EmbeddingRequest, EmbeddingUsage
from .runs import Choice, Run

TIKTOKEN_HINT = ("token ids are this model's own; LangChain's OpenAIEmbeddings sends OpenAI's (tiktoken's) unless "
                 "created with check_embedding_ctx_length=False")


# --- Inputs, pooling, encoding: pure logic ----------------------------------------------------


def input_tokens(given: str | list, tokenize: Callable[[str], list[int]], n_vocab: int, limit: int) -> list[list[int]]:
    """`input` as OpenAI takes it (a string, a list of strings, a list of token ids, a list of
    token-id lists) -> each input's tokens. Every refusal is a 400 naming the input."""
    if isinstance(given, str) or all(isinstance(x, int) for x in given):
        given, names = [given], ["input"]
    else:
        names = [f"input[{i}]" for i in range(len(given))]
    inputs = []
    for item, name in zip(given, names):
        if isinstance(item, int) or not isinstance(item, type(given[0])):  # ints here: mixed with lists
            raise APIError(400, "`input` mixes texts, token ids and token-id lists; send one kind", name)
        tokens = tokenize(item) if isinstance(item, str) else item
        if not tokens:
            raise APIError(400, f"`{name}` is empty; every input needs at least one token", name)
        if not isinstance(item, str) and not all(0 <= t < n_vocab for t in tokens):
            raise APIError(400, f"`{name}` holds a token id outside this model's vocabulary (0-{n_vocab - 1}): "
                                f"{TIKTOKEN_HINT}", name)
        if len(tokens) > limit:
            raise APIError(400, f"`{name}` is {len(tokens)} tokens; this model embeds at most {limit} at once",
                           name, "context_length_exceeded")
        inputs.append(tokens)
    return inputs


def check_total(inputs: list[list[int]], max_tokens: int) -> None:
    """All the inputs together within EMBEDDINGS_MAX_TOKENS, worded as OpenAI words its own
    limit (300,000 tokens a request there; see config for the figure here)."""
    total = sum(len(tokens) for tokens in inputs)
    if total > max_tokens:
        raise APIError(400, f"Requested {total} tokens, max {max_tokens} tokens per request (EMBEDDINGS_MAX_TOKENS); "
                            "send fewer or shorter inputs a request", "input", "max_tokens_per_request")


def check_dimensions(dimensions: int | None, n_embd: int, matryoshka: bool) -> None:
    """`dimensions` shortens each vector to its first that many, normalised again: only a model
    trained for it (Matryoshka) keeps its meaning that way, so any other is refused."""
    if dimensions is None or dimensions == n_embd:
        return
    if dimensions > n_embd:
        raise APIError(400, f"`dimensions` is {dimensions}; this model's embeddings have {n_embd}", "dimensions")
    if not matryoshka:
        raise APIError(400, f"this model's embeddings can't be shortened (it was not trained for it); leave "
                            f"`dimensions` out or send {n_embd}", "dimensions", "unsupported_parameter")


def shortened(vectors: np.ndarray, dimensions: int | None) -> np.ndarray:
    if dimensions is None or dimensions == vectors.shape[1]:
        return vectors
    return np.stack([normalized(v) for v in vectors[:, :dimensions]])


def encoded(v: np.ndarray, encoding_format: str) -> list[float] | str:
    """float: a JSON array; base64: the little-endian float32 bytes, as the openai SDK decodes them."""
    return base64.b64encode(v.astype("<f4").tobytes()).decode() if encoding_format == "base64" else v.tolist()


# --- The endpoint -----------------------------------------------------------------------------


async def respond(request: Request, served: Served, body: EmbeddingRequest) -> Response:
    """The request as one entry of the queue (a 429 when it is full, before any work), its inputs
    tokenized off the event loop, computed in the decode thread, answered in OpenAI's shape.

    Its time is bounded twice: by its tokens (EMBEDDINGS_MAX_TOKENS, a 400 before any work) and by
    EMBEDDINGS_TIMEOUT_S from its arrival, queue included: past that it ends with a 504, its place
    in the queue freed. Not REQUEST_TIMEOUT_S: a generation stopped there still answers with its
    text, an embedding would answer only an error, so its limit is the time past which a client
    would rather have that error (a fuzz run with REQUEST_TIMEOUT_S=5 on a loaded host took longer
    than 5 s for one 2047-token input). 504, not 503 or 408: the server's own deadline passed
    (gRPC's DEADLINE_EXCEEDED, which Google's APIs answer 504); 408 means the client was slow to send."""
    model, config = served.model, served.config
    deadline = time.monotonic() + config.embeddings_timeout_s
    check_dimensions(body.dimensions, model.n_embd, config.matryoshka)

    def prepare() -> EmbeddingJob:
        inputs = input_tokens(body.input, lambda text: model.tokenize(text, add_special=True), model.n_vocab, model.n_ctx)
        check_total(inputs, config.embeddings_max_tokens)
        return EmbeddingJob(inputs, emit=None, deadline=deadline)

    async def whole(run: Run, job: EmbeddingJob, results: list[Choice]) -> Response:
        if results[0].finish_reason == "timeout":
            raise APIError(504, f"the embeddings took longer than EMBEDDINGS_TIMEOUT_S ({config.embeddings_timeout_s:g} s); "
                                "send fewer tokens a request, or retry when the server is less busy", None, "timeout")
        vectors = shortened(job.vectors, body.dimensions)
        data = [EmbeddingData(index=i, embedding=encoded(v, body.encoding_format)) for i, v in enumerate(vectors)]
        usage = EmbeddingUsage(prompt_tokens=run.n_prompt, total_tokens=run.n_prompt)
        return Response(EmbeddingList(data=data, model=config.model_id, usage=usage))

    return await lifecycle.serve(request, served, 1, prepare, whole)
