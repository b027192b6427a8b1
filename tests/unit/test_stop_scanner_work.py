"""The stop-string scanner's work a token is bounded whatever the stop strings' length (issue
#25: scanning the held text again at each token was O(L²) for a stop string of L characters,
and the decode thread of every stream on the instance waited), and long stop strings are still
found across any chunking."""

import random

from gguf_serve import engine
from gguf_serve.protocol import MAX_STOP_CHARS


class CountedStop(str):
    """A stop string that counts how often the scanner looks at it."""

    looks = 0

    def __getitem__(self, index):
        CountedStop.looks += 1
        return super().__getitem__(index)


def test_each_character_is_looked_at_a_bounded_number_of_times():
    # The worst case for a rescan: every new character extends a partial match of a stop
    # string that never completes, so the held text grows to its length.
    stops = [CountedStop("a" * (MAX_STOP_CHARS - 1) + "b"), CountedStop("a" * (MAX_STOP_CHARS - 2) + "ab")]
    scanner, fed, sent = engine.StopScanner(stops), 0, ""
    CountedStop.looks = 0  # what building the matchers cost is not per token
    for chunk in ["a"] * (3 * MAX_STOP_CHARS) + ["c"]:
        text, stopped = scanner.feed(chunk)
        fed, sent = fed + len(chunk), sent + text
        assert not stopped
    assert sent == "a" * (3 * MAX_STOP_CHARS) + "c"  # held back while it could begin a stop, then sent
    assert CountedStop.looks <= 3 * fed * len(stops)  # the rescan looked about MAX_STOP_CHARS² / 2 times


def test_long_stop_strings_are_found_across_any_chunking():
    rng = random.Random(25)
    stop = "".join(rng.choice("ab") for _ in range(MAX_STOP_CHARS))
    for _ in range(50):
        before = "".join(rng.choice("ab") for _ in range(rng.randrange(2 * MAX_STOP_CHARS)))
        text = before + stop + "tail"
        expected = text[: text.find(stop)]
        scanner, out, cut = engine.StopScanner(["b" * 40, stop]), "", 0
        while cut < len(text):
            step = rng.randrange(1, 8)
            sent, stopped = scanner.feed(text[cut: cut + step])
            out, cut = out + sent, cut + step
            assert expected.startswith(out)
            if stopped:
                break
        hit = min(i for i in (text.find(s) for s in ("b" * 40, stop)) if i >= 0)
        assert stopped and out == text[:hit]
