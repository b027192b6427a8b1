"""A model's own chat template (its GGUF's `tokenizer.chat_template`, Jinja): compiled and
rendered in jinja2's sandbox with the globals HF gives it, in bounded time and sizes.

Only the render process imports this module (template_process.py): the server never runs a
model's template itself, and doesn't pay jinja2's import (26 ms of its cold start, measured).
"""

from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager
from datetime import datetime

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .templates import RENDER_SECONDS, Messages, Render, TemplateError, tojson


def _raise_exception(message: str):
    raise TemplateError(message)


# The longest string or list one `*` may build, and the largest exponent `**` may take:
# C-level work a time limit can't interrupt.
MAX_REPEAT = 1 << 20
MAX_EXPONENT = 256


class _Sandbox(ImmutableSandboxedEnvironment):
    """The sandbox HF renders chat templates in (no attribute escapes, no mutation), which
    also refuses to build a huge string or number in one operation."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context, operator, left, right):
        if operator == "**" and isinstance(right, (int, float)) and abs(right) > MAX_EXPONENT:
            raise TemplateError(f"the chat template raises to the power {right}")
        if operator == "*":
            sizes = [len(x) * y for x, y in ((left, right), (right, left))
                     if isinstance(x, (str, list, tuple)) and isinstance(y, int)]
            if sizes and max(sizes) > MAX_REPEAT:
                raise TemplateError(f"the chat template builds a sequence of {max(sizes)} items")
        return super().call_binop(context, operator, left, right)


def jinja_template(source: str, bos_token: str, eos_token: str, tools: list | None = None) -> Render:
    """Compile a GGUF's `tokenizer.chat_template` in a sandbox, with the globals HF gives it.
    A render that fails or takes longer than RENDER_SECONDS raises TemplateError."""
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    try:
        template = env.from_string(source)
    except jinja2.TemplateError as e:
        raise TemplateError(f"the chat template does not compile: {e}") from None

    def render(messages: Messages, tools: list | None = tools, **extra) -> str:
        """`extra`: a request's chat_template_kwargs (enable_thinking...), passed on as llama.cpp does."""
        try:
            with time_limit(RENDER_SECONDS):
                fixed = dict(messages=messages, bos_token=bos_token, eos_token=eos_token, add_generation_prompt=True, tools=tools)
                return template.render({**extra, **fixed})
        except (TemplateError, MemoryError):  # the latter: the render process's limit (template_process.py)
            raise
        except Exception as e:  # a template is the model file's code: any failure is the template's
            raise TemplateError(f"the model's chat template failed on these messages: {type(e).__name__}: {e}") from None

    return render


class OutOfTime(TemplateError):
    """A render took longer than its time limit."""


_limit = threading.local()  # this thread's time limit in force: (deadline, seconds)


@contextmanager
def time_limit(seconds: float):
    """Raise OutOfTime in this thread's Python code once `seconds` have passed, or once a time
    limit around this one ends, if that is sooner: a trace function sees every line the
    template's compiled code runs."""
    outer = getattr(_limit, "now", None)
    deadline, limit = min((time.monotonic() + seconds, seconds), outer or (float("inf"), seconds))

    def trace(frame, event, arg):
        if time.monotonic() > deadline:
            raise OutOfTime(f"the model's chat template took longer than {limit:g} s to render")
        return trace

    outer_trace = sys.gettrace()
    _limit.now = (deadline, limit)
    sys.settrace(trace)
    try:
        yield
    finally:
        sys.settrace(outer_trace)
        _limit.now = outer
