"""The served model: load the GGUF, choose its chat format, start its decode thread, warm it up.

What the app's lifespan loads once; every request reads it and nothing changes it after.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Callable

import engine
import templates
from config import Config, ConfigError


class StartError(Exception):
    """The model loaded but can't serve (its template fails, its first token fails)."""


@dataclass
class Served:
    config: Config
    model: engine.Model
    engine: engine.Engine
    render: templates.Render
    stops: list[str]  # end-of-turn texts that are not single special tokens
    created: int
    load_seconds: float  # model load and warm-up

    @property
    def template_takes_tools(self) -> bool:
        return "tools" in self.model.metadata.get("tokenizer.chat_template", "") and self.config.chat_format in ("auto", "jinja")


def chat_renderer(config: Config, model: engine.Model) -> tuple[templates.Render, tuple[str, ...]]:
    """The model's prompt format and end-of-turn texts: its own template unless a family is forced."""
    family = templates.family_of(model.metadata, config.model_path.name)
    template = model.metadata.get("tokenizer.chat_template")
    fmt = config.chat_format
    if fmt == "jinja" and not template:
        raise ConfigError(f"{config.model_path}: CHAT_FORMAT=jinja but the model carries no chat template")
    if fmt == "jinja" or (fmt == "auto" and template):
        try:
            render = templates.jinja_template(template, model.token_text(model.bos), model.token_text(model.eos))
            templates.probe(render)
        except templates.TemplateError as e:
            raise ConfigError(
                f"{config.model_path}: its chat template can't be used ({e}); "
                f"set CHAT_FORMAT to a family ({', '.join(templates.FAMILIES)}) to use a hand-written one"
            ) from None
        return render, templates.FAMILIES[family].stops
    chosen = templates.FAMILIES[family if fmt == "auto" else fmt]
    return chosen.render, chosen.stops


async def load(config: Config, on_failure: Callable[[str], None]) -> Served:
    """The model loaded (off the event loop), its decode thread running, one token generated.
    `on_failure` is called on the event loop if the decode thread dies."""
    t0 = time.perf_counter()
    model = await asyncio.to_thread(engine.Model, config.model_path, config.n_ctx, config.n_threads, config.parallel,
                                    flash_attn=config.flash_attn)
    render, stops = await asyncio.to_thread(chat_renderer, config, model)
    stop_tokens = {model.special[s] for s in stops if s in model.special}
    decoder = engine.Engine(model, config.parallel, asyncio.get_running_loop(), stop_tokens, on_failure)
    text_stops = [s for s in stops if s not in model.special]
    served = Served(config, model, decoder, render, text_stops, int(time.time()), 0.0)
    await warm_up(served)
    served.load_seconds = time.perf_counter() - t0
    return served


async def warm_up(served: Served) -> None:
    """One token through the whole path: pages the weights in and proves the engine works."""
    done = asyncio.get_running_loop().create_future()

    def emit(event: engine.Event) -> None:
        if event.finish_reason and not done.done():
            done.set_result(event)

    served.engine.submit(engine.Generation(served.model.tokenize_prompt("Hello"), 1, engine.Sampling(temperature=0), emit))
    event = await done
    if event.finish_reason == "error":
        raise StartError(f"{served.config.model_path}: the warm-up token failed ({event.text})")
