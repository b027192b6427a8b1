"""/v1/messages with the real `anthropic` SDK against SmolLM2 in granian: plain, streamed, a
tool round trip, thinking on a reasoning template, count_tokens, a coding agent's first request
replayed, bad input, and the API key as x-api-key."""

import json
import signal

import anthropic
import httpx
import pytest

from conftest import Server
from test_reasoning import R1, serve

MODEL = "smollm2-135m-instruct"
WEATHER = {"name": "get_weather", "description": "The weather in a city now",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
HELLO = [{"role": "user", "content": "Say hello."}]


def sdk(server: Server, key: str = "unused") -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.url, api_key=key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def claude(server):
    return sdk(server)


GREEDY = {"temperature": 0}  # the SDK has no `temperature` argument any more; the API takes it


def create(client, **kwargs):
    return client.messages.create(**{"model": MODEL, "max_tokens": 16, "messages": HELLO, "extra_body": GREEDY, **kwargs})


# --- the message ---


def test_plain_message_is_chats_answer(claude, client):
    m = create(claude, max_tokens=40, system="You are a friendly assistant.")
    assert m.id.startswith("msg_") and m.type == "message" and m.role == "assistant" and m.model == MODEL
    [block] = m.content
    assert block.type == "text" and block.text and m.stop_sequence is None
    chat = client.chat.completions.create(model=MODEL, max_tokens=40, temperature=0, messages=[
        {"role": "system", "content": "You are a friendly assistant."}, *HELLO])
    assert block.text == chat.choices[0].message.content
    assert m.stop_reason == {"length": "max_tokens", "stop": "end_turn"}[chat.choices[0].finish_reason]
    assert (m.usage.input_tokens, m.usage.output_tokens) == (chat.usage.prompt_tokens, chat.usage.completion_tokens)


def test_max_tokens_and_stop_sequences_are_the_stop_reasons(claude):
    m = create(claude, messages=[{"role": "user", "content": "Write a long story about a dragon."}], max_tokens=5)
    assert m.stop_reason == "max_tokens" and m.usage.output_tokens == 5
    text = create(claude, max_tokens=30).content[0].text
    word = text.split()[1]  # a word the greedy answer writes after its first
    m = create(claude, max_tokens=30, stop_sequences=["NEVER WRITTEN", word])
    assert m.stop_reason == "stop_sequence" and m.stop_sequence == word
    assert m.content[0].text == text[:text.index(word)]


def test_streamed_message_equals_the_whole(claude):
    whole = create(claude, max_tokens=30)
    with claude.messages.stream(model=MODEL, max_tokens=30, messages=HELLO, extra_body=GREEDY) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == final.content[0].text == whole.content[0].text
    assert final.stop_reason == whole.stop_reason and final.usage.output_tokens == whole.usage.output_tokens
    assert final.usage.input_tokens == whole.usage.input_tokens


def test_a_tool_round_trip(claude):
    forced = {"type": "tool", "name": "get_weather"}
    m = create(claude, messages=ASK, tools=[WEATHER], tool_choice=forced, max_tokens=60)
    [call] = m.content
    assert call.type == "tool_use" and call.id.startswith("toolu_") and call.name == "get_weather"
    assert isinstance(call.input, dict) and isinstance(call.input["city"], str) and m.stop_reason == "tool_use"
    with claude.messages.stream(model=MODEL, max_tokens=60, messages=ASK, extra_body=GREEDY, tools=[WEATHER],
                                tool_choice=forced) as stream:
        pieces = [e.delta.partial_json for e in stream if e.type == "content_block_delta"]
        streamed = stream.get_final_message()
    assert [(b.type, b.name, b.input) for b in streamed.content] == [("tool_use", "get_weather", call.input)]
    assert len(pieces) > 3 and json.loads("".join(pieces)) == call.input  # the input as the model wrote it
    answer = create(claude, tools=[WEATHER], max_tokens=40, messages=[
        *ASK, {"role": "assistant", "content": [b.model_dump() for b in m.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                      "content": [{"type": "text", "text": "Sunny, 24 C"}]}]}])
    assert answer.content and answer.stop_reason in ("end_turn", "max_tokens", "tool_use")
    assert answer.usage.input_tokens > m.usage.input_tokens


def test_count_tokens_is_the_messages_input_tokens(claude):
    kwargs = dict(model=MODEL, system=[{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
                  messages=ASK, tools=[WEATHER])
    counted = claude.messages.count_tokens(**kwargs)
    assert counted.input_tokens == create(claude, max_tokens=1, **kwargs).usage.input_tokens
    assert claude.messages.count_tokens(model=MODEL, messages=ASK).input_tokens < counted.input_tokens


# --- a coding agent's first request: a large system prompt, many tools, streamed ---

AGENT_SYSTEM = [
    {"type": "text", "text": "You are a coding agent, an interactive CLI tool that helps users with software engineering tasks."},
    {"type": "text", "cache_control": {"type": "ephemeral"}, "text": "\n".join(
        f"- Rule {i}: keep answers short, run the tests before you say a change is done, and never guess a file's "
        f"contents: read it first." for i in range(40))},
]


def agent_tool(name: str, about: str, **properties) -> dict:
    return {"name": name, "description": about, "input_schema": {
        "type": "object", "properties": {k: {"type": v, "description": f"The {k}"} for k, v in properties.items()},
        "required": list(properties)[:1], "additionalProperties": False, "$schema": "http://json-schema.org/draft-07/schema#"}}


AGENT_TOOLS = [
    agent_tool("Task", "Launch a sub-agent", description="string", prompt="string"),
    agent_tool("Bash", "Run a shell command", command="string", timeout="number"),
    agent_tool("Glob", "Find files by pattern", pattern="string", path="string"),
    agent_tool("Grep", "Search file contents", pattern="string", path="string", glob="string"),
    agent_tool("LS", "List a directory", path="string"),
    agent_tool("Read", "Read a file", file_path="string", offset="integer", limit="integer"),
    agent_tool("Edit", "Replace text in a file", file_path="string", old_string="string", new_string="string"),
    agent_tool("MultiEdit", "Several edits to one file", file_path="string", edits="array"),
    agent_tool("Write", "Write a file", file_path="string", content="string"),
    agent_tool("NotebookEdit", "Edit a notebook cell", notebook_path="string", new_source="string"),
    agent_tool("WebFetch", "Fetch a URL", url="string", prompt="string"),
    agent_tool("TodoWrite", "Update the todo list", todos="array"),
    agent_tool("WebSearch", "Search the web", query="string"),
    agent_tool("BashOutput", "Read a background shell's output", bash_id="string"),
    agent_tool("KillShell", "Stop a background shell", shell_id="string"),
]


def sse_events(response: httpx.Response) -> list[tuple[str, dict]]:
    events, name = [], None
    for line in response.iter_lines():
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            data = json.loads(line[6:])
            assert data["type"] == name
            events.append((name, data))
    return events


def assert_well_formed(events: list[tuple[str, dict]]) -> None:
    """message_start first, then blocks started, given deltas and stopped in order with their
    indexes, message_delta then message_stop last (pings anywhere)."""
    kinds = [kind for kind, _ in events if kind != "ping"]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    open_index, next_index = None, 0
    for kind, data in events[1:-2]:
        if kind == "content_block_start":
            assert open_index is None and data["index"] == next_index
            open_index, next_index = data["index"], next_index + 1
        elif kind == "content_block_delta":
            assert data["index"] == open_index
        elif kind == "content_block_stop":
            assert data["index"] == open_index
            open_index = None
        else:
            assert kind == "ping"
    assert open_index is None and next_index > 0


KEY = "sk-messages"


@pytest.fixture(scope="module")
def agent_server():
    """A server as a coding agent is pointed at: keyed, and with SmolLM2's whole trained context
    (its catalogue entry serves 2,048 tokens; an agent's system prompt and tools take 3,000)."""
    s = Server({"N_THREADS": "2", "API_KEY": KEY, "N_CTX": "8192"}).wait_ready()
    yield s
    s.stop()


def test_a_coding_agents_first_request_streams_well_formed(agent_server):
    body = {"model": MODEL, "max_tokens": 64, "temperature": 1, "stream": True, "system": AGENT_SYSTEM,
            "tools": AGENT_TOOLS, "metadata": {"user_id": "user_abc_account_def_session_ghi"},
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": "<system-reminder>The working directory is /repo.</system-reminder>"},
                {"type": "text", "text": "List the Python files here.", "cache_control": {"type": "ephemeral"}}]}]}
    headers = {"anthropic-version": "2023-06-01", "anthropic-beta": "interleaved-thinking-2025-05-14", "x-api-key": KEY}
    with httpx.stream("POST", f"{agent_server.url}/v1/messages", json=body, headers=headers, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert_well_formed(events)
    start, (_, delta) = events[0][1], events[-2]
    assert start["message"]["usage"]["input_tokens"] > 3000 and start["message"]["content"] == []
    assert delta["delta"]["stop_reason"] in ("end_turn", "max_tokens", "tool_use") and delta["usage"]["output_tokens"] > 0


# --- thinking ---


@pytest.fixture(scope="module")
def r1(tmp_path_factory):
    """The R1 distill template: with thinking on, its generation prompt opens `<think>`, so what
    SmolLM2 writes (it never closes the block) is all thinking."""
    s = serve(tmp_path_factory, "r1-messages", R1)
    yield s
    s.stop()


def test_thinking_on_a_reasoning_template(r1):
    client = sdk(r1)
    thinking = {"type": "enabled", "budget_tokens": 16}
    m = create(client, model="r1-messages", max_tokens=24, messages=[{"role": "user", "content": "What is 2 + 2?"}],
               thinking=thinking)
    [block] = m.content
    assert block.type == "thinking" and block.thinking and "<think>" not in block.thinking and block.signature == ""
    assert m.stop_reason == "max_tokens" and m.usage.output_tokens == 24
    with client.messages.stream(model="r1-messages", max_tokens=24, extra_body=GREEDY, thinking=thinking,
                                messages=[{"role": "user", "content": "What is 2 + 2?"}]) as stream:
        deltas = [e.delta.thinking for e in stream if e.type == "content_block_delta"]
        final = stream.get_final_message()
    assert "".join(deltas) == final.content[0].thinking == block.thinking
    off = create(client, model="r1-messages", max_tokens=24, messages=[{"role": "user", "content": "What is 2 + 2?"}])
    assert [b.type for b in off.content] == ["text"]  # no `thinking`: the template closes the block at once
    # the thinking of an earlier turn goes back as the template's reasoning_content
    again = client.messages.count_tokens(model="r1-messages", thinking=thinking, messages=[
        {"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": [b.model_dump() for b in m.content]
                                                        + [{"type": "text", "text": "4"}]},
        {"role": "user", "content": "And 3 + 3?"}])
    assert again.input_tokens > m.usage.input_tokens


# --- errors ---


@pytest.mark.parametrize("change, named", [
    ({"max_tokens": None}, "max_tokens"),
    ({"messages": [{"role": "bot", "content": "Hi"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                                             "data": "AAAA"}}]}]}, "messages[0].content[0].type"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}], "tool_choice": {"type": "tool", "name": "web_search"}},
     "tool_choice"),
    ({"temperature": 1.5}, "temperature"),
])
def test_bad_input_is_a_400_naming_the_field(server, change, named):
    body = {"model": MODEL, "max_tokens": 8, "messages": HELLO, **change}
    r = httpx.post(f"{server.url}/v1/messages", json={k: v for k, v in body.items() if v is not None}, timeout=30)
    assert r.status_code == 400
    error = r.json()
    assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error" and named in error["error"]["message"]


def test_errors_reach_the_sdk_as_its_exceptions(claude):
    with pytest.raises(anthropic.NotFoundError) as e:
        create(claude, model="claude-sonnet-4-5")
    assert e.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError):
        claude.messages.count_tokens(model=MODEL, messages=[{"role": "user", "content": [{"type": "document", "source": {}}]}])


def test_the_key_is_taken_as_x_api_key_and_refusals_are_anthropics(agent_server):
    s = agent_server
    r = httpx.post(f"{s.url}/v1/messages", json={"model": MODEL, "max_tokens": 4, "messages": HELLO}, timeout=30)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error" and r.json()["type"] == "error"
    assert httpx.get(f"{s.url}/v1/models", timeout=30).json()["error"]["code"] == "invalid_api_key"  # OpenAI's
    with pytest.raises(anthropic.AuthenticationError):
        create(sdk(s, "wrong"), max_tokens=4)
    assert create(sdk(s, KEY), max_tokens=4).usage.output_tokens > 0  # the SDK sends x-api-key
    assert httpx.get(f"{s.url}/v1/models", headers={"x-api-key": KEY}, timeout=30).status_code == 200


# --- Anthropic's shape on every error of a Messages route, over HTTP ---


def test_a_full_queue_the_openapi_document_and_a_shutdown_speak_anthropics_shape_on_messages_routes():
    """One sequence and no queue: while a long message streams, another is a 429 in Anthropic's
    shape (spelled `//v1/messages` too; chat's stays OpenAI's), /openapi.json says so, and a
    SIGTERM whose grace the stream outlives ends it with Anthropic's `error` event. (The draining
    503 itself is tests/unit/test_routes.py's: granian closes every idle connection at SIGTERM, so
    no request reaches the gate over HTTP while it drains.)"""
    s = Server({"N_THREADS": "2", "PARALLEL": "1", "MAX_QUEUE": "0", "SHUTDOWN_GRACE_S": "1"}).wait_ready()
    try:
        long = {"model": MODEL, "max_tokens": 1900, "messages": [{"role": "user", "content": "Tell me a long story."}],
                "stream": True}
        with httpx.Client(timeout=60) as kept, \
                httpx.stream("POST", f"{s.url}/v1/messages", json=long, timeout=60) as r:
            lines = r.iter_lines()
            assert next(lines) == "event: message_start"
            s.wait_metric("gguf_running", 1)
            for path in ("/v1/messages", "//v1/messages"):
                full = kept.post(f"{s.url}{path}", json={"model": MODEL, "max_tokens": 4, "messages": HELLO})
                assert full.status_code == 429 and full.headers["retry-after"] == "1"
                assert full.json()["type"] == "error" and full.json()["error"]["type"] == "rate_limit_error"
            chat = kept.post(f"{s.url}/v1/chat/completions", json={"model": MODEL, "max_tokens": 4, "messages": HELLO})
            assert chat.status_code == 429 and chat.json()["error"]["code"] == "queue_full"  # OpenAI's
            document = kept.get(f"{s.url}/openapi.json").json()
            schemas = document["components"]["schemas"]
            for path, kind in (("/v1/messages", {"type", "error"}), ("/v1/chat/completions", {"error"})):
                ref = document["paths"][path]["post"]["responses"]["4XX"]["content"]["application/json"]["schema"]["$ref"]
                assert set(schemas[ref.rsplit("/", 1)[1]]["properties"]) == kind
            s.proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert rest[-2:] == ["event: error", 'data: {"type":"error","error":{"type":"overloaded_error","message":'
                                             '"the server is shutting down; retry on another instance"}}']
        assert s.proc.wait(timeout=30) == 0
    finally:
        s.stop()
