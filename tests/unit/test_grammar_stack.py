"""A grammar is compiled on a thread of engine.GRAMMAR_STACK, whatever the caller's stack (issue
#25: llama.cpp's parser recurses once per nested group, and a stack overflow is a SIGSEGV of
the whole process). Run in a subprocess, so that a crash fails the test rather than pytest."""

import subprocess
import sys

from conftest import ROOT, smollm2_path

COMPILE = """
import threading
from pathlib import Path
from gguf_serve import engine, tools
from gguf_serve.model import Model

model = Model(Path({model!r}), vocab_only=True)
depth = 20000  # about 9 MB of the parser's stack: past glibc's 8 MiB default, within GRAMMAR_STACK
grammar = "root ::= " + "(" * depth + '"a"' + ")" * depth
assert depth > tools.MAX_GRAMMAR_DEPTH  # what a schema may make is far less: this is the margin
threading.stack_size(1 << 20)  # a request's worker thread with a small stack (musl's is 128 KiB)
thread = threading.Thread(target=engine.check_grammar, args=(model, grammar))
thread.start()
thread.join()
print("compiled")
"""


def test_a_deep_grammar_compiles_on_a_thread_of_known_stack():
    code = COMPILE.format(model=str(smollm2_path()))
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "compiled" in done.stdout, (done.returncode, done.stderr[-2000:])
