"""The route table (service.ROUTES) and what is derived from it: the access gate's key and
draining rules, the metric labels and the OpenAPI document. The gate is called as granian
calls it, with the path as the client spelled it (granian decodes %2F before this)."""

import asyncio
import json

import pytest
from litestar import Litestar
from litestar.datastructures import State

from gguf_serve.access import gate
from gguf_serve.config import ConfigError, load_config
from conftest import smollm2_path
from gguf_serve.routes import api_finder, endpoint_namer, openapi
from gguf_serve.response_store import MemoryStore
from gguf_serve.runs import Runs
from gguf_serve.state import ServerState
from gguf_serve.service import ROUTES, error_response, route_handler

KEY = "sk-unit"
SPELLINGS = ["/v1/chat/completions", "//v1/chat/completions", "/v1//chat/completions", "//v1/responses/resp_1",
             "//apply-template", "///v1/models/", "/health/", "//health", "/nope", "/v1/models/x"]


def gated(env: dict[str, str], draining: bool = False):
    """The gate around Litestar's app for ROUTES, the model not loaded (a request the gate lets
    through to a model's route gets 503 model_loading)."""
    state = ServerState(load_config({"MODEL": str(smollm2_path()), **env}), None, MemoryStore(1, 1), Runs(1))
    state.draining = draining
    app = Litestar([route_handler(route) for route in ROUTES], exception_handlers={Exception: error_response},
                   openapi_config=None, state=State({"server": state}))
    return gate(app, state, ROUTES)


def call(app, method: str, path: str, headers: dict[str, str] = {}, body: bytes = b"{}") -> tuple[int, dict]:
    sent = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "http_version": "1.1", "method": method, "path": path, "raw_path": path.encode(),
             "root_path": "", "query_string": b"", "scheme": "http", "server": ("127.0.0.1", 8000),
             "client": ("127.0.0.1", 1), "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
    asyncio.run(app(scope, receive, send))
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], json.loads(body) if body else {}


@pytest.mark.parametrize("path", SPELLINGS)
def test_with_a_key_set_only_the_exact_probe_paths_answer_without_it(path):
    status, body = call(gated({"API_KEY": KEY}), "GET", path)
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    assert call(gated({"API_KEY": KEY}), "GET", path, {"Authorization": f"Bearer {KEY}"})[0] != 401


@pytest.mark.parametrize("path,status,answer", [("/health", 200, {"status": "ok"}),
                                                ("/ready", 503, "model_loading")])  # the model isn't loaded here
def test_the_probes_need_no_key(path, status, answer):
    got, body = call(gated({"API_KEY": KEY}), "GET", path)
    assert got == status and (body == answer if status == 200 else body["error"]["code"] == answer)


@pytest.mark.parametrize("path", SPELLINGS)
def test_while_draining_every_path_but_the_probes_is_refused(path):
    status, body = call(gated({}, draining=True), "POST" if "chat" in path else "GET", path)
    assert status == 503 and body["error"]["code"] == "server_shutting_down"
    assert call(gated({}, draining=True), "GET", "/health") == (200, {"status": "ok"})


def test_a_cors_preflight_needs_no_key():
    app = gated({"API_KEY": KEY, "CORS_ORIGINS": "https://app.example"})
    status, _ = call(app, "OPTIONS", "/v1/chat/completions", {"Origin": "https://app.example",
                                                                "Access-Control-Request-Method": "POST"})
    assert status in (200, 204)


def test_metric_labels_are_the_route_templates_or_other():
    endpoint_of = endpoint_namer(ROUTES)
    assert endpoint_of("/v1/chat/completions") == "/v1/chat/completions"
    assert endpoint_of("/v1/models/org/model.gguf") == "/v1/models/{model_id}"
    assert endpoint_of("/v1/responses/resp_1") == "/v1/responses/{response_id}"
    assert endpoint_of("/v1/responses/input_tokens") == "/v1/responses/input_tokens"
    for unrouted in ("//v1/chat/completions", "/v1/responses/a/b", "/v1/models/", "/nope", "/health/"):
        assert endpoint_of(unrouted) == "other"


def test_the_openapi_document_describes_every_route():
    document = openapi(ROUTES, ["m"])
    described = {(method.upper(), path) for path, operations in document["paths"].items() for method in operations}
    assert described == {(route.method, route.template) for route in ROUTES}
    assert ("GET", "/v1/responses/{response_id}") in described and ("DELETE", "/v1/responses/{response_id}") in described
    [parameter] = document["paths"]["/v1/models/{model_id}"]["get"]["parameters"]
    assert parameter["schema"]["enum"] == ["m"]


def test_public_paths_opens_only_metrics_and_openapi():
    assert load_config({"MODEL": str(smollm2_path()), "PUBLIC_PATHS": " /metrics, /openapi.json"}).public_paths == (
        "/metrics", "/openapi.json")
    with pytest.raises(ConfigError, match="PUBLIC_PATHS: '/v1/models' is not one of: /metrics, /openapi.json"):
        load_config({"MODEL": str(smollm2_path()), "PUBLIC_PATHS": "/metrics,/v1/models"})


# --- the API flavour on the route: Anthropic's shape on every error of a Messages route ---

MESSAGE = json.dumps({"model": "smollm2-135m-instruct", "max_tokens": 4,
                      "messages": [{"role": "user", "content": "Hi"}]}).encode()


def anthropic_error(body: dict, kind: str) -> None:
    assert body["type"] == "error" and body["error"]["type"] == kind and set(body["error"]) == {"type", "message"}


@pytest.mark.parametrize("path", ["/v1/messages", "//v1/messages", "/v1/messages/", "/v1//messages/count_tokens"])
def test_a_messages_route_answers_anthropics_shape_however_its_path_is_spelled(path):
    status, body = call(gated({"API_KEY": KEY}), "POST", path)
    assert status == 401
    anthropic_error(body, "authentication_error")
    status, body = call(gated({}, draining=True), "POST", path)
    assert status == 503
    anthropic_error(body, "overloaded_error")
    status, body = call(gated({}), "POST", path, body=MESSAGE)  # routed: the model still loading
    assert status == 503
    anthropic_error(body, "overloaded_error")
    assert "loading" in body["error"]["message"]


@pytest.mark.parametrize("path", ["/v1/messagesx", "/v1/chat/completions", "//v1/responses", "/nope"])
def test_other_paths_answer_openais_shape(path):
    status, body = call(gated({}, draining=True), "POST", path)
    assert status == 503 and body["error"]["code"] == "server_shutting_down"
    assert api_finder(ROUTES)(path) == "openai"


def test_a_route_names_its_body_type_once_as_its_handlers_parameter():
    bodies = {route.path: route.body.__name__ for route in ROUTES if route.body}
    assert bodies == {"/v1/chat/completions": "ChatRequest", "/v1/completions": "CompletionRequest",
                      "/apply-template": "TemplateRequest", "/v1/responses": "ResponsesRequest",
                      "/v1/responses/input_tokens": "ResponsesInput", "/v1/embeddings": "EmbeddingRequest",
                      "/v1/messages": "MessagesRequest", "/v1/messages/count_tokens": "CountTokensRequest"}


def test_the_openapi_document_gives_each_route_its_apis_error_shape():
    document = openapi(ROUTES, ["m"])
    schemas = document["components"]["schemas"]

    def error_of(path: str, method: str = "post") -> dict:
        ref = document["paths"][path][method]["responses"]["4XX"]["content"]["application/json"]["schema"]["$ref"]
        return schemas[ref.rsplit("/", 1)[1]]

    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        assert set(error_of(path)["properties"]) == {"type", "error"}  # Anthropic's
    for path, method in (("/v1/chat/completions", "post"), ("/v1/responses", "post"), ("/v1/models", "get")):
        assert set(error_of(path, method)["properties"]) == {"error"}  # OpenAI's
