# SPDX-License-Identifier: Apache-2.0
"""Scheduler side of KVBridgeConnector (runs in the engine-core process).

Producer: ``request_finished`` keeps a finished prefill's blocks
(``delay_free=True``) and returns ``kv_transfer_params`` naming this engine,
its workers' addresses, the block ids, the token count and the layout
fingerprint; the next ``build_connector_meta`` tells the worker to publish
them. Consumer: a request carrying those params reports every prompt token
(the partial last block included) as loadable asynchronously, and once blocks
are allocated the worker is told to pull the ones the local prefix cache does
not already hold.

What vLLM waits on and what it does not are kept apart, because reporting a
request vLLM does not wait on kills its engine (``assert req_id in
self.requests`` in ``Scheduler._update_from_kv_xfer_finished``): only a
request vLLM put in ``WAITING_FOR_REMOTE_KVS`` becomes a ``RecvSpec`` (the
worker reports it received exactly once). Every other consumer request that
names a producer - a full local prefix hit, one aborted before its blocks were
allocated, the pre-aborted request vLLM's API server submits for a rejected
request (``notify_kv_transfer_request_rejected``) - becomes a ``ReleaseSpec``:
the producer is told to free the blocks, and vLLM hears nothing of it.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from vllm.logger import init_logger

from kvbridge import protocol as P
from kvbridge.layout import PROTOCOL_VERSION, KVLayout
from kvbridge.transport.base import ControlClient
from kvbridge.vllm.config import KVBridgeConfig
from kvbridge.vllm.metadata import (
    KVBridgeConnectorMetadata,
    KVBridgeHandshakeMetadata,
    RecvSpec,
    ReleaseSpec,
    SendSpec,
)

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

logger = init_logger(__name__)


def is_kvbridge_params(params: dict | None) -> bool:
    return bool(params) and "remote_addresses" in params and "kvbridge" in params


class KVBridgeScheduler:
    def __init__(self, vllm_config: VllmConfig, engine_id: str):
        self.config = KVBridgeConfig.from_vllm(vllm_config)
        self.engine_id = engine_id
        self.block_size = vllm_config.cache_config.block_size
        self.tp_size = vllm_config.parallel_config.tensor_parallel_size
        self.addresses: list[str] = []
        self.layout_fingerprint: str | None = None
        self._reqs_to_recv: dict[str, RecvSpec] = {}
        self._reqs_to_send: dict[str, SendSpec] = {}
        self._reqs_to_release: list[ReleaseSpec] = []
        self.instance_ids: list[str | None] = []
        self.layout: dict | None = None
        #: consumer: what each finished pull moved (from the workers), reported
        #: back in the decode response's kv_transfer_params
        self._transfer_figures: dict[str, tuple[int, float, int]] = {}
        self._control: list[ControlClient] = []

    # -- handshake metadata from the workers --
    def set_xfer_handshake_metadata(self, metadata: dict[int, KVBridgeHandshakeMetadata]):
        ranks = sorted(metadata)
        self.addresses = [metadata[r].address for r in ranks if metadata[r].address]
        self.instance_ids = [metadata[r].instance_id for r in ranks if metadata[r].address]
        self.layout_fingerprint = metadata[ranks[0]].layout_fingerprint if ranks else None
        self.layout = metadata[ranks[0]].layout if ranks else None
        # Publish finished prefills straight to each worker's listener: the
        # blocks become readable now, not at the engine's next step (which a
        # busy or idle engine can delay by seconds).
        secret = P.resolve_secret(self.config.transport_config.secret)
        self._control = [ControlClient(metadata[r].address, KVLayout.from_dict(metadata[r].layout),
                                       secret)
                         for r in ranks if metadata[r].address]
        logger.info("KVBridgeConnector: role %s, transport %s, producer addresses %s, "
                    "layout %s", self.config.role, self.config.transport, self.addresses,
                    self.layout_fingerprint)

    # -- consumer --
    def get_num_new_matched_tokens(self, request: Request,
                                   num_computed_tokens: int) -> tuple[int, bool]:
        params = request.kv_transfer_params
        if self.config.is_consumer and is_kvbridge_params(params) and params.get(
                "do_remote_prefill"):
            # Every prompt token, partial last block included: decode computes none.
            count = len(request.prompt_token_ids or ()) - num_computed_tokens
            if count > 0:
                return count, True
        return 0, False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks,
                                 num_external_tokens: int) -> None:
        params = request.kv_transfer_params
        if not (self.config.is_consumer and is_kvbridge_params(params)
                and params.get("do_remote_prefill")):
            return
        # One transfer per request (vLLM may call this twice for an async load).
        params["do_remote_prefill"] = False
        if num_external_tokens == 0:
            # Not waiting on a load (a full local prefix hit): pull nothing,
            # but let the producer free its blocks now rather than at lease end.
            self._release(params, "served from the local prefix cache")
            return
        remote_ids = list(params.get("remote_block_ids") or [])
        local_ids = list(blocks.get_unhashed_block_ids())
        # Blocks the local prefix cache already holds are not pulled again.
        num_cached = sum(1 for b in blocks.blocks[0]
                         if b.block_hash is not None and not b.is_null)
        remote_ids = remote_ids[num_cached:num_cached + len(local_ids)]
        missing: list[int] = []
        if len(remote_ids) != len(local_ids):
            logger.error("KVBridgeConnector: request %s: producer sent %d blocks, %d needed "
                         "here; the %d it lacks are load errors", request.request_id,
                         len(remote_ids), len(local_ids), len(local_ids) - len(remote_ids))
            local_ids, missing = local_ids[:len(remote_ids)], local_ids[len(remote_ids):]
        self._reqs_to_recv[request.request_id] = RecvSpec(
            remote_request_id=params["remote_request_id"],
            addresses=list(params["remote_addresses"]),
            remote_block_ids=remote_ids,
            local_block_ids=local_ids,
            layout_fingerprint=params.get("layout_fingerprint"),
            instance_ids=params.get("remote_instance_ids"),
            missing_local_ids=missing)

    def _release(self, params: dict, reason: str) -> None:
        self._reqs_to_release.append(ReleaseSpec(params["remote_request_id"],
                                                 list(params["remote_addresses"]), reason))

    def update_connector_output(self, connector_output) -> None:
        meta = getattr(connector_output, "kv_connector_worker_meta", None)
        if meta is not None and hasattr(meta, "transfers"):
            self._transfer_figures.update(meta.transfers)

    def shutdown(self) -> None:
        for client in self._control:
            client.close()

    def describe(self) -> dict[str, Any]:
        """What a router's pre-check needs (returned for ``kvbridge_describe``)."""
        return {"kvbridge": PROTOCOL_VERSION, "kv_role": self.config.role,
                "transport": self.config.transport, "layout_fingerprint": self.layout_fingerprint,
                "layout": self.layout, "addresses": self.addresses}

    # -- both --
    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVBridgeConnectorMetadata:
        meta = KVBridgeConnectorMetadata(reqs_to_recv=self._reqs_to_recv,
                                         reqs_to_send=self._reqs_to_send,
                                         reqs_to_release=self._reqs_to_release)
        self._reqs_to_recv, self._reqs_to_send, self._reqs_to_release = {}, {}, []
        return meta

    # -- producer --
    def request_finished(self, request: Request,
                         block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        from vllm.v1.request import RequestStatus

        params = request.kv_transfer_params
        if not params:
            return False, None
        if params.get("kvbridge_describe"):
            # A router asking what this instance is (layout pre-check).
            return False, {"kvbridge_describe": self.describe()}
        figures = self._transfer_figures.pop(request.request_id, None)
        if figures is not None:
            nbytes, seconds, blocks = figures
            return False, {"kvbridge_kv_bytes": nbytes, "kvbridge_kv_blocks": blocks,
                           "kvbridge_transfer_ms": round(seconds * 1e3, 3)}
        if params.get("do_remote_prefill") and is_kvbridge_params(params):
            # A consumer request that never waited on a load: aborted before
            # its blocks were allocated, or the pre-aborted request vLLM's API
            # server submits for a rejected one. vLLM waits on nothing here;
            # only the producer must hear, so it frees its blocks now.
            params["do_remote_prefill"] = False
            self._release(params, "aborted before its KV was loaded")
            return False, None
        if not (params.get("do_remote_decode") and self.config.is_producer):
            return False, None
        if request.status not in (RequestStatus.FINISHED_LENGTH_CAPPED,
                                  RequestStatus.FINISHED_STOPPED):
            # Aborted prefill: nothing will read it, free the blocks at once.
            return False, None
        if not self.addresses:
            logger.error("KVBridgeConnector: request %s finished but no worker address is "
                         "known; freeing its blocks", request.request_id)
            return False, None
        num_tokens = request.num_computed_tokens
        ids = list(block_ids)[:math.ceil(num_tokens / self.block_size)]
        if not ids:
            return False, None
        self._reqs_to_send[request.request_id] = SendSpec(ids, num_tokens)
        for client in self._control:
            client.publish(request.request_id, ids, num_tokens)
        host, _, port = self.addresses[0].rpartition(":")
        return True, dict(
            do_remote_prefill=True,
            do_remote_decode=False,
            remote_block_ids=ids,
            remote_engine_id=self.engine_id,
            remote_request_id=request.request_id,
            remote_host=host,
            remote_port=int(port),
            remote_addresses=self.addresses,
            remote_instance_ids=self.instance_ids,
            remote_num_tokens=num_tokens,
            tp_size=self.tp_size,
            layout_fingerprint=self.layout_fingerprint,
            transport=self.config.transport,
            kvbridge=PROTOCOL_VERSION,
        )
