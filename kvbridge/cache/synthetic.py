# SPDX-License-Identifier: Apache-2.0
"""Synthetic paged KV caches: the one builder that demos, benchmarks and tests
use to get a ``PagedKVCache`` and its ``KVLayout`` without an engine."""

from __future__ import annotations

from collections.abc import Callable

import torch

from kvbridge.cache.blocks import PagedKVCache
from kvbridge.cache.shard import rank_heads
from kvbridge.layout import KVLayout

#: fill(region_index, the region's bytes as a flat uint8 tensor)
Fill = Callable[[int, torch.Tensor], None]


def synthetic_cache(num_blocks: int, *, kv_heads: int = 2, block_size: int = 32,
                    head_size: int = 16, layers: int = 2,
                    dtype: torch.dtype | str = torch.bfloat16, model: str = "synthetic",
                    memory_layout: str = "LBHNC", tp_size: int = 1, tp_rank: int = 0,
                    regions_per_layer: int = 1, seed: int | None = None,
                    fill: Fill | None = None) -> PagedKVCache:
    """A cache shaped like vLLM's CPU cache: per region
    ``[num_blocks, kv_heads, block_size, 2 * head_size]`` (``LBHNC``) or
    ``[num_blocks, block_size, kv_heads, 2 * head_size]`` (``LBNHC``).

    Contents: ``fill`` if given, else random bytes from ``seed`` (one torch
    generator drawn region after region), else zeros - always written, so
    first-touch page faults happen here and not in a timed copy.

    With ``tp_size`` > 1 it is rank ``tp_rank``'s shard of the cache the same
    arguments give at TP 1: its heads (``shard.rank_heads``) of every block, so
    shards of two TP sizes can be compared byte for byte. ``regions_per_layer``
    > 1 gives each layer that many tensors (K and V apart).
    """
    tdtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    gen = torch.Generator().manual_seed(seed) if seed is not None and fill is None else None
    first, count = rank_heads(kv_heads, tp_size, tp_rank)
    head_dim = 1 if memory_layout == "LBHNC" else 2
    shape = ((num_blocks, kv_heads, block_size, 2 * head_size) if head_dim == 1
             else (num_blocks, block_size, kv_heads, 2 * head_size))
    regions = []
    for index in range(layers * regions_per_layer):
        t = torch.empty(shape, dtype=tdtype)
        raw = t.view(torch.uint8).reshape(-1)
        if fill is not None:
            fill(index, raw)
        elif gen is not None:
            raw.copy_(torch.randint(0, 256, raw.shape, dtype=torch.uint8, generator=gen))
        else:
            raw.zero_()
        regions.append(t if count == kv_heads else t.narrow(head_dim, first, count).contiguous())
    layout = KVLayout.from_tensors(regions, model=model, block_size=block_size,
                                   num_kv_heads=kv_heads, head_size=head_size,
                                   memory_layout=memory_layout, tp_size=tp_size,
                                   tp_rank=tp_rank, regions_per_layer=regions_per_layer)
    return PagedKVCache(layout, regions)
