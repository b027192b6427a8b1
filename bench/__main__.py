"""`python -m bench <what> [options]`: runs one subcommand (a module of this package, its `main`)."""

from __future__ import annotations

import argparse
import importlib
import signal
import sys

SUBCOMMANDS = {
    "compare": "gguf-serve against llama.cpp's servers and llama_cpp.Llama, one after the other: every figure",
    "paired": "gguf-serve against llama-server -np 4 side by side, pair by pair: the headline ratios",
    "split": "where one request's time goes on each server: first token, each token after it, outside the server",
    "threadtime": "CPU time per token of the threads beside llama.cpp's, gguf-serve against llama-server",
    "tokentime": "one token's time in process: llama.cpp's C loop, then the engine around it",
    "join": "how long a running stream pauses while a long prompt joins",
    "embeddings": "embeddings/s of gguf-serve against llama-server --embeddings, and their vectors' agreement",
    "responses": "/v1/responses against /v1/chat/completions on the same generation",
    "messages": "/v1/messages (Anthropic's API) against /v1/chat/completions on the same generation",
    "kvcache": "KV cache types: the context's memory, decode speed, greedy output against f16's",
    "hardening": "what hardening costs a request: the stop scan, the render process, an output grammar a token (#25, #34)",
    "store": "stored responses with the in-process store against Redis: create, continue, retrieve rates",
    "coldstart": "serverless cold start against llama-server, warm and cold page cache: where it goes, memory by kind",
    "multiturn": "multi-turn conversations against llama-server and through a fleet: cached share, wall time, TTFT, memory; a long prompt's tok/s",
}


def main() -> None:
    ap = argparse.ArgumentParser(
        prog="python -m bench", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Benchmarks of gguf-serve, run from the checkout's root. Each writes bench/results/<what>.json.",
        epilog="subcommands:\n" + "\n".join(f"  {name:12s} {what}" for name, what in SUBCOMMANDS.items())
        + "\n\n`python -m bench <what> --help` lists a subcommand's options.")
    ap.add_argument("what", choices=SUBCOMMANDS, metavar="what", help="the subcommand (below)")
    ap.add_argument("options", nargs=argparse.REMAINDER, help="its options")
    args = ap.parse_args()
    # SIGTERM ends a run as Ctrl-C does: what was measured is reported, and the servers it started are
    # stopped (procs.kill_all at exit), which they are not if the process just dies.
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(f"stopped by signal {signum}"))
    importlib.import_module(f"bench.{args.what}").main(args.options)


if __name__ == "__main__":
    sys.exit(main())
