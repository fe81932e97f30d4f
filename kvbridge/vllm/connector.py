# SPDX-License-Identifier: Apache-2.0
"""KVBridgeConnector: a thin facade over the scheduler- and worker-side classes.

vLLM builds one instance per role, in different processes: the scheduler role
gets ``KVBridgeScheduler``, the worker role ``KVBridgeWorker``. Every hook
asserts it runs in the role it belongs to and delegates.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    SupportsHMA,
)

try:  # vLLM >= 0.32: failures by request, for engines with several KV cache groups
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorTransferResults
except ImportError:  # pragma: no cover - older vLLM: one group only
    KVConnectorTransferResults = None

from vllm.version import __version__ as VLLM_VERSION

from kvbridge.vllm import compat
from kvbridge.vllm.metadata import KVBridgeConnectorMetadata, KVBridgeHandshakeMetadata
from kvbridge.vllm.scheduler import KVBridgeScheduler
from kvbridge.vllm.stats import KVBridgeKVConnectorStats, KVBridgePromMetrics
from kvbridge.vllm.worker import KVBridgeWorker

# Refuse to load, naming the supported vLLM range, when this vLLM lacks a hook
# the connector cannot work without; hooks are detected by presence.
compat.check_vllm(KVConnectorBase_V1, VLLM_VERSION)

if TYPE_CHECKING:
    import torch
    from vllm.config import KVTransferConfig, VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request


class KVBridgeConnector(KVConnectorBase_V1, SupportsHMA):
    """vLLM KV connector moving prefill KV to decode with kvbridge transports.

    ``SupportsHMA``: vLLM keeps its hybrid KV cache manager on (sliding-window
    layers keep only their window's blocks) and hands over one block list per
    KV cache group (``request_finished_all_groups``).

    Args:
        vllm_config: the engine config; ``kv_transfer_config`` must be set.
        role: scheduler or worker.
        kv_cache_config: the engine's KV cache config.
    """

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole,
                 kv_cache_config: KVCacheConfig | None = None):
        super().__init__(vllm_config, role, kv_cache_config)
        ktc = vllm_config.kv_transfer_config
        assert ktc is not None
        self.engine_id = ktc.engine_id or "kvbridge"
        self.connector_scheduler: KVBridgeScheduler | None = None
        self.connector_worker: KVBridgeWorker | None = None
        if role == KVConnectorRole.SCHEDULER:
            self.connector_scheduler = KVBridgeScheduler(vllm_config, self.engine_id,
                                                         kv_cache_config)
        else:
            self.connector_worker = KVBridgeWorker(vllm_config, self.engine_id, kv_cache_config)
        self._num_groups = len(getattr(kv_cache_config, "kv_cache_groups", None) or ()) or 1

    # ---------------------------------------------------------------- class hooks
    @classmethod
    def get_required_kvcache_layout(cls, vllm_config: VllmConfig) -> str | None:
        # Whole blocks move; any block-contiguous layout works as long as both
        # sides agree, which the layout handshake checks.
        return None

    @classmethod
    def supports_sleep_mode(cls, kv_transfer_config: KVTransferConfig) -> bool:
        # vLLM >= 0.33 asks before it enables sleep mode. The worker lets go
        # of the KV cache in unregister_kv_caches and takes it back in
        # restore_kv_caches, with every transport.
        return True

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None):
        return KVBridgeKVConnectorStats(data=data) if data is not None \
            else KVBridgeKVConnectorStats()

    @classmethod
    def build_prom_metrics(cls, vllm_config: VllmConfig, metric_types: dict,
                           labelnames: list[str],
                           per_engine_labelvalues: dict[int, list[object]],
                           ) -> KVBridgePromMetrics:
        # vLLM's Prometheus stat logger (API server process): vllm:kvbridge_*
        return KVBridgePromMetrics(vllm_config, metric_types, labelnames,
                                   per_engine_labelvalues)

    # ---------------------------------------------------------------- scheduler side
    def get_num_new_matched_tokens(self, request: Request,
                                   num_computed_tokens: int) -> tuple[int | None, bool]:
        assert self.connector_scheduler is not None
        return self.connector_scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks,
                                 num_external_tokens: int) -> None:
        assert self.connector_scheduler is not None
        self.connector_scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        assert self.connector_scheduler is not None
        return self.connector_scheduler.build_connector_meta(scheduler_output)

    def request_finished(self, request: Request,
                         block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        assert self.connector_scheduler is not None
        return self.connector_scheduler.request_finished(request, block_ids)

    def request_finished_all_groups(self, request: Request, block_ids: tuple[list[int], ...],
                                    ) -> tuple[bool, dict[str, Any] | None]:
        assert self.connector_scheduler is not None
        return self.connector_scheduler.request_finished(request, block_ids)

    def get_loaded_kv_cache_group_ids(self, request: Request) -> tuple[int, ...]:
        # A load moves the request's own blocks of every group.
        return tuple(range(self._num_groups))

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        assert self.connector_scheduler is not None
        self.connector_scheduler.update_connector_output(connector_output)

    def set_xfer_handshake_metadata(self, metadata: dict[int, Any]) -> None:
        assert self.connector_scheduler is not None
        self.connector_scheduler.set_xfer_handshake_metadata(metadata)

    # ---------------------------------------------------------------- worker side
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        assert self.connector_worker is not None
        self.connector_worker.register_kv_caches(kv_caches)

    def unregister_kv_caches(self) -> None:
        # vLLM >= 0.33, before sleep mode frees the KV cache.
        assert self.connector_worker is not None
        self.connector_worker.unregister_kv_caches()

    def restore_kv_caches(self) -> None:
        # vLLM >= 0.33, after wake-up mapped the KV cache again.
        assert self.connector_worker is not None
        self.connector_worker.restore_kv_caches()

    def set_host_xfer_buffer_ops(self, copy_operation) -> None:
        assert self.connector_worker is not None
        self.connector_worker.set_host_xfer_buffer_ops(copy_operation)

    def get_handshake_metadata(self) -> KVBridgeHandshakeMetadata | None:
        assert self.connector_worker is not None
        return self.connector_worker.handshake_metadata()

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        assert self.connector_worker is not None
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVBridgeConnectorMetadata)
        self.connector_worker.start_load_kv(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        # Pulls are whole-request and asynchronous: a request is scheduled only
        # after get_finished reported its blocks loaded.
        return

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor,
                      attn_metadata: AttentionMetadata, **kwargs: Any) -> None:
        # Consumers read the producer's blocks in place; nothing to save.
        return

    def wait_for_save(self) -> None:
        # Streamed requests: publish what this step's forward pass computed.
        if self.connector_worker is not None:
            self.connector_worker.wait_for_save()

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None,
                                                                set[str] | None]:
        assert self.connector_worker is not None
        return self.connector_worker.get_finished(finished_req_ids)

    def get_transfer_results(self, finished_req_ids: set[str]):
        assert self.connector_worker is not None
        sending, recving = self.connector_worker.get_finished(finished_req_ids)
        failed = self.connector_worker.failed_recving()
        return KVConnectorTransferResults(finished_sending=set(sending or ()),
                                          finished_recving=set(recving or ()),
                                          failed_recving=failed)

    def build_connector_worker_meta(self):
        assert self.connector_worker is not None
        return self.connector_worker.build_worker_meta()

    def get_block_ids_with_load_errors(self) -> set[int]:
        assert self.connector_worker is not None
        return self.connector_worker.get_block_ids_with_load_errors()

    def get_kv_connector_stats(self):
        if self.connector_worker is None:
            return None
        return self.connector_worker.get_kv_connector_stats()

    def shutdown(self) -> None:
        if self.connector_worker is not None:
            self.connector_worker.shutdown()
        if self.connector_scheduler is not None:
            self.connector_scheduler.shutdown()
