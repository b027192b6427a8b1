"""The Responses store's bounds (count, bytes, age from creation) and scoping by key, on a
clock the tests move (no sleeping), and `metadata`'s limits: pure logic, no model."""

import asyncio

import msgspec
import pytest

from gguf_serve import response_store, responses
from gguf_serve.errors import APIError
from gguf_serve.responses_protocol import InputItem, ResponseObject, TextConfig


@pytest.fixture
def clock(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(response_store.time, "monotonic", lambda: now[0])
    return now


class Sync:
    """A store's coroutine methods, each run to its end (the in-process store never waits)."""

    def __init__(self, store):
        self.store = store

    def __getattr__(self, name):
        attr = getattr(self.store, name)
        return (lambda *args, **kwargs: asyncio.run(attr(*args, **kwargs))) if asyncio.iscoroutinefunction(attr) else attr


def memory(**bounds) -> Sync:
    return Sync(response_store.MemoryStore(**bounds))


def response(i: int, text: str = "") -> ResponseObject:
    return ResponseObject(id=f"resp_{i}", created_at=0, status="completed", model="m", output=[],
                          instructions=text or None, max_output_tokens=None, temperature=1, top_p=1, tools=[], tool_choice="auto",
                          parallel_tool_calls=True, text=TextConfig(), previous_response_id=None, store=True,
                          metadata={}, user=None)


def unknown(store, response_id: str, **kwargs) -> APIError:
    with pytest.raises(APIError) as e:
        store.get(response_id, **kwargs)
    return e.value


def test_a_response_read_since_still_expires_from_when_it_was_stored(clock):
    store = memory(max_count=10, ttl_s=60)
    store.put(response(0), [])
    clock[0] += 10
    store.put(response(1), [])
    clock[0] += 40
    store.get("resp_0")  # read: now the most recently used, still 50 s old
    clock[0] += 11  # 61 s since resp_0 was stored, 51 s since resp_1
    assert unknown(store, "resp_0").status == 404
    assert store.get("resp_1").response.id == "resp_1"
    clock[0] += 10
    assert unknown(store, "resp_1").status == 404
    assert not store.kept and not store.by_age and store.bytes == 0


def test_bytes_are_bounded_least_recently_used_first_and_counted_exactly(clock):
    one = response_store.Stored(b"", msgspec.json.encode(response(0, "x" * 1000)), b"[]", 0).size
    store = memory(max_count=10, ttl_s=60, max_bytes=3 * one)
    for i in range(3):
        assert store.put(response(i, "x" * 1000), [])
    store.get("resp_0")
    assert store.put(response(3, "x" * 1000), [])  # one too many bytes: resp_1, the least recently used, goes
    assert list(store.kept) == ["resp_2", "resp_0", "resp_3"] and store.bytes == 3 * one
    store.put(response(2, "y" * 1000), [])  # the same id again replaces it
    store.delete("resp_0")
    assert store.bytes == sum(s.size for s in store.kept.values()) == 2 * one
    clock[0] += 61
    store.expire()
    assert store.bytes == 0 and not store.kept and not store.by_age


def test_a_response_larger_than_the_whole_store_is_not_kept(clock):
    store = memory(max_count=10, ttl_s=60, max_bytes=2000)
    assert store.put(response(0), [])
    assert not store.put(response(1), [InputItem(role="user", content="x" * 2000)])
    assert list(store.kept) == ["resp_0"] and store.bytes == store.kept["resp_0"].size


def test_only_what_a_continuation_reads_is_kept(clock):
    store = memory(max_count=10, ttl_s=60)
    item = InputItem(type="reasoning", content=[], id="rs_1", status="completed", encrypted_content="z" * 10_000)
    store.put(response(0), [item, InputItem(role="user", content="Hi", id="msg_1")])
    kept = store.get("resp_0")
    assert kept.conversation == [InputItem(type="reasoning", content=[]), InputItem(role="user", content="Hi")]
    assert kept.size < 1000


def test_another_keys_response_is_unknown_to_it(clock):
    store = memory(max_count=10, ttl_s=60)
    mine, theirs = Sync(response_store.ScopedStore(store.store, b"k1")), Sync(response_store.ScopedStore(store.store, b"k2"))
    mine.put(response(0), [])
    never = unknown(theirs, "resp_nope", param="previous_response_id")
    other = unknown(theirs, "resp_0", param="previous_response_id")
    assert (other.status, other.code, other.param) == (never.status, never.code, never.param) == (
        404, "previous_response_not_found", "previous_response_id")
    with pytest.raises(APIError):
        theirs.delete("resp_0")
    assert mine.get("resp_0").response.id == "resp_0"
    mine.delete("resp_0")
    assert not store.kept


def test_store_evicts_the_least_recently_used_past_its_count():
    store = memory(max_count=2, ttl_s=60)
    for i in range(2):
        store.put(response(i), [])
    store.get("resp_0")  # now the most recently used
    store.put(response(2), [])
    assert set(store.kept) == {"resp_0", "resp_2"}
    with pytest.raises(APIError) as e:
        store.get("resp_1", "previous_response_id")
    assert e.value.status == 404 and e.value.code == "previous_response_not_found"


def test_store_expires_by_age(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(response_store.time, "monotonic", lambda: clock[0])
    store = memory(max_count=10, ttl_s=5)
    store.put(response(0), [])
    clock[0] += 3
    store.put(response(1), [])
    clock[0] += 3
    with pytest.raises(APIError):
        store.get("resp_0")  # 6 s old
    assert set(store.kept) == {"resp_1"}
    store.delete("resp_1")
    assert not store.kept


def test_store_of_size_zero_keeps_nothing():
    store = memory(max_count=0, ttl_s=60)
    store.put(response(0), [])
    assert not store.kept


@pytest.mark.parametrize("metadata, param, message", [
    ({str(i): "v" for i in range(17)}, "metadata", "Invalid 'metadata': too many properties. Expected an object with at "
                                                   "most 16 properties, but got an object with 17 properties instead."),
    ({"k" * 65: "v"}, "metadata", "Invalid property name in 'metadata': '" + "k" * 64 + "...' is too long. Expected a "
                                  "string with maximum length 64, but got a string with length 65 instead."),
    ({"k": "v" * 513}, "metadata.k", "Invalid 'metadata.k': string too long. Expected a string with maximum length 512, "
                                     "but got a string with length 513 instead."),
])
def test_metadata_beyond_openais_limits_is_a_400_naming_it(metadata, param, message):
    with pytest.raises(APIError) as e:
        responses.check_metadata(metadata)
    assert (e.value.status, e.value.param, e.value.message) == (400, param, message)


def test_metadata_within_openais_limits_passes():
    responses.check_metadata({f"{i:064}": "v" * 512 for i in range(16)})
