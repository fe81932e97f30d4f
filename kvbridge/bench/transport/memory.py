# SPDX-License-Identifier: Apache-2.0
"""Memory contents and digests of ``kvbridge bench transport``: random fills,
the paged caches both sides use, poisoning before a pull."""

from __future__ import annotations

import ctypes
import hashlib
from collections.abc import Iterable, Sequence

import numpy as np

from kvbridge.bench.transport.plan import BLOCK_SHAPES, NUM_LAYERS, POISON

#: Random tile length: odd, so consecutive blocks start at different phases of
#: the tile and every block differs (a misplaced block changes the digest).
_TILE = (1 << 20) + 4099


def fill_random(buf: np.ndarray, seed: int, salt: int) -> None:
    """Fill a flat uint8 array with a repeated random tile. Generating fresh
    random bytes for 512 MiB takes seconds on a small machine; copying a tile
    runs at memory speed."""
    tile = np.random.default_rng([seed, salt]).integers(0, 256, _TILE, dtype=np.uint8)
    for off in range(0, buf.size, _TILE):
        n = min(_TILE, buf.size - off)
        buf[off:off + n] = tile[:n]


def digest(buffers: Iterable) -> str:
    # SHA-1: an integrity check, not security, and the fastest hashlib hash here.
    h = hashlib.sha1(usedforsecurity=False)
    for b in buffers:
        h.update(b)
    return h.hexdigest()


def make_cache(shape: str, num_blocks: int, seed: int | None):
    """A 2-layer paged cache of ``shape``; random contents, or zeros if ``seed`` is
    None (still written, so first-touch page faults happen here, not in a pull)."""
    from kvbridge.cache.synthetic import synthetic_cache

    heads, block_size, head_size = BLOCK_SHAPES[shape]
    return synthetic_cache(
        num_blocks, kv_heads=heads, block_size=block_size, head_size=head_size,
        layers=NUM_LAYERS, model=f"kvbridge-bench-{shape}",
        fill=None if seed is None else lambda layer, raw: fill_random(raw.numpy(), seed, layer))


def cache_digest(cache, block_ids: Sequence[int]) -> str:
    """Digest of ``block_ids`` in staging order (region-major), what a pull moves."""
    return digest(cache.block_buffers(block_ids))


def poison_blocks(cache, block_ids: Sequence[int]) -> None:
    # libc memset, not torch's fill_: a torch op over 32 Ki elements runs on its
    # OpenMP pool, whose idle threads then spin on the cores the pull needs.
    size = cache.layout.block_bytes
    for base, stride, _ in cache.region_addresses():
        for b in block_ids:
            ctypes.memset(base + b * stride, POISON, size)
