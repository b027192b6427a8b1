"""The served model: load the GGUF, choose its chat format, start its decode thread, warm it up.

What the app's lifespan loads once; every request reads it and nothing changes it after.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from dataclasses import dataclass
from typing import Callable

from . import engine
from .embedder import EmbeddingJob
from .events import Event
from .model import Model
from . import reasoning, templates
from .config import Config, ConfigError
from .template_process import TemplateProcess


class StartError(Exception):
    """The model loaded but can't serve (its template fails, its first token fails)."""


@dataclass
class Served:
    config: Config
    model: Model
    engine: engine.Engine
    render: templates.Render | None  # None: an embedding model
    stops: list[str]  # end-of-turn texts that are not single special tokens
    created: int
    load_seconds: float  # model load and warm-up

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


def chat_renderer(config: Config, model: Model) -> tuple[templates.Render, tuple[str, ...]]:
    """The model's prompt format and end-of-turn texts: its own template unless a family is forced."""
    family = templates.family_of(model.metadata, config.model_path.name)
    template = model.metadata.get("tokenizer.chat_template")
    fmt = config.chat_format
    if fmt == "jinja" and not template:
        raise ConfigError(f"{config.model_path}: CHAT_FORMAT=jinja but the model carries no chat template")
    if fmt == "jinja" or (fmt == "auto" and template):
        try:
            render = TemplateProcess(template, model.token_text(model.bos), model.token_text(model.eos))
            templates.probe(render)  # compiles it, and renders an ordinary chat
        except templates.TemplateError as e:
            raise ConfigError(
                f"{config.model_path}: its chat template can't be used ({e}); "
                f"set CHAT_FORMAT to a family ({', '.join(templates.FAMILIES)}) to use a hand-written one"
            ) from None
        return render, templates.FAMILIES[family].stops
    chosen = templates.FAMILIES[family if fmt == "auto" else fmt]
    return chosen.render, chosen.stops


def start_loading(config: Config) -> concurrent.futures.Future:
    """Start reading the model now, in a thread of its own: llama.cpp's load runs outside the
    GIL, so it overlaps whatever the process does before it can serve (building the app,
    starting the server and its event loop)."""
    loaded = concurrent.futures.Future()
    started = time.perf_counter()

    def read() -> None:
        try:
            model = Model(config.model_path, config.n_ctx, config.n_threads, config.parallel, kv_cache=config.kv_cache,
                                 flash_attn=config.flash_attn, pooling=config.pooling)
            loaded.set_result((model, started))
        except BaseException as e:
            loaded.set_exception(e)

    threading.Thread(target=read, name="load", daemon=True).start()
    return loaded


async def load(config: Config, loading: concurrent.futures.Future, on_failure: Callable[[str], None]) -> Served:
    """The model (from `start_loading`), its chat format, its decode thread running, one token
    generated. `on_failure` is called on the event loop if the decode thread dies."""
    model, t0 = await asyncio.wrap_future(loading)
    # an embedding model has no chat format: it answers chat and completions with a 400
    render, stops = (None, ()) if model.embedding_only else await asyncio.to_thread(chat_renderer, config, model)
    stop_tokens = {model.special[s] for s in stops if s in model.special}
    decoder = engine.Engine(model, config.parallel, asyncio.get_running_loop(), stop_tokens, on_failure)
    text_stops = [s for s in stops if s not in model.special]
    served = Served(config, model, decoder, render, text_stops, int(time.time()), 0.0)
    await warm_up(served)
    served.load_seconds = time.perf_counter() - t0
    return served


async def warm_up(served: Served) -> None:
    """One token (an embedding model: one embedding) through the whole path: pages the weights in
    and proves the engine works."""
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
