# SPDX-License-Identifier: Apache-2.0
"""KVBridgeConnector's stats and their Prometheus metrics, without an engine:
what a worker records reaches vLLM's log line (``reduce``) and the
``vllm:kvbridge_*`` metrics (``KVBridgePromMetrics.observe``) intact."""

from __future__ import annotations

import functools
import sys
import types
from pathlib import Path

import msgspec
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

pytest.importorskip("vllm")

from kvbridge.errors import ErrorCode  # noqa: E402
from kvbridge.vllm.connector import KVBridgeConnector  # noqa: E402
from kvbridge.vllm.stats import FAILURE_REASONS, KVBridgeKVConnectorStats  # noqa: E402

LABELS = {"model_name": "tiny", "engine": "0"}


def prom_metrics(registry: CollectorRegistry):
    """The connector's metrics as vLLM's Prometheus stat logger builds them,
    registered in ``registry`` instead of the process-wide one."""
    types_ = {cls: functools.partial(cls, registry=registry) for cls in (Gauge, Counter,
                                                                         Histogram)}
    return KVBridgeConnector.build_prom_metrics(
        types.SimpleNamespace(kv_transfer_config=None), types_, ["model_name", "engine"],
        {0: ["tiny", "0"]})


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple], float]:
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(registry, name: str, **labels) -> float:
    return samples(registry)[(name, tuple(sorted({**LABELS, **labels}.items())))]


def two_workers() -> KVBridgeKVConnectorStats:
    """Two TP ranks' stats of one interval, aggregated as vLLM does."""
    rank0, rank1 = KVBridgeKVConnectorStats(), KVBridgeKVConnectorStats()
    rank0.record_transfer(4096, 0.002, 2)
    rank1.record_transfer(8192, 0.004, 2)
    rank1.record_failure(ErrorCode.TIMEOUT)
    rank1.record_failure(ErrorCode.TIMEOUT)
    rank0.record_failure(ErrorCode.CHECKSUM)
    rank0.bump("num_checksum_failures")
    rank1.bump("num_expired_leases", 3)
    rank0.bump("num_handshakes")
    rank0.bump("handshake_seconds", 0.010)
    rank1.bump("staged_to_host", 5)
    rank1.bump("staging_seconds", 0.5)
    rank0.record_connections("cma")
    rank1.record_connections("cma")
    rank1.record_connections("tcp", 2)
    return rank0.aggregate(rank1)


def test_aggregate_keeps_every_sample_and_count():
    s = two_workers()
    assert s.data["transfer_duration"] == [0.002, 0.004]
    assert s.data["bytes_transferred"] == [4096, 8192]
    assert s.num_successful_transfers == 2
    assert s.data["failed_transfers"] == {"timeout": 2, "checksum": 1}
    assert s.num_failed_transfers == 3
    assert s.data["connections_by_medium"] == {"cma": 2, "tcp": 2}
    assert not s.is_empty()


def test_reduce_is_the_log_line():
    r = two_workers().reduce()
    assert r["Num successful transfers"] == 2
    assert r["Num failed transfers"] == 3
    assert r["Bytes transferred (MB)"] == round(12288 / 1e6, 3)
    assert r["Avg transfer time (ms)"] == 3.0
    assert r["Expired leases"] == 3
    assert r["Failed (timeout)"] == 2 and r["Failed (checksum)"] == 1
    assert r["Avg handshake time (ms)"] == 10.0
    assert r["Host staging blocks d2h"] == 5
    assert r["Connections (cma)"] == 2 and r["Connections (tcp)"] == 2


def test_empty_until_something_happens():
    s = KVBridgeKVConnectorStats()
    assert s.is_empty()
    s.bump("num_expired_leases")
    assert not s.is_empty()
    assert KVBridgeConnector.build_kv_connector_stats().is_empty()
    s = KVBridgeKVConnectorStats()
    s.record_connections("tcp")
    assert not s.is_empty()


def test_observe_after_the_trip_between_processes():
    """Stats cross from the engine core to the API server as msgpack (vLLM's
    serializer); what arrives is what the metrics show."""
    registry = CollectorRegistry()
    metrics = prom_metrics(registry)
    data = msgspec.msgpack.decode(msgspec.msgpack.encode(two_workers().to_dict()))
    metrics.observe(data, engine_idx=0)
    assert value(registry, "vllm:kvbridge_xfer_time_seconds_count") == 2
    assert value(registry, "vllm:kvbridge_xfer_time_seconds_sum") == pytest.approx(0.006)
    assert value(registry, "vllm:kvbridge_bytes_transferred_sum") == 12288
    assert value(registry, "vllm:kvbridge_blocks_transferred_sum") == 4
    assert value(registry, "vllm:kvbridge_failed_transfers_total", reason="timeout") == 2
    assert value(registry, "vllm:kvbridge_failed_transfers_total", reason="checksum") == 1
    assert value(registry, "vllm:kvbridge_checksum_failures_total") == 1
    assert value(registry, "vllm:kvbridge_expired_leases_total") == 3
    assert value(registry, "vllm:kvbridge_handshakes_total") == 1
    assert value(registry, "vllm:kvbridge_handshake_time_seconds_total") == pytest.approx(0.01)
    assert value(registry, "vllm:kvbridge_host_staging_blocks_total", direction="to_host") == 5
    assert value(registry, "vllm:kvbridge_host_staging_time_seconds_total") == 0.5
    assert value(registry, "vllm:kvbridge_connections_total", medium="cma") == 2
    assert value(registry, "vllm:kvbridge_connections_total", medium="tcp") == 2
    # A second interval adds to the first.
    metrics.observe(KVBridgeKVConnectorStats().to_dict() | {"bytes_transferred": [100]})
    assert value(registry, "vllm:kvbridge_bytes_transferred_count") == 3


def test_every_failure_reason_is_exported_before_it_happens():
    registry = CollectorRegistry()
    prom_metrics(registry)
    assert set(FAILURE_REASONS) == {c.value for c in ErrorCode}
    for reason in FAILURE_REASONS:
        assert value(registry, "vllm:kvbridge_failed_transfers_total", reason=reason) == 0


def test_a_failed_load_counts_under_the_pull_that_failed_first():
    from kvbridge.vllm.worker import _failure_reason, _Load

    def pull(code, at):
        return types.SimpleNamespace(error_code=code, finished_at=at)

    load = _Load(spec=None, handles=[object()])
    # Rank 1 timed out first; rank 0 was cancelled because of it, then died.
    failed = [pull(ErrorCode.CANCELLED, 1.0), pull(ErrorCode.PEER_GONE, 3.0),
              pull(ErrorCode.TIMEOUT, 2.0)]
    assert _failure_reason(load, failed) == ErrorCode.TIMEOUT
    assert _failure_reason(load, [pull(ErrorCode.CANCELLED, 1.0)]) == ErrorCode.CANCELLED
    # Failed before any pull started: the code of what refused it.
    assert _failure_reason(_Load(spec=None, error_code=ErrorCode.BLOCKS), []) == ErrorCode.BLOCKS


def test_pd_compare_reads_the_transfer_histogram_from_metrics_text():
    """pd_compare's /metrics parser on the exposition text of these metrics."""
    # benchmarks/ is not a package of the install: imported from the checkout,
    # as benchmarks/pd_compare/run.py does.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    try:
        from benchmarks.pd_compare.metrics import delta, parse_metrics, transfer_stats
    finally:
        sys.path.pop(0)
    registry = CollectorRegistry()
    metrics = prom_metrics(registry)
    metrics.observe(two_workers().to_dict())
    before = parse_metrics(generate_latest(registry).decode())
    assert transfer_stats(before) == {"connector": "kvbridge", "transfers": 2,
                                      "mean_ms": pytest.approx(3.0),
                                      "mean_bytes": 6144, "failed": 3}
    one = KVBridgeKVConnectorStats()
    one.record_transfer(2**20, 0.010, 16)
    metrics.observe(one.to_dict())
    d = delta(parse_metrics(generate_latest(registry).decode()), before)
    assert transfer_stats(d) == {"connector": "kvbridge", "transfers": 1,
                                 "mean_ms": pytest.approx(10.0), "mean_bytes": 2**20,
                                 "failed": 0}
    assert transfer_stats(delta(before, before)) is None
