# SPDX-License-Identifier: Apache-2.0
"""Worker side of KVBridgeConnector (runs where the KV tensors live).

It wraps the engine's paged KV tensors in a ``PagedKVCache`` with the layout
derived from vLLM's config and the real tensors, and drives one kvbridge
``Transport`` - the same core the custom-engine API uses:

* producer: publishes finished prefills' blocks and reports them
  ``finished_sending`` once read, released or expired;
* consumer: pulls the blocks of requests the scheduler scheduled for loading,
  reports them ``finished_recving`` when done, and every block of a failed
  pull through ``get_block_ids_with_load_errors`` so vLLM's
  ``kv_load_failure_policy`` (``fail`` or ``recompute``) applies.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from vllm.logger import init_logger

from kvbridge import kernels
from kvbridge.agent import KVAgent
from kvbridge.blocks import HostMirror, PagedKVCache
from kvbridge.transport import TransferHandle, TransferState
from kvbridge.vllm.config import KVBridgeConfig
from kvbridge.vllm.metadata import (
    KVBridgeConnectorMetadata,
    KVBridgeHandshakeMetadata,
    KVBridgeWorkerMetadata,
)
from kvbridge.vllm.stats import KVBridgeKVConnectorStats
from kvbridge.vllm_layout import layout_from_vllm, ordered_kv_regions, ordered_layer_names

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig

logger = init_logger(__name__)


class KVBridgeWorker:
    def __init__(self, vllm_config: VllmConfig, engine_id: str):
        self.vllm_config = vllm_config
        self.config = KVBridgeConfig.from_vllm(vllm_config)
        self.engine_id = engine_id
        self.agent: KVAgent | None = None
        self.cache: PagedKVCache | None = None
        self._recving: dict[str, tuple[TransferHandle, list[int]]] = {}
        self._load_errors: set[int] = set()
        self._published: set[str] = set()
        #: requests whose publish failed: reported sent at once so vLLM frees them
        self._unpublishable: set[str] = set()
        #: released (read/expired) -> reason, until this worker's step knows them
        self._released: dict[str, str] = {}
        self._stats = KVBridgeKVConnectorStats()
        self._finished_transfers: dict[str, tuple[int, float, int]] = {}
        self._tp_rank = 0
        #: host mirror of a device KV cache (see config: host_staging)
        self.mirror: HostMirror | None = None
        self._mirror_reported: tuple[int, int, float] = (0, 0, 0.0)

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        try:
            self._tp_rank = get_tensor_model_parallel_rank()
        except Exception:  # noqa: BLE001 - not initialised in some test setups
            self._tp_rank = 0
        layout = layout_from_vllm(self.vllm_config, kv_caches)
        if layout.tp_rank != self._tp_rank:
            layout = type(layout)(**{**layout.to_dict(), "tp_rank": self._tp_rank})
        on_host = next(iter(kv_caches.values())).device.type == "cpu"
        staging = self.config.host_staging
        if staging == "false" and not on_host:
            raise ValueError("KVBridgeConnector: the KV cache is in GPU memory, which the "
                             f"{self.config.transport} transport cannot address; set "
                             "kv_connector_extra_config.host_staging to auto or true")
        if staging == "true" or (staging == "auto" and not on_host):
            names = ordered_layer_names(kv_caches)
            self.mirror = HostMirror({n: kv_caches[n] for n in names})
            regions = self.mirror.host_regions(names)
        else:
            regions = ordered_kv_regions(kv_caches)
        self.cache = PagedKVCache(layout, regions)
        tc = self.config.transport_config
        tc.port = self.config.base_port + self._tp_rank if self.config.is_producer else 0
        self.agent = KVAgent(self.cache, transport=self.config.transport, config=tc,
                             name=f"{self.engine_id}-tp{self._tp_rank}", host_mirror=self.mirror)
        address = self.agent.serve() if self.config.is_producer else None
        logger.info("KVBridgeConnector worker: %s transport, layout %s (%s), %d blocks x %d B "
                    "x %d regions%s%s", self.config.transport, layout.fingerprint(),
                    layout.memory_layout, self.cache.num_blocks, layout.block_bytes,
                    layout.num_regions, f", serving on {address}" if address else "",
                    f", staged through a {self.mirror.nbytes / 2**30:.2f} GiB host mirror"
                    if self.mirror else "")

    def set_host_xfer_buffer_ops(self, copy_operation) -> None:
        """vLLM's device<->host block copy. kvbridge's own kernel does this job
        (one launch for every layer); vLLM's op is used when that kernel is
        not built or cannot run here."""
        if self.mirror is None or copy_operation is None:
            return
        on_gpu = any(t.device.type == "cuda" for t in self.mirror.device_kv_caches.values())
        if on_gpu and not kernels.cuda_kernel_usable():
            self.mirror.copy_op = copy_operation
            logger.info("KVBridgeConnector: kvbridge's CUDA kernel is not available; host "
                        "staging uses vLLM's block copy op")
        else:
            self.mirror.copy_op = None  # kvbridge's kernels

    def handshake_metadata(self) -> KVBridgeHandshakeMetadata | None:
        if self.cache is None:
            return None
        address = self.agent.address if self.config.is_producer else None
        return KVBridgeHandshakeMetadata(address, self.cache.layout.fingerprint(),
                                         self.cache.layout.to_dict())

    def start_load_kv(self, meta: KVBridgeConnectorMetadata) -> None:
        assert self.agent is not None
        for req_id, spec in meta.reqs_to_send.items():
            # The scheduler usually published it already over the control
            # connection; publishing again is a no-op (and never revives a
            # request that was read or released meanwhile).
            try:
                self.agent.publish(req_id, spec.block_ids, num_tokens=spec.num_tokens)
                self._stats.bump("num_published")
                self._published.add(req_id)
            except Exception as e:  # noqa: BLE001 - never strand the blocks
                logger.error("KVBridgeConnector: cannot publish request %s: %s; freeing its "
                             "blocks", req_id, e)
                self._unpublishable.add(req_id)
        for req_id, spec in meta.reqs_to_recv.items():
            if len(spec.addresses) <= self._tp_rank:
                logger.error("KVBridgeConnector: request %s: producer has %d ranks, this is "
                             "rank %d", req_id, len(spec.addresses), self._tp_rank)
                self._load_errors.update(spec.local_block_ids)
                self._recving[req_id] = (None, spec.local_block_ids)
                continue
            handle = self.agent.pull_blocks(spec.addresses[self._tp_rank],
                                            spec.remote_request_id, spec.remote_block_ids,
                                            spec.local_block_ids)
            self._recving[req_id] = (handle, spec.local_block_ids)

    def get_finished(self) -> tuple[set[str] | None, set[str] | None]:
        assert self.agent is not None
        done_recving: set[str] = set()
        for req_id, (handle, local_ids) in list(self._recving.items()):
            if handle is not None and not handle.done():
                continue
            del self._recving[req_id]
            done_recving.add(req_id)
            if handle is None:
                self._stats.record_failure()
                continue
            if handle.state == TransferState.DONE:
                self._stats.record_transfer(handle.nbytes, handle.duration_s or 0.0)
                self._finished_transfers[req_id] = (handle.nbytes, handle.duration_s or 0.0,
                                                    len(local_ids))
            else:
                self._stats.record_failure()
                self._load_errors.update(local_ids)
                logger.error("KVBridgeConnector: load of request %s failed (%s): %s; %d blocks "
                             "reported as load errors", req_id, handle.state.value, handle.error,
                             len(local_ids))
        done_sending: set[str] = set(self._unpublishable)
        self._unpublishable.clear()
        for req_id, reason in self.agent.poll_released():
            self._released[req_id] = reason
            if reason == "expired":
                self._stats.bump("num_expired_leases")
        # A request can be read before this worker's step saw it (the scheduler
        # published it directly): report it once both are known.
        for req_id in [r for r in self._released if r in self._published]:
            del self._released[req_id]
            self._published.discard(req_id)
            done_sending.add(req_id)
        return done_sending or None, done_recving or None

    def build_worker_meta(self) -> KVBridgeWorkerMetadata | None:
        if not self._finished_transfers:
            return None
        meta = KVBridgeWorkerMetadata(self._finished_transfers)
        self._finished_transfers = {}
        return meta

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def get_kv_connector_stats(self) -> KVBridgeKVConnectorStats | None:
        if self.mirror is not None:
            # The mirror counts since start; report what this interval added.
            now = (self.mirror.blocks_to_host, self.mirror.blocks_to_device, self.mirror.seconds)
            last = self._mirror_reported
            self._stats.bump("staged_to_host", now[0] - last[0])
            self._stats.bump("staged_to_device", now[1] - last[1])
            self._stats.bump("staging_seconds", now[2] - last[2])
            self._mirror_reported = now
        if self._stats.is_empty():
            return None
        out = KVBridgeKVConnectorStats(data=dict(self._stats.data))
        self._stats.reset()
        return out

    def shutdown(self) -> None:
        if self.agent is not None:
            t0 = time.monotonic()
            self.agent.close()
            logger.info("KVBridgeConnector worker shut down in %.1f ms",
                        1e3 * (time.monotonic() - t0))
