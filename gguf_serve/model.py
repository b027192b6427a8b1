"""A GGUF loaded through llama.cpp's C API: its weights, vocabulary, metadata and context, and
how its tokenizer turns a rendered prompt into tokens."""

from __future__ import annotations

import ctypes
import importlib.util
import re
import sys
import time
from pathlib import Path


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


def _gil_held(function):
    """One of llama.cpp's functions, called without releasing the GIL: for calls that return at
    once. ctypes releases it around every call, and a thread that wants it back waits for
    whichever thread holds it to let go, up to the 5 ms switch interval: the 49,152 calls that
    read SmolLM2's special tokens took 932 ms beside a busy thread (at a cold start the web
    stack imports while the model loads), 17 ms this way (12-14 alone either way)."""
    held = getattr(ctypes.PyDLL(llama._lib._name, handle=llama._lib._handle), function.__name__)
    held.argtypes, held.restype = function.argtypes, function.restype
    return held


vocab_get_attr, vocab_get_text = _gil_held(llama.llama_vocab_get_attr), _gil_held(llama.llama_vocab_get_text)
token_to_piece = _gil_held(llama.llama_token_to_piece)


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

# KV_CACHE_TYPE_K/_V's values, as llama-server's --cache-type-k/-v (ggml's type numbers; bf16 is 30).
KV_CACHE_TYPES = {"f32": llama.GGML_TYPE_F32, "f16": llama.GGML_TYPE_F16, "bf16": 30, "q8_0": llama.GGML_TYPE_Q8_0,
                  "q4_0": llama.GGML_TYPE_Q4_0, "q4_1": llama.GGML_TYPE_Q4_1, "q5_0": llama.GGML_TYPE_Q5_0,
                  "q5_1": llama.GGML_TYPE_Q5_1}

# A prompt is computed this many tokens a step, in the same chunks whether it runs alone or beside
# others: llama-server's n_ubatch, so a long prompt is computed by the same graphs as there. Measured
# with SmolLM2 on 2 cores under a load of 7-9 (2026-12-07, a 5,701-token prompt in one sequence through
# llama.cpp's C API, alternating): 512-token chunks 35.2 and 33.3 tokens/s, 128-token ones 24.2 and
# 21.5, batch filling 5 ms of it either way. Each llama_decode is a graph of a few hundred ops whose
# threads meet at a barrier after each, and 128-token chunks meet 4 times as often a token. The price:
# a running stream pauses one chunk while someone else's prompt is computed (`python -m bench join`),
# where llama-server pauses it for the whole prompt.
PROMPT_CHUNK = 512

# POOLING's values and llama.cpp's pooling types (a GGUF's `<arch>.pooling_type` holds the number).
POOLING = {"mean": llama.LLAMA_POOLING_TYPE_MEAN, "cls": llama.LLAMA_POOLING_TYPE_CLS, "last": llama.LLAMA_POOLING_TYPE_LAST}
# An embedding model decodes many inputs at once, each a sequence: short texts fill a batch this way.
EMBEDDING_SEQS = 64

SPECIAL_ATTRS = llama.LLAMA_TOKEN_ATTR_CONTROL | llama.LLAMA_TOKEN_ATTR_USER_DEFINED | llama.LLAMA_TOKEN_ATTR_UNKNOWN


class Model:
    """A loaded GGUF: its vocabulary, metadata and (unless vocab_only) weights and context."""

    def __init__(self, path: Path, n_ctx: int = 0, n_threads: int = 1, parallel: int = 1, vocab_only: bool = False,
                 kv_cache: tuple[str, str] = ("f16", "f16"),
                 flash_attn: str = "auto", pooling: str | None = None, past_training: bool = False):
        """`past_training`: `n_ctx` is taken as given even past the model's training length
        (a causal model only: an encoder has no positions past it)."""
        check_model_file(path)
        params = llama.llama_model_default_params()
        params.vocab_only = vocab_only
        # No weight repacking: repacked kernels compute a row differently when 4 or more rows
        # share a batch, so a request's greedy tokens would depend on who else is running.
        params.use_extra_bufts = False
        _log_lines.clear()
        started = time.perf_counter()
        self.model = llama.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            reason = next((line for line in _log_lines if line), "llama.cpp could not load it")
            raise ModelFileError(f"{path}: {reason}; the file may be truncated or corrupt, download it again")
        self.vocab = llama.llama_model_get_vocab(self.model)
        self.n_vocab = llama.llama_vocab_n_tokens(self.vocab)
        self._pieces: dict[int, bytes] = {}
        self.metadata = self._read_metadata()
        self.bos = llama.llama_vocab_bos(self.vocab)
        self.eos = llama.llama_vocab_eos(self.vocab)
        self.add_bos = bool(llama.llama_vocab_get_add_bos(self.vocab)) and self.bos >= 0
        fim = [llama.llama_vocab_fim_pre(self.vocab), llama.llama_vocab_fim_suf(self.vocab), llama.llama_vocab_fim_mid(self.vocab)]
        self.fim = tuple(fim) if min(fim) >= 0 else None  # fill-in-the-middle tokens, for models trained with them
        self.special = self._special_tokens()
        self._special_re = re.compile("|".join(re.escape(t) for t in sorted(self.special, key=len, reverse=True)))
        self.n_ctx_train = llama.llama_model_n_ctx_train(self.model)
        self.n_embd = llama.llama_model_n_embd_out(self.model)
        # An embedding model is one whose GGUF says how it pools (BERT-family encoders, Qwen3-Embedding...):
        # it serves embeddings only. A chat model pools as POOLING says, by default the mean of its
        # last hidden states (see embeddings_api.py).
        declared = {v: k for k, v in POOLING.items()}.get(int(self.metadata.get(f"{self.architecture}.pooling_type", 0)))
        self.embedding_only = declared is not None
        self.pooling = pooling or declared or "mean"
        self.ctx = None
        self.timings = {"model_read": time.perf_counter() - started}  # seconds each step of loading took (the start-up log line)
        if not vocab_only:
            asked = n_ctx or self.n_ctx_train
            self.n_ctx = asked if past_training and not self.embedding_only else min(asked, self.n_ctx_train)
            cparams = llama.llama_context_default_params()
            cparams.n_ctx = self.n_ctx * parallel  # every sequence gets the full context length
            cparams.n_seq_max = parallel
            cparams.n_batch = cparams.n_ubatch = max(PROMPT_CHUNK, parallel)
            if self.embedding_only:
                # llama.cpp pools each input in the graph, which needs all of it in one ubatch (an
                # encoder has no KV cache to go on from), so a batch is the whole context; its
                # sequences share one KV stream, emptied after every batch.
                cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = self.n_ctx
                cparams.n_seq_max, cparams.kv_unified = EMBEDDING_SEQS, True
                cparams.embeddings, cparams.pooling_type = True, POOLING[self.pooling]
            cparams.n_threads = cparams.n_threads_batch = n_threads
            cparams.flash_attn_type = FLASH_ATTN[flash_attn]
            cparams.type_k, cparams.type_v = (KV_CACHE_TYPES[t] for t in kv_cache)
            cparams.no_perf = True
            self.ctx = llama.llama_init_from_model(self.model, cparams)
            if not self.ctx:
                raise ModelFileError(f"{path}: llama.cpp could not create a context of {n_ctx} tokens; lower N_CTX")
            self.memory = llama.llama_get_memory(self.ctx)
            self.n_batch = llama.llama_n_batch(self.ctx)
            self.timings["context"] = time.perf_counter() - started - self.timings["model_read"]

    @property
    def architecture(self) -> str:
        return self.metadata.get("general.architecture", "")

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
            if vocab_get_attr(self.vocab, token) & SPECIAL_ATTRS:
                text = vocab_get_text(self.vocab, token).decode(errors="replace")
                if text:
                    special.setdefault(text, token)
        return special

    def token_text(self, token: int) -> str:
        return vocab_get_text(self.vocab, token).decode(errors="replace") if token >= 0 else ""

    # --- Tokens ---

    def tokenize(self, text: str, special: bool = False, add_special: bool = False) -> list[int]:
        """Plain tokenization; with `special`, special-token texts become their tokens; with
        `add_special`, the BOS/EOS (BERT: CLS/SEP) the model's tokenizer adds around a text."""
        data = text.encode()
        buf = (llama.llama_token * (len(data) + 8))()
        n = llama.llama_tokenize(self.vocab, data, len(data), buf, len(buf), add_special, special)
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
        return vocab_get_attr(self.vocab, fragment) if isinstance(fragment, int) else 0

    def piece(self, token: int) -> bytes:
        """A token's bytes, remembered once asked for (3 us through ctypes, 0.1 from the dict:
        the decode thread asks for every generated token)."""
        piece = self._pieces.get(token)
        if piece is None:
            buf = ctypes.create_string_buffer(64)
            n = token_to_piece(self.vocab, token, buf, len(buf), 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = token_to_piece(self.vocab, token, buf, len(buf), 0, False)
            piece = self._pieces[token] = buf.raw[:n]
        return piece

    def grammar_bytes(self, token: int) -> bytes:
        """A token's bytes as an output grammar reads them (grammar.tokenizer): its piece, or for a
        control token (end of turn...), whose piece is empty, its text behind a 0xFF byte, which
        no UTF-8 text holds: llguidance's mark of a special token, which no grammar's text matches."""
        if vocab_get_attr(self.vocab, token) & llama.LLAMA_TOKEN_ATTR_CONTROL:
            return b"\xff" + vocab_get_text(self.vocab, token)
        return self.piece(token)

    def detokenize(self, tokens: list[int]) -> str:
        return b"".join(self.piece(t) for t in tokens if t != self.bos).decode(errors="replace")

    def is_end_of_generation(self, token: int) -> bool:
        return llama.llama_vocab_is_eog(self.vocab, token)
