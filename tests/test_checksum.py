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
