"""Schemathesis against a real granian process: request bodies generated from the server's own
OpenAPI document (itself generated from the route table and the structs that decode them), valid
and invalid, on every route the server has. Nothing may answer 5xx or hang, and the server must
still serve afterwards."""

import collections
import json
import subprocess
import sys

import httpx

from gguf_serve.routes import endpoint_namer
from conftest import MODEL, Server
from gguf_serve.service import ROUTES


def test_fuzzed_requests_get_no_5xx_and_no_hang(tmp_path):
    # A request's work is bounded whatever the host's speed: a generation the fuzzer asks for ends
    # within 5 s, and an embedding request holds at most 64 tokens (a 2,047-token one timed out the
    # fuzzer's 60 s on a loaded host; it has no time limit that is not a 5xx).
    s = Server({"N_THREADS": "2", "REQUEST_TIMEOUT_S": "5", "EMBEDDINGS_MAX_TOKENS": "64"}).wait_ready()
    har, schema = tmp_path / "fuzz.har", tmp_path / "openapi.json"
    schema.write_bytes(httpx.get(f"{s.url}/openapi.json", timeout=10).content)
    try:
        run = subprocess.run(
            # The document as a file: loaded from its URL, schemathesis selected 13 of the 14 operations.
            [sys.executable, "-m", "schemathesis.cli", "run", str(schema), "--url", s.url, "--checks", "not_a_server_error",
             "--max-examples", "25", "--request-timeout", "60", "--workers", "1", "--seed", "1", "--no-color",
             "--generation-database", "none", "--suppress-health-check", "all", "--report", "har",
             "--report-har-path", str(har)],
            capture_output=True, text=True, timeout=900, cwd=tmp_path)
        assert run.returncode == 0, run.stdout[-4000:]
        entries = json.loads(har.read_text())["log"]["entries"]
        endpoint = endpoint_namer(ROUTES)  # a path's route template (the ids in it vary), as in the metrics
        statuses = collections.Counter((e["request"]["method"], endpoint(e["request"]["url"].removeprefix(s.url).split("?")[0]),
                                        e["response"]["status"])
                                       for e in entries)
        print(sorted(statuses.items()))
        assert len(entries) > 500 and all(status < 500 for _, _, status in statuses)
        assert statuses[("POST", "/v1/chat/completions", 200)] and statuses[("POST", "/v1/completions", 200)]
        fuzzed = {(method, path) for method, path, _ in statuses}
        assert not {(route.method, route.template) for route in ROUTES} - fuzzed  # every route, GET and DELETE by id too
        s.wait_metric("gguf_running", 0, timeout=60)  # what the fuzzer left running ends by its time limit
        assert s.metric("gguf_queue_depth") == 0
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0}
        assert httpx.post(f"{s.url}/v1/chat/completions", json=body, timeout=60).json()["usage"]["completion_tokens"] == 3
    finally:
        s.stop()
