"""Connections a client opens and leaves (issue 34, item 2): idle sockets and trickled bodies
must neither keep /health and /ready from answering nor be held for ever, in both ways of
running the server, `gguf-serve` (granian embedded) and `granian --interface asgi service:app`.

Before the fix, 128 silent sockets kept `gguf-serve`'s /health from being answered (its
embedded granian held 128 connections), and with granian's command (1024 held) no silent
socket and no trickled body was ever closed.

This test process holds 700 sockets at once: it raises its own soft limit on open files
(RLIMIT_NOFILE) to fit them; the server raises its own (connections.raise_fd_limit).
"""

from __future__ import annotations

import json
import resource
import select
import socket
import time

import httpx
import pytest
from openai import OpenAI

from conftest import CLI, GRANIAN, MODEL, Server

IDLE, TRICKLING = 500, 200
# The servers' timeouts, short for the test yet long against what runs while the sockets must
# still be open (opening them, five probes, five streamed tokens: about a second here).
TIMEOUT_S = 15
CHAT_HEAD = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
             b"Content-Length: 100000\r\n\r\n{")


@pytest.fixture(scope="module", autouse=True)
def enough_files():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = 2 * (IDLE + TRICKLING)  # and room for the rest
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"the hard limit on open files ({hard}) is under the {needed} this test holds")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, needed), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=30)


def closed_by_server(sock: socket.socket, received: bytearray) -> bool:
    """Reads what `sock` has (it is readable): True once the server has closed it (EOF or reset)."""
    try:
        data = sock.recv(65536)
    except ConnectionResetError:
        return True
    received += data
    return not data


@pytest.mark.parametrize("command", [CLI, GRANIAN], ids=["gguf-serve", "granian"])
def test_idle_and_trickling_connections_neither_block_the_probes_nor_stay_open(command):
    server = Server({"N_THREADS": "2", "IDLE_TIMEOUT_S": str(TIMEOUT_S), "BODY_TIMEOUT_S": str(TIMEOUT_S)},
                    command=command).wait_ready()
    idle, trickling = [], []
    received: dict[socket.socket, bytearray] = {}
    try:
        idle = [connect(server.port) for _ in range(IDLE)]  # connected, sending nothing
        for _ in range(TRICKLING):  # a chat's head, then its body a byte at a time
            sock = connect(server.port)
            sock.sendall(CHAT_HEAD)
            trickling.append(sock)
        opened = time.monotonic()
        received = {sock: bytearray() for sock in idle + trickling}

        client = OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)
        stream = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Count from 1 to 100."}], max_tokens=200, temperature=0,
            stream=True)
        chunks = iter(stream)
        try:
            for _ in range(5):  # each probe answered between two streamed tokens
                assert next(c for c in chunks if c.choices and c.choices[0].delta.content)
                assert httpx.get(f"{server.url}/health", timeout=60).status_code == 200
                assert httpx.get(f"{server.url}/ready", timeout=60).status_code == 200
        finally:
            stream.close()
        readable, _, _ = select.select(idle + trickling, [], [], 0)
        assert not readable, (f"{len(readable)} sockets closed or answered {time.monotonic() - opened:.1f} s after "
                              f"they opened, before the {TIMEOUT_S} s timeouts")

        # Then the server closes every one of them: the trickling ones with a 408.
        still_open = set(idle + trickling)
        deadline = time.monotonic() + TIMEOUT_S + 60
        while still_open and time.monotonic() < deadline:
            readable, _, _ = select.select(list(still_open), [], [], 0.5)
            still_open -= {sock for sock in readable if closed_by_server(sock, received[sock])}
            for sock in still_open.intersection(trickling).difference(readable):
                try:
                    sock.send(b" ")
                except OSError:  # reset: the server closed it; the next select reads the end
                    pass
        assert not still_open, f"{len(still_open)} of {IDLE + TRICKLING} connections still open"
        assert not any(received[sock] for sock in idle)
        answers = [bytes(received[sock]) for sock in trickling if received[sock]]
        assert answers, "no trickled request was answered before its connection closed"
        for answer in answers:
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 408 ") and b"\r\nconnection: close" in head.lower()
            assert json.loads(body)["error"] == {
                "message": f"the request body did not arrive within {TIMEOUT_S} s (BODY_TIMEOUT_S)",
                "type": "invalid_request_error", "param": None, "code": "body_timeout"}
        assert httpx.get(f"{server.url}/ready", timeout=60).status_code == 200
    finally:
        for sock in idle + trickling:
            sock.close()
        server.stop()
