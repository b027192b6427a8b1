"""The page cache: which files a server reads as it starts, dropping them from the cache, and how
much of them is cached (mincore).

A serverless instance starts on a host whose page cache may hold nothing of the image: its
interpreter, libraries and model are read from disk (or the image's lazy-loading store). The
"cold" condition of `python -m bench coldstart` is that: before each start, the files either
server reads are dropped with posix_fadvise(POSIX_FADV_DONTNEED), which needs no root for
clean pages. Pages some running process maps (this bench's own interpreter, libc, a file
another server has open) stay: what stayed is measured with mincore and recorded, not assumed.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

from bench.machine import REPO

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
PAGE = mmap.PAGESIZE
MAP_FAILED = ctypes.c_void_p(-1).value

# What gguf-serve's start loads, listed by a child: every module's file and every file it maps
# (shared libraries) once the service and the C API are imported and the template's render
# process code is loaded.
_LOADED = (
    "import sys, json\n"
    "from granian import Granian\n"
    "import gguf_serve.service, gguf_serve.model, gguf_serve.template_process, jinja2\n"
    "files = [getattr(m, '__file__', None) for m in list(sys.modules.values())]\n"
    "maps = [line.split(None, 5)[5].strip() for line in open('/proc/self/maps') if len(line.split(None, 5)) == 6]\n"
    "print(json.dumps([f for f in files + maps if f and f.startswith('/')]))\n"
)


def resident_bytes(path: Path) -> tuple[int, int]:
    """(bytes of the file in the page cache, its size)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return 0, 0
    try:
        size = os.fstat(fd).st_size
        if size == 0:
            return 0, 0
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, MAP_FAILED):
            return 0, size
        try:
            pages = (size + PAGE - 1) // PAGE
            vec = ctypes.create_string_buffer(pages)
            if _libc.mincore(addr, size, vec) != 0:
                return 0, size
            return sum(b & 1 for b in vec.raw) * PAGE, size
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)


def evict(paths: list[Path]) -> None:
    """Drop the files' clean, unmapped pages from the page cache."""
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_mib(paths: list[Path]) -> float:
    return sum(resident_bytes(p)[0] for p in paths) / 2**20


def size_mib(paths: list[Path]) -> float:
    return sum(p.stat().st_size for p in paths if p.is_file()) / 2**20


def files_under(directory: Path, skip: Path | None = None) -> list[Path]:
    out = []
    for root, dirs, names in os.walk(directory):
        if skip is not None:
            dirs[:] = [d for d in dirs if Path(root, d) != skip]
        out += [Path(root, n) for n in names if not Path(root, n).is_symlink()]
    return out


def gguf_serve_files(model: Path) -> list[Path]:
    """What gguf-serve reads as it starts: the model; the interpreter and what it maps; the whole
    standard library (site-packages aside); every file of each site-packages package it imports
    (its directory, and `<name>.libs` beside it); the gguf_serve checkout."""
    r = subprocess.run([sys.executable, "-c", _LOADED], capture_output=True, text=True, timeout=120, cwd=REPO)
    if r.returncode:
        raise RuntimeError(f"can't list gguf-serve's files:\n{r.stderr[-2000:]}")
    loaded = [Path(f) for f in json.loads(r.stdout.strip().splitlines()[-1])]
    site = {Path(p) for p in (sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"])}
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = {model, Path(sys.executable).resolve(), *files_under(REPO / "gguf_serve"),
             *files_under(stdlib, skip=stdlib / "site-packages")}
    packages = set()
    for f in loaded:
        top = next((s / f.relative_to(s).parts[0] for s in site if f.is_relative_to(s) and f != s), None)
        if top is not None:
            packages.add(top)
            name = top.name.split(".")[0]
            packages.add(top.parent / f"{name}.libs")
        elif f.is_file():
            files.add(f)  # the interpreter's shared libraries, stdlib extension modules
    for top in packages:
        files.update(files_under(top) if top.is_dir() else [top] if top.is_file() else [])
    return sorted(p for p in files if p.is_file())


def llama_server_files(binary: Path, model: Path) -> list[Path]:
    """What llama-server reads as it starts: the model, its build directory's binaries and
    libraries, and the system libraries it links (ldd)."""
    files = {model, *(p for p in binary.parent.iterdir() if p.is_file() and not p.is_symlink())}
    r = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, timeout=30)
    for line in r.stdout.splitlines():
        parts = line.split("=>")
        if len(parts) == 2 and parts[1].strip().startswith("/"):
            files.add(Path(parts[1].split()[0]).resolve())
    return sorted(files)


def eviction_check(paths: list[Path], model: Path) -> tuple[bool, dict]:
    """Does dropping work here: the files read once (so cached), dropped, measured. It works if
    the model, which no process of this bench maps, leaves the cache; what else stays resident
    (mapped by running processes) is recorded."""
    with open(model, "rb") as f:
        while f.read(1 << 20):
            pass
    before = {"model_mib": resident_bytes(model)[0] / 2**20, "all_mib": resident_mib(paths)}
    evict(paths)
    after = {"model_mib": resident_bytes(model)[0] / 2**20, "all_mib": resident_mib(paths)}
    model_mib = model.stat().st_size / 2**20
    works = after["model_mib"] < 0.05 * model_mib
    return works, {"files": len(paths), "size_mib": round(size_mib(paths), 1),
                   "resident_before_mib": {k: round(v, 1) for k, v in before.items()},
                   "resident_after_mib": {k: round(v, 1) for k, v in after.items()}}
