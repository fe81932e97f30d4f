# SPDX-License-Identifier: Apache-2.0
"""Connector stats and their Prometheus metrics.

``KVBridgeKVConnectorStats`` travels from each worker to vLLM's front end
(vLLM's ``KVConnectorStats``): per-transfer samples (duration, bytes, blocks:
one sample per load a worker finished) and counters (failures by
``ErrorCode``, expired leases, checksum failures, handshakes, host staging).
vLLM hands every step's stats to two places:

* its log stat logger, each logging interval: ``reduce()`` -> the
  "KV Transfer metrics: ..." line;
* its Prometheus stat logger, as they arrive: ``KVBridgePromMetrics.observe``
  -> the ``vllm:kvbridge_*`` metrics on the API server's ``/metrics``, with
  vLLM's ``model_name`` and ``engine`` labels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
)
from vllm.v1.metrics.utils import create_metric_per_engine

from kvbridge.errors import ErrorCode

#: per-transfer samples: one entry per load a worker finished successfully
_SAMPLES = ("transfer_duration", "bytes_transferred", "blocks_transferred")
#: counters for the interval (numbers) and failures by ``ErrorCode`` value
_COUNTERS = ("num_expired_leases", "num_checksum_failures", "num_handshakes",
             "handshake_seconds", "staged_to_host", "staged_to_device", "staging_seconds",
             "num_published", "num_released", "num_aborted_loads", "num_stream_publishes")
_FAILURES = "failed_transfers"
#: producer connections opened, by medium ("cma", "tcp"...: what auto chose)
_MEDIA = "connections_by_medium"


@dataclass
class KVBridgeKVConnectorStats(KVConnectorStats):
    """One interval's figures of one or more workers; ``data`` is plain lists,
    numbers and a dict, so it serializes as vLLM sends it between processes."""

    def __post_init__(self) -> None:
        if not self.data:
            self.reset()

    def reset(self) -> None:
        self.data = {**{k: [] for k in _SAMPLES}, **{k: 0 for k in _COUNTERS}, _FAILURES: {},
                     _MEDIA: {}}

    def record_transfer(self, nbytes: int, seconds: float, blocks: int) -> None:
        """One successful load (every pull of it on this rank)."""
        self.data["transfer_duration"].append(seconds)
        self.data["bytes_transferred"].append(nbytes)
        self.data["blocks_transferred"].append(blocks)

    def record_failure(self, reason: ErrorCode | str) -> None:
        """One failed load, counted under the ``ErrorCode`` that failed it."""
        failures = self.data[_FAILURES]
        failures[str(reason)] = failures.get(str(reason), 0) + 1

    def record_connections(self, medium: str, n: int = 1) -> None:
        """``n`` producer connections opened whose bytes move by ``medium``."""
        media = self.data.setdefault(_MEDIA, {})
        media[medium] = media.get(medium, 0) + n

    def bump(self, key: str, n: int | float = 1) -> None:
        self.data[key] = self.data.get(key, 0) + n

    @property
    def num_successful_transfers(self) -> int:
        return len(self.data.get("transfer_duration", ()))

    @property
    def num_failed_transfers(self) -> int:
        return sum(self.data.get(_FAILURES, {}).values())

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for key, value in other.data.items():
            if isinstance(value, list):
                self.data.setdefault(key, []).extend(value)
            elif isinstance(value, dict):
                mine = self.data.setdefault(key, {})
                for k, n in value.items():
                    mine[k] = mine.get(k, 0) + n
            else:
                self.data[key] = self.data.get(key, 0) + value
        return self

    def reduce(self) -> dict[str, int | float]:
        d = self.data
        n = self.num_successful_transfers
        secs = sum(d.get("transfer_duration", ()))
        nbytes = sum(d.get("bytes_transferred", ()))
        out: dict[str, int | float] = {
            "Num successful transfers": n,
            "Num failed transfers": self.num_failed_transfers,
            "Bytes transferred (MB)": round(nbytes / 1e6, 3),
            "Avg transfer time (ms)": round(1e3 * secs / n, 3) if n else 0,
            "Throughput (GB/s)": round(nbytes / secs / 1e9, 3) if secs else 0,
            "Expired leases": d.get("num_expired_leases", 0),
        }
        out.update({f"Failed ({code})": count
                    for code, count in sorted(d.get(_FAILURES, {}).items()) if count})
        if d.get("num_checksum_failures"):
            out["Checksum failures"] = d["num_checksum_failures"]
        out.update({f"Connections ({medium})": count
                    for medium, count in sorted(d.get(_MEDIA, {}).items()) if count})
        if d.get("num_handshakes"):
            out["Handshakes"] = d["num_handshakes"]
            out["Avg handshake time (ms)"] = round(
                1e3 * d.get("handshake_seconds", 0.0) / d["num_handshakes"], 3)
        if d.get("staged_to_host") or d.get("staged_to_device"):
            out["Host staging blocks d2h"] = d.get("staged_to_host", 0)
            out["Host staging blocks h2d"] = d.get("staged_to_device", 0)
            out["Host staging time (ms)"] = round(1e3 * d.get("staging_seconds", 0.0), 3)
        return out

    def is_empty(self) -> bool:
        return not (self.num_successful_transfers or self.num_failed_transfers
                    or any(self.data.get(k) for k in _COUNTERS) or self.data.get(_MEDIA))

    def to_dict(self) -> dict[str, Any]:
        return self.data


# Transfers of a small model on one host take well under a millisecond; a
# large prefill over a slow link, seconds.
_XFER_TIME_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                      0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
#: 2 KiB .. 8 GiB, every fourth power of two (as vLLM's NIXL metrics)
_BYTES_BUCKETS = tuple(2 ** (10 + i) for i in range(1, 25, 2))
_BLOCKS_BUCKETS = tuple(2 ** i for i in range(0, 17))

#: the reasons a load fails with, as metric labels
FAILURE_REASONS = tuple(code.value for code in ErrorCode)


class KVBridgePromMetrics(KVConnectorPromMetrics):
    """``vllm:kvbridge_*`` on vLLM's ``/metrics`` (``build_prom_metrics``).

    Histograms take one sample per successful load on a worker rank (under
    tensor parallelism, one per rank: their ``_sum`` is the request's whole KV).
    Counters ending in ``_seconds`` add up time; PromQL ``rate(x_seconds_total)
    / rate(count_total)`` is its mean.
    """

    def __init__(self, vllm_config, metric_types, labelnames: list[str],
                 per_engine_labelvalues: dict[int, list[object]]):
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)

        def per_engine(metric):
            return create_metric_per_engine(metric, per_engine_labelvalues)

        self.xfer_time = per_engine(self._histogram_cls(
            name="vllm:kvbridge_xfer_time_seconds",
            documentation="Duration of kvbridge KV cache loads (all pulls of a request "
                          "on one worker rank), seconds.",
            buckets=_XFER_TIME_BUCKETS, labelnames=labelnames))
        self.bytes_transferred = per_engine(self._histogram_cls(
            name="vllm:kvbridge_bytes_transferred",
            documentation="KV cache bytes moved per kvbridge load (per worker rank).",
            buckets=_BYTES_BUCKETS, labelnames=labelnames))
        self.blocks_transferred = per_engine(self._histogram_cls(
            name="vllm:kvbridge_blocks_transferred",
            documentation="KV cache blocks moved per kvbridge load (per worker rank).",
            buckets=_BLOCKS_BUCKETS, labelnames=labelnames))
        self._failed_transfers = self._counter_cls(
            name="vllm:kvbridge_failed_transfers",
            documentation="Failed kvbridge KV cache loads, by the ErrorCode that failed "
                          "them (reason).",
            labelnames=labelnames + ["reason"])
        # Every reason exists from the start, at 0, so rate() sees the first one.
        for values in per_engine_labelvalues.values():
            for reason in FAILURE_REASONS:
                self._failed_transfers.labels(*values, reason)
        self.expired_leases = per_engine(self._counter_cls(
            name="vllm:kvbridge_expired_leases",
            documentation="Published KV cache that no consumer read before its lease "
                          "ended (counted by the producer).",
            labelnames=labelnames))
        self.checksum_failures = per_engine(self._counter_cls(
            name="vllm:kvbridge_checksum_failures",
            documentation="Loads whose landed blocks did not match the producer's "
                          "checksums.",
            labelnames=labelnames))
        self.stream_publishes = per_engine(self._counter_cls(
            name="vllm:kvbridge_stream_publishes",
            documentation="Streamed requests' blocks made readable after a prefill step "
                          "(one per request and step; counted by the producer).",
            labelnames=labelnames))
        self.handshakes = per_engine(self._counter_cls(
            name="vllm:kvbridge_handshakes",
            documentation="Handshakes with producers (layouts paired).",
            labelnames=labelnames))
        self._connections = self._counter_cls(
            name="vllm:kvbridge_connections",
            documentation="Connections to producers, by the medium their bytes move by "
                          "(medium: cma, tcp, nixl; with transport auto, what it chose per "
                          "producer).",
            labelnames=labelnames + ["medium"])
        self.handshake_time = per_engine(self._counter_cls(
            name="vllm:kvbridge_handshake_time_seconds",
            documentation="Time spent in handshakes with producers, seconds.",
            labelnames=labelnames))
        staged = self._counter_cls(
            name="vllm:kvbridge_host_staging_blocks",
            documentation="Blocks copied between the device KV cache and its host mirror "
                          "(direction: to_host, to_device).",
            labelnames=labelnames + ["direction"])
        self.staged_blocks = {
            idx: {d: staged.labels(*values, d) for d in ("to_host", "to_device")}
            for idx, values in per_engine_labelvalues.items()}
        self.staging_time = per_engine(self._counter_cls(
            name="vllm:kvbridge_host_staging_time_seconds",
            documentation="Time spent copying blocks between the device KV cache and its "
                          "host mirror, seconds.",
            labelnames=labelnames))

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        d = transfer_stats_data
        for histogram, key in ((self.xfer_time, "transfer_duration"),
                               (self.bytes_transferred, "bytes_transferred"),
                               (self.blocks_transferred, "blocks_transferred")):
            for sample in d.get(key, ()):
                histogram[engine_idx].observe(sample)
        for medium, count in d.get(_MEDIA, {}).items():
            self._connections.labels(*self.per_engine_labelvalues[engine_idx],
                                     medium).inc(count)
        for reason, count in d.get(_FAILURES, {}).items():
            self._failed_transfers.labels(*self.per_engine_labelvalues[engine_idx],
                                          reason).inc(count)
        for counter, key in ((self.expired_leases, "num_expired_leases"),
                             (self.checksum_failures, "num_checksum_failures"),
                             (self.handshakes, "num_handshakes"),
                             (self.stream_publishes, "num_stream_publishes"),
                             (self.handshake_time, "handshake_seconds"),
                             (self.staging_time, "staging_seconds")):
            if d.get(key):
                counter[engine_idx].inc(d[key])
        for direction, key in (("to_host", "staged_to_host"), ("to_device", "staged_to_device")):
            if d.get(key):
                self.staged_blocks[engine_idx][direction].inc(d[key])
