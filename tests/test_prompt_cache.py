"""The KV cache's host-memory tier (prompt_cache.py, issue #36): a conversation whose sequence was
taken by another gets its history restored, not computed again; greedy output is the same as
when its sequence kept it; the tier stays within its bound. Then its tier on disk
(prompt_cache_disk.py): written at SIGTERM, read by the next start of the same model and
settings only. The real SmolLM2, in process, then over HTTP."""

import asyncio
import functools
import json
import os

import httpx

from conftest import MODEL, Server, smollm2_path, with_template
from gguf_serve import engine, prompt_cache, prompt_cache_disk
from gguf_serve.engine import _common_prefix
from gguf_serve.model import PROMPT_CHUNK, Model

HISTORY = "We talk about rivers. " * 40  # about 200 tokens: a conversation's history
OTHER = "A different talk, about mountains and their weather. " * 20


def run_engine(model: Model, parallel: int, prompts: list[list[int]], cache_bytes: int | None) -> list[engine.Event]:
    """Each prompt generated greedily (16 tokens) in turn on a fresh engine: its last events."""
    greedy = engine.Sampling(temperature=0)

    async def run():
        loop = asyncio.get_running_loop()
        eng = engine.Engine(model, parallel, loop, prompt_cache_bytes=cache_bytes)
        ends = []
        for prompt in prompts:
            done = loop.create_future()
            text = []

            def emit(event, text=text, done=done):
                text.append(event.text)
                if event.finish_reason:
                    event.text = "".join(text)
                    done.set_result(event)

            eng.submit(engine.Generation(prompt, 16, greedy, emit))
            ends.append(await asyncio.wait_for(done, 300))
        eng.close()
        return ends, eng.cache

    return asyncio.run(run())


def test_a_history_restored_generates_what_it_would_have_in_its_own_sequence():
    model = Model(smollm2_path(), n_ctx=1024, n_threads=2, parallel=2)
    first, other = model.tokenize_prompt(HISTORY), model.tokenize_prompt(OTHER)
    # the second turn: the first turn's prompt, then more (as a conversation's next request)
    second = first + model.tokenize(" And the sea?")
    # one sequence: the other conversation takes it, and the first's history goes to the tier
    ends, cache = run_engine(model, 1, [first, other, second], None)
    assert cache.saves >= 1 and cache.hits == 1 and cache.restored_tokens == len(first)
    assert ends[2].cached_tokens == len(first)
    # two sequences: the history stays in its own; the same greedy tokens follow
    kept, _ = run_engine(model, 2, [first, other, second], 0)
    assert kept[2].cached_tokens == len(first)
    assert ends[2].text == kept[2].text


def test_restoring_the_least_recently_used_entry_into_a_full_tier():
    """Three conversations on one sequence, a tier with room for two of their histories, then the
    first's next turn: its entry, the least recently used, is the one to restore, and saving the
    sequence's history first (to make room) dropped it, a KeyError that killed the decode thread
    (found behind the fleet, tests/test_affinity.py). Now that save drops another entry."""
    model = Model(smollm2_path(), n_ctx=1024, n_threads=2, parallel=1)
    a, b, c = (model.tokenize_prompt(f"Conversation {name}: " + HISTORY) for name in "ABC")
    bound = 2 * (len(a) + 16) * 23_100 + 100_000  # two histories and their 16 tokens, not three
    ends, cache = run_engine(model, 1, [a, b, c, a + model.tokenize(" And the sea?")], bound)
    assert all(e.finish_reason == "length" for e in ends)
    assert cache.hits == 1 and ends[3].cached_tokens >= len(a) and cache.bytes <= bound


def test_the_tier_stays_within_its_bound_and_cuts_the_least_recently_used_first():
    """Room is made a block from each entry in turn, from the least recently used: each history
    loses its end, the older ones at least as much as the newer."""
    model = Model(smollm2_path(), n_ctx=1024, n_threads=2, parallel=1)
    prompts = [model.tokenize_prompt(f"Conversation number {i}. " + HISTORY) for i in range(6)]
    bound = 3 * 230 * 23_100  # about three of these histories' states (23 KB a token at f16)
    ends, cache = run_engine(model, 1, prompts, bound)
    assert cache.max_bytes == bound and 0 < cache.bytes <= bound
    assert cache.saves == 5 and cache.evictions >= 2
    held = [len(entry.tokens) for entry in cache.entries.values()]  # least recently used first
    assert held == sorted(held) and held[0] < held[-1] and all(n % prompt_cache.BLOCK == 0 for n in held[:-1])
    assert all(e.finish_reason == "length" for e in ends)


def test_conversations_behind_one_system_prompt_share_its_blocks_and_each_comes_back():
    """Four conversations behind one system prompt, one sequence, then each one's next turn in the
    same order (bench multiturn's traffic in small): a tier with room for 2.5 of their states
    whole holds all four, the system prompt's blocks once, and each next turn restores its whole
    history. Kept whole, least recently used out first took each one just before its turn."""
    model = Model(smollm2_path(), n_ctx=1024, n_threads=2, parallel=2)
    system = "You are a careful assistant for a public library. " * 25
    firsts = [model.tokenize_prompt(system + f"Question {i}: " + "tell me about rivers, lakes and the sea. " * 12)
              for i in range(4)]
    seconds = [first + model.tokenize(" And the mountains?") for first in firsts]
    whole = (len(firsts[0]) + 16) * 23_100  # one state: 23 KB a token at f16
    ends, cache = run_engine(model, 1, firsts + seconds, int(2.5 * whole))
    assert cache.hits == 4 and [e.cached_tokens for e in ends[4:]] == [len(first) for first in firsts]
    assert cache.bytes <= 2.5 * whole and cache.evictions == 0
    # the same tokens follow as where the conversation kept its sequence
    kept, _ = run_engine(model, 1, [firsts[3], seconds[3]], 0)
    assert kept[1].cached_tokens == len(firsts[3]) and ends[7].text == kept[1].text


def test_an_entry_restored_into_a_sequence_whose_own_save_needs_its_room():
    """The sequence a saved history is restored into is saved first; when the bound holds only one
    of the two, that save needs the entry's room. The entry is taken out first, so it is restored
    and the sequence's history takes its place (the save had evicted it: a KeyError killed the
    decode thread, every request failed and the process exited)."""
    model = Model(smollm2_path(), n_ctx=1024, n_threads=2, parallel=1)
    first, other = model.tokenize_prompt(HISTORY), model.tokenize_prompt(OTHER)
    second = first + model.tokenize(" And the sea?")
    bound = 300 * 23_100  # one of these states (about 200-230 tokens of 23 KB), not two
    ends, cache = run_engine(model, 1, [first, other, second, first], bound)
    assert [e.finish_reason for e in ends] == ["length"] * 4
    assert cache.hits >= 1 and ends[2].cached_tokens == len(first) and 0 < cache.bytes <= bound


def test_a_prompt_whose_client_left_while_it_was_computed_is_not_computed_again_when_resent():
    """Claude Code's retry: its watchdog drops a stream whose 20k-token prompt is still being
    computed and sends the same request again. What was computed before the client left (whole
    chunks) is reused, on one sequence and on four, where the retry may find a free sequence that
    holds nothing."""
    for parallel in (1, 4):
        model = Model(smollm2_path(), n_ctx=4096, n_threads=2, parallel=parallel)
        # 7 chunks: once the client leaves after 2, 5 are still to compute, so that the poll below
        # (every millisecond) finds the prompt unfinished on a host many times faster than this one
        prompt = model.tokenize_prompt("A long story about rivers and the sea, told slowly. " * 300)
        greedy = engine.Sampling(temperature=0)

        async def run():
            loop = asyncio.get_running_loop()
            eng = engine.Engine(model, parallel, loop, prompt_cache_bytes=None)
            ends = []
            for leave in (True, False):
                done = loop.create_future()
                gen = engine.Generation(prompt, 4, greedy,
                                        lambda event, done=done: event.finish_reason and done.set_result(event))
                eng.submit(gen)
                if leave:  # the client leaves once two chunks are computed (polled: no timing)
                    while max(len(slot.cached) for slot in eng.slots) < 2 * PROMPT_CHUNK:
                        await asyncio.sleep(0.001)
                    gen.cancelled = True
                ends.append(await asyncio.wait_for(done, 300))
            eng.close()
            return ends

        left, again = asyncio.run(run())
        assert left.finish_reason == "cancelled" and len(prompt) > 6 * PROMPT_CHUNK
        assert again.finish_reason == "length" and again.cached_tokens >= 2 * PROMPT_CHUNK, parallel


def test_over_http_a_second_turn_reports_its_restored_prefix_and_the_metrics_count_it():
    server = Server({"N_THREADS": "2", "PARALLEL": "1"}).wait_ready()
    try:
        def chat(messages):
            body = {"model": MODEL, "messages": messages, "max_tokens": 8, "temperature": 0}
            return httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=300).json()

        turn = [{"role": "system", "content": HISTORY}, {"role": "user", "content": "Which river is longest?"}]
        answer = chat(turn)["choices"][0]["message"]
        chat([{"role": "user", "content": OTHER}])  # takes the one sequence
        again = chat([*turn, answer, {"role": "user", "content": "And the widest?"}])
        cached, prompt = again["usage"]["prompt_tokens_details"]["cached_tokens"], again["usage"]["prompt_tokens"]
        assert cached >= 0.9 * prompt, (cached, prompt)
        assert server.metric("gguf_prompt_cache_hits_total") == 1
        assert server.metric("gguf_prompt_cache_restored_tokens_total") == cached
        assert 0 < server.metric("gguf_prompt_cache_bytes") <= server.metric("gguf_prompt_cache_max_bytes")
    finally:
        server.stop()


# A long system prompt (about 300 tokens), as an agent's or an app's: what a restarted instance's
# first request should not compute again.
SYSTEM = " ".join(f"Rule {i}: answer about rivers, lakes and the sea in plain words, and name every river." for i in range(16))


@functools.cache
def vocabulary() -> Model:
    return Model(smollm2_path(), vocab_only=True)


def test_what_computed_the_states_tells_a_model_file_with_the_same_size_time_and_name_apart(tmp_path):
    """A copy of SmolLM2 whose chat template differs by one character: the same size and
    modification time, and its weights the same. Its metadata tells it apart; so does any
    setting that shapes a state (N_CTX, the KV cache's types, flash attention)."""
    model, path = vocabulary(), smollm2_path()
    template = model.metadata["tokenizer.chat_template"]
    copy = with_template(tmp_path, path.stem, template.replace("Hugging Face", "Hugging-Face"))
    os.utime(copy, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns))
    assert copy.stat().st_size == path.stat().st_size and copy.name == path.name

    def computed_by(model, path, n_ctx=2048, kv_cache=("f16", "f16"), flash_attn="auto"):
        return prompt_cache_disk.computed_by(model, path, n_ctx, kv_cache, flash_attn)

    ours = computed_by(model, path)
    assert computed_by(vocabulary(), path) == ours  # the same file and settings, another load
    assert computed_by(Model(copy, vocab_only=True), copy) != ours
    assert len({ours, computed_by(model, path, n_ctx=4096), computed_by(model, path, kv_cache=("q8_0", "f16")),
                computed_by(model, path, flash_attn="off")}) == 4


def written(server: Server) -> dict:
    [line] = [json.loads(line) for line in server.output().splitlines() if '"prompt_cache_written"' in line]
    return line


def test_a_restart_restores_what_the_stopped_server_held_and_answers_as_a_cold_run(tmp_path):
    """Stopped (SIGTERM), a server writes what its sequence held to PROMPT_CACHE_DIR; the next
    start reads it, and its first request restores the long system prompt (cached_tokens) and
    answers greedily what a server that computed it all answered. A model file that differs only
    in its metadata, the same size and time, never loads it. FLASH_ATTN=off: a prompt longer than
    a chunk, reused, is otherwise computed in other pieces than whole (docs/architecture.md)."""
    directory = tmp_path / "cache"
    env = {"N_THREADS": "2", "PARALLEL": "1", "N_CTX": "2048", "FLASH_ATTN": "off", "PROMPT_CACHE_DIR": str(directory)}
    first, second = "Which river is longest?", "Which lake is deepest?"

    def chat(server, question, model=MODEL):
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
        body = {"model": model, "messages": messages, "max_tokens": 16, "temperature": 0}
        answer = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=300).json()
        prompt = httpx.post(f"{server.url}/apply-template", json=body, timeout=60).json()["prompt"]
        return answer["choices"][0]["message"]["content"], answer["usage"]["prompt_tokens_details"]["cached_tokens"], prompt

    server = Server(env).wait_ready()
    try:
        cold, _, prompt = chat(server, second)  # computed whole: the sequence held only the warm-up's
        _, _, first_prompt = chat(server, first)  # the sequence holds this one's prompt and answer now
    finally:
        server.stop()
    assert server.proc.returncode == 0
    assert written(server)["entries"] == 1 and not written(server)["deadline_reached"]

    server = Server(env).wait_ready()
    try:
        assert server.metric("gguf_prompt_cache_loaded_total") == server.metric("gguf_prompt_cache_entries") == 1
        bound = server.metric("gguf_prompt_cache_max_bytes")
        assert 0 < server.metric("gguf_prompt_cache_bytes") <= bound
        assert (directory / "prompt-cache").stat().st_size <= bound
        text, cached, _ = chat(server, second)
        assert server.metric("gguf_prompt_cache_hits_total") == 1
    finally:
        server.stop()
    tokens = vocabulary().tokenize_prompt
    assert cached == _common_prefix(tokens(first_prompt), tokens(prompt)) > 250  # the system prompt, restored
    assert text == cold
    assert sorted(p.name for p in directory.iterdir()) == ["prompt-cache"]

    model = vocabulary()
    copy = with_template(tmp_path, "other", model.metadata["tokenizer.chat_template"].replace("Hugging Face", "Hugging-Face"))
    os.utime(copy, ns=(smollm2_path().stat().st_atime_ns, smollm2_path().stat().st_mtime_ns))
    server = Server({**env, "MODEL": str(copy)}).wait_ready()
    try:
        assert server.metric("gguf_prompt_cache_loaded_total") == server.metric("gguf_prompt_cache_entries") == 0
        _, cached, _ = chat(server, second, model="other")
        assert cached == 0
    finally:
        server.stop()
    [ignored] = [json.loads(line) for line in server.output().splitlines() if '"prompt_cache_ignored"' in line]
    assert "another model" in ignored["reason"]
