# SPDX-License-Identifier: Apache-2.0
"""What the servers report: Prometheus /metrics snapshots, histogram figures
(the connectors' KV transfer histograms among them), and a before/after
``Probe``."""

from __future__ import annotations

import json
import math
import statistics
import time

from prometheus_client.parser import text_string_to_metric_families

from benchmarks.pd_compare.servers import Stack

#: the decode instance's KV transfer histograms, by connector: (transfer
#: seconds, bytes per transfer, failed-transfer counter)
TRANSFER_METRICS = {
    "kvbridge": ("vllm:kvbridge_xfer_time_seconds", "vllm:kvbridge_bytes_transferred",
                 "vllm:kvbridge_failed_transfers_total"),
    "nixl": ("vllm:nixl_xfer_time_seconds", "vllm:nixl_bytes_transferred",
             "vllm:nixl_num_failed_transfers_total"),
}


def parse_metrics(text: str) -> dict[tuple[str, str | None], float]:
    """Prometheus text -> {(sample name, le): value}, summed over all other
    labels (engines, models, failure reasons)."""
    out: dict[tuple[str, str | None], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, sample.labels.get("le"))
            out[key] = out.get(key, 0.0) + sample.value
    return out


def scrape(url: str) -> dict[tuple[str, str | None], float]:
    import httpx

    try:
        return parse_metrics(httpx.get(url + "/metrics", timeout=5).text)
    except httpx.HTTPError:
        return {}


def delta(after: dict, before: dict) -> dict:
    return {k: v - before.get(k, 0.0) for k, v in after.items()}


def hist_mean(d: dict, name: str) -> float | None:
    n = d.get((name + "_count", None), 0.0)
    return d.get((name + "_sum", None), 0.0) / n if n > 0 else None


def hist_count(d: dict, name: str) -> float:
    return d.get((name + "_count", None), 0.0)


def hist_quantile(d: dict, name: str, q: float) -> float | None:
    """Prometheus' histogram_quantile (linear inside the bucket)."""
    buckets = sorted((float(le), c) for (n, le), c in d.items() if n == name + "_bucket")
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    prev_le, prev_c = 0.0, 0.0
    for le, c in buckets:
        if c >= rank:
            if math.isinf(le):
                return prev_le
            if c == prev_c:
                return le
            return prev_le + (le - prev_le) * (rank - prev_c) / (c - prev_c)
        prev_le, prev_c = le, c
    return prev_le


def transfer_stats(d: dict) -> dict | None:
    """The KV transfers in a /metrics delta of a decode instance, from the
    connector's own histograms: which connector, how many, mean ms and bytes,
    failures. None when neither connector moved anything."""
    for connector, (time_name, bytes_name, failed_name) in TRANSFER_METRICS.items():
        n = hist_count(d, time_name)
        failed = d.get((failed_name, None), 0.0)
        if n or failed:
            return {"connector": connector, "transfers": n,
                    "mean_ms": _ms(hist_mean(d, time_name)),
                    "mean_bytes": hist_mean(d, bytes_name), "failed": failed}
    return None


class Probe:
    """Before/after snapshot of every /metrics endpoint."""

    def __init__(self, st: Stack):
        self.st = st
        self.before = self._snap()
        self._requests_at = _size(st.proxy_requests)

    def _snap(self) -> dict:
        snap = {s.name.split("-")[0]: scrape(s.url) for s in self.st.servers}
        if self.st.proxy_url:
            snap["proxy"] = scrape(self.st.proxy_url)
        return snap

    def finish(self, settle_s: float = 0.5) -> dict:
        # The API server records the engine's stats (the connector's among
        # them) as the engine's outputs arrive, up to a step after the answers.
        time.sleep(settle_s)
        after = self._snap()
        d = {k: delta(after[k], self.before.get(k, {})) for k in after}
        out: dict = {}
        if "proxy" in d:
            p = d["proxy"]
            out["proxy"] = {
                "overhead_p50_ms": _ms(hist_quantile(p, "kvbridge_proxy_overhead_seconds", .5)),
                "overhead_p99_ms": _ms(hist_quantile(p, "kvbridge_proxy_overhead_seconds", .99)),
                "overhead_mean_ms": _ms(hist_mean(p, "kvbridge_proxy_overhead_seconds")),
                "prefill_mean_ms": _ms(hist_mean(p, "kvbridge_proxy_prefill_seconds")),
                "ttft_mean_ms": _ms(hist_mean(p, "kvbridge_proxy_ttft_seconds")),
                "requests": hist_count(p, "kvbridge_proxy_overhead_seconds"),
                "failures": sum(v for (n, _), v in p.items()
                                if n.startswith("kvbridge_proxy_failures")),
                "fallbacks": sum(v for (n, _), v in p.items()
                                 if n.startswith("kvbridge_proxy_fallback_requests")),
                **request_figures(self.st.proxy_requests, self._requests_at),
            }
        for role in ("colocated", "prefill", "decode"):
            if role not in d:
                continue
            v = d[role]
            out[role] = {
                "queue_mean_ms": _ms(hist_mean(v, "vllm:request_queue_time_seconds")),
                "prefill_mean_ms": _ms(hist_mean(v, "vllm:request_prefill_time_seconds")),
                "ttft_mean_ms": _ms(hist_mean(v, "vllm:time_to_first_token_seconds")),
                "itl_mean_ms": _ms(hist_mean(v, "vllm:inter_token_latency_seconds")),
            }
            if role == "decode":
                out["transfer_prom"] = transfer_stats(v)
        return out


def _ms(s: float | None) -> float | None:
    return None if s is None else s * 1e3


def _size(path) -> int:
    try:
        return path.stat().st_size if path is not None else 0
    except OSError:
        return 0


def request_figures(path, offset: int) -> dict:
    """Per-request figures from the proxy's ``--request-log`` lines written
    since ``offset``: the hop (prefill's answer to decode's first token, on
    the proxy's one clock) of each streamed response, median over the
    requests - as issue 16 defines it - with the 10th and 90th percentiles
    (nearest rank) for its spread."""
    if path is None:
        return {}
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            records = [json.loads(x) for x in f.read().decode().splitlines() if x.strip()]
    except (OSError, ValueError):
        return {}
    hops = sorted(r["hop_ms"] for r in records if r.get("stream"))
    if not hops:
        return {}

    def rank(p: float) -> float:
        return hops[max(0, min(len(hops) - 1, math.ceil(p * len(hops)) - 1))]

    return {"hop_p50_ms": statistics.median(hops), "hop_p10_ms": rank(0.1),
            "hop_p90_ms": rank(0.9), "hop_n": len(hops)}
