"""Constrained decoding: an output grammar (a JSON Schema, JSON mode, a forced tool call, a custom
tool's Lark grammar or regex) compiled by llguidance, and the matcher that masks each step's
logits to the tokens the grammar allows.

Why llguidance and not llama.cpp's own GBNF sampler (issue #34): llama.cpp's grammar is a set of
parse stacks that it advances against every candidate token, and an ambiguous grammar multiplies
the stacks; `"pattern": "^(a?){0,300}$"` (each quantifier well under any bound) held the decode
thread, and with it every stream, in `llama_grammar_reject_candidates_for_stack` for minutes, in
C code nothing could interrupt. llguidance (the engine llama.cpp, vLLM and SGLang use) lexes
with regex derivatives and parses with an Earley parser: no backtracking, and every step's work
is bounded by fuel (LIMITS). A step that runs out of fuel puts the matcher in an error state,
and the generation ends there with an error naming the budget, while every other sequence's
step goes on. The same schema masks SmolLM2's 49,152 tokens in tens of microseconds.

Imports no web framework: the decode thread (engine.py) runs the matcher.
"""

from __future__ import annotations

import ctypes
import threading
import weakref
from typing import Callable

import llguidance
import llguidance.numpy
import msgspec
import numpy as np

from .model import Model, llama
from .reasoning import OPEN as THINK_OPEN

# Each step's work, bounded (llguidance's own figures: lexer fuel ~14k a millisecond, Earley
# items ~20k a millisecond): at most about 1.5 + 1 ms a token, where a SmolLM2 step takes 10-20
# ms, so a hostile grammar costs its neighbours at most a few percent of a token; an ordinary
# JSON Schema uses a few hundred units. Building a grammar's lexer is bounded the same way
# (initial_lexer_fuel) and so is its size; both are checked in the request, before any token.
LIMITS = dict(step_lexer_fuel=20_000, step_max_items=20_000, initial_lexer_fuel=1_000_000, max_grammar_size=200_000,
              max_lexer_states=50_000, verbose_errors=False)

# How a JSON value may be spaced: a space, or a line break and up to 8 spaces of indentation,
# between its tokens. llguidance's default (any run of white space) and llama.cpp's converter's
# (a line break and up to 20 spaces or tabs) let a small model that dislikes what the schema
# allows next write white space instead, until its tokens run out: SmolLM2, asked for an
# integer from 700 to 705, wrote `"n"\n:\n` and 16 tabs in its 24 tokens. Runs of spaces are one
# token in most vocabularies, so this costs at most about two tokens a gap.
JSON_OPTIONS = {"whitespace_pattern": r"(?: |\n {0,8})?", "item_separator": ",", "key_separator": ":"}


class GrammarError(ValueError):
    """A grammar that can't be compiled, or that is over a bound (the message says which)."""


def _failed(matcher: llguidance.LLMatcher) -> GrammarError:
    return GrammarError(matcher.get_error().split("\n")[0])  # its first line: the rest is a placeholder


def json_schema_grammar(schema: dict) -> str:
    """The grammar of JSON values a schema allows (as llguidance reads JSON Schema)."""
    return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)


def free_form_grammar(syntax: str, definition: str) -> str:
    """The grammar of a custom tool's free-form input (a Responses API `custom` tool's `format`):
    a Lark grammar or a regular expression, which llguidance reads as the client wrote it, as
    OpenAI's own constrained decoding does. Checked like any other by check_grammar."""
    if syntax == "regex":
        return llguidance.LLMatcher.grammar_from_regex(definition)
    return msgspec.json.encode({"grammars": [{"lark_grammar": definition}]}).decode()


def think_or_answer(answer: str) -> str:
    """`answer` (a grammar) or, first, an opening think tag (a thinking model that may open its
    think block: what it writes first decides; the reasoning then runs free)."""
    grammars = msgspec.json.decode(answer)["grammars"]
    grammars[0]["name"] = "answer"
    think = msgspec.json.encode(THINK_OPEN).decode()
    return msgspec.json.encode({"grammars": [{"lark_grammar": f"start: {think} | @answer"}, *grammars]}).decode()


# Keyed by the model itself, weakly: an id() outlives its model and may name another one later.
_tokenizers: weakref.WeakKeyDictionary[Model, llguidance.LLTokenizer] = weakref.WeakKeyDictionary()
_tokenizer_lock = threading.Lock()


def tokenizer(model: Model) -> llguidance.LLTokenizer:
    """The model's vocabulary as llguidance reads it, built once (0.55 s and 25 MiB for SmolLM2's 49k
    tokens, measured on a loaded host) on the first grammar's request rather than at start, which
    most requests never need. Control
    tokens (end of turn...) are marked special, so that no grammar's text matches them; the
    model's end-of-generation tokens end a grammar that is complete."""
    with _tokenizer_lock:
        if model not in _tokenizers:
            pieces = [model.grammar_bytes(token) for token in range(model.n_vocab)]
            eog = sorted({model.eos, *(t for t in model.special.values() if model.is_end_of_generation(t))} - {-1})
            tokenize = llama._lib.llama_tokenize
            _tokenizers[model] = llguidance.LLTokenizer.from_llamacpp(
                tokens=pieces, vocab_ptr=model.vocab, tokenize_fptr=ctypes.cast(tokenize, ctypes.c_void_p).value,
                eos_token=eog, slices=None)
        return _tokenizers[model]


class Matcher:
    """One sequence's grammar state: masks a step's logits to what the grammar allows next,
    and follows each sampled token."""

    def __init__(self, model: Model, grammar: str):
        self.matcher = llguidance.LLMatcher(tokenizer(model), grammar, log_level=0,
                                            limits=llguidance.LLParserLimits(**LIMITS))
        self.bitmask = llguidance.numpy.allocate_token_bitmask(1, model.n_vocab)
        self.n_vocab = model.n_vocab
        if self.matcher.is_error():
            raise _failed(self.matcher)

    def mask(self, logits: np.ndarray) -> None:
        """Every token the grammar does not allow next set to -inf, in place. Raises GrammarError
        when the step ran out of its budget."""
        llguidance.numpy.fill_next_token_bitmask(self.matcher, self.bitmask)
        if self.matcher.is_error():
            raise _failed(self.matcher)
        allowed = np.unpackbits(self.bitmask.view(np.uint8), bitorder="little")[: self.n_vocab]
        logits[allowed == 0] = -np.inf

    def accept(self, token: int) -> bool:
        """Follow a sampled token; True once the grammar is complete and allows nothing more."""
        if not self.matcher.consume_token(token):
            raise _failed(self.matcher)
        return self.matcher.is_stopped()


def check_grammar(model: Model, grammar: str) -> None:
    """Compile `grammar` and compute its first mask, as the decode thread will: a GrammarError
    now, in the request, for what can be known before any token. On a thread of GRAMMAR_STACK,
    as in the decode thread, not on the caller's stack."""
    failed: list[BaseException] = []

    def compile_grammar() -> None:
        try:
            Matcher(model, grammar).mask(np.zeros(model.n_vocab, dtype=np.float32))
        except BaseException as e:  # whatever it is: lost with this thread, the grammar would pass the check
            failed.append(e)

    start_thread(compile_grammar, "grammar").join()
    if failed:
        raise failed[0]


# llguidance's compiler recurses through a schema's nesting on the thread that compiles it, and
# an overflow is a SIGSEGV of the whole process: a schema of tools.MAX_SCHEMA_DEPTH levels
# overflowed a 128 KiB stack (musl's default for threads) and compiled on 256 KiB; deeper JSON is
# refused by its parser's own recursion limit. The threads that compile grammars (a request's
# check, the decode thread) get this much stack, whatever the platform's default.
GRAMMAR_STACK = 4 << 20
_stack_size = threading.Lock()  # threading.stack_size is process-wide: set, start, restore


def start_thread(target: Callable[[], None], name: str) -> threading.Thread:
    """A started daemon thread with GRAMMAR_STACK of stack."""
    with _stack_size:
        previous = threading.stack_size(GRAMMAR_STACK)
        try:
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
        finally:
            threading.stack_size(previous)
    return thread
