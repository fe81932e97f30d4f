# SPDX-License-Identifier: Apache-2.0
"""The engine API: kvbridge for any engine, not only vLLM.

An engine with a paged KV cache describes it (per-layer tensors plus a
``KVLayout`` built from plain numbers), creates a ``KVAgent`` with a transport,
and then

* as a **producer** (the prefill side): ``serve()``, ``publish(request_id,
  block_ids)`` -> a ``KVTicket`` to hand to the consumer (over any channel),
  ``poll_released()`` to learn which requests' blocks it may free, and
  ``release(request_id)`` on abort;
* as a **consumer** (the decode side): ``pull(ticket, local_block_ids)`` (or
  ``pull_blocks(peer, request_id, remote_ids, local_ids)``) -> a
  ``TransferHandle`` to poll, wait on or ``await``.

``KVAgent`` is the only entry point: vLLM's ``KVBridgeConnector`` uses it too,
so handshake, layout checks, leases and transfers exist once. See
``docs/custom-engine.md`` and ``examples/custom_engine/``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import msgspec

from kvbridge.cache.blocks import PagedKVCache
from kvbridge.cache.mirror import HostMirror
from kvbridge.layout import KVLayout
from kvbridge.cache.shard import plan_reads, unread_ranks
from kvbridge.transport import DEFAULT as DEFAULT_TRANSPORT
from kvbridge.transport import TransferHandle, Transport, TransportConfig, create_transport

if TYPE_CHECKING:
    import torch


class KVTicket(msgspec.Struct, frozen=True):
    """What a consumer needs to pull one request's blocks from a producer.

    Serializable (``to_json``/``from_json``) so an engine can pass it through
    a pipe, an HTTP response or a queue.
    """

    address: str
    request_id: str
    block_ids: list[int]
    num_tokens: int | None
    layout_fingerprint: str
    transport: str
    #: the producer process (``Transport.instance_id``): a pull that finds
    #: another process at ``address`` (a restart) fails at once
    instance_id: str | None = None

    def to_json(self) -> bytes:
        return msgspec.json.encode(self)

    @classmethod
    def from_json(cls, data: bytes | str) -> KVTicket:
        return msgspec.json.decode(data, type=cls)


class KVAgent:
    """One engine's endpoint for KV transfer.

    Args:
        kv_cache: the engine's ``PagedKVCache``, or a list of per-layer tensors
            together with ``layout``.
        layout: required when ``kv_cache`` is a list of tensors.
        transport: ``"auto"`` (default: cma to producers of this host, tcp to
            the rest, per producer; nixl where RDMA is present), ``"tcp"``,
            ``"cma"`` (same host) or ``"nixl"``.
        config: transport tunables (``TransportConfig``; defaults documented
            there).
        name: agent name for logs and NIXL.
        host_mirror: when the engine's KV cache is in GPU memory: the
            ``HostMirror`` that ``kv_cache`` wraps. Blocks are then copied
            device -> mirror before a publish makes them readable, and mirror
            -> device before a pull counts as done.
        instance_id: the producer identity to keep when the same process
            reopens its transport over the same cache (vLLM's sleep mode);
            default: a new one.
    """

    def __init__(self, kv_cache: PagedKVCache | Sequence[torch.Tensor],
                 layout: KVLayout | None = None, *, transport: str = DEFAULT_TRANSPORT,
                 config: TransportConfig | None = None, name: str | None = None,
                 host_mirror: HostMirror | None = None, instance_id: str | None = None):
        if not isinstance(kv_cache, PagedKVCache):
            if layout is None:
                raise ValueError("pass a KVLayout with plain tensors")
            kv_cache = PagedKVCache(layout, list(kv_cache))
        self.cache = kv_cache
        self.layout = kv_cache.layout
        self.host_mirror = host_mirror
        self.transport: Transport = create_transport(transport, kv_cache, config,
                                                     agent_name=name)
        if instance_id is not None:
            self.transport.instance_id = instance_id
        if host_mirror is not None:
            mirrored = {t.data_ptr() for t in host_mirror.host_regions()}
            if any(r.data_ptr() not in mirrored for r in kv_cache.regions):
                raise ValueError("kv_cache must wrap host_mirror.host_regions()")
            self.transport.before_publish = host_mirror.to_host
            self.transport.after_pull = host_mirror.to_device

    # ------------------------------------------------------------------ producer
    def serve(self) -> str:
        """Start listening for consumers; returns ``host:port``."""
        return self.transport.serve()

    @property
    def address(self) -> str:
        return self.transport.address

    def publish(self, request_id: str, block_ids: Sequence[int], *,
                num_tokens: int | None = None, lease_s: float | None = None) -> KVTicket:
        """Hold ``block_ids`` of ``request_id`` until a consumer reads them, the
        lease ends, or ``release``; returns the ticket to hand to the consumer."""
        self.transport.publish(request_id, block_ids, num_tokens=num_tokens, lease_s=lease_s)
        return KVTicket(self.transport.address, request_id, [int(b) for b in block_ids],
                        num_tokens, self.layout.fingerprint(), self.transport.name,
                        self.transport.instance_id)

    @property
    def instance_id(self) -> str:
        """This process's identity as a producer (see ``KVTicket.instance_id``)."""
        return self.transport.instance_id

    def release(self, request_id: str, *, before_publish: bool = False) -> bool:
        """Let go of a published request now (e.g. it was aborted);
        ``before_publish``: a streamed one, maybe not published yet
        (``Transport.release``)."""
        return self.transport.release(request_id, before_publish=before_publish)

    def poll_released(self) -> list[tuple[str, str]]:
        """``(request_id, reason)`` whose blocks may be freed; reason is
        ``"read"``, ``"expired"`` or ``"released"``."""
        return self.transport.poll_released()

    def wait_progress(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for a pull to finish or a lease to be let go
        since the last call (at once if one did); True if one did. Poll
        (``poll_released``, the handles) after it: whatever happens from here
        on wakes the next call."""
        happened = self.transport.progress.wait(timeout_s)
        self.transport.progress.clear()
        return happened

    # ------------------------------------------------------------------ consumer
    def pull(self, ticket: KVTicket, local_block_ids: Sequence[int]) -> TransferHandle:
        """Pull every block of ``ticket`` into ``local_block_ids`` (same count)."""
        if not self.transport.pulls_from(ticket.transport):
            raise ValueError(f"ticket is for transport {ticket.transport!r}, this agent uses "
                             f"{self.transport.name!r}")
        return self.transport.pull(ticket.address, ticket.request_id, ticket.block_ids,
                                   local_block_ids, producer_instance=ticket.instance_id)

    def pull_blocks(self, peer: str, request_id: str, remote_block_ids: Sequence[int],
                    local_block_ids: Sequence[int], *,
                    producer_instance: str | None = None, **shard) -> TransferHandle:
        """Pull some blocks of a published request (e.g. only the ones a local
        prefix cache lacks). ``shard``: ``remote_slice``, ``local_slice``,
        ``readers`` of a tensor-parallel read (``pull_sharded`` sets them)."""
        return self.transport.pull(peer, request_id, remote_block_ids, local_block_ids,
                                   producer_instance=producer_instance, **shard)

    def pull_sharded(self, addresses: Sequence[str], request_id: str,
                     remote_block_ids: Sequence[int], local_block_ids: Sequence[int], *,
                     instance_ids: Sequence[str | None] | None = None,
                     positions: bool = False, final: bool = True,
                     ) -> list[TransferHandle]:
        """Pull a request published by every rank of a tensor-parallel
        producer (``addresses[r]`` is its rank ``r``) into this rank's blocks,
        whatever the two TP sizes: the pulls ``kvbridge.cache.shard.plan_reads``
        gives (this rank's heads, from one rank or several), started at once
        so they run in parallel. Producer ranks no consumer rank needs (head
        replicas) are told to free the request now. The request is loaded when
        every returned handle is DONE; if one fails, cancel the others.
        ``positions``/``final``: a chunk of a streamed request (``Transport.pull``)."""
        plan = plan_reads(self.cache.layout, len(addresses))
        handles = []
        for read in plan:
            instance = (instance_ids[read.remote_rank]
                        if instance_ids and len(instance_ids) > read.remote_rank else None)
            handles.append(self.transport.pull(
                addresses[read.remote_rank], request_id, remote_block_ids, local_block_ids,
                producer_instance=instance, remote_slice=read.remote_slice,
                local_slice=read.local_slice, readers=read.readers, positions=positions,
                final=final))
        for rank in unread_ranks(self.cache.layout, len(addresses)) if final else ():
            self.transport.release_remote(addresses[rank], request_id, "head replica not read")
        return handles

    def producer_ranks(self, addresses: Sequence[str]) -> list[str]:
        """The producer ranks' addresses this rank reads from or hands back
        (``pull_sharded``): where its releases of a request go."""
        ranks = [r.remote_rank for r in plan_reads(self.cache.layout, len(addresses))]
        ranks += unread_ranks(self.cache.layout, len(addresses))
        return [addresses[r] for r in sorted(set(ranks))]

    def publish_progress(self, request_id: str, block_ids: Sequence[int], *,
                         complete: bool) -> bool:
        """Streaming: hold the blocks of a request still in prefill computed
        so far (``Transport.publish_progress``); consumers read them by
        position as they come."""
        return self.transport.publish_progress(request_id, block_ids, complete=complete)

    def release_remote(self, peer: str, request_id: str, reason: str = "") -> None:
        """Tell the producer at ``peer`` this consumer will not read
        ``request_id`` (aborted, or served from a local prefix cache), so it
        frees the blocks now instead of at lease end. Never blocks."""
        self.transport.release_remote(peer, request_id, reason)

    def handshake(self, peer: str) -> KVLayout:
        """Check layouts with ``peer`` now; raises ``LayoutMismatchError``."""
        return self.transport.handshake(peer)

    # ------------------------------------------------------------------ both
    def metrics(self) -> dict:
        """Transfers, bytes, GB/s, failures by kind, handshakes, held requests;
        with a host mirror, the blocks staged each way and the seconds it took."""
        out = self.transport.metrics()
        if self.host_mirror is not None:
            m = self.host_mirror
            out["host_staging"] = {"blocks_to_host": m.blocks_to_host,
                                   "blocks_to_device": m.blocks_to_device,
                                   "seconds": m.seconds, "mirror_bytes": m.nbytes}
        return out

    def close(self) -> None:
        self.transport.close()

    def __enter__(self) -> KVAgent:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
