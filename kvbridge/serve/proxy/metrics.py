# SPDX-License-Identifier: Apache-2.0
"""Prometheus metrics of ``kvbridge proxy`` (served on ``GET /metrics``)."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

_LAT = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_ITL = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)
_OVH = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05)


class ProxyMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self._requests = Counter("kvbridge_proxy_requests", "Requests by endpoint and status",
                                 ["endpoint", "status"], registry=r)
        self._ttft = Histogram("kvbridge_proxy_ttft_seconds", "Time to first token, as the "
                               "client sees it", buckets=_LAT, registry=r)
        self._itl = Histogram("kvbridge_proxy_itl_seconds", "Inter-token latency of streams",
                              buckets=_ITL, registry=r)
        self._prefill = Histogram("kvbridge_proxy_prefill_seconds", "Prefill request latency",
                                  buckets=_LAT, registry=r)
        self._decode = Histogram("kvbridge_proxy_decode_seconds", "Decode request latency",
                                 buckets=_LAT, registry=r)
        self._overhead = Histogram("kvbridge_proxy_overhead_seconds", "Time the proxy itself "
                                   "adds before the decode request (parsing, picking)",
                                   buckets=_OVH, registry=r)
        self._kv_bytes = Counter("kvbridge_proxy_kv_bytes", "KV bytes moved prefill -> decode",
                                 registry=r)
        self._failures = Counter("kvbridge_proxy_failures", "Failures by kind", ["kind"],
                                 registry=r)
        self._fallback = Counter("kvbridge_proxy_fallback_requests", "Requests answered by a "
                                 "decode instance alone because no prefill was usable",
                                 registry=r)
        self._pairs = Counter("kvbridge_proxy_pairs", "Disaggregated requests by the prefill "
                              "instance that computed the KV and the decode instance that "
                              "pulled it", ["prefill", "decode"], registry=r)
        self._healthy = Gauge("kvbridge_proxy_backend_healthy", "1 if the backend is in "
                              "rotation", ["role", "url"], registry=r)

    def request_done(self, endpoint: str, status: int) -> None:
        self._requests.labels(endpoint, str(status)).inc()

    def ttft(self, s: float) -> None:
        self._ttft.observe(s)

    def itl(self, s: float) -> None:
        self._itl.observe(s)

    def prefill_latency(self, s: float) -> None:
        self._prefill.observe(s)

    def decode_latency(self, s: float) -> None:
        self._decode.observe(s)

    def overhead(self, s: float) -> None:
        self._overhead.observe(max(0.0, s))

    def kv_bytes(self, n: int) -> None:
        self._kv_bytes.inc(n)

    def failure(self, kind: str) -> None:
        self._failures.labels(kind).inc()

    def paired(self, prefill: str, decode: str) -> None:
        self._pairs.labels(prefill, decode).inc()

    def fallback(self) -> None:
        self._fallback.inc()

    def backend_changed(self, backend) -> None:
        self._healthy.labels(backend.role, backend.url).set(1 if backend.usable else 0)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
