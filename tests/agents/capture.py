"""Records what a coding agent sends, to make the replay fixtures in this directory.

    python tests/agents/capture.py OUT.jsonl [PORT]
    python tests/agents/capture.py trim OUT.jsonl N FIXTURE.json

serves a scripted model on loopback: every POST's path and JSON body is appended to OUT.jsonl,
and the answer is a call of one of the agent's own tools while the conversation has fewer than
`TURNS` tool results, then a short text. The default model never chooses a tool by itself, so
this is how an agent's real multi-turn requests (a tool call and its result sent back) are
obtained; the fixtures are those requests (`trim`: the Nth line's path, its API's headers and its
body with every text longer than TEXT_KEPT characters cut, so that a replay fits the default
model's context and is read in minutes rather than hours, and the capture's directories renamed).
tests/test_agents.py's `codex`, `claude` and `opencode` write each agent's configuration.
Not a test: run by hand when an agent's pinned version changes."""

from __future__ import annotations

import json
import sys
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# Which tool each agent is asked to call, in turn (its name in the agent's tools, the arguments).
SHELL = "echo captured"
PATCH = "*** Begin Patch\n*** Add File: hello.txt\n+hello\n*** End Patch\n"
CALLS = {
    "exec_command": {"cmd": SHELL}, "shell": {"command": ["bash", "-lc", SHELL]},
    "shell_command": {"command": SHELL}, "apply_patch": PATCH,
    "multi_agent_v1.close_agent": {"target": "agent-1"},
    "Bash": {"command": SHELL, "description": "Print a word"},
    "bash": {"command": SHELL, "description": "Print a word"},
}


def sse(event: str | None, data) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data)}\n\n".encode()


def tool_names(body: dict) -> list[str]:
    """Every tool name offered, a namespace's as `namespace.name`."""
    names = []
    for tool in body.get("tools") or []:
        names.append(tool.get("name") or (tool.get("function") or {}).get("name"))
        names += [f"{tool['name']}.{t.get('name')}" for t in tool.get("tools") or []]
    return names


def next_call(body: dict, done: int) -> str | None:
    """The tool to call now: the offered ones of CALLS in order, one per tool result so far."""
    wanted = [name for name in CALLS if name in tool_names(body)]
    return wanted[done] if done < len(wanted) else None


def responses_answer(body: dict) -> list[bytes]:
    done = sum(item.get("type", "").endswith("_call_output") for item in body["input"])
    name, rid = next_call(body, done), f"resp_{uuid.uuid4().hex}"
    if name == "apply_patch":
        item = {"type": "custom_tool_call", "id": "ctc_1", "call_id": f"call_{uuid.uuid4().hex[:8]}", "name": name,
                "input": CALLS[name], "status": "completed"}
    elif name:
        namespace, _, function = name.rpartition(".")
        item = {"type": "function_call", "id": "fc_1", "call_id": f"call_{uuid.uuid4().hex[:8]}", "name": function,
                "arguments": json.dumps(CALLS[name]), "status": "completed"}
        if namespace:
            item["namespace"] = namespace
    else:
        item = {"type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
                "content": [{"type": "output_text", "text": "Done.", "annotations": []}]}
    usage = {"input_tokens": 10, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 2,
             "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 12}
    return [sse("response.created", {"type": "response.created", "response": {"id": rid}}),
            sse("response.output_item.done", {"type": "response.output_item.done", "output_index": 0, "item": item}),
            sse("response.completed", {"type": "response.completed",
                                       "response": {"id": rid, "status": "completed", "usage": usage}})]


def messages_answer(body: dict) -> tuple[dict, list[bytes]]:
    done = sum(b.get("type") == "tool_result" for m in body["messages"] if isinstance(m["content"], list)
               for b in m["content"])
    name = next_call(body, done) if body.get("tools") else None
    block = ({"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:12]}", "name": name, "input": CALLS[name]} if name
             else {"type": "text", "text": "Done."})
    message = {"id": f"msg_{uuid.uuid4().hex}", "type": "message", "role": "assistant", "model": body["model"],
               "content": [block], "stop_reason": "tool_use" if name else "end_turn", "stop_sequence": None,
               "usage": {"input_tokens": 10, "output_tokens": 2}}
    start = {**message, "content": [], "stop_reason": None}
    first = {**block, "input": {}} if name else {**block, "text": ""}
    delta = ({"type": "input_json_delta", "partial_json": json.dumps(CALLS[name])} if name
             else {"type": "text_delta", "text": "Done."})
    return message, [
        sse("message_start", {"type": "message_start", "message": start}),
        sse("content_block_start", {"type": "content_block_start", "index": 0, "content_block": first}),
        sse("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}),
        sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
        sse("message_delta", {"type": "message_delta", "usage": {"output_tokens": 2},
                              "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None}}),
        sse("message_stop", {"type": "message_stop"})]


def chat_answer(body: dict) -> list[bytes]:
    done = sum(m["role"] == "tool" for m in body["messages"])
    name = next_call(body, done) if body.get("tools") else None
    cid = f"chatcmpl-{uuid.uuid4().hex}"

    def chunk(delta, finish=None, usage=None):
        return sse(None, {"id": cid, "object": "chat.completion.chunk", "created": 0, "model": body["model"],
                          "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
                          **({"usage": usage} if usage else {})})

    if name:
        call = {"index": 0, "id": f"call_{uuid.uuid4().hex[:8]}", "type": "function",
                "function": {"name": name, "arguments": json.dumps(CALLS[name])}}
        parts = [chunk({"role": "assistant", "tool_calls": [call]}), chunk({}, "tool_calls")]
    else:
        parts = [chunk({"role": "assistant", "content": "Done."}), chunk({}, "stop")]
    usage = {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12}
    return [*parts, chunk({}, None, usage), b"data: [DONE]\n\n"]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self.record(None)
        model = {"id": "smollm2-135m-instruct", "object": "model", "created": 0, "owned_by": "local"}
        self.send(200, json.dumps({"object": "list", "data": [model]}).encode())

    def do_HEAD(self):
        self.send(200, b"")

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["content-length"])) or b"{}")
        self.record(body)
        path = self.path.split("?")[0]
        if path.endswith("/count_tokens"):
            return self.send(200, json.dumps({"input_tokens": 10}).encode())
        if path.endswith("/responses"):
            events = responses_answer(body)
        elif path.endswith("/messages"):
            message, events = messages_answer(body)
            if not body.get("stream"):
                return self.send(200, json.dumps(message).encode())
        else:
            events = chat_answer(body)
        self.send(200, b"".join(events), "text/event-stream")

    def record(self, body) -> None:
        with open(sys.argv[1], "a") as out:
            out.write(json.dumps({"method": self.command, "path": self.path, "headers": dict(self.headers),
                                  "body": body}) + "\n")


TEXT_KEPT = 400
HEADERS_KEPT = ("anthropic-version", "anthropic-beta")


def trimmed(value, renames: dict[str, str]):
    if isinstance(value, str):
        for old, new in renames.items():
            value = value.replace(old, new)
        return value if len(value) <= TEXT_KEPT else value[:TEXT_KEPT] + " [...]"
    if isinstance(value, list):
        return [trimmed(v, renames) for v in value]
    if isinstance(value, dict):  # a call's own arguments are kept whole: they must stay valid JSON or a patch;
        # so is a custom tool's grammar (Codex's apply_patch), which the server compiles
        call = value.get("type") in ("tool_use", "custom_tool_call", "function_call") or "arguments" in value
        whole = ("arguments", "input") if call else ("definition",) if value.get("type") == "grammar" else ()
        return {k: v if k in whole else trimmed(v, renames) for k, v in value.items()}
    return value


def trim(capture: str, n: int, fixture: str, renames: dict[str, str]) -> None:
    record = json.loads(open(capture).readlines()[n])
    headers = {k.lower(): v for k, v in record["headers"].items() if k.lower() in HEADERS_KEPT}
    with open(fixture, "w") as out:
        json.dump({"path": record["path"], "headers": headers, "body": trimmed(record["body"], renames)}, out, indent=1)
        out.write("\n")


if __name__ == "__main__" and sys.argv[1] == "trim":
    # the capture's own directories (its HOME and working directory) as a user's would read
    trim(sys.argv[2], int(sys.argv[3]), sys.argv[4], dict(arg.split("=", 1) for arg in sys.argv[5:]))
elif __name__ == "__main__":
    ThreadingHTTPServer(("127.0.0.1", int(sys.argv[2]) if len(sys.argv) > 2 else 0), Handler).serve_forever()
