"""The llama.cpp engine: load a GGUF, tokenize, and run every generation in one decode thread.

Built on llama-cpp-python's low-level bindings (the C API), not its high-level `Llama`
class: one llama context holds `parallel` sequences, and a single thread decodes the next
token of every running sequence in one `llama_decode` per step (a prompt being admitted gets
a second one), each sequence sampled by its own llama.cpp sampler chain. Requests join and
leave between steps. Tokens reach the
asyncio side through `loop.call_soon_threadsafe`, so the event loop never waits on the model.
"""

from __future__ import annotations

import codecs
import ctypes
import importlib.util
import queue
import re
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from reasoning import ThinkSplitter, partial_tail


def _c_api():
    """llama.cpp's C API (`llama_cpp.llama_cpp`) without running the package's __init__, unless
    something imported it already: that __init__ imports llama-cpp-python's high-level `Llama`,
    its chat handlers and their dependencies, none of which this service uses, and it costs
    every cold start 0.2-0.4 s (measured: 0.42-0.72 s for the package, 35-40 ms for the
    bindings alone, plus numpy either way)."""
    if "llama_cpp" not in sys.modules:
        sys.modules["llama_cpp"] = importlib.util.module_from_spec(importlib.util.find_spec("llama_cpp"))
    import llama_cpp.llama_cpp

    return llama_cpp.llama_cpp


llama = _c_api()

# --- Loading --------------------------------------------------------------------------------


class ModelFileError(Exception):
    """The model file can't be served; the message says which file and what to do."""


CONVERT_HINT = (
    "only GGUF models are served: convert it with llama.cpp's convert_hf_to_gguf.py "
    "(then quantize to q4_0 with llama-quantize)"
)


def check_model_file(path: Path) -> None:
    """Fail early, in one line, on anything llama.cpp would refuse with pages of log."""
    if path.suffix.lower() in (".safetensors", ".pt", ".pth", ".bin"):
        raise ModelFileError(f"{path}: {CONVERT_HINT}")
    if not path.is_file():
        raise ModelFileError(f"{path}: no such file; set MODEL to a .gguf path or a key of models.toml")
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelFileError(f"{path}: can't be read ({e.strerror}); check its permissions") from e
    if magic != b"GGUF":
        raise ModelFileError(f"{path}: not a GGUF file; {CONVERT_HINT}")


_log_lines: list[str] = []


@llama.llama_log_callback
def _keep_errors(level: int, text: bytes, _user_data) -> None:
    # llama.cpp logs pages at load; keep only errors (GGML_LOG_LEVEL_ERROR), to explain a failed load.
    if level == 4:
        _log_lines.append(text.decode(errors="replace").strip())


llama.llama_log_set(_keep_errors, ctypes.c_void_p(0))
llama.llama_backend_init()

# FLASH_ATTN's values, as llama-server's --flash-attn. Off, a sequence's attention is computed the
# same way whether it is decoded alone or beside others at any length; on, a sequence decoded alone
# past 256 cached tokens takes a split-KV path whose sums differ.
FLASH_ATTN = {"auto": llama.LLAMA_FLASH_ATTN_TYPE_AUTO, "on": llama.LLAMA_FLASH_ATTN_TYPE_ENABLED,
              "off": llama.LLAMA_FLASH_ATTN_TYPE_DISABLED}

# A prompt is computed this many tokens a step, in the same chunks whether it runs alone or beside
# others. Measured with SmolLM2 on 2 cores: 128-token chunks compute a prompt as fast as 512-token
# ones (178 and 172 tokens/s), and while someone else's 1000-token prompt is computed a running
# stream pauses at most 0.8 s (one chunk), not 2.7 s (bench/join.py).
PROMPT_CHUNK = 128

SPECIAL_ATTRS = llama.LLAMA_TOKEN_ATTR_CONTROL | llama.LLAMA_TOKEN_ATTR_USER_DEFINED | llama.LLAMA_TOKEN_ATTR_UNKNOWN


class Model:
    """A loaded GGUF: its vocabulary, metadata and (unless vocab_only) weights and context."""

    def __init__(self, path: Path, n_ctx: int = 0, n_threads: int = 1, parallel: int = 1, vocab_only: bool = False,
                 flash_attn: str = "auto"):
        check_model_file(path)
        params = llama.llama_model_default_params()
        params.vocab_only = vocab_only
        # No weight repacking: repacked kernels compute a row differently when 4 or more rows
        # share a batch, so a request's greedy tokens would depend on who else is running.
        params.use_extra_bufts = False
        _log_lines.clear()
        self.model = llama.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            reason = next((line for line in _log_lines if line), "llama.cpp could not load it")
            raise ModelFileError(f"{path}: {reason}; the file may be truncated or corrupt, download it again")
        self.vocab = llama.llama_model_get_vocab(self.model)
        self.n_vocab = llama.llama_vocab_n_tokens(self.vocab)
        self.metadata = self._read_metadata()
        self.bos = llama.llama_vocab_bos(self.vocab)
        self.eos = llama.llama_vocab_eos(self.vocab)
        self.add_bos = bool(llama.llama_vocab_get_add_bos(self.vocab)) and self.bos >= 0
        fim = [llama.llama_vocab_fim_pre(self.vocab), llama.llama_vocab_fim_suf(self.vocab), llama.llama_vocab_fim_mid(self.vocab)]
        self.fim = tuple(fim) if min(fim) >= 0 else None  # fill-in-the-middle tokens, for models trained with them
        self.special = self._special_tokens()
        self._special_re = re.compile("|".join(re.escape(t) for t in sorted(self.special, key=len, reverse=True)))
        self.n_ctx_train = llama.llama_model_n_ctx_train(self.model)
        self.ctx = None
        if not vocab_only:
            self.n_ctx = min(n_ctx or self.n_ctx_train, self.n_ctx_train)
            cparams = llama.llama_context_default_params()
            cparams.n_ctx = self.n_ctx * parallel  # every sequence gets the full context length
            cparams.n_seq_max = parallel
            cparams.n_batch = cparams.n_ubatch = max(PROMPT_CHUNK, parallel)
            cparams.n_threads = cparams.n_threads_batch = n_threads
            cparams.flash_attn_type = FLASH_ATTN[flash_attn]
            cparams.no_perf = True
            self.ctx = llama.llama_init_from_model(self.model, cparams)
            if not self.ctx:
                raise ModelFileError(f"{path}: llama.cpp could not create a context of {n_ctx} tokens; lower N_CTX")
            self.memory = llama.llama_get_memory(self.ctx)
            self.n_batch = llama.llama_n_batch(self.ctx)

    def _read_metadata(self) -> dict[str, str]:
        buf = ctypes.create_string_buffer(1 << 16)
        meta = {}
        for i in range(llama.llama_model_meta_count(self.model)):
            llama.llama_model_meta_key_by_index(self.model, i, buf, len(buf))
            key = buf.value.decode()
            n = llama.llama_model_meta_val_str_by_index(self.model, i, buf, len(buf))
            if n >= len(buf):  # chat templates can be long
                big = ctypes.create_string_buffer(n + 1)
                llama.llama_model_meta_val_str_by_index(self.model, i, big, len(big))
                meta[key] = big.value.decode(errors="replace")
            else:
                meta[key] = buf.value.decode(errors="replace")
        return meta

    def _special_tokens(self) -> dict[str, int]:
        special = {}
        for token in range(self.n_vocab):
            if llama.llama_vocab_get_attr(self.vocab, token) & SPECIAL_ATTRS:
                text = llama.llama_vocab_get_text(self.vocab, token).decode(errors="replace")
                if text:
                    special.setdefault(text, token)
        return special

    def token_text(self, token: int) -> str:
        return llama.llama_vocab_get_text(self.vocab, token).decode(errors="replace") if token >= 0 else ""

    # --- Tokens ---

    def tokenize(self, text: str, special: bool = False) -> list[int]:
        """Plain tokenization; with `special`, special-token texts become their tokens."""
        data = text.encode()
        buf = (llama.llama_token * (len(data) + 8))()
        n = llama.llama_tokenize(self.vocab, data, len(data), buf, len(buf), False, special)
        return buf[:n]

    def tokenize_prompt(self, prompt: str, content_spans: list[tuple[int, int]] = ()) -> list[int]:
        """Tokenize a rendered prompt exactly as llama.cpp would with special tokens parsed,
        except that the text inside `content_spans` (what users typed) is never read as special
        tokens; and the model's BOS is added only if the prompt does not already start with it."""
        fragments: list[int | str] = [""]
        pos = 0
        for start, end in [*content_spans, (len(prompt), len(prompt))]:
            for fragment in [*self._split_special(prompt[pos:start]), prompt[start:end]]:
                if isinstance(fragment, str) and isinstance(fragments[-1], str):
                    fragments[-1] += fragment  # text runs on across content edges, as in one prompt
                else:
                    fragments.append(fragment)
            pos = end
        tokens: list[int] = []
        for i, fragment in enumerate(fragments):
            if isinstance(fragment, int):
                tokens.append(fragment)
                continue
            attr_before = self._attr(fragments[i - 1]) if i > 0 else 0
            attr_after = self._attr(fragments[i + 1]) if i + 1 < len(fragments) else 0
            if attr_before & llama.LLAMA_TOKEN_ATTR_RSTRIP:
                fragment = fragment.lstrip()
            if attr_after & llama.LLAMA_TOKEN_ATTR_LSTRIP:
                fragment = fragment.rstrip()
            if fragment:
                tokens.extend(self.tokenize(fragment))
        if self.add_bos and tokens[:1] != [self.bos]:
            tokens.insert(0, self.bos)
        return tokens

    def _split_special(self, text: str) -> list[int | str]:
        out: list[int | str] = []
        pos = 0
        for m in self._special_re.finditer(text) if self.special and text else ():
            out += [text[pos : m.start()], self.special[m.group()]]
            pos = m.end()
        out.append(text[pos:])
        return out

    def _attr(self, fragment: int | str) -> int:
        return llama.llama_vocab_get_attr(self.vocab, fragment) if isinstance(fragment, int) else 0

    def piece(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = llama.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n]

    def detokenize(self, tokens: list[int]) -> str:
        return b"".join(self.piece(t) for t in tokens if t != self.bos).decode(errors="replace")

    def is_end_of_generation(self, token: int) -> bool:
        return llama.llama_vocab_is_eog(self.vocab, token)


# --- Generation -----------------------------------------------------------------------------


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
    grammar: str | None = None  # GBNF the output must follow (JSON mode, schemas, forced tool calls)

    def is_argmax(self) -> bool:
        """Greedy with nothing stateful: the highest logit after the bias. numpy takes 18 µs for
        that; a sampler chain 87 µs (it copies every logit into a candidate array first), per
        sequence and step, 1% of a four-sequence step on SmolLM2."""
        return self.temperature <= 0 and not self.grammar and not (
            self.presence_penalty or self.frequency_penalty or self.repeat_penalty != 1.0)

    def chain(self, model: Model):
        """A llama.cpp sampler chain: grammar, then llama-server's order (bias, penalties,
        truncation, temperature). Penalties look back over the whole context, as OpenAI's do."""
        chain = llama.llama_sampler_chain_init(llama.llama_sampler_chain_default_params())
        add = lambda sampler: llama.llama_sampler_chain_add(chain, sampler)  # noqa: E731
        if self.grammar:
            add(grammar_sampler(model, self.grammar))
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


def grammar_sampler(model: Model, grammar: str):
    sampler = llama.llama_sampler_init_grammar(model.vocab, grammar.encode(), b"root")
    if not sampler:
        raise ValueError("the grammar does not parse")
    return sampler


def check_grammar(model: Model, grammar: str) -> None:
    """Raise ValueError now, in the request, rather than later in the decode thread."""
    llama.llama_sampler_free(grammar_sampler(model, grammar))


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely tokens at this step, most likely first


@dataclass
class Event:
    """What the engine tells a request after each of its tokens: new text and, at the end, why."""

    text: str
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV was reused rather than computed
    logprobs: list[TokenLogprob] = field(default_factory=list)
    reasoning: str = ""  # a thinking model's reasoning, apart from `text` (its answer)
    reasoning_tokens: int = 0


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


class StopScanner:
    """Finds stop strings in streamed text, holding back any tail that could begin one, so
    that no fragment of a stop string is ever emitted."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """The text safe to emit now, and whether a stop string was reached."""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        hold = max((partial_tail(self.pending, s) for s in self.stops), default=0)
        out, self.pending = self.pending[: len(self.pending) - hold], self.pending[len(self.pending) - hold :]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class Slot:
    """One of the context's sequences: what its KV cache holds, and the generation using it."""

    def __init__(self, seq_id: int, outbox: list):
        self.seq_id, self.outbox = seq_id, outbox
        self.cached: list[int] = []  # tokens whose keys and values sit in the KV cache
        self.gen: Generation | None = None

    def start(self, gen: Generation, model: Model) -> None:
        # first: if the chain fails, the slot is unchanged. A grammar waits for the end of thinking.
        self.chain = None if gen.sampling.is_argmax() else gen.sampling.chain(model)
        self.answer_chain = None
        if gen.thinking and gen.sampling.grammar:
            self.chain, self.answer_chain = replace(gen.sampling, grammar=None).chain(model), self.chain
        self.bias = (np.array(list(gen.sampling.logit_bias), dtype=np.intp),
                     np.array(list(gen.sampling.logit_bias.values()), dtype=np.float32))
        # Reuse the longest cached prefix; at least the last prompt token is decoded again,
        # because sampling needs its logits.
        keep = min(_common_prefix(self.cached, gen.prompt), len(gen.prompt) - 1)
        llama.llama_memory_seq_rm(model.memory, self.seq_id, keep, -1)
        self.cached = gen.prompt[:keep]
        self.reused = keep
        self.todo = gen.prompt[keep:]  # tokens still to decode
        self.gen = gen
        self.started = time.monotonic()
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.scanner = StopScanner(gen.stop)
        self.splitter = None if gen.thinking is None else ThinkSplitter(gen.thinking)
        self.n_generated = self.n_reasoning = 0

    def finish(self, reason: str, text: str = "", logprobs: list[TokenLogprob] = (), reasoning: str = "",
               held: bool = True) -> None:
        """End the generation. `held`: text held back (a possible stop string's or think tag's
        start) was not one after all, and is sent; after a stop string, nothing is."""
        gen = self.gen
        if held:
            thought, answer = self.splitter.flush() if self.splitter else ("", "")
            answer, stopped = self.scanner.feed(answer)
            reasoning, text = reasoning + thought, text + answer + ("" if stopped else self.scanner.flush())
        self.outbox.append((gen.emit, Event(text, reason, self.n_generated, self.reused, list(logprobs), reasoning,
                                            self.n_reasoning)))
        for chain in (self.chain, self.answer_chain):
            if chain is not None:
                llama.llama_sampler_free(chain)
        self.gen = None

    def split(self, text: str) -> tuple[str, str]:
        """A token's text -> (reasoning, answer), switching to the grammar once thinking ends."""
        if self.splitter is None:
            return "", text
        was = self.splitter.state
        reasoning, answer = self.splitter.feed(text)
        if "reasoning" in (was, self.splitter.state):
            self.n_reasoning += 1
        if self.answer_chain is not None and self.splitter.state in ("after", "content"):
            llama.llama_sampler_free(self.chain)
            self.chain, self.answer_chain = self.answer_chain, None
        return reasoning, answer


# Copying a sequence's KV cache copies its whole stream (N_CTX cells): measured, about what two
# prompt tokens cost to compute. Below this many tokens gained, a copy is not worth a wait.
MIN_COPY = 16


class Engine:
    """The decode thread. `submit` queues a generation; the thread admits it into a free slot
    between steps, and each step decodes one batch holding every running sequence. The events
    of a step reach `loop` in one call, so the event loop wakes once a step, not once a token."""

    def __init__(self, model: Model, parallel: int, loop, stop_tokens: set[int] = frozenset(),
                 on_failure: Callable[[str], None] = lambda reason: None):
        self.model, self.loop, self.on_failure = model, loop, on_failure  # on_failure: the thread died
        self.outbox: list[tuple[Callable[[Event], None], Event]] = []
        self.slots = [Slot(i, self.outbox) for i in range(parallel)]
        self.stop_tokens = set(stop_tokens)
        self.inbox: queue.SimpleQueue[Generation | None] = queue.SimpleQueue()
        self.waiting: deque[Generation] = deque()
        self.batch = llama.llama_batch_init(model.n_batch, 0, 1)
        self.thread = threading.Thread(target=self._run, name="decode", daemon=True)
        self.thread.start()

    def submit(self, gen: Generation) -> None:
        if not gen.prompt:  # nothing to decode: the slot would never sample, and never finish
            raise ValueError("a generation needs at least one prompt token")
        if not self.thread.is_alive():
            raise RuntimeError("the decode thread has stopped")
        self.inbox.put(gen)

    def close(self) -> None:
        self.inbox.put(None)
        self.thread.join()

    @property
    def running(self) -> int:
        return sum(slot.gen is not None for slot in self.slots)

    @property
    def queued(self) -> int:
        """Generations submitted and not yet given a slot."""
        return self.inbox.qsize() + len(self.waiting)

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as e:  # outside a step: the thread can't go on, so neither can the process
            reason = f"engine error: the decode thread failed ({type(e).__name__}: {e})"
            self.outbox.clear()
            for gen in [*(s.gen for s in self.slots if s.gen), *self.waiting, *_drain(self.inbox)]:
                self.outbox.append((gen.emit, Event(reason, "error")))
            self.loop.call_soon_threadsafe(_emit_all, [*self.outbox, (self.on_failure, reason)])

    def _loop(self) -> None:
        while True:
            idle = not self.waiting and not self.running
            try:
                while True:
                    gen = self.inbox.get(block=idle)
                    if gen is None:
                        return
                    self.waiting.append(gen)
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

    def _deliver(self) -> None:
        if self.outbox:
            self.loop.call_soon_threadsafe(_emit_all, self.outbox[:])
            self.outbox.clear()

    def _admit(self) -> None:
        while self.waiting:
            free = [s for s in self.slots if s.gen is None]
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
            slot = max(free, key=lambda s: (_common_prefix(s.cached, gen.prompt), _contiguous([*running, s.seq_id])))
            # Another sequence holding (or still computing) a longer prefix of this prompt lends its
            # KV cache: copied, not computed again (n > 1 choices; users sharing a long system prompt).
            donor = max(self.slots, key=lambda s: _common_prefix(s.cached, gen.prompt))
            cached = _common_prefix(donor.cached, gen.prompt)
            if any(len(s.todo) > 1 and _common_prefix(s.gen.prompt, gen.prompt) >= cached + MIN_COPY for s in self.slots if s.gen):
                return  # its prompt would be computed after that one anyway: wait for it, then copy
            self.waiting.popleft()
            if cached >= _common_prefix(slot.cached, gen.prompt) + MIN_COPY:
                llama.llama_memory_seq_cp(self.model.memory, donor.seq_id, slot.seq_id, -1, -1)
                slot.cached = list(donor.cached)
            try:
                slot.start(gen, self.model)
            except Exception as e:
                self.outbox.append((gen.emit, Event(f"engine error: {e}", "error")))

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
        if slot.chain is not None:
            token = llama.llama_sampler_sample(slot.chain, model.ctx, index)
        else:  # as llama.cpp's greedy sampler: the first highest logit after the bias
            logits, (ids, bias) = self._logits(index).copy(), slot.bias
            logits[ids] += bias
            token = int(logits.argmax())
        if model.is_end_of_generation(token) or token in self.stop_tokens:
            return slot.finish("stop")
        slot.n_generated += 1
        logprobs = [self._logprob(index, token, gen.top_logprobs)] if gen.top_logprobs is not None else []
        reasoning, answer = slot.split(slot.utf8.decode(model.piece(token)))
        text, stopped = slot.scanner.feed(answer)
        if stopped:
            return slot.finish("stop", text, logprobs, reasoning, held=False)
        if slot.n_generated >= gen.max_tokens or len(slot.cached) + 1 >= model.n_ctx or time.monotonic() > gen.deadline:
            return slot.finish("length", text, logprobs, reasoning)
        slot.todo = [token]
        self.outbox.append((gen.emit, Event(text, logprobs=logprobs, reasoning=reasoning)))

    def _logprob(self, index: int, token: int, top: int) -> TokenLogprob:
        """The model's own log-probabilities at this step (before any sampling transform)."""
        logits = self._logits(index)
        peak = logits.max()
        log_z = peak + np.log(np.exp(logits - peak).sum())
        best = np.argpartition(logits, -top)[-top:] if top else []
        best = sorted(best, key=lambda t: -logits[t])
        return TokenLogprob(token, float(logits[token] - log_z), [(int(t), float(logits[t] - log_z)) for t in best])

    def _logits(self, index: int) -> np.ndarray:
        """The logits of the batch's index-th row, a view of llama.cpp's buffer."""
        return np.ctypeslib.as_array(llama.llama_get_logits_ith(self.model.ctx, index), shape=(self.model.n_vocab,))


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
