"""The KV cache's host-memory tier: when a sequence is taken for another prompt, the keys and
values of the tokens it held are saved here (llama.cpp's `llama_state_seq_get_data_ext`), and a
later prompt that shares a longer prefix with a saved entry than with any sequence has them
restored (`..._set_data_ext`) instead of computed again. Bounded in bytes (PROMPT_CACHE_MIB),
least recently used out first.

Why (issue #36): agents and chat apps send a conversation's whole history every turn, and once
conversations outnumber the sequences (PARALLEL), a turn lands on a sequence that holds another
conversation: its whole history was computed again, where most of it had been computed before.
Measured on SmolLM2 (23 KB of KV a token at f16): saving 600 tokens' state takes a few ms and
restoring it under 2 ms, against about a second to compute them on two cores; the restored
state is the computed one, byte for byte, so greedy output is the same either way.

Used by the decode thread only (engine.py), which owns the llama context: no locking.
"""

from __future__ import annotations

import ctypes
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from .model import Model, llama

# A sequence holding fewer tokens than this is not worth saving (its prompt costs less to compute
# than an entry's bookkeeping), nor an entry worth restoring for a gain under it.
MIN_SAVED = 64


@dataclass
class Entry:
    tokens: np.ndarray  # the token ids whose keys and values `state` holds, from position 0
    state: ctypes.Array  # llama.cpp's serialized sequence state


class PromptCache:
    def __init__(self, model: Model, max_bytes: int | None, kv_tokens: int):
        """`max_bytes` None: a quarter of what the sequences' own KV cache (`kv_tokens` tokens) takes,
        as measured on the first state saved (the KV's bytes a token depend on the model's layers,
        heads and KV_CACHE_TYPE: 23 KB at f16 for SmolLM2-135M, 45 MiB for a quarter of its 4 x
        2048 tokens, which keeps the default model within Cloud Run's 512 MiB: docs/deploy.md)."""
        self.model, self.max_bytes, self.kv_tokens = model, max_bytes, kv_tokens
        self.entries: OrderedDict[int, Entry] = OrderedDict()  # least recently used first
        self.bytes = 0
        self.next_key = 0
        # for the metrics (read from the event loop's thread: plain numbers, no lock needed)
        self.hits = self.restored_tokens = self.evictions = self.saves = self.loaded = 0

    def save(self, seq_id: int, tokens: list[int]) -> None:
        """Keep the state of sequence `seq_id`, which holds `tokens`, unless it is too small, too
        large for the bound alone, or already held (an entry with these tokens or more). An entry
        it extends is dropped: this one serves whatever that one did."""
        if len(tokens) < MIN_SAVED:
            return
        held = np.array(tokens, dtype=np.int32)
        for key, entry in list(self.entries.items()):
            common = _common_prefix(entry.tokens, held)
            if common == len(held):
                self.entries.move_to_end(key)
                return
            if common == len(entry.tokens):
                self._drop(key)
        size = llama.llama_state_seq_get_size_ext(self.model.ctx, seq_id, 0)
        if size > self._bound(size, len(tokens)):
            return
        while self.entries and self.bytes + size > self.max_bytes:
            self._drop(next(iter(self.entries)))
            self.evictions += 1
        state = (ctypes.c_uint8 * size)()
        if llama.llama_state_seq_get_data_ext(self.model.ctx, state, size, seq_id, 0) != size:
            return
        self._add(Entry(held, state))
        self.saves += 1

    def load(self, entries: Iterable[Entry]) -> None:
        """Add `entries`, the hottest first, each less recently used than those before it, until one
        does not fit in what room is left: the rest, colder, are not read. The disk tier's, read at
        start (prompt_cache_disk.py) into a tier that holds nothing yet."""
        for entry in entries:
            if self.bytes + len(entry.state) > self._bound(len(entry.state), len(entry.tokens)):
                return
            self._add(entry)
            self.entries.move_to_end(self.next_key - 1, last=False)
            self.loaded += 1

    def _bound(self, size: int, tokens: int) -> int:
        """The bound in bytes; PROMPT_CACHE_MIB's default is measured on the first state, `size`
        bytes for `tokens` tokens."""
        if self.max_bytes is None:
            self.max_bytes = size * self.kv_tokens // (4 * tokens)
        return self.max_bytes

    def _add(self, entry: Entry) -> None:
        self.entries[self.next_key] = entry
        self.next_key += 1
        self.bytes += len(entry.state)

    def longest(self, prompt: list[int]) -> tuple[int | None, int]:
        """The entry sharing the longest prefix with `prompt`, and that prefix's length."""
        wanted = np.array(prompt, dtype=np.int32)
        best, length = None, 0
        for key, entry in self.entries.items():
            common = _common_prefix(entry.tokens, wanted)
            if common > length:
                best, length = key, common
        return best, length

    def take(self, key: int) -> Entry:
        """Entry `key`, out of the cache: taken before the sequence it goes into is saved (that
        save may need room, and must not evict this one), and held by that sequence from then on,
        which saves it again when it is taken."""
        entry = self.entries[key]
        self._drop(key)
        return entry

    def restore(self, entry: Entry, seq_id: int) -> list[int]:
        """Put `entry`'s state into sequence `seq_id` (what it held is dropped); returns the
        tokens the sequence now holds, or [] if llama.cpp refused the state."""
        llama.llama_memory_seq_rm(self.model.memory, seq_id, -1, -1)
        if llama.llama_state_seq_set_data_ext(self.model.ctx, entry.state, len(entry.state), seq_id, 0) == 0:
            llama.llama_memory_seq_rm(self.model.memory, seq_id, -1, -1)
            return []
        self.hits += 1
        return entry.tokens.tolist()

    def _drop(self, key: int) -> None:
        self.bytes -= len(self.entries.pop(key).state)


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n
