"""The servers: their command lines, and starting one until it gives its first answer."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from bench.client import Bench, poll, wait_ready
from bench.llama_build import find_llama_server, llama_server_has
from bench.machine import REPO, default_model, inspect_model
from bench.procs import free_port, kill, kill_all, spawn, wait_idle
from bench.stats import summary

LLAMA_SERVER_EXTRAS = {"fastapi": "fastapi", "uvicorn": "uvicorn", "sse_starlette": "sse-starlette",
                       "starlette_context": "'starlette-context>=0.3.6,<0.4'", "pydantic_settings": "pydantic-settings",
                       "yaml": "pyyaml"}


def gguf_serve_command(args) -> tuple[list[str], dict, Path]:
    """gguf-serve under granian, its environment (the bench's model, threads, context, PARALLEL) and
    where it runs (REPO: the checkout measured). In every command `{PORT}` is filled in when it starts."""
    env = {**os.environ, "MODEL": str(args.model), "N_THREADS": str(args.threads), "N_CTX": str(args.ctx),
           "PARALLEL": str(args.parallel)}
    return [sys.executable, "-m", "granian", "--interface", "asgi", "--host", "127.0.0.1", "--port", "{PORT}",
            "gguf_serve.service:app"], env, REPO


def llama_cpp_server_command(args, fair: bool) -> list[str]:
    """`python -m llama_cpp.server` on the bench's model and context; `fair`: with the bench's threads too."""
    # --interrupt_requests False: by default a new request ends the stream being generated
    # (with [DONE], no finish_reason), so 3 of 4 concurrent clients would get nothing
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(args.model), "--n_ctx", str(args.ctx),
           "--interrupt_requests", "False", "--host", "127.0.0.1", "--port", "{PORT}"]
    if fair:
        cmd += ["--n_threads", str(args.threads), "--n_threads_batch", str(args.threads)]
    return cmd


def llama_cpp_server_missing() -> list[str]:
    """The extras llama_cpp.server needs that are not installed (their pip names)."""
    return [pkg for mod, pkg in LLAMA_SERVER_EXTRAS.items() if importlib.util.find_spec(mod) is None]


def llama_server_command(binary: Path, args, slots: int) -> list[str]:
    """llama.cpp's server with `slots` slots of --ctx tokens each, the bench's threads and --llama-server-args."""
    T = str(args.threads)
    cmd = [str(binary), "-m", str(args.model), "-c", str(args.ctx * slots), "-np", str(slots), "-t", T,
           "-tb", T, "--host", "127.0.0.1", "--port", "{PORT}"]
    cmd += args.llama_server_args.split()
    if llama_server_has(binary, "--kv-unified"):
        # each slot gets its own n_ctx of KV cache, as in gguf-serve (no sharing)
        cmd.append("--no-kv-unified")
    return cmd


def on_free_port(cmd: list[str]) -> tuple[list[str], str]:
    """The command with `{PORT}` filled in by a free port, and the server's base URL."""
    port = free_port()
    return [c.replace("{PORT}", str(port)) for c in cmd], f"http://127.0.0.1:{port}"


def start(cmd: list[str], base: str, env: dict | None, cwd: Path | None, args, eog: list[int],
          log: Path) -> tuple[subprocess.Popen, Bench, float, float]:
    """Once the machine is quiet, spawn a server; once it has answered a chat request, return it with a
    Bench for its model and the seconds from spawn to its first 200 from GET /v1/models and to its
    first answer. Killed if it never gets there."""
    wait_idle(args.wait_idle)
    t_spawn = time.perf_counter()
    proc = spawn(cmd, log, env=env, cwd=cwd)
    try:
        startup, model_id = wait_ready(proc, base, t_spawn, args.start_timeout, log)
        b = Bench(base, model_id, args, eog)
        return proc, b, startup, b.first_answer(proc, t_spawn, args.start_timeout, log)
    except BaseException:
        kill(proc)
        raise


def launch(name: str, cmd: list[str], env: dict | None, cwd: Path | None, args, eog: list[int], logdir: Path,
           result: dict) -> tuple[subprocess.Popen, Bench]:
    """Start one server on a free port, its command, startup time and start → first answer recorded
    in `result`; returns it with a Bench for its model."""
    cmd, base = on_free_port(cmd)
    log = logdir / f"{name}.log"
    result.update({"name": name, "command": " ".join(cmd), "log": str(log)})
    if env is not None:
        result["env"] = {k: v for k, v in env.items() if k in ("MODEL", "N_THREADS", "N_CTX", "PARALLEL")}
    print(f"\n== {name}: {(' '.join(f'{k}={v}' for k, v in result.get('env', {}).items()) + ' ').lstrip()}{result['command']}",
          flush=True)
    proc, b, result["startup_s"], result["first_answer_s"] = start(cmd, base, env, cwd, args, eog, log)
    print(f"   ready in {result['startup_s']:.2f} s; first answer {result['first_answer_s']:.2f} s after spawn",
          flush=True)
    return proc, b


def restart(name: str, cmd: list[str], env: dict | None, cwd: Path | None, args, eog: list[int], logdir: Path,
            k: int) -> float:
    """Start a server again (its k-th start) only up to its first answer, then stop it: seconds from
    spawn to that answer."""
    cmd, base = on_free_port(cmd)
    proc, _, _, first = start(cmd, base, env, cwd, args, eog, logdir / f"{name}-start{k}.log")
    kill(proc)
    return first


def first_answers(result: dict, again: Callable[[int], float], starts: int) -> None:
    """Start → first answer over `starts` starts: the one in `result` and again(k) for k = 2..starts;
    each of them and their median (as first_answer_s) into `result`."""
    runs = [result["first_answer_s"], *(again(k) for k in range(2, starts + 1))]
    result["first_answer"] = {"runs_s": runs, **summary(runs)}
    result["first_answer_s"] = result["first_answer"]["median"]
    if starts > 1:
        print(f"   start → first answer: median {result['first_answer_s']:.2f} s of {starts} starts "
              f"({', '.join(f'{x:.2f}' for x in runs)})", flush=True)


def server_arguments(ap, wait_idle: float = 120, timeout: float = 300, llama_server: bool = True) -> None:
    """The options of a subcommand that starts servers (`llama_server`: llama-server too)."""
    ap.add_argument("--parallel", type=int, default=4, help="gguf-serve's PARALLEL and llama-server's -np (default 4)")
    if llama_server:
        ap.add_argument("--llama-server", type=Path, help="a llama-server binary (default: the one the bench builds "
                        "once into ~/.cache/gguf-serve/llama-server-build, 10-15 minutes on two cores)")
        ap.add_argument("--llama-server-args", default="", help="extra arguments for llama-server, e.g. '--no-repack'")
        ap.add_argument("--no-build", action="store_true", help="skip llama-server if it isn't built yet")
    ap.add_argument("--timeout", type=float, default=timeout, help=f"seconds allowed for one request (default {timeout:.0f})")
    ap.add_argument("--start-timeout", type=float, default=180, help="seconds allowed for a server to get ready")
    ap.add_argument("--wait-idle", type=float, default=wait_idle, help="before each measurement, wait up to this many "
                    f"seconds for other processes to leave the CPU (default {wait_idle:.0f})")


def start_side_by_side(args, logdir: Path, env: dict[str, str] | None = None) -> dict[str, tuple[subprocess.Popen, Bench]]:
    """gguf-serve (PARALLEL=args.parallel, `env` added to its environment) and llama-server
    -np args.parallel on args.model (default: the bench's model), each started and answering:
    {name: (process, Bench)}. The caller kills them."""
    args.model = (args.model or default_model()).resolve()
    eog = inspect_model(args.model)["eog"]
    binary, why = find_llama_server(args, {})
    if binary is None:
        raise SystemExit(f"{why}; or pass --llama-server")
    cmd, serve_env, cwd = gguf_serve_command(args)
    servers = {}
    try:
        servers["gguf-serve"] = launch("gguf-serve", cmd, {**serve_env, **(env or {})}, cwd, args, eog, logdir, {})
        servers["llama-server"] = launch("llama-server", llama_server_command(binary, args, args.parallel), None, None,
                                         args, eog, logdir, {})
    except BaseException:
        kill_all()
        raise
    return servers


NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
NJS = Path("/usr/lib/nginx/modules/ngx_http_js_module.so")


def start_fleet(args, logdir: Path, n: int, slots: int, threads: int) -> tuple[list[subprocess.Popen], Bench]:
    """n gguf-serve instances of args.model with `slots` sequences (PARALLEL) and `threads` threads
    each, behind deploy/nginx.conf on loopback (its upstreams from deploy/fleet.py --local): their
    processes, nginx's last, and a Bench for the proxy. The caller kills them."""
    if not (os.path.exists(NGINX) and NJS.exists()):
        raise SystemExit("the fleet needs nginx and libnginx-mod-http-js (.ci/run installs them)")
    args.model = (args.model or default_model()).resolve()
    eog = inspect_model(args.model)["eog"]
    cmd, env, cwd = gguf_serve_command(args)
    env = {**env, "PARALLEL": str(slots), "N_THREADS": str(threads)}
    procs = []
    try:
        instances = [launch(f"fleet-{k + 1}", cmd, env, cwd, args, eog, logdir, {}) for k in range(n)]
        procs = [proc for proc, _ in instances]
        model_id, port, directory = instances[0][1].model_id, free_port(), logdir / "nginx"
        members = ",".join(b.base.removeprefix("http://") for _, b in instances)
        subprocess.run([sys.executable, REPO / "deploy" / "fleet.py", directory, "--local", str(port),
                        f"{model_id}={members}"], check=True)
        log = logdir / "nginx.log"
        procs.append(spawn([NGINX, "-p", str(directory), "-c", str(directory / "nginx.conf"), "-g", "daemon off;"], log))
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(timeout=2) as client:
            poll(procs[-1], time.perf_counter(), args.start_timeout, log, "GET /v1/models through nginx", client,
                 lambda c: c.get(f"{base}/v1/models"))
        print(f"\n== nginx on {base} in front of {members}", flush=True)
        return procs, Bench(base, model_id, args, eog)
    except BaseException:
        kill_all()
        raise
