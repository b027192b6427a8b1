"""The server's state, typed: what the app is made with, and what its lifespan changes (the
model served, draining). Litestar holds it as `app.state.server`."""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import Config
from .loading import Loading, Served
from .metrics import Metrics
from .response_store import ResponseStore
from .runs import Runs


@dataclass
class ServerState:
    """Made with the app (service.create_app); every route reads it (lifecycle.server_state)."""

    config: Config
    loading: Loading  # the model being read (loading.start_loading)
    responses: ResponseStore
    runs: Runs
    metrics: Metrics = field(init=False)
    served: Served | None = None  # set once the model is loaded and warm; None again if the engine dies
    draining: bool = False  # told to stop: new requests get 503
    # then: when its grace ends (time.monotonic()), for requests in flight and the prompt cache's write
    drain_ends: float | None = None
    openapi: dict | None = None  # /openapi.json, made on first ask

    def __post_init__(self):
        self.metrics = Metrics(lambda: self.served and self.served.engine)
