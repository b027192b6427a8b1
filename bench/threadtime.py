"""CPU time per generated token, thread by thread: gguf-serve against llama-server, one client.

    python -m bench threadtime                     # SmolLM2, 2 threads, 3 rounds of 6 + 6 requests
    python -m bench threadtime --loop asyncio      # gguf-serve on asyncio's own event loop
    python -m bench threadtime --model x.gguf --rounds 5 --requests 8
    python -m bench threadtime --floor             # and a bare ASGI app on granian (bench/floor_app.py)

Both servers are started side by side (gguf-serve with PARALLEL=4, llama-server -np 4, as in
`python -m bench paired`); each round, alternating which goes first, sends each server --requests
streamed chats of --max-tokens tokens and as many not streamed, one at a time, and reads every
thread's CPU time (/proc/<pid>/task/<tid>/stat) before and after.

llama.cpp's compute threads (each server's --threads busiest threads: its OpenMP team) spin at
their barriers, so their CPU time says little about their work. Every other thread's is work
that, when the machine has no core to spare, takes one from the team while it computes: with
two cores and two llama.cpp threads, a thread's microsecond of CPU is about a microsecond that
step waits. Printed per token (medians over the rounds): tokens/s, and µs of CPU of gguf-serve's
event loop (its worker's main thread), of its other threads beside the team (granian's runtime,
the prompt worker), and of llama-server's threads beside its team (its HTTP threads). With
--floor, a third server: floor_app.py, granian and a bare ASGI app that streams a chunk handed
over from a thread every 15 ms, no model: what any Python ASGI server on granian spends to
stream a token, gguf-serve's code and Litestar left out. Every round's figures go to the results
file (default bench/results/threadtime.json).
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.client import asked_again_if_dropped
from bench.machine import REPO, bench_arguments, write_results
from bench.procs import kill_all, process_tree
from bench.servers import launch, server_arguments, start_side_by_side

TICK = os.sysconf("SC_CLK_TCK")


def thread_cpu(pid: int) -> dict[tuple[int, int], float]:
    """CPU seconds of every thread of pid's process tree, by (process, thread)."""
    out = {}
    for p in process_tree(pid):
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                stat = Path(f"/proc/{p}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            out[(p, int(tid))] = (int(stat[11]) + int(stat[12])) / TICK
    return out


def measure(name: str, proc, bench, stream: bool, n: int, first_index: int, team: int) -> dict:
    """n requests one after the other: tokens/s and µs of CPU per token by kind of thread."""
    client = httpx.Client(timeout=bench.timeout)
    before, t0, tokens = thread_cpu(proc.pid), time.perf_counter(), 0
    for i in range(first_index, first_index + n):
        tokens += asked_again_if_dropped(name, lambda: (bench.stream if stream else bench.complete)(client, i))["tokens"]
    wall, after = time.perf_counter() - t0, thread_cpu(proc.pid)
    client.close()
    used = {k: v - before.get(k, 0.0) for k, v in after.items()}
    ranked = sorted(used, key=used.get, reverse=True)
    worker = ranked[0][0]  # the process llama.cpp computes in
    per_token = lambda keys: sum(used[k] for k in keys) / tokens * 1e6  # noqa: E731
    return {"tok_s": tokens / wall, "main_us": per_token([k for k in ranked[team:] if k == (worker, worker)]),
            "others_us": per_token([k for k in ranked[team:] if k != (worker, worker)]),
            "team_us": per_token(ranked[:team])}


def main(argv: list[str]) -> None:
    ap = bench_arguments("threadtime", __doc__)
    server_arguments(ap)
    ap.add_argument("--max-tokens", type=int, default=128, help="tokens every request generates (default 128)")
    ap.add_argument("--requests", type=int, default=6, help="requests a round, each way (streamed, not)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--loop", help="gguf-serve's event loop (GRANIAN_LOOP: asyncio, uvloop; default: granian's choice)")
    ap.add_argument("--floor", action="store_true", help="also floor_app.py: granian streaming with no model and no app")
    args = ap.parse_args(argv)
    logdir = Path(tempfile.mkdtemp(prefix="gguf-serve-threadtime-"))
    servers = {}
    try:
        loop = {"GRANIAN_LOOP": args.loop} if args.loop else {}
        servers = start_side_by_side(args, logdir, loop)
        if args.floor:
            floor = [sys.executable, "-m", "granian", "--interface", "asgi", "--host", "127.0.0.1", "--port", "{PORT}",
                     "bench.floor_app:app"]
            servers["floor"] = launch("floor", floor, {**os.environ, **loop}, REPO, args, [], logdir, {})  # no vocabulary to ban
        runs = {(name, stream): [] for name in servers for stream in (True, False)}
        for r in range(args.rounds):
            order = list(servers) if r % 2 == 0 else list(servers)[::-1]
            for name in order:
                proc, bench = servers[name]
                for stream in (True, False):
                    team = 0 if name == "floor" else args.threads  # the floor has no llama.cpp team
                    m = measure(name, proc, bench, stream, args.requests, 1000 * (r + 1) + 100 * stream, team)
                    runs[name, stream].append(m)
                    print(f"   round {r + 1} {name:12s} {'streamed' if stream else 'not streamed':12s} {m['tok_s']:6.1f} tok/s; "
                          f"µs of CPU a token: event loop {m['main_us']:4.0f}, other threads {m['others_us']:4.0f}, "
                          f"llama.cpp's team {m['team_us']:5.0f}", flush=True)
    finally:
        kill_all()
    print(f"\nMedians of {args.rounds} rounds ({args.requests} requests of {args.max_tokens} tokens each; load average "
          f"{os.getloadavg()[0]:.2f}; gguf-serve's loop: {args.loop or 'granian default'}):")
    print(f"{'server':14s} {'request':13s} {'tok/s':>6s} {'event loop µs/token':>20s} {'other threads µs/token':>23s}")
    figures = {}
    for (name, stream), ms in runs.items():
        med = {key: statistics.median(m[key] for m in ms) for key in ms[0]} if ms else {}
        if not med:
            continue
        figures[f"{name}, {'streamed' if stream else 'not streamed'}"] = med
        loop = f"{med['main_us']:.0f}" if name != "llama-server" else "-"
        print(f"{name:14s} {'streamed' if stream else 'not streamed':13s} {med['tok_s']:6.1f} {loop:>20s} {med['others_us']:>23.0f}")
    write_results(args, figures, rounds={f"{name}, {'streamed' if stream else 'not streamed'}": ms
                                         for (name, stream), ms in runs.items()})
