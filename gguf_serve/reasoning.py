"""Thinking models (Qwen3, QwQ, DeepSeek-R1 and its distills): which models think, and their
output split into the reasoning between `<think>` and `</think>` and the answer after it.
"""

from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"
FORMATS = ("deepseek", "both", "none")  # REASONING_FORMAT: reasoning_content; and `reasoning`; left in the text
EFFORT_OFF = ("none", "minimal")  # reasoning_effort values that switch thinking off where the template can


def thinks(template: str | None) -> bool:
    """A chat template that handles think tags is a thinking model's."""
    return bool(template) and CLOSE in template


def opens_thinking(prompt: str) -> bool:
    """The generation prompt leaves a think block open (R1 distills): the model starts inside it."""
    return prompt.rfind(OPEN) > prompt.rfind(CLOSE)


def template_kwargs(requested: dict | None, effort: str | None) -> dict:
    """What a request passes to the template: thinking on unless asked off (as llama.cpp's server
    passes it; Qwen3 thinks unless told not to, the R1 distill template only when told to)."""
    kwargs = {"enable_thinking": effort not in EFFORT_OFF}
    return {**kwargs, **(requested or {})}


class ThinkSplitter:
    """Splits streamed text into (reasoning, content) pieces. Tags split across pieces are held
    until whole; white space around the reasoning and before the answer is dropped (held until
    it is known not to be trailing)."""

    def __init__(self, inside: bool):
        self.state = "reasoning" if inside else "start"  # start: a <think> may still open
        self.began = False  # the reasoning's first non-space character has been seen
        self.pending = ""

    def feed(self, text: str) -> tuple[str, str]:
        self.pending += text
        reasoning = content = ""
        while self.pending:
            if self.state == "start":
                head = self.pending.lstrip()
                if head.startswith(OPEN):
                    self.pending, self.state = head[len(OPEN):], "reasoning"
                    continue
                if not head or OPEN.startswith(head):
                    break  # blank, or a prefix of <think>: undecided
                self.state = "content"
            elif self.state == "reasoning":
                if not self.began:
                    self.pending = self.pending.lstrip()
                    self.began = bool(self.pending)
                    continue
                end = self.pending.find(CLOSE)
                if end >= 0:
                    reasoning += self.pending[:end].rstrip()
                    self.pending, self.state = self.pending[end + len(CLOSE):], "after"
                    continue
                body = self.pending[: len(self.pending) - partial_tail(self.pending, CLOSE)].rstrip()
                keep = len(self.pending) - len(body)
                reasoning += self.pending[: len(self.pending) - keep]
                self.pending = self.pending[len(self.pending) - keep:]
                break
            elif self.state == "after":
                self.pending = self.pending.lstrip()
                if self.pending:
                    self.state = "content"
            else:
                content, self.pending = content + self.pending, ""
        return reasoning, content

    def flush(self) -> tuple[str, str]:
        """What is held at the end: reasoning if still inside the block, else content."""
        rest, self.pending = self.pending, ""
        if self.state == "reasoning":
            return rest.rstrip(), ""
        return "", rest.lstrip() if self.state in ("after", "start") else rest

    @property
    def thought(self) -> bool:
        return self.state in ("reasoning", "after") or (self.state == "content" and self.began)


def partial_tail(text: str, tag: str) -> int:
    """The length of the longest end of `text` that begins `tag` (and might be its start)."""
    return next((k for k in range(len(tag) - 1, 0, -1) if text.endswith(tag[:k])), 0)


def split(text: str, inside: bool) -> tuple[str | None, str]:
    """A whole answer -> (its reasoning, or None if it did not think; its content)."""
    splitter = ThinkSplitter(inside)
    reasoning, content = splitter.feed(text)
    more_reasoning, more_content = splitter.flush()
    return (reasoning + more_reasoning if splitter.thought or inside else None), content + more_content
