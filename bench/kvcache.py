"""KV cache types (KV_CACHE_TYPE_K/_V, as llama-server's -ctk/-ctv): memory, speed, greedy output.

    python -m bench kvcache                       # SmolLM2, f16 q8_0 q4_0, PARALLEL 4 x 2048
    python -m bench kvcache --types f16,q8_0 --model x.gguf --prompts 8 --tokens 128

For each type, in a child process of its own (so each measures its own memory): the anonymous
memory the llama context adds (KV cache, compute and output buffers; RssAnon before and after
llama_init_from_model and a first 128-token batch), single-sequence decode speed (tokens/s of
--tokens greedy tokens after the bench's chat prompt, median of --reps, one llama_decode and an
argmax per token: no server), and each of --prompts chats' greedy answer; then how many answers
match f16's token for token, and where the first difference falls: printed, and written to the
results file (default bench/results/kvcache.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.client import messages_for
from bench.machine import REPO, bench_arguments, default_model, inspect_model, write_results


def rss_anon_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return 0.0


def worker(args) -> None:
    import numpy as np

    from gguf_serve.model import Model, llama

    eog = json.loads(args.eog)
    before = rss_anon_mib()
    model = Model(args.model, args.ctx, args.threads, args.parallel, kv_cache=(args.kv, args.kv))
    batch = llama.llama_batch_init(model.n_batch, 0, 1)

    def decode(tokens: list[int], start: int) -> None:
        for i, t in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.seq_id[i][0] = t, start + i, 1, 0
            batch.logits[i] = i == len(tokens) - 1
        batch.n_tokens = len(tokens)
        assert llama.llama_decode(model.ctx, batch) == 0

    def greedy(prompt: list[int]) -> tuple[list[int], float]:
        llama.llama_memory_seq_rm(model.memory, 0, 0, -1)
        for k in range(0, len(prompt), model.n_batch):
            decode(prompt[k : k + model.n_batch], k)
        out, t0 = [], time.perf_counter()
        for _ in range(args.tokens):
            logits = np.ctypeslib.as_array(llama.llama_get_logits_ith(model.ctx, -1), shape=(model.n_vocab,)).copy()
            logits[eog] = -np.inf
            out.append(int(logits.argmax()))
            decode(out[-1:], len(prompt) + len(out) - 1)
        return out, args.tokens / (time.perf_counter() - t0)

    render = lambda i: model.tokenize_prompt("".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"  # noqa: E731
                                                     for m in messages_for(i)) + "<|im_start|>assistant\n")
    greedy(render(999))  # warm-up: weights paged in, compute buffer touched
    memory = rss_anon_mib() - before
    speeds = [greedy(render(1000 + r))[1] for r in range(args.reps)]
    answers = [greedy(render(i))[0] for i in range(args.prompts)]
    print(json.dumps({"kv": args.kv, "context_anon_mib": memory, "tps": statistics.median(speeds), "tps_runs": speeds,
                      "answers": answers}))


def main(argv: list[str]) -> None:
    ap = bench_arguments("kvcache", __doc__)
    ap.add_argument("--types", default="f16,q8_0,q4_0")
    ap.add_argument("--parallel", type=int, default=4, help="sequences (default 4, as PARALLEL)")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--kv", help=argparse.SUPPRESS)
    ap.add_argument("--eog", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.model = (args.model or default_model()).resolve()
    if args.kv:
        return worker(args)
    eog = inspect_model(args.model)["eog"]
    print(f"{args.model.name}; {args.parallel} x {args.ctx} tokens of context; {args.threads} threads; "
          f"load average {os.getloadavg()[0]:.2f}", flush=True)
    results = {}
    for kv in args.types.split(","):
        cmd = [sys.executable, "-m", "bench", "kvcache", "--kv", kv, "--eog", json.dumps(eog), "--model", str(args.model),
               "--threads", str(args.threads), "--ctx", str(args.ctx), "--parallel", str(args.parallel),
               "--tokens", str(args.tokens), "--prompts", str(args.prompts), "--reps", str(args.reps)]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, cwd=REPO)
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        if out.returncode or not lines:
            print(f"{kv}: FAILED\n{out.stderr[-2000:]}", flush=True)
            continue
        results[kv] = json.loads(lines[-1])
        print(f"{kv}: measured", flush=True)
    print(f"load average {os.getloadavg()[0]:.2f}")
    reference = results.get("f16")
    print(f"{'type':6s} {'context MiB':>12s} {'tok/s':>7s}  greedy answers equal to f16's, first difference at token")
    for kv, r in results.items():
        same, first = "-", "-"
        if reference:
            pairs = list(zip(r["answers"], reference["answers"]))
            r["answers_equal_to_f16"] = sum(a == b for a, b in pairs)
            same = f"{r['answers_equal_to_f16']}/{len(pairs)}"
            r["first_differences"] = sorted(next(i for i, (x, y) in enumerate(zip(a, b)) if x != y) for a, b in pairs if a != b)
            first = ", ".join(map(str, r["first_differences"])) or "none"
        print(f"{kv:6s} {r['context_anon_mib']:12.1f} {r['tps']:7.1f}  {same}; {first}")
    write_results(args, results)
