"""The HTTP client side: requests, SSE parsing, concurrent clients, models req/s, warm-up, polling a starting server."""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from bench.procs import tail

SYSTEM = "You are a helpful assistant. Answer in detail."
TOPICS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a bicycle gear system works, step by step.",
    "Describe a walk through a busy market in a coastal town in the morning.",
    "Give advice to someone learning to cook their first dinner for friends.",
    "Explain why the sky is blue to a curious ten year old.",
    "Write a letter from a traveller describing the mountains they crossed.",
    "Describe how bread is made, from the flour to the finished loaf.",
    "Tell the story of a small robot that wants to learn to paint.",
]


def messages_for(i: int) -> list[dict]:
    """The i-th request's chat: the same for every server, unique per request."""
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"(Request {i}.) {TOPICS[i % len(TOPICS)]}"}]


class Bench:
    def __init__(self, base: str, model_id: str, args, eog: list[int]):
        self.base, self.model_id, self.args = base, model_id, args
        self.bias = {str(t): -100 for t in eog}
        self.usage_in_stream = True  # sent as stream_options; dropped if a server refuses it
        self.timeout = httpx.Timeout(args.timeout, connect=10)

    def body(self, i: int, stream: bool, max_tokens: int | None = None) -> dict:
        body = {"model": self.model_id, "messages": messages_for(i), "max_tokens": max_tokens or self.args.max_tokens,
                "temperature": 0, "repeat_penalty": 1.0, "logit_bias": self.bias, "stream": stream}
        if stream and self.usage_in_stream:
            body["stream_options"] = {"include_usage": True}
        return body

    def complete(self, client: httpx.Client, i: int) -> dict:
        t0 = time.perf_counter()
        r = client.post(f"{self.base}/v1/chat/completions", json=self.body(i, False), timeout=self.timeout)
        wall = time.perf_counter() - t0
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:300]}")
        data = r.json()
        usage = data.get("usage") or {}
        n = usage.get("completion_tokens")
        return {"wall_s": wall, "tokens": n, "tokens_from": "usage", "prompt_tokens": usage.get("prompt_tokens"),
                "finish_reason": data["choices"][0].get("finish_reason"), "tps": n / wall if n else None}

    def first_answer(self, proc: subprocess.Popen, t_spawn: float, timeout: float, log: Path) -> float:
        """Seconds from spawn to the first 200 to a one-token chat request, asked every 20 ms (again
        after a refused connection, a 503 while the model loads or a 429)."""
        body = self.body(10_002, False, max_tokens=1)
        with httpx.Client(timeout=self.timeout) as client:
            return poll(proc, t_spawn, timeout, log, "POST /v1/chat/completions", client,
                        lambda c: c.post(f"{self.base}/v1/chat/completions", json=body),
                        lambda status: status in (429, 503))[0]

    def _stream_result(self, t0, t_first, t_end, usage, finish, chunks) -> dict:
        if usage and usage.get("completion_tokens") is not None:
            n, source = usage["completion_tokens"], "usage"
        elif finish == "length":
            n, source = self.args.max_tokens, "finish_reason=length"
        else:
            n, source = chunks, "chunks"
        wall = t_end - t0
        return {"wall_s": wall, "ttft_s": None if t_first is None else t_first - t0, "tokens": n, "tokens_from": source,
                "chunks": chunks, "prompt_tokens": (usage or {}).get("prompt_tokens"), "finish_reason": finish,
                "tps": n / wall if n else None, "t0": t0, "t_end": t_end}

    @staticmethod
    def parse_line(line: str, state: dict) -> bool:
        """One SSE line into state; False at [DONE]."""
        if not line.startswith("data:"):
            return True
        data = line[5:].strip()
        if data == "[DONE]":
            return False
        obj = json.loads(data)
        if "error" in obj and not obj.get("choices"):
            raise RuntimeError(f"error in stream: {str(obj['error'])[:300]}")
        if obj.get("usage"):
            state["usage"] = obj["usage"]
        for ch in obj.get("choices") or []:
            text = (ch.get("delta") or {}).get("content") or ch.get("text")
            if text:
                state["chunks"] += 1
                if state["t_first"] is None:
                    state["t_first"] = time.perf_counter()
            if ch.get("finish_reason"):
                state["finish"] = ch["finish_reason"]
        return True

    def stream(self, client: httpx.Client, i: int) -> dict:
        """One streamed chat, read as lightly as a client can: the chunks are parsed as they come
        only up to the first with content (its time is the time to first token); the rest are
        kept as bytes and parsed once the stream has ended. The bench shares the machine's cores
        with the server, and a client that parses every chunk as it arrives (`astream`) used
        880-906 µs of CPU a token on 2 cores (this one 333-390), taken from the server's
        decoding; a client elsewhere takes none."""
        state = {"usage": None, "chunks": 0, "t_first": None, "finish": None}
        t0 = time.perf_counter()
        with client.stream("POST", f"{self.base}/v1/chat/completions", json=self.body(i, True), timeout=self.timeout) as r:
            if r.status_code != 200:
                r.read()
                raise RuntimeError(f"HTTP {r.status_code}: {r.text[:300]}")
            pending, rest = b"", []
            for data in r.iter_bytes():
                if state["t_first"] is None:
                    *lines, pending = (pending + data).split(b"\n")
                    for line in lines:
                        self.parse_line(line.decode(), state)
                else:
                    rest.append(data)
            t_end = time.perf_counter()
        for line in (pending + b"".join(rest)).split(b"\n"):
            self.parse_line(line.decode(), state)
        return self._stream_result(t0, state["t_first"], t_end, state["usage"], state["finish"], state["chunks"])

    async def astream(self, client: httpx.AsyncClient, i: int) -> dict:
        state = {"usage": None, "chunks": 0, "t_first": None, "finish": None}
        t0 = time.perf_counter()
        async with client.stream("POST", f"{self.base}/v1/chat/completions", json=self.body(i, True)) as r:
            if r.status_code != 200:
                await r.aread()
                raise RuntimeError(f"HTTP {r.status_code}: {r.text[:300]}")
            async for line in r.aiter_lines():
                if not self.parse_line(line, state):
                    break
        return self._stream_result(t0, state["t_first"], time.perf_counter(), state["usage"], state["finish"], state["chunks"])

    async def clients(self, n: int, rounds: int, first_index: int) -> dict:
        """n concurrent streaming clients, each sending `rounds` requests back to back."""
        limits = httpx.Limits(max_connections=n + 2, max_keepalive_connections=n + 2)
        async with httpx.AsyncClient(timeout=self.timeout, limits=limits) as client:
            async def one(c):
                return [await self.astream(client, first_index + c + r * n) for r in range(rounds)]

            cpu0 = time.process_time()
            tasks = [asyncio.ensure_future(one(c)) for c in range(n)]
            try:
                per_client = await asyncio.wait_for(asyncio.gather(*tasks), self.args.timeout * rounds * max(1, n) + 30)
            except BaseException:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise
            cpu = time.process_time() - cpu0
        runs = [r for rs in per_client for r in rs]
        wall = max(r["t_end"] for r in runs) - min(r["t0"] for r in runs)
        tokens = sum(r["tokens"] or 0 for r in runs)
        ttfts = [r["ttft_s"] for r in runs if r["ttft_s"] is not None]
        return {"clients": n, "requests": len(runs), "wall_s": wall, "tokens": tokens, "agg_tps": tokens / wall,
                "ttft_mean_s": statistics.mean(ttfts) if ttfts else None, "ttft_max_s": max(ttfts) if ttfts else None,
                "per_request_tps_mean": statistics.mean(r["tps"] for r in runs if r["tps"]),
                "bench_client_cpu_s": cpu,
                "runs": [{k: v for k, v in r.items() if k not in ("t0", "t_end")} for r in runs]}

    def models_rps(self, seconds: float) -> dict:
        n, errors = 0, 0
        with httpx.Client(timeout=self.timeout) as client:
            client.get(f"{self.base}/v1/models")  # connect
            t0 = time.perf_counter()
            end = t0 + seconds
            while time.perf_counter() < end and n + errors < 1_000_000:
                if client.get(f"{self.base}/v1/models").status_code == 200:
                    n += 1
                else:
                    errors += 1
            wall = time.perf_counter() - t0
        return {"rps": n / wall, "requests": n, "errors": errors, "seconds": wall}


def asked_again_if_dropped(name: str, ask: Callable[[], dict]) -> dict:
    """ask(); if the server dropped the connection without answering, say so and ask once more.
    llama-server did, twice in some thousand requests on 2026-12-01 (`split`, `threadtime`),
    on a new connection; gguf-serve's log had every request answered."""
    try:
        return ask()
    except httpx.RemoteProtocolError as e:
        print(f"   {name} dropped the connection ({e}); asking again", flush=True)
        return ask()


def poll(proc: subprocess.Popen, t_spawn: float, timeout: float, log: Path, what: str, client: httpx.Client,
         ask: Callable[[httpx.Client], httpx.Response], again: Callable[[int], bool] = lambda status: True,
         done: Callable[[httpx.Response], bool] = lambda r: r.status_code == 200,
         interval: float = 0.02) -> tuple[float, httpx.Response]:
    """`ask` every `interval` until `done` takes its answer (by default a 200), again after a
    connection error or a status `again` accepts: seconds from spawn to that answer, and the
    answer. `client` is the caller's, so that making one is not timed."""
    deadline, last = t_spawn + timeout, "no answer"
    while time.perf_counter() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with {proc.returncode} before it was ready:\n{tail(log)}")
        try:
            r = ask(client)
            if done(r):
                return time.perf_counter() - t_spawn, r
            last = f"HTTP {r.status_code} {r.text[:200]}"
        except httpx.HTTPError as e:
            last = f"{type(e).__name__}"
        else:
            if not again(r.status_code):
                raise RuntimeError(f"{what}: {last}")
        time.sleep(interval)
    raise RuntimeError(f"not ready after {timeout:.0f} s (last {what}: {last}); log:\n{tail(log)}")


def wait_ready(proc: subprocess.Popen, base: str, t_spawn: float, timeout: float, log: Path) -> tuple[float, str]:
    """Seconds from spawn to the first 200 from GET /v1/models, and the model id it lists."""
    with httpx.Client(timeout=2) as client:
        seconds, r = poll(proc, t_spawn, timeout, log, "GET /v1/models", client, lambda c: c.get(f"{base}/v1/models"))
    return seconds, r.json()["data"][0]["id"]


def warm_stream(b: Bench, client: httpx.Client, result: dict) -> None:
    """A streaming warm-up request (page in the weights, first allocations); also tells whether the
    server accepts stream_options (if not, streams are counted from finish_reason or chunks)."""
    try:
        b.stream(client, 10_001)
    except RuntimeError as e:
        if "HTTP 4" not in str(e):
            raise
        b.usage_in_stream = False
        result["note_stream_options"] = f"refused stream_options ({str(e)[:120]}); streams counted otherwise"
        b.stream(client, 10_001)


