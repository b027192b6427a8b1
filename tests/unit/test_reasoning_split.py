"""Thinking output split into reasoning and answer, at every split point of the stream."""

import pytest

from gguf_serve import reasoning

RECORDED = [
    # Qwen3: the model opens the block itself
    ("<think>\nThe user asks for the capital.\n</think>\n\nParis.", False, "The user asks for the capital.", "Paris."),
    # an R1 distill: the generation prompt opened it
    ("Okay, 2 + 2 is 4.\n</think>\n\n**4**", True, "Okay, 2 + 2 is 4.", "**4**"),
    # thinking switched off: Qwen3 answers after an empty block the prompt closed
    ("The answer is 4.", False, None, "The answer is 4."),
    # a tool call after thinking
    ('<think>\nI need the weather.\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
     False, "I need the weather.", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'),
    # cut off while thinking (max_tokens)
    ("Hmm, let me think about", True, "Hmm, let me think about", ""),
    # a think tag later in an answer is text
    ("Use <think> tags.", False, None, "Use <think> tags."),
]


@pytest.mark.parametrize("text,inside,thought,answer", RECORDED)
def test_split_whole(text, inside, thought, answer):
    assert reasoning.split(text, inside) == (thought, answer)


@pytest.mark.parametrize("text,inside,thought,answer", RECORDED)
def test_split_streamed_at_every_point(text, inside, thought, answer):
    for i in range(len(text) + 1):
        for j in range(i, len(text) + 1):
            splitter = reasoning.ThinkSplitter(inside)
            pieces = [splitter.feed(text[:i]), splitter.feed(text[i:j]), splitter.feed(text[j:]), splitter.flush()]
            assert "".join(p[0] for p in pieces) == (thought or "") and "".join(p[1] for p in pieces) == answer, (i, j)


def test_detection_and_kwargs():
    assert reasoning.thinks("{% if '</think>' in content %}") and not reasoning.thinks("<|im_start|>") and not reasoning.thinks(None)
    assert reasoning.opens_thinking("<｜Assistant｜><think>\n") and not reasoning.opens_thinking("<think>\n\n</think>\n\n")
    assert reasoning.template_kwargs(None, None) == {"enable_thinking": True}
    assert reasoning.template_kwargs(None, "minimal") == {"enable_thinking": False}
    assert reasoning.template_kwargs({"enable_thinking": False, "x": 1}, "high") == {"enable_thinking": False, "x": 1}
