"""What the issue-#25 hardening costs where it runs on every request: the stop-string scan per
token in the decode thread, and a model's own template rendered in its render process against
rendering it in the server's process, with that process's memory.

    python -m bench hardening                 # prints the figures, writes bench/results/hardening.json
    python -m bench hardening --renders 50 --tokens 2000

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
import time
from pathlib import Path

from bench import grammars
from bench.machine import REPO, bench_arguments, write_results
from bench.procs import status_mib
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


def main(argv: list[str]) -> None:
    ap = bench_arguments("hardening", __doc__, model=False)
    ap.add_argument("--renders", type=int, default=200)
    ap.add_argument("--tokens", type=int, default=5000)
    ap.add_argument("--neighbour-tokens", type=int, default=400, help="tokens of the neighbour's stream (default 400)")
    ap.add_argument("--beside", type=int, default=3, help="constrained chats beside the neighbour (default 3)")
    ap.add_argument("--gbnf-seconds", type=float, default=20, help="how long llama.cpp's grammar walk may take "
                    "before it is stopped (default 20)")
    args = ap.parse_args(argv)

    scan = {f"{n} chars": round(scan_us_per_token(n, args.tokens), 2) for n in (0, 100, 1000)}
    source = TEMPLATE.read_text()
    in_process = sandbox.jinja_template(source, "", "<|im_end|>")
    out_of_process = TemplateProcess(source, "", "<|im_end|>")
    render = {"in process": round(render_us(in_process, args.renders)),
              "render process": round(render_us(out_of_process, args.renders))}
    [worker] = out_of_process.idle
    figures = {"stop scan, µs a token (four stop strings of)": scan, "render of a 4-message chat, median µs": render,
               "render process RSS, MB": round(status_mib(worker.proc.pid, "VmRSS"), 1)}
    for name, value in figures.items():
        print(f"{name}: {value}")
    print("an output grammar's work a token, in the decode thread:", flush=True)
    figures["grammar mask a token, greedy walk over random logits"] = grammars.mask_figures(args.gbnf_seconds)
    print(f"a neighbour's streamed tokens/s beside {args.beside} chats under each grammar:", flush=True)
    with tempfile.TemporaryDirectory() as logdir:
        figures["neighbour stream, tokens/s"] = grammars.neighbour_figures(
            len(os.sched_getaffinity(0)), args.beside, args.neighbour_tokens, Path(logdir))
    write_results(args, figures)
