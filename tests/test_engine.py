"""The decode thread on its own: the real SmolLM2 through llama-cpp-python, no HTTP."""

import asyncio

from gguf_serve import engine, grammar

from gguf_serve.model import Model
from conftest import smollm2_path


def test_sampled_tokens_reach_the_loop_before_a_prompt_chunk_is_computed():
    """A running stream never waits behind another request's prompt (seconds, for a long one
    on a CPU) for a token that was already sampled."""
    model = Model(smollm2_path(), n_ctx=1024, n_threads=2, parallel=2)
    never_ends = {t: float("-inf") for t in range(model.n_vocab) if model.is_end_of_generation(t)}
    greedy = engine.Sampling(temperature=0, logit_bias=never_ends)

    async def run() -> list[tuple[int, bool]]:
        loop = asyncio.get_running_loop()
        eng = engine.Engine(model, 2, loop)
        seen = []  # per prompt chunk: events not yet handed to the loop, and whether a stream was running
        decode = eng._decode

        def watched(chunks, logits):
            if not logits:
                seen.append((len(eng.outbox), any(s.gen and s.gen.generated for s in eng.slots)))
            decode(chunks, logits)

        eng._decode = watched
        first_token, done = asyncio.Event(), [loop.create_future() for _ in range(2)]

        def emitter(i):
            def emit(event):
                first_token.set()
                if event.finish_reason and not done[i].done():
                    done[i].set_result(event.finish_reason)
            return emit

        eng.submit(engine.Generation(model.tokenize_prompt("Tell me a story."), 48, greedy, emitter(0)))
        await first_token.wait()
        eng.submit(engine.Generation(model.tokenize_prompt("Once upon a time " * 40), 4, greedy, emitter(1)))
        assert await asyncio.wait_for(asyncio.gather(*done), 120) == ["length", "length"]
        eng.close()
        return seen

    seen = asyncio.run(run())
    assert any(running for _, running in seen), "the second prompt was never computed beside a running stream"
    assert all(pending == 0 for pending, _ in seen), seen


def test_a_dead_decode_thread_fails_what_is_in_flight_and_says_so():
    """Outside a step (here: admitting a generation) an exception ends the thread: every
    generation in flight gets an error event and the owner is told, never a silent hang."""
    model = Model(smollm2_path(), n_ctx=512, n_threads=2, parallel=2)

    async def run():
        loop = asyncio.get_running_loop()
        failed = loop.create_future()
        eng = engine.Engine(model, 2, loop, on_failure=failed.set_result)
        events: asyncio.Queue[engine.Event] = asyncio.Queue()

        def broken_admit():
            raise RuntimeError("the KV copy failed")

        eng._admit = broken_admit
        eng.submit(engine.Generation(model.tokenize_prompt("Hello"), 8, engine.Sampling(temperature=0), events.put_nowait))
        reason = await asyncio.wait_for(failed, 30)
        event = await asyncio.wait_for(events.get(), 5)
        assert event.finish_reason == "error" and "the KV copy failed" in event.text and "KV copy" in reason
        eng.thread.join(5)
        try:
            eng.submit(engine.Generation([1], 1, engine.Sampling(), events.put_nowait))
        except RuntimeError as e:
            return str(e)

    assert "stopped" in asyncio.run(run())


def test_a_quantized_kv_cache_generates_the_same_greedy_tokens_alone_and_batched():
    """KV_CACHE_TYPE=q8_0 (keys and values quantized, flash attention on): a quarter of f16's
    memory lost to rounding, but still one answer per prompt, whoever else is running."""
    model = Model(smollm2_path(), n_ctx=512, n_threads=2, parallel=4, kv_cache=("q8_0", "q8_0"))
    never_ends = {t: float("-inf") for t in range(model.n_vocab) if model.is_end_of_generation(t)}
    prompts = [model.tokenize_prompt(f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n")
               for q in ("Name three rivers.", "What is a lighthouse?", "Count to ten.", "Why is the sea salty?")]

    async def run(together: bool) -> list[str]:
        eng = engine.Engine(model, 4, asyncio.get_running_loop())
        texts = []
        for batch in ([prompts] if together else [[p] for p in prompts]):
            done = [asyncio.get_running_loop().create_future() for _ in batch]
            parts = [[] for _ in batch]

            def emitter(k):
                def emit(event):
                    parts[k].append(event.text)
                    if event.finish_reason and not done[k].done():
                        done[k].set_result("".join(parts[k]))
                return emit

            for k, prompt in enumerate(batch):
                eng.submit(engine.Generation(prompt, 24, engine.Sampling(temperature=0, logit_bias=never_ends), emitter(k),
                                             stream=k % 2 == 0))  # events one a token, or held to the end
            texts += await asyncio.wait_for(asyncio.gather(*done), 120)
        eng.close()
        return texts

    alone = asyncio.run(run(False))
    assert all(alone) and asyncio.run(run(True)) == alone


def test_a_grammar_over_its_budget_ends_its_own_generation_and_no_other(monkeypatch):
    """Each step's grammar work is bounded (grammar.LIMITS): a sequence whose mask runs out of it
    ends with finish reason "grammar" (the request's 400), while the sequence beside it, in the
    same batches, generates every one of its tokens. Here the budget is cut to one Earley item,
    which an ordinary schema's first mask already exceeds."""
    model = Model(smollm2_path(), n_ctx=512, n_threads=2, parallel=2)
    schema = grammar.json_schema_grammar({"type": "object", "properties": {"s": {"type": "string"}}, "required": ["s"]})
    never_ends = {t: float("-inf") for t in range(model.n_vocab) if model.is_end_of_generation(t)}
    monkeypatch.setitem(grammar.LIMITS, "step_max_items", 1)

    async def run() -> list[engine.Event]:
        loop = asyncio.get_running_loop()
        eng = engine.Engine(model, 2, loop)
        ends = [loop.create_future() for _ in range(2)]
        tokens = [0, 0]

        def emitter(i):
            def emit(event):
                tokens[i] += bool(event.text)
                if event.finish_reason:
                    ends[i].set_result(event)
            return emit

        prompt = model.tokenize_prompt("Answer in JSON.")
        eng.submit(engine.Generation(prompt, 32, engine.Sampling(temperature=0, logit_bias=never_ends), emitter(0)))
        eng.submit(engine.Generation(prompt, 32, engine.Sampling(temperature=0, grammar=schema), emitter(1)))
        neighbour, constrained = await asyncio.wait_for(asyncio.gather(*ends), 120)
        eng.close()
        return neighbour, constrained, tokens

    neighbour, constrained, tokens = asyncio.run(run())
    assert constrained.finish_reason == "grammar" and "Too many items" in constrained.text, constrained
    assert neighbour.finish_reason == "length" and neighbour.completion_tokens == 32 and tokens[0] >= 1
