"""Where one token's time goes, in process: llama.cpp alone, then the engine around it.

    python -m bench tokentime                 # SmolLM2, 2 threads, 128 tokens, 5 repeats per layer
    python -m bench tokentime --model x.gguf --tokens 256 --reps 3

Each layer is the one below plus one thing, so the difference of their per-token times is
what that thing costs (medians of --reps runs of one greedy generation each, the bench's logit
bias on end-of-generation tokens; a token's time is that of the steps after the first token,
the prompt left out):

  C loop     llama_decode of one token, then llama.cpp's greedy sampler, in a bare Python loop
             (each of the two timed): the floor of any server on these bindings
  engine     engine.Engine on a real asyncio loop, events collected by a plain callback:
             + batch filling, sampling (argmax of the biased logits), detokenization, stop
             scanning, the Event and its delivery to the event loop, every token (a stream)
  whole      the same for a request that only wants the finished text: the engine merges its events
             and wakes the event loop for its first and last token only (timed between those two)

The engine is timed from outside, through what it offers any caller: a Generation submitted,
its first and last events timed as they reach the event loop. So the engine layers say what
the engine adds to the C loop, not how that splits between llama_decode (which slows when the
woken event loop takes a core from llama.cpp's threads) and the engine's Python: timing
llama_decode inside the engine needs llama.cpp's own decode timer, which gguf-serve's context
turns off (no_perf), and the bench does not reach into the engine's private steps. What HTTP
adds (Litestar, the run, chunk shaping, granian) is the difference between the engine layer and
`python -m bench paired`'s single-stream figures. Printed, and written to the results file
(default bench/results/tokentime.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time

from bench.client import messages_for
from bench.machine import REPO, bench_arguments, default_model, inspect_model, write_results
from gguf_serve import engine
from gguf_serve.model import Model, llama

LAYERS = {"c": "C loop", "engine": "engine", "whole": "engine, not streamed"}


def c_loop(model: Model, prompt: list[int], tokens: int, bias: dict[int, float]) -> dict:
    """One greedy generation through llama.cpp's C API alone: µs a token, and of it llama_decode's and the sampler's."""
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
    return {"us_per_token": wall / n * 1e6, "llama_decode_us": decode_ns / n / 1e3, "sampler_us": sample_ns / n / 1e3}


def engine_layer(model: Model, prompt: list[int], tokens: int, bias: dict[int, float], reps: int, stream: bool) -> dict:
    """--reps greedy generations through engine.Engine (after one to warm up): µs a token between the
    first event and the last, as they reach the event loop."""

    async def run() -> list[float]:
        loop = asyncio.get_running_loop()
        eng = engine.Engine(model, 4, loop)
        per_token = []
        try:
            for rep in range(reps + 1):
                done, arrivals = loop.create_future(), []

                def emit(event):
                    arrivals.append(time.perf_counter())
                    if event.finish_reason and not done.done():
                        done.set_result(event)

                eng.submit(engine.Generation(prompt, tokens, engine.Sampling(temperature=0, logit_bias=bias), emit,
                                             stream=stream))
                event = await done
                if event.completion_tokens != tokens:
                    raise RuntimeError(f"{event.completion_tokens} tokens, not {tokens} ({event.finish_reason})")
                if rep:  # the first is a warm-up
                    per_token.append((arrivals[-1] - arrivals[0]) / (tokens - 1) * 1e6)
        finally:
            eng.close()
        return per_token

    return {"us_per_token": statistics.median(asyncio.run(run()))}


def measure(args, layer: str) -> dict:
    """One layer, in this process."""
    bias = {t: -100.0 for t in json.loads(args._eog)}
    model = Model(args.model, args.ctx, args.threads, 4)
    prompt = model.tokenize_prompt("<|im_start|>user\n" + messages_for(0)[1]["content"] + "<|im_end|>\n<|im_start|>assistant\n")
    if layer == "c":
        runs = [c_loop(model, prompt, args.tokens, bias) for _ in range(args.reps + 1)][1:]
        return {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    return engine_layer(model, prompt, args.tokens, bias, args.reps, stream=layer == "engine")


def main(argv: list[str]) -> None:
    ap = bench_arguments("tokentime", __doc__)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--layers", default="c,engine,whole", help=f"a subset of {','.join(LAYERS)}")
    ap.add_argument("--_layer", choices=LAYERS, help=argparse.SUPPRESS)
    ap.add_argument("--_eog", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.model = (args.model or default_model()).resolve()
    if args._layer:
        print(json.dumps(measure(args, args._layer)))
        return
    layers = args.layers.split(",")
    if set(layers) - set(LAYERS):
        sys.exit(f"--layers: choose from {','.join(LAYERS)}")
    eog = inspect_model(args.model)["eog"]
    print(f"load average {os.getloadavg()[0]:.2f}; {args.model.name}; {args.threads} threads; {args.tokens} tokens", flush=True)
    figures = {}
    # Each layer in a process of its own: llama.cpp's OpenMP gives every thread that decodes a team of
    # its own, and with more OpenMP threads than cores libgomp stops spinning at its barriers, so an
    # engine layer run after the C loop (main thread, then the decode thread) decoded slower: once,
    # llama_decode 18.9 ms a token against 16.7 in a process of its own (a single pair of runs, on a
    # host that drifts ±15%: the reason is libgomp's documented throttling, the figure is loose).
    for layer in layers:
        cmd = [sys.executable, "-m", "bench", "tokentime", "--_layer", layer, "--_eog", json.dumps(eog),
               "--model", str(args.model), "--threads", str(args.threads), "--ctx", str(args.ctx),
               "--tokens", str(args.tokens), "--reps", str(args.reps)]
        run = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        if run.returncode:
            sys.exit(f"{LAYERS[layer]}: failed\n{run.stderr[-2000:]}")
        figures[LAYERS[layer]] = json.loads(run.stdout.splitlines()[-1])
    print(f"load average {os.getloadavg()[0]:.2f}; µs a token:")
    for name, r in figures.items():
        print(f"{name:22s} " + "  ".join(f"{k} {v:.1f}" for k, v in r.items()))
    write_results(args, figures)
