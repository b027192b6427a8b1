"""A GGUF's own chat template, rendered in a process of its own whose memory the OS bounds.

The template is the model file's code. The sandbox (sandbox.py) stops it escaping and
the time limit stops its loops, but one C call can still build hundreds of megabytes that no
Python-level check sees: `'%0300000000d' % 1`, `'x'|center(300000000)`, `x|tojson(indent=N)`.
So the server never renders it itself: a render process (started with exec, not forked: the
server holds llama.cpp's threads) imports only jinja2 and templates.py, limits its address
space to RENDER_MEMORY, and renders one conversation per request on its pipes. A render that
outgrows the limit fails there (MemoryError) and one that outlasts the time limit in C code is
killed; either way the request gets the 400 template_error it got before, and the next render
starts a fresh process. So does a render that finds its process dead (the OOM killer took it):
that is no fault of its conversation.

Slow renders get a lane of their own, so that they cost ordinary chats little. One process is
kept for every render, which take it in turn, in the order they came: an ordinary render takes
about a millisecond (357 µs for Qwen3's template on a 4-message chat, bench hardening), and there
it may take SLOW_AFTER_S. One that takes longer stops there (its process stays fit for the next)
and starts again in a process of its own with the whole time limit, MAX_SLOW_RENDERS at a time:
so at most 1 + MAX_SLOW_RENDERS processes, each bounded to RENDER_MEMORY, and a hostile
template's loop holds one core, not every core the decode needs. A slow render waits for that
lane as long as the slow render ahead of it can take (SLOW_WAIT_S), then is refused
(RenderBusy: a 429 with Retry-After).

Waiting, not refused at once: a client whose slow chat is refused at once sends the next one at
once, and each first takes its SLOW_AFTER_S of the kept process; 20 such clients kept it busy
all the time, and an ordinary render waited 1.2 s (median, bench hardening's attack) for its
turn, against 3 ms when theirs wait (each then comes back every few seconds). A long legitimate
chat (1,000 messages take Qwen3's template 160 ms) waits for the one before it rather than
failing. Bounded, not waiting for every slow render before it: a render whose client left is
not kept queued for long. Before this lane, 20 concurrent slow renders held every worker thread
of the server's shared pool for their 2 s each and started a process each: an ordinary render
waited 6.7 s behind them, beside 6 render processes (bench hardening measures it again).

Run as a module (`python -m gguf_serve.template_process`), this file is the render process.
"""

from __future__ import annotations

import collections
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
# How long the server waits for a render beyond its time limit (which the process enforces on
# Python code) before it kills the process: C code the trace can't stop.
GRACE_SECONDS = 1.0
# How long a render may take in the kept process before it goes to the slow lane: a hundred
# times an ordinary render; a chat of 300 messages gets there (100 take Qwen3's template 13 ms,
# 1,000 take 160). It is also what each slow render costs the renders waiting their turn behind it.
SLOW_AFTER_S = 0.05
# Slow renders at once, each in a process of its own started for it (60-70 ms of CPU) and
# ended after it. One: a hostile template's loop takes one of the two cores of the smallest
# host this serves on, and RENDER_MEMORY more address space at most, whatever the clients send.
MAX_SLOW_RENDERS = 1

# How long a slow render waits for a process of its own: as long as the one ahead of it can take.
SLOW_WAIT_S = templates.RENDER_SECONDS + GRACE_SECONDS

_LENGTH = struct.Struct("<I")
# What the render process answers a request with: the first item of its answer.
_OK, _REFUSED, _SLOW, _UNFIT = "ok", "refused", "slow", "unfit"


class TemplateProcess:
    """A Render (templates.Render) that renders `source` in a render process: the one kept for
    every render, and for a render that took longer there than SLOW_AFTER_S, one of its own."""

    def __init__(self, source: str, bos_token: str, eos_token: str, started: RenderProcess | None = None):
        """`started`: a render process started before the template was known (at a cold start, while
        the model loads), compiled on first use."""
        self.start = msgspec.json.encode((source, bos_token, eos_token))
        self.kept = started
        self.turn = Turn()  # held by the render using the kept process
        self.slow_lane = threading.BoundedSemaphore(MAX_SLOW_RENDERS)  # a slow render's own process

    def __call__(self, messages: templates.Messages, **extra) -> str:
        with self.turn:
            status, answer = self._kept(messages, extra)
        if status == _SLOW:
            status, answer = self._alone(messages, extra)
        if status != _OK:
            raise templates.TemplateError(answer)
        return answer

    def _kept(self, messages: templates.Messages, extra: dict) -> tuple[str, str]:
        """The render in the kept process (the caller holds the turn), for up to SLOW_AFTER_S. A
        process found dead is replaced, and a render whose process dies is tried once more in a
        fresh one: the OOM killer may have taken it between renders, no fault of these messages."""
        for _ in range(2):
            if self.kept is None or self.kept.proc.poll() is not None:
                if self.kept is not None:
                    self.kept.kill()
                self.kept = RenderProcess()
            worker = self.kept
            try:
                worker.compile(self.start)  # raises TemplateError if the template doesn't compile
                worker.send(messages, extra, SLOW_AFTER_S)
                return worker.answer(SLOW_AFTER_S)
            except (OSError, EOFError):  # it died
                worker.kill()
            finally:
                if worker.proc.returncode is not None:  # killed: it ran out of memory, died or outlasted the grace
                    self.kept = None
        raise templates.TemplateError(_DIED)

    def _alone(self, messages: templates.Messages, extra: dict) -> tuple[str, str]:
        """A slow render, again, in a process of its own with the whole time limit."""
        if not self.slow_lane.acquire(timeout=SLOW_WAIT_S):
            raise templates.RenderBusy(
                f"this conversation takes the model's chat template over {SLOW_AFTER_S * 1000:g} ms to render, and "
                f"other such renders kept its render processes busy for {SLOW_WAIT_S:g} s; retry shortly")
        worker = RenderProcess()
        try:
            worker.compile(self.start)
            worker.send(messages, extra, templates.RENDER_SECONDS)
            return worker.answer(templates.RENDER_SECONDS)
        except (OSError, EOFError):
            raise templates.TemplateError(_DIED) from None
        finally:
            worker.kill()
            self.slow_lane.release()


class Turn:
    """A lock taken in the order it was asked for: threading.Lock lets a thread that comes back for
    it take it before one waiting wakes. With 20 clients whose slow renders were refused at once
    (so back at once), an ordinary render waited 4.9 s (median) for the kept process behind
    threading.Lock, 1.2 s in turn; at most, it waits for each render admitted before it."""

    def __init__(self):
        self.lock = threading.Lock()
        self.held = False
        self.waiting: collections.deque[threading.Lock] = collections.deque()

    def __enter__(self) -> None:
        with self.lock:
            if not self.held:
                self.held = True
                return
            handed = threading.Lock()
            handed.acquire()
            self.waiting.append(handed)
        handed.acquire()  # released by the holder, who hands it over

    def __exit__(self, *exc) -> None:
        with self.lock:
            if self.waiting:
                self.waiting.popleft().release()
            else:
                self.held = False


_DIED = "the model's chat template failed on these messages: the render process died"


class RenderProcess:
    """One render process and its pipes. It starts at once (an interpreter, msgspec and jinja2:
    60-70 ms of CPU) and compiles its template when given it."""

    def __init__(self):
        self.proc = subprocess.Popen([sys.executable, "-m", __spec__.name], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, close_fds=True)
        self.compiled = False

    def compile(self, start: bytes) -> None:
        """Give it the template, once (raises TemplateError if it doesn't compile, and ends it)."""
        if self.compiled:
            return
        try:
            self._write(start)
            status, answer = self._read(30.0)  # the process's start and the template's compilation
        except (OSError, EOFError):  # TimeoutError included
            self.kill()
            raise templates.TemplateError("the model's chat template can't be compiled: its render process died "
                                          "or did not start") from None
        if status != _OK:
            self.kill()
            raise templates.TemplateError(answer)
        self.compiled = True

    def send(self, messages: templates.Messages, extra: dict, seconds: float) -> None:
        """Ask for a render with a time limit of `seconds` (OSError: the process is dead)."""
        # JSON, not msgpack: what came as JSON goes back as JSON (an integer of any size included)
        self._write(msgspec.json.encode((messages, extra, seconds)))

    def answer(self, seconds: float) -> tuple[str, str]:
        """The answer to the render sent, whose time limit was `seconds`: killed GRACE_SECONDS past
        it (C code) and when it ran out of memory (EOFError or an OSError: it died)."""
        try:
            status, answer = self._read(seconds + GRACE_SECONDS)
        except TimeoutError:
            self.kill()
            return _REFUSED, f"the model's chat template took longer than {seconds:g} s to render"
        if status == _UNFIT:  # it ran out of memory: start afresh
            self.kill()
            return _REFUSED, answer
        return status, answer

    def _write(self, request: bytes) -> None:
        self.proc.stdin.write(_LENGTH.pack(len(request)) + request)
        self.proc.stdin.flush()

    def _read(self, seconds: float) -> tuple[str, str]:
        """One answer (EOFError or an OSError: the process died; TimeoutError: none within `seconds`)."""
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
        try:
            return msgspec.json.decode(data[_LENGTH.size:], type=tuple[str, str])
        except msgspec.DecodeError:
            raise EOFError from None

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
            self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:  # closing stdin flushes what a dead process never read: a BrokenPipeError, nothing to do
                pipe.close()
            except OSError:
                pass


# --- The render process ----------------------------------------------------------------------


def serve(stdin, stdout) -> None:
    """Compile the template the first request carries, then render each request's conversation
    within its time limit: every answer is (status, prompt or message), and after an _UNFIT one
    (out of memory) the process ends."""
    import resource
    import signal

    from . import sandbox  # here, in the render process: the server never imports jinja2

    resource.setrlimit(resource.RLIMIT_AS, (RENDER_MEMORY, RENDER_MEMORY))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C is for the server, which ends this by closing its pipe

    def answer(status: str, value: str) -> None:
        data = msgspec.json.encode((status, value))
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
                answer(_OK, "")
                continue
            messages, extra, seconds = request
            with sandbox.time_limit(seconds):
                prompt = render(messages, **extra)
            if len(prompt) > MAX_PROMPT_CHARS:
                raise templates.TemplateError(f"the model's chat template wrote a prompt of {len(prompt)} characters")
            answer(_OK, prompt)
        except sandbox.OutOfTime as e:
            answer(_SLOW if seconds < templates.RENDER_SECONDS else _REFUSED, str(e))
        except templates.TemplateError as e:
            answer(_REFUSED, str(e))
        except MemoryError:
            answer(_UNFIT, f"the model's chat template needs more than {RENDER_MEMORY >> 20} MB to render these "
                           "messages")
            return


if __name__ == "__main__":
    serve(sys.stdin.buffer, sys.stdout.buffer)
