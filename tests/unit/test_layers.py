"""The decode core imports no web framework (issue #26): importing the engine, in a fresh
interpreter, loads neither Litestar nor the HTTP side of the package."""

import subprocess
import sys

from conftest import ROOT

CHECK = """
import sys
import gguf_serve.engine
web = sorted(m for m in sys.modules if m.split(".")[0] in ("litestar", "granian", "redis")
             or m in ("gguf_serve.access", "gguf_serve.lifecycle", "gguf_serve.service", "gguf_serve.protocol"))
print(web)
"""


def test_importing_the_engine_loads_no_web_framework():
    done = subprocess.run([sys.executable, "-c", CHECK], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
