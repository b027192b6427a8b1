"""The engine's token log-probabilities in OpenAI's two shapes: chat's and text completions'."""

from __future__ import annotations

import msgspec

from .events import TokenLogprob
from .model import Model
from .protocol import ChatLogprobs, TextLogprobs, TokenInfo, TopLogprob


def token_text(model: Model, token: int) -> tuple[str, list[int]]:
    piece = model.piece(token)
    return piece.decode(errors="replace"), list(piece)


def chat_logprobs(model: Model, entries: list[TokenLogprob]) -> ChatLogprobs:
    def info(token, logprob):
        text, raw = token_text(model, token)
        return TopLogprob(token=text, logprob=logprob, bytes=raw)

    return ChatLogprobs(content=[
        TokenInfo(**msgspec.structs.asdict(info(e.token, e.logprob)), top_logprobs=[info(t, lp) for t, lp in e.top])
        for e in entries
    ])


def text_logprobs(model: Model, entries: list[TokenLogprob], offset: int) -> TextLogprobs:
    tokens, offsets = [], []
    for e in entries:
        offsets.append(offset)
        tokens.append(token_text(model, e.token)[0])
        offset += len(tokens[-1])
    return TextLogprobs(
        tokens=tokens,
        token_logprobs=[e.logprob for e in entries],
        top_logprobs=[{token_text(model, t)[0]: lp for t, lp in e.top} for e in entries],
        text_offset=offsets,
    )
