"""prompt_cache.split and Held.state on states laid out as llama.cpp writes them (written here:
the real model's states are tests/test_prompt_cache.py's), including what the model's own don't
show: cells out of position order, the sequence in another stream, transposed values; and the
states split can't read, kept whole."""

import struct

import numpy as np

from gguf_serve import prompt_cache
from gguf_serve.prompt_cache import MAGIC, Held, split

K_ROW, V_EL, N_EMBD_V, N_LAYER = 8, 2, 4, 2


def state(positions: list[int], stream: int, n_stream: int, v_trans: bool, seed: int = 0) -> tuple[bytes, dict]:
    """A sequence's state whose cells hold `positions` in that order, in stream `stream`; and each
    position's bytes in each section, to compare with."""
    rng = np.random.default_rng(seed)
    n = len(positions)
    rows = {}
    out = [struct.pack("<Ii", MAGIC, 3), struct.pack("<I", n_stream)]
    out += [struct.pack("<I", 0)] * stream + [struct.pack("<I", n)]
    out += [struct.pack("<iIi", p, 1, 3) for p in positions]
    out.append(struct.pack("<II", int(v_trans), N_LAYER))
    for layer in range(N_LAYER):
        k = rng.integers(0, 256, (n, K_ROW), dtype=np.uint8)
        out += [struct.pack("<iQ", 1, K_ROW), k.tobytes()]
        rows[("k", layer)] = {p: k[i].tobytes() for i, p in enumerate(positions)}
    for layer in range(N_LAYER):
        if v_trans:
            v = rng.integers(0, 256, (N_EMBD_V, n, V_EL), dtype=np.uint8)
            out += [struct.pack("<iII", 1, V_EL, N_EMBD_V), v.tobytes()]
            rows[("v", layer)] = {p: v[:, i].tobytes() for i, p in enumerate(positions)}
        else:
            v = rng.integers(0, 256, (n, K_ROW), dtype=np.uint8)
            out += [struct.pack("<iQ", 1, K_ROW), v.tobytes()]
            rows[("v", layer)] = {p: v[i].tobytes() for i, p in enumerate(positions)}
    out += [struct.pack("<I", 0)] * (n_stream - stream - 1)
    return b"".join(out), rows


def by_position(blob: bytes, n: int) -> dict:
    """Each section's bytes for each position, read back from a state `split` accepts."""
    layout, sections = split(bytearray(blob), n)
    out = {}
    for i, (rows, axis) in enumerate(zip(sections, layout.axes)):
        name = ("k" if i < N_LAYER else "v", i % N_LAYER)
        out[name] = {p: (np.take(rows, p, axis=axis)).tobytes() for p in range(n)}
    return out


def rebuilt(blob: bytes, n: int) -> bytes:
    layout, sections = split(bytearray(blob), n)
    blocks = []
    for start in range(0, n, prompt_cache.BLOCK):
        end = min(start + prompt_cache.BLOCK, n)
        cut = [np.take(r, np.arange(start, end), axis=a) for r, a in zip(sections, layout.axes)]
        blocks.append(prompt_cache.Block(b"", cut, 0))
    return bytes(Held(np.zeros(n, dtype=np.int32), layout, blocks, None).state)


def test_a_state_in_position_order_in_the_first_stream_comes_back_byte_for_byte():
    for v_trans in (False, True):
        blob, _ = state(list(range(150)), 0, 1, v_trans)
        assert rebuilt(blob, 150) == blob


def test_cells_out_of_order_in_another_stream_come_back_in_position_order():
    positions = list(np.random.default_rng(1).permutation(150))
    for v_trans in (False, True):
        blob, rows = state(positions, 2, 4, v_trans)
        again = rebuilt(blob, 150)
        assert by_position(again, 150) == rows
        # the sequence in the first stream, the others empty, its positions 0 to n - 1 in order
        assert struct.unpack_from("<II", again, 8) == (4, 150) and again.endswith(bytes(12))
        assert [struct.unpack_from("<i", again, 16 + 12 * i)[0] for i in range(150)] == list(range(150))


def test_states_split_cannot_read_are_refused():
    blob, _ = state(list(range(100)), 0, 1, False)
    assert split(bytearray(blob), 99) is None  # not the tokens' count
    assert split(bytearray(blob[:-1]), 100) is None  # cut short
    assert split(bytearray(blob + b"\0"), 100) is None  # more than one cache's (a hybrid model's)
    assert split(bytearray(b"\0" * 4 + blob[4:]), 100) is None  # not llama_context's magic
    gap, _ = state([0, 1, 3], 0, 1, False)
    assert split(bytearray(gap), 3) is None  # positions with a hole
    twice = bytearray(blob[:12] + struct.pack("<I", 100) + blob[12:])  # a count more than the layout has room for
    assert split(twice, 100) is None
    assert split(bytearray(np.random.default_rng(2).integers(0, 256, 4096, dtype=np.uint8).tobytes()), 10) is None
