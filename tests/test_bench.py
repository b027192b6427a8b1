"""Every subcommand of the benchmark (`python -m bench <what>`, run from the checkout's root) runs in
CI's environment, briefly, and writes its results file. Nothing is asserted about speed (figures
vary with the machine); only that each measures, that every run produced its tokens, and what
its results file records."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT
from gguf_serve.template_process import MAX_SLOW_RENDERS

pytestmark = pytest.mark.bench  # smoke tests of the benchmark: `-m "not bench"` skips them


def bench(what: str, *options, timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m bench what options`, run to its end; past `timeout` it is stopped with SIGTERM, so
    that it stops the servers it started (SIGKILL would leave them running)."""
    cmd = [sys.executable, "-m", "bench", what, *map(str, options)]
    with subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()
            out, err = proc.communicate(timeout=60)
            pytest.fail(f"python -m bench {what} took over {timeout:.0f} s:\n{out[-3000:]}{err[-3000:]}")
    assert proc.returncode == 0, out[-3000:] + err[-3000:]
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def figures(path: Path, what: str) -> dict:
    """The figures of a results file, once it is checked to say what was measured, when, on what."""
    record = json.loads(path.read_text())
    assert record["subcommand"] == what and record["date"].endswith("UTC") and record["commit"]
    assert record["machine"]["usable_cpus"] > 0 and record["options"]["json"] == str(path)
    return record["figures"]


def test_the_subcommands_are_listed():
    run = bench("--help")
    listed = [line.split()[0] for line in run.stdout[run.stdout.index("subcommands:"):].splitlines()[1:] if line.startswith("  ")]
    assert listed == ["compare", "paired", "split", "threadtime", "tokentime", "join", "embeddings", "responses",
                      "messages", "kvcache", "hardening", "store", "coldstart", "multiturn"]


def test_quick_comparison_runs(tmp_path):
    out = tmp_path / "compare.json"
    run = bench("compare", "--quick", "--servers", "gguf-serve,raw", "--max-tokens", "16", "--reps", "1", "--json", out,
                "--wait-idle", "1")
    results = figures(out, "compare")
    for name in ("gguf-serve", "raw"):
        runs = results[name]["nonstream"]["runs"] + results[name]["stream"]["runs"]
        assert runs and all(r["tokens"] == 16 for r in runs)
        assert results[name]["first_answer_s"] > 0  # process start -> first answer
    assert results["gguf-serve"]["models"]["rps"] > 0 and results["gguf-serve"]["peak_rss"]["total_mb"] > 0
    assert "gguf_serve.service:app" in results["gguf-serve"]["command"]
    assert "Token check" in run.stdout


def test_join_benchmark_runs(tmp_path):
    out = tmp_path / "join.json"
    run = bench("join", "--servers", "gguf-serve", "--rounds", "1", "--prompt-tokens", "300", "--wait-idle", "1",
                "--json", out)
    assert "round 1: longest pause" in run.stdout
    assert run.stdout.splitlines()[-2].startswith("gguf-serve ")
    assert figures(out, "join")["gguf-serve"]["longest_pause_s"] > 0


def test_embeddings_benchmark_runs(tmp_path):
    out = tmp_path / "embeddings.json"
    run = bench("embeddings", "--servers", "gguf-serve", "--pairs", "1", "--short", "8", "--long", "2",
                "--long-tokens", "120", "--wait-idle", "1", "--json", out)
    results = figures(out, "embeddings")
    assert results["short"]["gguf-serve"] > 0 and results["long"]["gguf-serve"] > 0
    assert results["gguf-serve"]["rss_after_mb"] > 0
    assert "8 short texts" in run.stdout and "gguf-serve resident memory" in run.stdout


@pytest.mark.parametrize("api", ["responses", "messages"])
def test_api_against_chat_benchmark_runs(tmp_path, api):
    out = tmp_path / f"{api}.json"
    run = bench(api, "--rounds", "1", "--max-tokens", "16", "--wait-idle", "1", "--json", out)
    results = figures(out, api)
    for kind in ("chat", api, "chat stream", f"{api} stream"):
        assert results[kind]["tok_s"] > 0 and results[kind]["tokens"] == [16], kind  # the same greedy tokens
    assert results[f"{api} stream"]["ttft_s"] > 0 and f"{api} / chat stream:" in run.stdout


def test_tokentime_benchmark_runs(tmp_path):
    out = tmp_path / "tokentime.json"
    run = bench("tokentime", "--tokens", "16", "--reps", "1", "--json", out)
    layers = figures(out, "tokentime")
    assert list(layers) == ["C loop", "engine", "engine, not streamed"]
    assert 0 < layers["C loop"]["llama_decode_us"] < layers["C loop"]["us_per_token"]
    assert all(layer["us_per_token"] > 0 for layer in layers.values()) and "engine, not streamed" in run.stdout


def test_kvcache_benchmark_runs(tmp_path):
    out = tmp_path / "kvcache.json"
    run = bench("kvcache", "--types", "f16,q8_0", "--prompts", "2", "--tokens", "8", "--reps", "1", "--json", out)
    types = figures(out, "kvcache")
    assert types["f16"]["answers_equal_to_f16"] == 2 and types["f16"]["first_differences"] == []
    assert all(types[kv]["context_anon_mib"] > 0 and types[kv]["tps"] > 0 for kv in ("f16", "q8_0"))
    assert "q8_0" in run.stdout


def test_store_benchmark_runs(tmp_path):
    out = tmp_path / "store.json"
    run = bench("store", "--rounds", "1", "--requests", "2", "--wait-idle", "1", "--json", out)
    results = figures(out, "store")
    for store in ("memory", "redis"):
        assert all(results[store][kind] > 0 for kind in ("create", "continue", "get")), store
    assert "redis / memory" in run.stdout


def test_hardening_benchmark_runs(tmp_path):
    out = tmp_path / "hardening.json"
    run = bench("hardening", "--renders", "3", "--tokens", "50", "--slow-clients", "4", "--attack-seconds", "1",
                "--neighbour-tokens", "8", "--beside", "1", "--gbnf-seconds", "1", "--json", out, timeout=900)
    results = figures(out, "hardening")
    assert set(results["stop scan, µs a token (four stop strings of)"]) == {"0 chars", "100 chars", "1000 chars"}
    assert results["render process RSS, MB"] > 0 and "render process" in run.stdout
    attacked = results["while 4 clients send slow renders"]
    assert attacked["ordinary renders"] > 0 and 1 <= attacked["render processes at most"] <= 1 + MAX_SLOW_RENDERS
    masks = results["grammar mask a token, along an answer, over random logits"]
    assert masks["JSON mode"]["llguidance (now)"]["tokens"] > 0 and masks["JSON mode"]["llama.cpp grammar (before)"]["tokens"] > 0
    assert all(tokens_per_s > 0 for tokens_per_s in results["neighbour stream, tokens/s"].values())


def needs_llama_server() -> None:
    """The benchmarks against llama-server need it built (`python -m bench compare` builds it once,
    10-15 minutes): skipped where nobody has built it."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gguf-serve" / "llama-server-build" / "bin"
    if not all(os.access(cache / tool, os.X_OK) for tool in ("llama-server", "llama-batched-bench")):
        pytest.skip(f"llama-server is not built in {cache}: python -m bench compare builds it")


def test_paired_benchmark_runs(tmp_path):
    """Every headline figure of gguf-serve and llama-server -np 4, pair by pair."""
    needs_llama_server()
    out = tmp_path / "paired.json"
    run = bench("paired", "--pairs", "1", "--max-tokens", "16", "--no-build", "--wait-idle", "2", "--json", out,
                timeout=900)
    [pair] = figures(out, "paired")["pairs"]
    assert pair["tokens_ok"]
    for figure in ("nonstream_tps", "stream_tps", "ttft_ms", "first_answer_s", "peak_rss_mb", "agg_tps"):
        assert all(pair["figures"][figure][name] > 0 for name in ("gguf-serve", "llama-server-np4")), figure
        assert pair["ratios"][figure] > 0
    assert "Headline figures" in run.stdout and "start → first answer" in run.stdout


def test_coldstart_benchmark_runs(tmp_path):
    """Fresh starts of both servers pair by pair, where gguf-serve's start goes, memory by kind."""
    needs_llama_server()
    out = tmp_path / "coldstart.json"
    run = bench("coldstart", "--pairs", "1", "--cache", "warm", "--runs", "1", "--no-build", "--wait-idle", "2",
                "--json", out, timeout=600)
    results = figures(out, "coldstart")
    [pair] = results["warm"]["pairs"]
    for name in ("gguf-serve", "llama-server"):
        start = pair[name]
        assert 0 < start["http_up_s"] <= start["ready_s"] <= start["first_answer_s"] and start["rss_mib"] > 0, name
        memory = results["memory"][name]
        kinds = memory["by_class"]
        assert kinds["model file"]["rss_mib"] > 0 and kinds["big anonymous (llama.cpp buffers)"]["rss_mib"] > 0, name
        assert abs(sum(c["pss_mib"] for c in memory["by_class"].values()) - memory["pss_mib"]) < 0.01, name
    assert pair["ratios"]["first_answer_s"] > 0 and "cold" not in results
    where = results["where_gguf_serve_start_goes"]
    assert where["import_time"]["ms"]["litestar"] > 0 and where["phases_s"]["Model(...)"] > 0
    assert results["memory"]["kv_cache_f16"]["mib"] > 0
    assert "gguf-serve / llama-server, first_answer: median" in run.stdout and "sum over the process tree" in run.stdout


def test_threadtime_benchmark_runs(tmp_path):
    needs_llama_server()
    out = tmp_path / "threadtime.json"
    run = bench("threadtime", "--rounds", "1", "--requests", "1", "--max-tokens", "16", "--wait-idle", "2", "--floor",
                "--no-build", "--json", out)
    table = run.stdout[run.stdout.index("Medians of 1 rounds"):].splitlines()[2:8]
    assert [line.split()[:2] for line in table] == [["gguf-serve", "streamed"], ["gguf-serve", "not"],
                                                   ["llama-server", "streamed"], ["llama-server", "not"],
                                                   ["floor", "streamed"], ["floor", "not"]]
    assert figures(out, "threadtime")["floor, streamed"]["tok_s"] > 0


def test_split_benchmark_runs(tmp_path):
    needs_llama_server()
    out = tmp_path / "split.json"
    run = bench("split", "--pairs", "1", "--max-tokens", "16", "--wait-idle", "2", "--no-build", "--json", out)
    for kind in ("Not streamed", "Streamed"):
        table = run.stdout[run.stdout.index(f"{kind}, 1 pairs"):].splitlines()[1:5]
        parts = {line[2:29].strip(): line[29:].split() for line in table}
        assert list(parts) == ["whole request (client)", "first token (server)", "a token after it (server)", "outside the server"]
        mine, theirs = (float(x) for x in parts["a token after it (server)"][:2])
        assert mine > 0 and theirs > 0
        assert all(row[2] == "ratio" for what, row in parts.items() if what != "outside the server")
    assert figures(out, "split")["streamed"]["token_ms"]["ratio"] > 0


def test_multiturn_benchmark_runs(tmp_path):
    """Conversations outnumbering the slots on both servers and through a fleet of two, then a long
    prompt alone and beside a stream."""
    needs_llama_server()
    out = tmp_path / "multiturn.json"
    run = bench("multiturn", "--conversations", "3", "--turns", "2", "--parallel", "2", "--max-tokens", "8",
                "--system-tokens", "200", "--long-prompt", "300", "--long-ctx", "1024", "--long-rounds", "1",
                "--beside", "1", "--no-build", "--wait-idle", "1", "--json", out, timeout=900)
    results = figures(out, "multiturn")
    [pair] = results["multiturn"]["3 conversations"]
    for name in ("gguf-serve", "llama-server"):
        r = pair[name]
        assert len(r["turns"]) == 6 and all(t["prompt_tokens"] > 200 for t in r["turns"]), name
        assert 0 <= r["cached_share"] <= 1 and r["wall_s"] > 0 and len(r["ttft_median_s_by_turn"]) == 2, name
        assert r["memory"]["rss_turn3_mib"] > 0 and r["memory"]["peak_rss_mib"] + 0.1 >= r["memory"]["rss_end_mib"] > 0, name  # peak: to 0.1 MiB
    # every second turn's history was computed before: it is reused (from a slot or the prompt cache)
    assert all(t["cached_tokens"] > 0 for t in pair["gguf-serve"]["turns"] if t["turn"] == 2)
    assert pair["gguf-serve"]["memory"]["gguf_prompt_cache_max_bytes"] > 0
    assert pair["wall_ratio"] > 0
    # the same conversations through 2 instances behind nginx (deploy/nginx.conf), a slot each
    fleet = results["fleet"]
    assert (fleet["instances"], fleet["slots_each"]) == (2, 1)
    turns = fleet["3 conversations"]["turns"]
    assert len(turns) == 6 and all(t["cached_tokens"] > 0 for t in turns if t["turn"] == 2)
    kinds = [(p["gguf-serve"]["beside_streams"], p["prompt_tps_ratio"] > 0) for p in results["long prompt"]["rounds"]]
    assert kinds == [(0, True), (1, True)]
    assert "Multi-turn" in run.stdout and "behind nginx" in run.stdout and "A long prompt" in run.stdout
