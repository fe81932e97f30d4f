# SPDX-License-Identifier: Apache-2.0
"""Worker side of KVBridgeConnector (runs where the KV tensors live).

It wraps the engine's paged KV tensors in a ``PagedKVCache`` with the layout
derived from vLLM's config and the real tensors, and drives one kvbridge
``Transport`` - the same core the custom-engine API uses:

* producer: reports finished prefills ``finished_sending`` once its transport
  let their blocks go (read, released, expired or refused); the scheduler
  published them;
* consumer: pulls the blocks of requests the scheduler scheduled for loading,
  reports them ``finished_recving`` when done, and every block of a failed
  pull through ``get_block_ids_with_load_errors`` so vLLM's
  ``kv_load_failure_policy`` (``fail`` or ``recompute``) applies.

vLLM's contract, as its scheduler enforces it (``Scheduler.
_update_from_kv_xfer_finished``, ``_handle_invalid_blocks``,
``finish_requests`` in vLLM 0.32) - break one and the engine dies on an
assert, so each is a rule of the state machine below and has a test:

1. A request is reported ``finished_recving`` exactly once, and only one vLLM
   waits on (``WAITING_FOR_REMOTE_KVS``): it came as a ``RecvSpec``. Hand-backs
   (``ReleaseSpec``) never reach vLLM.
2. A request vLLM aborts while its pull runs stays allocated in vLLM until we
   report it (vLLM delays freeing its blocks): the pull is cancelled, the
   request is reported once the pull has stopped writing, and the producer is
   told to free its blocks.
3. A failed load's blocks go to ``get_block_ids_with_load_errors`` in the same
   pass that reports the request, once - only the corrupted ones when the
   checksums name them (vLLM recomputes from the first), all of them otherwise.
   Under tensor parallelism a load is one pull per producer rank this rank
   reads (``KVAgent.pull_sharded``); it is reported once every pull has
   stopped, and if one fails the others are cancelled and the request fails
   whole - never half a request. With several KV cache groups (hybrid
   models) failures are reported by request (``failed_recving``), since
   block ids are unique per group only.
4. A request is reported ``finished_sending`` exactly once, only after vLLM
   handed it over (``SendSpec``: ``request_finished`` returned True), and once
   no consumer can read its blocks any more: read, released, expired, or
   refused when this rank's transport could not publish it.

Sleep mode (vLLM >= 0.33): ``unregister_kv_caches`` closes the transport, the
only holder of the KV cache's memory (its listener, NIXL's registrations,
running pulls), so vLLM can free the cache; ``restore_kv_caches`` serves the
same regions again, on the same port and with the same producer identity, so
the scheduler's handshake metadata stays true. In between every hook keeps
the rules above: a pull that was running or arrives is a failed load, a
request handed over is reported sent (no consumer can read it any more).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vllm.logger import init_logger

from kvbridge.cache import kernels
from kvbridge.agent import KVAgent
from kvbridge.errors import ErrorCode, code_of
from kvbridge.cache.blocks import PagedKVCache
from kvbridge.cache.mirror import HostMirror
from kvbridge.transport import TransferHandle, TransferState
from kvbridge.vllm.config import KVBridgeConfig
from kvbridge.vllm.metadata import (
    KVBridgeConnectorMetadata,
    KVBridgeHandshakeMetadata,
    KVBridgeWorkerMetadata,
    RecvSpec,
)
from kvbridge.vllm.sends import SendTracker
from kvbridge.vllm.stats import KVBridgeKVConnectorStats
from kvbridge.vllm.layout import (
    distinct_layer_names,
    layout_from_vllm,
    ordered_kv_regions,
    ordered_layer_names,
)

if TYPE_CHECKING:
    import torch
    from vllm.config import VllmConfig

logger = init_logger(__name__)


@dataclass
class _Load:
    """A load vLLM waits on: one pull per producer rank this rank reads
    (``KVAgent.pull_sharded``; one when both sides have the same TP size).
    ``handles`` is empty when it failed before it could start (``error``
    says why); ``aborted``: vLLM finished the request."""

    spec: RecvSpec
    handles: list[TransferHandle] = field(default_factory=list)
    error: str | None = None
    error_code: ErrorCode | None = None
    #: producer ranks read or handed back: where a release goes
    peers: list[str] = field(default_factory=list)
    aborted: bool = False

    def done(self) -> bool:
        return all(h.done() for h in self.handles)

    def ok(self) -> bool:
        return bool(self.handles) and all(h.state == TransferState.DONE for h in self.handles)


class KVBridgeWorker:
    def __init__(self, vllm_config: VllmConfig, engine_id: str, kv_cache_config=None):
        self.vllm_config = vllm_config
        self.kv_cache_config = kv_cache_config
        #: several KV cache groups (hybrid models, vLLM's HMA): block ids are
        #: unique per group only, so a failed load is reported by request
        #: (``failed_recving``), never by block id
        self.multi_group = len(getattr(kv_cache_config, "kv_cache_groups", None) or ()) > 1
        self._failed_recving: set[str] = set()
        self.config = KVBridgeConfig.from_vllm(vllm_config)
        self.engine_id = engine_id
        self.agent: KVAgent | None = None
        self.cache: PagedKVCache | None = None
        #: consumer: requests vLLM waits on, until reported received (rules 1-3)
        self._loads: dict[str, _Load] = {}
        self._load_errors: set[int] = set()
        #: producer: requests vLLM handed over, until reported sent (rule 4)
        self.sends = SendTracker()
        self._stats = KVBridgeKVConnectorStats()
        self._finished_transfers: dict[str, tuple[int, float, int]] = {}
        self._tp_rank = 0
        #: host mirror of a device KV cache (see config: host_staging)
        self.mirror: HostMirror | None = None
        self._mirror_reported: tuple[int, int, float] = (0, 0, 0.0)
        #: the transport's (handshakes, handshake_seconds) already reported
        self._handshakes_reported: tuple[int, float] = (0, 0.0)
        #: the transport's producer connections by medium already reported
        self._media_reported: dict[str, int] = {}
        #: sleep mode: the transport is closed until restore_kv_caches
        self.kv_unregistered = False
        #: this step computes no token (``KVBridgeConnectorMetadata.idle_step``)
        self._idle_step = False

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

        try:
            self._tp_rank = get_tensor_model_parallel_rank()
        except Exception:  # noqa: BLE001 - not initialised in some test setups
            self._tp_rank = 0
        layout = layout_from_vllm(self.vllm_config, kv_caches,
                                  kv_cache_config=self.kv_cache_config)
        # Layers of different KV cache groups share memory under vLLM's hybrid
        # allocator: each distinct tensor is one region, moved once.
        kv_caches = {n: kv_caches[n] for n in distinct_layer_names(kv_caches)}
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
        address = self._start_agent()
        logger.info("KVBridgeConnector worker: %s transport, layout %s (%s), %d blocks x %d B "
                    "x %d regions%s%s", self.config.transport, layout.fingerprint(),
                    layout.memory_layout, self.cache.num_blocks, layout.block_bytes,
                    layout.num_regions, f", serving on {address}" if address else "",
                    f", staged through a {self.mirror.nbytes / 2**30:.2f} GiB host mirror"
                    if self.mirror else "")

    def _start_agent(self, instance_id: str | None = None) -> str | None:
        """Open this rank's transport over ``self.cache``; a producer serves on
        its rank's port and returns its address."""
        tc = self.config.transport_config
        tc.port = self.config.base_port + self._tp_rank if self.config.is_producer else 0
        self.agent = KVAgent(self.cache, transport=self.config.transport, config=tc,
                             name=f"{self.engine_id}-tp{self._tp_rank}", host_mirror=self.mirror,
                             instance_id=instance_id)
        return self.agent.serve() if self.config.is_producer else None

    def unregister_kv_caches(self) -> None:
        """Sleep mode: let go of the KV cache so vLLM can free it (idempotent).

        vLLM drains its own transfers first, but a producer's leases outlive
        steps and a consumer's pull may still run: closing the transport fails
        those pulls ("transport closed"; reported as failed loads by
        ``get_finished``) and drops the leases, so the requests handed over are
        reported sent at the next ``get_finished``."""
        if self.agent is None or self.kv_unregistered:
            return
        self.kv_unregistered = True
        self.agent.close()
        dropped = self.sends.drop_all()
        logger.info("KVBridgeConnector: transport closed for sleep mode (%d loads failing, "
                    "%d published requests dropped)", len(self._loads), dropped)

    def restore_kv_caches(self) -> None:
        """Wake-up: serve the KV cache again (idempotent). The producer keeps
        its identity and port: the scheduler advertises both to consumers
        (``handshake_metadata``) and is not asked again."""
        if not self.kv_unregistered:
            return
        assert self.agent is not None
        address = self._start_agent(instance_id=self.agent.instance_id)
        # The new transport counts its handshakes (and connections) from zero.
        self._handshakes_reported = (0, 0.0)
        self._media_reported = {}
        self.kv_unregistered = False
        logger.info("KVBridgeConnector: transport restored after sleep mode%s",
                    f", serving on {address}" if address else "")

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
                                         self.cache.layout.to_dict(), self.agent.instance_id)

    def start_load_kv(self, meta: KVBridgeConnectorMetadata) -> None:
        assert self.agent is not None
        for req_id, spec in meta.reqs_to_send.items():
            self._start_send(req_id, spec.stream_id, spec.aborted)
        self.sends.start_step(meta.reqs_to_stream)
        for stream_id in meta.streams_to_end if not self.kv_unregistered else ():
            self.agent.release(stream_id, before_publish=True)
        # Asleep, nothing can be handed back: the producer's lease expires.
        for spec in meta.reqs_to_release if not self.kv_unregistered else ():
            try:
                peers = self.agent.producer_ranks(spec.addresses)
            except Exception as e:  # noqa: BLE001 - an unpairable producer: nothing to free
                logger.warning("KVBridgeConnector: cannot hand back request %s: %s",
                               spec.remote_request_id, e)
                continue
            for peer in peers:
                self.agent.release_remote(peer, spec.remote_request_id, spec.reason)
            self._stats.bump("num_released")
        for req_id, spec in meta.reqs_to_recv.items():
            self._start_load(req_id, spec)
        self._idle_step = meta.idle_step
        if not self._idle_step:
            self._yield_to_transport()  # an idle step waits in get_finished

    def _wait_if_idle(self) -> None:
        """A step that computes nothing, while transfers are in flight, waits
        for one to finish - up to ``idle_wait_ms``, returning the moment one
        does - rather than let vLLM spin through empty steps (see
        ``idle_wait_ms`` in ``kvbridge.vllm.config``). Then clears the
        transport's progress event: the polls that follow see what happened,
        and whatever happens later wakes the next wait."""
        pending = bool(self._loads or self.sends) and not self.kv_unregistered
        if self._idle_step and pending and self.config.idle_wait_s:
            self.agent.wait_progress(self.config.idle_wait_s)
        else:
            self.agent.wait_progress(0)

    def _yield_to_transport(self) -> None:
        """While transfers are in flight, let kvbridge's threads have the GIL
        (see ``step_yield_ms`` in ``kvbridge.vllm.config``): vLLM's worker
        busy-waits for the next step in a way that starves other threads."""
        if self.config.step_yield_s and (self._loads or self.sends):
            time.sleep(self.config.step_yield_s)

    # -- producer (rule 4; kvbridge.vllm.sends) --
    def wait_for_save(self) -> None:
        """After the step's forward pass: publish what it computed of each
        streamed request (``kvbridge.vllm.stream``)."""
        if not self.kv_unregistered:
            self.sends.publish_step(self.agent, self._stats)

    def _start_send(self, req_id: str, stream_id: str | None = None,
                    aborted: bool = False) -> None:
        if self.sends.start(None if self.kv_unregistered else self.agent, req_id, stream_id,
                            aborted):
            self._stats.bump("num_published")

    # -- consumer (rules 1-3) --
    def _start_load(self, req_id: str, spec: RecvSpec) -> None:
        if req_id in self._loads:
            logger.warning("KVBridgeConnector: request %s is already loading; ignoring a "
                           "second load for it", req_id)
            return
        load = _Load(spec)
        self._loads[req_id] = load
        if self.kv_unregistered:
            load.error = "the KV cache is unregistered (vLLM sleep mode)"
            return
        try:
            # This rank's heads from whichever producer ranks hold them (any
            # two TP sizes; kvbridge.cache.shard), all pulls at once.
            load.peers = self.agent.producer_ranks(spec.addresses)
            if spec.positions:
                load.handles = self._pull_streamed(spec)
            else:
                load.handles = self.agent.pull_sharded(
                    spec.addresses, spec.remote_request_id, spec.remote_block_ids,
                    spec.local_block_ids, instance_ids=spec.instance_ids)
        except Exception as e:  # noqa: BLE001 - bad ids, unpairable TP: a load error
            load.error = f"{type(e).__name__}: {e}"
            load.error_code = code_of(e)

    def _pull_streamed(self, spec: RecvSpec) -> list[TransferHandle]:
        """A streamed request: every chunk's pull at once, by position; the
        producer grants each once its prefill computed the chunk's blocks."""
        n, step = len(spec.local_block_ids), self.config.stream_chunk_blocks
        handles: list[TransferHandle] = []
        for i in range(0, n, step):
            handles += self.agent.pull_sharded(
                spec.addresses, spec.remote_request_id, spec.remote_block_ids[i:i + step],
                spec.local_block_ids[i:i + step], instance_ids=spec.instance_ids,
                positions=True, final=i + step >= n)
        return handles

    def get_finished(self, finished_req_ids: set[str] | None = None,
                     ) -> tuple[set[str] | None, set[str] | None]:
        assert self.agent is not None
        self._wait_if_idle()
        # Rule 2: aborted while loading - stop the pull; vLLM keeps the blocks
        # until we report the request below.
        for req_id in (finished_req_ids or set()) & self._loads.keys():
            load = self._loads[req_id]
            if not load.aborted:
                load.aborted = True
                for handle in load.handles:
                    handle.cancel()
        done_recving: set[str] = set()
        for req_id, load in list(self._loads.items()):
            if not load.done():
                if any(h.done() and h.state != TransferState.DONE for h in load.handles):
                    # One rank's pull failed: the request fails whole, so stop
                    # the others; it is reported once they stopped writing.
                    for handle in load.handles:
                        handle.cancel()
                continue
            del self._loads[req_id]
            done_recving.add(req_id)
            self._finish_load(req_id, load)
        done_sending = self.sends.poll(None if self.kv_unregistered else self.agent,
                                       self._stats)
        if not self._idle_step:
            self._yield_to_transport()
        return done_sending or None, done_recving or None

    def _finish_load(self, req_id: str, load: _Load) -> None:
        spec = load.spec
        if load.aborted:
            self._stats.bump("num_aborted_loads")
            if not load.ok() and not self.kv_unregistered:
                for peer in load.peers:
                    self.agent.release_remote(peer, spec.remote_request_id, "aborted")
            return
        if load.ok():
            nbytes = sum(h.nbytes for h in load.handles)
            seconds = max(h.duration_s or 0.0 for h in load.handles)
            self._stats.record_transfer(nbytes, seconds, len(spec.local_block_ids))
            self._finished_transfers[req_id] = (nbytes, seconds, len(spec.local_block_ids))
            # Rule 3: blocks the producer never sent (logged when scheduled).
            self._report_load_error(req_id, spec.missing_local_ids)
            return
        failed = [h for h in load.handles if h.state != TransferState.DONE]
        self._stats.record_failure(_failure_reason(load, failed))
        bad = list(spec.local_block_ids)
        if failed and all(h.invalid_local_ids for h in failed):
            self._stats.bump("num_checksum_failures")
            bad = sorted({b for h in failed for b in h.invalid_local_ids})
        self._report_load_error(req_id, bad + list(spec.missing_local_ids))
        errors = [f"{h.peer}: [{h.error_code}] {h.error}" for h in failed if h.error] \
            or [load.error]
        logger.error("KVBridgeConnector: load of request %s failed: %s (remote request %s, "
                     "%d of %d blocks reported as load errors)", req_id, "; ".join(
                         e for e in errors if e), spec.remote_request_id,
                     len(bad) + len(spec.missing_local_ids),
                     len(spec.local_block_ids) + len(spec.missing_local_ids))

    def _report_load_error(self, req_id: str, block_ids) -> None:
        """Rule 3, by block id - or by request when the engine has several KV
        cache groups (block ids are unique per group only)."""
        if not block_ids:
            return
        if self.multi_group:
            self._failed_recving.add(req_id)
        else:
            self._load_errors.update(block_ids)

    def failed_recving(self) -> set[str]:
        """Requests reported received this pass whose load failed (several KV
        cache groups only; see ``_report_load_error``)."""
        out, self._failed_recving = self._failed_recving, set()
        return out

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
        if self.agent is not None:
            # The transport times its handshakes (on its own threads) and
            # counts since start; report what this interval added. Its stats
            # object, not metrics(): this runs every step.
            transport_stats = self.agent.transport.stats
            now_hs = (transport_stats.handshakes, transport_stats.handshake_seconds)
            last_hs = self._handshakes_reported
            if now_hs[0] != last_hs[0]:
                self._stats.bump("num_handshakes", now_hs[0] - last_hs[0])
                self._stats.bump("handshake_seconds", now_hs[1] - last_hs[1])
                self._handshakes_reported = now_hs
            # Which medium each new producer connection took (what auto chose).
            for medium, n in list(transport_stats.media.items()):
                if n != self._media_reported.get(medium, 0):
                    self._stats.record_connections(medium, n - self._media_reported.get(medium, 0))
                    self._media_reported[medium] = n
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
        out, self._stats = self._stats, KVBridgeKVConnectorStats()
        return out

    def shutdown(self) -> None:
        if self.agent is not None:
            t0 = time.monotonic()
            self.agent.close()
            logger.info("KVBridgeConnector worker shut down in %.1f ms",
                        1e3 * (time.monotonic() - t0))


def _failure_reason(load: _Load, failed: list[TransferHandle]) -> ErrorCode:
    """The one ``ErrorCode`` a failed load is counted under: that of the pull
    that failed first. The request's other pulls were cancelled because of
    it, so their ``cancelled`` names no cause; it counts only when no pull
    failed for another reason."""
    if not load.handles:
        return load.error_code or ErrorCode.TRANSFER
    by_time = sorted(failed, key=lambda h: h.finished_at or float("inf"))
    for handle in by_time:
        if handle.error_code not in (None, ErrorCode.CANCELLED):
            return handle.error_code
    return next((h.error_code for h in by_time if h.error_code), ErrorCode.TRANSFER)
