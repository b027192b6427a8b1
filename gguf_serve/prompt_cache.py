"""The KV cache's host-memory tier: when a sequence is taken for another prompt, the keys and
values of the tokens it held are saved here (llama.cpp's `llama_state_seq_get_data_ext`), and a
later prompt that shares a longer prefix with a saved entry than with any sequence has them
restored (`..._set_data_ext`) instead of computed again. Bounded in bytes (PROMPT_CACHE_MIB):
room is made from the end of the entry holding the most of its own (PromptCache._shed).

Why (issue #36): agents and chat apps send a conversation's whole history every turn, and once
conversations outnumber the sequences (PARALLEL), a turn lands on a sequence that holds another
conversation: its whole history was computed again, where most of it had been computed before.
Measured on SmolLM2 (23 KB of KV a token at f16): saving 600 tokens' state takes a few ms and
restoring it under 2 ms, against about a second to compute them on two cores; the restored
state is the computed one, byte for byte, so greedy output is the same either way.

Entries are kept in blocks of BLOCK tokens' keys and values, each block once however many entries
share it (vLLM's prefix caching keeps its blocks the same way): conversations behind one system
prompt share its blocks, so the tier holds that prompt once and each conversation's own tokens.
Measured (bench multiturn, 8 conversations on 4 sequences, a 1,000-token system prompt): with
whole states the default bound held fewer conversations than were parked, and least recently
used out first took each one just before its next turn, 0 hits.

Used by the decode thread only (engine.py), which owns the llama context: no locking.
"""

from __future__ import annotations

import ctypes
import hashlib
import struct
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from .model import Model, llama

# A sequence holding fewer tokens than this is not worth saving (its prompt costs less to compute
# than an entry's bookkeeping), nor an entry worth restoring for a gain under it.
MIN_SAVED = 64


# Tokens a block holds. Smaller shares more of a prompt that ends inside a block, and room is made
# in smaller steps, for more bookkeeping per restore (a block is 2 arrays per layer).
BLOCK = 64
U32, SECTION = struct.Struct("<I"), struct.Struct("<iQ")
MAX_STREAMS = 256  # llama.cpp's LLAMA_MAX_SEQ: a state that names more is not one
MAGIC = 0xAF143CD8  # llama_context's io_magic: a sequence's state starts with it and the sequence's id


@dataclass
class Entry:
    tokens: np.ndarray  # the token ids whose keys and values `state` holds, from position 0
    state: ctypes.Array | bytes  # llama.cpp's serialized sequence state


@dataclass
class Block:
    """BLOCK tokens' keys and values (fewer in an entry's last block): each section's rows."""
    key: bytes  # a digest of every token up to the block's end: equal blocks, equal keys
    rows: list[np.ndarray]
    nbytes: int
    users: int = 0


@dataclass
class Layout:
    """A sequence's state as llama.cpp writes it for one attention cache: llama_context's u32
    magic and i32 seq_id, then llama_kv_cache::state_write's u32 n_stream; for each stream u32
    cell_count, and for the stream that holds the sequence, each cell's (i32 pos, u32 n_seq_id =
    1, i32 seq_id), u32 v_trans, u32 n_layer, then sections: each layer's keys (i32 type, u64 row
    bytes, a row for each cell), each layer's values (the same; with v_trans, i32 type, u32
    element bytes, u32 n_embd_v, then for each of the n_embd_v a cell's element). Everything but
    the rows is `heads`."""
    magic: bytes  # llama_context's: its magic and the id of the sequence saved
    n_stream: int
    v_trans: int
    heads: list[bytes]  # each section's head (the first also holds v_trans and n_layer)
    axes: list[int]  # the axis of the cells in each section's rows


class Held:
    """An entry in the tier: its tokens, and its state in shared blocks (or whole when it is not a
    plain attention cache's: a recurrent or sliding-window model's, or cells with extensions)."""

    def __init__(self, tokens: np.ndarray, layout: Layout | None, blocks: list[Block], whole: ctypes.Array | bytes | None):
        self.tokens, self.layout, self.blocks, self.whole = tokens, layout, blocks, whole

    def own_bytes(self) -> int:
        """The bytes that dropping this entry would free."""
        if self.whole is not None:
            return len(self.whole)
        return sum(block.nbytes for block in self.blocks if block.users == 1)

    @property
    def state(self) -> ctypes.Array | bytes:
        """The state as llama.cpp reads it back: the sequence in the first stream, its cells in
        position order."""
        if self.whole is not None:
            return self.whole
        layout, n = self.layout, len(self.tokens)
        cells = np.empty((n, 3), dtype="<i4")  # pos, n_seq_id, the sequence saved (read back as the one restored)
        cells[:, 0], cells[:, 1], cells[:, 2] = np.arange(n), 1, np.frombuffer(layout.magic, dtype="<i4")[1]
        parts = [layout.magic, U32.pack(layout.n_stream), U32.pack(n), cells.tobytes()]
        for i, (head, axis) in enumerate(zip(layout.heads, layout.axes)):
            parts.append(head)
            parts.append(np.concatenate([block.rows[i] for block in self.blocks], axis=axis).tobytes())
        parts.append(bytes(4 * (layout.n_stream - 1)))
        joined = b"".join(parts)
        return (ctypes.c_uint8 * len(joined)).from_buffer_copy(joined)


def split(state: ctypes.Array, n_tokens: int) -> tuple[Layout, list[np.ndarray]] | None:
    """The layout of a sequence's `state` and each section's rows, the cells in position order; None
    if it is not one attention cache's state of `n_tokens` cells at positions 0 to n_tokens - 1."""
    data = np.frombuffer(state, dtype=np.uint8)
    try:
        if U32.unpack_from(data, 0)[0] != MAGIC:
            return None
        n_stream, off = U32.unpack_from(data, 8)[0], 12
        if n_stream > MAX_STREAMS:
            return None
        found = None
        for _ in range(n_stream):
            (count,), off = U32.unpack_from(data, off), off + 4
            if count == 0:
                continue
            if found is not None or count != n_tokens:
                return None
            cells = np.frombuffer(data, dtype="<i4", count=3 * count, offset=off).reshape(count, 3)
            off += cells.nbytes
            order = np.argsort(cells[:, 0], kind="stable")
            if not (np.array_equal(cells[order, 0], np.arange(count)) and (cells[:, 1] == 1).all()):
                return None
            ordered = bool((order == np.arange(count)).all())
            v_trans, n_layer = U32.unpack_from(data, off)[0], U32.unpack_from(data, off + 4)[0]
            start, off = off, off + 8
            heads, axes, rows = [], [], []
            for section in range(2 * n_layer):
                head_at = start if section == 0 else off
                if section >= n_layer and v_trans:
                    _, element, n_embd = struct.unpack_from("<iII", data, off)
                    off += 12
                    array = data[off : off + n_embd * count * element].reshape(n_embd, count, element)
                    axes.append(1)
                    rows.append(array if ordered else array[:, order])
                else:
                    _, row = SECTION.unpack_from(data, off)
                    off += SECTION.size
                    array = data[off : off + count * row].reshape(count, row)
                    axes.append(0)
                    rows.append(array if ordered else array[order])
                heads.append(bytes(data[head_at : off]))
                off += array.nbytes
            found = Layout(bytes(data[:8]), n_stream, v_trans, heads, axes), rows
        if found is None or off != len(data):
            return None
        return found
    except (struct.error, ValueError):
        return None


class PromptCache:
    def __init__(self, model: Model, max_bytes: int | None, default_tokens: int):
        """`max_bytes` None: what `default_tokens` tokens' keys and values take, as measured on the
        first state saved (the bytes a token depend on the model's layers, heads and
        KV_CACHE_TYPE: 23 KB at f16 for SmolLM2-135M)."""
        self.model, self.max_bytes, self.default_tokens = model, max_bytes, default_tokens
        self.entries: OrderedDict[int, Held] = OrderedDict()  # least recently used first
        self.blocks: dict[bytes, Block] = {}
        self.bytes = 0  # each block once, and the states kept whole
        self.next_key = 0
        # for the metrics (read from the event loop's thread: plain numbers, no lock needed)
        self.hits = self.restored_tokens = self.evictions = self.saves = self.loaded = 0

    def save(self, seq_id: int, tokens: list[int]) -> None:
        """Keep the state of sequence `seq_id`, which holds `tokens`, unless it is too small, too
        large for the bound alone, or already held (an entry with these tokens or more). An entry
        it covers is dropped (_drop_covered). Room for the blocks it does not share is made as
        _shed says."""
        if len(tokens) < MIN_SAVED:
            return
        held = np.array(tokens, dtype=np.int32)
        for key, entry in list(self.entries.items()):
            if _common_prefix(entry.tokens, held) == len(held):
                self.entries.move_to_end(key)
                return
        self._drop_covered(held)
        size = llama.llama_state_seq_get_size_ext(self.model.ctx, seq_id, 0)
        if size > self._bound(size, len(tokens)):
            return
        state = (ctypes.c_uint8 * size)()
        if llama.llama_state_seq_get_data_ext(self.model.ctx, state, size, seq_id, 0) != size:
            return
        if self._add(held, state, evict=True):
            self.saves += 1

    def load(self, entries: Iterable[Entry]) -> None:
        """Add `entries`, the hottest first, each less recently used than those before it, until one
        does not fit in what room is left: the rest, colder, are not read. The disk tier's, read at
        start (prompt_cache_disk.py) into a tier that holds nothing yet."""
        for entry in entries:
            self._bound(len(entry.state), len(entry.tokens))
            if not self._add(entry.tokens, entry.state, evict=False):
                return
            self.entries.move_to_end(self.next_key - 1, last=False)
            self.loaded += 1

    def _bound(self, size: int, tokens: int) -> int:
        """The bound in bytes; PROMPT_CACHE_MIB's default is measured on the first state, `size`
        bytes for `tokens` tokens."""
        if self.max_bytes is None:
            self.max_bytes = size * self.default_tokens // tokens
        return self.max_bytes

    def _add(self, tokens: np.ndarray, state: ctypes.Array | bytes, evict: bool) -> bool:
        """Hold `state` (of `tokens`) as the most recently used entry, in blocks where it splits
        into them, if the bytes it adds fit: after making room (_shed) when `evict`. False if they
        don't."""
        parts = split(state, len(tokens))
        if parts is None:
            held, new = Held(tokens, None, [], state), len(state)
            plan = []
        else:
            layout, rows = parts
            per_token = sum(r.nbytes for r in rows) // len(tokens)
            digest, plan, new = hashlib.blake2b(digest_size=16), [], 0
            for start in range(0, len(tokens), BLOCK):
                end = min(start + BLOCK, len(tokens))
                digest.update(tokens[start:end].tobytes())
                key = digest.digest()
                block = self.blocks.get(key)
                if block is not None:
                    block.users += 1  # shared: kept while room is made below
                else:
                    new += (end - start) * per_token
                plan.append((key, block, start, end))
            held = Held(tokens, layout, [], None)
        if evict and self.bytes + new > self.max_bytes:
            own = {key: entry.own_bytes() for key, entry in self.entries.items()}
            while own and self.bytes + new > self.max_bytes:
                key = max(own, key=own.get)  # the first of equals: the least recently used
                before = self.bytes
                if self._shed(key):
                    own[key] -= before - self.bytes
                else:
                    del own[key]
        if self.bytes + new > self.max_bytes:
            for _, block, _, _ in plan:
                if block is not None:
                    self._release(block)
            return False
        for key, block, start, end in plan:
            if block is None:
                cut = [np.take(r, np.arange(start, end), axis=axis) for r, axis in zip(rows, layout.axes)]
                block = self.blocks[key] = Block(key, cut, sum(c.nbytes for c in cut), users=1)
                self.bytes += block.nbytes
            held.blocks.append(block)
        if held.whole is not None:
            self.bytes += new
        self.entries[self.next_key] = held
        self.next_key += 1
        return True

    def longest(self, prompt: list[int]) -> tuple[int | None, int]:
        """The entry sharing the longest prefix with `prompt`, and that prefix's length."""
        wanted = np.array(prompt, dtype=np.int32)
        best, length = None, 0
        for key, entry in self.entries.items():
            common = _common_prefix(entry.tokens, wanted)
            if common > length:
                best, length = key, common
        return best, length

    def supersede(self, prompt: list[int]) -> None:
        """Drop the entries that `prompt`, which a sequence is about to hold, covers: saved again,
        whole, when that sequence is taken."""
        self._drop_covered(np.array(prompt, dtype=np.int32))

    def _drop_covered(self, tokens: np.ndarray) -> None:
        """Drop the entries `tokens` holds all of but, at most, their last block: a conversation's
        earlier states, which end in its answer as generated, where its next prompt has the answer
        as the client sent it back, tokenized again (not always the same tokens). Kept, they held
        room that the conversations parked here need (bench multiturn: a stale entry for each
        conversation in a sequence, as large as the parked ones once room was shared out)."""
        for key, entry in list(self.entries.items()):
            if _common_prefix(entry.tokens, tokens) >= len(entry.tokens) - BLOCK:
                self._drop(key)

    def take(self, key: int) -> Held:
        """Entry `key`, out of the cache: taken before the sequence it goes into is saved (that
        save may need room, and must not evict this one), and held by that sequence from then on,
        which saves it again when it is taken. Its blocks stay readable when the tier lets them go."""
        entry = self.entries[key]
        self._drop(key)
        return entry

    def restore(self, entry: Held, seq_id: int) -> list[int]:
        """Put `entry`'s state into sequence `seq_id` (what it held is dropped); returns the
        tokens the sequence now holds, or [] if llama.cpp refused the state."""
        llama.llama_memory_seq_rm(self.model.memory, seq_id, -1, -1)
        state = entry.state
        if llama.llama_state_seq_set_data_ext(self.model.ctx, state, len(state), seq_id, 0) == 0:
            llama.llama_memory_seq_rm(self.model.memory, seq_id, -1, -1)
            return []
        self.hits += 1
        return entry.tokens.tolist()

    def _shed(self, key: int) -> bool:
        """Make room from entry `key`: its last block, the tokens furthest from the prompts' shared
        start (vLLM frees a request's blocks tail first for this reason), or the whole entry when
        it is kept whole or what would be left is not worth restoring (False: it is gone). Room is
        made from the entry that holds the most bytes of its own (the least recently used of
        equals): conversations that outnumber what fits and come back in turn (bench multiturn)
        each keep a like part of their history, where dropping the least recently used entry
        drops each one just before its turn (measured: 0 of 24 such turns restored anything), and
        cutting the least recently used first cuts each most just before its turn."""
        entry = self.entries[key]
        self.evictions += 1
        if entry.whole is not None or (len(entry.blocks) - 1) * BLOCK < MIN_SAVED:
            self._drop(key)
            return False
        self._release(entry.blocks.pop())
        entry.tokens = entry.tokens[: len(entry.blocks) * BLOCK]
        return True

    def _drop(self, key: int) -> None:
        entry = self.entries.pop(key)
        if entry.whole is not None:
            self.bytes -= len(entry.whole)
        for block in entry.blocks:
            self._release(block)

    def _release(self, block: Block) -> None:
        block.users -= 1
        if block.users == 0:
            del self.blocks[block.key]
            self.bytes -= block.nbytes


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n
