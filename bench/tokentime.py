#!/usr/bin/env python3
"""Where one token's time goes, in process: llama.cpp alone, then the engine around it.

    python bench/tokentime.py                 # SmolLM2, 2 threads, 128 tokens, 5 repeats per layer
    python bench/tokentime.py --model x.gguf --tokens 256 --reps 3

Each layer is the one below plus one thing, so the difference of their per-token times is
what that thing costs (medians of --reps runs of one greedy generation each, the bench's logit
bias on end-of-generation tokens):

  C loop     llama_decode of one token, then llama.cpp's greedy sampler, in a bare Python loop:
             the floor of any server on these bindings
  engine     engine.Engine on a real asyncio loop, events collected by a plain callback:
             + batch filling, sampling (argmax of the biased logits), detokenization, stop
             scanning, the Event and its delivery to the event loop, every token (a stream)
  whole      the same for a request that only wants the finished text: the engine merges its events
             and wakes the event loop for its first and last token only

Within the engine layer each piece is timed on the decode thread (perf_counter_ns around
llama_decode, the batch filling, _sample and _deliver). What HTTP adds (Litestar, the run,
chunk shaping, granian) is the difference between the engine layer and `bench.py --paired`'s
single-stream figures.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))  # first: bench/responses.py is not the service's responses.py

from client import messages_for  # noqa: E402
from machine import bench_arguments, default_model, inspect_model  # noqa: E402


def c_loop(model, prompt: list[int], tokens: int, bias: dict[int, float]) -> dict:
    from gguf_serve.model import llama

    chain = llama.llama_sampler_chain_init(llama.llama_sampler_chain_default_params())
    biases = (llama.llama_logit_bias * len(bias))(*bias.items())
    llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_logit_bias(model.n_vocab, len(biases), biases))
    llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_greedy())
    llama.llama_memory_seq_rm(model.memory, 0, 0, -1)
    batch = llama.llama_batch_init(max(len(prompt), 1), 0, 1)
    for i, t in enumerate(prompt):
        batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.seq_id[i][0], batch.logits[i] = t, i, 1, 0, i == len(prompt) - 1
    batch.n_tokens = len(prompt)
    llama.llama_decode(model.ctx, batch)
    token = llama.llama_sampler_sample(chain, model.ctx, len(prompt) - 1)
    pos, decode_ns, sample_ns = len(prompt), 0, 0
    t0 = time.perf_counter()
    for _ in range(tokens - 1):
        batch.token[0], batch.pos[0], batch.n_seq_id[0], batch.seq_id[0][0], batch.logits[0] = token, pos, 1, 0, True
        batch.n_tokens = 1
        a = time.perf_counter_ns()
        llama.llama_decode(model.ctx, batch)
        b = time.perf_counter_ns()
        token = llama.llama_sampler_sample(chain, model.ctx, 0)
        sample_ns += time.perf_counter_ns() - b
        decode_ns += b - a
        pos += 1
    wall = time.perf_counter() - t0
    llama.llama_batch_free(batch)
    llama.llama_sampler_free(chain)
    n = tokens - 1
    return {"us_per_token": wall / n * 1e6, "decode_us": decode_ns / n / 1e3, "sample_us": sample_ns / n / 1e3}


class Timed:
    """An engine whose decode-thread pieces are timed (ns totals, per token at the end)."""

    def __init__(self, eng, llama_module):
        from gguf_serve import engine as engine_module

        self.ns = {"llama_decode": 0, "batch fill": 0, "_sample": 0, "_deliver": 0}
        self.steps = 0
        real_decode, real_sample, real_deliver = eng._decode, eng._sample, eng._deliver
        c_decode = llama_module.llama_decode
        timer = self

        class Proxy:  # engine.llama with llama_decode timed
            def __getattr__(self, name):
                return getattr(llama_module, name)

            @staticmethod
            def llama_decode(ctx, batch):
                a = time.perf_counter_ns()
                try:
                    return c_decode(ctx, batch)
                finally:
                    timer.ns["llama_decode"] += time.perf_counter_ns() - a

        engine_module.llama = Proxy()

        def decode(chunks, logits):
            a, before = time.perf_counter_ns(), self.ns["llama_decode"]
            real_decode(chunks, logits)
            self.ns["batch fill"] += time.perf_counter_ns() - a - (self.ns["llama_decode"] - before)
            self.steps += 1

        def sample(slot, index):
            a = time.perf_counter_ns()
            real_sample(slot, index)
            self.ns["_sample"] += time.perf_counter_ns() - a

        def deliver():
            a = time.perf_counter_ns()
            real_deliver()
            self.ns["_deliver"] += time.perf_counter_ns() - a

        eng._decode, eng._sample, eng._deliver = decode, sample, deliver


def engine_layer(model, prompt: list[int], tokens: int, bias: dict[int, float], reps: int, stream: bool) -> dict:
    from gguf_serve import engine
    from gguf_serve.model import llama

    async def run():
        loop = asyncio.get_running_loop()
        eng = engine.Engine(model, 4, loop)
        timed = Timed(eng, llama)
        walls, per_step = [], []
        for rep in range(reps + 1):
            done = loop.create_future()
            n = 0

            def emit(event):
                nonlocal n
                n += 1
                if event.finish_reason and not done.done():
                    done.set_result(event)

            gen = engine.Generation(prompt, tokens, engine.Sampling(temperature=0, logit_bias=bias), emit, stream=stream)
            before = dict(timed.ns)
            t0 = time.perf_counter()
            eng.submit(gen)
            event = await done
            wall = time.perf_counter() - t0
            if rep:  # the first is a warm-up
                walls.append(wall / event.completion_tokens * 1e6)
                per_step.append({k: (timed.ns[k] - before[k]) / event.completion_tokens / 1e3 for k in timed.ns})
        eng.close()
        engine.llama = llama
        return walls, per_step

    walls, per_step = asyncio.run(run())
    return {"us_per_token": statistics.median(walls),
            **{k + "_us": statistics.median(p[k] for p in per_step) for k in per_step[0]}}


def main() -> None:
    ap = bench_arguments(__doc__)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--layers", default="c,engine,whole")
    args = ap.parse_args()
    path = (args.model or default_model()).resolve()
    bias = {t: -100.0 for t in inspect_model(path)["eog"]}
    layers = args.layers.split(",")
    print(f"load average {os.getloadavg()[0]:.2f}; {path.name}; {args.threads} threads; {args.tokens} tokens")
    results = {}
    if len(layers) > 1:
        # Each layer in a process of its own: llama.cpp's OpenMP gives every thread that decodes a team of
        # its own, and with more OpenMP threads than cores libgomp stops spinning at its barriers, so an
        # engine layer run after the C loop (main thread, then the decode thread) decoded slower: once,
        # llama_decode 18.9 ms a token against 16.7 in a process of its own (a single pair of runs, on a
        # host that drifts ±15%: the reason is libgomp's documented throttling, the figure is loose).
        for layer in layers:
            cmd = [sys.executable, __file__, "--layers", layer, "--model", str(path), "--threads", str(args.threads),
                   "--ctx", str(args.ctx), "--tokens", str(args.tokens), "--reps", str(args.reps)]
            results.update(json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1]))
        layers = []
    if {"c", "engine", "whole"} & set(layers):
        from gguf_serve.model import Model

        model = Model(path, args.ctx, args.threads, 4)
        prompt = model.tokenize_prompt("<|im_start|>user\n" + messages_for(0)[1]["content"] + "<|im_end|>\n<|im_start|>assistant\n")
        if "c" in layers:
            runs = [c_loop(model, prompt, args.tokens, bias) for _ in range(args.reps + 1)][1:]
            results["C loop"] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        if "engine" in layers:
            results["engine"] = engine_layer(model, prompt, args.tokens, bias, args.reps, stream=True)
        if "whole" in layers:
            results["engine, not streamed"] = engine_layer(model, prompt, args.tokens, bias, args.reps, stream=False)
        del model
    print(f"load average {os.getloadavg()[0]:.2f}")
    for name, r in results.items():
        print(f"{name:22s} " + "  ".join(f"{k} {v:.1f}" for k, v in r.items()))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
