"""POST /v1/embeddings: texts or token ids -> one L2-normalised vector each, computed in the
decode thread between generation steps.

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

import asyncio
import base64
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np
from litestar import Request, Response

from . import engine
from .access import request_info
from .model import Model, llama
from .protocol import CLIENT_CLOSED, APIError, EmbeddingData, EmbeddingList, EmbeddingRequest, EmbeddingUsage
from . import runs

if TYPE_CHECKING:
    from .loading import Served


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


def normalized(v: np.ndarray) -> np.ndarray:
    """L2-normalised, as OpenAI's vectors are (and llama-server's by default); zero stays zero."""
    norm = float(np.linalg.norm(v))
    return v / norm if norm > 0 else v


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


# --- In the decode thread ---------------------------------------------------------------------


@dataclass
class EmbeddingJob:
    """One request's inputs for the decode thread. `emit` gets one engine.Event when all are done
    (finish_reason "stop"; the vectors are in `vectors`) or when it ends otherwise."""

    inputs: list[list[int]]
    emit: Callable[[engine.Event], None]
    deadline: float = math.inf  # time.monotonic() past which it ends, finish_reason "timeout"
    cancelled: bool = False  # set by the request's run when it ends
    vectors: np.ndarray | None = None  # one row per input, filled in the decode thread
    begun: int = 0  # inputs given a sequence so far
    left: int = 0  # inputs not yet finished


@dataclass
class Input:
    """One input being computed in sequence `seq`: how much of it is decoded, and (a chat model's)
    its pooling so far: the sum of its rows (mean), or its last or first row."""

    job: EmbeddingJob
    index: int
    seq: int
    done: int = 0
    pooled: np.ndarray | None = None


class Embedder:
    """The embedding jobs of one engine, computed one batch at a time between its generation steps."""

    def __init__(self, model: Model, outbox: list):
        self.model, self.outbox = model, outbox
        self.jobs: deque[EmbeddingJob] = deque()  # every job not yet ended, oldest first
        self.active: list[Input] = []
        self.batch = llama.llama_batch_init(model.n_batch, 0, 1)
        # A chat model's inputs go on through the KV cache chunk by chunk (its context pools nothing);
        # an embedding model's are whole in one batch, pooled in the graph.
        self.chunked = not model.embedding_only

    def add(self, job: EmbeddingJob) -> None:
        job.vectors = np.zeros((len(job.inputs), self.model.n_embd), dtype=np.float32)
        job.left = len(job.inputs)
        self.jobs.append(job)

    @property
    def busy(self) -> bool:
        return bool(self.jobs)

    @property
    def held(self) -> set[int]:
        """The sequences that inputs are being computed in."""
        return {p.seq for p in self.active}

    @property
    def running(self) -> int:
        """Jobs begun (read by /metrics on the event loop: a copy, as the decode thread changes the deque)."""
        return sum(job.begun > 0 for job in list(self.jobs))

    @property
    def queued(self) -> int:
        jobs = list(self.jobs)
        return sum(job.begun == 0 for job in jobs)

    def step(self, slots: list) -> None:
        """One batch: inputs already begun go on, new ones begin in free sequences (a chat model's:
        slots with no generation, those caching the least first), oldest job first."""
        now = time.monotonic()
        for job in [job for job in self.jobs if job.cancelled or now > job.deadline]:
            self._end(job, engine.Event("", "cancelled" if job.cancelled else "timeout"))
        if self.chunked:
            free = sorted((s for s in slots if s.gen is None and s.seq_id not in self.held), key=lambda s: len(s.cached))
        else:
            free = [s for s in range(llama.llama_n_seq_max(self.model.ctx)) if s not in self.held]
        budget, chunks = self.model.n_batch, []
        for p in self.active:  # only a chat model's inputs outlive their first batch
            n = min(len(p.job.inputs[p.index]) - p.done, budget)
            chunks.append((p, n))
            budget -= n
        for job in self.jobs:
            while budget > 0 and free and job.begun < len(job.inputs):
                n = len(job.inputs[job.begun])
                if not self.chunked and n > budget:
                    break  # whole inputs only: this one waits for the next batch
                seq = free.pop(0)
                if self.chunked:  # the slot's cached prompt is forgotten: its sequence holds this input now
                    seq.cached, seq = [], seq.seq_id
                    llama.llama_memory_seq_rm(self.model.memory, seq, -1, -1)
                p = Input(job, job.begun, seq)
                job.begun += 1
                self.active.append(p)
                chunks.append((p, min(n, budget)))
                budget -= min(n, budget)
            if budget <= 0 or not free or job.begun < len(job.inputs):
                break  # FIFO: a later job never overtakes one still waiting for room
        chunks = [(p, n) for p, n in chunks if n > 0]
        if not chunks:
            return
        try:
            self._decode(chunks)
        except Exception as e:  # a failed batch fails its jobs, never the thread
            for job in {id(p.job): p.job for p, _ in chunks}.values():
                self._end(job, engine.Event(f"engine error: {e}", "error"))
            if not self.chunked and self.model.memory:
                llama.llama_memory_clear(self.model.memory, True)

    def _decode(self, chunks: list[tuple[Input, int]]) -> None:
        model, batch, i = self.model, self.batch, 0
        for p, n in chunks:
            for pos in range(p.done, p.done + n):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = p.job.inputs[p.index][pos], pos, 1, True
                batch.seq_id[i][0] = p.seq
                i += 1
        batch.n_tokens = i
        if self.chunked:
            llama.llama_set_embeddings(model.ctx, True)
        try:
            status = llama.llama_decode(model.ctx, batch)
        finally:
            if self.chunked:
                llama.llama_set_embeddings(model.ctx, False)
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status}")
        if self.chunked:
            rows = np.ctypeslib.as_array(llama.llama_get_embeddings(model.ctx), shape=(i, model.n_embd))
        row = 0
        for p, n in chunks:
            if self.chunked:
                mine = rows[row : row + n]
                if model.pooling == "mean":
                    p.pooled = mine.sum(axis=0) if p.pooled is None else p.pooled + mine.sum(axis=0)
                elif model.pooling == "last":
                    p.pooled = mine[-1].copy()
                elif p.pooled is None:  # cls: the first token's
                    p.pooled = mine[0].copy()
            row += n
            p.done += n
            if p.done == len(p.job.inputs[p.index]):
                if self.chunked:
                    vector = p.pooled / p.done if model.pooling == "mean" else p.pooled
                else:
                    vector = np.ctypeslib.as_array(llama.llama_get_embeddings_seq(model.ctx, p.seq), shape=(model.n_embd,))
                p.job.vectors[p.index] = normalized(vector)
                self._release(p)
                p.job.left -= 1
                if not p.job.left:
                    self._end(p.job, engine.Event("", "stop"))
        if not self.chunked and model.memory:
            llama.llama_memory_clear(model.memory, True)  # every input of the batch has ended with it

    def _release(self, p: Input) -> None:
        self.active.remove(p)
        if self.chunked:
            llama.llama_memory_seq_rm(self.model.memory, p.seq, -1, -1)

    def _end(self, job: EmbeddingJob, event: engine.Event) -> None:
        for p in [p for p in self.active if p.job is job]:
            self._release(p)
        self.jobs.remove(job)
        self.outbox.append((job.emit, event))


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
    state, info, model, config = request.app.state, request_info(request), served.model, served.config
    deadline = time.monotonic() + config.embeddings_timeout_s
    check_dimensions(body.dimensions, model.n_embd, config.matryoshka)
    async with runs.Run(state.runs, served, 1, state.metrics, info) as run:
        inputs = await asyncio.to_thread(input_tokens, body.input, lambda text: model.tokenize(text, add_special=True),
                                         model.n_vocab, model.n_ctx)
        check_total(inputs, config.embeddings_max_tokens)
        job = EmbeddingJob(inputs, emit=None, deadline=deadline)
        run.submit_embedding(job)
        results = await run.collect_unless_disconnected(request.receive)
        if results is None:
            return Response(b"", status_code=CLIENT_CLOSED)
    if results[0].finish_reason == "timeout":
        raise APIError(504, f"the embeddings took longer than EMBEDDINGS_TIMEOUT_S ({config.embeddings_timeout_s:g} s); "
                            "send fewer tokens a request, or retry when the server is less busy", None, "timeout")
    vectors = shortened(job.vectors, body.dimensions)
    data = [EmbeddingData(index=i, embedding=encoded(v, body.encoding_format)) for i, v in enumerate(vectors)]
    usage = EmbeddingUsage(prompt_tokens=run.n_prompt, total_tokens=run.n_prompt)
    return Response(EmbeddingList(data=data, model=served.config.model_id, usage=usage))
