"""The store of finished Responses: each kept encoded, bounded by count, bytes and age, and seen
by each API key as its own (a response is found only by the key that made it).

Two backends behind one interface (`put`, `get`, `delete`, `status`, all awaited): MemoryStore,
in this process (the default: nothing to run, but behind a fleet a continuation must reach the
instance that stored it, and a scaled-to-zero instance forgets), and redis_store.RedisStore,
shared by every instance that names the same RESPONSES_STORE_URL (Redis or Valkey).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import OrderedDict
from typing import NamedTuple, Protocol

import msgspec

from .errors import APIError
from .responses_protocol import InputItem, ResponseObject


class Stored(NamedTuple):
    """A stored response, kept encoded: its size is the bytes it holds (no Python object per
    item, which for a conversation of small items would weigh several times its JSON), and a
    later change to the objects it was made from can't reach it."""

    owner: bytes  # the key that made it (see `owner_of`); empty when the server has no keys
    response_json: bytes  # the response, as GET returns it
    conversation_json: bytes  # every item up to and including its output: what continues it
    at: float = 0.0  # (MemoryStore) time.monotonic() when stored: its age counts from then, however often read

    @property
    def size(self) -> int:
        return len(self.response_json) + len(self.conversation_json)

    @property
    def response(self) -> ResponseObject:
        return msgspec.json.decode(self.response_json, type=ResponseObject)

    @property
    def conversation(self) -> list[InputItem]:
        return msgspec.json.decode(self.conversation_json, type=list[InputItem])


def continuing(item: InputItem) -> InputItem:
    """An item as a continuation reads it: without `id`, `status` and `encrypted_content`,
    which nothing here reads (append_messages), so that a client can't make the store keep them."""
    return msgspec.structs.replace(item, id=None, status=None, encrypted_content=None)


def entry(response: ResponseObject, conversation: list[InputItem], owner: bytes) -> Stored:
    return Stored(owner, msgspec.json.encode(response), msgspec.json.encode([continuing(item) for item in conversation]),
                  time.monotonic())


def not_found(response_id: str, param: str | None) -> APIError:
    """Another key's response is unknown, as OpenAI answers for another organization's."""
    code = "previous_response_not_found" if param else "response_not_found"
    return APIError(404, f"No response with id `{response_id}` is stored (never stored, evicted, expired or deleted)",
                    param, code)


def owner_hash(api_key: str, api_keys: tuple[str, ...]) -> bytes:
    """Who a request is, to the store: its API key hashed with a salt made of every key the
    server takes (the key itself is never kept). Every instance configured with the same keys
    computes the same hash, so a shared store scopes alike across a fleet; without the keys the
    hash can't be computed or reversed. Empty when the server has no keys: every client is the
    same owner."""
    if not api_keys:
        return b""
    salt = hashlib.blake2b("\0".join(sorted(api_keys)).encode(), digest_size=16).digest()
    return hashlib.blake2b(api_key.encode(), key=salt, digest_size=16).digest()


class ResponseStore(Protocol):
    """What the Responses API needs of a store; `owner` scopes every call (see owner_hash)."""

    async def put(self, response: ResponseObject, conversation: list[InputItem], owner: bytes) -> bool:
        """Keep `response` and the conversation it continues; False if it is larger than the
        whole store (then it is not kept)."""

    async def get(self, response_id: str, param: str | None, owner: bytes) -> Stored:
        """The response `response_id` if `owner` made it, else a 404 (naming `param`)."""

    async def delete(self, response_id: str, owner: bytes) -> None:
        ...

    async def status(self) -> str | None:
        """None if the store works, else why not (for /ready)."""


class MemoryStore:
    """Finished responses in this process, bounded by count and by bytes (the least recently
    used go first), and by age (from when each was stored, however often it was read since)."""

    def __init__(self, max_count: int, ttl_s: float, max_bytes: float = math.inf):
        self.max_count, self.ttl_s, self.max_bytes = max_count, ttl_s, max_bytes
        self.kept: OrderedDict[str, Stored] = OrderedDict()  # least recently used first
        self.by_age: OrderedDict[str, Stored] = OrderedDict()  # the same entries, oldest first
        self.bytes = 0  # the sum of the kept entries' sizes

    async def put(self, response: ResponseObject, conversation: list[InputItem], owner: bytes = b"") -> bool:
        if self.max_count <= 0:
            return False
        stored = entry(response, conversation, owner)
        if response.id in self.kept:
            self._drop(response.id)
        if stored.size > self.max_bytes:
            return False
        self.expire()
        self.kept[response.id] = self.by_age[response.id] = stored
        self.bytes += stored.size
        while len(self.kept) > self.max_count or self.bytes > self.max_bytes:
            self._drop(next(iter(self.kept)))
        return True

    async def get(self, response_id: str, param: str | None = None, owner: bytes = b"") -> Stored:
        self.expire()
        stored = self.kept.get(response_id)
        if stored is None or stored.owner != owner:
            raise not_found(response_id, param)
        self.kept.move_to_end(response_id)
        return stored

    async def delete(self, response_id: str, owner: bytes = b"") -> None:
        await self.get(response_id, None, owner)
        self._drop(response_id)

    async def status(self) -> str | None:
        return None

    def expire(self) -> None:
        oldest_kept = time.monotonic() - self.ttl_s
        while self.by_age and next(iter(self.by_age.values())).at < oldest_kept:
            self._drop(next(iter(self.by_age)))

    def _drop(self, response_id: str) -> None:
        del self.by_age[response_id]
        self.bytes -= self.kept.pop(response_id).size


class ScopedStore(NamedTuple):
    """The store as one API key sees it: the responses made with that key, and no other."""

    store: ResponseStore
    owner: bytes

    async def put(self, response: ResponseObject, conversation: list[InputItem]) -> bool:
        return await self.store.put(response, conversation, self.owner)

    async def get(self, response_id: str, param: str | None = None) -> Stored:
        return await self.store.get(response_id, param, self.owner)

    async def delete(self, response_id: str) -> None:
        await self.store.delete(response_id, self.owner)

