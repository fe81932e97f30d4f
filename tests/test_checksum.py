# SPDX-License-Identifier: Apache-2.0
"""Per-block KV digests: the same value whether computed from memory after a
pull or while the bytes land in any chunking (``LandingDigests``)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from helpers.transport_peer import make_cache
from kvbridge.cache import checksum

CACHE = make_cache(48, seed=3, layers=3)


@settings(max_examples=60, deadline=None)
@given(ids=st.lists(st.integers(0, 47), min_size=1, max_size=20, unique=True),
       cuts=st.lists(st.integers(1, 1 << 16), min_size=1, max_size=40))
def test_landing_digests_match_block_digests_for_any_chunking(ids, cuts):
    want = checksum.block_digests(CACHE, ids)
    bufs = CACHE.block_buffers(ids)
    landing = checksum.LandingDigests(CACHE, ids)
    # Replay arrival in arbitrary chunks, as recvmsg_into returns them.
    i = off = 0
    for cut in cuts:
        off += cut
        while i < len(bufs) and off >= len(bufs[i]):
            off -= len(bufs[i])
            i += 1
        landing.progress(i, off if i < len(bufs) else 0)
    assert landing.digests(ids) == want


def test_a_flipped_byte_changes_only_its_block_digest():
    cache = make_cache(8, seed=4)
    before = checksum.block_digests(cache, range(8))
    checksum.flip_byte(cache, 5)
    after = checksum.block_digests(cache, range(8))
    assert [b for b in range(8) if before[b] != after[b]] == [5]


def test_digest_covers_every_region():
    cache = make_cache(4, seed=5, layers=2)
    before = checksum.block_digests(cache, [2])
    cache.region_arrays()[1][2, -1] ^= 1  # last byte of the last region
    assert checksum.block_digests(cache, [2]) != before


def test_native_digests_equal_the_python_ones_for_every_layout():
    """The C digests (one call, no GIL) and the Python ones agree, so a
    producer and a consumer may each use either."""
    assert checksum.NATIVE is not None, "the CPU library or xxhash's XXH3 is missing"
    for kw in (dict(layers=3), dict(layers=2, regions_per_layer=2),
               dict(layers=1, block_size=128, kv_heads=8, head_size=128)):
        cache = make_cache(40, seed=6, **kw)
        ids = [39, 0, 17, 18, 19, 5]
        assert checksum.native_block_digests(cache, ids) == \
            checksum.python_block_digests(cache, ids)
        # block_digests picks the C path from NATIVE_MIN_PIECES pieces up
        many = list(range(40))
        assert checksum.block_digests(cache, many) == checksum.python_block_digests(cache, many)


def test_native_cma_read_lands_every_byte_and_its_digest_in_any_chunking():
    """``kvb_cma_read_blocks`` (the cma backend's verified read): blocks
    batched per syscall where a segment fits a chunk, and a segment read and
    digested in pieces (XXH3's streaming state) where it does not - the same
    bytes and the same digests as reading first and digesting after."""
    import os

    import numpy as np

    lib, api = checksum.NATIVE
    for kw in (dict(layers=3), dict(layers=2, regions_per_layer=2, head_size=24)):
        src, dst = make_cache(24, seed=8, **kw), make_cache(24, seed=None, **kw)
        seg, regions = src.layout.block_bytes, src.layout.num_regions
        remote_ids, local_ids = [3, 9, 4, 23, 0, 11, 12], [20, 1, 2, 7, 13, 5, 6]
        n = len(remote_ids)
        remote = src.run_starts(remote_ids, None)
        local = dst.run_starts(local_ids, None)
        want = checksum.python_block_digests(src, remote_ids)
        for chunk in (seg // 3 + 1, seg - 1, seg, 2 * seg, 64 * seg):
            for region in dst.region_arrays():
                region[...] = 0
            out = np.zeros(n, dtype=np.uint64)
            rc = lib.kvb_cma_read_blocks(os.getpid(), local.ctypes.data, remote.ctypes.data, n,
                                         n, regions, seg, chunk, api, out.ctypes.data)
            assert rc == 0, (chunk, rc)
            assert out.tolist() == want, chunk
            assert checksum.python_block_digests(dst, local_ids) == want, chunk
        # A read of memory that is not there fails with its errno, not a crash.
        bad = remote.copy()
        bad[-1] = 8  # unmapped page
        assert lib.kvb_cma_read_blocks(os.getpid(), local.ctypes.data, bad.ctypes.data, n, n,
                                       regions, seg, seg // 2, api, out.ctypes.data) < 0
