"""The store of finished Responses: each kept encoded, bounded by count, bytes and age, and seen
by each API key as its own (a response is found only by the key that made it)."""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from typing import NamedTuple

import msgspec

from .protocol import APIError, InputItem, ResponseObject


class Stored(NamedTuple):
    """A stored response, kept encoded: its size is the bytes it holds (no Python object per
    item, which for a conversation of small items would weigh several times its JSON), and a
    later change to the objects it was made from can't reach it."""

    owner: bytes | None  # the key that made it (see `owner_of`); None when the server has no keys
    response_json: bytes  # the response, as GET returns it
    conversation_json: bytes  # every item up to and including its output: what continues it
    at: float  # time.monotonic() when stored: its age counts from then, whenever it was read

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


class ResponseStore:
    """Finished responses, bounded by count and by bytes (the least recently used go first),
    and by age (from when each was stored, however often it was read since). In this process
    only: behind a fleet, a continuation must reach the same instance."""

    def __init__(self, max_count: int, ttl_s: float, max_bytes: float = math.inf):
        self.max_count, self.ttl_s, self.max_bytes = max_count, ttl_s, max_bytes
        self.kept: OrderedDict[str, Stored] = OrderedDict()  # least recently used first
        self.by_age: OrderedDict[str, Stored] = OrderedDict()  # the same entries, oldest first
        self.bytes = 0  # the sum of the kept entries' sizes

    def put(self, response: ResponseObject, conversation: list[InputItem], owner: bytes | None = None) -> bool:
        """Keep `response`; False if it is larger than the whole store (then it is not kept)."""
        if self.max_count <= 0:
            return False
        stored = Stored(owner, msgspec.json.encode(response),
                        msgspec.json.encode([continuing(item) for item in conversation]), time.monotonic())
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

    def get(self, response_id: str, param: str | None = None, owner: bytes | None = None) -> Stored:
        """The response `response_id` if `owner` made it; another key's is unknown, as OpenAI
        answers for another organization's."""
        self.expire()
        stored = self.kept.get(response_id)
        if stored is None or stored.owner != owner:
            code = "previous_response_not_found" if param else "response_not_found"
            raise APIError(404, f"No response with id `{response_id}` is stored here (never stored, evicted, expired "
                                "or deleted; stored responses live in one server process)", param, code)
        self.kept.move_to_end(response_id)
        return stored

    def delete(self, response_id: str, owner: bytes | None = None) -> None:
        self.get(response_id, None, owner)
        self._drop(response_id)

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
    owner: bytes | None

    def put(self, response: ResponseObject, conversation: list[InputItem]) -> bool:
        return self.store.put(response, conversation, self.owner)

    def get(self, response_id: str, param: str | None = None) -> Stored:
        return self.store.get(response_id, param, self.owner)

    def delete(self, response_id: str) -> None:
        self.store.delete(response_id, self.owner)
