"""The tools coding agents offer, against SmolLM2 in granian with the real openai and anthropic
SDKs and raw httpx: Codex's namespace tools, its custom (apply_patch) and local_shell tools,
hosted tools left out (named in a header and the log line) or refused when forced, on
/v1/responses, /v1/chat/completions and /v1/messages. SmolLM2 never calls a tool by itself, so
calls are forced, or replayed as an agent sends them back."""

import json
import re

import anthropic
import httpx
import pytest

from conftest import MODEL

SPAWN = {"type": "function", "name": "spawn_agent", "description": "Start a sub-agent on a task",
         "parameters": {"type": "object", "properties": {"task": {"type": "string"}}, "required": ["task"],
                        "additionalProperties": False}}
NAMESPACE = {"type": "namespace", "name": "multi_agent_v1", "description": "Sub-agents", "tools": [SPAWN]}
WEB_SEARCH = {"type": "web_search", "external_web_access": False}
APPLY_PATCH_GRAMMAR = r'''start: begin_patch hunk+ end_patch
begin_patch: "*** Begin Patch" LF
end_patch: "*** End Patch" LF?

hunk: add_hunk | delete_hunk | update_hunk
add_hunk: "*** Add File: " filename LF add_line+
delete_hunk: "*** Delete File: " filename LF
update_hunk: "*** Update File: " filename LF change_move? change?

filename: /(.+)/
add_line: "+" /(.*)/ LF -> line

change_move: "*** Move to: " filename LF
change: (change_context | change_line)+ eof_line?
change_context: ("@@" | "@@ " /(.+)/) LF
change_line: ("+" | "-" | " ") /(.*)/ LF
eof_line: "*** End of File" LF

%import common.LF
'''
APPLY_PATCH = {"type": "custom", "name": "apply_patch", "description": "Edit files with a patch",
               "format": {"type": "grammar", "syntax": "lark", "definition": APPLY_PATCH_GRAMMAR}}
SHELL = {"type": "local_shell"}


def post(base_url, path="/v1/responses", **body) -> httpx.Response:
    payload = {"model": MODEL, "input": "Add a file hello.txt saying hi.", "max_output_tokens": 48, "temperature": 0,
               "store": False, **body} if path == "/v1/responses" else {"model": MODEL, **body}
    return httpx.post(f"{base_url}{path}", json=payload, timeout=120)


def sse_events(response: httpx.Response) -> list[dict]:
    assert response.status_code == 200, response.text
    return [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: ")]


def input_tokens(base_url, **body) -> int:
    r = httpx.post(f"{base_url}/v1/responses/input_tokens", json={"model": MODEL, **body}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["input_tokens"]


# --- namespace tools ---


def test_a_forced_namespaced_call_comes_back_with_its_namespace_apart(base_url, client, server):
    r = post(base_url, tools=[NAMESPACE, WEB_SEARCH], tool_choice={"type": "function", "name": "spawn_agent"})
    assert r.status_code == 200, r.text
    assert r.headers["x-gguf-tools-ignored"] == "web_search"
    [call] = r.json()["output"]
    assert set(call) == {"type", "id", "status", "call_id", "name", "namespace", "arguments"}
    assert (call["type"], call["name"], call["namespace"], call["status"]) == (
        "function_call", "spawn_agent", "multi_agent_v1", "completed")
    assert call["id"].startswith("fc_") and call["call_id"].startswith("call_")
    assert list(json.loads(call["arguments"])) == ["task"]  # the grammar held it to the function's parameters
    # the log line names what was left out
    rid = r.headers["x-request-id"]
    assert server.log_line(rid)["tools_ignored"] == ["web_search"]
    # the openai SDK reads it as Codex does: a function call with its namespace
    sdk = client.responses.create(model=MODEL, input="Start one.", max_output_tokens=48, temperature=0, store=False,
                                  tools=[NAMESPACE], tool_choice={"type": "function", "name": "multi_agent_v1__spawn_agent"})
    [call] = sdk.output
    assert (call.type, call.name, call.namespace) == ("function_call", "spawn_agent", "multi_agent_v1")


def test_a_forced_namespaced_call_streams_as_its_item(base_url, client):
    events = sse_events(post(base_url, stream=True, tools=[NAMESPACE, WEB_SEARCH],
                             tool_choice={"type": "function", "name": "spawn_agent"}))
    kinds = [e["type"] for e in events]
    deltas = kinds.count("response.function_call_arguments.delta")  # a forced call's arguments, as the model writes them
    assert deltas > 1 and kinds == ["response.created", "response.in_progress", "response.output_item.added",
                                    *["response.function_call_arguments.delta"] * deltas,
                                    "response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    added, done, item_done, completed = events[2], *events[-3:]
    assert added["item"] | {"arguments": "x", "id": "x", "call_id": "x"} == {
        "type": "function_call", "id": "x", "status": "in_progress", "call_id": "x", "name": "spawn_agent",
        "namespace": "multi_agent_v1", "arguments": "x"}
    streamed = "".join(e["delta"] for e in events[3:3 + deltas])
    assert added["item"]["arguments"] == "" and streamed == done["arguments"] == item_done["item"]["arguments"]
    assert item_done["item"]["namespace"] == "multi_agent_v1" and completed["response"]["output"] == [item_done["item"]]
    with client.responses.stream(model=MODEL, input="Start one.", max_output_tokens=48, temperature=0, store=False,
                                 tools=[NAMESPACE], tool_choice={"type": "function", "name": "spawn_agent"}) as stream:
        final = stream.get_final_response()
    assert (final.output[0].name, final.output[0].namespace) == ("spawn_agent", "multi_agent_v1")


def test_a_namespaced_call_replayed_or_continued_is_its_qualified_name_in_the_prompt(base_url, client):
    replay = [{"role": "user", "content": "Start one."},
              {"type": "function_call", "call_id": "call_1", "name": "spawn_agent", "namespace": "multi_agent_v1",
               "arguments": '{"task": "t"}'},
              {"type": "function_call_output", "call_id": "call_1", "output": "started"}]
    qualified = [replay[0], {**replay[1], "name": "multi_agent_v1__spawn_agent", "namespace": None}, replay[2]]
    # (SmolLM2's template writes no call's name into the prompt: the name mapping itself is asserted in
    # tests/unit/test_responses_tools.py; here, that the replay is accepted and counted as its qualified form)
    namespaced = input_tokens(base_url, tools=[NAMESPACE], input=replay)
    assert namespaced == input_tokens(base_url, tools=[NAMESPACE], input=[{k: v for k, v in i.items() if v is not None}
                                                                          for i in qualified])
    # a stored call continued with previous_response_id is the same prompt as its replay
    first = client.responses.create(model=MODEL, input="Start one.", max_output_tokens=48, temperature=0,
                                    tools=[NAMESPACE], tool_choice={"type": "function", "name": "spawn_agent"})
    [call] = first.output
    output = {"type": "function_call_output", "call_id": call.call_id, "output": "started"}
    continued = input_tokens(base_url, tools=[NAMESPACE], previous_response_id=first.id, input=[output])
    replayed = input_tokens(base_url, tools=[NAMESPACE], input=[
        {"role": "user", "content": "Start one."},
        {"type": "function_call", "call_id": call.call_id, "name": "spawn_agent", "namespace": "multi_agent_v1",
         "arguments": call.arguments}, output])
    assert continued == replayed
    again = client.responses.create(model=MODEL, previous_response_id=first.id, input=[output], max_output_tokens=8,
                                    tools=[NAMESPACE], store=False)
    assert again.status in ("completed", "incomplete") and again.usage.input_tokens == continued


# --- custom tools (Codex's apply_patch) ---


def test_a_forced_custom_tool_writes_its_input_under_its_grammar(base_url, client):
    r = post(base_url, tools=[APPLY_PATCH, WEB_SEARCH], tool_choice={"type": "custom", "name": "apply_patch"},
             max_output_tokens=40)
    assert r.status_code == 200, r.text
    [call] = r.json()["output"]
    assert set(call) == {"type", "id", "status", "call_id", "name", "input"}
    assert call["type"] == "custom_tool_call" and call["name"] == "apply_patch" and call["id"].startswith("ctc_")
    # 40 tokens may cut the patch: what was written follows the grammar from its first line
    assert call["input"].startswith("*** Begin Patch\n*** ") and call["status"] == r.json()["status"]
    # the openai SDK parses it
    sdk = client.responses.create(model=MODEL, input="Delete old.txt.", max_output_tokens=40, temperature=0, store=False,
                                  tools=[APPLY_PATCH], tool_choice={"type": "custom", "name": "apply_patch"})
    [call] = sdk.output
    assert call.type == "custom_tool_call" and call.input.startswith("*** Begin Patch\n")


def test_a_regex_custom_tool_is_held_to_it_and_its_input_streams(base_url):
    code = {"type": "custom", "name": "ticket", "format": {"type": "grammar", "syntax": "regex",
                                                           "definition": "[A-Z]{3}-[0-9]{2,4}"}}
    whole = post(base_url, tools=[code], tool_choice={"type": "custom", "name": "ticket"}, input="Open a ticket.")
    [call] = whole.json()["output"]
    assert re.fullmatch("[A-Z]{3}-[0-9]{2,4}", call["input"]) and whole.json()["status"] == "completed"
    events = sse_events(post(base_url, stream=True, tools=[code], tool_choice={"type": "custom", "name": "ticket"},
                             input="Open a ticket."))
    kinds = [e["type"] for e in events]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert kinds[-3:] == ["response.custom_tool_call_input.done", "response.output_item.done", "response.completed"]
    assert set(kinds[3:-3]) == {"response.custom_tool_call_input.delta"}
    deltas = "".join(e["delta"] for e in events[3:-3])
    assert deltas == events[-3]["input"] == events[-2]["item"]["input"] == call["input"]  # greedy: the same input


def test_a_custom_tool_with_a_bad_or_oversized_grammar_is_a_400(base_url):
    bad = {**APPLY_PATCH, "format": {"type": "grammar", "syntax": "lark", "definition": "start: ("}}
    r = post(base_url, tools=[bad], tool_choice={"type": "custom", "name": "apply_patch"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_grammar"
    assert "apply_patch" in r.json()["error"]["message"]
    huge = {**APPLY_PATCH, "format": {"type": "grammar", "syntax": "regex", "definition": "a" * 70000}}
    r = post(base_url, tools=[huge])
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools[0].format.definition"


def test_custom_and_shell_calls_replayed_are_the_calls_the_model_would_have_written(base_url, client):
    user = {"role": "user", "content": "Fix it."}
    custom = [user, {"type": "custom_tool_call", "call_id": "c1", "name": "apply_patch", "input": "*** Begin Patch\n"},
              {"type": "custom_tool_call_output", "call_id": "c1", "output": "Done!"}]
    as_function = [user, {"type": "function_call", "call_id": "c1", "name": "apply_patch",
                          "arguments": json.dumps({"input": "*** Begin Patch\n"})},
                   {"type": "function_call_output", "call_id": "c1", "output": "Done!"}]
    assert input_tokens(base_url, tools=[APPLY_PATCH], input=custom) == input_tokens(base_url, tools=[APPLY_PATCH],
                                                                                   input=as_function)
    action = {"type": "exec", "command": ["ls", "-la"], "timeout_ms": None, "working_directory": None, "env": None,
              "user": None}
    shell = [user, {"type": "local_shell_call", "id": "lsc_1", "call_id": "c2", "status": "completed", "action": action},
             {"type": "local_shell_call_output", "id": "c2", "output": '{"output": "a.txt"}'}]
    shell_as_function = [user, {"type": "function_call", "call_id": "c2", "name": "local_shell",
                                "arguments": json.dumps({"command": ["ls", "-la"]})},
                         {"type": "function_call_output", "call_id": "c2", "output": '{"output": "a.txt"}'}]
    assert input_tokens(base_url, tools=[SHELL], input=shell) == input_tokens(base_url, tools=[SHELL],
                                                                            input=shell_as_function)
    # and a generation after them runs, streamed and not (the SDK sends the items as Codex does)
    r = client.responses.create(model=MODEL, input=[*custom, *shell[1:]], tools=[APPLY_PATCH, SHELL],
                                max_output_tokens=8, store=False)
    assert r.output[0].type == "message" and r.usage.input_tokens > 0
    events = sse_events(post(base_url, stream=True, input=[*custom, *shell[1:]], tools=[APPLY_PATCH, SHELL],
                             max_output_tokens=8))
    assert events[-1]["type"] in ("response.completed", "response.incomplete")


# --- local_shell ---


def test_a_forced_local_shell_call_comes_back_with_its_exec_action(base_url, client):
    # SmolLM2 writes the description's example command, then repeats arguments until the budget
    # cuts it: the call comes back all the same, incomplete (cut_calls.py), its command as far as written
    r = post(base_url, tools=[SHELL], tool_choice={"type": "local_shell"}, input="List the files.", max_output_tokens=64)
    assert r.status_code == 200, r.text
    [call] = r.json()["output"]
    assert set(call) == {"type", "id", "status", "call_id", "action"} and call["type"] == "local_shell_call"
    assert call["status"] == r.json()["status"]
    if call["status"] == "incomplete":
        assert r.json()["incomplete_details"] == {"reason": "max_output_tokens"}
        assert r.json()["usage"]["output_tokens"] == 64
    action = call["action"]
    assert set(action) == {"type", "command", "env", "timeout_ms", "working_directory", "user"}
    assert action["type"] == "exec" and action["env"] == {} and action["command"]
    assert all(isinstance(c, str) for c in action["command"])
    events = sse_events(post(base_url, stream=True, tools=[SHELL], tool_choice={"type": "local_shell"},
                             input="List the files.", max_output_tokens=64))
    assert [e["type"] for e in events][2:] == ["response.output_item.added", "response.output_item.done",
                                               f"response.{call['status']}"]
    assert (events[3]["item"]["action"], events[3]["item"]["status"]) == (action, call["status"])  # greedy: the same
    sdk = client.responses.create(model=MODEL, input="List the files.", max_output_tokens=64, temperature=0, store=False,
                                  tools=[SHELL], tool_choice={"type": "local_shell"})
    assert sdk.output[0].type == "local_shell_call" and sdk.output[0].action.command == action["command"]


# --- a forced call cut by the token budget: still the call, marked as cut ---


def compact(json_text: str) -> str:
    """JSON text (whole or cut) without the whitespace between its tokens."""
    out, in_string, escaped = [], False, False
    for char in json_text:
        if in_string:
            escaped, in_string = (False, True) if escaped else (char == "\\", char != '"')
        elif char == '"':
            in_string = True
        elif char.isspace():
            continue
        out.append(char)
    return "".join(out)


def test_a_forced_call_cut_by_the_budget_is_that_call_on_every_api(base_url):
    # the same prompt on the three APIs (one function, one user message); greedy, so a budget cut
    # writes a prefix of the whole call: 6 tokens short of it ends inside its arguments
    whole = post(base_url, tools=[SPAWN], tool_choice={"type": "function", "name": "spawn_agent"}, max_output_tokens=48)
    assert whole.json()["status"] == "completed", whole.text
    full, budget = whole.json()["output"][0]["arguments"], whole.json()["usage"]["output_tokens"] - 6
    r = post(base_url, tools=[SPAWN], tool_choice={"type": "function", "name": "spawn_agent"}, max_output_tokens=budget)
    [call] = r.json()["output"]
    assert (r.json()["status"], r.json()["incomplete_details"], call["type"], call["status"]) == (
        "incomplete", {"reason": "max_output_tokens"}, "function_call", "incomplete")
    cut = call["arguments"]
    whole_call = json.dumps(json.loads(full), separators=(",", ":"))
    assert 0 < len(compact(cut)) < len(whole_call) and whole_call.startswith(compact(cut))  # as far as written
    # chat: the tool call, its arguments as far as written, finish_reason "length" (as OpenAI's)
    ask = [{"role": "user", "content": "Add a file hello.txt saying hi."}]
    spawn = {"type": "function", "function": {k: SPAWN[k] for k in ("name", "description", "parameters")}}
    chat = post(base_url, "/v1/chat/completions", messages=ask, tools=[spawn], max_tokens=budget, temperature=0,
                tool_choice={"type": "function", "function": {"name": "spawn_agent"}}).json()["choices"][0]
    assert (chat["finish_reason"], chat["message"]["content"]) == ("length", None)
    [chat_call] = chat["message"]["tool_calls"]
    assert (chat_call["function"]["name"], chat_call["function"]["arguments"]) == ("spawn_agent", cut)
    # Messages: the tool_use block (Anthropic's incomplete tool use block), stop_reason max_tokens, streamed the same
    anthropic_ask = dict(max_tokens=budget, temperature=0, messages=ask,
                         tool_choice={"type": "tool", "name": "spawn_agent"},
                         tools=[{"name": "spawn_agent", "description": SPAWN["description"],
                                 "input_schema": SPAWN["parameters"]}])
    message = post(base_url, "/v1/messages", **anthropic_ask).json()
    [block] = message["content"]
    assert (message["stop_reason"], block["type"], block["name"]) == ("max_tokens", "tool_use", "spawn_agent")
    task = json.loads(full)["task"]
    assert set(block["input"]) <= {"task"} and task.startswith(block["input"].get("task", ""))  # the object it began
    streamed = sse_events(post(base_url, "/v1/messages", stream=True, **anthropic_ask))
    assert "".join(e["delta"]["partial_json"] for e in streamed if e["type"] == "content_block_delta").strip() == cut
    assert [e["delta"]["stop_reason"] for e in streamed if e["type"] == "message_delta"] == ["max_tokens"]


# --- Chat Completions' custom tools ---

TICKET_GRAMMAR = {"type": "grammar", "grammar": {"syntax": "regex", "definition": "[A-Z]{3}-[0-9]{2,4}"}}
TICKET = {"type": "custom", "custom": {"name": "ticket", "description": "Open a ticket", "format": TICKET_GRAMMAR}}


def test_a_forced_chat_custom_tool_writes_its_input_under_its_grammar(base_url, client):
    ask = dict(messages=[{"role": "user", "content": "Open a ticket."}], tools=[TICKET], max_tokens=32, temperature=0,
               tool_choice={"type": "custom", "custom": {"name": "ticket"}})
    r = post(base_url, "/v1/chat/completions", **ask)
    assert r.status_code == 200, r.text
    [choice] = r.json()["choices"]
    [call] = choice["message"]["tool_calls"]
    assert set(call) == {"id", "type", "custom"} and call["type"] == "custom" and call["custom"]["name"] == "ticket"
    assert re.fullmatch("[A-Z]{3}-[0-9]{2,4}", call["custom"]["input"]) and choice["finish_reason"] == "tool_calls"
    # streamed: its id and name first, its input delta by delta (OpenAI's shape)
    lines = post(base_url, "/v1/chat/completions", stream=True, **ask).text.splitlines()
    chunks = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    deltas = [d for c in chunks for d in c["choices"][0]["delta"].get("tool_calls", []) if c["choices"]]
    assert deltas[0]["id"].startswith("call_") and deltas[0]["custom"]["name"] == "ticket"
    assert all(d["type"] == "custom" and "id" not in d for d in deltas[1:])
    assert "".join(d["custom"]["input"] for d in deltas) == call["custom"]["input"]  # greedy: the same input
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "tool_calls"
    # the openai SDK reads it as a custom tool call, and sends it back as one
    sdk = client.chat.completions.create(model=MODEL, **ask)
    [called] = sdk.choices[0].message.tool_calls
    assert (called.type, called.custom.name, called.custom.input) == ("custom", "ticket", call["custom"]["input"])
    back = [*ask["messages"], sdk.choices[0].message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": called.id, "content": "opened"}]
    as_function = [*ask["messages"], {"role": "assistant", "tool_calls": [
        {"id": called.id, "type": "function", "function": {"name": "ticket", "arguments": json.dumps(
            {"input": called.custom.input})}}]}, back[-1]]
    # (SmolLM2's template writes no call into the prompt: the mapping itself is asserted in
    # tests/unit/test_cut_calls.py; here, that the custom call sent back is accepted as its function form)
    prompts = [post(base_url, "/apply-template", messages=m, tools=[TICKET]) for m in (back, as_function)]
    assert [p.status_code for p in prompts] == [200, 200] and prompts[0].json() == prompts[1].json()
    again = client.chat.completions.create(model=MODEL, messages=back, tools=[TICKET], max_tokens=4)
    assert again.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("change, param", [
    ({"tools": [{"type": "custom"}]}, "tools[0].custom"),
    ({"tools": [TICKET], "tool_choice": {"type": "custom", "custom": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [{"type": "custom", "custom": {"name": "t", "format": {"type": "grammar", "grammar": {
        "syntax": "lark", "definition": "start: ("}}}}],
      "tool_choice": {"type": "custom", "custom": {"name": "t"}}}, "tools"),
])
def test_bad_chat_custom_tools_are_400s_naming_the_field(base_url, change, param):
    r = post(base_url, "/v1/chat/completions", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, **change)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


# --- hosted tools: offered, left out; forced, refused ---


def test_hosted_tools_offered_are_left_out_of_the_prompt_and_named(base_url):
    hosted = [WEB_SEARCH, {"type": "file_search", "vector_store_ids": ["vs_1"]}, {"type": "image_generation"},
              {"type": "code_interpreter", "container": {"type": "auto"}}, {"type": "mcp", "server_label": "x"},
              {"type": "computer_use_preview", "display_width": 1, "display_height": 1, "environment": "linux"},
              {"type": "tool_search"}]
    r = post(base_url, tools=hosted, max_output_tokens=4, stream=True)
    assert r.status_code == 200 and r.headers["x-gguf-tools-ignored"] == (
        "web_search,file_search,image_generation,code_interpreter,mcp,computer_use_preview,tool_search")
    assert sse_events(r)[-1]["response"]["tools"][0] == {"type": "web_search"}  # echoed as decoded
    assert input_tokens(base_url, input="Hi", tools=hosted) == input_tokens(base_url, input="Hi")
    counted = httpx.post(f"{base_url}/v1/responses/input_tokens", json={"model": MODEL, "input": "Hi", "tools": hosted})
    assert counted.headers["x-gguf-tools-ignored"] == r.headers["x-gguf-tools-ignored"]
    assert "x-gguf-tools-ignored" not in post(base_url, max_output_tokens=4).headers


@pytest.mark.parametrize("tools, choice", [
    ([WEB_SEARCH], {"type": "web_search_preview"}),
    ([WEB_SEARCH, {"type": "file_search"}], "required"),
    ([{"type": "mcp", "server_label": "x"}], {"type": "mcp", "server_label": "x"}),
])
def test_a_hosted_tool_forced_is_a_400_naming_it(base_url, tools, choice):
    r = post(base_url, tools=tools, tool_choice=choice)
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice"
    assert r.json()["error"]["code"] == "unsupported_tool" and "a hosted tool this server can't run" in r.text


def test_chat_web_search_options_are_left_out_and_named(base_url, server):
    r = post(base_url, "/v1/chat/completions", messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
             web_search_options={"search_context_size": "low"})
    assert r.status_code == 200 and r.headers["x-gguf-tools-ignored"] == "web_search"


# --- /v1/messages: server tools left out, Anthropic's client tools run ---


def test_messages_server_tools_are_left_out_and_its_client_tools_run(base_url, server):
    claude = anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0, timeout=120)
    tools = [{"type": "web_search_20250305", "name": "web_search", "max_uses": 3},
             {"type": "code_execution_20250825", "name": "code_execution"}, {"type": "bash_20250124", "name": "bash"}]
    r = post(base_url, "/v1/messages", max_tokens=48, messages=[{"role": "user", "content": "List the files."}],
             tools=tools, tool_choice={"type": "tool", "name": "bash"}, temperature=0)
    assert r.status_code == 200, r.text
    assert r.headers["x-gguf-tools-ignored"] == "web_search_20250305,code_execution_20250825"
    [block] = r.json()["content"]
    assert block["type"] == "tool_use" and block["name"] == "bash" and isinstance(block["input"].get("command", ""), str)
    assert r.json()["stop_reason"] == "tool_use"
    message = claude.messages.create(
        model=MODEL, max_tokens=48, extra_body={"temperature": 0},
        messages=[{"role": "user", "content": "Open README.md."}],
        tools=[{"type": "text_editor_20250728", "name": "str_replace_based_edit_tool"}],
        tool_choice={"type": "tool", "name": "str_replace_based_edit_tool"})
    [use] = message.content
    assert use.type == "tool_use" and use.name == "str_replace_based_edit_tool"
    assert use.input["command"] in ("view", "create", "str_replace", "insert", "undo_edit")
    counted = post(base_url, "/v1/messages/count_tokens", messages=[{"role": "user", "content": "Hi"}], tools=tools)
    assert counted.status_code == 200 and counted.headers["x-gguf-tools-ignored"] == r.headers["x-gguf-tools-ignored"]
    forced = post(base_url, "/v1/messages", max_tokens=8, messages=[{"role": "user", "content": "Hi"}], tools=tools,
                  tool_choice={"type": "tool", "name": "web_search"})
    assert forced.status_code == 400 and "web_search_20250305" in forced.json()["error"]["message"]
