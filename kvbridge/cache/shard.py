# SPDX-License-Identifier: Apache-2.0
"""Which bytes of which producer rank a consumer rank reads, for any two TP sizes.

Tensor parallelism splits the KV heads over ranks: rank ``r`` of ``tp`` holds
heads ``[r * H / tp, (r + 1) * H / tp)`` of the model's ``H``, or - when there
are fewer heads than ranks - one head, replicated on ``tp / H`` ranks (rank
``r`` holds head ``r * H // tp``, as vLLM's QKV projection assigns them). MLA
keeps one latent per token, the same on every rank (``H`` = 1).

A consumer rank reads, from each producer rank whose heads overlap its own,
the overlapping heads: a *slice* of every block. In vLLM's CPU layout
``LBHNC`` (``[num_blocks, kv_heads, block_size, 2 * head_size]``) a head range
is one contiguous run of each block; in ``LBNHC`` (``[num_blocks, block_size,
kv_heads, C]``) it is one run per token, ``block_size`` runs a fixed stride
apart. ``BlockSlice`` describes both: ``rows`` runs of ``length`` bytes, each
``offset`` bytes into a row of ``block_bytes / rows``.

* decode TP > prefill TP: each decode rank reads its heads' slice of one
  producer rank's blocks, into its whole blocks;
* prefill TP > decode TP: each decode rank reads whole blocks of several
  producer ranks, each into its slice of the local blocks;
* replicated heads and MLA: one read of the whole block from one rank that
  holds them (spread over the replicas by consumer rank).

Equal TP is the degenerate case: rank r reads rank r's blocks whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from kvbridge.layout import KVLayout, LayoutMismatchError


class BlockSlice(msgspec.Struct, frozen=True, array_like=True):
    """The bytes of one block (of every region) that a pull moves.

    ``rows`` runs of ``length`` bytes; run ``k`` starts at ``k * row_bytes +
    offset`` within the block, where ``row_bytes = block_bytes // rows``.
    """

    offset: int
    length: int
    rows: int = 1

    def row_bytes(self, block_bytes: int) -> int:
        return block_bytes // self.rows

    def nbytes(self) -> int:
        """Bytes of one block this slice covers."""
        return self.length * self.rows

    def check(self, block_bytes: int) -> None:
        """Raise ``ValueError`` unless this slice lies inside a block of ``block_bytes``."""
        if self.rows <= 0 or block_bytes % self.rows:
            raise ValueError(f"slice of {self.rows} rows does not divide a {block_bytes}-byte "
                             "block")
        row = block_bytes // self.rows
        if self.offset < 0 or self.length <= 0 or self.offset + self.length > row:
            raise ValueError(f"slice [{self.offset}, {self.offset + self.length}) lies outside "
                             f"a {row}-byte row")

    def is_whole(self, block_bytes: int) -> bool:
        return self.offset == 0 and self.length * self.rows == block_bytes

    @staticmethod
    def whole(block_bytes: int, rows: int = 1) -> BlockSlice:
        return BlockSlice(0, block_bytes // rows, rows)


@dataclass(frozen=True)
class ShardRead:
    """One pull of a consumer rank: ``remote_slice`` of every block on producer
    rank ``remote_rank`` into ``local_slice`` of the local blocks (None: the
    whole block). ``readers``: how many consumer ranks read this producer rank
    for one request - it keeps the blocks until all of them have."""

    remote_rank: int
    remote_slice: BlockSlice | None
    local_slice: BlockSlice | None
    readers: int = 1


def rank_heads(num_kv_heads: int, tp_size: int, rank: int) -> tuple[int, int]:
    """(first head, head count) rank ``rank`` of ``tp_size`` holds."""
    if num_kv_heads >= tp_size:
        if num_kv_heads % tp_size:
            raise ValueError(f"{num_kv_heads} KV heads cannot be split over {tp_size} ranks")
        n = num_kv_heads // tp_size
        return rank * n, n
    if tp_size % num_kv_heads:
        raise ValueError(f"{num_kv_heads} KV heads cannot be replicated over {tp_size} ranks")
    return rank * num_kv_heads // tp_size, 1


def _rows(layout: KVLayout) -> int:
    """Runs per block a head range takes in ``layout``'s memory order."""
    if layout.memory_layout == "LBHNC":
        return 1
    if layout.memory_layout == "LBNHC":
        return layout.block_size
    raise ValueError(layout.memory_layout)


def _slice(layout: KVLayout, first_head: int, heads: int, held_from: int) -> BlockSlice | None:
    """Heads ``[first_head, first_head + heads)`` of a block holding heads from
    ``held_from`` on, or None when that is the whole block."""
    rows = _rows(layout)
    per_head = layout.block_bytes // rows // layout.kv_heads_per_rank
    sl = BlockSlice((first_head - held_from) * per_head, heads * per_head, rows)
    return None if sl.is_whole(layout.block_bytes) else sl


def _sources(heads: int, tp_l: int, rank: int, tp_r: int) -> list[tuple[int, int, int, int]]:
    """(producer rank, first head, head count, producer rank's first head) of
    each run of consumer rank ``rank``'s heads, in head order."""
    mine_first, mine_n = rank_heads(heads, tp_l, rank)
    out = []
    h = mine_first
    while h < mine_first + mine_n:
        cands = [p for p in range(tp_r) if rank_heads(heads, tp_r, p)[0] <= h
                 < sum(rank_heads(heads, tp_r, p))]
        # Replicas of a head: spread the consumer ranks over them.
        p = cands[rank % len(cands)]
        p_first, p_n = rank_heads(heads, tp_r, p)
        end = min(p_first + p_n, mine_first + mine_n)
        out.append((p, h, end - h, p_first))
        h = end
    return out


def plan_reads(local: KVLayout, remote_tp_size: int) -> list[ShardRead]:
    """The pulls that fill ``local``'s rank from a producer of ``remote_tp_size``
    ranks (same model and layout otherwise; ``layout.check_pairable`` has the
    rules), in local head order.

    Raises ``LayoutMismatchError`` naming ``tp_size`` and the memory layout
    when the heads cannot be split (a ``custom`` layout with different TP).
    """
    tp_l, tp_r, heads = local.tp_size, remote_tp_size, local.num_kv_heads
    if tp_l == tp_r:
        return [ShardRead(local.tp_rank, None, None, 1)]
    if local.memory_layout == "custom":
        raise LayoutMismatchError(
            [("tp_size", tp_l, tp_r), ("memory_layout", "custom", "custom")],
            "a custom memory layout moves whole blocks only, so both sides need the same "
            "tp_size")
    r_per_rank = max(1, heads // tp_r)
    remote = KVLayout(**{**local.to_dict(), "tp_size": tp_r, "tp_rank": 0,
                         "kv_heads_per_rank": r_per_rank,
                         "block_bytes": local.block_bytes // local.kv_heads_per_rank * r_per_rank})
    # How many consumer ranks read each producer rank for one request.
    readers: dict[int, int] = {}
    for rank in range(tp_l):
        for p in {src[0] for src in _sources(heads, tp_l, rank, tp_r)}:
            readers[p] = readers.get(p, 0) + 1
    mine_first = rank_heads(heads, tp_l, local.tp_rank)[0]
    return [ShardRead(p, _slice(remote, h, n, p_first), _slice(local, h, n, mine_first),
                      readers[p])
            for p, h, n, p_first in _sources(heads, tp_l, local.tp_rank, tp_r)]


def unread_ranks(local: KVLayout, remote_tp_size: int) -> list[int]:
    """Producer ranks no consumer rank reads (replicas of heads the consumer
    needs once) that ``local``'s rank hands back for every request, so their
    blocks are freed at once rather than at lease end. Each such rank is
    handed back by exactly one consumer rank (``p % local.tp_size``)."""
    tp_l, tp_r = local.tp_size, remote_tp_size
    if tp_l == tp_r:
        return []
    read = {src[0] for rank in range(tp_l)
            for src in _sources(local.num_kv_heads, tp_l, rank, tp_r)}
    return [p for p in range(tp_r) if p not in read and p % tp_l == local.tp_rank]


def paired_slices(remote: BlockSlice | None, local: BlockSlice | None, remote_block_bytes: int,
                  local_block_bytes: int) -> tuple[BlockSlice, BlockSlice]:
    """Both sides of a pull as slices of the same runs (same ``rows`` and
    ``length``), so run ``k`` of a remote block lands in run ``k`` of the
    local one: what direct readers (CMA iovecs, NIXL descriptors) pair up.
    Raises ``ValueError`` if the two sides do not hold the same byte count."""
    if remote is None and local is None:
        if remote_block_bytes != local_block_bytes:
            raise ValueError(f"{remote_block_bytes}-byte blocks there, {local_block_bytes} here")
        return BlockSlice.whole(remote_block_bytes), BlockSlice.whole(local_block_bytes)
    if remote is None:
        remote = BlockSlice(0, remote_block_bytes // local.rows, local.rows)
    if local is None:
        local = BlockSlice(0, local_block_bytes // remote.rows, remote.rows)
    if (remote.rows, remote.length) != (local.rows, local.length):
        raise ValueError(f"remote runs {remote.rows} x {remote.length} B do not match local "
                         f"runs {local.rows} x {local.length} B")
    remote.check(remote_block_bytes)
    local.check(local_block_bytes)
    return remote, local
