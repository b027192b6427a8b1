"""Where gguf-serve's start goes, measured in fresh interpreters: the interpreter's own start,
each package's import time (`-X importtime`), and the phases of a load one by one (the C API's
import, the model read, its context, the template probe, the warm-up token, the web stack's
import and the app's construction). Run with `python -m bench.startphases` it is that child."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.machine import REPO

# The packages a start imports, named as the issue names them; the rest is the standard library
# (sys.stdlib_module_names) or "other".
GROUPS = {"litestar": "litestar", "msgspec": "msgspec", "granian": "granian", "llama_cpp": "llama_cpp bindings",
          "numpy": "numpy", "prometheus_client": "prometheus_client", "jinja2": "jinja2", "markupsafe": "jinja2",
          "redis": "redis", "gguf_serve": "gguf_serve"}
IMPORTS = "from granian import Granian; import gguf_serve.service"  # what the gguf-serve command imports


def group_of(module: str) -> str:
    top = module.strip().split(".")[0]
    if top in GROUPS:
        return GROUPS[top]
    return "stdlib" if top in sys.stdlib_module_names or top.startswith("_") else f"other: {top}"


def import_times(runs: int) -> dict:
    """Median over `runs` fresh interpreters of each group's own import time (ms, `self` column of
    -X importtime, so nothing is counted twice), and their sum."""
    per_run: list[dict[str, float]] = []
    for _ in range(runs):
        r = subprocess.run([sys.executable, "-X", "importtime", "-c", IMPORTS], capture_output=True, text=True,
                           timeout=120, cwd=REPO)
        if r.returncode:
            raise RuntimeError(f"{IMPORTS} failed:\n{r.stderr[-2000:]}")
        groups: dict[str, float] = {}
        for line in r.stderr.splitlines():
            if not line.startswith("import time:") or "self [us]" in line:
                continue
            own, _cumulative, module = line[len("import time:"):].split("|")
            groups[group_of(module)] = groups.get(group_of(module), 0) + int(own) / 1000
        per_run.append(groups)
    names = sorted({g for run in per_run for g in run})
    med = {g: statistics.median(run.get(g, 0.0) for run in per_run) for g in names}
    others = {g: v for g, v in med.items() if g.startswith("other: ")}
    out = {g: v for g, v in med.items() if not g.startswith("other: ")}
    out["other"] = sum(others.values())
    return {"ms": dict(sorted(out.items(), key=lambda kv: -kv[1])), "other_packages_ms": others,
            "total_ms": statistics.median(sum(run.values()) for run in per_run), "runs": runs, "imports": IMPORTS}


def interpreter_start(runs: int) -> dict:
    """Seconds of `python -c pass` and `python -S -c pass` (no site: no .pth files), medians."""
    out = {}
    for name, flags in (("python -c pass", []), ("python -S -c pass", ["-S"])):
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            subprocess.run([sys.executable, *flags, "-c", "pass"], check=True, timeout=60)
            times.append(time.perf_counter() - t0)
        out[name] = statistics.median(times)
    return out


def phases(model: Path, ctx: int, threads: int, parallel: int, runs: int) -> dict:
    """Median over `runs` children of each phase's seconds (`child`)."""
    per_run = []
    for _ in range(runs):
        cmd = [sys.executable, "-m", "bench.startphases", str(model), str(ctx), str(threads), str(parallel)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
        lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
        if r.returncode or not lines:
            raise RuntimeError(f"the phases' child failed:\n{r.stderr[-2000:]}")
        per_run.append(json.loads(lines[-1]))
    return {k: statistics.median(run[k] for run in per_run) for k in per_run[0]}


def child(model: Path, ctx: int, threads: int, parallel: int) -> dict:
    """Each phase of a start timed alone, in the order a start runs them (seconds). The model's
    read and its context are told apart by timing llama.cpp's two calls inside Model()."""
    import asyncio
    import concurrent.futures

    out, t = {}, time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        out[name] = now - t
        t = now

    from gguf_serve import model as model_module
    lap("import gguf_serve.model (llama.cpp bindings)")
    llama, timed = model_module.llama, {}
    for fn in ("llama_model_load_from_file", "llama_init_from_model"):
        def wrapped(*a, _real=getattr(llama, fn), _name=fn):
            t0 = time.perf_counter()
            try:
                return _real(*a)
            finally:
                timed[_name] = time.perf_counter() - t0
        setattr(llama, fn, wrapped)
    m = model_module.Model(model, ctx, threads, parallel)
    lap("Model(...)")
    out["  of it: llama_model_load_from_file (read)"] = timed["llama_model_load_from_file"]
    out["  of it: llama_init_from_model (context)"] = timed["llama_init_from_model"]
    from gguf_serve import engine, templates
    from gguf_serve.template_process import TemplateProcess
    lap("import templates, template_process, engine")
    template = m.metadata.get("tokenizer.chat_template")
    if template:  # a model without one is served with a hand-written family: no probe
        templates.probe(TemplateProcess(template, m.token_text(m.bos), m.token_text(m.eos)))
        lap("template probe (render process spawn + first render)")

    async def warm_up() -> None:
        done = asyncio.get_running_loop().create_future()
        decoder = engine.Engine(m, parallel, asyncio.get_running_loop())
        decoder.submit(engine.Generation(m.tokenize_prompt("Hello"), 1, engine.Sampling(temperature=0),
                                         lambda e: e.finish_reason and not done.done() and done.set_result(e)))
        await done
        decoder.close()
    asyncio.run(warm_up())
    lap("warm-up token (engine start + one decode)")
    from gguf_serve import loading, service
    lap("import gguf_serve.service (web stack)")
    loading.start_loading = lambda config: concurrent.futures.Future()  # the model is loaded above already
    service.create_app({**os.environ, "MODEL": str(model), "N_CTX": str(ctx), "PARALLEL": str(parallel)})
    lap("create_app (Litestar app, model load stubbed)")
    t0 = time.perf_counter()
    vocab = model_module.Model(model, vocab_only=True)
    out["reference: Model(vocab_only=True) again"] = time.perf_counter() - t0
    del vocab
    return out


if __name__ == "__main__":
    model, ctx, threads, parallel = sys.argv[1:5]
    print(json.dumps(child(Path(model), int(ctx), int(threads), int(parallel))))
