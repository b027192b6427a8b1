"""`gguf-serve` (or `python -m gguf_serve`): the service on granian. Every setting is an
environment variable (README, "Configuration"); --model, --host and --port set the three
that are asked for most, and win over MODEL, HOST and PORT."""

from __future__ import annotations

import argparse
import os


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="gguf-serve", description="One GGUF model behind the OpenAI HTTP API. "
                                     "Every other setting is an environment variable (README: Configuration).")
    parser.add_argument("--model", help="a key of models.toml or a path to a .gguf file (MODEL; default smollm2-135m-instruct)")
    parser.add_argument("--host", default=os.environ.get("HOST", "127.0.0.1"), help="address to listen on (HOST; default %(default)s)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", 8000)), help="port (PORT; default %(default)s)")
    args = parser.parse_args(argv)
    if args.model:
        os.environ["MODEL"] = args.model  # granian's worker makes the app from the environment
    # Imported here, not above: `--help` answers without loading the server.
    from granian import Granian

    Granian("gguf_serve.service:app", interface="asgi", address=args.host, port=args.port).serve()


if __name__ == "__main__":
    main()
