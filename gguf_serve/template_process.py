"""A GGUF's own chat template, rendered in a process of its own whose memory the OS bounds.

The template is the model file's code. The sandbox (sandbox.py) stops it escaping and
the time limit stops its loops, but one C call can still build hundreds of megabytes that no
Python-level check sees: `'%0300000000d' % 1`, `'x'|center(300000000)`, `x|tojson(indent=N)`.
So the server never renders it itself: a render process (started with exec, not forked: the
server holds llama.cpp's threads) imports only jinja2 and templates.py, limits its address
space to RENDER_MEMORY, and renders one conversation per request on its pipes. A render that
outgrows the limit fails there (MemoryError) and one that outlasts the time limit in C code is
killed; either way the request gets the 400 template_error it got before, and the next render
starts a fresh process.

Run as a module (`python -m gguf_serve.template_process`), this file is the render process.
"""

from __future__ import annotations

import os
import select
import struct
import subprocess
import sys
import threading
import time

import msgspec

from . import templates

# The render process's address space: 27 MB with Python, jinja2 and msgspec loaded; a prompt of
# 4 MB of non-Latin text (the largest body, held as 16 MB of UCS-4, rendered and encoded) fits.
RENDER_MEMORY = 256 << 20
# The longest prompt a render may return: twice the largest body, and far beyond any context.
MAX_PROMPT_CHARS = 8 << 20
# How long the server waits for a render beyond the template's own time limit (which the
# process enforces on Python code) before it kills the process: C code the trace can't stop.
GRACE_SECONDS = 1.0

_LENGTH = struct.Struct("<I")


# A render takes about a millisecond: a request whose render finds the process busy waits this
# long for it before starting another (60-70 ms of CPU and 13 MiB of PSS each), so that a slow
# render holds others up this much at most, and concurrent requests share one process. Kept one
# per concurrent render, four chats at once left 2-3 extra processes resident (bench coldstart).
WAIT_FOR_RENDER_S = 0.05


class TemplateProcess:
    """A Render (templates.Render) that renders `source` in a render process, kept for the next
    render unless it was killed (it ran out of memory, died, or outlasted the time limit). One
    process is kept: another starts only for a render that waited WAIT_FOR_RENDER_S for it, and
    ends after that render."""

    def __init__(self, source: str, bos_token: str, eos_token: str, started: RenderProcess | None = None):
        """`started`: a render process started before the template was known (at a cold start, while
        the model loads), compiled on first use."""
        self.start = msgspec.json.encode((source, bos_token, eos_token))
        self.idle: list[RenderProcess] = []
        self.started = [started] if started else []
        self.rendering = 0
        self.returned = threading.Condition()

    def __call__(self, messages: templates.Messages, **extra) -> str:
        with self.returned:
            if self.rendering and not self.idle:
                self.returned.wait_for(lambda: self.idle, WAIT_FOR_RENDER_S)
            worker = self.idle.pop() if self.idle else None
            started = self.started.pop() if self.started and not worker else None
            self.rendering += 1
        try:
            if worker is None:  # raises TemplateError if the template doesn't compile
                worker = (started or RenderProcess()).compile(self.start)
            return worker.render(messages, extra)
        finally:
            with self.returned:
                self.rendering -= 1
                keep = worker is not None and worker.proc.returncode is None and not self.idle
                if keep:  # not killed (a template's error, or its time limit, leaves it fit)
                    self.idle.append(worker)
                    self.returned.notify()
            if worker is not None and not keep:
                worker.kill()


class RenderProcess:
    """One render process and its pipes. It starts at once (an interpreter, msgspec and jinja2:
    60-70 ms of CPU) and compiles its template when given it."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-m", __spec__.name], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, close_fds=True)

    def compile(self, start: bytes) -> RenderProcess:
        try:
            self._call(start, deadline=30.0)  # the process's start and the template's compilation
        except templates.TemplateError:
            self.kill()
            raise
        return self

    def render(self, messages: templates.Messages, extra: dict) -> str:
        # JSON, not msgpack: what came as JSON goes back as JSON (an integer of any size included)
        return self._call(msgspec.json.encode((messages, extra)), templates.RENDER_SECONDS + GRACE_SECONDS)

    def _call(self, request: bytes, deadline: float) -> str:
        try:
            self.proc.stdin.write(_LENGTH.pack(len(request)) + request)
            self.proc.stdin.flush()
            ok, answer, fit = msgspec.json.decode(self._read(deadline))
        except TimeoutError:
            self.kill()
            raise templates.TemplateError(
                f"the model's chat template took longer than {templates.RENDER_SECONDS:g} s to render") from None
        except (OSError, EOFError, msgspec.DecodeError):
            self.kill()
            raise templates.TemplateError("the model's chat template failed on these messages: the render process died") from None
        if not fit:
            self.kill()  # it ran out of memory: start afresh
        if not ok:
            raise templates.TemplateError(answer)
        return answer

    def _read(self, seconds: float) -> bytes:
        fd, data, need = self.proc.stdout.fileno(), b"", _LENGTH.size
        deadline = time.monotonic() + seconds
        while len(data) < need:
            if not select.select([fd], [], [], max(0.0, deadline - time.monotonic()))[0]:
                raise TimeoutError
            chunk = os.read(fd, max(need - len(data), 1 << 16))
            if not chunk:
                raise EOFError
            data += chunk
            if need == _LENGTH.size and len(data) >= need:
                need += _LENGTH.unpack_from(data)[0]
        return data[_LENGTH.size:]

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdin.close()
        self.proc.stdout.close()


# --- The render process ----------------------------------------------------------------------


def serve(stdin, stdout) -> None:
    """Compile the template the first request carries, then render each request's conversation:
    every answer is (True, prompt) or (False, the TemplateError's message), and False last if
    the process ran out of memory, after which it ends."""
    import resource
    import signal

    from . import sandbox  # here, in the render process: the server never imports jinja2

    resource.setrlimit(resource.RLIMIT_AS, (RENDER_MEMORY, RENDER_MEMORY))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is for the server, which ends this by closing its pipe

    def answer(ok: bool, value: str, fit: bool = True) -> None:
        data = msgspec.json.encode((ok, value, fit))
        stdout.write(_LENGTH.pack(len(data)) + data)
        stdout.flush()

    def requests():
        while header := stdin.read(_LENGTH.size):
            yield msgspec.json.decode(stdin.read(_LENGTH.unpack(header)[0]))

    render = None
    for request in requests():
        try:
            if render is None:
                render = sandbox.jinja_template(*request)
                answer(True, "")
                continue
            messages, extra = request
            prompt = render(messages, **extra)
            if len(prompt) > MAX_PROMPT_CHARS:
                raise templates.TemplateError(f"the model's chat template wrote a prompt of {len(prompt)} characters")
            answer(True, prompt)
        except templates.TemplateError as e:
            answer(False, str(e))
        except MemoryError:
            answer(False, f"the model's chat template needs more than {RENDER_MEMORY >> 20} MB to render these messages",
                   fit=False)
            return


if __name__ == "__main__":
    serve(sys.stdin.buffer, sys.stdout.buffer)
