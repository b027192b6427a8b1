"""The benchmark script runs in CI's environment. It asserts nothing about speed (figures
vary with the machine); only that it measures and that every run produced its tokens."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

pytestmark = pytest.mark.bench  # smoke tests of the benchmark scripts: `-m "not bench"` skips them


def test_quick_benchmark_runs(tmp_path):
    out = tmp_path / "results.json"
    run = subprocess.run([sys.executable, ROOT / "bench" / "bench.py", "--quick", "--servers", "gguf-serve,raw",
                          "--json", str(out), "--wait-idle", "10"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads(out.read_text())
    for name in ("gguf-serve", "raw"):
        runs = results[name]["nonstream"]["runs"] + results[name]["stream"]["runs"]
        assert runs and all(r["tokens"] == 128 for r in runs)
        assert results[name]["first_answer_s"] > 0  # process start -> first answer
    assert results["gguf-serve"]["models"]["rps"] > 0 and results["gguf-serve"]["peak_rss"]["total_mb"] > 0
    assert "Token check" in run.stdout


def test_join_benchmark_runs():
    run = subprocess.run([sys.executable, ROOT / "bench" / "join.py", "--servers", "gguf-serve", "--rounds", "1",
                          "--prompt-tokens", "300"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "round 1: longest pause" in run.stdout
    assert run.stdout.splitlines()[-1].startswith("gguf-serve ")


def test_embeddings_benchmark_runs(tmp_path):
    out = tmp_path / "embeddings.json"
    run = subprocess.run([sys.executable, ROOT / "bench" / "embeddings.py", "--servers", "gguf-serve", "--pairs", "1",
                          "--short", "8", "--long", "2", "--long-tokens", "120", "--wait-idle", "10", "--json", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["short"]["gguf-serve"] > 0 and results["long"]["gguf-serve"] > 0
    assert results["gguf-serve"]["rss_after_mb"] > 0
    assert "8 short texts" in run.stdout and "gguf-serve resident memory" in run.stdout


def test_hardening_benchmark_runs(tmp_path):
    out = tmp_path / "hardening.json"
    run = subprocess.run([sys.executable, ROOT / "bench" / "hardening.py", "--renders", "3", "--tokens", "50",
                          "--out", out], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    figures = json.loads(out.read_text())
    assert set(figures["stop scan, µs a token (four stop strings of)"]) == {"0 chars", "100 chars", "1000 chars"}
    assert figures["render process RSS, MB"] > 0 and "render process" in run.stdout


def needs_llama_server() -> None:
    """The benchmarks against llama-server need it built (`python bench/bench.py` builds it once,
    10-15 minutes): skipped where nobody has built it."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gguf-serve" / "llama-server-build" / "bin"
    if not all(os.access(cache / tool, os.X_OK) for tool in ("llama-server", "llama-batched-bench")):
        pytest.skip(f"llama-server is not built in {cache}: python bench/bench.py builds it")


def test_paired_benchmark_runs(tmp_path):
    """--paired: every headline figure of gguf-serve and llama-server -np 4, pair by pair."""
    needs_llama_server()
    out = tmp_path / "paired.json"
    run = subprocess.run([sys.executable, ROOT / "bench" / "bench.py", "--paired", "1", "--max-tokens", "16", "--no-build",
                          "--wait-idle", "2", "--json", str(out)], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    [pair] = json.loads(out.read_text())["paired"]["pairs"]
    assert pair["tokens_ok"]
    for figure in ("nonstream_tps", "stream_tps", "ttft_ms", "first_answer_s", "peak_rss_mb", "agg_tps"):
        assert all(pair["figures"][figure][name] > 0 for name in ("gguf-serve", "llama-server-np4")), figure
        assert pair["ratios"][figure] > 0
    assert "Headline figures" in run.stdout and "start → first answer" in run.stdout


def test_threadtime_benchmark_runs():
    needs_llama_server()
    run = subprocess.run([sys.executable, ROOT / "bench" / "threadtime.py", "--rounds", "1", "--requests", "1",
                          "--max-tokens", "16", "--wait-idle", "2", "--floor"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    table = run.stdout[run.stdout.index("Medians of 1 rounds"):].splitlines()[2:]
    assert [line.split()[:2] for line in table] == [["gguf-serve", "streamed"], ["gguf-serve", "not"],
                                                   ["llama-server", "streamed"], ["llama-server", "not"],
                                                   ["floor", "streamed"], ["floor", "not"]]


def test_split_benchmark_runs():
    needs_llama_server()
    run = subprocess.run([sys.executable, ROOT / "bench" / "split.py", "--pairs", "1", "--max-tokens", "16",
                          "--wait-idle", "2"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for kind in ("Not streamed", "Streamed"):
        table = run.stdout[run.stdout.index(f"{kind}, 1 pairs"):].splitlines()[1:5]
        parts = {line[2:29].strip(): line[29:].split() for line in table}
        assert list(parts) == ["whole request (client)", "first token (server)", "a token after it (server)", "outside the server"]
        mine, theirs = (float(x) for x in parts["a token after it (server)"][:2])
        assert mine > 0 and theirs > 0
        assert all(row[2] == "ratio" for what, row in parts.items() if what != "outside the server")
