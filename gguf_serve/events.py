"""What the decode thread tells a request: an Event after each of its steps (new text, at the
end why it ended), with each token's logprobs when asked for. Plain data, imported by the engine
and by everything that reads it."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]  # the most likely tokens at this step, most likely first


@dataclass
class Event:
    """What the engine tells a request after each of its tokens: new text and, at the end, why."""

    text: str
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error" | "grammar" (engine.FAILED)
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV was reused rather than computed
    logprobs: list[TokenLogprob] = field(default_factory=list)
    reasoning: str = ""  # a thinking model's reasoning, apart from `text` (its answer)
    reasoning_tokens: int = 0
    # The stop string that ended it (a "stop" that an end-of-generation token ended has none):
    # what tells Anthropic's stop_reason "stop_sequence" from "end_turn".
    stop_string: str | None = None
    # A "length" that the context's end forced, not max_tokens (nor the time limit): what tells
    # Anthropic's stop_reason "model_context_window_exceeded" from "max_tokens".
    context_full: bool = False
