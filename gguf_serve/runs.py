"""A request's generations in the engine, held as a run: admitted against the queue limit on
entering, read as events, and cancelled on leaving however the request ended (as llama.cpp's
server cancels a response reader's tasks when the reader goes out of scope).

    async with Run(runs, served, n=2, metrics=metrics, info=info) as run:
        run.submit(jobs.Job(...))  # or an embedding job
        choices = await run.collect()
"""

from __future__ import annotations

import asyncio
import functools
import time
from dataclasses import replace
from typing import TYPE_CHECKING, AsyncIterator

import msgspec

from . import engine
from .embedder import EmbeddingJob
from .errors import APIError
from .events import Event
from .protocol import CompletionTokensDetails, PromptTokensDetails, Usage

if TYPE_CHECKING:
    from .loading import Served
    from .jobs import Job

ABORT = -1  # the choice index of an event that ends every choice at once (shutdown)


class Runs:
    """The runs in flight: the generations they hold, checked against the queue limit, and
    aborting them all (shutdown)."""

    def __init__(self, capacity: int):
        self.capacity = capacity  # sequences decoding plus generations allowed to wait for one
        self.live: set[Run] = set()

    def held(self) -> int:
        """Generations admitted and not yet ended by the engine. Counting what the engine ended,
        not what requests closed, means a run whose stream was never read (its client left
        before the first byte) holds nothing once its generations reach their limits."""
        return sum(run.n - run.ended for run in self.live)

    def abort(self, error: APIError) -> None:
        for run in list(self.live):
            run.abort(error)


class Choice(msgspec.Struct):
    """One choice as the engine finished it."""

    text: str = ""
    finish_reason: str | None = None
    logprobs: list = []
    reasoning: str = ""
    stop_string: str | None = None  # the stop string that ended it, if one did
    context_full: bool = False  # a "length" the context's end forced (Event.context_full)


class Run:
    """The choices of one request (n for each prompt). Entering admits it or raises a 429;
    leaving cancels whatever still runs and counts its tokens."""

    def __init__(self, runs: Runs, served: Served, n: int, metrics, info: dict):
        self.runs, self.served, self.n, self.metrics, self.info = runs, served, n, metrics, info
        self.events: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self.generations: list[engine.Generation] = []
        self.n_prompt = self.n_completion = self.n_cached = self.n_reasoning = 0
        self.thinking: bool | None = None  # a thinking model's run (see engine.Generation.thinking)
        self.ended = 0  # generations the engine has ended
        self.finished: set[int] = set()  # choices whose last event was read
        self.n_choices = 1  # choices for each prompt
        self.aborted: APIError | None = None
        self.started = self.last_token = time.perf_counter()
        self.whole = False  # only the finished text is read (collect): the engine holds the events
        # Inter-token times, observed into their histogram when the run ends, not as each token arrives:
        # prometheus' observe (a lock and a bucket search) was 5% of the event loop's time per streamed
        # token in a cProfile of a stream; in one loop at the end it runs with warm caches.
        self.gaps: list[float] = []

    async def __aenter__(self) -> Run:
        held = self.runs.held()
        if held + self.n > self.runs.capacity:
            raise APIError(429, f"{held} generations are running or queued already; retry shortly", None, "queue_full")
        self.runs.live.add(self)
        return self

    async def __aexit__(self, *exc) -> None:
        self.close()

    def submit(self, work: Job | EmbeddingJob) -> None:
        """Start the request's work: a Job's n choices for each prompt (seeded sampling gives each
        choice its own seed), or an embedding job, queued, cancelled and counted as one generation."""
        if isinstance(work, EmbeddingJob):
            self.n_prompt = sum(len(tokens) for tokens in work.inputs)
            work.emit = functools.partial(self._emit, 0)
            self.generations.append(work)
            self.served.engine.embed(work)
            return
        config, info = self.served.config, self.info
        if config.log_prompts:
            info["prompt"] = work.logged
        if work.located_by_search:
            info["content_located_by_search"] = True
            self.metrics.spans_searched.inc()
        deadline = time.monotonic() + config.request_timeout_s
        self.n_choices, self.thinking = work.n, work.thinking
        self.n_prompt = sum(len(p) for p in work.prompts)
        for prompt in work.prompts:
            for i in range(work.n):
                emit = functools.partial(self._emit, len(self.generations))
                sampling = work.sampling if work.sampling.seed is None else replace(work.sampling, seed=work.sampling.seed + i)
                self.generations.append(engine.Generation(prompt, work.max_tokens, sampling, emit, work.stop,
                                                          work.top_logprobs, deadline, thinking=work.thinking))
        for gen in self.generations:
            self.served.engine.submit(gen)

    def _emit(self, index: int, event: Event) -> None:
        """The engine's event for choice `index` (on the event loop)."""
        self.ended += bool(event.finish_reason)
        self.events.put_nowait((index, event))

    async def __aiter__(self) -> AsyncIterator[tuple[int, Event]]:
        """(choice index, event) as the engine produces them, until every choice has finished."""
        finished = self.finished
        while len(finished) < len(self.generations):
            index, event = await self.events.get()
            if index == ABORT:
                raise self.aborted
            if index in finished:
                continue
            if event.text:
                self._timing()
            if event.finish_reason == "error":
                raise APIError(500, event.text, None, "engine_error")
            if event.finish_reason == "grammar":
                raise APIError(400, event.text, "response_format", "grammar_too_complex")
            if event.finish_reason:
                finished.add(index)
                self.n_completion += event.completion_tokens
                self.n_reasoning += event.reasoning_tokens
                self.n_cached += event.cached_tokens if index % self.n_choices == 0 else 0  # once per prompt
                self.metrics.reused_tokens.inc(event.cached_tokens)
            yield index, event

    def _timing(self) -> None:
        now = time.perf_counter()
        if "ttft_s" not in self.info:
            self.info["ttft_s"] = round(now - self.started, 4)
            self.metrics.ttft.observe(now - self.started)
        elif not self.whole:  # a whole run's events come together at its end: no inter-token time
            self.gaps.append(now - self.last_token)
        self.last_token = now

    def close(self) -> None:
        """Nothing more to generate: the request ended, or its client went away."""
        if self not in self.runs.live:
            return
        for gen in self.generations:
            gen.cancelled = True
        self.runs.live.discard(self)
        if not self.generations:
            return  # refused before it ran
        # a choice still running when its client left: the tokens made for it up to now
        self.n_completion += sum(gen.generated for i, gen in enumerate(self.generations)
                                 if i not in self.finished and isinstance(gen, engine.Generation))
        self.info.update(prompt_tokens=self.n_prompt, cached_tokens=self.n_cached, completion_tokens=self.n_completion)
        self.metrics.prompt_tokens.inc(self.n_prompt)
        self.metrics.completion_tokens.inc(self.n_completion)
        for gap in self.gaps:
            self.metrics.inter_token.observe(gap)

    def abort(self, error: APIError) -> None:
        """End every choice now with `error` (posted apart from the choices, so that one that
        already finished can't swallow it)."""
        self.aborted = error
        self.events.put_nowait((ABORT, Event("", "aborted")))

    async def collect(self) -> list[Choice]:
        """Each choice's whole text: the engine is told so, and merges a choice's events after
        its first into the one that ends it."""
        self.whole = True
        for gen in self.generations:
            if isinstance(gen, engine.Generation):
                gen.stream = False
        choices = [Choice() for _ in self.generations]
        async for i, event in self:
            choices[i].text += event.text
            choices[i].reasoning += event.reasoning
            choices[i].logprobs += event.logprobs
            choices[i].finish_reason = choices[i].finish_reason or event.finish_reason
            choices[i].stop_string = choices[i].stop_string or event.stop_string
            choices[i].context_full = choices[i].context_full or event.context_full
        return choices

    async def collect_unless_disconnected(self, receive) -> list[Choice] | None:
        """The choices, or None if the client disconnects first (leaving the run then stops them)."""
        work = asyncio.ensure_future(self.collect())
        gone = asyncio.ensure_future(disconnected(receive))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not work.done():
            work.cancel()
            return None
        return work.result()

    def usage(self) -> Usage:
        return Usage(
            prompt_tokens=self.n_prompt,
            completion_tokens=self.n_completion,
            total_tokens=self.n_prompt + self.n_completion,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=self.n_cached),
            completion_tokens_details=msgspec.UNSET if self.thinking is None else CompletionTokensDetails(self.n_reasoning),
        )


async def disconnected(receive) -> None:
    """Returns when the client has gone (the body was read already, so only that can come)."""
    while (await receive())["type"] != "http.disconnect":
        pass
