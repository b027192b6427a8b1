"""The embedding jobs of the decode thread, computed one batch at a time between its generation
steps: whole inputs pooled by llama.cpp in the graph (an embedding model), or a chat model's
inputs in chunks through the KV cache, pooled here (see embeddings_api.py for why)."""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .events import Event
from .model import Model, llama

# A chat model's embedding batch holds at most this many tokens, below its prompts' 512-token chunks:
# every token of such a batch is an output, and llama.cpp's output buffer holds a row of logits
# (SmolLM2: 49k floats) for each: 25 MB at 128 tokens (measured), so 100 MB at 512.
CHAT_EMBEDDING_BATCH = 128


def normalized(v: np.ndarray) -> np.ndarray:
    """L2-normalised, as OpenAI's vectors are (and llama-server's by default); zero stays zero."""
    norm = float(np.linalg.norm(v))
    return v / norm if norm > 0 else v


@dataclass
class EmbeddingJob:
    """One request's inputs for the decode thread. `emit` gets one Event when all are done
    (finish_reason "stop"; the vectors are in `vectors`) or when it ends otherwise."""

    inputs: list[list[int]]
    emit: Callable[[Event], None]
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
            self._end(job, Event("", "cancelled" if job.cancelled else "timeout"))
        if self.chunked:
            free = sorted((s for s in slots if s.gen is None and s.seq_id not in self.held), key=lambda s: len(s.cached))
        else:
            free = [s for s in range(llama.llama_n_seq_max(self.model.ctx)) if s not in self.held]
        budget, chunks = min(self.model.n_batch, CHAT_EMBEDDING_BATCH) if self.chunked else self.model.n_batch, []
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
                if self.chunked:  # the slot's cached prompt goes (to the prompt cache): its sequence holds this input now
                    seq.evict(0)
                    seq = seq.seq_id
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
                self._end(job, Event(f"engine error: {e}", "error"))
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
                    self._end(p.job, Event("", "stop"))
        if not self.chunked and model.memory:
            llama.llama_memory_clear(model.memory, True)  # every input of the batch has ended with it

    def _release(self, p: Input) -> None:
        self.active.remove(p)
        if self.chunked:
            llama.llama_memory_seq_rm(self.model.memory, p.seq, -1, -1)

    def _end(self, job: EmbeddingJob, event: Event) -> None:
        for p in [p for p in self.active if p.job is job]:
            self._release(p)
        self.jobs.remove(job)
        self.outbox.append((job.emit, event))


