"""Stored responses across a fleet (issue #27): two instances of one model share a real
redis-server (Debian's, started here on a free port; .ci/run installs it) behind the real
nginx of deploy/. A response made through the proxy on one instance is continued, read and
deleted on the other, asked directly (each answer names its instance in x-instance-id); another API
key can't see it; the database down at start, lost mid-run and back again (named to a client
with a key and in the log, once each way, to nobody else); entries expire by the database's TTL.
The store's bounds hold in both backends (the in-process one and Redis)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import time
from typing import NamedTuple

import httpx
import msgspec
import openai
import pytest
import redis

from conftest import MODEL, Server, free_port
from gguf_serve.errors import APIError
from gguf_serve.responses_protocol import InputItem, ResponseObject, TextConfig
from gguf_serve.redis_store import PREFIX, RedisStore
from gguf_serve.response_store import MemoryStore
from test_deploy import needs_nginx, start_proxy

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
# One rule with test_deploy's needs_nginx: what the machine lacks skips the tests that need it, saying what to install.
needs_redis = pytest.mark.skipif(not os.path.exists(REDIS_SERVER),
                                 reason="redis-server is not installed (.ci/run installs it)")
KEYS = ("key-one", "key-two")


class RedisServer:
    """A real redis-server on a loopback port, its data in an append-only file, so that a
    restart (stop, then start on the same port) finds what was stored."""

    def __init__(self, tmp):
        self.port, self.tmp, self.proc = free_port(), tmp, None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen([REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.tmp),
                                      "--save", "", "--appendonly", "yes", "--appendfsync", "always"],
                                     stdout=subprocess.DEVNULL)
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                assert self.proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def response(i: int, text: str = "") -> ResponseObject:
    return ResponseObject(id=f"resp_{i}", created_at=0, status="completed", model="m", output=[],
                          instructions=text or None, max_output_tokens=None, temperature=1, top_p=1, tools=[], tool_choice="auto",
                          parallel_tool_calls=True, text=TextConfig(), previous_response_id=None, store=True, metadata={},
                          user=None)


# --- The store alone, in both backends ---------------------------------------------------


@pytest.fixture(scope="module")
def database(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


BACKENDS = ["memory", pytest.param("redis", marks=needs_redis)]


def open_backend(backend: str, request, timeout_s: float = 2.0, **bounds):
    """The store of that backend; Redis's on the module's database, emptied (asked for only then:
    the memory backend's tests need no redis-server)."""
    if backend == "memory":
        return MemoryStore(**bounds)
    database = request.getfixturevalue("database")
    redis.Redis(port=database.port).flushdb()
    return RedisStore(database.url, timeout_s=timeout_s, **bounds)


@pytest.mark.parametrize("backend", BACKENDS)
def test_count_and_bytes_are_bounded_least_recently_used_first(backend, request):
    async def main():
        one = len(msgspec.json.encode(response(0, "x" * 1000))) + 2  # the response and its empty conversation, `[]`
        store = open_backend(backend, request, max_count=3, ttl_s=60, max_bytes=3 * one)
        for i in range(3):
            assert await store.put(response(i, "x" * 1000), [], b"me")
        await store.get("resp_0", None, b"me")  # now the most recently used
        assert await store.put(response(3, "x" * 1000), [], b"me")  # one too many: resp_1 goes
        assert await gone(store, "resp_1")
        for i in (0, 2, 3):
            assert (await store.get(f"resp_{i}", None, b"me")).response.id == f"resp_{i}"
        assert not await store.put(response(4), [InputItem(role="user", content="y" * 4 * one)], b"me")  # larger than all
        assert await gone(store, "resp_4")
        await store.put(response(5), [], b"me")  # small: fits beside two of the others (count 3)
        assert sum([not await gone(store, f"resp_{i}") for i in (0, 2, 3, 5)]) == 3
        if backend == "redis":  # the database's own accounting agrees with what it holds
            database = request.getfixturevalue("database")
            db = redis.Redis(port=database.port)
            sizes = {k.decode(): int(v) for k, v in db.hgetall(PREFIX + "sizes").items()}
            assert int(db.get(PREFIX + "bytes")) == sum(sizes.values()) and set(sizes) == {
                m.decode() for m in db.zrange(PREFIX + "used", 0, -1)} and len(sizes) == 3

    asyncio.run(main())


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_response_is_its_keys_alone_and_deleted_once(backend, request):
    async def main():
        store = open_backend(backend, request, max_count=10, ttl_s=60, max_bytes=1 << 20)
        await store.put(response(0), [InputItem(role="user", content="Hi")], b"mine")
        for attempt in (store.get("resp_0", "previous_response_id", b"theirs"), store.delete("resp_0", b"theirs")):
            with pytest.raises(APIError) as e:
                await attempt
            assert e.value.status == 404
        kept = await store.get("resp_0", None, b"mine")
        assert kept.conversation == [InputItem(role="user", content="Hi")] and kept.response.id == "resp_0"
        await store.delete("resp_0", b"mine")
        assert await gone(store, "resp_0", b"mine")

    asyncio.run(main())


@needs_redis
def test_entries_expire_by_the_databases_ttl(database, request):
    async def main():
        store = open_backend("redis", request, max_count=10, ttl_s=1, max_bytes=1 << 20)
        await store.put(response(0), [], b"")
        assert 0 < redis.Redis(port=database.port).pttl(PREFIX + "r:resp_0") <= 1000
        deadline = time.monotonic() + 10
        while not await gone(store, "resp_0"):  # polled: the database expires it, nothing here does
            assert time.monotonic() < deadline, "never expired"
            await asyncio.sleep(0.1)

    asyncio.run(main())


@needs_redis
def test_a_database_that_stops_answering_is_a_503_within_the_timeout(database, request):
    """A database that takes the connection but never answers (stopped with SIGSTOP) costs a call
    RESPONSES_STORE_TIMEOUT_S, then a 503 naming the store: never a hang."""
    async def main():
        store = open_backend("redis", request, timeout_s=0.5, max_count=10, ttl_s=60, max_bytes=1 << 20)
        await store.put(response(0), [], b"me")  # connected
        database.proc.send_signal(signal.SIGSTOP)
        try:
            for call in (store.get("resp_0", None, b"me"), store.put(response(1), [], b"me")):
                with pytest.raises(APIError) as e:
                    await asyncio.wait_for(call, timeout=10)  # the test's own bound: a hang fails here
                assert (e.value.status, e.value.code) == (503, "responses_store_unavailable")
                assert database.url in e.value.message
            assert database.url in await asyncio.wait_for(store.status(), timeout=10)
        finally:
            database.proc.send_signal(signal.SIGCONT)
        assert (await store.get("resp_0", None, b"me")).response.id == "resp_0"  # and back

    asyncio.run(main())


async def gone(store, response_id: str, owner: bytes = b"me") -> bool:
    try:
        await store.get(response_id, None, owner)
        return False
    except APIError as e:
        assert e.status == 404
        return True


# --- Two instances behind nginx, one client ----------------------------------------------


class Fleet(NamedTuple):
    proxy: str
    instances: tuple[Server, Server]  # the second one has RESPONSES_STORE_REQUIRED=1
    database: RedisServer
    at_start: dict  # what each instance's /ready said while the database was down, without a key and with one


def readiness(server: Server, key: str | None = None) -> tuple[int, dict]:
    r = httpx.get(f"{server.url}/ready", headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=10)
    return r.status_code, r.json()


def logged(server: Server, event: str) -> list[dict]:
    """The instance's JSON log lines of that event."""
    lines = (msgspec.json.decode(text) for text in server.output().splitlines() if text.startswith("{"))
    return [line for line in lines if line.get("event") == event]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fleet-store")
    database = RedisServer(tmp)  # not started yet: the instances start without it
    env = {"RESPONSES_STORE_URL": database.url, "API_KEY": ",".join(KEYS), "PARALLEL": "2", "N_THREADS": "1"}
    serves, requires = Server(env), Server({**env, "RESPONSES_STORE_REQUIRED": "1"})
    at_start = {"serves": readiness(serves.wait_ready()), "serves, keyed": readiness(serves, KEYS[1]),
                "serves, wrong key": readiness(serves, "wrong")}
    deadline = time.monotonic() + 120
    while (status := readiness(requires))[1].get("error", {}).get("code") == "model_loading":  # loaded, then judged
        assert time.monotonic() < deadline
        time.sleep(0.1)
    at_start["requires"], at_start["requires, keyed"] = status, readiness(requires, KEYS[0])
    database.start()
    requires.wait_ready()
    nginx, proxy = start_proxy(tmp, f"{MODEL}=127.0.0.1:{serves.port},127.0.0.1:{requires.port}")
    yield Fleet(proxy, (serves, requires), database, at_start)
    nginx.terminate()
    nginx.wait(timeout=10)
    for server in (serves, requires):
        server.stop()
    database.stop()


def sdk(proxy: str, key: str = KEYS[0]) -> openai.OpenAI:
    """The one client: OpenAI's SDK on the proxy's base URL. A GET or DELETE has no body to name
    the model by, so the client names it in X-Model (deploy/fleet.js)."""
    return openai.OpenAI(base_url=f"{proxy}/v1", api_key=key, default_headers={"X-Model": MODEL}, max_retries=0,
                         timeout=120)


@needs_nginx
@needs_redis
def test_without_its_database_an_instance_starts_and_ready_says_why_to_a_key_alone(fleet):
    """/ready needs no key: to a client without one (or with a wrong one) it says "unavailable",
    never the database's address or error; a valid key sees both; the log has them, once."""
    named = f"redis://127.0.0.1:{fleet.database.port}/0"
    for asked in ("serves", "serves, wrong key"):
        assert fleet.at_start[asked] == (200, {"status": "ready", "responses_store": "unavailable"})
    status, body = fleet.at_start["serves, keyed"]
    assert status == 200 and named in body["responses_store"] and "ConnectionError" in body["responses_store"]
    status, body = fleet.at_start["requires"]  # RESPONSES_STORE_REQUIRED=1: not ready without it
    assert status == 503 and body["error"]["code"] == "responses_store_unavailable"
    assert body["error"]["message"] == "the response store is unavailable"
    status, body = fleet.at_start["requires, keyed"]
    assert status == 503 and body["error"]["code"] == "responses_store_unavailable" and named in body["error"]["message"]
    for instance in fleet.instances:
        [down] = logged(instance, "responses_store_unavailable")
        assert down["store"] == named and down["error"].startswith("ConnectionError: ")
    assert len(logged(fleet.instances[1], "responses_store_available")) == 1  # the database started, then it was ready


def test_with_no_key_configured_ready_names_the_store_to_nobody():
    """An open server (no API_KEY): nobody can prove to be its operator, so /ready says
    "unavailable" whatever a client sends; the log names the database."""
    named = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    server = Server({"RESPONSES_STORE_URL": named, "PARALLEL": "1", "N_THREADS": "1"}).wait_ready()
    try:
        for headers in ({}, {"Authorization": "Bearer anything"}, {"x-api-key": "anything"}):
            r = httpx.get(f"{server.url}/ready", headers=headers, timeout=10)
            assert (r.status_code, r.json()) == (200, {"status": "ready", "responses_store": "unavailable"})
        [down] = logged(server, "responses_store_unavailable")
        assert down["store"] == named and down["error"].startswith("ConnectionError: ")
    finally:
        server.stop()


@needs_nginx
@needs_redis
def test_one_instance_continues_reads_and_deletes_what_the_other_made(fleet):
    """Through the proxy a conversation stays on the instance that made it (test_affinity.py); the
    other one, asked directly (as the proxy does once the first is lost), has it from the database."""
    client = sdk(fleet.proxy)
    made = client.responses.with_raw_response.create(model=MODEL, input="My name is Ada. Say hi.", max_output_tokens=8,
                                                    temperature=0)
    first, origin = made.parse(), made.headers["x-instance-id"]
    assert first.status in ("completed", "incomplete") and first.store
    assert client.responses.with_raw_response.retrieve(first.id).headers["x-instance-id"] == origin
    headers = {"Authorization": f"Bearer {KEYS[0]}"}
    [other] = [s for s in fleet.instances
               if httpx.get(f"{s.url}/v1/models", headers=headers, timeout=10).headers["x-instance-id"] != origin]
    direct = openai.OpenAI(base_url=f"{other.url}/v1", api_key=KEYS[0], max_retries=0, timeout=120)
    continued = direct.responses.create(model=MODEL, input="What is my name?", previous_response_id=first.id,
                                        max_output_tokens=8, temperature=0)
    assert continued.usage.input_tokens > first.usage.input_tokens  # the first exchange came with it
    read = direct.responses.retrieve(first.id)
    assert read.id == first.id and read.output_text == first.output_text
    direct.responses.delete(first.id)
    for instance in fleet.instances:  # gone for both
        r = httpx.get(f"{instance.url}/v1/responses/{first.id}", headers=headers)
        assert r.status_code == 404 and r.json()["error"]["code"] == "response_not_found"


@needs_nginx
@needs_redis
def test_another_key_cannot_see_or_continue_a_response(fleet):
    mine, theirs = sdk(fleet.proxy), sdk(fleet.proxy, KEYS[1])
    made = mine.responses.create(model=MODEL, input="Hi", max_output_tokens=2, temperature=0)
    for attempt in (lambda: theirs.responses.retrieve(made.id), lambda: theirs.responses.delete(made.id),
                    lambda: theirs.responses.create(model=MODEL, input="Hi", previous_response_id=made.id, max_output_tokens=2)):
        with pytest.raises(openai.NotFoundError):
            attempt()
    assert mine.responses.retrieve(made.id).id == made.id


@needs_nginx
@needs_redis
def test_the_database_lost_mid_run_then_back(fleet):
    """Asked of the instances directly (the proxy would count each 503 as the instance failing)."""
    serves, requires = fleet.instances
    headers = {"Authorization": f"Bearer {KEYS[0]}"}
    ask = {"model": MODEL, "input": "Hi", "max_output_tokens": 2, "temperature": 0}
    kept = httpx.post(f"{serves.url}/v1/responses", json=ask, headers=headers, timeout=60).json()
    events = ("responses_store_unavailable", "responses_store_available")
    before = {(instance.port, event): len(logged(instance, event)) for instance in fleet.instances for event in events}
    fleet.database.stop()
    try:
        named = f"redis://127.0.0.1:{fleet.database.port}/0"
        for server in fleet.instances:
            unstored = httpx.post(f"{server.url}/v1/responses", json={**ask, "store": False}, headers=headers, timeout=60)
            assert unstored.status_code == 200 and unstored.json()["status"] in ("completed", "incomplete")
            chat = httpx.post(f"{server.url}/v1/chat/completions", headers=headers, timeout=60, json={
                "model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
            assert chat.status_code == 200
            for method, path, body in (("POST", "/v1/responses", ask), ("POST", "/v1/responses", {**ask, "stream": True}),
                                       ("POST", "/v1/responses", {**ask, "store": False, "previous_response_id": kept["id"]}),
                                       ("GET", f"/v1/responses/{kept['id']}", None),
                                       ("DELETE", f"/v1/responses/{kept['id']}", None)):
                r = httpx.request(method, f"{server.url}{path}", json=body, headers=headers, timeout=30)
                error = r.json()["error"]
                assert (r.status_code, error["code"]) == (503, "responses_store_unavailable"), (method, path, r.text)
                assert named in error["message"] and "Retry-After" in r.headers
        assert readiness(serves) == (200, {"status": "ready", "responses_store": "unavailable"})
        assert readiness(serves, KEYS[0])[0] == 200 and named in readiness(serves, KEYS[0])[1]["responses_store"]
        assert readiness(requires)[0] == 503
    finally:
        fleet.database.start()
    for server in fleet.instances:  # back: what was stored before is there, and storing works again
        assert readiness(server) == (200, {"status": "ready"})
        # Many calls and probes failed, then answered: one log line each way.
        for event in events:
            assert len(logged(server, event)) == before[server.port, event] + 1, event
        r = httpx.get(f"{server.url}/v1/responses/{kept['id']}", headers=headers, timeout=30)
        assert r.status_code == 200 and r.json()["id"] == kept["id"]
        again = httpx.post(f"{server.url}/v1/responses", json={**ask, "previous_response_id": kept["id"]}, headers=headers,
                           timeout=60)
        assert again.status_code == 200 and again.json()["store"] is True
