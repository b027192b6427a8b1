"""Serverless cold start and memory (issue #29): gguf-serve as the image runs it against llama-server,
fresh starts pair by pair, where gguf-serve's start goes, and each server's memory by kind.

    python -m bench coldstart                         # 8 pairs, warm and cold page cache
    python -m bench coldstart --pairs 1 --cache warm --no-build    # a smoke run

Starts: --pairs pairs of fresh starts of gguf-serve (the `gguf-serve` command: python -m gguf_serve)
and llama-server -np PARALLEL, alternating which goes first, each once the machine is quiet. Each
start is polled every 5 ms (other processes' CPU share during it recorded): spawn -> HTTP up
(any answer to GET /health), -> ready (gguf-serve's GET /ready, llama-server's GET /health: 200),
-> first answer (a one-token chat, asked once ready, as a platform routes a request once its
probe passes), and the process tree's RSS after that answer. With --cache cold, before each start the files either server reads are dropped from the
page cache (bench/pagecache.py), as on a host that has never run the image; skipped, with the
reason printed, where dropping does not work. Per pair: gguf-serve / llama-server for first
answer and ready, then their median, mean, min and max.

Where gguf-serve's start goes (bench/startphases.py): the interpreter's start, each package's
import time, each phase of a load alone; and the server's own {"event": "ready"} line if it prints
one.

Memory: both servers started with the same total context and slots, 4 concurrent chats of 64
tokens each, then every process's RSS and PSS from /proc/PID/smaps, by class of mapping
(bench/smaps.py), beside the KV cache the model's metadata implies. Everything goes to
bench/results/coldstart.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench import pagecache, smaps, startphases
from bench.client import Bench, poll
from bench.llama_build import find_llama_server
from bench.machine import REPO, bench_arguments, default_model, inspect_model, print_header, versions, write_results
from bench.procs import cpu_ticks, kill, kill_all, other_cpu_percent, rss_mib, spawn, wait_idle
from bench.servers import gguf_serve_command, llama_server_command, on_free_port, server_arguments
from bench.stats import summary

SERVERS = ("gguf-serve", "llama-server")
FIGURES = ("http_up_s", "ready_s", "first_answer_s", "first_request_s", "rss_mib")  # of each start
POLL_S = 0.005
MEMORY_TARGET_MIB = 100  # the issue's target: gguf-serve's memory <= llama-server -np 4's + 100 MB


def commands(args, binary: Path | None) -> dict[str, tuple[list[str], dict | None, Path | None, str]]:
    """Each server's command, environment, directory, and the path that answers 200 once it is ready."""
    _, env, cwd = gguf_serve_command(args)
    out = {"gguf-serve": ([sys.executable, "-m", "gguf_serve", "--host", "127.0.0.1", "--port", "{PORT}"], env, cwd,
                          "/ready")}
    if binary is not None:
        out["llama-server"] = (llama_server_command(binary, args, args.parallel), None, None, "/health")
    return out


def ready_line(log: Path) -> dict | None:
    """The server's own {"event": "ready", ...} line, if it printed one."""
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{") and '"ready"' in line:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == "ready":
                return event
    return None


def timed_start(name: str, command: tuple, args, eog: list[int], log: Path,
                model_id: str | None) -> tuple[dict, subprocess.Popen, str]:
    """Spawn a server and poll it: seconds to HTTP up, ready and first answer, and the process tree's
    RSS then. Returns the figures, the process (the caller stops it) and its base URL. Without
    `model_id` (the id the server lists) it is asked for between ready and the answer."""
    cmd, env, cwd, ready_path = command
    cmd, base = on_free_port(cmd)
    ticks = cpu_ticks(None)
    t_spawn = time.perf_counter()
    proc = spawn(cmd, log, env=env, cwd=cwd)
    try:
        with httpx.Client(timeout=httpx.Timeout(args.timeout, connect=2)) as client:
            def until(what: str, ask, done=lambda r: r.status_code == 200) -> float:
                return poll(proc, t_spawn, args.start_timeout, log, f"{name}: {what}", client, ask, done=done,
                            interval=POLL_S)[0]

            up = until("HTTP", lambda c: c.get(f"{base}/health"), done=lambda r: True)
            ready = until("ready", lambda c: c.get(f"{base}{ready_path}"))
            if model_id is None:
                model_id = client.get(f"{base}/v1/models").json()["data"][0]["id"]
            body = Bench(base, model_id, args, eog).body(10_002, False, max_tokens=1)
            answer = until("answer", lambda c: c.post(f"{base}/v1/chat/completions", json=body))
        figures = {"http_up_s": up, "ready_s": ready, "first_answer_s": answer, "first_request_s": answer - ready,
                   "rss_mib": rss_mib(proc.pid),
                   "other_cpu_pct": round(other_cpu_percent(ticks, cpu_ticks(proc.pid), answer), 1),
                   "model_id": model_id}
        event = ready_line(log)
        if event is not None:
            figures["ready_event"] = event
        return figures, proc, base
    except BaseException:
        kill(proc)
        raise


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def start_pairs(args, cmds: dict, eog: list[int], logdir: Path, model_ids: dict[str, str],
                drop: list[Path] | None) -> dict:
    """--pairs pairs of fresh starts, alternating which server goes first; `drop`: the files dropped
    from the page cache before each start (the cold condition)."""
    pairs = []
    for i in range(args.pairs):
        order = SERVERS if i % 2 == 0 else SERVERS[::-1]
        pair = {"order": list(order)}
        for name in order:
            wait_idle(args.wait_idle)
            if drop is not None:
                pagecache.evict(drop)
            cached = pagecache.resident_bytes(args.model)[0] / 2**20
            figures, proc, _ = timed_start(name, cmds[name], args, eog,
                                           logdir / f"{name}-{'cold' if drop else 'warm'}{i}.log", model_ids[name])
            kill(proc)
            del figures["model_id"]
            pair[name] = {**figures, "model_cached_mib_at_spawn": round(cached, 1)}
        pair["ratios"] = {k: ratio(pair["gguf-serve"][k], pair["llama-server"][k]) for k in FIGURES}
        pairs.append(pair)
        each = " | ".join(f"{n} up {pair[n]['http_up_s']:.3f} ready {pair[n]['ready_s']:.3f} answer "
                          f"{pair[n]['first_answer_s']:.3f} s {pair[n]['rss_mib']:.0f} MiB" for n in SERVERS)
        print(f"   pair {i + 1}: {each} | ratio answer {pair['ratios']['first_answer_s']:.2f} ready "
              f"{pair['ratios']['ready_s']:.2f} | others' CPU {pair['gguf-serve']['other_cpu_pct']:.0f}% "
              f"{pair['llama-server']['other_cpu_pct']:.0f}%", flush=True)
    out = {"pairs": pairs, "servers": {n: {k: summary([p[n][k] for p in pairs]) for k in FIGURES} for n in SERVERS},
           "ratios": {k: summary([p["ratios"][k] for p in pairs]) for k in FIGURES}}
    events = [p["gguf-serve"]["ready_event"]["seconds"] for p in pairs if "ready_event" in p["gguf-serve"]]
    if events:
        out["gguf-serve ready event, median s"] = {k: summary([e.get(k) for e in events])["median"] for k in events[0]}
    return out


def kv_cache_mib(model: Path, n_ctx_total: int) -> dict:
    """The f16 KV cache the model's metadata implies for n_ctx_total tokens (all slots): n_ctx_total
    * n_layer * n_head_kv * (key_length + value_length) * 2 bytes."""
    code = ("import json, sys\nfrom pathlib import Path\nfrom gguf_serve.model import Model\n"
            "print(json.dumps(Model(Path(sys.argv[1]), vocab_only=True).metadata))")
    r = subprocess.run([sys.executable, "-c", code, str(model)], capture_output=True, text=True, timeout=120, cwd=REPO)
    if r.returncode:
        raise RuntimeError(f"can't read {model}'s metadata:\n{r.stderr[-2000:]}")
    meta = json.loads(r.stdout.strip().splitlines()[-1])
    arch = meta["general.architecture"]
    n_layer, n_head = int(meta[f"{arch}.block_count"]), int(meta[f"{arch}.attention.head_count"])
    n_head_kv = int(meta.get(f"{arch}.attention.head_count_kv", n_head))
    head = int(meta[f"{arch}.embedding_length"]) // n_head
    k_len = int(meta.get(f"{arch}.attention.key_length", head))
    v_len = int(meta.get(f"{arch}.attention.value_length", head))
    size = n_ctx_total * n_layer * n_head_kv * (k_len + v_len) * 2
    return {"n_ctx_total": n_ctx_total, "n_layer": n_layer, "n_head_kv": n_head_kv, "key_length": k_len,
            "value_length": v_len, "mib": size / 2**20}


def memory(args, cmds: dict, eog: list[int], logdir: Path, model_ids: dict[str, str]) -> dict:
    """Each server started, 4 concurrent chats of 64 tokens, then its tree's memory by class."""
    out = {"load": "4 concurrent streamed chats of 64 tokens",
           "kv_cache_f16": kv_cache_mib(args.model, args.ctx * args.parallel)}
    for name in SERVERS:
        wait_idle(args.wait_idle)
        _, proc, base = timed_start(name, cmds[name], args, eog, logdir / f"{name}-memory.log", model_ids[name])
        try:
            load = argparse.Namespace(**{**vars(args), "max_tokens": 64})
            asyncio.run(Bench(base, model_ids[name], load, eog).clients(4, 1, 30_000))
            out[name] = smaps.tree_memory(proc.pid, args.model)
        finally:
            kill(proc)
    g, l = out["gguf-serve"], out["llama-server"]
    out["difference_mib"] = {"pss": g["pss_mib"] - l["pss_mib"], "rss": g["rss_mib"] - l["rss_mib"]}
    out["target"] = f"gguf-serve's PSS sum <= llama-server's + {MEMORY_TARGET_MIB} MiB"
    out["target_met"] = out["difference_mib"]["pss"] <= MEMORY_TARGET_MIB
    return out


def print_starts(cache: str, starts: dict) -> None:
    print(f"\nStart ({cache} page cache), {len(starts['pairs'])} pairs: median (min-max) s")
    for n in SERVERS:
        s = starts["servers"][n]
        times = "  ".join(f"{k[:-2]} {s[k]['median']:.3f} ({s[k]['min']:.3f}-{s[k]['max']:.3f})"
                          for k in ("http_up_s", "ready_s", "first_answer_s", "first_request_s"))
        print(f"  {n:13s} {times}  RSS {s['rss_mib']['median']:.0f} MiB")
    for k in ("first_answer_s", "ready_s"):
        r = starts["ratios"][k]
        print(f"  gguf-serve / llama-server, {k[:-2]}: median {r['median']:.2f}, mean {r['mean']:.2f}, "
              f"min {r['min']:.2f}, max {r['max']:.2f}")
    if "gguf-serve ready event, median s" in starts:
        print(f"  gguf-serve's ready event: {starts['gguf-serve ready event, median s']}")


def print_where(where: dict) -> None:
    print("\nWhere gguf-serve's start goes (medians, ms)")
    for name, s in where["interpreter_start_s"].items():
        print(f"  {name:58s} {s * 1000:7.1f}")
    imports = where["import_time"]
    print(f"  imports ({imports['imports']}, -X importtime self times): {imports['total_ms']:.1f}")
    for group, ms in imports["ms"].items():
        print(f"    {group:56s} {ms:7.1f}")
    print("  phases, each alone in a fresh process:")
    for phase, s in where["phases_s"].items():
        print(f"    {phase:56s} {s * 1000:7.1f}")


def print_memory(mem: dict) -> None:
    g, l = mem["gguf-serve"], mem["llama-server"]
    print(f"\nMemory after {mem['load']}, MiB: RSS / PSS")
    for name in SERVERS:
        for p in mem[name]["processes"]:
            print(f"  {name:13s} {p['pid']:>7d} {p['name']:16s} {p['rss_mib']:7.1f} / {p['pss_mib']:7.1f}")
    print(f"  {'':34s} {'gguf-serve':>17s} {'llama-server':>17s} {'difference':>17s}")
    for cls in smaps.CLASSES:
        a, b = g["by_class"][cls], l["by_class"][cls]
        print(f"  {cls:34s} {a['rss_mib']:7.1f} / {a['pss_mib']:7.1f} {b['rss_mib']:7.1f} / {b['pss_mib']:7.1f} "
              f"{a['rss_mib'] - b['rss_mib']:7.1f} / {a['pss_mib'] - b['pss_mib']:7.1f}")
    print(f"  {'sum over the process tree':34s} {g['rss_mib']:7.1f} / {g['pss_mib']:7.1f} {l['rss_mib']:7.1f} / "
          f"{l['pss_mib']:7.1f} {mem['difference_mib']['rss']:7.1f} / {mem['difference_mib']['pss']:7.1f}")
    kv = mem["kv_cache_f16"]
    print(f"  KV cache from the metadata (f16, {kv['n_ctx_total']} tokens x {kv['n_layer']} layers x {kv['n_head_kv']} "
          f"KV heads x ({kv['key_length']} + {kv['value_length']})): {kv['mib']:.1f} MiB, "
          "within the big anonymous mappings")
    print(f"  target: {mem['target']}: {'met' if mem['target_met'] else 'NOT met'} "
          f"(PSS difference {mem['difference_mib']['pss']:+.1f} MiB, "
          f"RSS difference {mem['difference_mib']['rss']:+.1f})")


def main(argv: list[str]) -> None:
    ap = bench_arguments("coldstart", __doc__)
    ap.add_argument("--pairs", type=int, default=8, help="pairs of fresh starts per page-cache condition (default 8)")
    ap.add_argument("--cache", default="warm,cold", help="page-cache conditions, of warm,cold (default both)")
    ap.add_argument("--runs", type=int, default=5,
                    help="fresh interpreters for each import and phase median (default 5)")
    server_arguments(ap, wait_idle=60)
    args = ap.parse_args(argv)
    caches = args.cache.split(",")
    if args.pairs < 1 or not caches or set(caches) - {"warm", "cold"}:
        ap.error("--pairs must be >= 1 and --cache a list of warm, cold")
    args.model = (args.model or default_model()).resolve()
    args.max_tokens = 1
    vers = versions()
    eog = inspect_model(args.model)["eog"]
    print_header(args, vers, eog)
    logdir = Path(tempfile.mkdtemp(prefix="bench-coldstart-"))
    binary, why = find_llama_server(args, vers)
    if binary is None:
        sys.exit(f"nothing to compare against: {why}; or pass --llama-server")
    cmds = commands(args, binary)
    figures: dict = {"logs": str(logdir)}
    try:
        # a start of each first: the ids they list, asked for once, not inside a measured start
        model_ids = {}
        for name in SERVERS:
            started, proc, _ = timed_start(name, cmds[name], args, eog, logdir / f"{name}-first.log", None)
            kill(proc)
            model_ids[name] = started["model_id"]
        for cache in caches:
            drop = None
            if cache == "cold":
                drop = sorted(set(pagecache.gguf_serve_files(args.model))
                              | set(pagecache.llama_server_files(binary, args.model)))
                works, check = pagecache.eviction_check(drop, args.model)
                figures["cold_eviction_check"] = check
                if not works:
                    figures["cold"] = {"unavailable": f"posix_fadvise(DONTNEED) left the model cached: {check}"}
                    print(f"\ncold page cache skipped: {figures['cold']['unavailable']}", flush=True)
                    continue
                print(f"\n== cold: {check['files']} files ({check['size_mib']:.0f} MiB) dropped before each start; "
                      f"after a drop {check['resident_after_mib']['all_mib']:.1f} MiB of them stays cached (mapped by "
                      f"running processes)", flush=True)
            else:
                print("\n== warm page cache", flush=True)
                for name in SERVERS:  # after cold starts the cache lacks what each reads: a start of each first
                    kill(timed_start(name, cmds[name], args, eog, logdir / f"{name}-warming.log", model_ids[name])[1])
            figures[cache] = start_pairs(args, cmds, eog, logdir, model_ids, drop)
            print_starts(cache, figures[cache])
        wait_idle(args.wait_idle)
        figures["where_gguf_serve_start_goes"] = {
            "interpreter_start_s": startphases.interpreter_start(args.runs),
            "import_time": startphases.import_times(args.runs),
            "phases_s": startphases.phases(args.model, args.ctx, args.threads, args.parallel, args.runs)}
        print_where(figures["where_gguf_serve_start_goes"])
        figures["memory"] = memory(args, cmds, eog, logdir, model_ids)
        print_memory(figures["memory"])
    finally:
        kill_all()
    write_results(args, figures, vers, eog_banned=eog)
