"""The same generation through /v1/messages (Anthropic's API) and /v1/chat/completions,
streamed and not, measured as `python -m bench responses` measures /v1/responses (see there);
written to bench/results/messages.json.

    python -m bench messages --rounds 9 --max-tokens 256
"""

from __future__ import annotations

from bench import responses


def main(argv: list[str]) -> None:
    responses.main(argv, api="messages")
