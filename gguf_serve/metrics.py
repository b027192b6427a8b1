"""Prometheus metrics, in a registry of the app's own."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import prometheus_client
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

if TYPE_CHECKING:
    from . import engine


class Metrics:
    """Prometheus metrics, in a registry of the app's own."""

    def __init__(self, engine_of: Callable[[], engine.Engine | None]):
        self.registry = r = prometheus_client.CollectorRegistry()
        self.requests = prometheus_client.Counter("gguf_requests", "HTTP requests", ["endpoint", "status"], registry=r)
        self.prompt_tokens = prometheus_client.Counter("gguf_prompt_tokens", "Prompt tokens processed", registry=r)
        self.completion_tokens = prometheus_client.Counter("gguf_completion_tokens", "Tokens generated", registry=r)
        self.reused_tokens = prometheus_client.Counter(
            "gguf_prompt_tokens_reused", "Prompt tokens taken from the KV cache, not computed (each of n choices counts)", registry=r)
        self.ttft = prometheus_client.Histogram("gguf_time_to_first_token_seconds", "Request start to first token", registry=r,
                                                buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.inter_token = prometheus_client.Histogram("gguf_inter_token_seconds", "Time between tokens of a stream", registry=r,
                                                       buckets=(0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28))
        self.spans_searched = prometheus_client.Counter(
            "gguf_content_spans_searched", "Chat prompts whose template changed the content markers, so that what users "
            "typed was located by searching the prompt (text the template rewrote is then read for special tokens)", registry=r)
        self.model_load = prometheus_client.Gauge("gguf_model_load_seconds", "Model load and warm-up time", registry=r)
        prometheus_client.Gauge("gguf_queue_depth", "Generations waiting for a sequence", registry=r).set_function(
            lambda: engine_of().queued if engine_of() else 0)
        prometheus_client.Gauge("gguf_running", "Generations decoding", registry=r).set_function(
            lambda: engine_of().running if engine_of() else 0)
        r.register(PromptCacheCollector(engine_of))


class PromptCacheCollector:
    """The KV cache's host-memory tier (prompt_cache.py), read at each scrape."""

    COUNTERS = {"hits": "Prompts whose prefix was restored from the prompt cache",
                "restored_tokens": "Prompt tokens restored from the prompt cache, not computed",
                "saves": "Sequences' states saved to the prompt cache",
                "evictions": "Prompt cache entries evicted or cut (their last block) for room",
                "loaded": "Prompt cache entries read from PROMPT_CACHE_DIR at start"}

    def __init__(self, engine_of: Callable[[], engine.Engine | None]):
        self.engine_of = engine_of

    def collect(self):
        cache = self.engine_of().cache if self.engine_of() else None
        yield GaugeMetricFamily("gguf_prompt_cache_bytes", "Bytes the prompt cache holds", value=cache.bytes if cache else 0)
        yield GaugeMetricFamily("gguf_prompt_cache_max_bytes", "The prompt cache's bound (PROMPT_CACHE_MIB)",
                                value=(cache.max_bytes or 0) if cache else 0)
        yield GaugeMetricFamily("gguf_prompt_cache_entries", "Sequences' states the prompt cache holds",
                                value=len(cache.entries) if cache else 0)
        for name, documentation in self.COUNTERS.items():
            yield CounterMetricFamily(f"gguf_prompt_cache_{name}", documentation, value=getattr(cache, name) if cache else 0)
