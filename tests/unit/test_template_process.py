"""A model's own chat template renders in a process whose memory the OS bounds and that a
render too long is killed in (template_process.py, issue #25 item 10): what a template builds in
one C call (no time limit can interrupt it) can't reach the server."""

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from gguf_serve import sandbox, templates
from gguf_serve import template_process
from gguf_serve.template_process import TemplateProcess

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SLOW = "{% if messages[-1]['content'] == 'slow' %}{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}{% endif %}"
HI = [{"role": "user", "content": "Hi"}]


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
    assert not render.idle  # that process is gone; the next render starts another
    assert render(HI).endswith("<|im_start|>assistant\n")


def test_a_prompt_too_long_to_be_one_is_refused():
    render = TemplateProcess("{{ 'x'|center(10000000) }}", "", "")
    with pytest.raises(templates.TemplateError, match="wrote a prompt of 10000000 characters"):
        render(HI)


def test_the_templates_time_limit_still_holds_and_the_process_is_kept():
    render = TemplateProcess(SLOW + CHATML, "", "")
    with pytest.raises(templates.TemplateError, match="took longer than 2 s"):
        render([{"role": "user", "content": "slow"}])
    assert len(render.idle) == 1 and render(HI)


def test_a_render_past_the_deadline_is_killed(monkeypatch):
    """What the time limit can't stop (C code) the server stops: here the deadline is made
    shorter than the template's own limit, so that the loop stands for such code."""
    monkeypatch.setattr(template_process, "GRACE_SECONDS", 0.2 - templates.RENDER_SECONDS)
    render = TemplateProcess(SLOW + CHATML, "", "")
    assert render(HI)
    [worker] = render.idle
    with pytest.raises(templates.TemplateError, match="took longer than"):
        render([{"role": "user", "content": "slow"}])
    assert worker.proc.returncode is not None and not render.idle
    assert render(HI)


def test_a_template_that_does_not_compile_is_refused():
    with pytest.raises(templates.TemplateError, match="does not compile"):
        TemplateProcess("{% for m in messages %}", "", "")(HI)


def test_concurrent_renders_share_one_process_and_leave_one(monkeypatch):
    started = []
    spawn = template_process.RenderProcess.__init__
    monkeypatch.setattr(template_process.RenderProcess, "__init__", lambda self: (started.append(self), spawn(self))[1])
    render = TemplateProcess(CHATML, "", "")
    expected = render(HI)
    with ThreadPoolExecutor(4) as pool:
        assert set(pool.map(lambda _: render(HI), range(80))) == {expected}
    [kept] = render.idle
    assert [w for w in started if w.proc.returncode is None] == [kept]  # any extra one ended after its render


def test_a_slow_render_holds_no_other_render_beyond_the_wait():
    render = TemplateProcess(SLOW + CHATML, "", "")
    assert render(HI)
    with ThreadPoolExecutor(2) as pool:
        slow = pool.submit(render, [{"role": "user", "content": "slow"}])
        while not render.rendering:  # the slow one has the process
            time.sleep(0.001)
        assert render(HI).endswith("<|im_start|>assistant\n") and not slow.done()  # in a process of its own
        with pytest.raises(templates.TemplateError, match="took longer than 2 s"):
            slow.result()
    assert len(render.idle) == 1
