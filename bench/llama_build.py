"""Building and locating llama.cpp's llama-server and llama-batched-bench."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from bench.procs import kill, spawn

CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gguf-serve"
BUILD_DIR = CACHE / "llama-server-build"
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
LLAMA_TOOLS = ("llama-server", "llama-batched-bench")  # built together; the second measures the kernels' ceiling
BUILD_TIMEOUT = 5400  # seconds; about 10-15 minutes on two idle cores


def llama_server_binary(allow_build: bool) -> tuple[Path | None, str]:
    """The llama-server binary (llama-batched-bench beside it), built once from the llama-cpp-python
    sdist's vendored llama.cpp."""
    binary = BUILD_DIR / "bin" / "llama-server"
    if all(os.access(binary.parent / tool, os.X_OK) for tool in LLAMA_TOOLS):
        return binary, ""
    if not allow_build:
        return None, f"llama-server is not built at {binary} (run without --no-build to build it)"
    if shutil.which("cmake") is None or shutil.which("c++") is None:
        return None, "llama-server can't be built: cmake and a C++ compiler are needed (apt-get install cmake g++)"
    import fcntl

    BUILD_DIR.parent.mkdir(parents=True, exist_ok=True)
    with open(BUILD_DIR.parent / "llama-server-build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one build at a time
        if all((binary.parent / tool).is_file() for tool in LLAMA_TOOLS):
            return binary, ""
        src_root = CACHE / "llama-cpp-python-src"
        src = src_root / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}" / "vendor" / "llama.cpp"
        log = CACHE / "llama-server-build.log"
        deadline = time.monotonic() + BUILD_TIMEOUT
        print(f"building llama-server once into {BUILD_DIR} (log: {log}); this takes a while on few cores", flush=True)

        def run(cmd):
            left = deadline - time.monotonic()
            if left <= 0:
                raise subprocess.TimeoutExpired(cmd, BUILD_TIMEOUT)
            print("  $", " ".join(map(str, cmd)), flush=True)
            proc = spawn(cmd, log, append=True)  # its own group: make's compilers die with it
            try:
                proc.wait(left)
            finally:
                kill(proc)
            if proc.returncode:
                raise subprocess.CalledProcessError(proc.returncode, cmd)

        try:
            if not (src / "CMakeLists.txt").is_file():
                dl = Path(tempfile.mkdtemp(prefix="llama-sdist-"))
                try:
                    run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                         f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", str(dl)])
                    sdist = next(dl.glob("llama_cpp_python-*.tar.gz"))
                    src_root.mkdir(parents=True, exist_ok=True)
                    with tarfile.open(sdist) as tar:
                        tar.extractall(src_root, filter="data")
                finally:
                    shutil.rmtree(dl, ignore_errors=True)
            cache_file = BUILD_DIR / "CMakeCache.txt"
            if cache_file.is_file() and f"CMAKE_HOME_DIRECTORY:INTERNAL={src}\n" not in cache_file.read_text():
                shutil.rmtree(BUILD_DIR)  # configured from a source tree that may be gone
            run(["cmake", "-S", str(src), "-B", str(BUILD_DIR), "-DGGML_NATIVE=OFF", "-DLLAMA_CURL=OFF",
                 "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF"])
            run(["cmake", "--build", str(BUILD_DIR), "--target", *LLAMA_TOOLS, f"-j{os.cpu_count() or 2}"])
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, StopIteration, OSError) as e:
            return None, f"building llama-server failed ({e}); see {log}"
    return (binary, "") if binary.is_file() else (None, f"the build did not produce {binary}; see {log}")


def find_llama_server(args, vers: dict) -> tuple[Path | None, str]:
    """--llama-server, else the cached build (built now unless --no-build); its version goes into
    `vers`. (None, why) if there is none."""
    binary, why = (args.llama_server, "") if args.llama_server else llama_server_binary(not args.no_build)
    if binary is not None and "llama-server" not in vers:
        try:
            r = subprocess.run([str(binary), "--version"], capture_output=True, text=True, timeout=30)
            vers["llama-server"] = " ".join((r.stdout + r.stderr).split())[:200]
        except (OSError, subprocess.TimeoutExpired):
            pass
    return binary, why


def llama_server_has(binary: Path, flag: str) -> bool:
    """Does this llama-server's --help mention `flag`."""
    try:
        r = subprocess.run([str(binary), "--help"], capture_output=True, text=True, timeout=30)
        return flag in r.stdout + r.stderr
    except (OSError, subprocess.TimeoutExpired):
        return False

