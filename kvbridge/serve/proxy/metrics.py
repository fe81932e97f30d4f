# SPDX-License-Identifier: Apache-2.0
"""Prometheus metrics of ``kvbridge proxy`` (served on ``GET /metrics``), and
each request's timeline (``RequestTimeline``): the hop, and the optional
per-request log (``--request-log``)."""

from __future__ import annotations

import json
import threading
import time

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
        self._hop = Histogram("kvbridge_proxy_hop_seconds", "Streamed responses: from the "
                              "prefill instance's answer to decode's first token - what "
                              "disaggregation adds to TTFT besides the prefill (the KV "
                              "transfer, decode's scheduling and first step)",
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
        #: ``--request-log``: one JSON line per request with both milestones
        self._request_log = None
        self._log_lock = threading.Lock()

    def open_request_log(self, path: str) -> None:
        self._request_log = open(path, "a", buffering=1)  # noqa: SIM115 - open for the app's life

    def close(self) -> None:
        if self._request_log is not None:
            self._request_log.close()
            self._request_log = None

    def timeline(self, request_id: str, t_arrival: float, stream: bool) -> RequestTimeline:
        return RequestTimeline(self, request_id, t_arrival, stream)

    def _timeline_done(self, tl: RequestTimeline) -> None:
        hop = tl.t_first_token - tl.t_prefill
        if tl.stream:
            self._hop.observe(max(0.0, hop))
        if self._request_log is not None:
            line = json.dumps({
                "id": tl.request_id, "mode": tl.mode, "stream": tl.stream,
                "time": round(time.time(), 3),
                "prefill_ms": round((tl.t_prefill - tl.t_prefill_sent) * 1e3, 3),
                "hop_ms": round(hop * 1e3, 3),
                "ttft_ms": round((tl.t_first_token - tl.t_arrival) * 1e3, 3)})
            with self._log_lock:
                if self._request_log is not None:
                    self._request_log.write(line + "\n")

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


class RequestTimeline:
    """One disaggregated request's milestones at the proxy (``perf_counter``
    seconds, one clock): the prefill sent and answered, and decode's first
    token (a streamed response's first chunk; a whole response otherwise).
    The hop - first token minus prefill answer - is recorded once both are
    known, in whichever order they come: a streamed-KV request's prefill
    answers in the background, possibly after decode's first token."""

    __slots__ = ("_owner", "request_id", "t_arrival", "stream", "mode", "t_prefill_sent",
                 "t_prefill", "t_first_token", "_done")

    def __init__(self, owner: ProxyMetrics, request_id: str, t_arrival: float, stream: bool):
        self._owner = owner
        self.request_id, self.t_arrival, self.stream = request_id, t_arrival, stream
        self.mode = "disaggregated"
        self.t_prefill_sent: float | None = None
        self.t_prefill: float | None = None
        self.t_first_token: float | None = None
        self._done = False

    def prefill_sent(self) -> None:
        self.t_prefill_sent = time.perf_counter()

    def prefill_answered(self) -> None:
        self.t_prefill = time.perf_counter()
        self._maybe_done()

    def first_token(self) -> None:
        if self.t_first_token is None:
            self.t_first_token = time.perf_counter()
            self._maybe_done()

    def decode_started(self) -> bool:
        """Whether decode's first token came (so it has all the KV)."""
        return self.t_first_token is not None

    def _maybe_done(self) -> None:
        if (not self._done and self.t_prefill is not None and self.t_first_token is not None
                and self.t_prefill_sent is not None):
            self._done = True
            self._owner._timeline_done(self)
