"""The served model: load the GGUF, choose its chat format, start its decode thread, warm it up.

What the app's lifespan loads once; every request reads it and nothing changes it after.
start_loading begins a cold start's slow parts before anything else: importing this module
costs no more than llama.cpp's bindings (the decode thread's modules, numpy among them, are
imported once the model is being read).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import reasoning, templates
from .config import Config, ConfigError
from .model import Model
from .template_process import RenderProcess, TemplateProcess


class StartError(Exception):
    """The model loaded but can't serve (its template fails, its first token fails)."""


@dataclass
class Served:
    config: Config
    model: Model
    engine: engine.Engine
    render: templates.Render | None  # None: an embedding model
    # The threads in which requests that render the model's own template prepare (None: a hand-written
    # family renders in microseconds, in the shared pool), as many as requests are admitted: none waits
    # for a thread, only for a render process (template_process.py), and a slow render holds no thread
    # of the shared pool the other requests' slow work runs in.
    render_lane: concurrent.futures.Executor | None
    stops: list[str]  # end-of-turn texts that are not single special tokens
    renders_tool_turns: bool  # its format writes tool calls and results (else jobs.py writes them as text)
    created: int
    timings: dict[str, float]  # seconds each step of loading took (the start-up log line)
    # What computed its prompt cache's states (prompt_cache_disk.computed_by), taken at start: set
    # when PROMPT_CACHE_DIR is, for the states written there when it stops
    model_hash: bytes | None = None

    @property
    def own_template(self) -> str | None:
        """The model's own chat template, when that is what renders its prompts."""
        return self.model.metadata.get("tokenizer.chat_template") if self.config.chat_format in ("auto", "jinja") else None

    @property
    def thinks(self) -> bool:
        """A thinking model whose reasoning is split from its answer (REASONING_FORMAT not none)."""
        if self.config.reasoning_format == "none":
            return False
        return self.config.reasoning if self.config.reasoning is not None else reasoning.thinks(self.own_template)

    @property
    def template_takes_tools(self) -> bool:
        return "tools" in (self.own_template or "")


def chat_renderer(config: Config, model: Model, started: RenderProcess | None = None) -> tuple[templates.Render, tuple[str, ...]]:
    """The model's prompt format and end-of-turn texts: its own template unless a family is forced.
    `started`: a render process started for it, used for the template or ended."""
    family = templates.family_of(model.metadata, config.model_path.name)
    template = model.metadata.get("tokenizer.chat_template")
    fmt = config.chat_format
    if fmt == "jinja" and not template:
        raise ConfigError(f"{config.model_path}: CHAT_FORMAT=jinja but the model carries no chat template")
    if fmt == "jinja" or (fmt == "auto" and template):
        try:
            render = TemplateProcess(template, model.token_text(model.bos), model.token_text(model.eos), started)
            templates.probe(render)  # compiles it, and renders an ordinary chat
        except templates.TemplateError as e:
            raise ConfigError(
                f"{config.model_path}: its chat template can't be used ({e}); "
                f"set CHAT_FORMAT to a family ({', '.join(templates.FAMILIES)}) to use a hand-written one"
            ) from None
        return render, templates.FAMILIES[family].stops
    if started:
        started.kill()
    chosen = templates.FAMILIES[family if fmt == "auto" else fmt]
    return chosen.render, chosen.stops


@dataclass
class Loading:
    """What start_loading began."""

    model: concurrent.futures.Future  # the Model, being read in a thread
    render_process: RenderProcess | None  # started for the model's own template, if one may render its prompts
    started: float  # perf_counter() when it began


def start_loading(config: Config) -> Loading:
    """Start a cold start's slow parts now, side by side: the model read in a thread of its own
    (llama.cpp's load runs outside the GIL, so it overlaps the web stack importing, the app being
    built and the server starting) and a render process for its template (an interpreter
    starting on the other core)."""
    loaded = concurrent.futures.Future()
    started = time.perf_counter()

    def read() -> None:
        # llama.cpp logs some 1,200 lines as it loads SmolLM2, each through model.py's callback,
        # Python code that needs the GIL: while the web stack imports (holding it), each line
        # waited up to the 5 ms switch interval. Measured: the load took 0.76 s beside a busy
        # thread against 0.095 s alone, and 0.137 s with this interval, kept for the load only
        # (in a real start, median of 5: the read ends 45 ms sooner, the first answer 11 ms).
        interval = sys.getswitchinterval()
        sys.setswitchinterval(0.0005)
        try:
            model = Model(config.model_path, config.n_ctx, config.n_threads, config.parallel, kv_cache=config.kv_cache,
                          flash_attn=config.flash_attn, pooling=config.pooling, past_training=config.n_ctx_asked)
            loaded.set_result(model)
        except BaseException as e:
            loaded.set_exception(e)
        finally:
            sys.setswitchinterval(interval)

    threading.Thread(target=read, name="load", daemon=True).start()
    return Loading(loaded, RenderProcess() if config.chat_format in ("auto", "jinja") else None, started)


async def load(config: Config, loading: Loading, on_failure: Callable[[str], None]) -> Served:
    """The model (from `start_loading`), its chat format, its decode thread running, one token
    generated. `on_failure` is called on the event loop if the decode thread dies."""
    from . import engine, prompt_cache_disk  # the decode thread's modules: imported while the model is read

    model = await asyncio.wrap_future(loading.model)
    timings = dict(model.timings)
    step = time.perf_counter()
    if model.embedding_only:  # no chat format: it answers chat and completions with a 400
        render, stops = None, ()
        if loading.render_process:
            loading.render_process.kill()
    else:
        render, stops = await asyncio.to_thread(chat_renderer, config, model, loading.render_process)
    tool_turns = render is not None and await asyncio.to_thread(templates.renders_tool_turns, render)
    timings["chat_template"], step = time.perf_counter() - step, time.perf_counter()
    stop_tokens = {model.special[s] for s in stops if s in model.special}
    decoder = engine.Engine(model, config.parallel, asyncio.get_running_loop(), stop_tokens, on_failure,
                            config.prompt_cache_bytes)
    model_hash = None
    if config.prompt_cache_dir and decoder.cache:
        # before the first generation is submitted: until then the decode thread waits on its inbox
        # and has not touched the cache
        model_hash = await asyncio.to_thread(prompt_cache_disk.computed_by, model, config.model_path, model.n_ctx,
                                             config.kv_cache, config.flash_attn)
        await asyncio.to_thread(prompt_cache_disk.read, decoder.cache, config.prompt_cache_dir, model_hash)
    text_stops = [s for s in stops if s not in model.special]
    lane = (concurrent.futures.ThreadPoolExecutor(config.parallel + config.max_queue, "render")
            if isinstance(render, TemplateProcess) else None)
    served = Served(config, model, decoder, render, lane, text_stops, tool_turns, int(time.time()), timings, model_hash)
    await warm_up(served)
    timings["warm_up"], timings["load"] = time.perf_counter() - step, time.perf_counter() - loading.started
    return served


async def warm_up(served: Served) -> None:
    """One token (an embedding model: one embedding) through the whole path: pages the weights in
    and proves the engine works."""
    from . import engine
    from .embedder import EmbeddingJob
    from .events import Event

    done = asyncio.get_running_loop().create_future()

    def emit(event: Event) -> None:
        if event.finish_reason and not done.done():
            done.set_result(event)

    tokens = served.model.tokenize_prompt("Hello")
    if served.model.embedding_only:
        served.engine.embed(EmbeddingJob([tokens], emit))
    else:
        served.engine.submit(engine.Generation(tokens, 1, engine.Sampling(temperature=0), emit))
    event = await done
    if event.finish_reason == "error":
        raise StartError(f"{served.config.model_path}: the warm-up token failed ({event.text})")


def stop(served: Served, deadline: float) -> None:
    """Stop the decode thread; then, with PROMPT_CACHE_DIR, write the prompt cache there, what the
    sequences hold included, by `deadline` (time.monotonic()). Blocks: run it off the event loop."""
    served.engine.close()
    if served.model_hash is not None:
        from . import prompt_cache_disk

        served.engine.save_sequences()
        prompt_cache_disk.write(served.engine.cache, served.config.prompt_cache_dir, served.model_hash, deadline)


def since_process_start() -> float | None:
    """Seconds since this process started (Linux: its start time in /proc, to the 10 ms clock
    tick; None elsewhere)."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        return round(time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK"), 3)
    except (OSError, ValueError, AttributeError):
        return None
