"""Stored responses with each store, side by side: the rate of POST /v1/responses that stores
its response (one token generated, so that the store's share shows), of one that continues a
stored response (previous_response_id: a read, then a write), and of GET /v1/responses/{id},
on a gguf-serve keeping them in process and one keeping them in a redis-server started here
(RESPONSES_STORE_URL).

    python -m bench store                     # 5 rounds of 20 requests of each kind, on each server
    python -m bench store --rounds 9 --requests 50

Both servers run at once on the same model; each round measures both, first one then the other
in turn, so that the host's drift weighs on both alike. A rate is one client's requests one
after another (what the store adds to a request's time, not its throughput under load):
medians over the rounds, and redis's over memory's, printed and written to the results file
(default bench/results/store.json).
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from bench.machine import bench_arguments, default_model, write_results
from bench.procs import free_port, kill_all, spawn
from bench.servers import gguf_serve_command, launch, server_arguments

KINDS = ("create", "continue", "get")


def start_redis(logdir: Path) -> str:
    """A redis-server on a free loopback port, nothing persisted: its URL once it answers."""
    port = free_port()
    proc = spawn([shutil.which("redis-server") or "/usr/bin/redis-server", "--port", str(port), "--bind", "127.0.0.1",
                  "--save", "", "--appendonly", "no"], logdir / "redis.log")
    import redis

    deadline = time.monotonic() + 20
    while True:
        try:
            redis.Redis(port=port).ping()
            return f"redis://127.0.0.1:{port}/0"
        except redis.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start: see {logdir / 'redis.log'}") from None
            time.sleep(0.05)


def one_round(client: httpx.Client, url: str, model: str, n: int, r: int) -> dict[str, float]:
    """Requests/s of each kind: n stored responses, n continuations of them, n reads."""
    ask = {"model": model, "max_output_tokens": 1, "temperature": 0, "store": True}
    rates, ids, started = {}, [], time.perf_counter()
    for i in range(n):
        ids.append(post(client, url, {**ask, "input": f"Round {r}, request {i}: say hi."}))
    rates["create"], started = n / (time.perf_counter() - started), time.perf_counter()
    for i, previous in enumerate(ids):
        post(client, url, {**ask, "input": "And again.", "previous_response_id": previous})
    rates["continue"], started = n / (time.perf_counter() - started), time.perf_counter()
    for previous in ids:
        client.get(f"{url}/v1/responses/{previous}").raise_for_status()
    rates["get"] = n / (time.perf_counter() - started)
    return rates


def post(client: httpx.Client, url: str, body: dict) -> str:
    r = client.post(f"{url}/v1/responses", json=body)
    r.raise_for_status()
    return r.json()["id"]


def main(argv: list[str]) -> None:
    ap = bench_arguments("store", __doc__)
    server_arguments(ap, llama_server=False)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--requests", type=int, default=20, help="requests of each kind a round, on each server")
    args = ap.parse_args(argv)
    args.model = (args.model or default_model()).resolve()
    logdir = Path(tempfile.mkdtemp(prefix="gguf-serve-store-"))
    runs: dict[str, list[dict]] = {store: [] for store in ("memory", "redis")}
    try:
        cmd, env, cwd = gguf_serve_command(args)
        stores = {"memory": env, "redis": {**env, "RESPONSES_STORE_URL": start_redis(logdir)}}
        servers = {store: launch(f"gguf-serve-{store}", cmd, store_env, cwd, args, [], logdir, {})[1]
                   for store, store_env in stores.items()}
        with httpx.Client(timeout=args.timeout) as client:
            for r in range(args.rounds):
                for store in (("memory", "redis") if r % 2 == 0 else ("redis", "memory")):
                    runs[store].append(one_round(client, servers[store].base, servers[store].model_id, args.requests, r))
    finally:
        kill_all()
    figures = {store: {kind: statistics.median(run[kind] for run in runs[store]) for kind in KINDS} for store in runs}
    figures["redis / memory"] = {kind: figures["redis"][kind] / figures["memory"][kind] for kind in KINDS}
    print(f"\n{args.rounds} rounds of {args.requests} requests of each kind; requests/s, medians")
    print(f"{'':16}" + "".join(f"{kind:>10}" for kind in KINDS))
    for name, row in figures.items():
        print(f"{name:16}" + "".join(f"{row[kind]:10.{3 if '/' in name else 1}f}" for kind in KINDS))
    write_results(args, figures, runs=runs)
