"""`gguf-serve` (or `python -m gguf_serve`): the service on granian, in one process. Every
setting is an environment variable (README, "Configuration"); --model, --host and --port set
the three that are asked for most, and win over MODEL, HOST and PORT.

Built for a cold start (docs/performance.md, "Cold start"): the model is read, and the
render process for its template starts, before the web stack is imported, so that the 0.2-0.3 s
of Python that imports Litestar and builds the app runs beside llama.cpp's load instead of
before it; and granian serves from this process (its embedded server) rather than from a
worker it would fork, so no second process starts or sits beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys

from .config import SETTINGS  # light (no llama.cpp), and imported at once by every start anyway


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["pull"]:
        return pull(argv[1:])
    parser = argparse.ArgumentParser(prog="gguf-serve", description="One GGUF model behind the OpenAI HTTP API. "
                                     "Every other setting is an environment variable (README: Configuration). "
                                     "`gguf-serve pull MODEL` downloads a Hub model without serving it.")
    parser.add_argument("--model", help="a key of models.toml, a path to a .gguf file or a Hub model, "
                        "hf:org/repo[:QUANT|/file.gguf][@revision] (MODEL; default smollm2-135m-instruct)")
    parser.add_argument("--host", default=os.environ.get("HOST", SETTINGS["HOST"].default),
                        help="address to listen on (HOST; default %(default)s)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", SETTINGS["PORT"].default)),
                        help="port (PORT; default %(default)s)")
    args = parser.parse_args(argv)
    if args.model:
        os.environ["MODEL"] = args.model
    # Imported here, not above: `--help` answers without loading llama.cpp.
    from .config import ConfigError, load_config
    from .loading import start_loading
    from .model import ModelFileError, check_model_file

    try:
        config = load_config(os.environ)
        check_model_file(config.model_path)
    except (ConfigError, ModelFileError) as e:
        sys.exit(f"gguf-serve: {e}")
    started = start_loading(config)
    from .service import create_app  # the web stack, imported while the model loads

    serve(create_app(os.environ, started, config), args.host, args.port, config.idle_timeout_s)


def pull(argv: list[str]) -> None:
    """`gguf-serve pull MODEL`: the model in the Hugging Face cache, checked, nothing served (an image's build
    step, a volume filled before the service starts); one JSON line with its path, or one line why not."""
    parser = argparse.ArgumentParser(prog="gguf-serve pull", description="Download a model from the Hugging Face Hub "
                                     "into its cache (HF_HOME, HF_HUB_CACHE) without serving it.")
    parser.add_argument("model", help="hf:org/repo[:QUANT|/file.gguf][@revision], or a key of models.toml")
    args = parser.parse_args(argv)
    from .config import ConfigError, load_config
    from .model import ModelFileError, check_model_file

    try:
        config = load_config({**os.environ, "MODEL": args.model})
        check_model_file(config.model_path)
    except (ConfigError, ModelFileError) as e:
        sys.exit(f"gguf-serve: {e}")
    print(json.dumps({"event": "pulled", "model": args.model, "path": str(config.model_path)}), flush=True)


# Connections granian holds at once, as `granian`'s command holds by default (its backlog, 1024,
# over one worker); the embedded server's own default, 128, let 128 idle sockets keep /health
# from being answered. A connection past it waits in the kernel's queue (as long again) until
# one closes: idle ones do after IDLE_TIMEOUT_S, silent ones too (connections.py).
CONNECTIONS = 1024
FILES_BESIDE_CONNECTIONS = 128  # the model, the render process's pipes, libraries, the store's sockets


def serve(app, host: str, port: int, idle_timeout_s: float) -> None:
    """Serve `app` from this process with granian's embedded server, on uvloop (as granian's
    workers run), until SIGTERM or SIGINT: granian then stops taking connections and waits for
    those open, while the app's lifespan drains its requests (service.drain). A connection waits
    `idle_timeout_s` at most for a request's head (hyper's header read timeout, which also ends an
    idle keep-alive connection)."""
    import uvloop
    from granian.constants import Interfaces
    from granian.http import HTTP1Settings
    from granian.log import LogLevels, configure_logging
    from granian.server.embed import Server

    from .connections import raise_fd_limit

    configure_logging(LogLevels.info)  # granian's own lines, as its workers log them
    # Past the open-files limit granian's accepts fail (EMFILE), so it holds no more connections than fit.
    connections = max(1, min(CONNECTIONS, raise_fd_limit() - FILES_BESIDE_CONNECTIONS))
    server = Server(app, address=host, port=port, interface=Interfaces.ASGI, backlog=CONNECTIONS, backpressure=connections,
                    http1_settings=HTTP1Settings(header_read_timeout=round(idle_timeout_s * 1000)))

    async def run() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, server.stop)
        await server.serve()

    uvloop.run(run())


if __name__ == "__main__":
    main()
