"""A forced tool call cut short by the token budget, answered as the call it began.

A forced call's text is a grammar's (tools.output_grammar): `{"name": ..., "arguments": ...}`.
When `max_tokens` ends it first, it does not parse, and tools.answer would give it back as the
assistant's text: JSON that the client asked to be a call, in the place of its prose. The APIs
this server speaks answer it as the call, marked as cut: OpenAI's Chat Completions gives the
tool call with its arguments as far as written and `finish_reason: "length"`; the Responses
API's output item then has `status: "incomplete"` (the response `incomplete`, reason
`max_output_tokens`); Anthropic's docs: a response cut at `max_tokens` "contains an incomplete
tool use block", to be retried with a higher max_tokens (stop_reason `max_tokens`). A client
that checks the stop reason knows not to run it, and one that doesn't still sees a call, not
text it would show as the answer.

chat_steps answers it so (the call from its name, or the forced name when the budget cut it
before, its arguments as far as written, the finish reason "length"); `written` reads such cut
arguments as the object they began (a local shell call's command, a tool_use block's input).
"""

from __future__ import annotations

import msgspec

CLOSERS = {"{": "}", "[": "]"}
LITERAL = frozenset("0123456789+-.eEtruefalsn")  # the characters of numbers, true, false and null


def written(text: str):
    """The JSON value `text` (JSON cut anywhere) began, as far as it was written: its open
    containers closed, an open string value kept as written so far, a key or a literal cut
    midway left out. None when not even a value's start was written, or `text` is no JSON's start."""
    try:
        return msgspec.json.decode(text)  # the usual case: whole
    except msgspec.DecodeError:
        pass
    stack: list[str] = []  # the closers of the containers open
    in_string = escaped = key = False
    expect_key = False  # the next string in this object is a key
    safe, safe_stack = 0, []  # where the text last ended a value or opened a container, and what was open
    for i, char in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
                if not key:
                    safe, safe_stack = i + 1, list(stack)
        elif char == '"':
            in_string, key = True, expect_key
        elif char in CLOSERS:
            stack.append(CLOSERS[char])
            expect_key = char == "{"
            safe, safe_stack = i + 1, list(stack)
        elif char in "}]":
            if not stack:
                break
            stack.pop()
            safe, safe_stack = i + 1, list(stack)
        elif char == ",":
            expect_key = bool(stack) and stack[-1] == "}"
        elif char == ":":
            expect_key = False
        elif not char.isspace():
            if expect_key or char not in LITERAL:
                return None  # not JSON cut short, but some other text
            if i + 1 < len(text) and text[i + 1] in ",}] \t\r\n":
                safe, safe_stack = i + 1, list(stack)  # a literal's last character
    closers = "".join(reversed(stack))
    candidates = [text[:safe] + "".join(reversed(safe_stack))]
    if in_string and not key:  # a string value cut midway: kept, less a half-written escape (a surrogate pair's)
        candidates[:0] = [text[: len(text) - cut] + '"' + closers for cut in range(len("\\ud83d\\ude00") + 1)]
    elif text and not in_string and text[-1] not in '"{}[],:' and not text[-1].isspace():
        candidates.insert(0, text + closers)  # a literal at the very end: whole, or cut (then left out)
    for candidate in candidates:
        try:
            return msgspec.json.decode(candidate)  # which refuses half a surrogate pair, as a cut can leave
        except msgspec.DecodeError:
            continue
    return None
