"""Compressed request bodies on the real server: every POST route answers a gzip, deflate or zstd
body exactly as the same body sent as it is, the openai and anthropic SDKs send them through a
compressing transport, bombs are a 413 once MAX_BODY_BYTES are decoded (the server's memory
grows by less than twice that, and a neighbouring stream goes on), an unknown coding is a 415
naming the supported ones, and a stream that isn't one is a 400."""

from __future__ import annotations

import gzip
import importlib
import json
import struct
import threading
import time
import zlib
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
import zstandard

from conftest import MODEL, Server
from gguf_serve.service import ROUTES

LIMIT = 8 << 20  # MAX_BODY_BYTES here: the gzip bomb (2 MB on the wire) fits under it, its 2 GiB don't
COMPRESS = {"gzip": gzip.compress, "deflate": zlib.compress, "zstd": zstandard.ZstdCompressor().compress}
HELLO = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def served():
    s = Server({"N_THREADS": "2", "MAX_BODY_BYTES": str(LIMIT)}).wait_ready()
    yield s
    s.stop()


def post(server: Server, path: str, body: bytes, coding: str | None) -> httpx.Response:
    headers = {"content-type": "application/json", **({"content-encoding": coding} if coding else {})}
    return httpx.post(f"{server.url}{path}", content=body, headers=headers, timeout=120)


# --- every POST route, each coding: the same answer ---

# A body for each POST route. /apply-template's is 100 KB, so that it arrives in several pieces and is decoded in
# several (zlib's are 64 KiB, zstd's input slices 32 bytes).
BODIES = {
    "/v1/chat/completions": {"model": MODEL, "messages": HELLO, "max_tokens": 8, "temperature": 0},
    "/v1/completions": {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0},
    "/apply-template": {"messages": [{"role": "user", "content": "a long file " * 8000}]},
    "/v1/responses": {"model": MODEL, "input": "Say hello.", "max_output_tokens": 8, "temperature": 0},
    "/v1/responses/input_tokens": {"model": MODEL, "input": "Say hello."},
    "/v1/embeddings": {"model": MODEL, "input": ["a text", "another"]},
    "/v1/messages": {"model": MODEL, "messages": HELLO, "max_tokens": 8, "temperature": 0},
    "/v1/messages/count_tokens": {"model": MODEL, "messages": HELLO},
}
BODY = json.dumps(BODIES["/v1/chat/completions"]).encode()
# What differs between two answers to the same request: ids, times, and the prompt tokens the second found cached
VOLATILE = {"id", "created", "created_at", "completed_at", "cached_tokens", "cache_read_input_tokens"}


def comparable(answer):
    if isinstance(answer, dict):
        return {key: comparable(value) for key, value in answer.items() if key not in VOLATILE}
    if isinstance(answer, list):
        return [comparable(value) for value in answer]
    return answer


def test_every_post_route_is_in_the_table():
    assert {route.path for route in ROUTES if route.method == "POST"} == set(BODIES)


@pytest.mark.parametrize("coding", COMPRESS)
@pytest.mark.parametrize("path", BODIES)
def test_a_compressed_body_is_answered_as_the_same_body_sent_as_it_is(served, path, coding):
    body = json.dumps(BODIES[path]).encode()
    plain = post(served, path, body, None)
    compressed = post(served, path, COMPRESS[coding](body), coding)
    assert plain.status_code == compressed.status_code == 200, compressed.text
    assert comparable(compressed.json()) == comparable(plain.json())


def test_identity_and_x_gzip_are_codings_too(served):
    body = json.dumps(BODIES["/v1/messages/count_tokens"]).encode()
    expected = post(served, "/v1/messages/count_tokens", body, None).json()
    assert post(served, "/v1/messages/count_tokens", body, "identity").json() == expected
    assert post(served, "/v1/messages/count_tokens", gzip.compress(body), "x-gzip").json() == expected
    assert post(served, "/v1/messages/count_tokens", gzip.compress(body), "Identity, GZIP").json() == expected


# --- the SDKs, sending through a transport that compresses ---


def compressing(sdk, coding: str):
    """An http client for `sdk` (of the httpx package it sends with: httpx2 in anthropic's and openai's
    latest) whose transport sends every request's body in `coding`, as Codex CLI sends zstd; and that
    transport, which counts them in `sent`."""
    http = importlib.import_module(sdk.DefaultHttpxClient.__mro__[1].__module__.partition(".")[0])

    class Compressing(http.BaseTransport):
        sent, inner = 0, http.HTTPTransport()

        def handle_request(self, request):
            headers = [(k, v) for k, v in request.headers.multi_items() if k.lower() != "content-length"]
            compressed = http.Request(request.method, request.url, headers=[*headers, ("content-encoding", coding)],
                                      content=COMPRESS[coding](request.read()), extensions=request.extensions)
            self.sent += 1
            return self.inner.handle_request(compressed)

    transport = Compressing()
    return http.Client(transport=transport), transport


def test_the_openai_sdk_sending_gzip_bodies(served):
    client, transport = compressing(openai, "gzip")
    packed = openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0, timeout=120,
                           http_client=client)
    plain = openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0, timeout=120)
    ask = {"model": MODEL, "messages": HELLO, "max_tokens": 12, "temperature": 0}
    expected = plain.chat.completions.create(**ask)
    answer = packed.chat.completions.create(**ask)
    assert answer.choices[0].message.content == expected.choices[0].message.content
    assert answer.usage.prompt_tokens == expected.usage.prompt_tokens
    chunks = list(packed.chat.completions.create(**ask, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.choices[0].message.content
    response = packed.responses.create(model=MODEL, input="Say hello.", max_output_tokens=12, temperature=0)
    assert response.output_text == plain.responses.create(model=MODEL, input="Say hello.", max_output_tokens=12,
                                                          temperature=0).output_text
    assert transport.sent == 3


def test_the_anthropic_sdk_sending_zstd_bodies(served):
    client, transport = compressing(anthropic, "zstd")
    packed = anthropic.Anthropic(base_url=served.url, api_key="unused", max_retries=0, timeout=120, http_client=client)
    plain = anthropic.Anthropic(base_url=served.url, api_key="unused", max_retries=0, timeout=120)
    ask = {"model": MODEL, "messages": HELLO, "max_tokens": 12, "extra_body": {"temperature": 0}}
    expected = plain.messages.create(**ask)
    with packed.messages.stream(**ask) as stream:
        streamed = stream.get_final_message()
    assert streamed.content[0].text == expected.content[0].text
    assert streamed.usage.input_tokens == expected.usage.input_tokens
    assert packed.messages.count_tokens(model=MODEL, messages=HELLO).input_tokens == expected.usage.input_tokens
    assert transport.sent == 2


# --- bombs ---


def gzip_of_zeros(mib: int) -> bytes:
    """`mib` MiB of zeros as one gzip stream, made in a second for 2 GiB where zlib takes 12: after
    a full flush deflate starts afresh, so every further MiB of zeros compresses to the same bytes,
    made once and repeated. (Deflate's ratio is 1032 at most: 2 GiB are 2 MB on the wire.)"""
    zeros = bytes(1 << 20)
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)  # raw deflate: gzip's header and trailer below
    first, again, third = (deflate.compress(zeros) + deflate.flush(zlib.Z_FULL_FLUSH) for _ in range(3))
    assert again == third
    crc = 0
    for _ in range(mib):
        crc = zlib.crc32(zeros, crc)
    header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"  # magic, deflate, no flags or time, level 9, unknown OS
    return header + first + again * (mib - 1) + deflate.flush() + struct.pack("<II", crc, (mib << 20) & 0xFFFFFFFF)


def zstd_of_zeros(mib: int) -> bytes:
    """`mib` MiB of zeros as one zstd frame: each MiB flushed as blocks of its own is the same RLE
    blocks (4 bytes for 128 KiB), made once and repeated. 10 GiB are 330 KB on the wire."""
    frame = zstandard.ZstdCompressor().compressobj()
    zeros = bytes(1 << 20)
    first, again, third = (frame.compress(zeros) + frame.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK) for _ in range(3))
    assert again == third
    return first + again * (mib - 1) + frame.flush()


def test_the_bombs_are_what_they_say():
    assert gzip.decompress(gzip_of_zeros(3)) == bytes(3 << 20)
    assert zstandard.ZstdDecompressor().decompressobj().decompress(zstd_of_zeros(3)) == bytes(3 << 20)


def worker(server: Server) -> str:
    """The pid of the process that serves the app (granian's worker)."""
    [pid] = Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children").read_text().split()
    return pid


def memory(server: Server, field: str) -> int:
    """A memory figure of /proc/<pid>/status of the server's worker (VmRSS, VmHWM), in bytes."""
    return int(Path(f"/proc/{worker(server)}/status").read_text().split(f"{field}:")[1].split()[0]) * 1024


def test_bombs_are_a_413_while_a_neighbour_streams_and_memory_stays_bounded(served):
    bombs = [("/v1/chat/completions", "gzip", gzip_of_zeros(2 << 10)),  # 2 GiB
             ("/v1/messages", "zstd", zstd_of_zeros(10 << 10)),  # 10 GiB
             ("/v1/responses", "zstd", zstd_of_zeros(10 << 10))]
    assert all(len(bomb) < LIMIT for _, _, bomb in bombs)  # on the wire, under MAX_BODY_BYTES: decoded, far over
    endless = {"model": MODEL, "messages": [{"role": "user", "content": "Write a long story."}], "max_tokens": 1900,
               "temperature": 0, "stream": True, "logit_bias": {"0": -100, "2": -100}}  # no end-of-text, no <|im_end|>
    tokens, stop = [], threading.Event()

    def neighbour():
        with httpx.stream("POST", f"{served.url}/v1/chat/completions", json=endless, timeout=120) as stream:
            for line in stream.iter_lines():
                if stop.is_set():
                    return
                tokens.append(line)

    reader = threading.Thread(target=neighbour)
    reader.start()
    try:
        wait_until(lambda: len(tokens) > 3)
        Path(f"/proc/{worker(served)}/clear_refs").write_text("5")  # VmHWM, the peak resident memory, starts again now
        before = memory(served, "VmRSS")
        for path, coding, bomb in bombs:
            r = post(served, path, bomb, coding)
            assert r.status_code == 413, r.text
            error = r.json()["error"]  # Anthropic's shape on /v1/messages, OpenAI's elsewhere
            if path == "/v1/messages":
                assert error["type"] == "request_too_large"
            else:
                assert error["code"] == "request_too_large"
            assert error["message"] == (f"request body larger than {LIMIT} bytes (MAX_BODY_BYTES) "
                                        f"once decoded from {coding}")
            seen = len(tokens)
            wait_until(lambda: len(tokens) > seen)  # the neighbour's stream goes on
        assert memory(served, "VmHWM") - before < 2 * LIMIT
    finally:
        stop.set()
        reader.join()
    served.wait_metric("gguf_running", 0)
    assert post(served, "/v1/chat/completions", gzip.compress(BODY), "gzip").status_code == 200


def wait_until(condition, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "never happened"
        time.sleep(0.01)


# --- what isn't a body in a coding this server decodes ---


@pytest.mark.parametrize("coding", ["br", "gzip, zstd", "compress"])
def test_a_coding_not_supported_is_a_415_naming_those_that_are(served, coding):
    body = json.dumps(BODIES["/v1/chat/completions"]).encode()
    r = post(served, "/v1/chat/completions", body, coding)
    assert r.status_code == 415 and r.headers["accept-encoding"] == "gzip, deflate, zstd"
    assert r.json()["error"] == {"message": f"Content-Encoding `{coding}` is not supported: encode the body in one of "
                                            "gzip, deflate, zstd, or not at all",
                                 "type": "invalid_request_error", "param": None, "code": "unsupported_content_encoding"}
    r = post(served, "/v1/messages", json.dumps(BODIES["/v1/messages"]).encode(), coding)
    assert r.status_code == 415 and r.json()["type"] == "error" and r.json()["error"]["type"] == "invalid_request_error"


NOT_ZLIB = "Error -3 while decompressing data: incorrect header check"
ULTRA = zstandard.ZstdCompressor(level=20).compressobj()  # streamed with no size: its frame asks a 32 MiB window
NOT_STREAMS = {  # a body, the coding it is sent as, and what the 400 says
    "cut short": (gzip.compress(BODY)[:-12], "gzip", "the gzip body ends before its stream does"),
    "zstd cut short": (COMPRESS["zstd"](BODY)[:-3], "zstd", "the zstd body ends before its stream does"),
    "empty": (b"", "gzip", "the gzip body ends before its stream does"),
    "not gzip": (BODY, "gzip", f"the body can't be decoded as gzip: {NOT_ZLIB}"),
    "zstd labelled gzip": (COMPRESS["zstd"](BODY), "gzip", f"the body can't be decoded as gzip: {NOT_ZLIB}"),
    "gzip labelled zstd": (gzip.compress(BODY), "zstd",
                           "the body can't be decoded as zstd: zstd decompressor error: Unknown frame descriptor"),
    "raw deflate": (COMPRESS["deflate"](BODY)[2:], "deflate", f"the body can't be decoded as deflate: {NOT_ZLIB}"),
    "more after the stream": (gzip.compress(BODY) * 2, "gzip",
                              "the body goes on after the end of its gzip stream (one gzip stream is a body)"),
    "more after the frame": (COMPRESS["zstd"](BODY) + b"\0", "zstd",
                             "the body goes on after the end of its zstd stream (one zstd stream is a body)"),
    "a window over 8 MiB": (ULTRA.compress(BODY) + ULTRA.flush(), "zstd",
                            "the body can't be decoded as zstd: zstd decompressor error: Frame requires too much "
                            "memory for decoding"),
}


@pytest.mark.parametrize("case", NOT_STREAMS)
def test_a_body_that_isnt_a_stream_of_its_coding_is_a_400(served, case):
    body, coding, message = NOT_STREAMS[case]
    r = post(served, "/v1/chat/completions", body, coding)
    assert r.status_code == 400 and r.json()["error"] == {"message": message, "type": "invalid_request_error",
                                                          "param": None, "code": None}
    r = post(served, "/v1/messages", body, coding)
    assert r.status_code == 400 and r.json() == {"type": "error", "error": {"type": "invalid_request_error",
                                                                            "message": message}}
