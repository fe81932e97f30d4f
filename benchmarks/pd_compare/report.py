# SPDX-License-Identifier: Apache-2.0
"""pd_compare's figures as data: per-workload rows, the TTFT breakdown, the
overheads and ratios against colocated and NIXL, the targets. ``render`` turns
them into tables and markdown."""

from __future__ import annotations

import statistics


def ratio(a, b) -> float | None:
    return a / b if a is not None and b not in (None, 0) else None


def get(d: dict, *path):
    for p in path:
        if not isinstance(d, dict):
            return None
        d = d.get(p)
    return d


def prom_xfer_ms(server: dict) -> float | None:
    """Mean KV transfer ms from the decode instance's /metrics: the connector's
    transfer histogram (``transfer_prom``; results recorded before KVBridge
    exported one have NIXL's alone, as ``nixl_prom``)."""
    if "transfer_prom" in server:
        return get(server, "transfer_prom", "mean_ms")
    return get(server, "nixl_prom", "mean_ms")


def xfer_ms(res: dict, wl: str) -> tuple[float | None, str]:
    """KV transfer ms/request for a workload, under load: the decode instance's
    /metrics. Results recorded before KVBridge exported its histogram have the
    decode log's "KV Transfer metrics" figures instead, preferred then as now."""
    w = get(res, "workloads", wl, "server") or {}
    if get(w, "transfer_prom", "mean_ms") is not None:
        return w["transfer_prom"]["mean_ms"], "prom"
    if get(w, "transfer_log", "mean_ms") is not None:
        return w["transfer_log"]["mean_ms"], "log"
    if get(w, "nixl_prom", "mean_ms") is not None:
        return w["nixl_prom"]["mean_ms"], "prom"
    return None, ""


def references(results: list[dict]) -> tuple[dict | None, dict | None]:
    """The colocated and the vLLM-NIXL results, where run."""
    by = {r["config"]: r for r in results}
    return by.get("colocated"), by.get("vllm-nixl")


def workload_row(results: list[dict], r: dict, c: dict, wl: tuple[str, str]) -> dict:
    """One configuration's figures for a workload table: client percentiles ``c``
    and their ratios to the colocated and NIXL runs' at ``wl`` (a path under
    ``workloads``)."""
    col, nix = references(results)
    ref_c = get(col, "workloads", *wl) if col else None
    ref_n = get(nix, "workloads", *wl) if nix else None
    rps = get(r, "workloads", wl[0], "request_throughput") if wl[0] == "w2" else \
        c.get("request_throughput")
    return {"config": r["config"], "kind": r["kind"],
            "p50_ttft_ms": c.get("p50_ttft_ms"), "p99_ttft_ms": c.get("p99_ttft_ms"),
            "p50_itl_ms": c.get("p50_itl_ms"), "p99_itl_ms": c.get("p99_itl_ms"),
            "request_throughput": rps, "xfer_ms": xfer_ms(r, wl[0])[0],
            "ttft_p50_to_colocated": ratio(c.get("p50_ttft_ms"), get(ref_c, "p50_ttft_ms")),
            "ttft_p50_to_nixl": ratio(c.get("p50_ttft_ms"), get(ref_n, "p50_ttft_ms")),
            "itl_p99_to_colocated": ratio(c.get("p99_itl_ms"), get(ref_c, "p99_itl_ms")),
            "itl_p99_to_nixl": ratio(c.get("p99_itl_ms"), get(ref_n, "p99_itl_ms")),
            "failed": c.get("failed")}


def add_mixed(results: list[dict]) -> None:
    """Workload 2's figures the tables compare, as ``workloads.w2._mixed`` (in
    place; the results JSON keeps them): TTFT of the long prompts (the ones
    prefilled remotely), ITL of the decode streams during the long-prompt window
    (the ones a long prefill can stall)."""
    for r in results:
        s = get(r, "workloads", "w2", "streams")
        if not s:
            continue
        ln = get(r, "workloads", "w2", "long") or {}
        w2 = r["workloads"]["w2"]
        w2["_mixed"] = {
            "p50_ttft_ms": ln.get("p50_ttft_ms"), "p99_ttft_ms": ln.get("p99_ttft_ms"),
            "p50_itl_ms": w2.get("window_p50_itl_ms"), "p99_itl_ms": w2.get("window_p99_itl_ms"),
            "failed": (s.get("failed") or 0) + (ln.get("failed") or 0)}


def breakdown(r: dict, name: str) -> dict:
    """Where one configuration's mean TTFT went in workload ``name`` (additive)."""
    wl = get(r, "workloads", name)
    cm = get(wl, "client", "mean_ttft_ms")
    if r["kind"] == "colocated":
        srv = get(wl, "server", "colocated") or {}
        return {"client_ttft": cm, "prefill": srv.get("prefill_mean_ms"),
                "decode_queue": srv.get("queue_mean_ms")}
    px = get(wl, "server", "proxy") or {}
    xf, _src = xfer_ms(r, name)
    if r.get("kv_mode") == "stream":
        # Decode asked for the KV when prefill started: its load time is
        # mostly the wait for prefill, not a transfer after it.
        xf = None
    ovh, pre, pt = (px.get("overhead_mean_ms"), px.get("prefill_mean_ms"),
                    px.get("ttft_mean_ms"))
    dec_first = pt - pre - ovh if None not in (pt, pre, ovh) else None
    return {"client_ttft": cm, "proxy_overhead": ovh, "prefill": pre,
            "kv_transfer": xf,
            "decode_rest": dec_first - xf if None not in (dec_first, xf) else dec_first,
            "decode_queue": get(wl, "server", "decode", "queue_mean_ms"),
            "client_gap": cm - pt if None not in (cm, pt) else None,
            # The hop as issue 16 defines it: per request, prefill's answer
            # to decode's first token (the proxy's --request-log), median
            # over the requests; the difference of means where there is none
            # (results recorded before the proxy logged requests).
            "hop": px.get("hop_p50_ms", cm - pre if None not in (cm, pre) else None),
            "hop_p10": px.get("hop_p10_ms"), "hop_p90": px.get("hop_p90_ms"),
            "hop_of_means": cm - pre if None not in (cm, pre) else None,
            # What is left of the hop besides decode's own step at this
            # context (its ITL p50, which grows with the prompt whatever the
            # connector does): the transfer's share that was not hidden.
            "hop_beyond_step": _minus(px.get("hop_p50_ms"),
                                      get(wl, "client", "p50_itl_ms"))}


def _minus(a, b):
    return a - b if a is not None and b is not None else None


def summarize_results(results: list[dict], plan: dict) -> dict:
    """The run's summary (the results JSON's ``summary``): per configuration the
    TTFT breakdown per prompt length, the overheads and ratios against colocated
    and NIXL, the proxy's overhead; and the ``targets`` with their verdicts.
    Adds ``workloads.w2._mixed`` to ``results`` first."""
    add_mixed(results)
    col, nix = references(results)
    summary: dict = {}
    for r in results:
        for L in plan["w1_lengths"]:
            if get(r, "workloads", f"w1_{L}"):
                summary.setdefault(r["config"], {})[f"breakdown_{L}"] = breakdown(r, f"w1_{L}")

    pd = pd_results(results)
    for L in plan["w1_lengths"]:
        c50 = get(col, "workloads", f"w1_{L}", "client", "p50_ttft_ms") if col else None
        n50 = get(nix, "workloads", f"w1_{L}", "client", "p50_ttft_ms") if nix else None
        nix_ovh = n50 - c50 if None not in (n50, c50) else None
        for r in pd:
            p50 = get(r, "workloads", f"w1_{L}", "client", "p50_ttft_ms")
            ovh = p50 - c50 if None not in (p50, c50) else None
            e = summary.setdefault(r["config"], {})
            e[f"ttft_overhead_ms_{L}"] = ovh
            e[f"ttft_ratio_to_colocated_{L}"] = ratio(p50, c50)
            if r["kind"] == "kvbridge":
                # Only meaningful when both P/D configs are slower than colocated;
                # otherwise the colocated baseline itself was slowed (noise).
                e[f"overhead_ratio_to_nixl_{L}"] = ratio(ovh, nix_ovh) if (
                    ovh is not None and nix_ovh is not None and ovh > 0 and nix_ovh > 0) \
                    else None
                hop = get(e, f"breakdown_{L}", "hop")
                nhop = get(summary, "vllm-nixl", f"breakdown_{L}", "hop")
                e[f"hop_ratio_to_nixl_{L}"] = ratio(hop, nhop) if (
                    hop is not None and nhop and hop > 0 and nhop > 0) else None
                phop = get(summary, "vllm-nixl-push", f"breakdown_{L}", "hop")
                e[f"hop_ratio_to_nixl_push_{L}"] = ratio(hop, phop) if (
                    hop is not None and phop and hop > 0 and phop > 0) else None
    for r in pd:
        e = summary[r["config"]]
        p50s = [get(r, "workloads", k, "server", "proxy", "overhead_p50_ms")
                for k in [f"w1_{L}" for L in plan["w1_lengths"]] + ["w2"]]
        p50s = [v for v in p50s if v is not None]
        e["proxy_overhead_p50_ms"] = statistics.median(p50s) if p50s else None
        e["itl_p99_mixed_ratio_to_colocated"] = ratio(
            get(r, "workloads", "w2", "_mixed", "p99_itl_ms"),
            get(col, "workloads", "w2", "_mixed", "p99_itl_ms") if col else None)
    summary["targets"] = targets(pd, summary, max(plan["w1_lengths"]),
                                 min(plan["w1_lengths"]))
    return summary


def pd_results(results: list[dict]) -> list[dict]:
    """The disaggregated configurations that ran their workloads."""
    return [r for r in results if r["kind"] != "colocated" and get(r, "workloads")]


def targets(pd: list[dict], summary: dict, Lmax: int, Lmin: int) -> list[dict]:
    """Each P/D configuration's targets at the longest prompts, with verdicts."""
    verdicts = []
    for r in pd:
        e = summary[r["config"]]
        if r["kind"] == "kvbridge":
            v = e.get(f"hop_ratio_to_nixl_{Lmax}")
            verdicts.append((r["config"], f"hop / NixlConnector's at ~{Lmax} <= 0.5", v,
                             None if v is None else v <= 0.5))
            v = e.get(f"hop_ratio_to_nixl_push_{Lmax}")
            if v is not None:
                verdicts.append((r["config"], f"hop / NixlPushConnector's at ~{Lmax} <= 1", v,
                                 v <= 1.0))
            hi = get(e, f"breakdown_{Lmax}", "hop")
            lo = get(e, f"breakdown_{Lmin}", "hop")
            v = ratio(hi, lo) if hi is not None and lo and lo > 0 else None
            verdicts.append((r["config"], f"hop ~{Lmax} / hop ~{Lmin} <= 1.2", v,
                             None if v is None else v <= 1.2))
            hi = get(e, f"breakdown_{Lmax}", "hop_beyond_step")
            lo = get(e, f"breakdown_{Lmin}", "hop_beyond_step")
            if hi is not None and lo and lo > 0:
                v = ratio(hi, lo)
                verdicts.append((r["config"], f"(hop - decode ITL p50) ~{Lmax} / ~{Lmin} <= 1.2"
                                 " (informative: the transfer's part)", v, v <= 1.2))
            v = e.get(f"overhead_ratio_to_nixl_{Lmax}")
            verdicts.append((r["config"], f"kvbridge/NIXL TTFT overhead at ~{Lmax} <= 0.5"
                             + ("" if v is not None else " (n/a: overhead <= 0)"), v,
                             None if v is None else v <= 0.5))
        v = e.get(f"ttft_ratio_to_colocated_{Lmax}")
        verdicts.append((r["config"], f"P/D TTFT / colocated at ~{Lmax} <= 1.10", v,
                         None if v is None else v <= 1.10))
        v = e.get("proxy_overhead_p50_ms")
        verdicts.append((r["config"], "proxy overhead p50 < 1 ms", v,
                         None if v is None else v < 1.0))
    return [{"config": c, "target": t, "value": v, "met": m} for c, t, v, m in verdicts]


def transfer_crosscheck(results: list[dict], plan: dict) -> list[dict]:
    """Per P/D configuration and prompt length: the side requests' transfer
    figures next to the decode instance's (medians over successful requests)."""
    rows = []
    for r in pd_results(results):
        side = get(r, "side", "requests") or []
        for L in plan["w1_lengths"]:
            s = [q for q in side if q["prompt_tokens"] == L and q["status"] == 200]
            hdr = [q["transfer_ms"] for q in s if isinstance(q["transfer_ms"], float)]
            kvb = [q["kv_bytes"] for q in s if isinstance(q["kv_bytes"], float)]
            srv = get(r, "side", "server") or {}
            rows.append({"config": r["config"], "prompt": L, "n": len(s),
                         "header_ms": statistics.median(hdr) if hdr else None,
                         "kv_mib": statistics.median(kvb) / 2**20 if kvb else None,
                         "prom_ms": prom_xfer_ms(srv),
                         "log_ms": get(srv, "transfer_log", "mean_ms"),
                         "under_load_ms": xfer_ms(r, f"w1_{L}")[0]})
    return rows
