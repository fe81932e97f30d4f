# SPDX-License-Identifier: Apache-2.0
"""Scheduler side of KVBridgeConnector (runs in the engine-core process).

Producer: ``request_finished`` keeps a finished prefill's blocks
(``delay_free=True``) and returns ``kv_transfer_params`` naming this engine,
its workers' addresses, the block ids, the token count and the layout
fingerprint, after publishing the blocks to every worker rank's transport
over a control connection (the one publish: the worker never publishes, it
reports the request sent once its transport lets the blocks go). Consumer: a request carrying those params reports every prompt token
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

Hybrid models (vLLM's hybrid KV cache manager: full and sliding-window
layers in separate KV cache groups) hand over one block list per group.
``kv_transfer_params["remote_block_ids"]`` is then a list per group, with
vLLM's null block (id 0) where a sliding window already let go of a block;
the consumer pairs each group's blocks it still needs with the producer's
from the end (the window's blocks are the last ones), so a sliding-window
group moves only the blocks inside its window.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from vllm.logger import init_logger

from kvbridge import protocol as P
from kvbridge.layout import KVLayout
from kvbridge.protocol import PROTOCOL_VERSION
from kvbridge.vllm.control import ControlClient
from kvbridge.vllm.config import KVBridgeConfig
from kvbridge.vllm.metadata import (
    KVBridgeConnectorMetadata,
    KVBridgeHandshakeMetadata,
    RecvSpec,
    ReleaseSpec,
    SendSpec,
)
from kvbridge.vllm.stream import STREAM_ID_KEY, STREAM_KEY, StreamTracker, tail_positions

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

logger = init_logger(__name__)


def is_kvbridge_params(params: dict | None) -> bool:
    return bool(params) and "remote_addresses" in params and "kvbridge" in params


class KVBridgeScheduler:
    def __init__(self, vllm_config: VllmConfig, engine_id: str, kv_cache_config=None):
        self.config = KVBridgeConfig.from_vllm(vllm_config)
        groups = getattr(kv_cache_config, "kv_cache_groups", None) or ()
        self.num_groups = max(1, len(groups))
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
        #: consumer, several KV cache groups: blocks pulled per group, reported
        #: with the figures (a sliding-window group moves only its window)
        self._group_blocks: dict[str, list[int]] = {}
        self._control: list[ControlClient] = []
        #: producer: streamed requests (``kvbridge.vllm.stream``), and those
        #: aborted before they were scheduled (their waiting consumers are refused)
        self.streams = StreamTracker(self.block_size)
        self._streams_to_end: list[str] = []

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
        if (self.config.is_producer and params and params.get(STREAM_ID_KEY)
                and params.get("do_remote_decode")):
            # Streamed: published step by step as prefill computes its blocks.
            self.streams.add(request.request_id, str(params[STREAM_ID_KEY]),
                             len(request.prompt_token_ids or ()))
            return
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
        if params.get(STREAM_KEY):
            self._recv_streamed(request, params, _unhashed_per_group(blocks))
            return
        remote_ids, local_ids, missing, per_group = pair_group_blocks(
            request.request_id, params.get("remote_block_ids") or [],
            _unhashed_per_group(blocks))
        if self.num_groups > 1:
            self._group_blocks[request.request_id] = per_group
        self._reqs_to_recv[request.request_id] = RecvSpec(
            remote_request_id=params["remote_request_id"],
            addresses=list(params["remote_addresses"]),
            remote_block_ids=remote_ids,
            local_block_ids=local_ids,
            layout_fingerprint=params.get("layout_fingerprint"),
            instance_ids=params.get("remote_instance_ids"),
            missing_local_ids=missing)

    def _recv_streamed(self, request: Request, params: dict, local: list[list[int]]) -> None:
        """A streamed request: read the blocks not held locally by position,
        chunk by chunk, while the producer's prefill computes them."""
        if len(local) != 1:
            logger.error("KVBridgeConnector: request %s is streamed, which needs one KV cache "
                         "group (this engine has %d); every block is a load error",
                         request.request_id, len(local))
            ids, local_ids, missing = [], [], [b for g in local for b in g]
        else:
            ids = tail_positions(len(request.prompt_token_ids or ()), self.block_size,
                                 len(local[0]))
            # Blocks past the prompt's last (none, unless vLLM allocated ahead)
            # have nothing to read: load errors, never garbage.
            missing = local[0][len(ids):]
            local_ids = local[0][:len(ids)]
        self._reqs_to_recv[request.request_id] = RecvSpec(
            remote_request_id=params["remote_request_id"],
            addresses=list(params["remote_addresses"]),
            remote_block_ids=ids, local_block_ids=local_ids,
            layout_fingerprint=params.get("layout_fingerprint"),
            instance_ids=params.get("remote_instance_ids"),
            missing_local_ids=missing, positions=True)

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
                "layout": self.layout, "addresses": self.addresses,
                "instance_ids": self.instance_ids,
                # streamed requests (kvbridge.vllm.stream): one KV cache group only
                "stream": self.num_groups == 1}

    # -- both --
    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVBridgeConnectorMetadata:
        meta = KVBridgeConnectorMetadata(
            reqs_to_recv=self._reqs_to_recv, reqs_to_send=self._reqs_to_send,
            reqs_to_release=self._reqs_to_release,
            idle_step=getattr(scheduler_output, "total_num_scheduled_tokens", 1) == 0,
            reqs_to_stream=self.streams.step(scheduler_output),
            streams_to_end=self._streams_to_end)
        self._reqs_to_recv, self._reqs_to_send, self._reqs_to_release = {}, {}, []
        self._streams_to_end = []
        return meta

    # -- producer --
    def request_finished(self, request: Request, block_ids: list[int] | tuple[list[int], ...],
                         ) -> tuple[bool, dict[str, Any] | None]:
        """``block_ids``: the request's blocks, one list per KV cache group
        (``request_finished_all_groups``) or one list (``request_finished``)."""
        from vllm.v1.request import RequestStatus

        params = request.kv_transfer_params
        if not params:
            return False, None
        if params.get("kvbridge_describe"):
            # A router asking what this instance is (layout pre-check).
            return False, {"kvbridge_describe": self.describe()}
        figures = self._transfer_figures.pop(request.request_id, None)
        per_group = self._group_blocks.pop(request.request_id, None)
        if figures is not None:
            nbytes, seconds, blocks = figures
            out = {"kvbridge_kv_bytes": nbytes, "kvbridge_kv_blocks": blocks,
                   "kvbridge_transfer_ms": round(seconds * 1e3, 3),
                   # where the KV came from (a router's or operator's pairing view)
                   "kvbridge_producers": list(params.get("remote_addresses") or [])}
            if per_group is not None:
                out["kvbridge_kv_blocks_by_group"] = per_group
            return False, out
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
        stream_id = self.streams.pop(request.request_id)
        if stream_id is not None:
            # Streamed: its blocks are published (step by step) under the stream
            # id and may be under a consumer's read right now, finished or
            # aborted - vLLM keeps them until the worker reports it sent.
            finished = request.status in (RequestStatus.FINISHED_LENGTH_CAPPED,
                                          RequestStatus.FINISHED_STOPPED)
            self._reqs_to_send[request.request_id] = SendSpec(
                [], None, stream_id=stream_id, aborted=not finished)
            return True, ({"kvbridge_stream_id": stream_id,
                           "remote_num_tokens": request.num_computed_tokens}
                          if finished else None)
        if params.get(STREAM_ID_KEY) and request.status not in (
                RequestStatus.FINISHED_LENGTH_CAPPED, RequestStatus.FINISHED_STOPPED):
            # A streamed request aborted before it was scheduled: no block was
            # published, but a consumer may be waiting for them - end it now.
            self._streams_to_end.append(str(params[STREAM_ID_KEY]))
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
        groups = ([list(g) for g in block_ids] if block_ids and isinstance(block_ids[0], list)
                  else [list(block_ids)])
        groups = [g[:math.ceil(num_tokens / self.block_size)] for g in groups]
        # What consumers may read: every group's real blocks (vLLM's null
        # block 0 stands for a block a sliding window already let go of).
        ids = [b for g in groups for b in g if b != NULL_BLOCK_ID]
        if not ids:
            return False, None
        # One group: the count is checked against the tokens (a whole block
        # list); several: the groups' counts differ, the ids are what counts.
        checked_tokens = num_tokens if len(groups) == 1 else None
        # The one publish: straight to each worker rank's listener, so the
        # blocks are readable now, not at the engine's next step (which a busy
        # engine can delay by seconds). The workers only wait for the release.
        published = [c for c in self._control
                     if c.publish(request.request_id, ids, checked_tokens)]
        if len(published) < len(self._control):
            for client in published:
                client.release(request.request_id, "publish failed on another rank")
            logger.error("KVBridgeConnector: request %s could not be published on %d of %d "
                         "ranks; freeing its blocks (decode computes the prompt)",
                         request.request_id, len(self._control) - len(published),
                         len(self._control))
            return False, None
        self._reqs_to_send[request.request_id] = SendSpec(ids, checked_tokens)
        host, _, port = self.addresses[0].rpartition(":")
        return True, dict(
            do_remote_prefill=True,
            do_remote_decode=False,
            remote_block_ids=groups[0] if len(groups) == 1 else groups,
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


#: vLLM's null block: a placeholder for a block a sliding window dropped.
NULL_BLOCK_ID = 0


def _unhashed_per_group(blocks: KVCacheBlocks) -> list[list[int]]:
    """The blocks to fill, per KV cache group: neither hashed (held by the
    local prefix cache) nor vLLM's null placeholder."""
    if hasattr(blocks, "get_unhashed_block_ids_all_groups"):
        return [list(g) for g in blocks.get_unhashed_block_ids_all_groups()]
    return [list(blocks.get_unhashed_block_ids())]


def pair_group_blocks(request_id: str, remote: list, local: list[list[int]],
                      ) -> tuple[list[int], list[int], list[int], list[int]]:
    """(remote ids, local ids, missing local ids, blocks pulled per group) of
    one load, over every group. ``remote``: the producer's block ids (one list, or one per group);
    ``local``: the blocks to fill here, per group.

    Each group pairs from the end: the blocks still to fill are the last ones
    (after local prefix hits, inside a sliding window). Local blocks the
    producer has no block for - it sent fewer, or a window had let go of it -
    are ``missing``: load errors, never left as garbage vLLM would attend over.
    """
    remote_groups = [list(g) for g in remote] if remote and isinstance(remote[0], list) \
        else [list(remote)]
    if len(remote_groups) != len(local):
        logger.error("KVBridgeConnector: request %s: the producer has %d KV cache groups, "
                     "this engine %d; every block is a load error", request_id,
                     len(remote_groups), len(local))
        return [], [], [b for g in local for b in g], [0] * len(local)
    remote_ids: list[int] = []
    local_ids: list[int] = []
    missing: list[int] = []
    per_group: list[int] = []
    for g, (rem, loc) in enumerate(zip(remote_groups, local)):
        tail = rem[len(rem) - len(loc):] if len(loc) <= len(rem) else [None] * (
            len(loc) - len(rem)) + rem
        lacking = 0
        per_group.append(0)
        for r, b in zip(tail, loc):
            if r is None or r == NULL_BLOCK_ID:
                missing.append(b)
                lacking += 1
            else:
                remote_ids.append(r)
                local_ids.append(b)
                per_group[-1] += 1
        if lacking:
            logger.error("KVBridgeConnector: request %s: KV cache group %d: the producer has "
                         "no block for %d of the %d blocks needed here; they are load errors",
                         request_id, g, lacking, len(loc))
    return remote_ids, local_ids, missing, per_group
