"""Multi-turn conversations, and a long prompt, on gguf-serve and llama-server -np 4 side by side.

    python -m bench multiturn                    # 8 and 2 conversations x 6 turns on 4 slots, the 8 through
                                                 # a fleet of 2, then a 6k-token prompt
    python -m bench multiturn --conversations 8 --turns 4 --long-prompt 0

Agents and chat apps send a conversation's whole history every turn (issue #36). Both servers
are started side by side (gguf-serve PARALLEL=--parallel, its prompt cache as configured, by
default PROMPT_CACHE_MIB's default; llama-server -np --parallel with its prompt cache as it
ships, --cache-ram's default). For each number of conversations C in --conversations, each server
in turn (alternating which goes first) runs C conversations at once, each of --turns turns: a
~--system-tokens-token system prompt shared by all of them (new each run, so nothing is cached
before it), then each turn appends a new user message, the server's greedy answer of
--max-tokens tokens (end of generation banned) and, next turn, the next user message. Per run:

  cached share   prompt tokens whose KV was reused rather than computed, over all prompt tokens
                 (gguf-serve: usage.prompt_tokens_details.cached_tokens; llama-server:
                 timings.cache_n, its own count), and the same over turns 2.. only
  wall time      from the first request to the last answer, and its ratio gguf-serve / llama-server
  TTFT           each turn's time to first token, the median over conversations, turn by turn
  memory         gguf-serve's resident memory (VmRSS of its process tree, /proc/<pid>/status) once
                 every conversation has finished turn 3, and its peak (VmHWM) at the end, with the
                 prompt cache's bytes and bound (gguf_prompt_cache_* from /metrics): the peak
                 should stay within the turn-3 footprint plus the bound, however full the cache

--fleet N (0: skipped) then runs the largest number of conversations once more through N
gguf-serve instances behind deploy/nginx.conf (conversation affinity, deploy/fleet.js), each
with --parallel/N slots and --threads/N threads: the same figures, to set beside one instance's.

--long-prompt N (0: skipped) then starts a second pair with a context per sequence large enough
for it (--long-ctx) and, in --long-rounds rounds alternating which server goes first, sends each
a new ~N-token prompt asking for one token, alone and while --beside other streams decode:
prompt tokens/s (prompt tokens over the client's time to first token), its ratio gguf-serve /
llama-server, and the other streams' tokens/s meanwhile (what computing the prompt costs them).
Every figure goes to the results file (default bench/results/multiturn.json). Every request has
a timeout and every loop is bounded.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from bench.machine import bench_arguments, versions, write_results
from bench.procs import kill_all, peak_rss, rss_mib, wait_idle
from bench.report import table
from bench.servers import server_arguments, start_fleet, start_side_by_side

RULES = [
    "Answer the question that was asked, and only that question, in plain words.",
    "When a step can fail, say how the user will know that it failed and what to do next.",
    "Prefer short sentences; a reader on a phone should not need to scroll sideways.",
    "Name every file, command and setting exactly as the user would type it.",
    "If the user's request is ambiguous, state the reading you chose before you answer.",
    "Never invent a version number, a price, a date or a quotation.",
    "Keep the user's own terms for things, even when a more common term exists.",
    "When you give numbers, give their units, and round them to what the reader needs.",
    "Put warnings before the step they concern, not after it.",
    "Do not repeat the question back to the user before answering it.",
]
QUESTIONS = [
    "How do I make bread rise faster in a cold kitchen?",
    "What should I pack for a three-day hike in the mountains?",
    "Why does my bicycle chain keep slipping on the small gears?",
    "How can I keep basil alive on a windowsill through the winter?",
    "What is a good way to learn the names of the stars?",
    "How do I fix a dripping tap without calling a plumber?",
    "What makes a good first chapter of a novel?",
    "How should I plan a garden that attracts bees?",
    "Can you say that again more briefly?",
    "What would you do differently if it were raining?",
]
# What a user adds to a question when --user-tokens asks for a longer message (an agent's tool
# output, a pasted file): about 16 tokens each.
CONTEXT = ["Here is what I have tried so far, in the order I tried it.", "The kitchen is cold in the morning and warm at night.",
           "I have about an hour each evening and a small budget.", "My neighbour suggested something else, but it did not work.",
           "The instructions I found online disagree with each other.", "I would rather not buy new tools for this."]
STORY = "The keeper climbed the stairs of the lighthouse at dusk and lit the great lamp for the ships. "


def system_prompt(run: int, tokens: int) -> str:
    """A long system prompt, new for each run (its first words name the run, so nothing of it is
    cached before the run): numbered rules, about 23 tokens each with SmolLM2's vocabulary."""
    lines = [f"You are the assistant of run {run}. Follow these house rules in every answer."]
    for k in range(max(1, tokens // 23)):
        lines.append(f"Rule {k + 1}: {RULES[k % len(RULES)]}")
    return "\n".join(lines)


async def chat(client: httpx.AsyncClient, body: dict, stop: asyncio.Event | None = None,
               stamps: list[float] | None = None) -> dict:
    """One streamed chat request: its time to first token, the answer's text, the usage and
    llama-server's timings. Read lightly (as client.Bench.stream: lines parsed as they come only
    up to the first content, the rest once the stream has ended), unless `stamps` asks for each
    chunk's arrival; `stop` set ends it early (the connection is closed: both servers cancel)."""
    t0 = time.perf_counter()
    t_first, pending, rest, text, last = None, b"", [], [], {}
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for data in r.aiter_bytes():
            if stamps is not None:
                stamps.extend([time.perf_counter()] * data.count(b'"content":"'))
            if t_first is None:
                *lines, pending = (pending + data).split(b"\n")
                for line in lines:
                    if _parse(line, text, last) and t_first is None:
                        t_first = time.perf_counter()
            else:
                rest.append(data)
            if stop is not None and stop.is_set():
                break
    t_end = time.perf_counter()
    for line in (pending + b"".join(rest)).split(b"\n"):
        _parse(line, text, last)
    usage, timings = last.get("usage") or {}, last.get("timings") or {}
    prompt = usage.get("prompt_tokens")
    if "cache_n" in timings:  # llama-server's own count of the prompt tokens it did not compute
        cached = timings["cache_n"]
    else:
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens")
    return {"ttft_s": None if t_first is None else t_first - t0, "wall_s": t_end - t0, "text": "".join(text),
            "prompt_tokens": prompt, "cached_tokens": cached, "completion_tokens": usage.get("completion_tokens"),
            "finish_reason": last.get("finish_reason")}


def _parse(line: bytes, text: list[str], last: dict) -> bool:
    """One SSE line: its content into `text`, usage, timings and finish_reason into `last`; True if it had content."""
    line = line.strip()
    if not line.startswith(b"data:") or line[5:].strip() == b"[DONE]":
        return False
    obj = json.loads(line[5:])
    if "error" in obj and not obj.get("choices"):
        raise RuntimeError(f"error in stream: {str(obj['error'])[:300]}")
    for key in ("usage", "timings"):
        if obj.get(key):
            last[key] = obj[key]
    content = False
    for ch in obj.get("choices") or []:
        piece = (ch.get("delta") or {}).get("content")
        if piece:
            text.append(piece)
            content = True
        if ch.get("finish_reason"):
            last["finish_reason"] = ch["finish_reason"]
    return content


def body(b, messages: list[dict], max_tokens: int, usage: bool = True) -> dict:
    out = {"model": b.model_id, "messages": messages, "max_tokens": max_tokens, "temperature": 0,
           "repeat_penalty": 1.0, "logit_bias": b.bias, "stream": True}
    if usage:
        out["stream_options"] = {"include_usage": True}
    return out


async def metric(client: httpx.AsyncClient, names: tuple[str, ...]) -> dict[str, float]:
    """Gauges and counters from gguf-serve's /metrics."""
    r = await client.get("/metrics")
    out = {}
    for line in r.text.splitlines():
        name, _, value = line.partition(" ")
        if name in names:
            out[name] = float(value)
    return out


CACHE_METRICS = ("gguf_prompt_cache_bytes", "gguf_prompt_cache_max_bytes", "gguf_prompt_cache_entries",
                 "gguf_prompt_cache_hits_total", "gguf_prompt_cache_evictions_total", "gguf_prompt_cache_restored_tokens_total")


async def conversations(name: str, b, pid: int, args, conv: int, run: int) -> dict:
    """`conv` conversations at once, --turns turns each, on one server: every turn's figures, the
    run's wall time, and (gguf-serve) its memory at turn 3 and at the end."""
    system = system_prompt(run, args.system_tokens)
    done_turn3, memory = asyncio.Event(), {}
    finished = [0] * (args.turns + 1)  # conversations that have finished each turn
    limits = httpx.Limits(max_connections=conv + 4, max_keepalive_connections=conv + 4)
    async with httpx.AsyncClient(base_url=b.base, timeout=args.timeout, limits=limits) as client:
        async def one(c: int) -> list[dict]:
            messages, turns = [{"role": "system", "content": system}], []
            for t in range(1, args.turns + 1):
                context = " ".join(CONTEXT[(c + t + k) % len(CONTEXT)] for k in range(max(0, args.user_tokens - 25) // 16))
                messages.append({"role": "user", "content": f"(Conversation {c + 1}, turn {t}.) {context} "
                                 + QUESTIONS[(c + t) % len(QUESTIONS)]})
                try:
                    r = await chat(client, body(b, messages, args.max_tokens))
                except httpx.RemoteProtocolError:  # a kept-alive connection the server had closed: once more
                    r = await chat(client, body(b, messages, args.max_tokens))
                if r["completion_tokens"] != args.max_tokens:
                    raise RuntimeError(f"{name}: {r['completion_tokens']} tokens, not {args.max_tokens} "
                                       f"(finish_reason {r['finish_reason']})")
                messages.append({"role": "assistant", "content": r.pop("text")})
                turns.append({"conversation": c + 1, "turn": t, **r})
                finished[t] += 1
                if t == min(3, args.turns) and finished[t] == conv:
                    done_turn3.set()
            return turns

        async def at_turn3() -> None:
            await done_turn3.wait()
            memory["rss_turn3_mib"] = rss_mib(pid)
            if name == "gguf-serve":
                memory.update({f"turn3 {k}": v for k, v in (await metric(client, CACHE_METRICS)).items()})

        t0 = time.perf_counter()
        watcher = asyncio.ensure_future(at_turn3())
        try:
            per_conv = await asyncio.wait_for(asyncio.gather(*(one(c) for c in range(conv))),
                                              args.timeout * args.turns + 60)
            wall = time.perf_counter() - t0
            await asyncio.wait_for(watcher, 30)
        finally:
            watcher.cancel()
        memory["rss_end_mib"] = rss_mib(pid)
        memory["peak_rss_mib"] = peak_rss(pid)["total_mb"]  # VmHWM: since the server started
        if name == "gguf-serve":
            memory.update(await metric(client, CACHE_METRICS))
    turns = [t for ts in per_conv for t in ts]
    prompt = sum(t["prompt_tokens"] for t in turns)
    later = [t for t in turns if t["turn"] > 1]
    ttft_by_turn = [statistics.median(t["ttft_s"] for t in turns if t["turn"] == k) for k in range(1, args.turns + 1)]
    return {"conversations": conv, "turns_each": args.turns, "wall_s": wall, "prompt_tokens": prompt,
            "cached_tokens": sum(t["cached_tokens"] for t in turns),
            "cached_share": sum(t["cached_tokens"] for t in turns) / prompt,
            "cached_share_turns_2_on": sum(t["cached_tokens"] for t in later) / max(1, sum(t["prompt_tokens"] for t in later)),
            "ttft_median_s_by_turn": ttft_by_turn, "ttft_mean_s": statistics.mean(t["ttft_s"] for t in turns),
            "memory": memory, "turns": turns}


async def long_prompt(b, args, i: int, beside: int) -> dict:
    """A new ~args.long_prompt-token prompt asking for one token, while `beside` other streams
    decode (each has its first token before the prompt is sent; they are stopped once it has its
    answer): its prompt tokens/s by the client's clock, and the other streams' tokens/s meanwhile."""
    text = f"(Round {i}, {beside} beside.) " + STORY * (args.long_prompt // 20) + "\nWhat did the keeper do?"
    limits = httpx.Limits(max_connections=beside + 4, max_keepalive_connections=beside + 4)
    async with httpx.AsyncClient(base_url=b.base, timeout=args.timeout, limits=limits) as client:
        stop, stamps = asyncio.Event(), [[] for _ in range(beside)]
        others = [asyncio.ensure_future(chat(client, body(b, [{"role": "user", "content": f"(Round {i}, stream {k}.) "
                                                              "Tell me a very long story about the sea."}],
                                                          args.long_ctx - 64, usage=False), stop, stamps[k]))
                  for k in range(beside)]
        try:
            for _ in range(int(args.timeout * 100)):
                if all(stamps) or any(o.done() for o in others):
                    break
                await asyncio.sleep(0.01)
            t_sent = time.perf_counter()
            r = await asyncio.wait_for(chat(client, body(b, [{"role": "user", "content": text}], 1)), args.timeout)
            t_answer = t_sent + r["ttft_s"]
        finally:
            stop.set()
            await asyncio.gather(*others, return_exceptions=True)
    meanwhile = [sum(t_sent < s <= t_answer for s in st) for st in stamps]
    return {"prompt_tokens": r["prompt_tokens"], "ttft_s": r["ttft_s"], "prompt_tps": r["prompt_tokens"] / r["ttft_s"],
            "beside_streams": beside, "beside_tps": [n / r["ttft_s"] for n in meanwhile],
            "beside_longest_pause_s": max((b2 - a for st in stamps for a, b2 in zip(st, st[1:]) if b2 > t_sent), default=None)}


async def warm(b, args) -> None:
    async with httpx.AsyncClient(base_url=b.base, timeout=args.timeout) as client:
        await chat(client, body(b, [{"role": "user", "content": "Hello."}], 4))


def side_by_side(servers: dict, order_key: int, run) -> dict[str, dict]:
    """run(name, b, pid) on each server, alternating which goes first with order_key."""
    names = list(servers) if order_key % 2 == 0 else list(servers)[::-1]
    out = {}
    for name in names:
        proc, b = servers[name]
        out[name] = run(name, b, proc.pid)
    return {name: out[name] for name in servers}


def multiturn_part(args, logdir: Path) -> dict:
    servers = start_side_by_side(args, logdir)
    figures, run = {}, 0
    try:
        for _, b in servers.values():  # warm-up: page in the weights, first allocations
            asyncio.run(warm(b, args))
        for k, conv in enumerate(args.conversations):
            for rep in range(args.rounds):
                def one(name, b, pid):
                    nonlocal run
                    run += 1
                    wait_idle(args.wait_idle)
                    r = asyncio.run(conversations(name, b, pid, args, conv, run))
                    print(f"   {name:12s} {conv} conversations x {args.turns} turns: cached share {r['cached_share']:.3f} "
                          f"({r['cached_tokens']}/{r['prompt_tokens']}), wall {r['wall_s']:.1f} s, TTFT by turn "
                          + " ".join(f"{x:.2f}" for x in r["ttft_median_s_by_turn"]), flush=True)
                    return r
                pair = side_by_side(servers, k + rep, one)
                g, s = pair["gguf-serve"], pair["llama-server"]
                pair["wall_ratio"] = g["wall_s"] / s["wall_s"]
                print(f"   {conv} conversations: wall time gguf-serve / llama-server {pair['wall_ratio']:.2f}", flush=True)
                figures.setdefault(f"{conv} conversations", []).append(pair)
    finally:
        kill_all()
    return figures


def fleet_part(args, logdir: Path) -> dict:
    """The largest number of conversations again, through --fleet instances behind nginx that
    share one instance's slots and threads: each conversation's turns must land where its prefix is."""
    logdir.mkdir()
    slots, threads = max(1, args.parallel // args.fleet), max(1, args.threads // args.fleet)
    procs, b = start_fleet(args, logdir, args.fleet, slots, threads)
    conv = max(args.conversations)
    try:
        asyncio.run(warm(b, args))
        wait_idle(args.wait_idle)
        r = asyncio.run(conversations("fleet", b, procs[0].pid, args, conv, 0))
    finally:
        kill_all()
    print(f"   {args.fleet} instances behind nginx, {conv} conversations x {args.turns} turns: cached share "
          f"{r['cached_share']:.3f} ({r['cached_tokens']}/{r['prompt_tokens']}), wall {r['wall_s']:.1f} s", flush=True)
    return {"instances": args.fleet, "slots_each": slots, "threads_each": threads, f"{conv} conversations": r}


def long_prompt_part(args, logdir: Path) -> dict:
    args.ctx = args.long_ctx
    logdir.mkdir()
    servers = start_side_by_side(args, logdir)
    rounds = []
    try:
        for i in range(args.long_rounds):
            for beside in (0, args.beside):
                def one(name, b, pid):
                    wait_idle(args.wait_idle)
                    r = asyncio.run(long_prompt(b, args, i, beside))
                    print(f"   {name:12s} {r['prompt_tokens']}-token prompt, {beside} streams beside: {r['prompt_tps']:.1f} "
                          f"prompt tok/s (first token {r['ttft_s']:.1f} s)"
                          + (f"; the others {statistics.mean(r['beside_tps']):.1f} tok/s each meanwhile, longest pause "
                             f"{r['beside_longest_pause_s']:.2f} s" if beside else ""), flush=True)
                    return r
                pair = side_by_side(servers, i, one)
                pair["prompt_tps_ratio"] = pair["gguf-serve"]["prompt_tps"] / pair["llama-server"]["prompt_tps"]
                rounds.append(pair)
    finally:
        kill_all()
    return {"rounds": rounds}


def main(argv: list[str]) -> None:
    ap = bench_arguments("multiturn", __doc__)
    server_arguments(ap, wait_idle=10)
    ap.add_argument("--conversations", default="8,2", help="numbers of conversations at once, one run each (default 8,2)")
    ap.add_argument("--turns", type=int, default=6, help="turns of each conversation (default 6)")
    ap.add_argument("--max-tokens", type=int, default=48, help="each answer's tokens (default 48)")
    ap.add_argument("--system-tokens", type=int, default=1000, help="the shared system prompt's length, about (default 1000)")
    ap.add_argument("--user-tokens", type=int, default=25, help="each user message's length, about (default 25: a question)")
    ap.add_argument("--rounds", type=int, default=1, help="runs of each number of conversations on each server (default 1)")
    ap.add_argument("--fleet", type=int, default=2, help="then the most conversations through this many gguf-serve "
                    "instances behind nginx, --parallel slots and --threads between them (default 2; 0: skipped)")
    ap.add_argument("--long-prompt", type=int, default=6000, help="the long prompt's tokens, about (default 6000; 0: skipped)")
    ap.add_argument("--long-ctx", type=int, default=8192, help="context per sequence for the long prompt (default 8192)")
    ap.add_argument("--long-rounds", type=int, default=2, help="rounds of the long prompt (default 2)")
    ap.add_argument("--beside", type=int, default=3, help="streams decoding beside the long prompt (default 3)")
    args = ap.parse_args(argv)
    args.conversations = [int(c) for c in args.conversations.split(",") if c]
    vers = versions()
    logdir = Path(tempfile.mkdtemp(prefix="gguf-serve-multiturn-"))
    figures = {}
    if args.conversations:
        figures["multiturn"] = multiturn_part(args, logdir)
        if args.fleet:
            figures["fleet"] = fleet_part(args, logdir / "fleet")
    if args.long_prompt:
        figures["long prompt"] = long_prompt_part(args, logdir / "long")
    report(figures, args)
    write_results(args, figures, vers)


def report(figures: dict, args) -> None:
    rows = []
    for key, pairs in figures.get("multiturn", {}).items():
        for pair in pairs:
            for name in ("gguf-serve", "llama-server"):
                r = pair[name]
                m = r["memory"]
                rows.append([f"{key}, {name}", f"{r['cached_share']:.3f}", f"{r['cached_share_turns_2_on']:.3f}",
                             f"{r['wall_s']:.1f}", f"{pair['wall_ratio']:.2f}" if name == "gguf-serve" else "",
                             f"{r['ttft_median_s_by_turn'][0]:.2f} / {statistics.median(r['ttft_median_s_by_turn'][1:] or [0]):.2f}",
                             f"{m['rss_turn3_mib']:.0f} / {m['peak_rss_mib']:.0f}",
                             f"{m['gguf_prompt_cache_bytes'] / 2**20:.1f} / {m['gguf_prompt_cache_max_bytes'] / 2**20:.0f}"
                             if "gguf_prompt_cache_bytes" in m else "-"])
    fleet = figures.get("fleet")
    if fleet:
        conv = max(args.conversations)
        r = fleet[f"{conv} conversations"]
        m = r["memory"]
        rows.append([f"{conv} conversations, {fleet['instances']} gguf-serve behind nginx", f"{r['cached_share']:.3f}",
                     f"{r['cached_share_turns_2_on']:.3f}", f"{r['wall_s']:.1f}", "",
                     f"{r['ttft_median_s_by_turn'][0]:.2f} / {statistics.median(r['ttft_median_s_by_turn'][1:] or [0]):.2f}",
                     f"{m['rss_turn3_mib']:.0f} / {m['peak_rss_mib']:.0f} (one)", "-"])
    if rows:
        print(f"\nMulti-turn: {args.turns} turns each, a ~{args.system_tokens}-token shared system prompt, "
              f"{args.max_tokens}-token answers, {args.parallel} slots:")
        print(table(rows, ["conversations, server", "cached share", "turns 2..", "wall s", "ratio",
                           "TTFT turn 1 / later, s", "RSS turn 3 / peak MiB", "prompt cache MiB / bound"]))
    lrows = []
    for i, pair in enumerate((figures.get("long prompt") or {}).get("rounds", [])):
        g, s = pair["gguf-serve"], pair["llama-server"]
        lrows.append([f"{i // 2 + 1}", str(g["beside_streams"]), str(g["prompt_tokens"]), f"{g['prompt_tps']:.1f}",
                      f"{s['prompt_tps']:.1f}", f"{pair['prompt_tps_ratio']:.2f}",
                      f"{statistics.mean(g['beside_tps']):.1f} / {statistics.mean(s['beside_tps']):.1f}" if g["beside_tps"] else "-"])
    if lrows:
        print(f"\nA long prompt, alone and beside other streams (context {args.long_ctx} per sequence):")
        print(table(lrows, ["round", "beside", "prompt tokens", "gguf-serve prompt tok/s", "llama-server",
                            "ratio", "others' tok/s each (g / l)"]))
