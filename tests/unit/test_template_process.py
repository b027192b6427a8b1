"""A model's own chat template renders in a process whose memory the OS bounds and that a
render too long is killed in (template_process.py, issue #25 item 10): what a template builds in
one C call (no time limit can interrupt it) can't reach the server. One process is kept for every
render; a slow render goes on in a process of its own, beside at most MAX_SLOW_RENDERS - 1 others,
and one past that bound is refused (issue #34 item 5); a kept process that died is replaced by
the next render (item 4)."""

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from gguf_serve import sandbox, templates
from gguf_serve import template_process
from gguf_serve.template_process import TemplateProcess

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SLOW = "{% if messages[-1]['content'] == 'slow' %}{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}{% endif %}"
HI = [{"role": "user", "content": "Hi"}]


def children() -> set[int]:
    """This process's children that are still running (not zombies)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, ppid = stat.read_text().rsplit(")", 1)[1].split()[:2]
        except OSError:  # it ended meanwhile
            continue
        if int(ppid) == os.getpid() and state != "Z":
            found.add(int(stat.parent.name))
    return found


@pytest.fixture
def render_processes():
    """The render processes started during the test that are still running."""
    before = children()
    return lambda: sorted(children() - before)


def test_it_renders_as_the_template_does_in_process():
    render = TemplateProcess(CHATML, "<s>", "</s>")
    assert render(templates.PROBE) == sandbox.jinja_template(CHATML, "<s>", "</s>")(templates.PROBE)
    assert render(HI, tools=None, big=10**30) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("bomb", ["{{ '%0300000000d' % 1 }}", "{{ 'x'|center(300000000) }}",
                                  "{{ messages|tojson(indent=300000000) }}"])
def test_a_bomb_fails_in_the_render_process_which_is_replaced(bomb):
    render = TemplateProcess("{% if messages[-1]['content'] == 'bomb' %}" + bomb + "{% endif %}" + CHATML, "", "")
    with pytest.raises(templates.TemplateError, match="needs more than 256 MB"):
        render([{"role": "user", "content": "bomb"}])
    assert render.kept is None  # that process is gone; the next render starts another
    assert render(HI).endswith("<|im_start|>assistant\n")


def test_a_prompt_too_long_to_be_one_is_refused():
    render = TemplateProcess("{{ 'x'|center(10000000) }}", "", "")
    with pytest.raises(templates.TemplateError, match="wrote a prompt of 10000000 characters"):
        render(HI)


def test_the_templates_time_limit_still_holds_and_the_process_is_kept(render_processes):
    render = TemplateProcess(SLOW + CHATML, "", "")
    assert render(HI)
    kept = render.kept
    with pytest.raises(templates.TemplateError, match="took longer than 2 s"):
        render([{"role": "user", "content": "slow"}])
    assert render.kept is kept and kept.proc.poll() is None and render(HI)
    assert render_processes() == [kept.proc.pid]  # the slow render's own process ended with it


def test_a_render_past_the_deadline_is_killed(monkeypatch):
    """What the time limit can't stop (C code) the server stops: here the server's deadline is
    made shorter than the time limit the process is given, so that the loop stands for such code."""
    monkeypatch.setattr(template_process, "SLOW_AFTER_S", 1.0)
    monkeypatch.setattr(template_process, "GRACE_SECONDS", -0.8)
    render = TemplateProcess(SLOW + CHATML, "", "")
    assert render(HI)
    worker = render.kept
    with pytest.raises(templates.TemplateError, match="took longer than"):
        render([{"role": "user", "content": "slow"}])
    assert worker.proc.returncode is not None and render.kept is None
    assert render(HI)


def test_a_template_that_does_not_compile_is_refused():
    with pytest.raises(templates.TemplateError, match="does not compile"):
        TemplateProcess("{% for m in messages %}", "", "")(HI)


def test_concurrent_renders_share_one_process(monkeypatch, render_processes):
    started = []
    spawn = template_process.RenderProcess.__init__
    monkeypatch.setattr(template_process.RenderProcess, "__init__", lambda self: (started.append(self), spawn(self))[1])
    render = TemplateProcess(CHATML, "", "")
    expected = render(HI)
    with ThreadPoolExecutor(4) as pool:
        assert set(pool.map(lambda _: render(HI), range(80))) == {expected}
    assert started == [render.kept] and render_processes() == [render.kept.proc.pid]


def test_a_slow_render_goes_on_in_a_process_of_its_own_and_ordinary_ones_in_the_kept_one(render_processes):
    render = TemplateProcess(SLOW + CHATML, "", "")
    assert render(HI)
    kept = render.kept
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(render, [{"role": "user", "content": "slow"}])
        while len(render_processes()) < 2:  # it left the kept process for one of its own
            time.sleep(0.001)
        assert render(HI).endswith("<|im_start|>assistant\n") and not slow.done()  # answered while it renders
        assert len(render_processes()) == 2
        with pytest.raises(templates.TemplateError, match="took longer than 2 s"):
            slow.result()
    assert render.kept is kept and render_processes() == [kept.proc.pid]


def test_slow_renders_wait_for_their_lane_or_are_refused_and_processes_stay_bounded(render_processes):
    render = TemplateProcess(SLOW + CHATML, "", "")
    assert render(HI)
    most, watching = 0, threading.Event()

    def watch():
        nonlocal most
        while not watching.is_set():
            most = max(most, len(render_processes()))

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(8) as pool:
            renders = [pool.submit(render, [{"role": "user", "content": "slow"}]) for _ in range(8)]
            errors = [f.exception() for f in renders]
    finally:
        watching.set()
        watcher.join()
    busy = [e for e in errors if isinstance(e, templates.RenderBusy)]
    timed_out = [e for e in errors if isinstance(e, templates.TemplateError) and "took longer than 2 s" in str(e)]
    assert len(busy) + len(timed_out) == 8 and busy and timed_out
    assert most <= 1 + template_process.MAX_SLOW_RENDERS
    assert render(HI) and render_processes() == [render.kept.proc.pid]


def test_the_next_render_after_the_kept_process_died_starts_a_fresh_one(render_processes):
    """The OOM killer may take the kept process between two renders: the next render is no
    BrokenPipeError (closing the pipe flushed the request again) but rendered in a new process."""
    render = TemplateProcess(CHATML, "", "")
    expected = render(HI)
    dead = render.kept
    os.kill(dead.proc.pid, signal.SIGKILL)
    assert render(HI) == expected and render.kept is not dead and render.kept.proc.poll() is None
    # dead, though not yet seen to be: the request's write fails, and it goes to a new process too
    dead = render.kept
    os.kill(dead.proc.pid, signal.SIGKILL)
    os.waitid(os.P_PID, dead.proc.pid, os.WEXITED | os.WNOWAIT)
    dead.proc.poll = lambda: None
    assert render(HI) == expected and render.kept is not dead
    assert render_processes() == [render.kept.proc.pid]


def test_a_render_whose_process_dies_twice_fails_alone(monkeypatch):
    """Once is tried again in a fresh process (it may have been killed between renders); twice,
    the render fails, and the next one is rendered."""
    monkeypatch.setattr(template_process, "SLOW_AFTER_S", 30.0)  # the slow render stays in the kept process
    render = TemplateProcess(SLOW + CHATML, "", "")
    assert render(HI)
    first = render.kept
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(render, [{"role": "user", "content": "slow"}])
        while not render.turn.held:
            time.sleep(0.001)
        os.kill(first.proc.pid, signal.SIGKILL)
        while render.kept in (first, None):  # tried again in a fresh process
            time.sleep(0.001)
        os.kill(render.kept.proc.pid, signal.SIGKILL)
        with pytest.raises(templates.TemplateError, match="died"):
            slow.result()
    assert render(HI) and render.kept.proc.poll() is None


def test_killing_a_dead_process_with_an_unread_request_raises_nothing():
    worker = template_process.RenderProcess()
    os.kill(worker.proc.pid, signal.SIGKILL)
    worker.proc.wait()
    worker.proc.stdin.write(b"x" * 100)  # buffered: closing the pipe flushes it into a pipe nobody reads
    worker.kill()
    assert worker.proc.stdin.closed and worker.proc.stdout.closed


def test_renders_take_the_kept_process_in_the_order_they_came():
    turn, order = template_process.Turn(), []

    def take(i: int) -> None:
        with turn:
            order.append(i)

    with turn:
        threads = []
        for i in range(5):
            threads.append(threading.Thread(target=take, args=(i,)))
            threads[-1].start()
            while len(turn.waiting) < i + 1:  # each waits before the next comes
                time.sleep(0.001)
    for t in threads:
        t.join()
    assert order == [0, 1, 2, 3, 4] and not turn.held
