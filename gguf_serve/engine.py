"""The decode loop: every generation runs in one thread, on one llama.cpp context.

Built on llama-cpp-python's low-level bindings (the C API), not its high-level `Llama`
class: one llama context holds `parallel` sequences, and a single thread decodes the next
token of every running sequence in one `llama_decode` per step (a prompt being admitted gets
a second one), each sequence sampled by its own llama.cpp sampler chain. Requests join and
leave between steps. Tokens reach the asyncio side through `loop.call_soon_threadsafe`, so the event loop never waits on the model.
"""

from __future__ import annotations

import codecs
import ctypes
import queue
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from .embedder import Embedder, EmbeddingJob
from .events import Event, TokenLogprob
from .model import PROMPT_CHUNK, Model, llama
from .reasoning import ThinkSplitter
from .grammar import GrammarError, Matcher, start_thread, think_or_answer
from .prompt_cache import MIN_SAVED, PromptCache



@dataclass
class Sampling:
    """How one sequence picks its tokens (OpenAI's parameters plus llama.cpp's usual extras)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_penalty: float = 1.0
    seed: int | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)
    grammar: str | None = None  # llguidance's grammar the answer must follow (grammar.py: JSON mode, schemas, forced calls)

    def is_argmax(self) -> bool:
        """Greedy with nothing stateful: the highest logit after the bias. numpy takes 18 µs for
        that; a sampler chain 87 µs (it copies every logit into a candidate array first), per
        sequence and step, 1% of a four-sequence step on SmolLM2. A grammar masks the logits first."""
        return self.temperature <= 0 and not (
            self.presence_penalty or self.frequency_penalty or self.repeat_penalty != 1.0)

    def chain(self, model: Model):
        """A llama.cpp sampler chain in llama-server's order (bias, penalties, truncation,
        temperature), over logits a grammar has masked already. Penalties look back over the
        whole context, as OpenAI's do."""
        chain = llama.llama_sampler_chain_init(llama.llama_sampler_chain_default_params())
        add = lambda sampler: llama.llama_sampler_chain_add(chain, sampler)  # noqa: E731
        if self.logit_bias:
            biases = (llama.llama_logit_bias * len(self.logit_bias))(*self.logit_bias.items())
            add(llama.llama_sampler_init_logit_bias(model.n_vocab, len(biases), biases))
        if self.presence_penalty or self.frequency_penalty or self.repeat_penalty != 1.0:
            penalties = (self.repeat_penalty, self.frequency_penalty, self.presence_penalty)
            add(llama.llama_sampler_init_penalties(model.n_vocab, model.n_ctx, *penalties))
        if self.temperature <= 0:
            add(llama.llama_sampler_init_greedy())
            return chain
        if self.top_k > 0:
            add(llama.llama_sampler_init_top_k(self.top_k))
        if self.top_p < 1.0:
            add(llama.llama_sampler_init_top_p(self.top_p, 1))
        if self.min_p > 0:
            add(llama.llama_sampler_init_min_p(self.min_p, 1))
        add(llama.llama_sampler_init_temp(self.temperature))
        seed = self.seed if self.seed is not None else llama.LLAMA_DEFAULT_SEED
        add(llama.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        return chain


@dataclass
class Generation:
    """One sequence to generate. `emit` gets each Event, called on the engine's event loop."""

    prompt: list[int]
    max_tokens: int
    sampling: Sampling
    emit: Callable[[Event], None]
    stop: list[str] = field(default_factory=list)
    top_logprobs: int | None = None  # report each token's logprob and this many alternatives
    deadline: float = float("inf")  # time.monotonic() past which it stops, as if at max_tokens
    cancelled: bool = False  # set by the request's side when its client has gone
    # A thinking model's output is split into reasoning and answer: None, not split; True, the
    # prompt opened the think block; False, the model may open it. Stop strings and the grammar
    # apply to the answer only.
    thinking: bool | None = None
    # False once the request only wants the finished text (a non-streamed answer): its events after
    # the first are merged in the engine and handed over when it ends, one wake-up of the event
    # loop instead of one a token (which on 2 cores takes a core from llama.cpp's threads).
    stream: bool = True
    # Tokens sampled so far, counted by the decode thread; read on the request's side too, by a
    # request whose client left: the count the engine sends comes in the event that ends the
    # generation, after the request is gone.
    generated: int = 0


class StopScanner:
    """Finds stop strings in streamed text, holding back any tail that could begin one, so
    that no fragment of a stop string is ever emitted.

    Incremental: each stop string has a Knuth-Morris-Pratt matcher that reads every character
    once (amortized), so a token costs the same whatever the stop strings' length. Scanning the
    held text again at each token cost O(L²) for a stop string of L characters, in the decode
    thread that every stream waits on (measured, a stop string the text keeps almost matching:
    116 µs a token at 1,000 characters, 1.6 ms at 10,000; this way 0.9 and 2.3 µs)."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.borders = [_borders(s) for s in self.stops]
        self.matched = [0] * len(self.stops)  # for each stop string, how much of its start the text ends with
        self.pending = ""  # the text held back: as long as the longest of those starts
        self.reached: str | None = None  # the stop string that ended the text, once one has

    def feed(self, text: str) -> tuple[str, bool]:
        """The text safe to emit now, and whether a stop string was reached."""
        if not self.stops:
            return text, False
        new, self.pending = len(self.pending), self.pending + text
        first = None  # where the earliest stop string reached in this text begins
        for k, (stop, borders) in enumerate(zip(self.stops, self.borders)):
            matched = self.matched[k]
            for end in range(new, len(self.pending)):
                char = self.pending[end]
                while matched and stop[matched] != char:
                    matched = borders[matched - 1]
                if stop[matched] == char:
                    matched += 1
                if matched == len(stop):
                    start = end + 1 - len(stop)
                    if first is None or start < first:
                        first, self.reached = start, stop
                    break
            self.matched[k] = matched
        if first is not None:
            out, self.pending = self.pending[:first], ""
            return out, True
        cut = len(self.pending) - max(self.matched)
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


def _borders(stop: str) -> list[int]:
    """For each prefix of `stop`, the length of the longest proper prefix that also ends it
    (KMP's failure function): where a partial match goes on after a mismatch."""
    borders, k = [0] * len(stop), 0
    for i in range(1, len(stop)):
        while k and stop[i] != stop[k]:
            k = borders[k - 1]
        if stop[i] == stop[k]:
            k += 1
        borders[i] = k
    return borders


# Finish reasons whose event carries a message instead of text: the engine failed ("error"), or a
# sequence's grammar did, over its budget ("grammar": the request's doing, see grammar.LIMITS).
FAILED = ("error", "grammar")


class Slot:
    """One of the context's sequences: what its KV cache holds, and the generation using it."""

    def __init__(self, seq_id: int, outbox: list, model: Model | None = None, cache: PromptCache | None = None):
        self.seq_id, self.outbox, self.model, self.cache = seq_id, outbox, model, cache
        self.cached: list[int] = []  # tokens whose keys and values sit in the KV cache
        self.gen: Generation | None = None
        self.held: Event | None = None  # a non-streamed generation's events since its first, merged

    def evict(self, keep: int) -> None:
        """Drop what the sequence holds from position `keep` on: kept in the prompt cache first
        when that is enough tokens to be worth restoring later."""
        if self.cache is not None and len(self.cached) - keep >= MIN_SAVED:
            self.cache.save(self.seq_id, self.cached)
        llama.llama_memory_seq_rm(self.model.memory, self.seq_id, keep, -1)
        self.cached = self.cached[:keep]

    def start(self, gen: Generation) -> None:
        model = self.model
        # first: if a chain or a grammar fails, the slot is unchanged
        self.chain = None if gen.sampling.is_argmax() else gen.sampling.chain(model)
        # The grammar is the answer's: it starts once the thinking ends, as llama.cpp's lazy grammars
        # do (`answer`, kept until then). A model that may open the block itself (Qwen3) starts under
        # the grammar or `<think>`: whichever it writes decides.
        grammar = gen.sampling.grammar
        self.answer = grammar if grammar and gen.thinking is not None else None
        self.matcher = (None if not grammar or gen.thinking else
                        Matcher(model, grammar if gen.thinking is None else think_or_answer(grammar)))
        self.bias = (np.array(list(gen.sampling.logit_bias), dtype=np.intp),
                     np.array(list(gen.sampling.logit_bias.values()), dtype=np.float32))
        # Reuse the longest cached prefix; at least the last prompt token is decoded again,
        # because sampling needs its logits.
        keep = min(_common_prefix(self.cached, gen.prompt), len(gen.prompt) - 1)
        self.evict(keep)
        self.reused = keep
        self.todo = gen.prompt[keep:]  # tokens still to decode
        self.gen = gen
        self.started = time.monotonic()
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.scanner = StopScanner(gen.stop)
        self.splitter = None if gen.thinking is None else ThinkSplitter(gen.thinking)
        self.n_reasoning = 0
        self.held = None

    def finish(self, reason: str, text: str = "", logprobs: list[TokenLogprob] = (), reasoning: str = "",
               held: bool = True, context_full: bool = False) -> None:
        """End the generation. `held`: text held back (a possible stop string's or think tag's
        start) was not one after all, and is sent; after a stop string, nothing is. An error's
        event carries its message only: never generated text, held or merged. `context_full`: a
        "length" that the context's end forced (Event.context_full)."""
        gen = self.gen
        if held and reason not in FAILED:
            thought, answer = self.splitter.flush() if self.splitter else ("", "")
            answer, stopped = self.scanner.feed(answer)
            reasoning, text = reasoning + thought, text + answer + ("" if stopped else self.scanner.flush())
        logprobs = list(logprobs)
        if self.held is not None and reason not in (*FAILED, "cancelled"):
            text, reasoning, logprobs = self.held.text + text, self.held.reasoning + reasoning, self.held.logprobs + logprobs
        self.outbox.append((gen.emit, Event(text, reason, gen.generated, self.reused, logprobs, reasoning,
                                            self.n_reasoning, self.scanner.reached, context_full)))
        if self.chain is not None:
            llama.llama_sampler_free(self.chain)
        self.gen = self.matcher = None

    def split(self, text: str) -> tuple[str, str]:
        """A token's text -> (reasoning, answer); the grammar is let go as the thinking opens, and
        the answer's starts as it ends."""
        if self.splitter is None:
            return "", text
        was = self.splitter.state
        reasoning, answer = self.splitter.feed(text)
        if "reasoning" in (was, self.splitter.state):
            self.n_reasoning += 1
        if self.splitter.state == "reasoning":
            self.matcher = None
        elif self.answer and self.splitter.thought:
            self.matcher, self.answer = Matcher(self.model, self.answer), None
        return reasoning, answer


# Copying a sequence's KV cache copies its whole stream (N_CTX cells): measured, about what two
# prompt tokens cost to compute. Below this many tokens gained, a copy is not worth a wait.
MIN_COPY = 16


class Engine:
    """The decode thread. `submit` queues a generation; the thread admits it into a free slot
    between steps, and each step decodes one batch holding every running sequence. The events
    of a step reach `loop` in one call, so the event loop wakes once a step, not once a token."""

    def __init__(self, model: Model, parallel: int, loop, stop_tokens: set[int] = frozenset(),
                 on_failure: Callable[[str], None] = lambda reason: None, prompt_cache_bytes: int | None = 0):
        self.model, self.loop, self.on_failure = model, loop, on_failure  # on_failure: the thread died
        self.outbox: list[tuple[Callable[[Event], None], Event]] = []
        # PROMPT_CACHE_MIB's default: a quarter of the sequences' own KV cache (45 MiB for the default
        # model's 4 x 2048 tokens, within Cloud Run's 512 MiB: docs/deploy.md), and at least one
        # sequence's, so that a shared system prompt as long as a sequence fits with PARALLEL under 4
        # (bench multiturn's fleet of 2 instances with 2 sequences each: a quarter held less than its
        # 1,000-token system prompt).
        default_tokens = max(model.n_ctx * parallel // 4, model.n_ctx)
        self.cache = PromptCache(model, prompt_cache_bytes, default_tokens) if prompt_cache_bytes != 0 else None
        self.slots = [Slot(i, self.outbox, model, self.cache) for i in range(parallel)]
        self.stop_tokens = set(stop_tokens)
        self.inbox: queue.SimpleQueue[Generation | EmbeddingJob | None] = queue.SimpleQueue()
        self.waiting: deque[Generation] = deque()
        self.batch = llama.llama_batch_init(model.n_batch, 0, 1)
        self.row = ctypes.c_float * model.n_vocab  # one row of logits
        self.embedder = Embedder(model, self.outbox)  # embedding inputs, a batch between steps
        self.thread = start_thread(self._run, "decode")  # it compiles each generation's grammar

    def submit(self, gen: Generation) -> None:
        if not gen.prompt:  # nothing to decode: the slot would never sample, and never finish
            raise ValueError("a generation needs at least one prompt token")
        if not self.thread.is_alive():
            raise RuntimeError("the decode thread has stopped")
        self.inbox.put(gen)

    def embed(self, job: EmbeddingJob) -> None:
        if not self.thread.is_alive():
            raise RuntimeError("the decode thread has stopped")
        self.inbox.put(job)

    def close(self) -> None:
        self.inbox.put(None)
        self.thread.join()

    def save_sequences(self) -> None:
        """Once closed: what each sequence holds, saved to the prompt cache as a sequence taken for
        another prompt is (the most recently started last: the hottest), for the disk tier to write
        (prompt_cache_disk.py). The sequences hold the latest conversations, which the tier
        has not seen. Its thread stopped, the context is this caller's."""
        for slot in sorted((s for s in self.slots if s.cached), key=lambda s: s.started):
            self.cache.save(slot.seq_id, slot.cached)

    @property
    def running(self) -> int:
        return sum(slot.gen is not None for slot in self.slots) + self.embedder.running

    @property
    def queued(self) -> int:
        """Generations submitted and not yet given a slot."""
        return self.inbox.qsize() + len(self.waiting) + self.embedder.queued

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # outside a step: the thread can't go on, so neither can the process
            reason = f"engine error: the decode thread failed ({type(e).__name__}: {e})"
            self.outbox.clear()
            for gen in [*(s.gen for s in self.slots if s.gen), *self.waiting, *self.embedder.jobs, *_drain(self.inbox)]:
                self.outbox.append((gen.emit, Event(reason, "error")))
            self.loop.call_soon_threadsafe(_emit_all, [*self.outbox, (self.on_failure, reason)])

    def _loop(self) -> None:
        while True:
            idle = not self.waiting and not self.running and not self.embedder.busy
            try:
                while True:
                    gen = self.inbox.get(block=idle)
                    if gen is None:
                        return
                    if isinstance(gen, Generation):
                        self.waiting.append(gen)
                    else:
                        self.embedder.add(gen)
                    idle = False
            except queue.Empty:
                pass
            self._admit()
            self._deliver()
            if self.running:
                try:
                    self._step()
                except Exception as e:  # never let one bad step kill the thread serving everyone
                    for slot in self.slots:
                        if slot.gen:
                            slot.finish("error", f"engine error: {e}")
                        slot.cached = []  # what the KV cache holds is unknown now: reuse nothing
                    llama.llama_memory_clear(self.model.memory, True)
                self._deliver()
            if self.embedder.busy:  # one batch of embedding work a step: streams wait at most that long
                self.embedder.step(self.slots)
                self._deliver()

    def _deliver(self) -> None:
        if self.outbox:
            self.loop.call_soon_threadsafe(_emit_all, self.outbox[:])
            self.outbox.clear()

    def _admit(self) -> None:
        while self.waiting:
            free = [s for s in self.slots if s.gen is None and s.seq_id not in self.embedder.held]
            if not free:
                return
            gen = self.waiting[0]
            if gen.cancelled:
                self.waiting.popleft()
                self.outbox.append((gen.emit, Event("", "cancelled")))
                continue
            # The free slot whose cache shares the longest prefix with this prompt; among equals,
            # one that keeps the running sequence ids contiguous (see _decode: a gap costs a pass).
            running = [s.seq_id for s in self.slots if s.gen is not None]
            # Among slots sharing nothing, the one holding least: what it held goes to the prompt cache.
            slot = max(free, key=lambda s: (_common_prefix(s.cached, gen.prompt), _contiguous([*running, s.seq_id]),
                                            -len(s.cached)))
            # Another sequence holding (or still computing) a longer prefix of this prompt lends its
            # KV cache: copied, not computed again (n > 1 choices; users sharing a long system prompt).
            donor = max(self.slots, key=lambda s: _common_prefix(s.cached, gen.prompt))
            cached = _common_prefix(donor.cached, gen.prompt)
            if any(len(s.todo) > 1 and _common_prefix(s.gen.prompt, gen.prompt) >= cached + MIN_COPY for s in self.slots if s.gen):
                return  # its prompt would be computed after that one anyway: wait for it, then copy
            self.waiting.popleft()
            here = _common_prefix(slot.cached, gen.prompt)
            saved, restorable = self.cache.longest(gen.prompt) if self.cache else (None, 0)
            restored = False
            if restorable >= max(here, cached) + MIN_SAVED:  # saved in the prompt cache: restored, not computed
                entry = self.cache.take(saved)  # first: the slot's own save below may need room
                slot.evict(0)
                slot.cached = self.cache.restore(entry, slot.seq_id)
                restored = True
            elif cached >= here + MIN_COPY:
                slot.evict(0)
                llama.llama_memory_seq_cp(self.model.memory, donor.seq_id, slot.seq_id, -1, -1)
                slot.cached = list(donor.cached)
            if self.cache:
                self.cache.supersede(gen.prompt)
            try:
                slot.start(gen)
            except GrammarError as e:
                self.outbox.append((gen.emit, Event(f"the output grammar failed: {e}", "grammar")))
            except Exception as e:
                self.outbox.append((gen.emit, Event(f"engine error: {e}", "error")))
            else:
                if restored:
                    self.cache.restored_tokens += slot.reused

    def _step(self) -> None:
        """At most two llama_decodes: first one row for every sequence with a single token to
        decode (its last sampled token, or its prompt's last token), which are then sampled and
        handed to the event loop; then the next chunk of at most one prompt, alone.

        This keeps greedy output the same whether a request runs alone or beside others (tested
        on Gemma 3, whose logits move when a prompt is split differently): a prompt is computed in
        the same chunks either way, never split by llama.cpp around other sequences' rows, and its
        last token, whose logits are sampled, is always a row of the first kind."""
        live = []
        now = time.monotonic()
        for slot in self.slots:
            if slot.gen is not None and slot.gen.cancelled:
                slot.finish("cancelled")
            elif slot.gen is not None and now > slot.gen.deadline:  # a long prompt's chunks count too
                slot.finish("length")
            elif slot.gen is not None:
                live.append(slot)
        prompts = [slot for slot in live if len(slot.todo) > 1]
        rows = [slot for slot in live if len(slot.todo) == 1]
        if rows:
            self._decode([(slot, slot.todo) for slot in rows], logits=True)
            for index, slot in enumerate(rows):
                self._sample(slot, index)
            self._deliver()  # these tokens go out now, not after a prompt chunk that may take seconds
        if prompts:
            first = min(prompts, key=lambda slot: slot.started)
            self._decode([(first, first.todo[: min(PROMPT_CHUNK, len(first.todo) - 1)])], logits=False)

    def _decode(self, chunks: list[tuple[Slot, list[int]]], logits: bool) -> None:
        """Decode each slot's tokens at the end of its sequence. Callers pass slots in seq_id
        order, as self.slots holds them: llama.cpp computes a batch as one pass over the weights
        per run of consecutive, increasing sequence ids."""
        batch, n = self.batch, 0
        for slot, tokens in chunks:
            for token in tokens:
                batch.token[n] = token
                batch.pos[n] = len(slot.cached)
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = slot.seq_id
                batch.logits[n] = logits
                slot.cached.append(token)
                n += 1
            slot.todo = slot.todo[len(tokens) :]
        batch.n_tokens = n
        status = llama.llama_decode(self.model.ctx, batch)
        if status != 0:
            raise RuntimeError(f"llama_decode returned {status}")

    def _sample(self, slot: Slot, index: int) -> None:
        model, gen = self.model, slot.gen
        saved = None
        if slot.matcher is not None:
            logits = self._logits(index)
            saved = logits.copy() if gen.top_logprobs is not None else None  # logprobs are the model's own
            try:
                slot.matcher.mask(logits)
            except GrammarError as e:
                return slot.finish("grammar", f"the output grammar failed at token {gen.generated}: {e}")
        if slot.chain is not None:
            token = llama.llama_sampler_sample(slot.chain, model.ctx, index)
        else:  # as llama.cpp's greedy sampler: the first highest logit after the bias
            logits, (ids, bias) = self._logits(index), slot.bias
            if len(ids):  # biased in place in llama.cpp's buffer, then restored (no 4 x n_vocab-byte copy)
                saved_bias = logits[ids]
                logits[ids] = saved_bias + bias
                token = int(logits.argmax())
                logits[ids] = saved_bias
            else:
                token = int(logits.argmax())
        if saved is not None:
            self._logits(index)[:] = saved
        if model.is_end_of_generation(token) or token in self.stop_tokens:
            return slot.finish("stop")
        gen.generated += 1
        try:  # the grammar follows the token before the think splitter reads it, which may let it go
            complete = slot.matcher is not None and slot.matcher.accept(token)
            reasoning, answer = slot.split(slot.utf8.decode(model.piece(token)))
        except GrammarError as e:
            return slot.finish("grammar", f"the output grammar failed at token {gen.generated}: {e}")
        logprobs = [self._logprob(index, token, gen.top_logprobs)] if gen.top_logprobs is not None else []
        text, stopped = slot.scanner.feed(answer)
        if stopped:
            return slot.finish("stop", text, logprobs, reasoning, held=False)
        if complete and slot.matcher is not None:  # the grammar allows nothing more: the answer is whole
            return slot.finish("stop", text, logprobs, reasoning)
        # full: the prompt and this token leave no room for another; max_tokens reached too says max_tokens
        reached, full = gen.generated >= gen.max_tokens, len(slot.cached) + 1 >= model.n_ctx
        if reached or full or time.monotonic() > gen.deadline:
            return slot.finish("length", text, logprobs, reasoning, context_full=full and not reached)
        slot.todo = [token]
        if gen.stream or gen.generated == 1:  # the first token goes out at once: time to first token
            self.outbox.append((gen.emit, Event(text, logprobs=logprobs, reasoning=reasoning)))
        elif slot.held is None:
            slot.held = Event(text, logprobs=logprobs, reasoning=reasoning)
        else:
            held = slot.held
            held.text, held.reasoning = held.text + text, held.reasoning + reasoning
            held.logprobs += logprobs

    def _logprob(self, index: int, token: int, top: int) -> TokenLogprob:
        """The model's own log-probabilities at this step (before any sampling transform)."""
        logits = self._logits(index)
        peak = logits.max()
        log_z = peak + np.log(np.exp(logits - peak).sum())
        best = np.argpartition(logits, -top)[-top:] if top else []
        best = sorted(best, key=lambda t: -logits[t])
        return TokenLogprob(token, float(logits[token] - log_z), [(int(t), float(logits[t] - log_z)) for t in best])

    def _logits(self, index: int) -> np.ndarray:
        """The logits of the batch's index-th row, a view of llama.cpp's buffer (made from its
        address: np.ctypeslib.as_array builds a ctypes array type each call, 4x the time)."""
        address = ctypes.cast(llama.llama_get_logits_ith(self.model.ctx, index), ctypes.c_void_p).value
        return np.frombuffer(self.row.from_address(address), dtype=np.float32)


def _emit_all(events: list[tuple[Callable[[Event], None], Event]]) -> None:
    for emit, event in events:
        emit(event)


def _drain(inbox: queue.SimpleQueue) -> list[Generation]:
    gens = []
    while not inbox.empty():
        gen = inbox.get()
        if gen is not None:
            gens.append(gen)
    return gens


def _contiguous(seq_ids: list[int]) -> bool:
    return max(seq_ids) - min(seq_ids) + 1 == len(seq_ids)


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
