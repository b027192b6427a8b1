"""The same generation through /v1/messages (Anthropic's API) and /v1/chat/completions, streamed
and not: tokens/s of each, side by side, written to bench/results/messages.json.

    python -m bench.messages                      # starts one gguf-serve (granian, SmolLM2), 5 rounds
    python -m bench.messages --rounds 9 --max-tokens 256
    python -m bench.messages --url http://127.0.0.1:8000 --model smollm2-135m-instruct

Measured as bench/responses.py measures /v1/responses: each request one user message unique to
its round, temperature 0, the same max_tokens, both APIs rendering it through the same template
(so both generate the same tokens: the counts are printed); each round runs the four kinds back
to back in an order that rotates from round to round; tok/s is completion tokens / the request's
wall time (a stream's to its last event), TTFT to the first event carrying text; medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import httpx

from bench.responses import PROMPT, start_server

RESULTS = Path(__file__).resolve().parent / "results" / "messages.json"
KINDS = ("chat", "messages", "chat stream", "messages stream")


def body(kind: str, model: str, i: int, max_tokens: int) -> tuple[str, dict]:
    stream = kind.endswith("stream")
    payload = {"model": model, "messages": [{"role": "user", "content": PROMPT.format(i=i)}], "temperature": 0,
               "max_tokens": max_tokens, "stream": stream}
    if kind.startswith("chat"):
        return "/v1/chat/completions", {**payload, **({"stream_options": {"include_usage": True}} if stream else {})}
    return "/v1/messages", payload


def completion_tokens(kind: str, usage: dict) -> int:
    return usage["completion_tokens"] if kind.startswith("chat") else usage["output_tokens"]


def streamed_text(event: dict) -> str | None:
    if event.get("type") == "content_block_delta":
        return event["delta"].get("text")
    return event["choices"][0]["delta"].get("content") if event.get("choices") else None


def measure(client: httpx.Client, url: str, kind: str, model: str, i: int, max_tokens: int) -> dict:
    """One request: its completion tokens, wall time and (streamed) time to first text."""
    path, payload = body(kind, model, i, max_tokens)
    started = time.perf_counter()
    if not payload["stream"]:
        r = client.post(url + path, json=payload)
        r.raise_for_status()
        return {"tokens": completion_tokens(kind, r.json()["usage"]), "seconds": time.perf_counter() - started, "ttft": None}
    first, usage = None, None
    with client.stream("POST", url + path, json=payload) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if first is None and streamed_text(event):
                first = time.perf_counter() - started
            usage = event.get("usage") or usage  # chat's last chunk; Anthropic's message_delta
    return {"tokens": completion_tokens(kind, usage), "seconds": time.perf_counter() - started, "ttft": first}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.messages", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running gguf-serve (default: start one)")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args(argv)
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
    result = {"rounds": args.rounds, "max_tokens": args.max_tokens, "kinds": {}}
    print(f"{args.rounds} rounds, {args.max_tokens} max tokens, temperature 0; medians")
    print(f"{'':18}{'tok/s':>8}{'TTFT s':>8}  tokens per request")
    for kind, ms in runs.items():
        ttft = [m["ttft"] for m in ms if m["ttft"] is not None]
        rate = statistics.median(m["tokens"] / m["seconds"] for m in ms)
        result["kinds"][kind] = {"tok_s": rate, "ttft_s": statistics.median(ttft) if ttft else None,
                                 "tokens": sorted({m["tokens"] for m in ms})}
        shown = f"{result['kinds'][kind]['ttft_s']:8.3f}" if ttft else f"{'':8}"
        print(f"{kind:18}{rate:8.1f}{shown}  {result['kinds'][kind]['tokens']}")
    for mode in ("", " stream"):
        ratio = result["kinds"]["messages" + mode]["tok_s"] / result["kinds"]["chat" + mode]["tok_s"]
        result[f"messages / chat{mode}"] = ratio
        print(f"messages / chat{mode}: {ratio:.3f}")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
