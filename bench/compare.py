"""gguf-serve against llama.cpp's servers on the same GGUF, context and threads, one server after the other.

    python -m bench compare                    # full run: about 4 minutes with SmolLM2 on 2 idle cores
    python -m bench compare --quick            # 1.5 minutes: 2 repeats, 4 clients only, 4 servers, never builds
    python -m bench compare --servers gguf-serve,raw --plot bench/results/compare.png
    python -m bench compare --model /path/to/any.gguf --threads 2 --json /tmp/compare.json
    python -m bench compare --servers llama-server-np1 --llama-server-args=--no-repack

What is compared (every one on the same GGUF file, the same context per sequence (--ctx,
2048) and the same threads (--threads, default: every core this process may use)):

  gguf-serve              this project: granian + gguf_serve.service:app, PARALLEL=4 sequences batched
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
                client waits. The median of --starts starts (default 3, quick 1): the
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

(`python -m bench paired` measures gguf-serve and llama-server-np4 pair by pair, so that host drift
cancels out of their ratios.)

Noise: on 2 cores, any other busy process (a test run, a compile) slows llama.cpp a lot, not a
little (its threads wait for each other at every step). The CPU time used by other processes
is measured during every run; a run during which they used >= 10% of the CPU is done again
after waiting (--wait-idle, default up to 120 s) for the machine to be quiet, and the report
says how many runs were redone and which figures could not be measured undisturbed.
llama_cpp.server itself is bimodal (e.g. 103 or 60 tok/s): it decodes in whichever thread of
its thread pool serves the request, each such thread gets its own OpenMP team, and with more
OpenMP threads than cores libgomp stops spinning at barriers, so look at its single runs
in the JSON before reading much into its ratios.

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
versions and the gguf-serve commit measured (--json, default bench/results/compare.json).

Only the standard library and httpx are required. Every server is started in its own process
group and killed on exit, whatever happens (Ctrl-C or SIGTERM still prints and saves what was
measured); every request has a timeout; every loop is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.client import messages_for, warm_stream
from bench.llama_build import find_llama_server
from bench.machine import REPO, bench_arguments, default_model, inspect_model, machine_info, print_header, versions, \
    write_results
from bench.procs import cpu_ticks, kill, kill_all, other_cpu_percent, peak_rss, quiet_runs, spawn, tail, \
    until_quiet, status_mib, wait_idle
from bench.report import metrics, plot, report
from bench.servers import first_answers, gguf_serve_command, launch, llama_cpp_server_command, \
    llama_cpp_server_missing, llama_server_command, restart, server_arguments
from bench.stats import run_summary

QUICK_SERVERS = ["gguf-serve", "llama-cpp-server-fair", "llama-server-np4", "raw"]
ALL_SERVERS = ["gguf-serve", "llama-cpp-server", "llama-cpp-server-fair", "llama-server-np1", "llama-server-np4", "raw"]


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
                      "peak_rss": {"total_mb": round(status_mib(os.getpid(), "VmHWM") or 0, 1)}}))


def run_worker(cmd: list[str], log: Path, timeout: float) -> int:
    """Run the raw worker (told the time it is spawned) to its end, output to `log`: its exit status."""
    proc = spawn(cmd + ["--_raw-spawn-time", repr(time.time())], log, cwd=REPO)
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
    cmd = [sys.executable, "-m", "bench", "compare", "--_raw-worker", "--model", str(args.model),
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


# --- Main -----------------------------------------------------------------------------------


def main(argv: list[str]) -> None:
    ap = bench_arguments("compare", __doc__)
    server_arguments(ap)
    ap.add_argument("--max-tokens", type=int, default=128, help="tokens every request generates (default 128)")
    ap.add_argument("--servers", help=f"comma-separated subset of {','.join(ALL_SERVERS)} (llama-server = both of "
                    f"its runs; default: all, with --quick: {','.join(QUICK_SERVERS)})")
    ap.add_argument("--reps", type=int, help="single-stream repeats (default 5, quick 2)")
    ap.add_argument("--rounds", type=int, help="requests per concurrent client (default 2, quick 1)")
    ap.add_argument("--clients", help="client counts for gguf-serve and llama-server-np4 (default 1,2,4,8; quick 4)")
    ap.add_argument("--models-seconds", type=float, help="length of the /v1/models loop (default 2, quick 1)")
    ap.add_argument("--starts", type=int, help="starts of each server timed from spawn to its first answer (default 3, "
                    "quick 1)")
    ap.add_argument("--quick", action="store_true", help="about a minute: fewer repeats, only 4 clients, never builds")
    ap.add_argument("--plot", type=Path, help="write a PNG bar chart (needs matplotlib)")
    ap.add_argument("--_raw-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--_raw-eog", default="[]", help=argparse.SUPPRESS)
    ap.add_argument("--_raw-spawn-time", type=float, default=0.0, help=argparse.SUPPRESS)
    ap.add_argument("--_raw-first-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._raw_worker:
        args.raw_eog, args.raw_spawn_time, args.raw_first_only = args._raw_eog, args._raw_spawn_time, args._raw_first_only
        return raw_worker(args)

    q = args.quick
    args.no_build = args.no_build or q
    args.reps = args.reps or (2 if q else 5)
    args.rounds = args.rounds or (1 if q else 2)
    args.models_seconds = args.models_seconds or (1.0 if q else 2.0)
    args.starts = args.starts or (1 if q else 3)
    levels = [int(x) for x in (args.clients or ("4" if q else "1,2,4,8")).split(",")]
    args.model = (args.model or default_model()).resolve()
    if not args.model.is_file():
        sys.exit(f"{args.model}: no such file")
    wanted = []
    for s in (args.servers or ",".join(QUICK_SERVERS if q else ALL_SERVERS)).split(","):
        s = s.strip()
        for g in ["llama-server-np1", "llama-server-np4"] if s == "llama-server" else [s]:
            if g not in ALL_SERVERS:
                sys.exit(f"unknown server {s!r}; choose from {', '.join(ALL_SERVERS)}, llama-server")
            if g not in wanted:
                wanted.append(g)

    t_start = time.perf_counter()
    vers = versions()  # before anything runs: the gguf-serve tree that is measured
    if q and not args.servers:
        print(f"quick mode measures {', '.join(QUICK_SERVERS)} (llama-server-np4 is also the single-stream "
              "llama-server reference); --servers picks others")
    eog = inspect_model(args.model)["eog"]
    print_header(args, vers, eog)

    logdir = Path(tempfile.mkdtemp(prefix="gguf-serve-bench-"))
    notes: list[str] = []
    results: dict[str, dict] = {}
    interrupted = None
    try:
        bench_servers(wanted, args, eog, levels, logdir, vers, notes, results)
    except (KeyboardInterrupt, SystemExit) as e:  # report what was measured before the interruption
        interrupted = str(e) or type(e).__name__
        notes.append(f"interrupted ({interrupted}): the servers after the last one shown were not measured")
        print(f"\ninterrupted: {interrupted}", flush=True)
    finally:
        kill_all()
    elapsed = time.perf_counter() - t_start

    print("\n" + "=" * 100)
    print(f"model {args.model.name}; {'quick' if q else 'full'} run took {elapsed:.0f} s")
    print(report(results, args))
    for n in notes:
        print("note:", n)
    if interrupted and not any(metrics(r) for r in results.values()):
        print(f"\nnothing measured: {args.json} and the plot are left as they were; server logs: {logdir}")
        sys.exit(130)
    write_results(args, results, vers, eog_banned=eog, client_counts=levels, elapsed_s=elapsed, notes=notes,
                  logs=str(logdir), loadavg_end=os.getloadavg())
    if args.plot:
        plot(results, args.plot, f"{args.model.name}: {args.threads} threads, n_ctx {args.ctx}, "
             f"max_tokens {args.max_tokens}, {machine_info()['cpu']}")
    if interrupted:
        sys.exit(130)


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
