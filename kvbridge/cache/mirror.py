# SPDX-License-Identifier: Apache-2.0
"""Block copies between two sets of per-layer KV tensors, and the host mirror
of a GPU KV cache built on them.

Sockets and cross-memory attach read host memory only, so a KV cache in GPU
memory is mirrored in page-locked host memory: the producer copies a
request's blocks device -> mirror before it publishes them, the consumer
copies pulled blocks mirror -> device before it reports them received.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import torch

from kvbridge.cache import kernels
from kvbridge.cache.blocks import _as_block_bytes

def kv_block_regions(layer: torch.Tensor) -> list[torch.Tensor]:
    """The block-indexed regions of one layer's KV tensor.

    ``[layer]`` when dim 0 is the block index (vLLM's CPU backend, MLA, most
    custom engines); ``[layer[0], layer[1]]`` for a K/V-split tensor
    ``[2, num_blocks, ...]`` of 5 dims (vLLM's GPU attention backends).
    """
    if layer.ndim == 5 and layer.shape[0] == 2:
        return [layer[0], layer[1]]
    return [layer]


def _block_bytes_of(region: torch.Tensor) -> int:
    return region[0].numel() * region.element_size()


class KVCopyPlan:
    """Block-to-block copies between two sets of per-layer KV tensors, with the
    byte views built once: building them costs ~10 us per region, ~0.5 ms for
    a 32-layer model, more than copying one block. ``HostMirror`` keeps one
    plan per direction.

    Args:
        src_kv_caches, dst_kv_caches: layer name -> KV tensor, the same layers
            with the same block size on both sides.
    """

    def __init__(self, src_kv_caches: dict[str, torch.Tensor],
                 dst_kv_caches: dict[str, torch.Tensor]):
        if src_kv_caches.keys() != dst_kv_caches.keys():
            raise ValueError("source and destination caches name different layers")
        # The kernels take one stride and block size per side: group regions by them.
        groups: dict[tuple[int, int, int], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for name, src in src_kv_caches.items():
            for s, d in zip(kv_block_regions(src), kv_block_regions(dst_kv_caches[name]),
                            strict=True):
                nbytes = _block_bytes_of(s)
                if _block_bytes_of(d) != nbytes or s.shape[0] <= 0:
                    raise ValueError(f"layer {name}: blocks of {nbytes} and "
                                     f"{_block_bytes_of(d)} bytes")
                sv, dv = _as_block_bytes(s, nbytes), _as_block_bytes(d, nbytes)
                srcs, dsts = groups.setdefault((nbytes, sv.stride(0), dv.stride(0)), ([], []))
                srcs.append(sv)
                dsts.append(dv)
        self._groups = list(groups.values())

    def run(self, src_block_ids: Sequence[int], dst_block_ids: Sequence[int]) -> None:
        """``dst[layer][dst_block_ids[i]] = src[layer][src_block_ids[i]]``; synchronous."""
        if len(src_block_ids) != len(dst_block_ids):
            raise ValueError(f"{len(src_block_ids)} source blocks for {len(dst_block_ids)} "
                             "destination blocks")
        if not src_block_ids:
            return
        src_ids, dst_ids = list(src_block_ids), list(dst_block_ids)
        for srcs, dsts in self._groups:
            kernels.copy_blocks(srcs, dsts, src_ids, dst_ids)


def copy_kv_blocks(src_kv_caches: dict[str, torch.Tensor], dst_kv_caches: dict[str, torch.Tensor],
                   src_block_ids: Sequence[int], dst_block_ids: Sequence[int],
                   direction: str | None = None) -> None:
    """``dst[layer][dst_block_ids[i]] = src[layer][src_block_ids[i]]`` for every layer.

    vLLM's ``CopyBlocksOp`` signature (what ``set_host_xfer_buffer_ops`` hands
    a connector), implemented with the csrc kernels: one CUDA launch for every
    layer and block when either side is in GPU memory (the host side must be
    pinned), the CPU kernel when both are in host memory. Synchronous: the
    blocks are in place when it returns. ``direction`` (``"h2d"``/``"d2h"``)
    is accepted for the signature; the tensors' devices decide. Repeated
    copies between the same tensors should hold a ``KVCopyPlan`` instead.
    """
    del direction
    if len(src_block_ids) != len(dst_block_ids):
        raise ValueError(f"{len(src_block_ids)} source blocks for {len(dst_block_ids)} "
                         "destination blocks")
    if src_block_ids:
        KVCopyPlan(src_kv_caches, dst_kv_caches).run(src_block_ids, dst_block_ids)


class HostMirror:
    """A host copy of an engine's device KV cache, block for block.

    What a transport serves (producer) and fills (consumer) when the engine's
    KV cache lives in GPU memory, which sockets and cross-memory attach cannot
    address: vLLM's ``kv_buffer_device: "cpu"``, NixlConnector's host transfer
    buffer. ``to_host(ids)`` copies blocks device -> mirror before a publish
    makes them readable; ``to_device(ids)`` copies pulled blocks mirror ->
    device before the pull counts as done. ``KVAgent(..., host_mirror=m)``
    wires both.

    The mirror is page-locked (pinned) when a CUDA device exists, so the CUDA
    kernel reads and writes it directly (one launch, no second staging copy).
    It holds as many blocks as the device cache - the same host memory
    NixlConnector's host buffer takes.

    Args:
        device_kv_caches: layer name -> the engine's KV tensor (dim 0 the block
            index, or ``[2, num_blocks, ...]`` K/V-split).
        copy_op: a ``CopyBlocksOp`` to use instead of kvbridge's kernels
            (e.g. vLLM's own op); ``None``: the csrc kernels, through a
            ``KVCopyPlan`` per direction made once.
        pin_memory: ``None`` means "pin if CUDA is available".
    """

    def __init__(self, device_kv_caches: dict[str, torch.Tensor], copy_op=None,
                 pin_memory: bool | None = None):
        if not device_kv_caches:
            raise ValueError("no KV tensors to mirror")
        pin = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.device_kv_caches = dict(device_kv_caches)
        # Not zeroed: a block is only ever read after a copy wrote it, and
        # zeroing a mirror of a large GPU cache costs seconds at start-up.
        self.host_kv_caches = {name: torch.empty(t.shape, dtype=t.dtype, device="cpu",
                                                 pin_memory=pin)
                               for name, t in self.device_kv_caches.items()}
        self.copy_op = copy_op
        self._plans = {"d2h": KVCopyPlan(self.device_kv_caches, self.host_kv_caches),
                       "h2d": KVCopyPlan(self.host_kv_caches, self.device_kv_caches)}
        #: blocks copied each way (a block counts once for all its layers)
        self.blocks_to_host = 0
        self.blocks_to_device = 0
        self.seconds = 0.0
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.host_kv_caches.values())

    def host_regions(self, layer_order: Sequence[str] | None = None) -> list[torch.Tensor]:
        """The mirror's block-indexed regions, layer by layer (``layer_order``,
        default insertion order), K before V: what ``PagedKVCache`` wraps."""
        names = list(layer_order) if layer_order is not None else list(self.host_kv_caches)
        return [r for name in names for r in kv_block_regions(self.host_kv_caches[name])]

    def to_host(self, block_ids: Sequence[int]) -> None:
        """Copy ``block_ids`` device -> mirror (synchronous)."""
        self._copy(self.device_kv_caches, self.host_kv_caches, block_ids, "d2h")

    def to_device(self, block_ids: Sequence[int]) -> None:
        """Copy ``block_ids`` mirror -> device (synchronous)."""
        self._copy(self.host_kv_caches, self.device_kv_caches, block_ids, "h2d")

    def _copy(self, src, dst, block_ids: Sequence[int], direction: str) -> None:
        ids = [int(b) for b in block_ids]
        if not ids:
            return
        t0 = time.perf_counter()
        if self.copy_op is None:
            self._plans[direction].run(ids, ids)
        else:
            self.copy_op(src, dst, ids, ids, direction)
        with self._lock:
            self.seconds += time.perf_counter() - t0
            if direction == "d2h":
                self.blocks_to_host += len(ids)
            else:
                self.blocks_to_device += len(ids)
