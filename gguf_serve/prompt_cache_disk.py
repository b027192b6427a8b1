"""The prompt cache's tier on disk (PROMPT_CACHE_DIR, issue #36): when the server stops, the
host-memory tier's entries (prompt_cache.py) are written to one file, the hottest first, for as
long as the drain's grace leaves; at start they are read back, so that a scaled-to-zero
instance's first request restores a long system prompt instead of computing it.

The file, `<PROMPT_CACHE_DIR>/prompt-cache`: MAGIC, then what computed the states (`computed_by`:
the model file, llama.cpp's build, the context settings that shape a state or change its
values), then one record per entry: its token count, its state's size and a CRC-32 of both,
then its tokens (int32, little-endian) and its state (llama.cpp's serialized sequence). It is
written beside its place and renamed there, so a reader never sees one half written. A file
computed by anything else is not read; a record that is cut short or fails its checksum ends
the reading (its lengths can't be trusted), keeping the records before it; each says why in
a log line, and the start goes on. The file never holds more than the tier's bound.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import struct
import tempfile
import time
import zlib
from pathlib import Path
from typing import BinaryIO, Iterator

import msgspec
import numpy as np

from .model import Model, llama
from .prompt_cache import Entry, PromptCache

FILE = "prompt-cache"
MAGIC = b"gguf-serve prompt cache 1\n"  # the format's version is its last digit
RECORD = struct.Struct("<IQI")  # tokens, state bytes, CRC-32 of the tokens' bytes then the state's
# Written in pieces of this size, the deadline looked at between them: a few ms each (SmolLM2's
# default bound, 45 MiB, held 42.9 MB at SIGTERM, written in 0.027 s on 2 cores; read back at
# start, checksums included, in 0.094 s).
PIECE = 4 << 20
# A file being written that has not changed for this long is a writer's that died (killed past
# its grace): a live one writes without pause and stops at its deadline, SHUTDOWN_GRACE_S at most.
ABANDONED_S = 60.0
# Spread over the model file, these many blocks of BLOCK bytes are hashed to tell its weights from
# another's of the same size, name and metadata (a fine-tune's differ in every block) without
# reading gigabytes: 1 MiB in all, a few ms.
BLOCKS, BLOCK = 16, 64 << 10


def computed_by(model: Model, path: Path, n_ctx: int, kv_cache: tuple[str, str], flash_attn: str) -> bytes:
    """What the states of this process are computed by, hashed: a state is restored only into a
    process whose hash is the same. The model file (size, modification time, metadata, blocks of
    its weights), llama.cpp's library (another build may sum otherwise), the KV cache's types
    (a state holds them as they are stored), flash attention (it decides the layout of V and the
    values themselves) and the context per sequence. Taken at start: the file on disk may change
    under a running process."""
    digest = hashlib.sha256()
    stat, library = path.stat(), Path(llama._lib._name).stat()
    for value in (stat.st_size, stat.st_mtime_ns, library.st_size, library.st_mtime_ns, n_ctx, *kv_cache, flash_attn,
                  *sorted(model.metadata.items())):
        digest.update(repr(value).encode() + b"\0")
    with path.open("rb") as f:
        for i in range(BLOCKS):
            f.seek(stat.st_size * i // BLOCKS)
            digest.update(f.read(BLOCK))
    return digest.digest()


def write(cache: PromptCache, directory: Path, model_hash: bytes, deadline: float) -> None:
    """Replace the file with `cache`'s entries, the most recently used first, while they fit the
    bound and `deadline` (time.monotonic()) has not passed: an entry the deadline cuts is left
    out. No time left at all, the file there stays as it was. One log line says what was written."""
    started = time.monotonic()
    entries = list(reversed(cache.entries.values()))
    if started >= deadline:
        return log("prompt_cache_not_written", reason="the drain's grace was spent", entries=len(entries))
    target = directory / FILE
    try:
        directory.mkdir(parents=True, exist_ok=True)
        remove_abandoned(directory)
        fd, temp = tempfile.mkstemp(dir=directory, prefix=f".{FILE}-", suffix=".partial")
    except OSError as e:
        return log("prompt_cache_not_written", reason=f"{directory}: {e.strerror}", entries=len(entries))
    written, kept, cut = len(MAGIC) + len(model_hash), 0, False
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(MAGIC + model_hash)
            for held in entries:
                # whole, as llama.cpp reads it back: the blocks entries share in memory are not shared on disk
                entry = Entry(held.tokens, held.state)
                size = RECORD.size + entry.tokens.nbytes + len(entry.state)
                if written + size > cache.max_bytes:
                    continue  # a colder, smaller one may fit
                if not write_record(f, entry, deadline):
                    f.truncate(written)
                    cut = True
                    break
                written, kept = written + size, kept + 1
        os.replace(temp, target)
    except OSError as e:
        Path(temp).unlink(missing_ok=True)
        return log("prompt_cache_not_written", reason=f"{target}: {e.strerror}", entries=len(entries))
    log("prompt_cache_written", file=str(target), entries=kept, of=len(entries), bytes=written,
        seconds=round(time.monotonic() - started, 3), deadline_reached=cut)


def write_record(f: BinaryIO, entry: Entry, deadline: float) -> bool:
    """One entry's record; False, written in part, if the deadline passed first."""
    tokens = entry.tokens.astype("<i4").tobytes()
    state = memoryview(entry.state).cast("B")
    f.write(RECORD.pack(len(entry.tokens), len(state), zlib.crc32(state, zlib.crc32(tokens))) + tokens)
    for start in range(0, len(state), PIECE):
        if time.monotonic() >= deadline:
            return False
        f.write(state[start : start + PIECE])
    return True


def remove_abandoned(directory: Path) -> None:
    """Files a killed writer left: without this, each would hold up to a bound's worth for ever."""
    for partial in directory.glob(f".{FILE}-*.partial"):
        try:
            if time.time() - partial.stat().st_mtime > ABANDONED_S:
                partial.unlink()
        except FileNotFoundError:  # its writer finished, or another process removed it
            pass


def read(cache: PromptCache, directory: Path, model_hash: bytes) -> None:
    """Load the file's entries into `cache`, the hottest first, as far as they are sound and fit
    its bound (the rest is not read). One log line says what was read, or why not."""
    path, started = directory / FILE, time.monotonic()
    try:
        f = path.open("rb")
    except FileNotFoundError:
        return  # the first start with this directory
    except OSError as e:
        return log("prompt_cache_ignored", file=str(path), reason=e.strerror)
    with f:
        head = f.read(len(MAGIC) + len(model_hash))
        if not head.startswith(MAGIC):
            return log("prompt_cache_ignored", file=str(path), reason="not a prompt cache file of this version")
        if len(head) < len(MAGIC) + len(model_hash):
            return log("prompt_cache_ignored", file=str(path), reason="cut short (the file is truncated)")
        if head[len(MAGIC):] != model_hash:
            return log("prompt_cache_ignored", file=str(path),
                       reason="written by another model file, llama.cpp build or N_CTX/KV_CACHE_TYPE/FLASH_ATTN")
        cache.load(records(f, path))
    log("prompt_cache_read", file=str(path), entries=cache.loaded, bytes=cache.bytes,
        seconds=round(time.monotonic() - started, 3))


def records(f: BinaryIO, path: Path) -> Iterator[Entry]:
    """The entries of the records from here on, up to the first that is cut short or corrupt."""
    count = 0
    while record := f.read(RECORD.size):
        entry, problem = read_record(f, record)
        if problem:
            return log("prompt_cache_ignored", file=str(path), reason=f"record {count + 1}: {problem}; "
                       f"the {count} before it read")
        count += 1
        yield entry


def read_record(f: BinaryIO, record: bytes) -> tuple[Entry | None, str | None]:
    """The entry whose RECORD is `record`, its tokens and state read from `f`; or what is wrong."""
    if len(record) < RECORD.size:
        return None, "cut short (the file is truncated)"
    n_tokens, size, checksum = RECORD.unpack(record)
    tokens = f.read(4 * n_tokens)
    if len(tokens) < 4 * n_tokens or size > os.fstat(f.fileno()).st_size:
        return None, "cut short (the file is truncated)"
    state = (ctypes.c_uint8 * size)()
    if f.readinto(state) < size:
        return None, "cut short (the file is truncated)"
    if zlib.crc32(state, zlib.crc32(tokens)) != checksum:
        return None, "its checksum does not match (the file is corrupt)"
    return Entry(np.frombuffer(tokens, dtype="<i4").astype(np.int32), state), None


def log(event: str, **fields) -> None:
    """One JSON line, as the server's others (service.py's `ready`); on stdout."""
    print(msgspec.json.encode({"event": event, **fields}).decode(), flush=True)
