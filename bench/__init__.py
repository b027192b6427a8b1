"""The benchmark of gguf-serve: one tool, `python -m bench <what> [options]`, run from the root of
the checkout to measure (it imports `bench` and `gguf_serve` from there, and starts gguf-serve
from there as `python -m granian --interface asgi gguf_serve.service:app`).

    python -m bench --help              # the subcommands, one line each
    python -m bench compare --quick     # one of them; `python -m bench compare --help` for its options

Every subcommand prints its figures and writes them to bench/results/<what>.json (--json elsewhere)
with the date (UTC), the gguf-serve commit measured, the host, the versions and its options.

The subcommands share a core: machine (what is measured on, the common options, the results
file), procs (spawning and killing servers, CPU and memory of process trees, waiting for a quiet
machine), servers (the servers' command lines, starting one to its first answer), client (the
requests), stats and report (summaries and tables), llama_build (llama.cpp's llama-server,
built once for the comparisons).
"""
