"""Embeddings per second: gguf-serve's /v1/embeddings against llama.cpp's `llama-server --embeddings`.

    python -m bench embeddings                    # both servers, 5 pairs (a few minutes with SmolLM2 on 2 cores)
    python -m bench embeddings --pairs 9 --pooling last
    python -m bench embeddings --servers gguf-serve --pairs 1 --short 8 --long 2   # CI's smoke run

Two workloads, each one request: a batch of --short (64) short texts (one sentence, about 15
tokens each), and --long (8) long ones (about --long-tokens, 400, each: under llama-server's
default 512-token batch, which must hold a whole input when pooling by mean). Both servers run
side by side on the same GGUF, threads, context per sequence and sequences (gguf-serve
PARALLEL=4 and POOLING; llama-server -np 4 --pooling, each slot its own context), and are
measured in pairs, alternating which goes first, so that a drifting host cancels out of the
per-pair ratios (as `python -m bench paired`). A pair during which other processes used the CPU is done
again (at most twice). Printed: embeddings/s of each server (medians of the pairs) and the
median per-pair ratio gguf-serve / llama-server (the goal: >= 0.9); the cosine similarity of the
two servers' vectors for the same text (same pooling and normalisation: they should agree); and
gguf-serve's resident memory before and after it first embedded: what a chat model serving
embeddings too costs. All of it goes to the results file (default bench/results/embeddings.json).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from bench.llama_build import find_llama_server
from bench.machine import bench_arguments, default_model, inspect_model, write_results
from bench.procs import kill, rss_mib, until_quiet, wait_idle
from bench.report import table
from bench.servers import gguf_serve_command, launch, llama_server_command, server_arguments

SHORT = "Note {i}: the morning train to the coast was late again because of leaves on the line."
LONG = ("Chapter {i}. The old lighthouse keeper climbed the spiral stairs at dusk, checked the brass lamp, "
        "wiped the salt from the great lens and wrote the weather in his logbook before the ships came in. ")


def texts(args) -> dict[str, list[str]]:
    long_repeats = max(1, args.long_tokens // 40)  # one LONG sentence is about 40 tokens
    return {"short": [SHORT.format(i=i) for i in range(args.short)],
            "long": [" ".join([LONG.format(i=i)] * long_repeats) for i in range(args.long)]}


def embed(client: httpx.Client, model_id: str, inputs: list[str]) -> tuple[float, np.ndarray, int]:
    """One /v1/embeddings request: its wall time, its vectors and prompt tokens."""
    t0 = time.perf_counter()
    r = client.post("/v1/embeddings", json={"model": model_id, "input": inputs, "encoding_format": "float"})
    elapsed = time.perf_counter() - t0
    if r.status_code != 200:
        raise RuntimeError(f"HTTP {r.status_code}: {r.text[:300]}")
    body = r.json()
    vectors = np.array([d["embedding"] for d in sorted(body["data"], key=lambda d: d["index"])])
    if vectors.shape[0] != len(inputs):
        raise RuntimeError(f"{vectors.shape[0]} vectors for {len(inputs)} inputs")
    return elapsed, vectors, body["usage"]["prompt_tokens"]


def main(argv: list[str]) -> None:
    ap = bench_arguments("embeddings", __doc__)
    server_arguments(ap, wait_idle=60, timeout=600)
    ap.add_argument("--pairs", type=int, default=5)
    ap.add_argument("--short", type=int, default=64, help="short texts in the first request (default 64)")
    ap.add_argument("--long", type=int, default=8, help="long texts in the second request (default 8)")
    ap.add_argument("--long-tokens", type=int, default=400, help="a long text's length, about (default 400)")
    ap.add_argument("--pooling", default="mean", choices=["mean", "cls", "last"])
    ap.add_argument("--servers", default="gguf-serve,llama-server", help="either or both (default both)")
    args = ap.parse_args(argv)
    args.model = (args.model or default_model()).resolve()
    args.llama_server_args += f" --embeddings --pooling {args.pooling}"

    eog = inspect_model(args.model)["eog"]
    logdir = Path(tempfile.mkdtemp(prefix="gguf-serve-embeddings-"))
    wanted = args.servers.split(",")
    commands = {}
    if "gguf-serve" in wanted:
        cmd, env, cwd = gguf_serve_command(args)
        commands["gguf-serve"] = (cmd, {**env, "POOLING": args.pooling}, cwd)
    if "llama-server" in wanted:
        binary, why = find_llama_server(args, {})
        if binary is None:
            print(f"llama-server skipped: {why}")
        else:
            commands["llama-server"] = (llama_server_command(binary, args, args.parallel), None, None)
    work = texts(args)
    servers, results = {}, {"model": args.model.name, "threads": args.threads, "pooling": args.pooling, "pairs": []}
    try:
        for name, (cmd, env, cwd) in commands.items():
            proc, b = launch(name, cmd, env, cwd, args, eog, logdir, results.setdefault(name, {}))
            servers[name] = (proc, httpx.Client(base_url=b.base, timeout=args.timeout), b.model_id)
        if "gguf-serve" in servers:  # after a chat (launch's first answer), before any embedding
            results["gguf-serve"]["rss_before_mb"] = rss_mib(servers["gguf-serve"][0].pid)
        vectors = {}
        for name, (_, client, model_id) in servers.items():  # warm-up, and the vectors compared below
            vectors[name] = embed(client, model_id, work["short"][:4] + work["long"][:1])[1]
        if "gguf-serve" in servers:
            results["gguf-serve"]["rss_after_mb"] = rss_mib(servers["gguf-serve"][0].pid)
        if len(vectors) == 2:
            a, b = vectors.values()
            results["cosine_between_servers"] = float(np.min(np.sum(a * b, axis=1)))
        pids = [proc.pid for proc, _, _ in servers.values()]
        for k in range(args.pairs):
            wait_idle(args.wait_idle)
            order = list(servers) if k % 2 == 0 else list(servers)[::-1]

            def pair(_attempt: int) -> dict:
                out = {}
                for name in order:
                    _, client, model_id = servers[name]
                    for kind, inputs in work.items():
                        seconds, _, tokens = embed(client, model_id, inputs)
                        out[f"{name} {kind}"] = {"per_s": len(inputs) / seconds, "seconds": seconds, "tokens": tokens}
                return out

            r = until_quiet(pair, pids, args.wait_idle, f"pair {k + 1}")[-1]
            results["pairs"].append(r)
            print(f"   pair {k + 1}: " + ", ".join(f"{key} {v['per_s']:.1f}/s" for key, v in r.items() if isinstance(v, dict))
                  + f" (others used {r['other_cpu_pct']:.0f}% of the CPU)", flush=True)
    finally:
        for proc, client, _ in servers.values():
            client.close()
            kill(proc)

    rows = []
    for kind, inputs in work.items():
        def median(name):
            values = [p[f"{name} {kind}"]["per_s"] for p in results["pairs"] if f"{name} {kind}" in p]
            return statistics.median(values) if values else None

        ratios = [p[f"gguf-serve {kind}"]["per_s"] / p[f"llama-server {kind}"]["per_s"] for p in results["pairs"]
                  if f"gguf-serve {kind}" in p and f"llama-server {kind}" in p]
        tokens = results["pairs"][0][f"{next(iter(servers))} {kind}"]["tokens"] if results["pairs"] else 0
        ratio = f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})" if ratios else "-"
        results[kind] = {"gguf-serve": median("gguf-serve"), "llama-server": median("llama-server"), "ratios": ratios}
        rows.append([f"{len(inputs)} {kind} texts ({tokens} tokens)"] + [
            "-" if median(name) is None else f"{median(name):.1f}" for name in ("gguf-serve", "llama-server")] + [ratio])
    print(f"\nEmbeddings/s, {args.model.name}, {args.threads} threads, pooling {args.pooling}, "
          f"medians of {len(results['pairs'])} pairs:")
    print(table(rows, ["request", "gguf-serve", "llama-server --embeddings", "ratio (min-max)"]))
    if "cosine_between_servers" in results:
        print(f"the two servers' vectors for the same texts: cosine similarity >= {results['cosine_between_servers']:.4f}")
    if "rss_after_mb" in results.get("gguf-serve", {}):
        g = results["gguf-serve"]
        print(f"gguf-serve resident memory: {g['rss_before_mb']:.0f} MB after a chat, {g['rss_after_mb']:.0f} MB once it "
              f"has embedded (+{g['rss_after_mb'] - g['rss_before_mb']:.0f} MB)")
    write_results(args, results)
