"""A run's lifecycle with a stand-in engine (the engine is not the point here): admission
against the queue limit, events in, cancellation on leaving, shutdown aborts."""

import asyncio
from types import SimpleNamespace

import pytest

from gguf_serve import engine
from gguf_serve.events import Event
from gguf_serve.metrics import Metrics
from gguf_serve.jobs import Job
from gguf_serve.errors import APIError
from gguf_serve.runs import Run, Runs


class FakeEngine:
    def __init__(self):
        self.submitted: list[engine.Generation] = []

    def submit(self, gen: engine.Generation) -> None:
        self.submitted.append(gen)


def setup(capacity: int = 4):
    served = SimpleNamespace(engine=FakeEngine(), config=SimpleNamespace(request_timeout_s=60, log_prompts=False))
    return Runs(capacity), served, Metrics(lambda: None)


def run_of(runs, served, metrics, n=1) -> Run:
    return Run(runs, served, n, metrics, {})


def test_entering_admits_until_the_queue_is_full_and_leaving_frees():
    async def main():
        runs, served, metrics = setup(capacity=3)
        async with run_of(runs, served, metrics, n=2):
            with pytest.raises(APIError) as e:
                async with run_of(runs, served, metrics, n=2):
                    pass
            assert e.value.status == 429 and e.value.code == "queue_full"
            async with run_of(runs, served, metrics, n=1):
                assert runs.held() == 3
        assert runs.held() == 0 and not runs.live

    asyncio.run(main())


def test_leaving_cancels_every_generation_however_the_request_ended():
    async def main():
        runs, served, metrics = setup()
        with pytest.raises(RuntimeError):
            async with run_of(runs, served, metrics, n=2) as run:
                run.submit(Job([[1, 2, 3]], 2, 8, engine.Sampling(seed=7), []))
                raise RuntimeError("the handler failed")
        gens = served.engine.submitted
        assert len(gens) == 2 and all(g.cancelled for g in gens)
        assert [g.sampling.seed for g in gens] == [7, 8]  # n seeded choices differ

    asyncio.run(main())


def test_events_come_by_choice_and_usage_adds_up():
    async def main():
        runs, served, metrics = setup()
        async with run_of(runs, served, metrics, n=2) as run:
            run.submit(Job([[1, 2], [3, 4, 5]], 1, 8, engine.Sampling(), []))
            a, b = served.engine.submitted
            a.emit(Event("Hel"))
            b.emit(Event("Bye", "stop", completion_tokens=1, cached_tokens=1))
            a.emit(Event("lo", "length", completion_tokens=2))
            choices = await run.collect()
        assert [(c.text, c.finish_reason) for c in choices] == [("Hello", "length"), ("Bye", "stop")]
        usage = run.usage()
        assert (usage.prompt_tokens, usage.completion_tokens, usage.prompt_tokens_details.cached_tokens) == (5, 3, 1)

    asyncio.run(main())


def test_shutdown_abort_ends_a_run_whose_first_choice_already_finished():
    async def main():
        runs, served, metrics = setup()
        async with run_of(runs, served, metrics, n=2) as run:
            run.submit(Job([[1, 2]], 2, 8, engine.Sampling(), []))
            first, _ = served.engine.submitted
            first.emit(Event("done", "stop", completion_tokens=1))
            runs.abort(APIError(503, "shutting down", None, "server_shutting_down"))
            with pytest.raises(APIError) as e:
                await asyncio.wait_for(run.collect(), 5)
            assert e.value.code == "server_shutting_down"

    asyncio.run(main())


def test_an_engine_error_is_a_500():
    async def main():
        runs, served, metrics = setup()
        async with run_of(runs, served, metrics) as run:
            run.submit(Job([[1]], 1, 8, engine.Sampling(), []))
            served.engine.submitted[0].emit(Event("engine error: boom", "error"))
            with pytest.raises(APIError) as e:
                await run.collect()
            assert e.value.status == 500

    asyncio.run(main())


def test_the_engine_refuses_an_empty_prompt():
    gen = engine.Generation([], 1, engine.Sampling(), emit=None)
    with pytest.raises(ValueError):
        engine.Engine.submit(SimpleNamespace(inbox=None), gen)


def test_a_run_nobody_reads_stops_holding_the_queue_once_the_engine_ends_it():
    """A stream whose client left before its first byte is never read, so never left: what the
    engine ended no longer counts against the queue."""
    async def main():
        runs, served, metrics = setup(capacity=2)
        leaked = run_of(runs, served, metrics, n=2)
        await leaked.__aenter__()
        leaked.submit(Job([[1, 2]], 2, 8, engine.Sampling(), []))
        assert runs.held() == 2
        for gen in served.engine.submitted:
            gen.emit(Event("", "length", completion_tokens=8))
        assert runs.held() == 0
        async with run_of(runs, served, metrics, n=2):
            pass

    asyncio.run(main())
