# SPDX-License-Identifier: Apache-2.0
"""Scheduler -> worker metadata and the kv_transfer_params contract.

``kv_transfer_params`` follow vLLM's proxy contract (the fields NixlConnector
uses, so routers such as ``vllm-router`` forward them unchanged), plus
kvbridge's own: ``remote_addresses`` (one control address per TP rank),
``layout_fingerprint`` and ``kvbridge`` (the protocol version).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorHandshakeMetadata,
    KVConnectorMetadata,
    KVConnectorWorkerMetadata,
)


@dataclass
class RecvSpec:
    """A consumer-side pull: remote blocks of ``remote_request_id`` on the
    producer at ``addresses[tp_rank]`` into ``local_block_ids``."""

    remote_request_id: str
    addresses: list[str]
    remote_block_ids: list[int]
    local_block_ids: list[int]
    layout_fingerprint: str | None = None


@dataclass
class SendSpec:
    """A producer-side publish: hold ``block_ids`` until read or lease end."""

    block_ids: list[int]
    num_tokens: int


@dataclass
class KVBridgeConnectorMetadata(KVConnectorMetadata):
    reqs_to_recv: dict[str, RecvSpec] = field(default_factory=dict)
    reqs_to_send: dict[str, SendSpec] = field(default_factory=dict)


@dataclass
class KVBridgeHandshakeMetadata(KVConnectorHandshakeMetadata):
    """What a worker tells its scheduler after registering its KV cache."""

    address: str | None
    layout_fingerprint: str
    layout: dict


@dataclass
class KVBridgeWorkerMetadata(KVConnectorWorkerMetadata):
    """Worker -> scheduler, per step: what each finished pull moved, so the
    decode response can carry per-request KV figures.

    ``transfers``: request id -> (bytes, seconds, blocks); across TP ranks bytes
    and blocks add up and the slowest rank's time counts.
    """

    transfers: dict[str, tuple[int, float, int]] = field(default_factory=dict)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        assert isinstance(other, KVBridgeWorkerMetadata)
        for rid, (b, s, n) in other.transfers.items():
            ob, os_, on = self.transfers.get(rid, (0, 0.0, 0))
            self.transfers[rid] = (ob + b, max(os_, s), on + n)
        return self
