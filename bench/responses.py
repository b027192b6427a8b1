"""The same generation through /v1/responses (or Anthropic's /v1/messages: `python -m bench
messages`) and /v1/chat/completions, streamed and not: tokens/s of each, side by side.

    python -m bench responses                     # starts one gguf-serve (granian, SmolLM2), 5 rounds
    python -m bench responses --rounds 9 --max-tokens 256
    python -m bench responses --url http://127.0.0.1:8000     # a gguf-serve already running
    python -m bench messages                      # the same for /v1/messages

Every request is one user message, unique to its round (so that no answer comes from a cached
whole prompt), at temperature 0 with `max_tokens` / `max_output_tokens` the same; both APIs
render it through the same template, so both generate the same tokens (checked: the token
counts are printed). Each round runs the four kinds back to back, in an order that rotates from
round to round, so that a host drifting in speed weighs on all of them alike. tok/s is
completion tokens / the request's wall time (for a stream, from sending it to its last event);
TTFT is to the first event carrying text. Medians over the rounds, printed and written to the
results file (default bench/results/<subcommand>.json).
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from bench.machine import bench_arguments, default_model, write_results
from bench.procs import kill_all
from bench.servers import gguf_serve_command, launch, server_arguments

PROMPT = "Request {i}: write a long story about a dragon who learns to bake bread."


def body(kind: str, model: str, i: int, max_tokens: int) -> tuple[str, dict]:
    """The request of one kind: "chat", "responses" or "messages", each also " stream"."""
    text, stream = PROMPT.format(i=i), kind.endswith("stream")
    if kind.startswith("responses"):
        return "/v1/responses", {"model": model, "input": text, "temperature": 0, "max_output_tokens": max_tokens,
                                 "stream": stream, "store": False}
    payload = {"model": model, "messages": [{"role": "user", "content": text}], "temperature": 0,
               "max_tokens": max_tokens, "stream": stream}
    if kind.startswith("messages"):
        return "/v1/messages", payload
    return "/v1/chat/completions", {**payload, **({"stream_options": {"include_usage": True}} if stream else {})}


def streamed(event: dict) -> tuple[str | None, int | None]:
    """A streamed event's text, and the completion tokens if it carries the final count."""
    kind = event.get("type")
    if kind == "response.output_text.delta":
        return event["delta"], None
    if kind in ("response.completed", "response.incomplete"):
        return None, event["response"]["usage"]["output_tokens"]
    if kind == "content_block_delta":
        return event["delta"].get("text"), None
    if kind == "message_delta":
        return None, event["usage"]["output_tokens"]
    if event.get("usage"):  # chat's last chunk
        return None, event["usage"]["completion_tokens"]
    return (event["choices"][0]["delta"].get("content") if event.get("choices") else None), None


def measure(client: httpx.Client, url: str, kind: str, model: str, i: int, max_tokens: int) -> dict:
    """One request: its completion tokens, wall time and (streamed) time to first text."""
    path, payload = body(kind, model, i, max_tokens)
    started = time.perf_counter()
    if not payload["stream"]:
        r = client.post(url + path, json=payload)
        r.raise_for_status()
        usage = r.json()["usage"]
        return {"tokens": usage.get("completion_tokens", usage.get("output_tokens")), "seconds": time.perf_counter() - started,
                "ttft": None}
    first, tokens = None, None
    with client.stream("POST", url + path, json=payload) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            text, count = streamed(json.loads(line[6:]))
            if text and first is None:
                first = time.perf_counter() - started
            tokens = count or tokens
    return {"tokens": tokens, "seconds": time.perf_counter() - started, "ttft": first}


def main(argv: list[str], api: str = "responses") -> None:
    """`api` ("responses" or "messages") against chat."""
    kinds = ("chat", api, "chat stream", f"{api} stream")
    ap = bench_arguments(api, __doc__)
    server_arguments(ap, llama_server=False)
    ap.add_argument("--url", help="a running gguf-serve to measure (default: start one)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--max-tokens", type=int, default=128)
    args = ap.parse_args(argv)
    try:
        if args.url:
            url = args.url.rstrip("/")
            model = httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["id"]
        else:
            args.model = (args.model or default_model()).resolve()
            logdir = Path(tempfile.mkdtemp(prefix=f"gguf-serve-{api}-"))
            _, b = launch("gguf-serve", *gguf_serve_command(args), args, [], logdir, {})
            url, model = b.base, b.model_id
        runs: dict[str, list[dict]] = {kind: [] for kind in kinds}
        with httpx.Client(timeout=args.timeout) as client:
            measure(client, url, "chat", model, -1, 8)  # warm-up
            for r in range(args.rounds):
                for k in range(len(kinds)):
                    kind = kinds[(r + k) % len(kinds)]
                    runs[kind].append(measure(client, url, kind, model, r, args.max_tokens))
    finally:
        kill_all()
    figures = {}
    print(f"{args.rounds} rounds, {args.max_tokens} max tokens, temperature 0; medians")
    print(f"{'':18}{'tok/s':>8}{'TTFT s':>8}  tokens per request")
    for kind, ms in runs.items():
        ttft = [m["ttft"] for m in ms if m["ttft"] is not None]
        figures[kind] = {"tok_s": statistics.median(m["tokens"] / m["seconds"] for m in ms),
                         "ttft_s": statistics.median(ttft) if ttft else None, "tokens": sorted({m["tokens"] for m in ms})}
        shown = f"{figures[kind]['ttft_s']:8.3f}" if ttft else f"{'':8}"
        print(f"{kind:18}{figures[kind]['tok_s']:8.1f}{shown}  {figures[kind]['tokens']}")
    for mode in ("", " stream"):
        figures[f"{api} / chat{mode}"] = figures[api + mode]["tok_s"] / figures["chat" + mode]["tok_s"]
        print(f"{api} / chat{mode}: {figures[f'{api} / chat{mode}']:.3f}")
    write_results(args, figures, runs=runs)
