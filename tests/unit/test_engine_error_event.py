"""An engine error's event carries its message and no generated text (issue #25: text held back
as a possible stop string's start, or a non-streamed answer's merged text, was appended to
"engine error: ...")."""

from gguf_serve import engine
from gguf_serve.events import Event


def slot_with_held_text(stream: bool) -> tuple[engine.Slot, list]:
    events = []
    slot = engine.Slot(0, events)
    slot.gen = engine.Generation([1], 8, engine.Sampling(), emit=None, stop=["\n\n"], stream=stream)
    slot.scanner, slot.splitter, slot.chain, slot.later = engine.StopScanner(["\n\n"]), None, None, {}
    slot.n_reasoning = slot.reused = 0
    slot.held = None if stream else Event("The secret is 42.")  # a non-streamed answer's text so far
    assert slot.scanner.feed("Hello\n") == ("Hello", False)  # "\n" held: it may begin "\n\n"
    return slot, events


def test_an_error_event_carries_no_generated_text():
    for stream in (True, False):
        slot, events = slot_with_held_text(stream)
        slot.finish("error", "engine error: llama_decode returned 1")
        [(_, event)] = events
        assert event.finish_reason == "error"
        assert event.text == "engine error: llama_decode returned 1" and not event.reasoning and not event.logprobs


def test_a_normal_end_still_sends_the_held_text():
    slot, events = slot_with_held_text(stream=False)
    slot.finish("length")
    [(_, event)] = events
    assert event.text == "The secret is 42.\n"
