"""The coding agents' own requests, replayed: each fixture in tests/agents/ is a request one of
them sent (captured by tests/agents/capture.py: Codex CLI 0.171.0 on the Responses API, Claude
Code 2.1.197 on the Messages API, opencode 1.18.33 on chat completions), a multi-turn one that
carries a tool call and its result in the agent's own shape. The default model never calls a tool
by itself, so this is how the tool-call paths are tested both ways: the call and its result read
(the prompt, logged with LOG_PROMPTS, holds them), and a forced call written back in the shape the
agent routes, streamed and not. Also: Claude Code's billing block left out of the prompt, and the
second turn of a Codex and of a Claude Code session reusing ≥ 90% of its prompt from the first."""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import httpx
import pytest

from conftest import Server


# Marked so that `-m 'not agents'` can leave the coding agents' tests out (they take minutes).
pytestmark = pytest.mark.agents

FIXTURES = Path(__file__).parent / "agents"
MAX_TOKENS = 16  # replays read the conversation; what the model says after it is not what they test


def fixture(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


@pytest.fixture(scope="module")
def replay_server():
    """The prompts as each request's log line (LOG_PROMPTS), one sequence (PARALLEL=1) so that a
    second turn finds the first's tokens, and a context that holds Claude Code's trimmed prompt."""
    s = Server({"N_THREADS": "2", "N_CTX": "16384", "PARALLEL": "1", "LOG_PROMPTS": "1"}).wait_ready()
    yield s
    s.stop()


def log_lines(server: Server) -> list[dict]:
    return [json.loads(line) for line in server.output().splitlines() if line.startswith('{"request_id"')]


def new_lines(server: Server, before: int, n: int) -> list[dict]:
    """The `n` log lines after the first `before`: a line is printed once its answer is sent, so
    a client may have the answer a moment before the server has its line."""
    deadline = time.monotonic() + 30
    while len(lines := log_lines(server)[before:]) < n:
        assert time.monotonic() < deadline, lines
        time.sleep(0.05)
    return lines


def bounded(request: dict, stream: bool, **changes) -> dict:
    """The captured body, streamed or not, its answer kept short."""
    body = {**copy.deepcopy(request["body"]), "stream": stream, **changes}
    if request["path"].startswith("/v1/responses"):
        body["max_output_tokens"] = body.get("max_output_tokens", MAX_TOKENS)
    else:
        body["max_tokens"] = MAX_TOKENS if "max_tokens" not in changes else changes["max_tokens"]
    if not stream:
        body.pop("stream_options", None)
    return body


def post(server: Server, request: dict, body: dict) -> tuple[httpx.Response, list[dict] | dict]:
    """POST as the agent did (its path, its API's headers); a stream's events as a list."""
    headers = {"authorization": "Bearer unused", "x-api-key": "unused", **request["headers"]}
    r = httpx.post(server.url + request["path"], json=body, headers=headers, timeout=600)
    if not body.get("stream") or r.status_code != 200:
        return r, r.json()
    data = [line.removeprefix("data: ") for line in r.text.splitlines() if line.startswith("data: ")]
    return r, [json.loads(d) for d in data if d != "[DONE]"]


# Each fixture, and what its prompt must hold: the tool call as the model would have written it
# (SmolLM2's template drops tool calls, so the server writes them in the <tool_call> form its
# system message teaches) and the result the agent sent back.
READ = {
    "codex-function-call": ['{"name": "exec_command", "arguments": {"cmd": "echo captured"}}',
                            "Process exited with code 0"],
    "codex-custom-tool-call": ['{"name": "apply_patch", "arguments": {"input": "*** Begin Patch\\n*** Add File: hello.txt',
                               "<tool_response>\nExit code: 0"],
    "codex-namespace-call": ['{"name": "multi_agent_v1__close_agent", "arguments": {"target": "agent-1"}}',
                             "invalid agent id agent-1"],
    "claude-tool-use": ['{"name": "Bash", "arguments": {"command": "echo captured"', "<tool_response>\ncaptured"],
    "opencode-tool-message": ['{"name": "bash", "arguments": {"command": "echo captured"', "<tool_response>\ncaptured"],
}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("name", READ)
def test_replayed_turn_is_read_and_answered(replay_server, name, stream):
    request = fixture(name)
    before = len(log_lines(replay_server))
    r, answer = post(replay_server, request, bounded(request, stream))
    assert r.status_code == 200, r.text
    [line] = new_lines(replay_server, before, 1)
    for text in READ[name]:
        assert text in line["prompt"], text
    if name.startswith("codex"):
        # Codex offers web_search (and with some models tool_search): hosted tools left out, named
        assert "web_search" in r.headers["x-gguf-tools-ignored"]
        final = answer if not stream else answer[-1]["response"]
        assert final["status"] in ("completed", "incomplete")
        assert not stream or answer[-1]["type"] in ("response.completed", "response.incomplete")
    elif name.startswith("claude"):
        assert (answer[-1]["type"] if stream else answer["type"]) == ("message_stop" if stream else "message")
    else:
        assert answer["object"] == "chat.completion" if not stream else answer[0]["object"] == "chat.completion.chunk"


def forced_codex_item(server: Server, name: str, choice: dict, stream: bool) -> tuple[str, dict]:
    """The response's status and the one item a forced tool choice answers with. SmolLM2 samples
    at Codex's temperature (it sends none: 1) and may still be writing when max_output_tokens ends
    the answer: then the response is incomplete for that reason, and its item is there all the same."""
    request = fixture(name)
    r, answer = post(server, request, bounded(request, stream, tool_choice=choice, max_output_tokens=400))
    assert r.status_code == 200, r.text
    final = answer[-1]["response"] if stream else answer
    assert final["status"] == "completed" or final["incomplete_details"] == {"reason": "max_output_tokens"}
    [item] = [i for i in final["output"] if i["type"] != "reasoning"]
    if stream:
        assert answer[-1]["type"] == f"response.{final['status']}"
        assert [e["item"] for e in answer if e["type"] == "response.output_item.done"][-1] == item
    return final["status"], item


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_forced_namespaced_call_comes_back_as_codex_routes_it(replay_server, stream):
    """multi_agent_v1's close_agent, forced by its own name: a function_call whose `name` and
    `namespace` are apart (what Codex looks its handler up by), arguments its schema's JSON."""
    status, item = forced_codex_item(replay_server, "codex-namespace-call", {"type": "function", "name": "close_agent"}, stream)
    assert (item["type"], item["name"], item["namespace"]) == ("function_call", "close_agent", "multi_agent_v1")
    assert item["call_id"]
    assert status == "incomplete" or isinstance(json.loads(item["arguments"])["target"], str)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_forced_custom_tool_call_comes_back_as_codex_runs_it(replay_server, stream):
    """apply_patch, a custom tool with a grammar: a custom_tool_call whose `input` is the patch
    text itself (the grammar's start), not JSON arguments."""
    status, item = forced_codex_item(replay_server, "codex-custom-tool-call", {"type": "custom", "name": "apply_patch"}, stream)
    assert (item["type"], item["name"]) == ("custom_tool_call", "apply_patch") and item["call_id"]
    assert item["input"].startswith("*** Begin Patch\n")
    # the grammar's end too, unless max_output_tokens came first
    assert status == "incomplete" or item["input"].rstrip("\n").endswith("*** End Patch")
    assert "namespace" not in item and "arguments" not in item


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_forced_tool_use_comes_back_as_claude_code_reads_it(replay_server, stream):
    request = fixture("claude-tool-use")
    body = bounded(request, stream, tool_choice={"type": "tool", "name": "Bash"}, max_tokens=300)
    body.pop("thinking")  # Anthropic refuses a forced tool with thinking on
    r, answer = post(replay_server, request, body)
    assert r.status_code == 200, r.text
    if not stream:
        [block] = [b for b in answer["content"] if b["type"] == "tool_use"]
        assert block["name"] == "Bash" and isinstance(block["input"]["command"], str)
        assert block["id"].startswith("toolu_")
        return
    [start] = [e["content_block"] for e in answer if e["type"] == "content_block_start"
               and e["content_block"]["type"] == "tool_use"]
    assert start["name"] == "Bash" and start["input"] == {}
    streamed = "".join(e["delta"]["partial_json"] for e in answer if e["type"] == "content_block_delta"
                       and e["delta"]["type"] == "input_json_delta")
    assert isinstance(json.loads(streamed)["command"], str)
    assert [e["delta"]["stop_reason"] for e in answer if e["type"] == "message_delta"] == ["tool_use"]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_forced_tool_call_comes_back_as_opencode_reads_it(replay_server, stream):
    request = fixture("opencode-tool-message")
    body = bounded(request, stream, tool_choice={"type": "function", "function": {"name": "bash"}}, max_tokens=300)
    r, answer = post(replay_server, request, body)
    assert r.status_code == 200, r.text
    if not stream:
        [call] = answer["choices"][0]["message"]["tool_calls"]
        assert call["function"]["name"] == "bash"
        assert isinstance(json.loads(call["function"]["arguments"])["command"], str)
        return
    calls = [c for e in answer if e["choices"] for c in e["choices"][0]["delta"].get("tool_calls") or []]
    assert calls[0]["function"]["name"] == "bash" and calls[0]["id"]
    assert isinstance(json.loads("".join(c["function"]["arguments"] for c in calls))["command"], str)


# --- Claude Code's billing block (issue 35, item 3) --------------------------------------------

def billing_header(version: str, entrypoint: str, cch: str) -> str:
    """Claude Code's first system block as its newer versions write it (2.1.197 sends no cch=)."""
    return f"x-anthropic-billing-header: cc_version={version}; cc_entrypoint={entrypoint}; cch={cch};"


def with_billing(request: dict, header: str) -> dict:
    body = copy.deepcopy(request["body"])
    assert body["system"][0]["text"].startswith("x-anthropic-billing-header:")
    body["system"][0]["text"] = header
    return body


def test_billing_block_is_left_out_of_the_prompt(replay_server):
    """Two requests differing only in that block (its cch= hash, as newer versions send, or its
    version) count the same tokens as one without it, and render the same prompt."""
    request = fixture("claude-first-turn")
    headers = {"x-api-key": "unused", **request["headers"]}
    bodies = [with_billing(request, billing_header("2.1.197.c40", "cli", "1a2b3")),
              with_billing(request, billing_header("2.1.332.9f1", "sdk-cli", "ffe01"))]
    without = copy.deepcopy(request["body"])
    without["system"] = without["system"][1:]
    counts = {httpx.post(f"{replay_server.url}/v1/messages/count_tokens", headers=headers, timeout=60,
                         json={k: v for k, v in body.items() if k in ("model", "system", "messages", "tools")}
                         ).json()["input_tokens"] for body in [*bodies, without]}
    assert len(counts) == 1, counts
    before = len(log_lines(replay_server))
    for body in bodies:  # without the tools (7.5k tokens of the 7.8k): the system prompt is what differs
        r = httpx.post(f"{replay_server.url}/v1/messages", headers=headers, timeout=600,
                       json={**body, "stream": False, "max_tokens": 1, "thinking": {"type": "disabled"}, "tools": None})
        assert r.status_code == 200, r.text
    first, second = new_lines(replay_server, before, 2)
    assert "x-anthropic-billing-header" not in first["prompt"] and first["prompt"] == second["prompt"]
    # the second finds the first's prompt in the KV cache but for its last token (computed again for its logits)
    assert second["cached_tokens"] >= second["prompt_tokens"] - 1


@pytest.mark.parametrize("agent,turns", [
    ("codex", ["codex-first-turn", "codex-function-call"]),
    ("claude", ["claude-first-turn", "claude-tool-use"]),
])
def test_second_turn_reuses_the_first_turns_prompt(replay_server, agent, turns):
    """A session's second turn (the first's prompt, then the tool call and its result) reports
    ≥ 90% of its prompt's tokens cached (the log line's `cached_tokens`, as usage reports them).
    Claude Code's turns carry a different cch= hash each, as its newer versions send."""
    first, second = (fixture(name) for name in turns)
    bodies = [bounded(first, True), bounded(second, True)]
    if agent == "claude":
        for body, cch in zip(bodies, ("1a2b3", "4c5d6")):
            body["system"][0]["text"] = billing_header("2.1.197.c40", "cli", cch)
    before = len(log_lines(replay_server))
    for request, body in zip((first, second), bodies):
        r, _ = post(replay_server, request, body)
        assert r.status_code == 200, r.text
    turn1, turn2 = new_lines(replay_server, before, 2)
    assert turn2["cached_tokens"] >= 0.9 * turn2["prompt_tokens"], (turn1, turn2)
