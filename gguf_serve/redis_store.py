"""Finished Responses in Redis or Valkey (RESPONSES_STORE_URL), shared by every instance that names
the same database: a continuation, a GET or a DELETE may land on any instance of a fleet, and
an instance that scaled to zero forgets nothing.

Bounded as the in-process store is: each entry expires by the database's own TTL (PEXPIRE,
RESPONSES_STORE_TTL_S from when it was stored), and the entries together by count and bytes,
the least recently used going first. Each put runs as one Lua script, so that instances
storing at once can't overshoot the bounds between a check and a write; the database's clock
(TIME) orders the entries, not the instances' own. Standalone Redis or Valkey (Memorystore,
Upstash, ElastiCache, a sidecar): the scripts name keys outside KEYS, so not Redis Cluster.

Every call has a timeout (RESPONSES_STORE_TIMEOUT_S); a database that is down or slow is a 503
naming the store, never a hang or a 500, and redis-py reconnects once it is back. The log gets
one JSON line when the database stops answering (its address and error) and one when it answers
again, not one per call or probe.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import msgspec
import redis.asyncio
from redis.exceptions import RedisError

from .errors import APIError
from .response_store import Stored, entry, not_found
from .responses_protocol import InputItem, ResponseObject

PREFIX = "gguf-serve:responses:"  # every key of the store: r:<id> (an entry), used, sizes, bytes

_DROP = """
local prefix = ARGV[1]
local function drop(id)
  redis.call('DEL', prefix .. 'r:' .. id)
  redis.call('ZREM', prefix .. 'used', id)
  local size = redis.call('HGET', prefix .. 'sizes', id)
  if size then
    redis.call('HDEL', prefix .. 'sizes', id)
    redis.call('DECRBY', prefix .. 'bytes', size)
  end
end
local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""

# ARGV: prefix, id, owner, response, conversation, size, ttl_ms, max_count, max_bytes.
# Entries unused for longer than the TTL have expired: they are dropped from the index too.
PUT = _DROP + """
local id, size, ttl_ms = ARGV[2], tonumber(ARGV[6]), tonumber(ARGV[7])
local max_count, max_bytes = tonumber(ARGV[8]), tonumber(ARGV[9])
local t = now()
for _, old in ipairs(redis.call('ZRANGEBYSCORE', prefix .. 'used', '-inf', t - ttl_ms)) do drop(old) end
drop(id)
local key = prefix .. 'r:' .. id
redis.call('HSET', key, 'owner', ARGV[3], 'response', ARGV[4], 'conversation', ARGV[5])
redis.call('PEXPIRE', key, ttl_ms)
redis.call('ZADD', prefix .. 'used', t, id)
redis.call('HSET', prefix .. 'sizes', id, size)
redis.call('INCRBY', prefix .. 'bytes', size)
while redis.call('ZCARD', prefix .. 'used') > max_count or tonumber(redis.call('GET', prefix .. 'bytes')) > max_bytes do
  drop(redis.call('ZRANGE', prefix .. 'used', 0, 0)[1])
end
return 1
"""

# ARGV: prefix, id, owner. The entry's response and conversation if that owner stored it (then
# it is the most recently used), else nothing.
GET = _DROP + """
local v = redis.call('HMGET', prefix .. 'r:' .. ARGV[2], 'owner', 'response', 'conversation')
if not v[2] or v[1] ~= ARGV[3] then return nil end
redis.call('ZADD', prefix .. 'used', 'XX', now(), ARGV[2])
return {v[2], v[3]}
"""

# ARGV: prefix, id, owner. 1 if that owner's entry was there and is gone, else 0.
DELETE = _DROP + """
if redis.call('HGET', prefix .. 'r:' .. ARGV[2], 'owner') ~= ARGV[3] then return 0 end
drop(ARGV[2])
return 1
"""


class RedisStore:
    """The Responses store in a Redis or Valkey database (see the module's docstring)."""

    def __init__(self, url: str, max_count: int, ttl_s: float, max_bytes: int, timeout_s: float):
        self.max_count, self.ttl_ms, self.max_bytes = max_count, max(1, int(ttl_s * 1000)), max_bytes
        parts = urlsplit(url)
        self.name = f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}{parts.path}"  # no password in messages
        self.db = redis.asyncio.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self.put_script, self.get_script, self.delete_script = (self.db.register_script(s) for s in (PUT, GET, DELETE))
        self.down = False  # what the log was last told: the database stopped answering (till a call succeeds)

    async def put(self, response: ResponseObject, conversation: list[InputItem], owner: bytes) -> bool:
        stored = entry(response, conversation, owner)
        if self.max_count <= 0 or stored.size > self.max_bytes:
            return False
        await self._call(self.put_script, response.id, owner, stored.response_json, stored.conversation_json,
                         stored.size, self.ttl_ms, self.max_count, self.max_bytes)
        return True

    async def get(self, response_id: str, param: str | None, owner: bytes) -> Stored:
        found = await self._call(self.get_script, response_id, owner)
        if not found:
            raise not_found(response_id, param)
        return Stored(owner, *found)

    async def delete(self, response_id: str, owner: bytes) -> None:
        if not await self._call(self.delete_script, response_id, owner):
            raise not_found(response_id, None)

    async def status(self) -> str | None:
        try:
            await self.db.ping()
        except RedisError as e:
            return self._unavailable(e).message
        self._answered()
        return None

    async def _call(self, script, *args):
        try:
            found = await script(args=[PREFIX, *args])
        except RedisError as e:
            raise self._unavailable(e) from None
        self._answered()
        return found

    def _answered(self) -> None:
        if self.down:
            self.down = False
            log({"event": "responses_store_available", "store": self.name})

    def _unavailable(self, e: RedisError) -> APIError:
        if not self.down:
            self.down = True
            log({"event": "responses_store_unavailable", "store": self.name, "error": f"{type(e).__name__}: {e}"})
        return APIError(503, f"the response store ({self.name}) is unavailable ({type(e).__name__}: {e}); retry shortly, "
                             "or send `store: false` with the whole conversation", None, "responses_store_unavailable")


def log(line: dict) -> None:
    """One JSON line on the log, as the service's own."""
    print(msgspec.json.encode(line).decode(), flush=True)
