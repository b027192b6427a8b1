"""Where one request's time goes on each server, pair by pair: gguf-serve against llama-server.

    python -m bench split                      # SmolLM2, 2 threads, 12 pairs of each kind of request
    python -m bench split --pairs 24 --model x.gguf

Both servers are started side by side (gguf-serve with PARALLEL=4, llama-server -np 4, as in
`python -m bench paired`). Each pair sends the same chat (128 tokens, end of generation banned) to one
server and then to the other, alternating which goes first, once not streamed and once streamed.
Each request's time is split by what the server itself measured:

  first token   the server's time from the request to its first generated token (gguf-serve: the
                log line's ttft_s, from the request's arrival to the token reaching the event loop;
                llama-server: timings.prompt_ms, its prompt's evaluation and first sampling)
  a token       the server's time per generated token after the first (gguf-serve: the log line's
                duration_s less ttft_s; llama-server: timings.predicted_ms), over the tokens - 1
                steps between them
  outside       what the client measured less what the server did: HTTP, the body, the sockets

Printed: per-pair ratios gguf-serve / llama-server of the whole request (the client's wall time),
of the first token and of a token, with their median, min and max, and the medians of each part
in milliseconds, so the gap (if any) is where its milliseconds are; all of them go to the results
file (default bench/results/split.json).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from bench.client import asked_again_if_dropped
from bench.machine import bench_arguments, write_results
from bench.procs import kill_all
from bench.servers import server_arguments, start_side_by_side


def log_line(log: Path, request_id: str, deadline_s: float = 10.0) -> dict:
    """gguf-serve's JSON log line for request_id (written once the response is sent: wait for it)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        for line in reversed(log.read_text(errors="replace").splitlines()):
            if request_id in line and line.startswith("{"):
                return json.loads(line)
        time.sleep(0.01)
    raise RuntimeError(f"no log line for request {request_id} in {log}")


def request(name: str, bench, log: Path, client: httpx.Client, i: int, stream: bool) -> dict:
    """One chat: the client's wall time, and the server's own first-token and per-token times, in ms."""
    return asked_again_if_dropped(name, lambda: timed_request(name, bench, log, client, i, stream))


def timed_request(name: str, bench, log: Path, client: httpx.Client, i: int, stream: bool) -> dict:
    t0, timings, usage = time.perf_counter(), None, None
    with client.stream("POST", f"{bench.base}/v1/chat/completions", json=bench.body(i, stream)) as r:
        if r.status_code != 200:
            r.read()
            raise RuntimeError(f"{name}: HTTP {r.status_code}: {r.text[:300]}")
        if stream:
            for line in r.iter_lines():
                if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                    continue
                obj = json.loads(line[5:])
                usage, timings = obj.get("usage") or usage, obj.get("timings") or timings
        else:
            obj = json.loads(r.read())
            usage, timings = obj["usage"], obj.get("timings")
    wall = (time.perf_counter() - t0) * 1e3
    n = usage["completion_tokens"]
    if n != bench.args.max_tokens:
        raise RuntimeError(f"{name}: {n} tokens, not {bench.args.max_tokens}")
    if name == "gguf-serve":
        line = log_line(log, r.headers["x-request-id"])
        first, server = line["ttft_s"] * 1e3, line["duration_s"] * 1e3
    else:
        first, server = timings["prompt_ms"], timings["prompt_ms"] + timings["predicted_ms"]
    return {"wall_ms": wall, "first_ms": first, "token_ms": (server - first) / (n - 1), "outside_ms": wall - server}


PARTS = {"wall_ms": "whole request (client)", "first_ms": "first token (server)", "token_ms": "a token after it (server)",
         "outside_ms": "outside the server"}


def main(argv: list[str]) -> None:
    ap = bench_arguments("split", __doc__)
    server_arguments(ap)
    ap.add_argument("--max-tokens", type=int, default=128, help="tokens every request generates (default 128)")
    ap.add_argument("--pairs", type=int, default=12)
    ap.add_argument("--idle", type=float, default=0.0, help="seconds both servers idle before each request (default 0)")
    args = ap.parse_args(argv)
    logdir = Path(tempfile.mkdtemp(prefix="gguf-serve-split-"))
    servers, runs = {}, []
    try:
        servers = start_side_by_side(args, logdir)
        clients = {name: httpx.Client(timeout=b.timeout) for name, (_, b) in servers.items()}
        for k in range(args.pairs):
            order = list(servers) if k % 2 == 0 else list(servers)[::-1]
            for stream in (False, True):
                pair = {}
                for name in order:
                    time.sleep(args.idle)
                    pair[name] = request(name, servers[name][1], logdir / f"{name}.log", clients[name], 5000 + 2 * k + stream, stream)
                runs.append({"stream": stream, **pair})
                g, s = pair["gguf-serve"], pair["llama-server"]
                print(f"   pair {k + 1:2d} {'streamed' if stream else 'not streamed':12s} wall {g['wall_ms']:6.0f} / {s['wall_ms']:6.0f} ms, "
                      f"first token {g['first_ms']:5.1f} / {s['first_ms']:5.1f}, a token {g['token_ms']:5.2f} / {s['token_ms']:5.2f}, "
                      f"outside {g['outside_ms']:5.1f} / {s['outside_ms']:5.1f}", flush=True)
    finally:
        kill_all()
    figures = {}
    for stream in (False, True):
        pairs = [r for r in runs if r["stream"] == stream]
        if not pairs:
            continue
        kind = "streamed" if stream else "not streamed"
        print(f"\n{kind.capitalize()}, {len(pairs)} pairs: medians in ms (gguf-serve, llama-server), "
              "and gguf-serve / llama-server pair by pair (median, min-max)")
        figures[kind] = {}
        for key, what in PARTS.items():
            mine, theirs = ([p[name][key] for p in pairs] for name in ("gguf-serve", "llama-server"))
            figures[kind][key] = {"gguf-serve": statistics.median(mine), "llama-server": statistics.median(theirs)}
            line = f"  {what:27s} {statistics.median(mine):8.2f} {statistics.median(theirs):8.2f}"
            if key != "outside_ms":  # a difference of a few ms: its ratio says nothing
                ratios = [a / b for a, b in zip(mine, theirs)]
                figures[kind][key]["ratio"] = statistics.median(ratios)
                line += f"   ratio {statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f})"
            print(line)
    write_results(args, figures, pairs=runs)
