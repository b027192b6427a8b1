"""Statistics of the measurements: summaries, the medians of quiet runs, the paired mode's summary."""

from __future__ import annotations

import statistics

PAIRED = ("gguf-serve", "llama-server-np4")  # the servers `python -m bench paired` compares
TARGET = 0.95  # the continuous-batching goal: gguf-serve's 4-client aggregate >= 0.95x llama-server -np 4's
SCALING_TARGET = 1.5  # and >= 1.5x gguf-serve's own single-client aggregate


# `paired`'s headline figures (higher is better for tok/s, lower for the rest), in the report's order
FIGURES = {"nonstream_tps": "tok/s, one request", "stream_tps": "tok/s streamed, one client", "ttft_ms": "time to first token, ms",
           "first_answer_s": "start → first answer, s", "peak_rss_mb": "peak RSS, MiB (process tree)",
           "agg_tps": "tok/s, 4 clients"}


def summary(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"median": None}
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "mean": statistics.mean(values), "n": len(values)}


def run_summary(runs: list[dict], key: str, scale: float = 1.0) -> dict:
    """Statistics of the quiet runs (of all runs, flagged, if none was quiet)."""
    quiet = [r for r in runs if r.get("quiet", True)]
    out = summary([r[key] * scale if r.get(key) is not None else None for r in (quiet or runs)])
    out["disturbed_runs"] = len(runs) - len(quiet)
    if not quiet:
        out["all_disturbed"] = True
    return out


def full_run(x: dict, max_tokens: int) -> bool:
    """Did a request make exactly max_tokens tokens, ended by the limit."""
    return x["tokens"] == max_tokens and x.get("finish_reason") == "length"


def med(r: dict | None, *path):
    for p in path:
        if not isinstance(r, dict) or p not in r:
            return None
        r = r[p]
    return r


def paired_summary(pairs: list[dict]) -> dict:
    """Medians over the undisturbed pairs (over all of them, flagged, if none was undisturbed)."""
    used = [p for p in pairs if p["quiet"]] or pairs
    ratios = [p["ratio"] for p in used if p["ratio"] is not None]
    out = {"pairs": len(pairs), "pairs_used": len(used), "all_disturbed": bool(pairs) and not any(p["quiet"] for p in pairs),
           "pairs_redone": sum(p["attempts"] > 1 for p in pairs), "target": TARGET,
           "ratio": summary(ratios), "pairs_at_target": sum(r >= TARGET for r in ratios),
           "bursts_tokens_ok": sum(c["tokens_ok"] for p in pairs for c in [*p["bursts"].values(), *p["single_bursts"].values()]),
           "runs_tokens_ok": sum(c["tokens_ok"] for p in pairs for kind in ("nonstream", "stream") for c in (p.get(kind) or {}).values())}
    # every headline figure of each server, and gguf-serve's over llama-server's pair by pair
    keys = [k for k in FIGURES if any(k in (p.get("figures") or {}) for p in used)]
    out["figures"] = {k: {n: summary([p["figures"][k][n] for p in used if p.get("figures")]) for n in PAIRED} for k in keys}
    out["ratios"] = {k: summary([p["ratios"][k] for p in used if p.get("ratios")]) for k in keys}
    loads = [p["loadavg"] for p in pairs if p.get("loadavg") is not None]
    out["loadavg"] = summary(loads)
    for name in PAIRED:
        scaling = [p["scaling"][name] for p in used if p["scaling"][name] is not None]
        out[name] = {"agg_tps": summary([p["agg_tps"][name] for p in used]),
                     "single_tps": summary([p["single_tps"][name] for p in used]),
                     "scaling": summary(scaling), "pairs_at_scaling_target": sum(x >= SCALING_TARGET for x in scaling),
                     "ttft_mean_ms": summary([p["ttft_mean_ms"][name] for p in used])}
    out["scaling_target"] = SCALING_TARGET
    ceilings = [p["kernel_ceiling"] for p in used if p.get("kernel_ceiling") is not None]
    out["kernel_ceiling"], out["kernel_ceiling_at_target"] = summary(ceilings), sum(c >= SCALING_TARGET for c in ceilings)
    return out

