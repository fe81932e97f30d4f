# SPDX-License-Identifier: Apache-2.0
"""Scheduler -> worker metadata and the kv_transfer_params contract.

``kv_transfer_params`` follow vLLM's proxy contract (the fields NixlConnector
uses, so routers such as ``vllm-router`` forward them unchanged), plus
kvbridge's own: ``remote_addresses`` (one control address per TP rank),
``remote_instance_ids`` (the producer process of each rank, so a restarted
producer fails the pull at once), ``layout_fingerprint`` and ``kvbridge`` (the
protocol version).
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
    """A consumer-side pull vLLM waits on: remote blocks of
    ``remote_request_id`` on the producer at ``addresses[tp_rank]`` into
    ``local_block_ids``. ``missing_local_ids``: blocks vLLM allocated for
    tokens the producer did not send - reported as load errors, never left
    as garbage vLLM would attend over."""

    remote_request_id: str
    addresses: list[str]
    remote_block_ids: list[int]
    local_block_ids: list[int]
    layout_fingerprint: str | None = None
    instance_ids: list[str] | None = None
    missing_local_ids: list[int] = field(default_factory=list)
    #: a streamed request: ``remote_block_ids`` are positions in the
    #: producer's block list, read in chunks as its prefill computes them
    positions: bool = False


@dataclass
class ReleaseSpec:
    """A consumer-side hand-back vLLM does not wait on: tell the producer at
    ``addresses[tp_rank]`` that ``remote_request_id`` will not be read here
    (aborted before its blocks were allocated, rejected by the API server, or
    served from the local prefix cache), so it frees the blocks now."""

    remote_request_id: str
    addresses: list[str]
    reason: str


@dataclass
class SendSpec:
    """A producer-side publish: hold ``block_ids`` until read or lease end.
    ``num_tokens`` (one KV cache group) checks their count; None with several
    groups."""

    block_ids: list[int]
    num_tokens: int | None
    #: the lease consumers read it under: the stream id of a streamed
    #: request (published step by step, ``StreamSpec``), else None (the
    #: request id; the scheduler published it)
    stream_id: str | None = None
    #: a streamed request vLLM aborted: its lease is let go now
    aborted: bool = False


@dataclass
class StreamSpec:
    """A producer-side streamed request in this step: once the step's forward
    pass ran, ``block_ids`` (every block computed so far, in request order)
    are readable under ``stream_id``; ``complete``: the prompt's last."""

    stream_id: str
    block_ids: list[int]
    complete: bool


@dataclass
class KVBridgeConnectorMetadata(KVConnectorMetadata):
    reqs_to_recv: dict[str, RecvSpec] = field(default_factory=dict)
    reqs_to_send: dict[str, SendSpec] = field(default_factory=dict)
    reqs_to_release: list[ReleaseSpec] = field(default_factory=list)
    #: the engine computes no token this step: it steps only to poll the
    #: connector (vLLM keeps stepping while requests wait on transfers)
    idle_step: bool = False
    #: request id -> its blocks computed once this step ran (streaming)
    reqs_to_stream: dict[str, StreamSpec] = field(default_factory=dict)
    #: stream ids of streamed requests aborted before they were scheduled
    streams_to_end: list[str] = field(default_factory=list)


@dataclass
class KVBridgeHandshakeMetadata(KVConnectorHandshakeMetadata):
    """What a worker tells its scheduler after registering its KV cache."""

    address: str | None
    layout_fingerprint: str
    layout: dict
    #: the producer process's identity (``Transport.instance_id``)
    instance_id: str | None = None


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
