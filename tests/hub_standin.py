"""A stand-in for the Hugging Face Hub, on loopback, for huggingface_hub to talk to through HF_ENDPOINT:
the smallest server that answers the routes `gguf-serve` makes it call, as the Hub answers them.

Not olah (the self-hosted Hub mirror the issue suggests): its local repositories (git repos with
LFS objects) are served whole whatever `Range` asks, so a resumed download can't be seen; it has
no gated or private repository; and started offline with one it answered the repo's every route
401 RepoNotFound. This serves, from files on disk:

- `GET /api/models/{org}/{repo}[/revision/{rev}]`: the repo's info with its files' LFS size and sha256
  (`?blobs=true`, what `HfApi.model_info(files_metadata=True)` reads);
- `HEAD`/`GET /{org}/{repo}/resolve/{rev}/{path}`: the file, with the Hub's headers (`X-Repo-Commit`,
  `ETag` and `X-Linked-Etag` the sha256, `X-Linked-Size`) and `Range` (206);
- the Hub's refusals: an unknown repo 401 `X-Error-Code: RepoNotFound`, a gated one without its token
  401 `GatedRepo`, an unknown revision 404 `RevisionNotFound`, an unknown file 404 `EntryNotFound`.

And two faults a test sets: a file's next GET cut after some bytes (the connection closed), and a file
served with one byte changed (its ETag still the right sha256).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class Repo:
    files: dict[str, Path]  # path in the repo -> the file served
    token: str | None = None  # set: gated, served only with `Authorization: Bearer <token>`
    sha256: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        for name, path in self.files.items():
            with path.open("rb") as f:
                self.sha256[name] = hashlib.file_digest(f, "sha256").hexdigest()


class StandInHub:
    def __init__(self, repos: dict[str, Repo]):
        self.repos = repos
        self.requests: list[tuple[str, str, str | None]] = []  # method, path, Range
        self.cut_after: dict[str, int] = {}  # file path in its repo -> bytes its next GET sends before it is cut
        self.corrupt: set[str] = set()  # file paths served with their middle byte changed
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_HEAD(self) -> None:
                hub.answer(self, body=False)

            def do_GET(self) -> None:
                hub.answer(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def answer(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        path = h.path.split("?")[0]
        self.requests.append((h.command, path, h.headers.get("Range")))
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path):
            repo = self.repos.get(m.group(1))
            if repo is None:
                return refuse(h, 401, "RepoNotFound", "Repository not found")
            if m.group(2) not in (None, "main", COMMIT):
                return refuse(h, 404, "RevisionNotFound", "Invalid rev id")
            siblings = [{"rfilename": n, "size": p.stat().st_size, "blobId": repo.sha256[n][:40],
                         "lfs": {"sha256": repo.sha256[n], "size": p.stat().st_size, "pointerSize": 135}}
                        for n, p in repo.files.items()]
            info = {"_id": "0" * 24, "id": m.group(1), "sha": COMMIT, "private": False,
                    "gated": "manual" if repo.token else False, "siblings": siblings}
            data = json.dumps(info).encode()
            h.send_response(200)
            h.send_header("Content-Type", "application/json")
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            return h.wfile.write(data) if body else None
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        repo = self.repos.get(m.group(1)) if m else None
        if repo is None:
            return refuse(h, 401, "RepoNotFound", "Repository not found")
        if repo.token and h.headers.get("Authorization") != f"Bearer {repo.token}":
            return refuse(h, 401, "GatedRepo", f"Access to model {m.group(1)} is restricted. You must have access "
                                               "to it and be authenticated to access it. Please log in.")
        if m.group(2) not in ("main", COMMIT):
            return refuse(h, 404, "RevisionNotFound", "Invalid rev id")
        name = m.group(3)
        if name not in repo.files:
            return refuse(h, 404, "EntryNotFound", "Entry not found")
        data = repo.files[name].read_bytes()
        if name in self.corrupt:
            middle = len(data) // 2
            data = data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:]
        start = int(re.fullmatch(r"bytes=(\d+)-", h.headers["Range"]).group(1)) if h.headers.get("Range") else 0
        h.send_response(206 if start else 200)
        h.send_header("X-Repo-Commit", COMMIT)
        h.send_header("ETag", f'"{repo.sha256[name]}"')
        h.send_header("X-Linked-Etag", f'"{repo.sha256[name]}"')
        h.send_header("X-Linked-Size", str(len(data)))
        h.send_header("Accept-Ranges", "bytes")
        h.send_header("Content-Length", str(len(data) - start))
        if start:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.end_headers()
        if not body:
            return
        cut = self.cut_after.pop(name, None) if h.command == "GET" else None
        h.wfile.write(data[start:start + cut] if cut is not None else data[start:])
        if cut is not None:
            h.wfile.flush()
            h.close_connection = True  # the rest never comes: the client reads a body shorter than announced


def refuse(h: BaseHTTPRequestHandler, status: int, code: str, message: str) -> None:
    data = json.dumps({"error": message}).encode()
    h.send_response(status)
    h.send_header("X-Error-Code", code)
    h.send_header("X-Error-Message", message)
    h.send_header("Content-Type", "application/json")
    h.send_header("Content-Length", str(len(data)))
    h.end_headers()
    if h.command == "GET":
        h.wfile.write(data)
