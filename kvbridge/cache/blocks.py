# SPDX-License-Identifier: Apache-2.0
"""Engine-agnostic block-table export/import over a paged KV cache.

``PagedKVCache`` wraps the per-layer paged tensors an engine already owns
(vLLM's, or a custom engine's) together with their ``KVLayout``. It can

* ``export_blocks(ids)`` - gather the selected blocks of every region into one
  contiguous staging buffer, region-major: ``staging[r, i] = region_r[ids[i]]``;
* ``import_blocks(staging, ids)`` - scatter such a buffer back into (other)
  block ids.

Both validate block ids before touching memory (range, duplicates, count), so
a bad request writes nothing. The copy itself goes through
``kvbridge.cache.kernels`` which uses the compiled csrc kernel when it is built and
torch ops otherwise.

Blocks are copied whole. For a sequence of ``num_tokens`` the last block is
usually partial; its tail beyond the sequence is copied too, which is harmless
(attention masks by sequence length) and keeps every copy a run of whole
blocks - the unit every transport addresses.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

import torch

from kvbridge.cache import kernels
from kvbridge.errors import BlockIdError
from kvbridge.layout import KVLayout, dtype_name
from kvbridge.cache.shard import BlockSlice


def validate_block_ids(
    block_ids: Sequence[int],
    num_blocks: int,
    *,
    num_tokens: int | None = None,
    block_size: int | None = None,
    what: str = "block_ids",
) -> list[int]:
    """Return ``block_ids`` as a list of ints or raise ``BlockIdError``.

    Args:
        block_ids: ids into a cache of ``num_blocks`` blocks.
        num_tokens: when given, exactly ``ceil(num_tokens / block_size)`` ids
            are required (the last block may be partial).
    """
    ids = [int(b) for b in block_ids]
    bad = [b for b in ids if not 0 <= b < num_blocks]
    if bad:
        raise BlockIdError(f"{what} out of range [0, {num_blocks}): {bad[:8]}"
                           + (f" and {len(bad) - 8} more" if len(bad) > 8 else ""))
    if len(set(ids)) != len(ids):
        seen: set[int] = set()
        dups = sorted({b for b in ids if b in seen or seen.add(b)})
        raise BlockIdError(f"{what} contain duplicates: {dups[:8]}")
    if num_tokens is not None:
        if block_size is None:
            raise ValueError("block_size is required with num_tokens")
        if num_tokens < 0:
            raise BlockIdError(f"num_tokens must be >= 0, got {num_tokens}")
        need = math.ceil(num_tokens / block_size)
        if len(ids) != need:
            raise BlockIdError(f"{num_tokens} tokens at block_size {block_size} need {need} "
                               f"{what}, got {len(ids)}")
    return ids


class StagingPool:
    """Reusable contiguous byte buffers for gathered blocks.

    Buffers are bucketed by power-of-two size so a steady workload allocates
    nothing after warm-up; at most ``max_cached_bytes`` stay cached. Buffers are
    page-locked (pinned) when a CUDA device exists, so device<->host staging
    copies can be asynchronous.

    Args:
        pin_memory: ``None`` means "pin if CUDA is available".
        max_cached_bytes: cap on idle cached bytes (default 1 GiB).
    """

    def __init__(self, pin_memory: bool | None = None, max_cached_bytes: int = 1 << 30):
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.max_cached_bytes = max_cached_bytes
        self._free: dict[int, list[torch.Tensor]] = {}
        self._cached = 0
        self._lock = threading.Lock()

    @staticmethod
    def _bucket(nbytes: int) -> int:
        return 1 << max(12, (nbytes - 1).bit_length())

    def acquire(self, nbytes: int) -> torch.Tensor:
        """A uint8 tensor of exactly ``nbytes`` (a view of a pooled buffer)."""
        size = self._bucket(nbytes)
        with self._lock:
            bucket = self._free.get(size)
            if bucket:
                buf = bucket.pop()
                self._cached -= size
                return buf[:nbytes]
        buf = torch.empty(size, dtype=torch.uint8, pin_memory=self.pin_memory)
        return buf[:nbytes]

    def release(self, view: torch.Tensor) -> None:
        """Give a buffer from ``acquire`` back (extra releases are ignored by size)."""
        base = view._base if view._base is not None else view
        size = base.numel()
        with self._lock:
            if self._cached + size > self.max_cached_bytes:
                return  # let it be freed: the cache is full
            self._free.setdefault(size, []).append(base)
            self._cached += size

    @property
    def cached_bytes(self) -> int:
        return self._cached


class PagedKVCache:
    """An engine's paged KV tensors plus their layout; gathers and scatters blocks.

    Args:
        layout: the ``KVLayout`` these tensors follow.
        regions: ``layout.num_regions`` tensors, dim 0 the block index, each
            block ``layout.block_bytes`` contiguous bytes.
        pool: staging buffers to use (a private pool by default).
    """

    def __init__(self, layout: KVLayout, regions: Sequence[torch.Tensor],
                 pool: StagingPool | None = None):
        if len(regions) != layout.num_regions:
            raise ValueError(f"layout says {layout.num_regions} regions "
                             f"({layout.num_layers} layers x {layout.regions_per_layer}), "
                             f"got {len(regions)} tensors")
        num_blocks = regions[0].shape[0]
        views = []
        for i, t in enumerate(regions):
            if dtype_name(t.dtype) != layout.kv_cache_dtype:
                raise ValueError(f"KV tensor {i} dtype {dtype_name(t.dtype)} != layout "
                                 f"kv_cache_dtype {layout.kv_cache_dtype}")
            if t.shape[0] != num_blocks:
                raise ValueError(f"KV tensor {i} has {t.shape[0]} blocks, tensor 0 has {num_blocks}")
            block_bytes = t[0].numel() * t.element_size()
            if block_bytes != layout.block_bytes:
                raise ValueError(f"KV tensor {i} block is {block_bytes} bytes, layout says "
                                 f"{layout.block_bytes}")
            if not t[0].is_contiguous() or (num_blocks > 1 and t.stride(0) * t.element_size()
                                            < block_bytes):
                raise ValueError(f"KV tensor {i}: each block must be contiguous bytes")
            views.append(t)
        self.layout = layout
        self.regions = views
        self.num_blocks = int(num_blocks)
        self.device = regions[0].device
        self.pool = pool or StagingPool()
        # uint8 [num_blocks, block_bytes] views: the unit every copy works in.
        # A region whose blocks are padded apart keeps its stride.
        self._byte_views = [_as_block_bytes(t, layout.block_bytes) for t in views]
        self._np_views: list | None = None
        self._region_addresses: list[tuple[int, int, int]] | None = None
        #: (offset, length, rows) -> (row views, rows per block stride); see ``_slice_views``
        self._slice_views_cache: dict[tuple[int, int, int], tuple[list[torch.Tensor], int]] = {}

    # -- addresses, for transports that read memory directly (CMA, NIXL) --
    def region_addresses(self) -> list[tuple[int, int, int]]:
        """(base address, block stride in bytes, total bytes) per region."""
        if self._region_addresses is None:
            # Computed once: the views never move, and the torch calls cost
            # ~1 us a region on every small pull.
            self._region_addresses = [
                (v.data_ptr(), v.stride(0),
                 v.stride(0) * (self.num_blocks - 1) + self.layout.block_bytes)
                for v in self._byte_views]
        return self._region_addresses

    @property
    def byte_views(self) -> list[torch.Tensor]:
        return self._byte_views

    def region_arrays(self) -> list:
        """numpy uint8 ``[num_blocks, block_bytes]`` views, one per region. CPU only."""
        if self.device.type != "cpu":
            raise ValueError("host memory only; stage device memory first")
        if self._np_views is None:
            # numpy slicing costs ~0.3 us against ~10 us for torch slicing + .numpy().
            self._np_views = [v.numpy() for v in self._byte_views]
        return self._np_views

    def block_buffers(self, block_ids: Sequence[int]) -> list[memoryview]:
        """Byte buffers of ``block_ids`` in staging order (region-major), runs of
        adjacent ids merged, for scatter/gather I/O (``sendmsg``/``recvmsg_into``,
        ``process_vm_readv``) straight from and into the cache. CPU only."""
        if self.device.type != "cpu":
            raise ValueError("block_buffers needs host memory; stage device memory first")
        views = self.region_arrays()
        return [memoryview(views[r][start:start + count]).cast("B")
                for r, start, count in self.block_runs(block_ids)]

    def block_runs(self, block_ids: Sequence[int]) -> list[tuple[int, int, int]]:
        """(region, first block id, count) of each buffer ``block_buffers``
        returns, in the same order."""
        packed = self.num_blocks == 1 or self._byte_views[0].stride(0) == self.layout.block_bytes
        runs = _runs(block_ids, packed)
        return [(r, start, count) for r in range(len(self._byte_views)) for start, count in runs]

    def staging_bytes(self, num_blocks: int, block_slice: BlockSlice | None = None) -> int:
        """Bytes ``num_blocks`` blocks (or their ``block_slice``) take staged."""
        per_block = block_slice.nbytes() if block_slice is not None else self.layout.block_bytes
        return num_blocks * self.layout.num_regions * per_block

    # -- slices of blocks (TP-sharded pulls, see kvbridge.cache.shard) --
    def _slice_views(self, sl: BlockSlice) -> tuple[list[torch.Tensor], int]:
        """uint8 views ``[rows_total, sl.length]`` of every region, one row per
        run of the slice, and the rows one block stride spans: run ``k`` of
        block ``b`` is row ``b * span + k``. The copy kernels take these like
        whole blocks (a base pointer, a row stride, a row length)."""
        key = (sl.offset, sl.length, sl.rows)
        hit = self._slice_views_cache.get(key)
        if hit is not None:
            return hit
        sl.check(self.layout.block_bytes)
        row = sl.row_bytes(self.layout.block_bytes)
        stride = self._byte_views[0].stride(0)
        if sl.rows == 1:
            row = stride  # one run per block: rows are blocks, padded or not
        elif stride % row:
            raise ValueError(f"block stride {stride} is not a multiple of the {row}-byte rows "
                             "of this slice")
        span = stride // row
        total_rows = (self.num_blocks - 1) * span + sl.rows
        views = []
        for v in self._byte_views:
            if v.stride(0) != stride:
                raise ValueError("sliced copies need one block stride for every region")
            views.append(torch.empty(0, dtype=torch.uint8, device=v.device).set_(
                v.untyped_storage(), v.storage_offset() + sl.offset, (total_rows, sl.length),
                (row, 1)))
        self._slice_views_cache[key] = (views, span)
        return views, span

    def slice_rows(self, block_ids: Sequence[int], sl: BlockSlice) -> list[int]:
        """Row ids (see ``_slice_views``) of ``block_ids``' runs, block-major."""
        _, span = self._slice_views(sl)
        if sl.rows == 1 and span == 1:
            return list(block_ids)
        import numpy as np

        rows = (np.asarray(block_ids, dtype=np.int64)[:, None] * span
                + np.arange(sl.rows, dtype=np.int64)[None, :])
        return rows.ravel().tolist()

    def run_starts(self, block_ids: Sequence[int], sl: BlockSlice | None):
        """Addresses of every run of ``block_ids`` (whole blocks, or their
        ``sl``), in staging order (region, block, run): see ``run_starts``."""
        return run_starts([(a, s) for a, s, _ in self.region_addresses()],
                          self.layout.block_bytes, block_ids, sl)

    def validate(self, block_ids: Sequence[int], num_tokens: int | None = None,
                 what: str = "block_ids") -> list[int]:
        return validate_block_ids(block_ids, self.num_blocks, num_tokens=num_tokens,
                                  block_size=self.layout.block_size, what=what)

    def export_blocks(self, block_ids: Sequence[int], *, num_tokens: int | None = None,
                      out: torch.Tensor | None = None,
                      block_slice: BlockSlice | None = None) -> torch.Tensor:
        """Gather ``block_ids`` of every region into a contiguous uint8 buffer.

        Returns ``out`` (or a buffer from the pool, to be given back with
        ``self.pool.release``) holding ``staging_bytes(len(block_ids))``
        bytes, region-major. ``block_slice``: only those bytes of each block
        (a TP shard's heads), run by run.
        """
        ids = self.validate(block_ids, num_tokens)
        nbytes = self.staging_bytes(len(ids), block_slice)
        if out is None:
            out = self.pool.acquire(nbytes)
        elif out.dtype != torch.uint8 or out.numel() < nbytes or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous uint8 tensor of >= {nbytes} bytes")
        if ids:
            if block_slice is None:
                kernels.gather(self._byte_views, ids, out[:nbytes])
            else:
                views, _ = self._slice_views(block_slice)
                kernels.gather(views, self.slice_rows(ids, block_slice), out[:nbytes])
        return out[:nbytes] if out.numel() != nbytes else out

    def import_blocks(self, staging: torch.Tensor, block_ids: Sequence[int], *,
                      num_tokens: int | None = None,
                      block_slice: BlockSlice | None = None) -> None:
        """Scatter a buffer laid out as ``export_blocks`` makes it into
        ``block_ids`` (or into their ``block_slice``)."""
        ids = self.validate(block_ids, num_tokens)
        nbytes = self.staging_bytes(len(ids), block_slice)
        if staging.dtype != torch.uint8 or staging.numel() != nbytes:
            raise ValueError(f"staging must be uint8 of exactly {nbytes} bytes for {len(ids)} "
                             f"blocks, got {staging.dtype} x {staging.numel()}")
        if ids:
            if block_slice is None:
                kernels.scatter(staging, self._byte_views, ids)
            else:
                views, _ = self._slice_views(block_slice)
                kernels.scatter(staging, views, self.slice_rows(ids, block_slice))


def run_starts(regions: Sequence[tuple[int, int]], block_bytes: int, block_ids: Sequence[int],
               sl: BlockSlice | None):
    """uint64 start addresses of the runs ``sl`` (default: whole blocks) takes
    in blocks ``block_ids`` of ``regions`` ((base address, block stride) each),
    region-major, then block, then run: the order of a staging buffer. Each
    run is ``sl.length`` bytes. The iovecs and descriptors of direct reads."""
    import numpy as np

    sl = sl or BlockSlice.whole(block_bytes)
    row = sl.row_bytes(block_bytes)
    ids = np.asarray(block_ids, dtype=np.uint64)
    runs = np.arange(sl.rows, dtype=np.uint64) * np.uint64(row) + np.uint64(sl.offset)
    out = [(np.uint64(addr) + ids[:, None] * np.uint64(stride) + runs[None, :]).ravel()
           for addr, stride in regions]
    return np.concatenate(out) if out else np.zeros(0, dtype=np.uint64)


def _runs(block_ids: Sequence[int], merge: bool) -> list[tuple[int, int]]:
    """(first id, count) of each run of consecutive ids (single ids unless merge)."""
    runs: list[tuple[int, int]] = []
    for b in block_ids:
        if merge and runs and runs[-1][0] + runs[-1][1] == b:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((b, 1))
    return runs


def _as_block_bytes(t: torch.Tensor, block_bytes: int) -> torch.Tensor:
    """View ``t`` as uint8 ``[num_blocks, block_bytes]`` keeping its block stride."""
    if t.is_contiguous():
        return t.view(torch.uint8).reshape(t.shape[0], block_bytes)
    stride_bytes = t.stride(0) * t.element_size()
    flat = torch.empty(0, dtype=torch.uint8, device=t.device).set_(
        t.untyped_storage(), t.storage_offset() * t.element_size(), (t.shape[0], block_bytes),
        (stride_bytes, 1))
    return flat
