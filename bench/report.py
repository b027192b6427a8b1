"""The text report (tables of medians and ratios, concurrent clients, token check), the paired report, the plot."""

from __future__ import annotations

from pathlib import Path

from bench.procs import QUIET
from bench.stats import FIGURES, PAIRED, SCALING_TARGET, TARGET, full_run, med, paired_summary


def metrics(r: dict | None) -> dict:
    """The figures of the main table, of one server's results."""
    if not r or "error" in r and "nonstream" not in r:
        return {}
    return {
        "startup_s": med(r, "startup_s"),
        "first_answer_s": med(r, "first_answer_s"),
        "ttft_ms": med(r, "stream", "ttft_ms", "median"),
        "tps": med(r, "nonstream", "tps", "median"),
        "stream_tps": med(r, "stream", "tps", "median"),
        "agg4_tps": med(r, "concurrency", "4", "agg_tps"),
        "agg4_ttft_ms": (lambda v: v * 1000 if v is not None else None)(med(r, "concurrency", "4", "ttft_mean_s")),
        "models_rps": med(r, "models", "rps"),
        "rss_mb": med(r, "peak_rss", "total_mb"),
    }


COLUMNS = [("startup_s", "start s", "{:.2f}"), ("first_answer_s", "start → answer s", "{:.2f}"),
           ("ttft_ms", "TTFT ms", "{:.1f}"), ("tps", "tok/s", "{:.1f}"), ("stream_tps", "stream tok/s", "{:.1f}"),
           ("agg4_tps", "4-client tok/s", "{:.1f}"), ("agg4_ttft_ms", "4-cl TTFT ms", "{:.0f}"),
           ("models_rps", "models req/s", "{:.0f}"), ("rss_mb", "peak RSS MiB", "{:.0f}")]


def spread(r: dict, key: str) -> str:
    path = {"first_answer_s": ("first_answer",), "ttft_ms": ("stream", "ttft_ms"), "tps": ("nonstream", "tps"),
            "stream_tps": ("stream", "tps")}.get(key)
    s = med(r, *path) if path else None
    if not s or s.get("median") in (None, 0):
        return ""
    mark = " (disturbed!)" if s.get("all_disturbed") else ""
    if s.get("n", 0) < 2:
        return mark
    return f" ±{(s['max'] - s['min']) / 2 / s['median'] * 100:.0f}%{mark}"


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def fmt(v, f):
    return "-" if v is None else f.format(v)


def report(results: dict[str, dict], args) -> str:
    out = []
    rows = []
    for name, r in results.items():
        m = metrics(r)
        if not m:
            rows.append([name] + ["FAILED" if r.get("error") else "-"] + [""] * (len(COLUMNS) - 1))
            continue
        rows.append([name] + [fmt(m[k], f) + spread(r, k) for k, _, f in COLUMNS])
    redone, noisy = [], []
    for n, r in results.items():
        k = sum(med(r, part, "tps", "disturbed_runs") or 0 for part in ("nonstream", "stream"))
        k += sum(c.get("attempts", 1) - 1 for c in (r.get("concurrency") or {}).values())
        if k:
            redone.append(f"{n} {k}")
        if any(med(r, part, "tps", "all_disturbed") for part in ("nonstream", "stream")) or any(
                c.get("other_cpu_pct", 0) >= QUIET for c in (r.get("concurrency") or {}).values()):
            noisy.append(n)
    if redone:
        out.append(f"Runs done again because other processes used >= {QUIET:.0f}% of the CPU meanwhile: "
                   + ", ".join(redone) + " (figures below use the undisturbed runs)")
    if noisy:
        out.append("WARNING: no undisturbed measurement could be made for some figures of: " + ", ".join(noisy))
    out.append(f"Medians of {args.reps} runs (± half the min-max range), max_tokens={args.max_tokens}, "
               f"{args.threads} threads, n_ctx {args.ctx} per sequence; start → answer: process spawn to the "
               f"first answer to a one-token chat request (raw: completion), median of {args.starts} start(s):")
    out.append(table(rows, ["server"] + [h for _, h, _ in COLUMNS]))

    # Ratios
    ls_single = results.get("llama-server-np1") or results.get("llama-server-np4")
    ls_multi = results.get("llama-server-np4")
    refs = [("llama-cpp-server-fair", metrics(results.get("llama-cpp-server-fair")), metrics(results.get("llama-cpp-server-fair"))),
            ("raw", metrics(results.get("raw")), {}),
            ("llama-server (" + ("np1; np4 for 4-client)" if results.get("llama-server-np1") else "np4)"),
             metrics(ls_single), metrics(ls_multi))]
    for ref_name, single, multi in refs:
        if not single and not multi:
            continue
        rrows = []
        for name, r in results.items():
            m = metrics(r)
            if not m:
                continue
            row = [name]
            for k, _, _ in COLUMNS:
                ref = (multi if k.startswith("agg4") else single).get(k)
                row.append(f"{m[k] / ref:.2f}x" if m.get(k) is not None and ref else "-")
            rrows.append(row)
        out.append(f"\nRatio to {ref_name} (tok/s, req/s: >1 is better; start, TTFT, RSS: <1 is better):")
        out.append(table(rrows, ["server"] + [h for _, h, _ in COLUMNS]))

    # Continuous batching
    crow = []
    for name, r in results.items():
        for n, c in (r.get("concurrency") or {}).items():
            ok = sum(full_run(x, args.max_tokens) for x in c["runs"])
            crow.append([name, n, f"{ok}/{c['requests']}", f"{c['agg_tps']:.1f}", f"{c['per_request_tps_mean']:.1f}",
                         f"{c['ttft_mean_s'] * 1000:.0f}", f"{c['ttft_max_s'] * 1000:.0f}", f"{c['wall_s']:.2f}",
                         f"{c['bench_client_cpu_s']:.2f}"])
    if crow:
        out.append(f"\nConcurrent streaming clients ({args.rounds} request(s) each, back to back):")
        out.append(table(crow, ["server", "clients", f"{args.max_tokens}-tok runs", "agg tok/s", "tok/s per req", "mean TTFT ms",
                                "max TTFT ms", "wall s", "client CPU s"]))

    # Token counts
    out.append(f"\nToken check (every run must produce exactly {args.max_tokens} completion tokens):")
    for name, r in results.items():
        runs = []
        for part in ("nonstream", "stream"):
            runs += [(part, x) for x in med(r, part, "runs") or []]
        for n, c in (r.get("concurrency") or {}).items():
            runs += [(f"{n}-clients", x) for x in c["runs"]]
        if not runs:
            out.append(f"  {name}: no runs" + (f" ({r['error'][:200]})" if r.get("error") else ""))
            continue
        bad = [(p, x) for p, x in runs if not full_run(x, args.max_tokens)]
        sources = sorted({x["tokens_from"] for _, x in runs})
        prompts = sorted({x.get("prompt_tokens") for _, x in runs if x.get("prompt_tokens") is not None})
        chunks = sorted({x["chunks"] for _, x in runs if "chunks" in x})
        line = f"  {name}: {len(runs) - len(bad)}/{len(runs)} runs OK (counted from {', '.join(sources)})"
        if prompts:
            line += f"; prompt tokens {prompts[0]}" + (f"-{prompts[-1]}" if len(prompts) > 1 else "")
        if chunks:
            line += f"; content chunks per stream {chunks[0]}" + (f"-{chunks[-1]}" if len(chunks) > 1 else "")
        out.append(line)
        for p, x in bad[:5]:
            out.append(f"    NOT {args.max_tokens}: {p} run: tokens={x['tokens']} finish_reason={x.get('finish_reason')}")
        if r.get("note_stream_options"):
            out.append(f"    note: {r['note_stream_options']}")
    for name, r in results.items():
        if r.get("error"):
            out.append(f"  {name} error: {r['error'][:500]}")
    return "\n".join(out)


def paired_report(paired: dict, args) -> str:
    s, pairs = paired.get("summary") or paired_summary(paired["pairs"]), paired["pairs"]
    out = []
    if paired.get("error"):
        out.append(f"FAILED: {paired['error'][:500]}")
    first = {n: (paired["servers"].get(n) or {}).get("first_answer_s") for n in PAIRED}
    if any(v is not None for v in first.values()):
        out.append("Start → first answer (process spawn to the first answer to a one-token chat request; each server "
                   "started once): " + ", ".join(f"{n} {fmt(v, '{:.2f}')} s" for n, v in first.items())
                   + f"; {PAIRED[0]} / {PAIRED[1]} {fmt(paired.get('first_answer_ratio'), '{:.2f}')}")
    if not pairs:
        return "\n".join(out + ["no pair measured"])
    if s["pairs_redone"]:
        out.append(f"Pairs done again because other processes used >= {QUIET:.0f}% of the CPU meanwhile: "
                   f"{s['pairs_redone']} (the summary uses the undisturbed pairs: {s['pairs_used']} of {s['pairs']})")
    if s["all_disturbed"]:
        out.append("WARNING: no pair could be measured undisturbed; the summary uses disturbed pairs")
    out.append(f"Pairs (each on one server, then on the other: a fresh start to its first answer, one request, one "
               f"stream read lightly, 1 streaming client, then {paired['clients']} concurrent ones, each x {paired['rounds']} "
               f"request(s) of {args.max_tokens} tokens), both servers loaded throughout, alternating which goes first:")
    out.append(table([[str(p["pair"]), p["order"][0]]
                      + [f"{fmt(p['figures']['nonstream_tps'][n], '{:.1f}')} / {fmt(p['figures']['stream_tps'][n], '{:.1f}')} / "
                         f"{p['agg_tps'][n]:.1f}"
                         for n in PAIRED]
                      + [f"{fmt(p['figures']['ttft_ms'][n], '{:.0f}')} / {fmt(p['ttft_mean_ms'][n], '{:.0f}')}" for n in PAIRED]
                      + [f"{fmt(p['figures']['first_answer_s'][n], '{:.2f}')}" for n in PAIRED]
                      + [f"{p['figures']['peak_rss_mb'][n]:.0f}" for n in PAIRED]
                      + [fmt(p.get("kernel_ceiling"), "{:.2f}"), f"{p['loadavg']:.2f}",
                         f"{p['other_cpu_pct']:.0f}" + ("" if p["quiet"] else " (disturbed)")]
                      for p in pairs if p.get("figures")],
                     ["pair", "first"] + [f"{n} tok/s: 1 req / 1 stream / {paired['clients']} cl" for n in PAIRED]
                     + [f"{n} TTFT ms: 1 / {paired['clients']} cl" for n in PAIRED]
                     + [f"{n} start s" for n in PAIRED] + [f"{n} RSS MiB" for n in PAIRED]
                     + ["llama.cpp alone", "load", "others' CPU %"]))
    if s.get("ratios"):
        out.append(f"\nHeadline figures, {PAIRED[0]} / {PAIRED[1]} pair by pair ({s['pairs_used']} pairs; tok/s: >1 is "
                   f"better, the rest: <1 is better; load average during the pairs {fmt(s['loadavg'].get('median'), '{:.2f}')}, "
                   f"{fmt(s['loadavg'].get('min'), '{:.2f}')}-{fmt(s['loadavg'].get('max'), '{:.2f}')}):")
        out.append(table([[FIGURES[k]] + [fmt(s["figures"][k][n].get("median"), "{:.4g}") for n in PAIRED]
                          + [fmt(r.get(x), "{:.3f}") for x in ("median", "min", "max", "mean")] + [str(r.get("n", 0))]
                          for k, r in s["ratios"].items()],
                         ["figure"] + [f"{n} median" for n in PAIRED] + ["ratio median", "min", "max", "mean", "pairs"]))
    out.append(f"\nMedians over {s['pairs_used']} pairs (aggregate tok/s of the burst; mean TTFT within the concurrent one):")
    ok = {n: sum(p["bursts"][n]["tokens_ok"] + p["single_bursts"][n]["tokens_ok"] for p in pairs) for n in PAIRED}
    out.append(table([[n, fmt(s[n]["single_tps"]["median"], "{:.1f}")]
                      + [fmt(s[n]["agg_tps"].get(k), "{:.1f}") for k in ("median", "min", "max")]
                      + [fmt(s[n]["ttft_mean_ms"]["median"], "{:.0f}"), f"{ok[n]}/{2 * len(pairs)}"] for n in PAIRED],
                     ["server", "1 client tok/s", f"{paired['clients']} clients tok/s", "min", "max", "mean TTFT ms",
                      "bursts with every token"]))
    rows = [[f"{PAIRED[0]} / {PAIRED[1]}, {paired['clients']} clients", s["ratio"], s["pairs_at_target"], TARGET]]
    rows += [[f"{n}: {paired['clients']} clients / 1", s[n]["scaling"], s[n]["pairs_at_scaling_target"], SCALING_TARGET]
             for n in PAIRED]
    rows.append([f"llama.cpp alone (llama-batched-bench): {paired['clients']} sequences / 1", s.get("kernel_ceiling", {}),
                 s.get("kernel_ceiling_at_target", 0), SCALING_TARGET])
    out.append("\nPer-pair ratios of aggregate tok/s:")
    out.append(table([[name] + [fmt(r.get(k), "{:.3f}") for k in ("median", "mean", "min", "max")]
                      + [f"{at}/{r.get('n', 0)} >= {target}"] for name, r, at, target in rows],
                     ["ratio", "median", "mean", "min", "max", "pairs at target"]))
    if s.get("runs_tokens_ok", 4 * len(pairs)) < 4 * len(pairs):
        out.append(f"WARNING: {4 * len(pairs) - s['runs_tokens_ok']} single request(s) (not streamed, streamed) did not make exactly "
                   f"{args.max_tokens} tokens")
    if s["bursts_tokens_ok"] < 4 * len(pairs):
        out.append(f"WARNING: {4 * len(pairs) - s['bursts_tokens_ok']} burst(s) did not make exactly "
                   f"{args.max_tokens} tokens per request (see the lines NOT ... above and the JSON)")
    for n in PAIRED:
        if (paired["servers"].get(n) or {}).get("note_stream_options"):
            out.append(f"note: {n} {paired['servers'][n]['note_stream_options']}")
    return "\n".join(out)


def plot(results: dict[str, dict], path: Path, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"--plot needs matplotlib (pip install matplotlib); {path} not written")
        return
    names = [n for n in results if metrics(results[n])]
    panels = [("tps", "single stream tok/s (non-streaming)"), ("stream_tps", "single stream tok/s (streaming)"),
              ("ttft_ms", "time to first token, ms"), ("agg4_tps", "4 concurrent clients, aggregate tok/s"),
              ("models_rps", "GET /v1/models req/s"), ("rss_mb", "peak RSS, MiB"),
              ("first_answer_s", "process start → first answer, s")]
    fig, axes = plt.subplots(3, 3, figsize=(16, 12))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, panel_title) in zip([*axes.flat[:6], axes.flat[8]], panels):
        shown = [(i, n, metrics(results[n]).get(key)) for i, n in enumerate(names)]
        shown = [(i, n, v) for i, n, v in shown if v is not None]
        bars = ax.barh([n for _, n, _ in shown], [v for _, _, v in shown],
                       color=[colors[i % len(colors)] for i, _, _ in shown])
        ax.bar_label(bars, fmt={"models_rps": "%.0f", "first_answer_s": "%.2f"}.get(key, "%.1f"), fontsize=8)
        ax.set_title(panel_title, fontsize=10)
        ax.invert_yaxis()
    ax = axes.flat[6]
    for name in names:
        conc = results[name].get("concurrency") or {}
        if len(conc) > 1:
            ns = sorted(conc, key=int)
            ax.plot([int(n) for n in ns], [conc[n]["agg_tps"] for n in ns], marker="o", label=name)
            axes.flat[7].plot([int(n) for n in ns], [conc[n]["ttft_mean_s"] * 1000 for n in ns], marker="o", label=name)
    ax.set_title("aggregate tok/s vs concurrent clients", fontsize=10)
    axes.flat[7].set_title("mean TTFT (ms) vs concurrent clients", fontsize=10)
    for a in axes.flat[6:8]:
        a.set_xlabel("clients")
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=8)
        else:
            a.text(0.5, 0.5, "measured with one client count only", ha="center", va="center", transform=a.transAxes)
    fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    print(f"plot written to {path}")
