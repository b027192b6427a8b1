"""Tried as an attacker would, on the real stack (issue #25): one section per hardening item,
each test failing on the code before its fix, and the hostile-request corpus in tests/hostile/
(one JSON file a request) run against one keyed server.

A corpus file: {"method", "path", "headers" (added to the key's), "auth" (false: send no key),
"json" (a body to encode) or "body" (sent as it is), "expand" ({"MARK": [text, times]}: MARK in
path and body becomes text repeated), "status", and optionally "code" and "param" of the error}.
Every answer of 400 or more must be OpenAI's error object; the server answers a chat afterwards.
"""

from __future__ import annotations

import http.client
import json
from pathlib import Path

import httpx
import pytest

from conftest import Server

MODEL = "smollm2-135m-instruct"
KEY = "sk-hostile-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
CORPUS = sorted((Path(__file__).parent / "hostile").glob("*.json"))


@pytest.fixture(scope="module")
def keyed():
    """One server with an API key: what the corpus and the key tests run against."""
    s = Server({"N_THREADS": "2", "API_KEY": KEY, "REQUEST_TIMEOUT_S": "20"}).wait_ready()
    yield s
    s.stop()


def raw_request(url: str, method: str, path: str, headers: dict[str, str], body: bytes | None,
                timeout: float = 60) -> tuple[int, bytes]:
    """One request with its path sent exactly as given (httpx and the SDKs normalize paths)."""
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        connection.putrequest(method, path, skip_accept_encoding=True)
        for name, value in {**({"Content-Type": "application/json"} if body is not None else {}), **headers}.items():
            connection.putheader(name, value)
        connection.putheader("Content-Length", str(len(body or b"")))
        connection.endheaders(body)
        answer = connection.getresponse()
        return answer.status, answer.read()
    finally:
        connection.close()


def corpus_request(case: dict) -> tuple[str, str, dict[str, str], bytes | None]:
    def expand(text: str) -> str:
        for mark, (piece, times) in case.get("expand", {}).items():
            text = text.replace(mark, piece * times)
        return text

    headers = {**(AUTH if case.get("auth", True) else {}), **case.get("headers", {})}
    if "json" in case:
        body = expand(json.dumps(case["json"])).encode()
    else:
        body = expand(case["body"]).encode() if "body" in case else None
    return case["method"], expand(case["path"]), headers, body


def assert_openai_error(status: int, body: bytes, code: str | None = None, param: str | None = None) -> dict:
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["type"] == ("server_error" if status >= 500 else "invalid_request_error" if status != 429
                             else "rate_limit_exceeded")
    if code is not None:
        assert error["code"] == code, error
    if param is not None:
        assert error["param"] == param, error
    return error


@pytest.mark.parametrize("path", CORPUS, ids=[p.stem for p in CORPUS])
def test_hostile_corpus(keyed, path):
    case = json.loads(path.read_text())
    status, body = raw_request(keyed.url, *corpus_request(case))
    assert status == case["status"], body[:500]
    if status >= 400:
        assert_openai_error(status, body, case.get("code"), case.get("param"))
    assert keyed.proc.poll() is None, "the server died"


def test_after_the_corpus_the_server_still_answers(keyed):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3, "temperature": 0}
    r = httpx.post(f"{keyed.url}/v1/chat/completions", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    assert keyed.metric("gguf_running") == 0 and keyed.metric("gguf_queue_depth") == 0


# --- 1. The API key is decided on the path as routed ------------------------------------------
