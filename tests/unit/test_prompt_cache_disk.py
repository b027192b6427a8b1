"""The prompt cache's file (prompt_cache_disk.py): what is written is read back in the same order,
the file stays within the tier's bound and the write within its deadline, and a file that is
another model's, cut short or corrupt is never loaded past its last sound record, with a log
line, never an exception. States here are random bytes (the file does not read them); restoring
real ones into llama.cpp is tests/test_prompt_cache.py's."""

import ctypes
import json
import os
import time

import numpy as np
import pytest

from gguf_serve import prompt_cache_disk
from gguf_serve.config import ConfigError, load_config
from gguf_serve.prompt_cache import Entry, PromptCache

HASH = bytes(range(32))  # what computed the states
HEAD = len(prompt_cache_disk.MAGIC) + len(HASH)


def entry(seed: int, n_tokens: int, state_bytes: int) -> Entry:
    rng = np.random.default_rng(seed)
    state = (ctypes.c_uint8 * state_bytes).from_buffer_copy(rng.integers(0, 256, state_bytes, dtype=np.uint8).tobytes())
    return Entry(rng.integers(0, 49152, n_tokens, dtype=np.int32), state)


def record_size(e: Entry) -> int:
    return prompt_cache_disk.RECORD.size + e.tokens.nbytes + len(e.state)


def tier(entries: list[Entry], max_bytes: int = 1 << 20) -> PromptCache:
    """A tier holding `entries`, the hottest first (no model: saving and restoring are not used)."""
    cache = PromptCache(None, max_bytes, default_tokens=0)
    cache.load(entries)
    assert cache.loaded == len(entries)
    return cache


def same(a: list[Entry], b: list[Entry]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x.tokens, y.tokens) and bytes(x.state) == bytes(y.state)
                                    for x, y in zip(a, b))


def hottest_first(cache: PromptCache) -> list[Entry]:
    return list(reversed(cache.entries.values()))


def events(capsys) -> list[dict]:
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


ENTRIES = [entry(i, 100 + 10 * i, 5000 + 1000 * i) for i in range(4)]


def test_what_is_written_is_read_back_hottest_first(tmp_path, capsys):
    prompt_cache_disk.write(tier(ENTRIES), tmp_path, HASH, time.monotonic() + 60)
    again = PromptCache(None, 1 << 20, default_tokens=0)
    prompt_cache_disk.read(again, tmp_path, HASH)
    assert same(hottest_first(again), ENTRIES) and again.loaded == 4
    written, read = events(capsys)
    assert written["event"] == "prompt_cache_written" and written["entries"] == 4 and not written["deadline_reached"]
    assert read == {**read, "event": "prompt_cache_read", "entries": 4, "bytes": again.bytes}
    assert [p.name for p in tmp_path.iterdir()] == ["prompt-cache"]  # no file left behind


def test_the_file_stays_within_the_bound_and_a_smaller_tier_reads_only_the_hottest(tmp_path):
    """The tier's bound counts states; the file holds tokens and records too, so what would pass
    the bound is left out, and a start with a smaller bound reads what fits of the hottest."""
    bound = sum(len(e.state) for e in ENTRIES)  # the states fit exactly: the last record can't
    prompt_cache_disk.write(tier(ENTRIES, bound), tmp_path, HASH, time.monotonic() + 60)
    assert (tmp_path / "prompt-cache").stat().st_size <= bound
    smaller = PromptCache(None, len(ENTRIES[0].state) + len(ENTRIES[1].state), default_tokens=0)
    prompt_cache_disk.read(smaller, tmp_path, HASH)
    assert same(hottest_first(smaller), ENTRIES[:2]) and smaller.bytes <= smaller.max_bytes


def test_the_default_bound_is_measured_on_the_first_entry_read(tmp_path):
    """PROMPT_CACHE_MIB unset: default_tokens tokens' worth, in the first state's bytes a token."""
    prompt_cache_disk.write(tier(ENTRIES), tmp_path, HASH, time.monotonic() + 60)
    per_token = len(ENTRIES[0].state) / len(ENTRIES[0].tokens)
    cache = PromptCache(None, None, default_tokens=250)  # room for 250 of its tokens: the first two entries
    prompt_cache_disk.read(cache, tmp_path, HASH)
    assert cache.max_bytes == int(per_token * 250) and same(hottest_first(cache), ENTRIES[:2])


def test_a_deadline_spent_writes_nothing_and_keeps_the_file_there(tmp_path, capsys):
    prompt_cache_disk.write(tier(ENTRIES), tmp_path, HASH, time.monotonic() + 60)
    before = (tmp_path / "prompt-cache").read_bytes()
    prompt_cache_disk.write(tier(ENTRIES[:1]), tmp_path, HASH, time.monotonic() - 1)
    assert (tmp_path / "prompt-cache").read_bytes() == before
    not_written = {"event": "prompt_cache_not_written", "reason": "the drain's grace was spent", "entries": 1}
    assert events(capsys)[-1] == not_written


def test_a_deadline_reached_mid_write_keeps_the_records_before_it(tmp_path, monkeypatch, capsys):
    """A clock that passes the deadline once the second entry's state has begun: the file holds
    the first entry, whole, and reads back as that alone."""
    monkeypatch.setattr(prompt_cache_disk, "PIECE", 1000)  # several pieces an entry
    clock = iter(range(10_000))
    monkeypatch.setattr(prompt_cache_disk.time, "monotonic", lambda: next(clock))
    pieces_first = -(-len(ENTRIES[0].state) // 1000)
    deadline = 1 + pieces_first + 2  # the start's reading, the first entry's pieces, then two of the second's
    prompt_cache_disk.write(tier(ENTRIES), tmp_path, HASH, deadline)
    assert (tmp_path / "prompt-cache").stat().st_size == HEAD + record_size(ENTRIES[0])
    monkeypatch.undo()
    cache = PromptCache(None, 1 << 20, default_tokens=0)
    prompt_cache_disk.read(cache, tmp_path, HASH)
    assert same(hottest_first(cache), ENTRIES[:1])
    assert [e["event"] for e in events(capsys)] == ["prompt_cache_written", "prompt_cache_read"]


@pytest.mark.parametrize("damage", ["cut in a record's head", "cut in its tokens", "cut in its state",
                                    "a state byte flipped", "a length made huge", "cut in the file's head",
                                    "another model", "not a cache file"])
def test_a_damaged_file_loads_the_sound_records_before_the_damage_and_says_so(tmp_path, capsys, damage):
    prompt_cache_disk.write(tier(ENTRIES), tmp_path, HASH, time.monotonic() + 60)
    path = tmp_path / "prompt-cache"
    data = bytearray(path.read_bytes())
    second = HEAD + record_size(ENTRIES[0])  # where the second record begins
    tokens = second + prompt_cache_disk.RECORD.size
    state = tokens + ENTRIES[1].tokens.nbytes
    sound = 1  # the records kept
    if damage == "cut in a record's head":
        data = data[: second + 5]
    elif damage == "cut in its tokens":
        data = data[: tokens + 7]
    elif damage == "cut in its state":
        data = data[: state + 100]
    elif damage == "a state byte flipped":
        data[state + 100] ^= 1
    elif damage == "a length made huge":
        data[tokens - 8 : tokens - 4] = (1 << 31).to_bytes(4, "little")  # the state's size's top bytes
    else:
        sound = 0
        data = {"cut in the file's head": data[:HEAD - 3], "not a cache file": b"GGUF" + bytes(100),
                "another model": data[: HEAD - 1] + b"!" + data[HEAD:]}[damage]
    path.write_bytes(data)
    cache = PromptCache(None, 1 << 20, default_tokens=0)
    prompt_cache_disk.read(cache, tmp_path, HASH)
    assert same(hottest_first(cache), ENTRIES[:sound])
    lines = events(capsys)[1:]  # after the write's
    assert lines[0]["event"] == "prompt_cache_ignored" and lines[0]["file"] == str(path), lines
    reason = {"cut in a record's head": "truncated", "cut in its tokens": "truncated", "cut in its state": "truncated",
              "a length made huge": "truncated", "a state byte flipped": "checksum", "another model": "another model",
              "cut in the file's head": "truncated", "not a cache file": "not a prompt cache file"}[damage]
    assert reason in lines[0]["reason"]


def test_a_file_a_killed_writer_left_is_removed_and_a_live_writers_is_not(tmp_path):
    abandoned, live = tmp_path / ".prompt-cache-a.partial", tmp_path / ".prompt-cache-b.partial"
    abandoned.write_bytes(bytes(100)), live.write_bytes(bytes(100))
    long_ago = time.time() - prompt_cache_disk.ABANDONED_S - 1
    os.utime(abandoned, (long_ago, long_ago))
    prompt_cache_disk.write(tier(ENTRIES), tmp_path, HASH, time.monotonic() + 60)
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "prompt-cache"]


def test_a_directory_that_cant_be_written_is_a_log_line(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    prompt_cache_disk.write(tier(ENTRIES), tmp_path / "file" / "dir", HASH, time.monotonic() + 60)
    [line] = events(capsys)
    assert line["event"] == "prompt_cache_not_written" and line["entries"] == 4


def test_prompt_cache_dir_needs_the_prompt_cache():
    assert load_config({"PROMPT_CACHE_DIR": "/var/cache/x"}).prompt_cache_dir.name == "x"
    assert load_config({}).prompt_cache_dir is None
    with pytest.raises(ConfigError, match="PROMPT_CACHE_MIB=0"):
        load_config({"PROMPT_CACHE_DIR": "/var/cache/x", "PROMPT_CACHE_MIB": "0"})
