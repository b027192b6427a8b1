#!/usr/bin/env python3
"""The same generation through /v1/responses and /v1/chat/completions, streamed and not:
tokens/s of each, side by side.

    python bench/responses.py                     # starts one gguf-serve (granian, SmolLM2), 5 rounds
    python bench/responses.py --rounds 9 --max-tokens 256
    python bench/responses.py --url http://127.0.0.1:8000 --model smollm2-135m-instruct

Every request is one user message, unique to its round (so that no answer comes from a cached
whole prompt), at temperature 0 with `max_tokens` / `max_output_tokens` the same; both APIs
render it through the same template, so both generate the same tokens (checked: the token
counts are printed). Each round runs the four kinds back to back, in an order that rotates from
round to round, so that a host drifting in speed weighs on all of them alike. tok/s is
completion tokens / the request's wall time (for a stream, from sending it to its last event);
TTFT is to the first event carrying text. Medians over the rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "Request {i}: write a long story about a dragon who learns to bake bread."
KINDS = ("chat", "responses", "chat stream", "responses stream")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "granian", "--interface", "asgi", "--host", "127.0.0.1", "--port", str(port), "service:app"],
        cwd=ROOT, env={**os.environ, "N_THREADS": str(threads)}, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            sys.exit(f"gguf-serve exited {proc.returncode}:\n{log.read()}")
        try:
            if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    sys.exit("gguf-serve was not ready within 120 s")


def body(kind: str, model: str, i: int, max_tokens: int) -> tuple[str, dict]:
    text = PROMPT.format(i=i)
    stream = kind.endswith("stream")
    if kind.startswith("chat"):
        return "/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": text}], "temperature": 0,
                                        "max_tokens": max_tokens, "stream": stream,
                                        **({"stream_options": {"include_usage": True}} if stream else {})}
    return "/v1/responses", {"model": model, "input": text, "temperature": 0, "max_output_tokens": max_tokens,
                             "stream": stream, "store": False}


def completion_tokens(kind: str, answer: dict) -> int:
    usage = answer["usage"]
    return usage["completion_tokens"] if kind.startswith("chat") else usage["output_tokens"]


def measure(client: httpx.Client, url: str, kind: str, model: str, i: int, max_tokens: int) -> dict:
    """One request: its completion tokens, wall time and (streamed) time to first text."""
    path, payload = body(kind, model, i, max_tokens)
    started = time.perf_counter()
    if not payload["stream"]:
        r = client.post(url + path, json=payload)
        r.raise_for_status()
        return {"tokens": completion_tokens(kind, r.json()), "seconds": time.perf_counter() - started, "ttft": None}
    first, final = None, None
    with client.stream("POST", url + path, json=payload) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            text = (event.get("delta") if event.get("type") == "response.output_text.delta"
                    else event["choices"][0]["delta"].get("content") if event.get("choices") else None)
            if text and first is None:
                first = time.perf_counter() - started
            if event.get("usage"):
                final = event  # chat's last chunk
            elif event.get("type") in ("response.completed", "response.incomplete"):
                final = event["response"]
    return {"tokens": completion_tokens(kind, final), "seconds": time.perf_counter() - started, "ttft": first}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running gguf-serve (default: start one)")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args()
    proc, url = (None, args.url.rstrip("/")) if args.url else start_server(args.threads)
    try:
        runs: dict[str, list[dict]] = {kind: [] for kind in KINDS}
        with httpx.Client(timeout=600) as client:
            measure(client, url, "chat", args.model, -1, 8)  # warm-up
            for r in range(args.rounds):
                for k in range(len(KINDS)):
                    kind = KINDS[(r + k) % len(KINDS)]
                    runs[kind].append(measure(client, url, kind, args.model, r, args.max_tokens))
    finally:
        if proc:
            proc.terminate()
            proc.wait(15)
    rate = {kind: statistics.median(m["tokens"] / m["seconds"] for m in ms) for kind, ms in runs.items()}
    print(f"{args.rounds} rounds, {args.max_tokens} max tokens, temperature 0; medians")
    print(f"{'':18}{'tok/s':>8}{'TTFT s':>8}  tokens per request")
    for kind, ms in runs.items():
        ttft = [m["ttft"] for m in ms if m["ttft"] is not None]
        shown = f"{statistics.median(ttft):8.3f}" if ttft else f"{'':8}"
        print(f"{kind:18}{rate[kind]:8.1f}{shown}  {sorted({m['tokens'] for m in ms})}")
    for mode in ("", " stream"):
        print(f"responses / chat{mode}: {rate['responses' + mode] / rate['chat' + mode]:.3f}")


if __name__ == "__main__":
    main()
