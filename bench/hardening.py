"""What the issue-#25 hardening costs where it runs on every request: the stop-string scan per
token in the decode thread, and a model's own template rendered in its render process against
rendering it in the server's process, with that process's memory; and what slow renders cost
ordinary ones (issue #34): while clients send renders that loop until the time limit, each again
as soon as it is answered, how long an ordinary render waits, and how many render processes run
and hold how much memory at most.

    python -m bench hardening                 # prints the figures, writes bench/results/hardening.json
    python -m bench hardening --renders 50 --tokens 2000 --slow-clients 20 --attack-seconds 10

The scan is fed a text that keeps almost matching its stop strings (a stop string is one
character repeated then "z", the text that character alone), so the scanner holds back a whole
stop string's length less one at every token: the worst case for a scanner that looks back
over what it holds (the one before #25 rescanned it, O(L²) a token). The render is
of a real official template (Qwen3's, from ../shared) on a 4-message chat; in-process is
sandbox.jinja_template as the server rendered it before, with the same time limit.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench import grammars
from bench.machine import REPO, bench_arguments, write_results
from bench.procs import process_tree, status_mib
from gguf_serve import engine, sandbox, templates
from gguf_serve.template_process import TemplateProcess

TEMPLATE = REPO.parent / "shared" / "chat-templates" / "Qwen-Qwen3-0.6B.jinja"


def scan_us_per_token(stop_chars: int, tokens: int) -> float:
    """µs of the decode thread a token, for four stop strings of `stop_chars` characters."""
    stops = [c * (stop_chars - 1) + "z" for c in "abcd"] if stop_chars else []
    scanner, piece = engine.StopScanner(stops), "aaaa"  # 4-character tokens, never a whole stop
    started = time.perf_counter()
    for _ in range(tokens):
        scanner.feed(piece)
    return (time.perf_counter() - started) / tokens * 1e6


def render_us(render, renders: int) -> float:
    render(templates.PROBE)  # compiled, and its process started, before timing
    times = []
    for _ in range(renders):
        started = time.perf_counter()
        render(templates.PROBE)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6


# The trap of tests/test_hostile.py: the message "slow" loops for hours, but for the time limit.
SLOW = ("{% if messages[-1]['content'] == 'slow' %}{% for i in range(100000) %}{% for j in range(100000) %}"
        "{% endfor %}{% endfor %}{% endif %}")


def under_slow_renders(source: str, clients: int, seconds: float) -> dict:
    """For `seconds`, `clients` threads each render a chat that loops until the time limit, again as
    soon as it is answered (or refused), while an ordinary chat is rendered every 0.1 s, all on a
    lane of threads as the server's (one for each request: none waits for a thread). The ordinary
    renders' time, and the render processes at most (counted every 5 ms) and their RSS at most."""
    render = TemplateProcess(SLOW + source, "", "<|im_end|>")
    render(templates.PROBE)
    stop, most = threading.Event(), {"processes": 0, "rss": 0.0}

    def attack() -> None:
        while not stop.is_set():
            try:
                render([{"role": "user", "content": "slow"}])
            except (templates.TemplateError, templates.RenderBusy):
                pass

    def watch() -> None:
        while not stop.is_set():
            pids = process_tree(os.getpid())[1:]
            most["processes"] = max(most["processes"], len(pids))
            most["rss"] = max(most["rss"], sum(status_mib(pid, "VmRSS") or 0.0 for pid in pids))
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    waits = []
    with ThreadPoolExecutor(clients + 1) as lane:
        for _ in range(clients):
            lane.submit(attack)
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            started = time.perf_counter()
            lane.submit(render, templates.PROBE).result()
            waits.append(time.perf_counter() - started)
            time.sleep(0.1)
        stop.set()
    watcher.join()
    return {"ordinary render, median ms": round(statistics.median(waits) * 1000, 1),
            "ordinary render, longest ms": round(max(waits) * 1000, 1), "ordinary renders": len(waits),
            "render processes at most": most["processes"], "their RSS at most, MB": round(most["rss"], 1)}


def main(argv: list[str]) -> None:
    ap = bench_arguments("hardening", __doc__, model=False)
    ap.add_argument("--renders", type=int, default=200)
    ap.add_argument("--tokens", type=int, default=5000)
    ap.add_argument("--neighbour-tokens", type=int, default=400, help="tokens of the neighbour's stream (default 400)")
    ap.add_argument("--beside", type=int, default=3, help="constrained chats beside the neighbour (default 3)")
    ap.add_argument("--gbnf-seconds", type=float, default=20, help="how long llama.cpp's grammar walk may take "
                    "before it is stopped (default 20)")
    ap.add_argument("--slow-clients", type=int, default=20, help="clients sending slow renders at once")
    ap.add_argument("--attack-seconds", type=float, default=10, help="how long they send them")
    args = ap.parse_args(argv)

    scan = {f"{n} chars": round(scan_us_per_token(n, args.tokens), 2) for n in (0, 100, 1000)}
    source = TEMPLATE.read_text()
    in_process = sandbox.jinja_template(source, "", "<|im_end|>")
    out_of_process = TemplateProcess(source, "", "<|im_end|>")
    render = {"in process": round(render_us(in_process, args.renders)),
              "render process": round(render_us(out_of_process, args.renders))}
    rss = status_mib(out_of_process.kept.proc.pid, "VmRSS")
    out_of_process.kept.kill()  # not counted with the next figures' processes
    figures = {"stop scan, µs a token (four stop strings of)": scan, "render of a 4-message chat, median µs": render,
               "render process RSS, MB": round(rss, 1),
               f"while {args.slow_clients} clients send slow renders": under_slow_renders(
                   source, args.slow_clients, args.attack_seconds)}
    for name, value in figures.items():
        print(f"{name}: {value}")
    print("an output grammar's work a token, in the decode thread:", flush=True)
    figures["grammar mask a token, along an answer, over random logits"] = grammars.mask_figures(args.gbnf_seconds)
    print(f"a neighbour's streamed tokens/s beside {args.beside} chats under each grammar:", flush=True)
    with tempfile.TemporaryDirectory() as logdir:
        figures["neighbour stream, tokens/s"] = grammars.neighbour_figures(
            len(os.sched_getaffinity(0)), args.beside, args.neighbour_tokens, Path(logdir))
    write_results(args, figures)
