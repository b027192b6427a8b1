"""What an image holds, run inside it with its own python3 (tests/test_image.py does, and prints
the output; docs/deploy.md's size table is this output): the size of each part, as `du`
counts it (allocated blocks, each hard-linked file once), and the Python sources whose
bytecode is missing or stale.

Bytecode matters because the service runs as a user that can't write the venv's or the
stdlib's __pycache__: a module without a current .pyc is compiled on every start, and that
cost lands in the cold start. Only the stdlib and the venv are checked: the stdlib is
reported, not judged (the Containerfile compiles it, the official python images ship none),
the venv must have none missing.

    python3 image_contents.py          # a Markdown table, then the bytecode line; exit 1 if the venv misses any
"""

import importlib.util
import os
import sys
import sysconfig
from pathlib import Path

VENV = Path(sys.prefix)
STDLIB = Path(sysconfig.get_path("stdlib"))
SITE = Path(sysconfig.get_path("purelib"))
NOT_FILES = ("/proc", "/sys", "/dev", "/run", "/tmp")  # mounted by the runtime, not the image's


def du(root: Path, seen: set[tuple[int, int]], skip: tuple[Path, ...] = ()) -> int:
    """Bytes allocated under `root` (a file or a tree), not following links, each inode once."""
    total = 0
    for path in [root] if not root.is_dir() or root.is_symlink() else walk(root, skip):
        try:
            st = path.lstat()
        except OSError:
            continue
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total


def walk(root: Path, skip: tuple[Path, ...]):
    yield root
    for parent, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if Path(parent, d) not in skip and str(Path(parent, d)) not in NOT_FILES]
        for name in dirs + files:
            yield Path(parent, name)


def stale_bytecode(root: Path, skip: tuple[Path, ...] = ()) -> list[Path]:
    """The .py files under `root` whose .pyc is missing, for another interpreter, or older than the source."""
    stale = []
    for path in walk(root, skip):
        if path.suffix != ".py" or not path.is_file():
            continue
        try:
            header = Path(importlib.util.cache_from_source(str(path))).read_bytes()[:16]
        except OSError:
            stale.append(path)
            continue
        flags = int.from_bytes(header[4:8], "little")
        st = path.stat()
        current = header[:4] == importlib.util.MAGIC_NUMBER and (
            flags & 1  # hash-based: valid by construction (checked or not, never rewritten)
            or (int.from_bytes(header[8:12], "little") == int(st.st_mtime) & 0xFFFFFFFF
                and int.from_bytes(header[12:16], "little") == st.st_size & 0xFFFFFFFF))
        if not current:
            stale.append(path)
    return stale


def main() -> int:
    mb = lambda n: f"{n / 1e6:.1f}"  # noqa: E731
    seen: set[tuple[int, int]] = set()
    rows = []
    # Parts inside other parts first, so that each byte is counted once, in its part.
    ggufs = sorted(p for p in SITE.rglob("*.gguf"))
    for path in ggufs:
        rows.append((f"the model: `{path.relative_to(SITE)}`", du(path, seen)))
    hub_cache = Path(os.environ.get("HF_HOME", "/nonexistent"))  # a Hub model baked in (Containerfile: MODEL=hf:...)
    if hub_cache.is_dir():
        rows.append((f"the Hugging Face cache (`{hub_cache}`): a Hub model baked in", du(hub_cache, seen)))
    packages = [(p.name, du(p, seen)) for p in sorted(SITE.iterdir())]
    venv_rest = du(VENV, seen)
    stdlib = du(STDLIB, seen, skip=(STDLIB / "site-packages",))
    base = du(Path("/"), seen)  # everything else: the OS, the interpreter, the base's own packages

    total = sum(size for _, size in rows) + sum(size for _, size in packages) + venv_rest + stdlib + base
    print("| part | MB |\n|---|---|")
    print(f"| **the image's files** | **{mb(total)}** |")
    print(f"| the base and its packages (outside the stdlib and the venv) | {mb(base)} |")
    print(f"| Python's stdlib (`{STDLIB}`, with its compiled bytecode) | {mb(stdlib)} |")
    for name, size in rows:
        print(f"| {name} | {mb(size)} |")
    small = 0
    for name, size in sorted(packages, key=lambda p: -p[1]):
        if size >= 500_000:
            print(f"| `site-packages/{name}` | {mb(size)} |")
        else:
            small += size
    print(f"| the rest of site-packages (entries under 0.5 MB each) | {mb(small)} |")
    print(f"| the rest of the venv (`bin`, the interpreter's links, `pyvenv.cfg`) | {mb(venv_rest)} |")

    stdlib_stale = stale_bytecode(STDLIB, skip=(STDLIB / "site-packages",))
    venv_stale = stale_bytecode(VENV)
    print(f"\nbytecode ({sys.implementation.cache_tag}): sources without a current .pyc: "
          f"venv {len(venv_stale)}, stdlib {len(stdlib_stale)}")
    for path in venv_stale[:20]:
        print(f"  {path}")
    return 1 if venv_stale else 0


if __name__ == "__main__":
    sys.exit(main())
