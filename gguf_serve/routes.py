"""A route of the server, and what is derived from the route table (service.ROUTES): the route a
path reaches (its metric label, the API whose shape its errors take) and the OpenAPI document.

A route names its API flavour (`api`): OpenAI's, or Anthropic's for the Messages API. Every
error a request can get (the gate's 401 and draining 503, a handler's 4xx, a mid-stream error
event) and `/openapi.json` read it from the route, not from a path prefix.
"""

from __future__ import annotations

import re
from typing import Callable, Literal, NamedTuple, get_type_hints

import msgspec
from litestar.utils import normalize_path

from . import anthropic_protocol, errors
from .errors import APIError

API = Literal["openai", "anthropic"]
# Each API's error body and its schema (/openapi.json).
ERROR_BODIES: dict[str, tuple[Callable[[APIError], msgspec.Struct], type[msgspec.Struct]]] = {
    "openai": (errors.error_body, errors.ErrorResponse),
    "anthropic": (anthropic_protocol.error_body, anthropic_protocol.ErrorResponse),
}


class Route(NamedTuple):
    """One route of the server. service.ROUTES lists them all, once: Litestar routes them, the
    access gate keys them and names them in metrics, and `openapi` describes them. A route with
    a JSON body names its type once, as its handler's `body` parameter."""

    method: str
    path: str  # Litestar's template: `{name:type}` for a path parameter
    handler: Callable
    public: bool = False  # a probe: answered without the API key, and while draining
    api: API = "openai"  # whose shape its errors take

    @property
    def body(self) -> type[msgspec.Struct] | None:
        """The JSON body it decodes: its handler's `body` parameter's type."""
        return get_type_hints(self.handler).get("body")

    @property
    def template(self) -> str:
        """The path as OpenAPI writes it (`{name}`): also its metric label."""
        return re.sub(r"\{(\w+):\w+\}", r"{\1}", self.path)


def error_body(api: API, exc: APIError) -> msgspec.Struct:
    """An error in the shape of `api`."""
    return ERROR_BODIES[api][0](exc)


def path_pattern(path: str) -> re.Pattern:
    """A route's path as Litestar matches it: a `{name:path}` parameter takes the rest, any other one segment."""
    pieces = re.split(r"(\{\w+:\w+\})", path)
    return re.compile("".join(".+" if piece.endswith(":path}") else "[^/]+" if piece.startswith("{") else re.escape(piece)
                              for piece in pieces))


def route_finder(routes: tuple[Route, ...]) -> Callable[[str], Route | None]:
    """The route a path names exactly (a route's path, or its template's with ids in it), or None."""
    exact = {route.path: route for route in routes if "{" not in route.path}
    templated = [(path_pattern(route.path), route) for route in routes if "{" in route.path]

    def route_of(path: str) -> Route | None:
        if path in exact:
            return exact[path]
        return next((route for pattern, route in templated if pattern.fullmatch(path)), None)

    return route_of


def endpoint_namer(routes: tuple[Route, ...]) -> Callable[[str], str]:
    """The metric label and log name of a path: its route's template (ids in it as `{name}`),
    or "other", so that the labels are as few as the routes."""
    route_of = route_finder(routes)
    return lambda path: route.template if (route := route_of(path)) else "other"


def api_finder(routes: tuple[Route, ...]) -> Callable[[str], API]:
    """The API whose shape a path's errors take: its route's, the path spelled as Litestar routes
    it (`//v1/messages` reaches /v1/messages, so its errors are Anthropic's too); OpenAI's for a
    path no route has."""
    route_of = route_finder(routes)
    return lambda path: route.api if (route := route_of(normalize_path(path))) else "openai"


def openapi(routes: tuple[Route, ...], model_ids: list[str]) -> dict:
    """The OpenAPI 3.1 document of `routes`, their request bodies generated from the wire structs
    (so it can't drift from what is decoded), each route's errors in its API's shape, `model` and
    `model_id` listing the ids served."""
    ref = "#/components/schemas/{name}"
    with_body = [route for route in routes if route.body]
    apis = list(ERROR_BODIES)
    schemas, components = msgspec.json.schema_components(
        [*(r.body for r in with_body), *(ERROR_BODIES[api][1] for api in apis)], ref_template=ref)
    body_of = dict(zip(with_body, schemas))
    errors = {api: {"4XX": {"description": f"an {'OpenAI' if api == 'openai' else 'Anthropic'}-shaped error",
                            "content": {"application/json": {"schema": schema}}}}
              for api, schema in zip(apis, schemas[len(with_body):])}
    for schema in components.values():
        if "model" in schema.get("properties", {}) and "model" in schema.get("required", ()):
            schema["properties"]["model"] = {"type": "string", "enum": model_ids}
    paths: dict[str, dict] = {}
    for route in routes:
        operation: dict = {"parameters": [
            {"name": name, "in": "path", "required": True,
             "schema": {"type": "string", "enum": model_ids} if name == "model_id" else {"type": "string"}}
            for name in re.findall(r"\{(\w+)\}", route.template)]}
        if route.body:
            operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": body_of[route]}}}
            operation["responses"] = {"200": {"description": "the answer, or server-sent events with stream"},
                                      **errors[route.api]}
        else:
            operation["responses"] = {"200": {"description": "OK"}, **errors[route.api]}
        paths.setdefault(route.template, {})[route.method.lower()] = operation
    return {"openapi": "3.1.0", "info": {"title": "gguf-serve", "version": "1"}, "paths": paths,
            "components": {"schemas": components}}
