"""A long prompt joins while a stream runs: how long does the running stream pause?

    python -m bench join                 # gguf-serve and llama-server -np 4, 3 rounds each (about 2 minutes)
    python -m bench join --prompt-tokens 2000 --rounds 5

Each round, on each server in turn (same GGUF, context per sequence, threads and slots as
`python -m bench compare`): one streaming client asks for 256 tokens; once 16 have arrived, a second client
sends a prompt of about --prompt-tokens tokens (new each round, so nothing is cached) asking
for one token. Printed per server, medians over the rounds: the running stream's longest
pause between two chunks after the prompt was sent, the joiner's time to first token, and
the running stream's tokens/s over the whole request. A server that computes the new prompt
in one go stops every running stream for that long; one that computes it in chunks between
decode steps pauses them one chunk at a time. Every round goes to the results file (default
bench/results/join.json). Every request has a timeout and every loop is bounded.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from bench.client import Bench
from bench.llama_build import find_llama_server
from bench.machine import bench_arguments, default_model, inspect_model, write_results
from bench.procs import kill, wait_idle
from bench.report import table
from bench.servers import gguf_serve_command, launch, llama_server_command, server_arguments

SENTENCE = "The keeper climbed the stairs of the lighthouse at dusk and lit the great lamp for the ships. "


async def stream(client: httpx.AsyncClient, body: dict, stamps: list[float]) -> None:
    """POST a streaming chat request; the arrival time of each chunk with content goes in `stamps`
    (the SSE lines are read by the bench's parser, Bench.parse_line)."""
    state = {"usage": None, "chunks": 0, "t_first": None, "finish": None}
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            chunks = state["chunks"]
            if not Bench.parse_line(line, state):
                break
            if state["chunks"] > chunks:
                stamps.append(time.perf_counter())


async def one_round(b: Bench, i: int) -> dict:
    def body(content: str, max_tokens: int) -> dict:
        return {"model": b.model_id, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
                "temperature": 0, "logit_bias": b.bias, "stream": True}

    args = b.args
    long_prompt = f"(Round {i}.) " + SENTENCE * (args.prompt_tokens // 20) + "\nWhat did the keeper do?"
    running, joined = [], []
    async with httpx.AsyncClient(base_url=b.base, timeout=args.timeout) as client:
        first = asyncio.ensure_future(stream(client, body(f"(Round {i}.) Tell me a long story.", 256), running))
        for _ in range(int(args.timeout * 100)):
            if len(running) >= 16 or first.done():
                break
            await asyncio.sleep(0.01)
        t_join = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(first, stream(client, body(long_prompt, 1), joined)), args.timeout)
    after = [b - a for a, b in zip(running, running[1:]) if b > t_join]
    return {"longest_pause_s": max(after, default=None), "joiner_ttft_s": joined[0] - t_join if joined else None,
            "running_tps": (len(running) - 1) / (running[-1] - running[0])}


def main(argv: list[str]) -> None:
    ap = bench_arguments("join", __doc__)
    server_arguments(ap, wait_idle=60)
    ap.add_argument("--prompt-tokens", type=int, default=1000, help="the joining prompt's length, about (default 1000)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--servers", default="gguf-serve,llama-server-np4", help="either or both (default both)")
    args = ap.parse_args(argv)
    args.model = (args.model or default_model()).resolve()

    eog = inspect_model(args.model)["eog"]
    logdir = Path(tempfile.mkdtemp(prefix="gguf-serve-join-"))
    wanted = args.servers.split(",")
    servers = {"gguf-serve": gguf_serve_command(args)} if "gguf-serve" in wanted else {}
    if "llama-server-np4" in wanted:
        binary, why = find_llama_server(args, {})
        if binary is None:
            print(f"llama-server-np4 skipped: {why}")
        else:
            servers["llama-server-np4"] = (llama_server_command(binary, args, args.parallel), None, None)
    rows, figures = [], {}
    for name, (cmd, env, cwd) in servers.items():
        proc, b = launch(name, cmd, env, cwd, args, eog, logdir, {})
        try:
            asyncio.run(one_round(b, -1))  # warm-up
            rounds = []
            for i in range(args.rounds):
                wait_idle(args.wait_idle)
                rounds.append(asyncio.run(one_round(b, i)))
                r = rounds[-1]
                print(f"   round {i + 1}: longest pause {r['longest_pause_s']:.2f} s, joiner's first token after "
                      f"{r['joiner_ttft_s']:.2f} s, running stream {r['running_tps']:.1f} tok/s", flush=True)
        finally:
            kill(proc)
        med = {k: statistics.median(r[k] for r in rounds) for k in ("longest_pause_s", "joiner_ttft_s", "running_tps")}
        figures[name] = {**med, "rounds": rounds}
        rows.append([name, f"{med['longest_pause_s']:.2f} s", f"{med['joiner_ttft_s']:.2f} s",
                     f"{med['running_tps']:.1f}"])
    print(f"\nA ~{args.prompt_tokens}-token prompt joins a running stream ({args.model.name}, {args.threads} threads; "
          f"medians of {args.rounds} rounds):")
    print(table(rows, ["server", "running stream's longest pause", "joiner's first token", "running stream tok/s"]))
    write_results(args, figures)
