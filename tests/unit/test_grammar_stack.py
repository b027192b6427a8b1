"""A grammar is compiled on a thread of grammar.GRAMMAR_STACK, whatever the caller's stack: llguidance's
compiler recurses through a schema's nesting, and a stack overflow is a SIGSEGV of the whole process
(the deepest schema tools allows overflowed a 128 KiB stack, musl's default for threads). Run in a
subprocess, so that a crash fails the test rather than pytest."""

import subprocess
import sys

import pytest

from conftest import ROOT, smollm2_path
from gguf_serve import grammar

COMPILE = """
import threading
from pathlib import Path
from gguf_serve import grammar, tools
from gguf_serve.model import Model

model = Model(Path({model!r}), vocab_only=True)
schema = {{"type": "string"}}
for _ in range((tools.MAX_SCHEMA_DEPTH - 1) // 2):  # the deepest schema tools accepts
    schema = {{"type": "object", "properties": {{"a": schema}}, "required": ["a"]}}
failed = []

def check():
    try:
        grammar.check_grammar(model, tools.schema_grammar(schema, "p"))
    except BaseException as e:
        failed.append(e)

threading.stack_size(128 << 10)  # a request's worker thread with a small stack (musl's default)
thread = threading.Thread(target=check)
thread.start()
thread.join()
print("compiled" if not failed else f"failed: {{failed[0]!r}}")
"""


def test_the_deepest_schema_compiles_on_a_thread_of_known_stack():
    code = COMPILE.format(model=str(smollm2_path()))
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "compiled" in done.stdout, (done.returncode, done.stdout, done.stderr[-2000:])
    assert "Traceback" not in done.stderr, done.stderr[-2000:]  # nothing raised and lost in a thread


def test_whatever_compiling_raises_on_its_thread_reaches_the_caller(monkeypatch):
    """Not only a GrammarError: an exception left in the compiling thread would be lost with it, and
    the grammar would pass the request's check."""
    def rejecting(model, text):
        raise ValueError("rejected")

    monkeypatch.setattr(grammar, "Matcher", rejecting)
    with pytest.raises(ValueError, match="rejected"):
        grammar.check_grammar(None, "start: 'a'")
