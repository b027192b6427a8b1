"""The coding agents themselves, unchanged, against a real server: Codex CLI (`codex exec`, the
Responses API), Claude Code (`claude -p`, the Messages API) and opencode (`opencode run`, chat
completions), each installed from npm at the versions tests/agent-packages.txt pins (`.ci/run`
installs them in .ci/agents/; without them these tests are skipped).

Each runs once, non-interactively, with its default tools and settings but for the endpoint, the
model's name and the switches that keep it off the network (below, per agent: every switch each
has for telemetry, updates, plugins and marketplaces, feedback and error reports), in a HOME of
its own so that no user's configuration is read. To be sure nothing calls out anyway, every agent
runs with HTTP_PROXY/HTTPS_PROXY/ALL_PROXY naming a closed loopback port (NO_PROXY=127.0.0.1,
localhost): a request for any other host fails there instead of leaving the machine. What is
asserted, from the server's own log lines (one JSON line a request): no request was refused with a
4xx (a client's own disconnect, 499, aside), at least one answer streamed (a 200 on the agent's
streaming endpoint) and the agent exited 0 having printed the model's answer, or else that every
answer the model wrote ran to the server's cap (a small model past its training length may)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import MODEL, ROOT, Server, free_port


# Marked so that `-m 'not agents'` can leave the coding agents' tests out (they take minutes).
pytestmark = pytest.mark.agents

BIN = ROOT / ".ci" / "agents" / "node_modules" / ".bin"
PROMPT = "Say hello in one short sentence."
# Claude Code's system prompt and tools are about 20k tokens before the conversation: more than
# SmolLM2's 8192-token training length, which llama.cpp lets a context exceed (the answer is
# poorer past it, but this is a test of the protocol, not of the model): an N_CTX set is taken as set.
N_CTX = "32768"
# A guard against a hang, not a time limit: computing Claude Code's 20k-token prompt is most of its
# run, 30-200 prompt tokens/s on 2 cores as the context grows and the host is loaded (bench multiturn's
# long prompt), so several minutes. Claude Code drops a stream that sent no event but pings for 300 s
# and asks again; the retry finds what was computed in the KV cache (docs/agents.md).
RUN_TIMEOUT_S = 2400
# The server's bound on every answer (see agent_server)
MAX_TOKENS = 256


@dataclass
class Agent:
    name: str
    endpoint: str  # the route it streams its answers from, as the log line names it
    argv: list[str]
    env: dict[str, str]


def offline_env(home: Path) -> dict[str, str]:
    """A HOME of the test's own, and every proxy variable naming a closed loopback port."""
    closed = f"http://127.0.0.1:{free_port()}"
    keep = {k: os.environ[k] for k in ("PATH", "LANG", "TERM") if k in os.environ}
    return {**keep, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
            "XDG_DATA_HOME": str(home / ".local/share"),
            "XDG_CACHE_HOME": str(home / ".cache"), "XDG_STATE_HOME": str(home / ".local/state"),
            "HTTP_PROXY": closed, "HTTPS_PROXY": closed, "ALL_PROXY": closed, "http_proxy": closed,
            "https_proxy": closed, "all_proxy": closed, "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost"}


def codex(url: str, home: Path, prompt: str = PROMPT) -> Agent:
    """Codex CLI: a model provider on the Responses API (`wire_api = "responses"`, the only one
    Codex speaks), no key needed. Off: the update check (`check_for_update_on_startup`),
    analytics (`[analytics] enabled`), feedback uploads (`[feedback] enabled`), and OpenTelemetry
    logs, traces and metrics (`[otel]` exporters `none`, their default)."""
    codex_home = home / ".codex"
    codex_home.mkdir(parents=True)
    (codex_home / "config.toml").write_text(f"""\
model = "{MODEL}"
model_provider = "gguf-serve"
check_for_update_on_startup = false

[model_providers.gguf-serve]
name = "gguf-serve"
base_url = "{url}/v1"
wire_api = "responses"

[analytics]
enabled = false

[feedback]
enabled = false

[otel]
exporter = "none"
trace_exporter = "none"
metrics_exporter = "none"
""")
    return Agent("codex", "/v1/responses", [str(BIN / "codex"), "exec", "--skip-git-repo-check", prompt],
                 {"CODEX_HOME": str(codex_home)})


def claude(url: str, home: Path, prompt: str = PROMPT) -> Agent:
    """Claude Code: ANTHROPIC_BASE_URL, a key, and the served model for every model role it has
    (its background calls use the "haiku" one), so that none is asked for a model this server
    lacks. Off: CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC (all of its non-essential traffic), and
    each switch that one covers named too: DISABLE_TELEMETRY, DISABLE_ERROR_REPORTING,
    DISABLE_AUTOUPDATER and DISABLE_UPDATES, DISABLE_BUG_COMMAND and DISABLE_FEEDBACK_COMMAND,
    CLAUDE_CODE_DISABLE_FEEDBACK_SURVEY, DISABLE_GROWTHBOOK (its feature flags),
    CLAUDE_CODE_DISABLE_OFFICIAL_MARKETPLACE_AUTOINSTALL (the plugin marketplace) and
    DISABLE_INSTALLATION_CHECKS; OpenTelemetry stays off (CLAUDE_CODE_ENABLE_TELEMETRY unset)."""
    models = {f"ANTHROPIC_DEFAULT_{role}_MODEL": MODEL for role in ("OPUS", "SONNET", "HAIKU")}
    switches = ("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "DISABLE_TELEMETRY", "DISABLE_ERROR_REPORTING",
                "DISABLE_AUTOUPDATER", "DISABLE_UPDATES", "DISABLE_BUG_COMMAND", "DISABLE_FEEDBACK_COMMAND",
                "CLAUDE_CODE_DISABLE_FEEDBACK_SURVEY", "DISABLE_GROWTHBOOK",
                "CLAUDE_CODE_DISABLE_OFFICIAL_MARKETPLACE_AUTOINSTALL", "DISABLE_INSTALLATION_CHECKS")
    return Agent("claude", "/v1/messages", [str(BIN / "claude"), "-p", prompt, "--model", MODEL],
                 {"ANTHROPIC_BASE_URL": url, "ANTHROPIC_API_KEY": "unused", "CLAUDE_CODE_SUBAGENT_MODEL": MODEL,
                  **models, **dict.fromkeys(switches, "1")})


def opencode(url: str, home: Path, prompt: str = PROMPT) -> Agent:
    """opencode: a provider on `@ai-sdk/openai-compatible` (chat completions) with the server's
    context and output limits. Off: `autoupdate` and OPENCODE_DISABLE_AUTOUPDATE, sharing
    (`share: "disabled"`, OPENCODE_DISABLE_SHARE), the models.dev catalogue fetch
    (OPENCODE_DISABLE_MODELS_FETCH), its default plugins (OPENCODE_DISABLE_DEFAULT_PLUGINS) and
    language servers' downloads (OPENCODE_DISABLE_LSP_DOWNLOAD)."""
    config = {
        "$schema": "https://opencode.ai/config.json", "autoupdate": False, "share": "disabled",
        "model": f"gguf-serve/{MODEL}", "small_model": f"gguf-serve/{MODEL}",
        "provider": {"gguf-serve": {"npm": "@ai-sdk/openai-compatible", "name": "gguf-serve",
                                    "options": {"baseURL": f"{url}/v1", "apiKey": "unused"},
                                    "models": {MODEL: {"name": "SmolLM2 135M",
                                                       "limit": {"context": 32768, "output": 1024}}}}},
    }
    path = home / ".config" / "opencode" / "opencode.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(config, indent=2))
    switches = ("OPENCODE_DISABLE_AUTOUPDATE", "OPENCODE_DISABLE_SHARE", "OPENCODE_DISABLE_MODELS_FETCH",
                "OPENCODE_DISABLE_DEFAULT_PLUGINS", "OPENCODE_DISABLE_LSP_DOWNLOAD")
    return Agent("opencode", "/v1/chat/completions", [str(BIN / "opencode"), "run", prompt],
                 {"OPENCODE_CONFIG": str(path), **dict.fromkeys(switches, "1")})


AGENTS = {"codex": codex, "claude": claude, "opencode": opencode}


def run_agent(agent: Agent, home: Path, cwd: Path, timeout: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run(agent.argv, cwd=cwd, env={**offline_env(home), **agent.env}, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def log_lines(server: Server) -> list[dict]:
    return [json.loads(line) for line in server.output().splitlines() if line.startswith('{"request_id"')]


def settled_lines(server: Server) -> list[dict]:
    """Every request's log line, the last answered one's too: a line is printed just after its
    request is counted in gguf_requests_total, so wait for as many lines as that counts."""
    total, deadline = server.metric("gguf_requests_total"), time.monotonic() + 30
    while len(lines := log_lines(server)) < total:
        assert time.monotonic() < deadline, f"{len(lines)} log lines for {total} requests"
        time.sleep(0.05)
    return lines


@pytest.fixture(scope="module")
def agent_server():
    """One request at a time (PARALLEL=1) with a context that holds Claude Code's prompt, and each
    answer bounded by the server (MAX_TOKENS, as docs/agents.md advises for a small model): Claude
    Code asks 32000 tokens, which SmolLM2 past its training length filled with repetition until
    the context's end, 12k tokens, over ten minutes here."""
    s = Server({"N_THREADS": "2", "N_CTX": N_CTX, "PARALLEL": "1", "MAX_TOKENS": str(MAX_TOKENS)}).wait_ready()
    yield s
    s.stop()


@pytest.mark.parametrize("name", AGENTS)
def test_agent_answers_with_its_defaults(agent_server, tmp_path, name):
    if not (BIN / name).exists():
        pytest.skip(f"{name} is not installed: .ci/run installs tests/agent-packages.txt into .ci/agents")
    before = len(log_lines(agent_server))
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    agent = AGENTS[name](agent_server.url, home)
    try:
        done = run_agent(agent, home, work)
    except subprocess.TimeoutExpired as e:
        lines = settled_lines(agent_server)[before:]
        pytest.fail(f"{name} still running after {e.timeout} s; its requests: " +
                    ", ".join(f"{line['endpoint']} {line['status']}" for line in lines))
    lines = settled_lines(agent_server)[before:]
    report = f"exit {done.returncode}\nstdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}\nrequests:\n" + \
        "\n".join(f"{line['method']} {line['endpoint']} {line['status']}" for line in lines)
    refused = [line for line in lines if 400 <= line["status"] < 500 and line["status"] != 499]
    assert not refused, report
    answered = [line for line in lines if line["endpoint"] == agent.endpoint and line["status"] == 200]
    assert answered, report
    if done.returncode == 0:
        assert done.stdout.strip(), report
    else:
        # The one failure that is the model's, not the protocol's: SmolLM2 may write to the cap in
        # every answer (Claude Code's prompt is 20k tokens, 2.5x its training length), and an
        # agent may report that as its own error: Claude Code asks 3 times for the rest, then
        # exits 1 ("Claude's response exceeded the 32000 output token maximum", docs/agents.md).
        # An attempt the agent itself cut while its prompt was computed wrote nothing.
        written = [line["completion_tokens"] for line in answered if line.get("completion_tokens")]
        assert written and set(written) == {MAX_TOKENS}, report
    shutil.rmtree(home, ignore_errors=True)
