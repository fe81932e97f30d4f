# SPDX-License-Identifier: Apache-2.0
"""Connector stats through vLLM's ``KVConnectorStats``: bytes, transfers,
GB/s, failures - logged by vLLM's stat logger each interval."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

_ZERO = {"num_transfers": 0, "num_failed_transfers": 0, "bytes_transferred": 0,
         "transfer_seconds": 0.0, "num_published": 0, "num_expired_leases": 0}


@dataclass
class KVBridgeKVConnectorStats(KVConnectorStats):
    def __post_init__(self) -> None:
        if not self.data:
            self.reset()

    def reset(self) -> None:
        self.data = dict(_ZERO)

    def record_transfer(self, nbytes: int, seconds: float) -> None:
        self.data["num_transfers"] += 1
        self.data["bytes_transferred"] += nbytes
        self.data["transfer_seconds"] += seconds

    def record_failure(self, codes=()) -> None:
        """One failed load; ``codes``: the ``ErrorCode`` of each failed pull
        (counted as ``failed_<code>``, so failures are told apart by kind)."""
        self.data["num_failed_transfers"] += 1
        for code in set(codes):
            self.bump(f"failed_{code}")

    def bump(self, key: str, n: int = 1) -> None:
        self.data[key] = self.data.get(key, 0) + n

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for k, v in other.data.items():
            self.data[k] = self.data.get(k, 0) + v
        return self

    def reduce(self) -> dict[str, int | float]:
        d = self.data
        secs = d.get("transfer_seconds", 0.0)
        return {
            "Num successful transfers": d.get("num_transfers", 0),
            "Num failed transfers": d.get("num_failed_transfers", 0),
            "Bytes transferred (MB)": round(d.get("bytes_transferred", 0) / 1e6, 3),
            "Avg transfer time (ms)": round(1e3 * secs / d["num_transfers"], 3)
            if d.get("num_transfers") else 0,
            "Throughput (GB/s)": round(d.get("bytes_transferred", 0) / secs / 1e9, 3)
            if secs else 0,
            "Expired leases": d.get("num_expired_leases", 0),
            **{f"Failed ({k[len('failed_'):]})": v for k, v in sorted(d.items())
               if k.startswith("failed_") and v},
            **({"Host staging blocks d2h": d.get("staged_to_host", 0),
                "Host staging blocks h2d": d.get("staged_to_device", 0),
                "Host staging time (ms)": round(1e3 * d.get("staging_seconds", 0.0), 3)}
               if d.get("staged_to_host") or d.get("staged_to_device") else {}),
        }

    def is_empty(self) -> bool:
        return not any(self.data.get(k) for k in ("num_transfers", "num_failed_transfers",
                                                  "num_published", "num_expired_leases",
                                                  "staged_to_host", "staged_to_device"))

    def to_dict(self) -> dict[str, Any]:
        return dict(self.data)
