"""GGUF models on the Hugging Face Hub by name: `hf:org/repo[:QUANT | /path/file.gguf][@revision]`
→ a file in huggingface_hub's own cache (HF_HOME, HF_HUB_CACHE), downloaded there with its
client when it isn't (HF_TOKEN, HF_ENDPOINT), checked against the Hub's LFS size and sha256, and
found there alone when the Hub can't be reached or HF_HUB_OFFLINE=1.

Every way this can fail raises HubError with one line saying what to do.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import sys
from pathlib import Path

import msgspec

PREFIX = "hf:"
# What llama-server's `-hf org/repo` takes when no quant is named: Q4_K_M, else Q8_0, else the first GGUF.
DEFAULT_QUANTS = ("Q4_K_M", "Q8_0")
SHARD = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
PROGRESS_INTERVAL_S = 10.0  # a download's progress line in a log: one every this long, a line a second would flood it


class HubError(Exception):
    """A Hub model that can't be had; the message says which and what to do."""


class HubRef(msgspec.Struct, frozen=True):
    repo: str  # org/repo
    quant: str | None = None  # a quant tag (Q4_K_M), matched in the file names
    file: str | None = None  # or the file's path in the repo
    revision: str = "main"

    def __str__(self) -> str:
        chosen = f":{self.quant}" if self.quant else f"/{self.file}" if self.file else ""
        return f"{PREFIX}{self.repo}{chosen}" + (f"@{self.revision}" if self.revision != "main" else "")


def is_hub_ref(model: str) -> bool:
    return model.startswith(PREFIX)


def parse(text: str) -> HubRef:
    """`hf:org/repo`, `hf:org/repo:Q4_K_M`, `hf:org/repo/dir/file.gguf`, each with `@revision` at the end."""
    body, _, revision = text.removeprefix(PREFIX).partition("@")
    org, _, rest = body.partition("/")
    name, _, file = rest.partition("/")
    name, _, quant = name.partition(":")
    malformed = (not (NAME.fullmatch(org) and NAME.fullmatch(name)) or (file and not file.endswith(".gguf"))
                 or (quant and not re.fullmatch(r"[A-Za-z0-9_]+", quant)) or "@" in revision
                 or ("@" in text and not revision))
    if malformed:
        raise HubError(f"{text!r} is not a Hub model: write hf:org/repo, hf:org/repo:QUANT (e.g. Q4_K_M) or "
                       "hf:org/repo/file.gguf, each with @revision at the end if not main")
    return HubRef(f"{org}/{name}", quant or None, file or None, revision or "main")


def pick(files: list[str], ref: HubRef) -> list[str]:
    """The files of the GGUF `ref` names among a repo's `files`, first shard first (one file unless split):
    its file, else the first whose name carries its quant, else as llama-server picks."""
    ggufs = sorted(f for f in files if f.endswith(".gguf") and "mmproj" not in f.rsplit("/", 1)[-1].lower())
    firsts = [f for f in ggufs if not SHARD.search(f) or SHARD.search(f).group(1) == "00001"]
    if ref.file:
        chosen = ref.file if ref.file in firsts else None
    else:
        chosen = next((f for q in ([ref.quant] if ref.quant else DEFAULT_QUANTS) for f in firsts if carries(f, q)),
                      None if ref.quant else next(iter(firsts), None))
    if chosen is None:
        wanted = f"file {ref.file}" if ref.file else f"GGUF file of quant {ref.quant}" if ref.quant else "GGUF file"
        have = ", ".join(firsts) or "no GGUF file"
        raise HubError(f"{ref}: {ref.repo} has no {wanted} (it has: {have}); name one of those")
    shard = SHARD.search(chosen)
    if not shard:
        return [chosen]
    stem, count = chosen[: shard.start()], shard.group(2)
    return [f"{stem}-{n:05d}-of-{count}.gguf" for n in range(1, int(count) + 1)]


def carries(path: str, quant: str) -> bool:
    """`path`'s name has `quant` as a word of its own, any case: Q4_K_M in model-q4_k_m.gguf, not in IQ4_K_M."""
    word = rf"(?<![A-Za-z0-9]){re.escape(quant)}(?![A-Za-z0-9]|_[A-Za-z0-9])"
    return re.search(word, path, re.IGNORECASE) is not None


def fetch(ref: HubRef) -> Path:
    """The local path of `ref`'s GGUF (its first shard), from the cache or downloaded into it."""
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if constants.is_offline_mode():
        return from_cache(ref, "HF_HUB_OFFLINE is set")
    from httpx2 import TransportError  # huggingface_hub's own HTTP client (2.x): the Hub out of reach
    try:
        return download(ref)
    except (TransportError, OfflineModeIsEnabled) as e:
        return from_cache(ref, f"the Hub at {constants.ENDPOINT} can't be reached: {type(e).__name__}: {e}")
    except HfHubHTTPError as e:
        if e.response is not None and e.response.status_code >= 500:
            return from_cache(ref, f"the Hub at {constants.ENDPOINT} answered {e.response.status_code}")
        raise HubError(refusal(ref, e)) from None


def refusal(ref: HubRef, e: Exception) -> str:
    from huggingface_hub import constants, get_token
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    if isinstance(e, GatedRepoError):
        return (f"{ref}: {ref.repo} is gated: accept its terms on its Hub page, then set HF_TOKEN to a token of that "
                "account" + (" (the one set can't read it)" if get_token() else ""))
    if isinstance(e, RepositoryNotFoundError):
        return (f"{ref}: {constants.ENDPOINT} has no repository {ref.repo}, or it is private: check the name, or set "
                "HF_TOKEN to a token that can read it" + (" (the one set can't)" if get_token() else ""))
    if isinstance(e, RevisionNotFoundError):
        return f"{ref}: {ref.repo} has no revision {ref.revision!r}"
    status = getattr(getattr(e, "response", None), "status_code", "?")
    return f"{ref}: the Hub at {constants.ENDPOINT} refused it ({status}): {str(e).splitlines()[0]}"


def download(ref: HubRef) -> Path:
    """The files from the Hub (those not yet in the cache), each checked against the Hub's size and sha256."""
    from huggingface_hub import HfApi, hf_hub_download, try_to_load_from_cache

    info = HfApi().model_info(ref.repo, revision=ref.revision, files_metadata=True)
    siblings = {s.rfilename: s for s in info.siblings or []}
    names = pick(list(siblings), ref)
    paths = []
    for name in names:
        cached = try_to_load_from_cache(ref.repo, name, revision=info.sha)
        # by the revision asked for, not info.sha: the cache then records which commit it names (refs/main),
        # which is how the file is found in it offline
        path = Path(hf_hub_download(ref.repo, name, revision=ref.revision,
                                    tqdm_class=None if sys.stderr.isatty() else progress_lines(name)))
        check(ref, name, path, siblings[name], hash_it=not isinstance(cached, str))
        paths.append(path)
    return paths[0]


def check(ref: HubRef, name: str, path: Path, sibling, hash_it: bool) -> None:
    """The file as the Hub describes it: its size always, its sha256 once downloaded. A cached blob is
    named by its sha256 (the ETag of an LFS file) and was hashed when it came, so it isn't hashed
    again at every start (1.4 GB/s with SHA-NI: 3 s more to each start of a 4 GB model). A file
    that fails is taken out of the cache, so that nothing wrong is left there as complete."""
    lfs = sibling.lfs
    size, sha256 = (lfs.size, lfs.sha256) if lfs else (sibling.size, None)
    blob = path.resolve()
    problem = None
    if size is not None and blob.stat().st_size != size:
        problem = f"is {blob.stat().st_size} bytes, the Hub says {size}"
    elif sha256 and not hash_it and blob.name != sha256:
        problem = f"is cached as blob {blob.name}, the Hub's is {sha256}"
    elif sha256 and hash_it:
        with blob.open("rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        if digest != sha256:
            problem = f"has sha256 {digest}, the Hub's LFS metadata says {sha256}"
    if problem:
        path.unlink(missing_ok=True)
        blob.unlink(missing_ok=True)
        raise HubError(f"{ref}: {name} as downloaded {problem}; it was removed from the cache: run it again "
                       "(a mirror set in HF_ENDPOINT may serve a wrong copy)")


def from_cache(ref: HubRef, why: str) -> Path:
    """`ref`'s files from the cache alone, the Hub being out of reach (`why`), saying so on stderr."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snapshot = Path(snapshot_download(ref.repo, revision=ref.revision, local_files_only=True))
    except LocalEntryNotFoundError:
        snapshot = None
    files = [p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*.gguf")] if snapshot else []
    try:
        names = pick(files, ref)
    except HubError:
        names = []
    if not names or not all((snapshot / n).is_file() for n in names):
        raise HubError(f"{ref}: not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {why}: run `gguf-serve "
                       f"pull {ref}` where the Hub can be reached, with this cache (HF_HOME) or a copy of it")
    print(json.dumps({"event": "hub_cache", "model": str(ref), "file": names[0], "revision": snapshot.name,
                      "reason": f"{why}; the cached copy is used"}), file=sys.stderr, flush=True)
    return snapshot / names[0]


def progress_lines(name: str):
    """A tqdm class for huggingface_hub's downloads that writes a JSON line every PROGRESS_INTERVAL_S (and at
    the start and end) instead of a bar: stderr is a container's log, not a terminal."""
    from huggingface_hub.utils import tqdm

    class Lines(tqdm):
        def __init__(self, *args, **kwargs):
            # its own output (a bar's carriage returns, the newline at close) goes nowhere: display() writes the lines
            super().__init__(*args, **{**kwargs, "mininterval": PROGRESS_INTERVAL_S, "disable": False,
                                       "file": io.StringIO()})

        def display(self, msg=None, pos=None) -> bool:
            line = {"event": "download", "file": name, "bytes": self.n, "total": self.total,
                    "mb_per_s": round(self.format_dict["rate"] / 1e6, 1) if self.format_dict["rate"] else None}
            print(json.dumps(line), file=sys.stderr, flush=True)
            return True

    return Lines


