"""Models from the Hugging Face Hub by name (gguf_serve/hub.py), through the real huggingface_hub client against
a stand-in Hub on loopback (tests/hub_standin.py, which says why not olah): SmolLM2's GGUF under several quant
names and as a split copy, downloaded into a cache of the test's own, checked, served by the real `gguf-serve`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import openai
import pytest

from conftest import CLI, ROOT, Server, smollm2_path
from hub_standin import COMMIT, Repo, StandInHub

SPLIT = "split/smol-Q4_0"


def split_copy(directory: Path) -> dict[str, Path]:
    """SmolLM2's GGUF split in three, as llama.cpp's gguf-split (and the `gguf` package's writer) names the shards."""
    reader = gguf.GGUFReader(smollm2_path())
    writer = gguf.GGUFWriter(directory / "smol-Q4_0.gguf", reader.fields["general.architecture"].contents(),
                             split_max_tensors=120)
    for name, field in reader.fields.items():
        if not name.startswith("GGUF.") and name != "general.architecture":
            kind = field.types[0]
            writer.add_key_value(name, field.contents(), kind,
                                 sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, tensor.data, raw_shape=tensor.data.shape, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {f"split/{p.name}": p for p in sorted(directory.glob("smol-Q4_0-*-of-*.gguf"))}


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    smol = smollm2_path()
    shards = split_copy(tmp_path_factory.mktemp("split"))
    assert len(shards) == 3
    hub = StandInHub({
        "org/smol-GGUF": Repo({"smol-Q8_0.gguf": smol, "smol-Q4_K_M.gguf": smol, "smol-IQ4_XS.gguf": smol, **shards}),
        "org/gated-GGUF": Repo({"gated-Q4_K_M.gguf": smol}, token="hf_right"),
    })
    yield hub
    hub.stop()


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "hf-cache"


def env_for(hub: StandInHub, cache: Path, **more: str) -> dict[str, str]:
    # HF_TOKEN unset unless a test sets it: a token in the environment running the tests must not reach the stand-in
    return {"HF_ENDPOINT": hub.url, "HF_HUB_CACHE": str(cache), "HF_TOKEN": "", "N_THREADS": "2", **more}


def gguf_serve(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`gguf-serve ARGS` to its end (a pull, or a start refused before serving)."""
    return subprocess.run([sys.executable, "-m", "gguf_serve", *args], cwd=ROOT, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=300)


def one_line(run: subprocess.CompletedProcess) -> str:
    """A refusal: exit 1, one `gguf-serve:` line on stderr and no traceback."""
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    [line] = [line for line in run.stderr.splitlines() if line.startswith("gguf-serve:")]
    return line


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def cached_files(cache: Path) -> list[str]:
    return sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*") if p.is_file() or p.is_symlink())


def test_a_hub_model_cut_midway_is_resumed_checked_and_served(hub, cache):
    hub.cut_after["smol-Q4_K_M.gguf"] = 30_000_000  # the connection closed after 30 MB of 98
    seen = len(hub.requests)
    # no quant named: Q4_K_M is picked, as llama-server picks it (not Q8_0, not IQ4_XS)
    server = Server(env_for(hub, cache), command=[*CLI, "--model", "hf:org/smol-GGUF"])
    try:
        server.wait_ready()
        gets = [(path, ranged) for method, path, ranged in hub.requests[seen:]
                if method == "GET" and "/resolve/" in path]
        assert [p.rsplit("/", 1)[1] for p, _ in gets] == ["smol-Q4_K_M.gguf"] * 2, gets
        assert gets[0][1] is None and 0 < int(gets[1][1].removeprefix("bytes=").rstrip("-")) <= 30_000_000
        size = smollm2_path().stat().st_size
        progress = [line for line in json_lines(server.output()) if line.get("event") == "download"]
        assert progress[-1] == {**progress[-1], "file": "smol-Q4_K_M.gguf", "bytes": size, "total": size}
        blob = cache / "models--org--smol-GGUF" / "blobs" / hub.repos["org/smol-GGUF"].sha256["smol-Q4_K_M.gguf"]
        assert blob.stat().st_size == size and not [f for f in cached_files(cache) if f.endswith(".incomplete")]

        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list().data] == ["org/smol-GGUF"]
        reply = client.chat.completions.create(model="hf:org/smol-GGUF", max_tokens=4, temperature=0,
                                               messages=[{"role": "user", "content": "Say hi."}])
        assert reply.model == "org/smol-GGUF" and reply.choices[0].message.content
    finally:
        server.stop()


def test_pull_fetches_a_split_gguf_whole_then_it_is_served_offline_from_the_cache(hub, cache):
    pulled = gguf_serve("pull", "hf:org/smol-GGUF:Q4_0", env=env_for(hub, cache))
    assert pulled.returncode == 0, pulled.stderr
    [line] = json_lines(pulled.stdout)
    snapshot = cache / "models--org--smol-GGUF" / "snapshots" / COMMIT
    first = str(snapshot / f"{SPLIT}-00001-of-00003.gguf")
    assert line == {"event": "pulled", "model": "hf:org/smol-GGUF:Q4_0", "path": first}
    shards = [f"smol-Q4_0-0000{n}-of-00003.gguf" for n in (1, 2, 3)]
    assert sorted(p.name for p in (snapshot / "split").iterdir()) == shards

    seen = len(hub.requests)
    server = Server(env_for(hub, cache, HF_HUB_OFFLINE="1"), command=[*CLI, "--model", "hf:org/smol-GGUF:Q4_0"])
    try:
        server.wait_ready()
        assert hub.requests[seen:] == []  # nothing asked of the Hub
        [said] = [line for line in json_lines(server.output()) if line.get("event") == "hub_cache"]
        assert said["file"] == f"{SPLIT}-00001-of-00003.gguf" and "HF_HUB_OFFLINE is set" in said["reason"]
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
        reply = client.chat.completions.create(model="org/smol-GGUF:Q4_0", max_tokens=4, temperature=0,
                                               messages=[{"role": "user", "content": "Say hi."}])
        assert reply.choices[0].message.content  # every shard's tensors loaded: a missing one fails the load
    finally:
        server.stop()

    # the Hub out of reach (nothing listens there), not offline by setting: the cache again, saying why
    unreachable = gguf_serve("pull", "hf:org/smol-GGUF:Q4_0", env=env_for(hub, cache, HF_ENDPOINT="http://127.0.0.1:9"))
    assert unreachable.returncode == 0, unreachable.stderr
    [said] = [line for line in json_lines(unreachable.stderr) if line.get("event") == "hub_cache"]
    assert "can't be reached" in said["reason"]


def test_a_corrupted_download_is_refused_by_its_sha256_and_leaves_nothing_in_the_cache(hub, cache):
    hub.corrupt.add("smol-Q8_0.gguf")
    try:
        line = one_line(gguf_serve("pull", "hf:org/smol-GGUF:Q8_0", env=env_for(hub, cache)))
    finally:
        hub.corrupt.discard("smol-Q8_0.gguf")
    sha256 = hub.repos["org/smol-GGUF"].sha256["smol-Q8_0.gguf"]
    assert "smol-Q8_0.gguf as downloaded has sha256" in line and f"the Hub's LFS metadata says {sha256}" in line
    assert not [f for f in cached_files(cache) if "/blobs/" in f or "/snapshots/" in f]
    # and offline it is not there to be served as if complete
    assert "not in the Hugging Face cache" in one_line(
        gguf_serve("--model", "hf:org/smol-GGUF:Q8_0", env=env_for(hub, cache, HF_HUB_OFFLINE="1")))
    assert gguf_serve("pull", "hf:org/smol-GGUF:Q8_0", env=env_for(hub, cache)).returncode == 0  # served right: taken


def test_missing_gated_and_uncached_models_are_one_line_each_and_write_nothing(hub, cache):
    line = one_line(gguf_serve("--model", "hf:org/no-such-GGUF", env=env_for(hub, cache)))
    assert line == (f"gguf-serve: hf:org/no-such-GGUF: {hub.url} has no repository org/no-such-GGUF, or it is private: "
                    "check the name, or set HF_TOKEN to a token that can read it")
    line = one_line(gguf_serve("--model", "hf:org/gated-GGUF", env=env_for(hub, cache)))
    assert line == ("gguf-serve: hf:org/gated-GGUF: org/gated-GGUF is gated: accept its terms on its Hub page, "
                    "then set HF_TOKEN to a token of that account")
    line = one_line(gguf_serve("pull", "hf:org/gated-GGUF", env=env_for(hub, cache, HF_TOKEN="hf_wrong")))
    assert line.endswith("(the one set can't read it)")
    line = one_line(gguf_serve("--model", "hf:org/smol-GGUF:Q5_K_M", env=env_for(hub, cache)))
    assert "org/smol-GGUF has no GGUF file of quant Q5_K_M (it has: smol-IQ4_XS.gguf, " in line
    line = one_line(gguf_serve("--model", "hf:org/smol-GGUF@v9", env=env_for(hub, cache)))
    assert line == "gguf-serve: hf:org/smol-GGUF@v9: org/smol-GGUF has no revision 'v9'"
    line = one_line(gguf_serve("--model", "hf:org/smol-GGUF", env=env_for(hub, cache, HF_HUB_OFFLINE="1")))
    assert line == (f"gguf-serve: hf:org/smol-GGUF: not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE is set: "
                    "run `gguf-serve pull hf:org/smol-GGUF` where the Hub can be reached, with this cache (HF_HOME) "
                    "or a copy of it")
    assert not [f for f in cached_files(cache) if "/blobs/" in f or "/snapshots/" in f]
    pulled = gguf_serve("pull", "hf:org/gated-GGUF", env=env_for(hub, cache, HF_TOKEN="hf_right"))
    assert pulled.returncode == 0, pulled.stderr


def test_a_catalogue_entry_names_its_hub_repo_and_quant(hub, cache, tmp_path):
    catalogue = tmp_path / "models.toml"
    catalogue.write_text('[tiny]\nhf = "org/smol-GGUF"\nquant = "IQ4_XS"\n\n[tiny-file]\nhf = "org/smol-GGUF"\n'
                         'file = "smol-Q8_0.gguf"\n')
    for key, name in (("tiny", "smol-IQ4_XS.gguf"), ("tiny-file", "smol-Q8_0.gguf")):
        pulled = gguf_serve("pull", key, env=env_for(hub, cache, MODELS_TOML=str(catalogue)))
        assert pulled.returncode == 0, pulled.stderr
        assert json_lines(pulled.stdout)[0]["path"].endswith(f"/snapshots/{COMMIT}/{name}")
