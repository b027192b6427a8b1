"""The benchmark script runs in CI's environment. It asserts nothing about speed (figures
vary with the machine); only that it measures and that every run produced its tokens."""

import json
import subprocess
import sys

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
