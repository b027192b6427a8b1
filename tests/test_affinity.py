"""Conversation affinity in the fleet (deploy/fleet.js, deploy/nginx.conf, deploy/fleet.py): three
real SmolLM2 instances of one model behind the real nginx, sharing a real redis-server for stored
responses. Every turn of a conversation lands on one instance (each answer names it in
x-instance-id), whichever names the conversation: chat's opening (a shared system prompt and a
distinct first user message), a Responses chain of previous_response_id, prompt_cache_key, Claude
Code's metadata.user_id; so from the second turn on its prefix comes from that instance's KV cache
(cached_tokens). An instance stopped: its conversations move, with 200s, and no other does. An
instance with no room (429): the request goes to another. A request that cut an instance's
connection is never resent to another."""

from __future__ import annotations

import http.server
import threading
import uuid
from typing import NamedTuple

import httpx
import pytest

from conftest import MODEL, Server
from test_deploy import needs_nginx, start_proxy
from test_fleet_store import RedisServer

# Long enough that a turn's prefix is worth keeping (the host-memory tier saves and restores 64
# tokens or more: prompt_cache.MIN_SAVED), and that the conversation's own prefix (its first user
# message too) is told from the shared system prompt alone in cached_tokens.
SYSTEM = ("You are a patient assistant for a public library. Answer in one short sentence, politely, and never "
          "invent a book that you are not sure exists. Readers of every age come to the desk: children doing "
          "homework, students writing essays, retired people with time for long novels, and visitors who only "
          "want the opening hours. Be kind to all of them, keep your answers simple, and when a question is "
          "about a subject rather than a book, explain the subject first and suggest where on the shelves it "
          "is kept. The library opens at nine in the morning and closes at eight in the evening, except on "
          "Sundays, when it closes at five.")
ASKED = (" I am preparing a short talk for my reading group next week, and I would like to understand the "
         "subject well enough to answer the questions that people usually ask. Please start with the basic "
         "idea, then give one example that a child could follow, and finally tell me which section of the "
         "library has good books about it, so that I can borrow two or three of them before the talk.")
TOPICS = ("the history of the printing press in Europe", "how bees make honey and why they dance",
          "the rules of chess for a complete beginner", "why the sky looks blue at noon and red at dusk",
          "how a bicycle stays upright while moving", "the life cycle of a frog from egg to adult",
          "what causes the seasons on planet Earth", "how volcanoes form along the edges of tectonic plates")
TURNS = 3
CUT = "cut-model"  # a second model of the fleet: the Cutting stand-in, then one real instance


class Cutting:
    """A stand-in instance that reads a request, then closes the connection without answering, as an
    instance that the request crashed would."""

    def __init__(self):
        cutting = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                cutting.hits += 1
                self.rfile.read(int(self.headers.get("content-length") or 0))
                self.close_connection = True  # no answer at all

            def log_message(self, *args):
                pass

        self.hits = 0
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = "127.0.0.1:%d" % self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


class Fleet(NamedTuple):
    proxy: str
    instances: dict[str, Server]  # by the x-instance-id each answers with
    cutting: Cutting


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("affinity")
    database = RedisServer(tmp).start()
    # One place each (PARALLEL=1, MAX_QUEUE=0): a request running makes the next a 429. The test's
    # own requests come one at a time: a non-streamed one has left its place before it is answered.
    # A tier that holds every conversation an instance gets here (about 11 of 300 tokens, 23 KB a
    # token): the default, a quarter of one 2048-token sequence, holds 1 or 2; the LRU would evict the rest.
    env = {"PARALLEL": "1", "MAX_QUEUE": "0", "N_THREADS": "1", "PROMPT_CACHE_MIB": "128",
           "RESPONSES_STORE_URL": database.url}
    servers = [Server(env) for _ in range(3)]
    instances = {httpx.get(f"{s.wait_ready().url}/v1/models", timeout=10).headers["x-instance-id"]: s for s in servers}
    cutting = Cutting()
    addresses = ",".join(f"127.0.0.1:{s.port}" for s in servers)
    nginx, proxy = start_proxy(tmp, f"{MODEL}={addresses}", f"{CUT}={cutting.address},127.0.0.1:{servers[0].port}")
    yield Fleet(proxy, instances, cutting)
    nginx.terminate()
    nginx.wait(timeout=10)
    cutting.httpd.shutdown()
    for server in servers:
        server.stop()
    database.stop()


class Turn(NamedTuple):
    instance: str
    prompt_tokens: int
    cached_tokens: int | None  # None where the API reports none (Messages)


def post(proxy: str, path: str, body: dict) -> tuple[dict, str]:
    r = httpx.post(f"{proxy}{path}", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json(), r.headers["x-instance-id"]


def chat_turn(proxy: str, messages: list, **extra) -> tuple[Turn, str]:
    answer, instance = post(proxy, "/v1/chat/completions", {"model": MODEL, "messages": messages, "max_tokens": 6,
                                                              "temperature": 0, **extra})
    usage = answer["usage"]
    return Turn(instance, usage["prompt_tokens"], usage["prompt_tokens_details"]["cached_tokens"]), \
        answer["choices"][0]["message"]["content"]


class Chat:
    """A chat conversation; `extra` (prompt_cache_key) goes with every turn."""

    def __init__(self, first: str, **extra):
        self.messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": first}]
        self.extra, self.turns = extra, []

    def next(self, proxy: str, question: str) -> Turn:
        if self.turns:
            self.messages.append({"role": "user", "content": question})
        turn, reply = chat_turn(proxy, self.messages, **self.extra)
        self.messages.append({"role": "assistant", "content": reply})
        self.turns.append(turn)
        return turn


class Chain:
    """A Responses conversation: each turn continues the last by previous_response_id."""

    def __init__(self, first: str):
        self.first, self.last, self.turns = first, None, []

    def next(self, proxy: str, question: str) -> Turn:
        body = {"model": MODEL, "instructions": SYSTEM, "input": self.first if self.last is None else question,
                "max_output_tokens": 6, "temperature": 0}
        if self.last:
            body["previous_response_id"] = self.last
        answer, instance = post(proxy, "/v1/responses", body)
        self.last = answer["id"]
        usage = answer["usage"]
        turn = Turn(instance, usage["input_tokens"], usage["input_tokens_details"]["cached_tokens"])
        self.turns.append(turn)
        return turn


class Session:
    """An Anthropic Messages conversation as Claude Code sends it: its session id in metadata.user_id."""

    def __init__(self):
        self.user_id = f"user_{'ab' * 32}_account__session_{uuid.uuid4()}"
        self.messages, self.turns = [{"role": "user", "content": "Hi"}], []

    def next(self, proxy: str, question: str) -> Turn:
        if self.turns:
            self.messages.append({"role": "user", "content": question})
        answer, instance = post(proxy, "/v1/messages", {"model": MODEL, "system": SYSTEM, "messages": self.messages,
                                                       "max_tokens": 6, "temperature": 0,
                                                       "metadata": {"user_id": self.user_id}})
        reply = answer["content"][0]["text"] if answer["content"] else "."
        self.messages.append({"role": "assistant", "content": reply})
        turn = Turn(instance, answer["usage"]["input_tokens"], None)
        self.turns.append(turn)
        return turn


QUESTIONS = ("Tell me one more thing about it.", "And why does that matter?", "Thank you. Anything else?")


@pytest.fixture(scope="module")
def conversations(fleet) -> dict[str, list]:
    """Eight conversations of each kind, three turns each, taken in turns as many clients would send them
    (every conversation's first turn, then every second turn...): more conversations than places,
    so a turn's prefix is often in an instance's host-memory tier rather than in its one sequence."""
    kinds = {
        "opening": [Chat(f"Please explain {topic}.{ASKED}") for topic in TOPICS],
        "previous_response_id": [Chain(f"Please explain {topic}.{ASKED}") for topic in TOPICS],
        # The same opening for all eight: only the key tells them apart.
        "prompt_cache_key": [Chat("Hi", prompt_cache_key=str(uuid.uuid4())) for _ in TOPICS],
        "metadata.user_id": [Session() for _ in TOPICS],
    }
    for question in QUESTIONS[:TURNS]:
        for conversation in (c for kind in kinds.values() for c in kind):
            conversation.next(fleet.proxy, question)
    return kinds


@needs_nginx
def test_every_turn_of_a_conversation_lands_on_one_instance(fleet, conversations):
    for kind, kind_conversations in conversations.items():
        for conversation in kind_conversations:
            assert len({turn.instance for turn in conversation.turns}) == 1, (kind, conversation.turns)
        # Spread over the instances: with the same opening, the key alone did it. (All eight on
        # one of three instances by chance: 3 ** -7.)
        assert len({c.turns[0].instance for c in kind_conversations}) > 1, kind
    # (The others differ after the shared system prompt by fewer tokens than the tier keeps: 64.)
    for kind in ("opening", "previous_response_id"):
        for conversation in conversations[kind]:
            # From the second turn on, the whole of the turn before is reused (on another instance
            # only the system prompt could be).
            for before, turn in zip(conversation.turns, conversation.turns[1:]):
                assert turn.cached_tokens >= before.prompt_tokens, (kind, conversation.turns)


@needs_nginx
def test_a_stored_response_is_read_where_its_conversation_is(fleet, conversations):
    for chain in conversations["previous_response_id"]:
        r = httpx.get(f"{fleet.proxy}/v1/responses/{chain.last}", headers={"X-Model": MODEL}, timeout=30)
        assert r.status_code == 200 and r.headers["x-instance-id"] == chain.turns[-1].instance


@needs_nginx
def test_a_request_that_cut_the_connection_is_not_resent(fleet):
    """A POST that reached an instance and got no answer (as if it crashed it) is not resent to the
    model's next instance: the client gets the proxy's 503. Each try is a new conversation, until
    one's key lands on the cutting stand-in."""
    real = fleet.instances[next(iter(fleet.instances))]  # the cut model's other instance: servers[0]
    for i in range(64):
        hits, served = fleet.cutting.hits, real.metric("gguf_requests_total", endpoint="/v1/chat/completions")
        r = httpx.post(f"{fleet.proxy}/v1/chat/completions", timeout=60,
                       json={"model": CUT, "messages": [{"role": "user", "content": f"Conversation {i}"}]})
        if fleet.cutting.hits > hits:
            break
        assert r.status_code == 404  # the real instance serves another model's id
    else:
        pytest.fail("no conversation's key landed on the cutting instance")
    assert fleet.cutting.hits == hits + 1
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_unavailable"
    assert real.metric("gguf_requests_total", endpoint="/v1/chat/completions") == served


@needs_nginx
def test_an_instance_lost_moves_its_conversations_only(fleet, conversations, record_property):
    """One instance stopped: every conversation takes one more turn. Those it held go on elsewhere,
    with 200s (the Responses chains read their history from the shared store); no other moves."""
    everyone = [c for kind in conversations.values() for c in kind]
    home = {id(c): c.turns[-1].instance for c in everyone}
    lost = max(fleet.instances, key=lambda instance: sum(h == instance for h in home.values()))
    fleet.instances[lost].stop()
    for conversation in everyone:
        conversation.next(fleet.proxy, "One last question: how would you sum it up?")  # each a 200
    moved = [c for c in everyone if c.turns[-1].instance != home[id(c)]]
    assert {id(c) for c in moved} == {id(c) for c in everyone if home[id(c)] == lost}
    assert all(c.turns[-1].instance in fleet.instances and c.turns[-1].instance != lost for c in moved)
    record_property("moved", f"{len(moved)} of {len(everyone)}")
    print(f"\nan instance lost: {len(moved)} of {len(everyone)} conversations moved")


@needs_nginx
def test_a_request_without_room_goes_to_another_instance(fleet, conversations):
    """Last (an instance that refused is left out for fail_timeout, which would move conversations
    in the tests above). A conversation that moved when its instance was lost: its new instance
    holds its one place with an endless stream and answers the next turn 429, twice (once in
    @fleet, once more in @fleet_refused, in case a place freed); the lost instance, its first
    choice, is skipped whether it is still left out or tried again; another instance serves it."""
    moved = [c for kind in conversations.values() for c in kind if c.turns[-1].instance != c.turns[-2].instance]
    conversation = moved[0]
    home = conversation.turns[-1].instance
    busy = fleet.instances[home]
    refused = busy.metric("gguf_requests_total", status="429")
    endless = {"model": MODEL, "messages": [{"role": "user", "content": "Count."}], "max_tokens": 1000, "stream": True,
               "logit_bias": {"0": -100, "2": -100}}  # no end-of-text, no <|im_end|>
    with httpx.stream("POST", f"{busy.url}/v1/chat/completions", json=endless, timeout=120) as stream:
        lines = stream.iter_lines()  # kept: an iterator dropped closes the stream
        next(lines)  # it holds the one place
        turn = conversation.next(fleet.proxy, "One more?")  # a 200
    assert turn.instance not in (home, conversation.turns[-3].instance)  # nor the lost one
    assert busy.metric("gguf_requests_total", status="429") == refused + 2
    busy.wait_metric("gguf_running", 0)
