# SPDX-License-Identifier: Apache-2.0
"""What the servers report: Prometheus /metrics snapshots, histogram figures,
vLLM's "KV Transfer metrics" log lines, and a before/after ``Probe``."""

from __future__ import annotations

import math
import re
import time

from benchmarks.pd_compare.servers import Stack

def scrape(url: str) -> dict[tuple[str, str | None], float]:
    """Prometheus text -> {(name, le): value}, summed over all other labels."""
    import httpx

    try:
        text = httpx.get(url + "/metrics", timeout=5).text
    except httpx.HTTPError:
        return {}
    out: dict[tuple[str, str | None], float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name, _, labels = head.partition("{")
        m = re.search(r'le="([^"]+)"', labels)
        key = (name, m.group(1) if m else None)
        try:
            out[key] = out.get(key, 0.0) + float(value)
        except ValueError:
            continue
    return out


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


_XFER_RE = re.compile(r"KV Transfer metrics: (.*)$")


def transfer_log_stats(text: str) -> dict | None:
    """Weighted mean transfer time from vLLM's "KV Transfer metrics" log lines
    (KVBridge: "Avg transfer time (ms)", NixlConnector: "Avg xfer time (ms)")."""
    n_tot, ms_tot, mb_tot, failed = 0, 0.0, 0.0, 0
    for line in text.splitlines():
        m = _XFER_RE.search(line)
        if not m:
            continue
        kv = dict(p.split("=", 1) for p in m.group(1).split(", ") if "=" in p)
        try:
            n = int(float(kv.get("Num successful transfers", 0)))
            avg = float(kv.get("Avg transfer time (ms)", kv.get("Avg xfer time (ms)", 0)))
            failed += int(float(kv.get("Num failed transfers", 0) or 0))
            if "Bytes transferred (MB)" in kv:      # KVBridge: total MB (1e6)
                mb_tot += float(kv["Bytes transferred (MB)"])
            elif "Avg MB per transfer" in kv:       # NIXL: MiB per transfer
                mb_tot += float(kv["Avg MB per transfer"]) * n * 2**20 / 1e6
        except ValueError:
            continue
        n_tot += n
        ms_tot += avg * n
    if n_tot == 0 and failed == 0:
        return None
    return {"transfers": n_tot, "mean_ms": ms_tot / n_tot if n_tot else None,
            "mean_MB": mb_tot / n_tot if n_tot else None, "failed": failed}


class Probe:
    """Before/after snapshot of every /metrics endpoint and the decode log."""

    def __init__(self, st: Stack):
        self.st = st
        dec = st.server("decode")
        self.dec_log = dec.log_path if dec else None
        self.before = self._snap()
        self.log_off = self.dec_log.stat().st_size if self.dec_log else 0

    def _snap(self) -> dict:
        snap = {s.name.split("-")[0]: scrape(s.url) for s in self.st.servers}
        if self.st.proxy_url:
            snap["proxy"] = scrape(self.st.proxy_url)
        return snap

    def finish(self, settle_s: float = 1.6) -> dict:
        if self.dec_log:
            time.sleep(settle_s)  # one stat-logger interval (VLLM_LOG_STATS_INTERVAL=1)
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
            if role == "decode" and hist_count(v, "vllm:nixl_xfer_time_seconds"):
                out["nixl_prom"] = {
                    "transfers": hist_count(v, "vllm:nixl_xfer_time_seconds"),
                    "mean_ms": _ms(hist_mean(v, "vllm:nixl_xfer_time_seconds")),
                    "mean_bytes": hist_mean(v, "vllm:nixl_bytes_transferred"),
                }
        if self.dec_log:
            with open(self.dec_log, "rb") as f:
                f.seek(self.log_off)
                out["transfer_log"] = transfer_log_stats(f.read().decode(errors="replace"))
        return out


def _ms(s: float | None) -> float | None:
    return None if s is None else s * 1e3
