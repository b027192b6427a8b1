"""What an output grammar costs the decode thread a token, and what a hostile one costs the streams
beside it (issue #34), for `python -m bench hardening`:

- the work a token, in process on the model's vocabulary: llguidance's mask applied to the logits
  (grammar.Matcher, what the engine runs) against llama.cpp's own grammar sampler over every
  candidate (what the engine ran before), on ordinary schemas and on the issue's hostile ones, each
  following the tokens of an answer the schema allows, over random logits; llama.cpp's runs in a
  process of its own that is stopped after --gbnf-seconds (the ambiguous pattern froze it for minutes);
- a neighbour's tokens/s on a real server: one streamed completion that never ends by itself, alone,
  then beside constrained chats (sent again as each ends) of each schema, and beside as many
  unconstrained chats, the baseline.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np

from bench.client import wait_ready
from bench.machine import REPO, default_model
from bench.procs import free_port, kill, spawn
from gguf_serve import grammar, tools
from gguf_serve.model import Model

# Each schema with an answer it allows, which the walks follow token by token.
SCHEMAS = {
    "JSON mode": ({"type": "object"}, '{"name": "Ann Lee", "age": 31, "city": "Paris", "tags": ["a", "b", "c"], '
                                      '"address": {"street": "1 Rue de Rivoli", "zip": "75001"}}'),
    "ordinary schema": ({"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                                          "tags": {"type": "array", "items": {"type": "string"}}},
                         "required": ["name", "age", "tags"]}, '{"name": "Ann Lee", "age": 31, "tags": ["a", "b"]}'),
    "enum of 256": ({"enum": [f"value number {i}" for i in range(256)]}, '"value number 255"'),
    "ambiguous pattern ^(a?){0,300}$": ({"type": "string", "pattern": "^(a?){0,300}$"}, '"' + "a" * 300 + '"'),
    "64 string alternatives": ({"anyOf": [{"type": "string"}] * 64}, '"' + "the same words again " * 6 + '"'),
}


def gbnf_walk_process(path: str, schema_json: str, answer: str) -> None:
    """In its own process: the walk through llama.cpp's grammar sampler over every candidate (what
    the engine ran before), each token's seconds printed as it goes."""
    import ctypes

    from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

    from gguf_serve.model import llama

    model, schema = Model(Path(path), vocab_only=True), json.loads(schema_json)
    gbnf = JSON_GBNF if schema == {"type": "object"} else json_schema_to_gbnf(schema_json)
    sampler = llama.llama_sampler_init_grammar(model.vocab, gbnf.encode(), b"root")
    data = (llama.llama_token_data * model.n_vocab)()
    view = np.frombuffer(data, dtype=np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")]))
    rng = np.random.default_rng(0)
    print("ready", flush=True)  # the walk's time starts here, not at the process's start
    for token in model.tokenize(answer):
        view["id"], view["logit"], view["p"] = np.arange(model.n_vocab), rng.standard_normal(model.n_vocab), 0
        candidates = llama.llama_token_data_array(data, model.n_vocab, -1, False)
        started = time.perf_counter()
        llama.llama_sampler_apply(sampler, ctypes.byref(candidates))
        print(time.perf_counter() - started, flush=True)
        llama.llama_sampler_accept(sampler, token)


def llguidance_walk(model: Model, schema: dict, answer: str) -> list[float]:
    """Seconds of each token's mask (grammar.Matcher.mask) over random logits, along `answer`."""
    matcher, rng, times = grammar.Matcher(model, tools.schema_grammar(schema, "bench")), np.random.default_rng(0), []
    for token in model.tokenize(answer):
        logits = rng.standard_normal(model.n_vocab).astype(np.float32)
        started = time.perf_counter()
        matcher.mask(logits)
        times.append(time.perf_counter() - started)
        assert logits[token] > -np.inf, f"the grammar refused {answer!r} at token {len(times)}"
        matcher.accept(token)
    return times


def gbnf_walk(schema: dict, answer: str, seconds: float) -> tuple[list[float], bool]:
    """The same walk through llama.cpp's grammar sampler, in a process of its own: (seconds of each
    token, whether it was stopped `seconds` after it began walking)."""
    walk = (f"from bench.grammars import gbnf_walk_process; "
            f"gbnf_walk_process({str(default_model())!r}, {json.dumps(schema)!r}, {answer!r})")
    proc = subprocess.Popen([sys.executable, "-c", walk], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            cwd=REPO)
    times: list[float] = []
    ready = threading.Event()

    def read() -> None:
        for line in proc.stdout:
            if line.strip() == "ready":
                ready.set()
            else:
                times.append(float(line))
        ready.set()  # it ended (or failed) before walking

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        ready.wait(600)  # its imports and the vocabulary: seconds on a loaded host
        proc.wait(seconds)
        stopped = False
    except subprocess.TimeoutExpired:
        proc.kill()
        stopped = True
    reader.join(5)
    return times, stopped


def figures_of(times: list[float]) -> dict:
    return {"tokens": len(times), "median µs": round(statistics.median(times) * 1e6) if times else None,
            "max µs": round(max(times) * 1e6) if times else None}


def mask_figures(gbnf_seconds: float) -> dict:
    model = Model(default_model(), vocab_only=True)
    grammar.tokenizer(model)  # built once a process, on its first grammar: not a token's work
    out = {}
    for name, (schema, answer) in SCHEMAS.items():
        gbnf, stopped = gbnf_walk(schema, answer, gbnf_seconds)
        out[name] = {"llguidance (now)": figures_of(llguidance_walk(model, schema, answer)),
                     "llama.cpp grammar (before)": {**figures_of(gbnf),
                                                    **({"stopped after s": gbnf_seconds} if stopped else {})}}
        print(f"  {name}: {out[name]}", flush=True)
    return out


def neighbour_tokens_per_s(url: str, model_id: str, body: dict | None, beside: int, tokens: int) -> float:
    """A never-ending streamed completion's tokens/s while `beside` chats with `body` are sent again
    and again (none when body is None)."""
    model = Model(default_model(), vocab_only=True)
    banned = {str(t): -100 for t in range(model.n_vocab) if model.is_end_of_generation(t)}
    stream = {"model": model_id, "prompt": "Count: 1, 2, 3,", "max_tokens": tokens, "temperature": 0, "stream": True,
              "logit_bias": banned}
    done, failed = threading.Event(), []

    def chats() -> None:
        with httpx.Client(timeout=300) as client:
            while not done.is_set() and not failed:
                r = client.post(f"{url}/v1/chat/completions", json=body)
                if r.status_code != 200:
                    failed.append(r.text)

    others = [threading.Thread(target=chats, daemon=True) for _ in range(beside if body else 0)]
    for thread in others:
        thread.start()
    try:
        with httpx.stream("POST", f"{url}/v1/completions", json=stream, timeout=600) as r:
            r.raise_for_status()
            arrived = [time.perf_counter() for line in r.iter_lines() if line.startswith("data: {")]
    finally:
        done.set()
        for thread in others:
            thread.join(300)
    if failed:
        raise RuntimeError(f"a chat beside the neighbour failed: {failed[0]}")
    return (len(arrived) - 1) / (arrived[-1] - arrived[0])


def neighbour_figures(threads: int, beside: int, tokens: int, logdir: Path) -> dict:
    port, log = free_port(), logdir / "grammars-server.log"
    env = {**os.environ, "MODEL": str(default_model()), "N_THREADS": str(threads)}
    proc = spawn([sys.executable, "-m", "gguf_serve", "--port", str(port)], log, env=env, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    try:
        _, model_id = wait_ready(proc, url, time.perf_counter(), 600, log)
        chat = {"model": model_id, "messages": [{"role": "user", "content": "Describe a person in JSON."}],
                "max_tokens": 48, "temperature": 0}
        out = {"alone": neighbour_tokens_per_s(url, model_id, None, 0, tokens),
               f"beside {beside} unconstrained chats": neighbour_tokens_per_s(url, model_id, chat, beside, tokens)}
        for name, (schema, _) in SCHEMAS.items():
            body = {**chat, "response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": schema}}}
            out[f"beside {beside} chats, {name}"] = neighbour_tokens_per_s(url, model_id, body, beside, tokens)
        out = {k: round(v, 1) for k, v in out.items()}
        for name, value in out.items():
            print(f"  {name}: {value} tokens/s", flush=True)
        return out
    finally:
        kill(proc)
