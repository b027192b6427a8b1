"""gguf-serve against llama-server -np 4, pair by pair, so that host drift cancels out: every
headline figure, and the 4-client aggregate against each server's single client.

    python -m bench paired --pairs 12          # about 15 minutes with SmolLM2 on 2 cores
    python -m bench paired --pairs 1 --max-tokens 16 --no-build    # a smoke run

On a shared VM the host's speed drifts by +-15% within minutes, so one server measured after
the other (`python -m bench compare`) gives ratios anywhere between 0.8 and 1.17. Here both
servers are started side by side (each idle, 0% CPU, while the other works), warmed with one
request, and then --pairs pairs run. In a pair each measurement is made on one server and at
once on the other (alternating which goes first): a fresh start to the first answer (unless
--no-starts), one request not streamed, one streamed (read lightly, see client.Bench.stream:
these two are the single-request figures), a single streaming client, then --clients concurrent
ones (default 4), each client with --rounds requests (default 1); then each server's peak RSS.
The requests are compare's (the same chat, temperature 0, end of generation banned, every run
checked to make exactly --max-tokens tokens). Each pair sees the same host conditions; the
medians of the per-pair ratios are the stable figures, printed with their mean, min, max and how
many pairs reach the continuous-batching goals: gguf-serve / llama-server-np4 at 4 clients
(>= 0.95), and each server's 4-client aggregate over its own single client's (>= 1.5 for
gguf-serve; llama-server's is its reference). Each pair also runs llama-batched-bench (built with
llama-server) on 1 and on 4 sequences: llama.cpp's own batching gain with no server at all, at
that moment on that host, which bounds both servers' 4-client / 1 ratios up to what four
requests save by sharing HTTP's fixed costs. A pair during which other processes used >= 10% of
the CPU is done again (at most twice). Both servers' start -> first answer is also timed as they
start (once each), with the ratio gguf-serve / llama-server-np4. Every burst goes to the results
file (default bench/results/paired.json).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.client import TOPICS, Bench, warm_stream
from bench.llama_build import find_llama_server
from bench.machine import bench_arguments, default_model, inspect_model, print_header, versions, write_results
from bench.procs import QUIET, kill, kill_all, peak_rss, until_quiet, wait_idle
from bench.report import fmt, paired_report
from bench.servers import gguf_serve_command, launch, llama_server_command, restart, server_arguments
from bench.stats import PAIRED, full_run, paired_summary


def burst(name: str, b: Bench, clients: int, args, first_index: int) -> dict:
    """One burst of concurrent streaming clients, checked: every request must make max_tokens tokens."""
    c = asyncio.run(b.clients(clients, args.rounds, first_index))
    expected = clients * args.rounds * args.max_tokens
    c["tokens_ok"] = c["tokens"] == expected and all(full_run(x, args.max_tokens) for x in c["runs"])
    if not c["tokens_ok"]:
        print(f"   NOT {expected} tokens: {name} made {c['tokens']} (finish_reasons "
              f"{sorted({str(x.get('finish_reason')) for x in c['runs']})})", flush=True)
    return c


def kernel_ceiling(binary: Path, args, clients: int) -> float | None:
    """How much llama.cpp's own batched decoding gains on this host right now, with no server at all:
    llama-batched-bench (built beside `binary`) generating max_tokens after a 24-token prompt (about
    what a bench request computes once its cached system prompt is reused) for `clients` sequences at
    once against one, tokens generated / wall time. A server's 4-client/1-client ratio lands near it
    (a little above: four concurrent requests share the fixed cost of an HTTP request that a lone
    client pays alone). None if the tool is missing or fails."""
    tool, T = binary.parent / "llama-batched-bench", str(args.threads)
    cmd = [str(tool), "-m", str(args.model), "-c", str(args.ctx * clients), "-b", "512", "-ub", "512", "-npp", "24",
           "-ntg", str(args.max_tokens), "-npl", f"1,{clients}", "-t", T, "-tb", T, "--no-kv-unified",
           "--output-format", "jsonl"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, stdin=subprocess.DEVNULL).stdout
        rows = {row["pl"]: row for row in (json.loads(line) for line in out.splitlines() if line.startswith("{"))}
        rate = {pl: pl * row["tg"] / row["t"] for pl, row in rows.items()}
        return rate[clients] / rate[1]
    except (OSError, subprocess.TimeoutExpired, ValueError, KeyError, ZeroDivisionError):
        return None


def ratio(figure: dict) -> float | None:
    """gguf-serve's figure over llama-server's."""
    a, b = (figure.get(n) for n in PAIRED)
    return a / b if a is not None and b else None


def bench_paired(args, eog: list[int], clients: int, logdir: Path, vers: dict, out: dict) -> None:
    """Both servers loaded side by side (idle, 0% CPU, while the other one works), then args.pairs pairs
    of bursts, one on each, alternating which goes first: each pair sees the same host speed, which on
    a shared VM drifts more within minutes than the difference being measured. Fills `out` as it goes."""
    procs: list[subprocess.Popen] = []
    try:
        binary, why = find_llama_server(args, vers)
        if binary is None:
            raise RuntimeError(f"llama-server-np4 can't run: {why}")
        commands = {"gguf-serve": gguf_serve_command(args),
                    "llama-server-np4": (llama_server_command(binary, args, args.parallel), None, None)}
        benches = {}
        for name in PAIRED:
            result = out["servers"].setdefault(name, {})
            proc, benches[name] = launch(name, *commands[name], args, eog, logdir, result)
            procs.append(proc)
            with httpx.Client(timeout=benches[name].timeout) as client:
                warm_stream(benches[name], client, result)
        answers = [out["servers"][name]["first_answer_s"] for name in PAIRED]
        out["first_answer_ratio"] = answers[0] / answers[1]
        # every burst asks new requests (no whole-prompt cache hit), the same topics as every other burst
        stride = len(TOPICS) * (clients * args.rounds // len(TOPICS) + 1)
        print(f"\n== {args.pairs} pairs of {clients} concurrent streaming clients x {args.rounds} request(s) "
              f"on each server", flush=True)
        for i in range(args.pairs):
            order = PAIRED if i % 2 == 0 else PAIRED[::-1]

            def pair(attempt):
                # Each measurement on one server, then at once the same on the other: a fresh start to
                # its first answer (the loaded one idles), one non-streamed request, a single streaming
                # client (its tok/s and time to first token), the concurrent burst; then each process
                # tree's peak RSS after that work. So the two halves of a figure are seconds apart, not
                # the other server's whole turn (a restart and three bursts) apart.
                first = 20_000 + stride * 4 * (3 * i + attempt)
                starts = {name: restart(name, *commands[name], args, eog, logdir, 100 * (i + 1) + attempt)
                          if args.starts else None for name in order}
                plain, streamed, singles, bursts = {}, {}, {}, {}
                for k, name in enumerate(order):
                    with httpx.Client(timeout=benches[name].timeout) as client:
                        plain[name] = benches[name].complete(client, first + stride * 2 * k + stride // 2)
                    plain[name]["tokens_ok"] = full_run(plain[name], args.max_tokens)
                for k, name in enumerate(order):
                    with httpx.Client(timeout=benches[name].timeout) as client:
                        streamed[name] = benches[name].stream(client, first + stride * 2 * k + stride // 2 + 1)
                    streamed[name]["tokens_ok"] = full_run(streamed[name], args.max_tokens)
                for k, name in enumerate(order):
                    singles[name] = burst(name, benches[name], 1, args, first + stride * 2 * k)
                for k, name in enumerate(order):
                    bursts[name] = burst(name, benches[name], clients, args, first + stride * (2 * k + 1))
                rss = {name: peak_rss(procs[PAIRED.index(name)].pid)["total_mb"] for name in order}
                ceiling = kernel_ceiling(binary, args, clients)
                agg = {name: bursts[name]["agg_tps"] for name in PAIRED}
                single = {name: singles[name]["agg_tps"] for name in PAIRED}
                ttft = {name: (lambda v: v * 1000 if v is not None else None)(streamed[name]["ttft_s"]) for name in PAIRED}
                figures = {"nonstream_tps": {n: plain[n]["tps"] for n in PAIRED}, "stream_tps": {n: streamed[n]["tps"] for n in PAIRED},
                           "ttft_ms": ttft, "first_answer_s": starts, "peak_rss_mb": rss, "agg_tps": agg}
                return {"pair": i + 1, "order": list(order), "agg_tps": agg, "single_tps": single,
                        "scaling": {n: agg[n] / single[n] if single[n] else None for n in PAIRED},
                        "ttft_mean_ms": {n: (lambda v: v * 1000 if v is not None else None)(bursts[n]["ttft_mean_s"])
                                         for n in PAIRED},
                        "ratio": agg[PAIRED[0]] / agg[PAIRED[1]] if agg[PAIRED[1]] else None,
                        "figures": figures, "ratios": {key: ratio(v) for key, v in figures.items()},
                        "kernel_ceiling": ceiling, "loadavg": os.getloadavg()[0],
                        "tokens_ok": all(c["tokens_ok"] for c in [*bursts.values(), *singles.values(), *plain.values(),
                                                                   *streamed.values()]),
                        "bursts": bursts, "single_bursts": singles, "nonstream": plain, "stream": streamed}

            wait_idle(args.wait_idle)
            attempts = until_quiet(pair, [p.pid for p in procs], args.wait_idle, f"pair {i + 1}")
            p = attempts[-1]
            p["quiet"], p["redone"] = p["other_cpu_pct"] < QUIET, attempts[:-1]
            out["pairs"].append(p)
            f, r = p["figures"], p["ratios"]
            print(f"   pair {i + 1}, {order[0]} first: " + "; ".join(
                f"{n} {f['nonstream_tps'][n]:.1f} / {f['stream_tps'][n]:.1f} tok/s, TTFT {fmt(f['ttft_ms'][n], '{:.0f}')} ms, "
                f"start {fmt(f['first_answer_s'][n], '{:.2f}')} s, {f['peak_rss_mb'][n]:.0f} MiB, "
                f"{clients} clients {p['agg_tps'][n]:.1f} tok/s ({fmt(p['scaling'][n], '{:.2f}')}x)" for n in PAIRED)
                + "; ratios " + ", ".join(f"{k} {fmt(v, '{:.3f}')}" for k, v in r.items())
                + f"; llama.cpp alone {fmt(p['kernel_ceiling'], '{:.2f}')}x"
                + f"; others {p['other_cpu_pct']:.0f}% CPU, load {p['loadavg']:.2f}", flush=True)
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {e}"
        print(f"   FAILED: {out['error']}", flush=True)
    finally:
        for proc in procs:
            kill(proc)
        out["summary"] = paired_summary(out["pairs"])


def main(argv: list[str]) -> None:
    ap = bench_arguments("paired", __doc__)
    server_arguments(ap)
    ap.add_argument("--max-tokens", type=int, default=128, help="tokens every request generates (default 128)")
    ap.add_argument("--pairs", type=int, default=12, help="pairs of measurements (default 12)")
    ap.add_argument("--clients", type=int, default=4, help="concurrent clients of the burst (default 4)")
    ap.add_argument("--rounds", type=int, default=1, help="requests per concurrent client (default 1)")
    ap.add_argument("--no-starts", dest="starts", action="store_false",
                    help="skip the fresh start of each server in every pair (start -> first answer)")
    args = ap.parse_args(argv)
    if args.pairs < 1:
        sys.exit("--pairs N needs N >= 1")
    args.model = (args.model or default_model()).resolve()
    vers = versions()  # before anything runs: the gguf-serve tree that is measured
    eog = inspect_model(args.model)["eog"]
    print_header(args, vers, eog)
    logdir = Path(tempfile.mkdtemp(prefix="gguf-serve-paired-"))
    paired = {"servers": {}, "clients": args.clients, "rounds": args.rounds, "pairs": []}
    t_start, interrupted = time.perf_counter(), None
    try:
        bench_paired(args, eog, args.clients, logdir, vers, paired)
    except (KeyboardInterrupt, SystemExit) as e:  # report what was measured before the interruption
        interrupted = str(e) or type(e).__name__
        print(f"\ninterrupted: {interrupted}: the pairs after the last one shown were not measured", flush=True)
    finally:
        kill_all()
    print("\n" + "=" * 100)
    print(paired_report(paired, args))
    if not paired["pairs"]:
        print(f"\nnothing measured: {args.json} is left as it was; server logs: {logdir}")
        sys.exit(130 if interrupted else 1)
    write_results(args, paired, vers, eog_banned=eog, elapsed_s=time.perf_counter() - t_start, logs=str(logdir),
                  interrupted=interrupted)
    if interrupted:
        sys.exit(130)
