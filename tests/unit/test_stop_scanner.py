"""The stop-string scanner against a plain reference, for any text cut into any chunks."""

from hypothesis import given, settings
from hypothesis import strategies as st

from gguf_serve import engine

ALPHABET = "ab\n<>|"  # few letters, so that stop strings and near misses are frequent


def reference(chunks: list[str], stops: list[str]) -> tuple[str, bool]:
    """The text up to the first stop string, and whether there was one. Generation ends with
    the first chunk (token) that completes a stop string: a longer one that began earlier but
    would end in a later chunk never comes (chunks "\n", "|" with stops "|" and "\n||": "\n")."""
    text = ""
    for chunk in chunks:
        text += chunk
        hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
        if hits:
            return text[: min(hits)], True
    return text, False


def scan(chunks: list[str], stops: list[str]) -> tuple[str, bool]:
    scanner, out = engine.StopScanner(stops), ""
    for chunk in chunks:
        text, stopped = scanner.feed(chunk)
        out += text
        if stopped:
            return out, True
    return out + scanner.flush(), False


@settings(max_examples=500, deadline=None)
@given(st.lists(st.text(ALPHABET, max_size=6), max_size=12), st.lists(st.text(ALPHABET, min_size=1, max_size=4), max_size=4))
def test_scanner_matches_the_reference(chunks, stops):
    assert scan(chunks, stops) == reference(chunks, stops)


@given(st.lists(st.text(ALPHABET, max_size=6), max_size=12), st.lists(st.text(ALPHABET, min_size=2, max_size=4), max_size=4))
def test_no_fragment_of_a_stop_string_is_emitted_early(chunks, stops):
    """What has been emitted at any point is a prefix of the reference answer."""
    scanner, out = engine.StopScanner(stops), ""
    expected, _ = reference(chunks, stops)
    for chunk in chunks:
        text, stopped = scanner.feed(chunk)
        out += text
        assert expected.startswith(out)
        if stopped:
            break


def test_held_back_text_is_sent_when_the_model_ends_its_turn():
    """A trailing "\\n" held as a possible start of "\\n\\n" is text, not a stop, when the model
    then ends with its end-of-generation token."""
    events = []
    slot = engine.Slot(0, events)
    slot.gen = engine.Generation([1], 8, engine.Sampling(), emit=None, stop=["\n\n"])
    slot.scanner, slot.splitter, slot.chain, slot.later = engine.StopScanner(["\n\n"]), None, None, {}
    slot.n_reasoning = slot.reused = 0
    sent, stopped = slot.scanner.feed("Hello\n")
    assert (sent, stopped) == ("Hello", False)
    slot.finish("stop")
    [(_, event)] = events
    assert event.text == "\n" and event.finish_reason == "stop"
