# SPDX-License-Identifier: Apache-2.0
"""pd_compare's report as text: the tables printed and written to the
markdown file, the markdown's tail (method, targets, where the time goes) and
the plot, all from the results and the summary ``report`` computes."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.pd_compare.plan import SEED
from benchmarks.pd_compare.report import (
    get,
    pd_results,
    summarize_results,
    transfer_crosscheck,
    workload_row,
)
from kvbridge.bench.common import table

HEADS = ["config", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99", "req/s", "KV xfer ms/req",
         "TTFT p50 /coloc", "TTFT p50 /NIXL", "ITL p99 /coloc", "ITL p99 /NIXL", "failed"]


def fmt(v, spec="{:.1f}") -> str:
    return "-" if v is None else spec.format(v)


def build_report(results: list[dict], plan: dict) -> tuple[str, dict, str]:
    """Compute the summary (``report.summarize_results``) and render it:
    (text, summary, notes)."""
    summary = summarize_results(results, plan)
    text, notes = render(results, plan, summary)
    return text, summary, notes


def format_row(f: dict) -> list[str]:
    """A ``report.workload_row`` as table cells."""
    return [f["config"], fmt(f["p50_ttft_ms"]), fmt(f["p99_ttft_ms"]),
            fmt(f["p50_itl_ms"], "{:.2f}"), fmt(f["p99_itl_ms"], "{:.2f}"),
            fmt(f["request_throughput"], "{:.3f}"),
            fmt(f["xfer_ms"], "{:.2f}") if f["kind"] != "colocated" else "n/a",
            fmt(f["ttft_p50_to_colocated"], "{:.3f}"), fmt(f["ttft_p50_to_nixl"], "{:.3f}"),
            fmt(f["itl_p99_to_colocated"], "{:.3f}"), fmt(f["itl_p99_to_nixl"], "{:.3f}"),
            fmt(f["failed"], "{:.0f}")]


def render(results: list[dict], plan: dict, summary: dict) -> tuple[str, str]:
    """The report's text and its notes (failures, load, affinity)."""
    sections = workload_tables(results, plan)
    pd = pd_results(results)
    lines = [*headline_table(pd, plan, summary), targets_table(summary),
             breakdown_table(results, plan, summary), crosscheck_table(results, plan)]
    notes = run_notes(results)
    text = "\n\n".join(sections + lines + (["Notes:\n" + "\n".join(notes)] if notes else []))
    return text, "\n".join(notes)


def workload_tables(results: list[dict], plan: dict) -> list[str]:
    sections = []
    for L in plan["w1_lengths"]:
        rows = [format_row(workload_row(results, r, get(r, "workloads", f"w1_{L}", "client")
                                        or {}, (f"w1_{L}", "client")))
                for r in results if get(r, "workloads", f"w1_{L}")]
        sections.append(f"Workload 1, ~{L}-token prompts, {plan['w1_out']} output tokens, "
                        f"max concurrency {plan['w1_conc']}, {plan['w1_n']} requests "
                        f"(ms; ITL over all tokens):\n" + table(HEADS, rows))
    rows = [format_row(workload_row(results, r, r["workloads"]["w2"]["_mixed"],
                                    ("w2", "_mixed")))
            + [fmt(get(r, "workloads", "w2", "streams", "p50_itl_ms"), "{:.2f}"),
               fmt(get(r, "workloads", "w2", "streams", "p99_itl_ms"), "{:.2f}"),
               fmt(get(r, "workloads", "w2", "overlap"), "{:.2f}")]
            for r in results if get(r, "workloads", "w2", "_mixed")]
    sections.append(
        f"Workload 2, mixed: {plan['w2_streams']} decode streams ({plan['w2_stream_in']} in / "
        f"{plan['w2_stream_out']} out, max concurrency {plan['w2_conc']}) + {plan['w2_long_n']} "
        f"long prompts ({plan['w2_long_in']} in / {plan['w2_long_out']} out) at "
        f"{plan['w2_long_rate']} req/s from t={plan['w2_long_delay']} s. TTFT = the long "
        f"prompts; ITL = the decode streams' inter-token latency while long prompts were being "
        f"served (first long request sent .. last one answered), ratios on these; 'all-run' = "
        f"the client's ITL over the whole run; overlap = share of stream tokens emitted while "
        f"a long prompt was in flight:\n"
        + table(HEADS + ["ITL p50 all-run", "ITL p99 all-run", "overlap"], rows))
    return sections


def headline_table(pd: list[dict], plan: dict, summary: dict) -> list[str]:
    """The overheads and ratios against colocated and NIXL: a legend and a table."""
    text = ("TTFT overhead of disaggregation = P/D TTFT p50 - colocated TTFT p50 (ms); "
            "kvb/NIXL = kvbridge overhead / NIXL overhead (target <= 0.5); "
            "P/D / coloc = TTFT p50 ratio (target <= 1.10 at ~2k); hop = per request, the "
            "time from the prefill instance's answer to decode's first token at the proxy "
            "(what disaggregation adds besides the prefill itself, free of the colocated "
            "instance's different core count), median over the requests; hop kvb/NIXL "
            "its ratio:")
    heads2 = ["config"]
    for L in plan["w1_lengths"]:
        heads2 += [f"overhead ~{L}", f"kvb/NIXL ~{L}", f"P/D / coloc ~{L}", f"hop ~{L}",
                   f"hop kvb/NIXL ~{L}"]
    heads2 += ["proxy ovh p50 ms", "ITL p99 mixed /coloc"]
    rows2 = []
    for r in pd:
        e = summary[r["config"]]
        row2 = [r["config"]]
        for L in plan["w1_lengths"]:
            row2 += [fmt(e.get(f"ttft_overhead_ms_{L}"), "{:+.1f}"),
                     fmt(e.get(f"overhead_ratio_to_nixl_{L}"), "{:.2f}")
                     if r["kind"] == "kvbridge" else "-",
                     fmt(e.get(f"ttft_ratio_to_colocated_{L}"), "{:.3f}"),
                     fmt(get(e, f"breakdown_{L}", "hop")),
                     fmt(e.get(f"hop_ratio_to_nixl_{L}"), "{:.2f}")
                     if r["kind"] == "kvbridge" else "-"]
        row2 += [fmt(e["proxy_overhead_p50_ms"], "{:.3f}"),
                 fmt(e["itl_p99_mixed_ratio_to_colocated"], "{:.3f}")]
        rows2.append(row2)
    return [text, table(heads2, rows2)]


def targets_table(summary: dict) -> str:
    return "Targets:\n" + table(["config", "target", "value", "met"], [
        [t["config"], t["target"], fmt(t["value"], "{:.3f}"),
         {True: "yes", False: "NO", None: "n/a"}[t["met"]]]
        for t in summary["targets"]])


def breakdown_table(results: list[dict], plan: dict, summary: dict) -> str:
    """Where the TTFT goes (means, additive)."""
    rows3 = []
    for r in results:
        for L in plan["w1_lengths"]:
            b = summary.get(r["config"], {}).get(f"breakdown_{L}")
            if not b:
                continue
            rows3.append([r["config"], L, fmt(b["client_ttft"]), fmt(b.get("proxy_overhead"),
                                                                     "{:.3f}"),
                          fmt(b.get("prefill")), fmt(b.get("kv_transfer"), "{:.2f}"),
                          fmt(b.get("decode_rest")), fmt(b.get("decode_queue")),
                          fmt(b.get("client_gap")), fmt(b.get("hop_of_means")),
                          fmt(b.get("hop")) + (f" [{fmt(b['hop_p10'])}-{fmt(b['hop_p90'])}]"
                                               if b.get("hop_p10") is not None else ""),
                          fmt(b.get("hop_beyond_step"))])
    return (
        "Where the TTFT goes (means over workload 1, ms). P/D: client TTFT = proxy overhead + "
        "prefill (round trip to the prefill instance, max_tokens=1, from the proxy's histogram) "
        "+ KV transfer + decode rest (decode instance after the transfer: scheduling, first "
        "decode step, first chunk through the proxy; 'of which queue' = "
        "vllm:request_queue_time there) + client gap (client TTFT - proxy TTFT); hop of means = "
        "client TTFT - prefill = everything disaggregation adds besides running the prefill; "
        "hop p50 = the same per request (prefill's answer to decode's first token at the "
        "proxy), median [10th-90th percentile] over the requests; beyond step = hop p50 - "
        "the configuration's ITL p50 at that prompt length (decode's own step, which grows "
        "with the context whatever the connector does). "
        "Colocated: prefill = vllm:request_prefill_time, queue = vllm:request_queue_time:\n"
        + table(["config", "prompt", "client TTFT", "proxy ovh", "prefill", "KV xfer",
                 "decode rest", "of which queue", "client gap", "hop of means",
                 "hop p50 [p10-p90]", "beyond step"], rows3))


def crosscheck_table(results: list[dict], plan: dict) -> str:
    """The KV transfer time, measured three ways."""
    rows4 = [[x["config"], x["prompt"], x["n"], fmt(x["header_ms"], "{:.2f}"),
              fmt(x["kv_mib"], "{:.2f}"), fmt(x["prom_ms"], "{:.2f}"),
              fmt(x["log_ms"], "{:.2f}"), fmt(x["under_load_ms"], "{:.2f}")]
             for x in transfer_crosscheck(results, plan)]
    return (
        "KV transfer time cross-check (ms): side = a few non-streaming requests through the "
        "router after workload 1 (header = X-KVBridge-Transfer-Ms, KVBridge only; prom = "
        "the connector's transfer histogram on the decode instance's /metrics, "
        "vllm:kvbridge_xfer_time_seconds or vllm:nixl_xfer_time_seconds; log = vLLM's "
        "'KV Transfer metrics' lines of the decode instance, in results recorded before "
        "KVBridge exported its histogram); under load = the same figure during "
        "workload 1:\n" + table(["config", "prompt", "side n", "side header",
                                 "side KV MiB", "side prom", "side log", "under load"], rows4))


def run_notes(results: list[dict]) -> list[str]:
    """Failures, errors, proxy fallbacks, load and CPU affinity per configuration."""
    notes = []
    for r in results:
        if r.get("error"):
            notes.append(f"{r['config']}: FAILED: {r['error']}")
        for wl, w in (r.get("workloads") or {}).items():
            for part in ("client", "streams", "long"):
                errs = get(w, part, "errors")
                if errs:
                    notes.append(f"{r['config']} {wl} {part}: {len(errs)} distinct error(s): "
                                 + " | ".join(errs[:3]))
            px = get(w, "server", "proxy") or {}
            if px.get("failures") or px.get("fallbacks"):
                notes.append(f"{r['config']} {wl}: proxy failures {px['failures']:.0f}, "
                             f"colocated fallbacks {px['fallbacks']:.0f}")
        if r.get("loadavg_before"):
            notes.append(f"{r['config']}: load average (1 min) {r['loadavg_before'][0]:.1f} "
                         f"before, {r['loadavg_after'][0]:.1f} after (2 CPUs; >~3 means other "
                         "work competed with this configuration)")
        for srv, procs in (r.get("affinity") or {}).items():
            busy = {v["busiest_thread_cpus"] for v in procs.values()
                    if v.get("busiest_thread_cpus")}
            notes.append(f"{r['config']}: {srv}: busiest thread per process ran on CPUs "
                         f"{sorted(busy)}")
    return notes


def plot(results: list[dict], plan: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    wls = [(f"w1_{L}", f"~{L}-token prompts") for L in plan["w1_lengths"]] + \
        [("w2", "mixed (TTFT: long prompts, ITL: streams)")]
    fig, axes = plt.subplots(len(wls), 2, figsize=(12, 3.6 * len(wls)), squeeze=False)
    names = [r["config"] for r in results if r.get("workloads")]
    for i, (wl, title) in enumerate(wls):
        for j, (metric, unit) in enumerate((("ttft", "TTFT"), ("itl", "ITL"))):
            ax = axes[i][j]
            vals = {}
            for q in ("p50", "p99"):
                vs = []
                for r in results:
                    if not r.get("workloads"):
                        continue
                    c = get(r, "workloads", wl, "client") if wl != "w2" else \
                        get(r, "workloads", "w2", "_mixed")
                    vs.append(get(c or {}, f"{q}_{metric}_ms") or 0.0)
                vals[q] = vs
            x = range(len(names))
            ax.bar([k - 0.2 for k in x], vals["p50"], 0.4, label="p50")
            ax.bar([k + 0.2 for k in x], vals["p99"], 0.4, label="p99")
            ax.set_xticks(list(x))
            ax.set_xticklabels(names, rotation=20, ha="right", fontsize=8)
            ax.set_ylabel("ms")
            pos = [v for q in vals.values() for v in q if v > 0]
            if pos and max(pos) / min(pos) > 50:
                ax.set_yscale("log")
                ax.set_ylabel("ms (log)")
            ax.set_title(f"{unit} - {title}", fontsize=9)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def ncores(spec: str) -> int:
    n = 0
    for part in str(spec).split(","):
        a, _, b = part.partition("-")
        n += (int(b) - int(a) + 1) if b else 1
    return n


def markdown_tail(results, summary, plan, out_name, log_dir) -> str:
    t = [f"\n![TTFT and ITL per configuration]({out_name}.png)\n",
         "\n## Method\n",
         "See `benchmarks/pd_compare/README.md`. Load: vLLM's serving client "
         "(`vllm.benchmarks.serve`, the `vllm bench serve` code path), random dataset, seed "
         f"{SEED}+, `--ignore-eos`, temperature 0. Plan: `{json.dumps(plan)}`. Server, router "
         f"and client logs were in `{log_dir}`. Cores: prefill {plan.get('prefill_core')}, "
         f"decode {plan.get('decode_core')}, colocated {plan.get('colocated_cores')}. vLLM "
         f"NixlConnector's NIXL agents: {plan.get('nixl_agents')} (see the README).\n",
         "\n## Reading the targets\n"]
    for tg in summary.get("targets", []):
        met = {True: "met", False: "**not met**", None: "not measured"}[tg["met"]]
        t.append(f"- {tg['config']}: {tg['target']}: {fmt(tg['value'], '{:.3f}')} ({met})\n")
    missed = [tg for tg in summary.get("targets", []) if tg["met"] is False]
    if missed:
        L = max(plan["w1_lengths"])
        col = get(summary, "colocated", f"breakdown_{L}") or {}
        t.append(f"\n## Where the time goes (~{L}-token prompts, means)\n\n")
        for r in results:
            if r["kind"] == "colocated":
                continue
            b = get(summary, r["config"], f"breakdown_{L}")
            if not b or b.get("client_ttft") is None:
                continue
            extra = (b["client_ttft"] - col["client_ttft"]) if col.get("client_ttft") else None
            pre_gap = (b["prefill"] - col["prefill"]) if None not in (
                b.get("prefill"), col.get("prefill")) else None
            t.append(
                f"- **{r['config']}**: TTFT {fmt(b['client_ttft'])} ms vs colocated "
                f"{fmt(col.get('client_ttft'))} ms ({fmt(extra, '{:+.1f}')} ms). Of the P/D "
                f"TTFT: prefill round trip {fmt(b.get('prefill'))} ms (colocated server prefill "
                f"{fmt(col.get('prefill'))} ms: {fmt(pre_gap, '{:+.1f}')} ms from the prefill "
                f"instance having one core where the colocated one has "
                f"{ncores(plan.get('colocated_cores', '0-1'))}"
                f", plus its own HTTP/tokenize/schedule/sample cycle), KV transfer "
                f"{fmt(b.get('kv_transfer'), '{:.2f}')} ms, decode instance after the "
                f"transfer {fmt(b.get('decode_rest'))} ms (of which queue "
                f"{fmt(b.get('decode_queue'))} ms), proxy overhead "
                f"{fmt(b.get('proxy_overhead'), '{:.3f}')} ms, client gap "
                f"{fmt(b.get('client_gap'))} ms.\n")
        t.append("\nEvery P/D request also runs a whole prefill request (HTTP, tokenization, "
                 "scheduling, one sampled token) before the decode request starts; on a tiny "
                 "model the per-hop costs weigh much more than on a real one. Both instances, "
                 "the router and the client share two cores, so results from a loaded machine "
                 "are noisy.\n")
    return "".join(t)
