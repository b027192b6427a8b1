"""Hub references and the file a reference picks from a repo's files (gguf_serve.hub): pure logic, no Hub."""

import pytest

from gguf_serve.hub import HubError, HubRef, parse, pick


def test_references_parse_into_repo_quant_file_and_revision():
    assert parse("hf:org/repo") == HubRef("org/repo")
    assert parse("hf:org/repo:Q4_K_M") == HubRef("org/repo", quant="Q4_K_M")
    assert parse("hf:org/repo/dir/model.gguf@v1.0") == HubRef("org/repo", file="dir/model.gguf", revision="v1.0")
    assert parse("hf:org/repo:q8_0@0123abc") == HubRef("org/repo", quant="q8_0", revision="0123abc")
    assert str(parse("hf:org/repo:Q4_K_M@v2")) == "hf:org/repo:Q4_K_M@v2"


@pytest.mark.parametrize("text", ["hf:repo", "hf:org/", "hf:/repo", "hf:org/repo/model.bin", "hf:org/repo:Q4 K",
                                  "hf:org/repo@", "hf:org/re po"])
def test_a_malformed_reference_is_one_line_saying_how_to_write_one(text):
    with pytest.raises(HubError, match="is not a Hub model: write hf:org/repo"):
        parse(text)


FILES = ["README.md", "m-IQ4_XS.gguf", "m-Q8_0.gguf", "m-q4_k_m.gguf", "mmproj-m-Q4_K_M.gguf", "m-Q4_K_M_L.gguf",
         "big/m-Q4_0-00001-of-00003.gguf", "big/m-Q4_0-00002-of-00003.gguf", "big/m-Q4_0-00003-of-00003.gguf"]


def test_no_quant_picks_q4_k_m_then_q8_0_then_the_first_gguf_as_llama_server_does():
    assert pick(FILES, HubRef("o/r")) == ["m-q4_k_m.gguf"]  # any case, not the mmproj, not Q4_K_M_L
    assert pick([f for f in FILES if "k_m" not in f.lower()], HubRef("o/r")) == ["m-Q8_0.gguf"]
    assert pick(["b-F16.gguf", "a-Q5_K_S.gguf"], HubRef("o/r")) == ["a-Q5_K_S.gguf"]


def test_a_quant_is_matched_as_a_word_and_a_split_file_brings_all_its_shards():
    assert pick(FILES, HubRef("o/r", quant="IQ4_XS")) == ["m-IQ4_XS.gguf"]
    assert pick(FILES, HubRef("o/r", quant="Q4_0")) == [f"big/m-Q4_0-0000{n}-of-00003.gguf" for n in (1, 2, 3)]
    assert pick(FILES, HubRef("o/r", file="m-Q8_0.gguf")) == ["m-Q8_0.gguf"]


def test_nothing_to_pick_names_what_the_repo_has():
    with pytest.raises(HubError, match=r"has no GGUF file of quant Q5_K_M \(it has: big/m-Q4_0-00001-of-00003.gguf, "):
        pick(FILES, HubRef("o/r", quant="Q5_K_M"))
    with pytest.raises(HubError, match=r"has no file x.gguf"):
        pick(FILES, HubRef("o/r", file="x.gguf"))
    with pytest.raises(HubError, match=r"has no GGUF file \(it has: no GGUF file\)"):
        pick(["README.md"], HubRef("o/r"))
