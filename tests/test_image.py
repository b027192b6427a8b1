"""The real container image: the Containerfile built with buildah (deploy/build-image.sh, on a
base made from Debian's packages) with a Hub model baked in (`--build-arg MODEL=hf:...`: SmolLM2's
GGUF pulled at build from a stand-in Hub on loopback, tests/hub_standin.py, which the build reaches
on the host's network), then run as its CMD says (its user, its environment,
PORT set) with `buildah run --isolation chroot` on the host's network: podman can't start
containers in this sandbox, buildah's chroot isolation can. The OpenAI SDK gets an answer
from it, and SIGTERM drains it. Printed (pytest shows it without -s): its start, phase by
phase, beside `buildah run`'s own; what it holds, part by part (deploy/image_contents.py)."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import httpx
import openai
import pytest

from conftest import ROOT, free_port, smollm2_path
from hub_standin import Repo, StandInHub

PREBUILT = os.environ.get("GGUF_SERVE_IMAGE")  # an image to test as it is; by default the Containerfile is built
IMAGE = PREBUILT or "localhost/gguf-serve:ci"
# The model CI bakes in: from the Hub, by name (one build covers the image and `--build-arg MODEL=hf:...`);
# a prebuilt image is asked which model it serves.
HUB_MODEL = "hf:org/smol-GGUF"
pytestmark = pytest.mark.skipif(os.environ.get("CI") != "true" and not os.environ.get("IMAGE_TEST"),
                                reason="builds the image (~5 min): runs in CI, or with IMAGE_TEST=1")


@pytest.fixture(scope="module")
def image() -> dict:
    """The image's config (buildah inspect), built first (buildah reuses unchanged layers)."""
    if not PREBUILT:
        hub = StandInHub({"org/smol-GGUF": Repo({"smol-Q4_1.gguf": smollm2_path()})})
        try:
            subprocess.run([ROOT / "deploy" / "build-image.sh", IMAGE, "--build-arg", "MODEL_PACKAGE=", "--build-arg",
                            f"MODEL={HUB_MODEL}", "--build-arg", f"HF_ENDPOINT={hub.url}"], check=True, timeout=3600)
        finally:
            hub.stop()
    inspect = subprocess.run(["buildah", "inspect", "--type", "image", IMAGE], capture_output=True, check=True, text=True)
    return json.loads(inspect.stdout)["OCIv1"]["config"]


def children(pid: int) -> list[int]:
    """Every descendant of `pid`, from /proc."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        frontier = [p for p, parent in parents.items() if parent in frontier]
        found += frontier
    return found


class Container:
    """One working container of the image, its CMD run as the image's USER with PORT set."""

    def __init__(self, config: dict, env: dict[str, str]):
        self.name = subprocess.run(["buildah", "from", "--quiet", IMAGE], capture_output=True, check=True,
                                   text=True).stdout.strip()
        self.log = open(f"/tmp/{self.name}.log", "w+")
        args = [a for k, v in env.items() for a in ("--env", f"{k}={v}")]
        self.started = time.monotonic()
        self.proc = subprocess.Popen(["buildah", "run", "--isolation", "chroot", *args, self.name, "--", *config["Cmd"]],
                                     stdout=self.log, stderr=subprocess.STDOUT)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def service_pid(self) -> int:
        """The CMD's process (PID 1 in a real runtime), the one SIGTERM is for."""
        for pid in children(self.proc.pid):  # the service (one process; under granian's CLI its main process comes first)
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv[0].endswith(b"python3") and argv[1].endswith(b"/bin/gguf-serve"):  # not buildah-chroot-exec's
                return pid
        raise AssertionError("the CMD's process is not running:\n" + self.output())

    def remove(self) -> None:
        if self.proc.poll() is None:
            for pid in [*children(self.proc.pid), self.proc.pid]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.proc.wait(timeout=10)
        subprocess.run(["buildah", "rm", self.name], capture_output=True)
        self.log.close()
        os.unlink(self.log.name)


def runtime_start_s(runs: int = 5) -> dict[str, float]:
    """How long `buildah run` takes to run a trivial command in a working container of the image
    (the median of `runs`): the container runtime's own share of the start figure, then that
    plus a bare interpreter's start, so that the rest is gguf-serve's."""
    name = subprocess.run(["buildah", "from", "--quiet", IMAGE], capture_output=True, check=True, text=True).stdout.strip()
    try:
        figures = {}
        for label, cmd in (("true", ["true"]), ("python3 -c pass", ["python3", "-c", "pass"])):
            times = []
            for _ in range(runs):
                began = time.monotonic()
                subprocess.run(["buildah", "run", "--isolation", "chroot", name, "--", *cmd], check=True, timeout=60)
                times.append(time.monotonic() - began)
            figures[label] = sorted(times)[runs // 2]
        return figures
    finally:
        subprocess.run(["buildah", "rm", name], capture_output=True)


def test_the_image_serves_as_its_cmd_says_and_drains_on_sigterm(image, capsys):
    assert image["User"] not in ("", "root", "0") and image["Cmd"] == ["gguf-serve"]
    runtime = runtime_start_s()
    port = free_port()
    # Loopback only; a grace long enough for the stream below on a busy machine.
    container = Container(image, {"PORT": str(port), "HOST": "127.0.0.1", "SHUTDOWN_GRACE_S": "30"})
    url = f"http://127.0.0.1:{port}"
    try:
        # Polled every 10 ms from the moment `buildah run` is spawned: the first HTTP answer
        # (503 while the model loads), then /ready's 200.
        http_up = None
        with httpx.Client(timeout=1) as poll:
            deadline = time.monotonic() + 180
            while True:
                assert container.proc.poll() is None and time.monotonic() < deadline, container.output()
                try:
                    status = poll.get(f"{url}/ready").status_code
                    http_up = http_up or time.monotonic() - container.started
                    if status == 200:
                        ready = time.monotonic() - container.started
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.01)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        [model] = [m.id for m in client.models.list().data]
        if not PREBUILT:  # the Hub model, served offline from the image's own cache
            assert model == HUB_MODEL.removeprefix("hf:") and '"event": "hub_cache"' in container.output()
        reply = client.chat.completions.create(model=model, max_tokens=1, temperature=0,
                                               messages=[{"role": "user", "content": "What is the capital of France?"}])
        first_answer = time.monotonic() - container.started
        assert reply.usage.completion_tokens == 1 and reply.choices[0].message.content
        [event] = [json.loads(line) for line in container.output().splitlines() if line.startswith('{"event":"ready"')]
        with capsys.disabled():  # shown by CI's plain `pytest` too, not only with -s
            print(f"\nimage {IMAGE}, start (`buildah run` spawned) -> HTTP up {http_up:.2f} s -> /ready 200 {ready:.2f} s"
                  f" -> first 1-token chat answer {first_answer:.2f} s; `buildah run` of `true` alone"
                  f" {runtime['true']:.2f} s, of `python3 -c pass` {runtime['python3 -c pass']:.2f} s (medians of 5)")
            print("the service's own account, seconds: " + ", ".join(f"{k} {v:.3f}" for k, v in event["seconds"].items()))

        pid = container.service_pid()
        status = Path(f"/proc/{pid}/status").read_text()
        uid = next(line.split()[1] for line in status.splitlines() if line.startswith("Uid:"))
        assert uid == image["User"].split(":")[0] or uid == "10001"  # the unprivileged user, not root
        assert httpx.get(f"{url}/openapi.json", timeout=10).status_code == 200  # no test-only package needed
        vectors = client.embeddings.create(model=model, input=["one", "two"]).data  # numpy's part of the image
        assert len(vectors) == 2 and len(vectors[0].embedding) > 0

        # SIGTERM while a stream runs: it finishes inside SHUTDOWN_GRACE_S (or, past it, ends
        # with an error event, never a silent cut), the instance stops being ready, and the
        # process exits 0.
        stream = client.chat.completions.create(model=model, max_tokens=16, temperature=0,
                                                messages=[{"role": "user", "content": "Tell me a story."}], stream=True)
        chunks = [next(stream)]
        os.kill(pid, signal.SIGTERM)
        try:
            assert httpx.get(f"{url}/ready", timeout=2).status_code == 503  # draining
        except httpx.TransportError:
            pass  # or the listener has closed already
        try:
            chunks += list(stream)
            assert chunks[-1].choices[0].finish_reason in ("stop", "length")
        except openai.APIError as e:  # a machine so busy that 16 tokens outlast the grace: the
            assert "shutting down" in e.message  # stream ends with the documented error event
        assert container.proc.wait(timeout=60) == 0, container.output()
    finally:
        container.remove()


def test_test_only_and_cli_packages_are_not_in_the_image(image):
    container = subprocess.run(["buildah", "from", "--quiet", IMAGE], capture_output=True, check=True, text=True).stdout.strip()
    try:
        check = "import importlib.util as u; print([m for m in ('faker', 'polyfactory', 'pip', 'pytest', 'rich', 'pygments') if u.find_spec(m)])"
        r = subprocess.run(["buildah", "run", "--isolation", "chroot", container, "--", "python3", "-c", check],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr
    finally:
        subprocess.run(["buildah", "rm", container], capture_output=True)


def test_the_image_s_bytecode_is_current_and_its_size_is_printed(image, capsys):
    """deploy/image_contents.py run inside the image: its size by part, printed, and every
    venv source with a current .pyc (the service's user can't write one: a missing .pyc is
    compiled again on every start)."""
    container = subprocess.run(["buildah", "from", "--quiet", IMAGE], capture_output=True, check=True, text=True).stdout.strip()
    try:
        script = (ROOT / "deploy" / "image_contents.py").read_text()
        r = subprocess.run(["buildah", "run", "--isolation", "chroot", "--user", image["User"], container, "--",
                            "python3", "-c", script], capture_output=True, text=True, timeout=300)
        with capsys.disabled():
            print(f"\nimage {IMAGE}:\n{r.stdout}")
        assert r.returncode == 0 and "venv 0," in r.stdout, r.stdout + r.stderr
    finally:
        subprocess.run(["buildah", "rm", container], capture_output=True)
