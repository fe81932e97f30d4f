# SPDX-License-Identifier: Apache-2.0
"""Block export/import: byte-exact, validated, both copy paths."""

import json
import os
import random
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import transport_peer
from kvbridge.cache import kernels
from kvbridge.cache.blocks import BlockIdError, PagedKVCache, StagingPool

PATHS = ["torch"] + (["cpu_kernel"] if kernels.cpu_kernel_available() else [])


def make_cache(num_blocks=16, layers=2, heads=2, block_size=32, head_size=16,
               dtype=torch.bfloat16, seed=0, regions_per_layer=1):
    """This file's cache shape, built by the shared helper."""
    return transport_peer.make_cache(num_blocks, seed, block_size=block_size, kv_heads=heads,
                                     head_size=head_size, layers=layers, dtype=dtype,
                                     model="m", regions_per_layer=regions_per_layer)


def snapshot(cache):
    return [v.clone() for v in cache.byte_views]


@pytest.mark.parametrize("path", PATHS)
def test_round_trip_touches_only_selected_blocks(path, monkeypatch):
    monkeypatch.setenv("KVBRIDGE_KERNEL", path)
    src, dst = make_cache(seed=1), make_cache(seed=2)
    before = snapshot(dst)
    src_ids, dst_ids = [7, 2, 11, 3], [0, 15, 4, 9]
    staging = src.export_blocks(src_ids)
    dst.import_blocks(staging, dst_ids)
    for r, (sv, dv) in enumerate(zip(src.byte_views, dst.byte_views)):
        for s, d in zip(src_ids, dst_ids):
            assert torch.equal(sv[s], dv[d])
        for b in set(range(16)) - set(dst_ids):
            assert torch.equal(dv[b], before[r][b]), f"block {b} of region {r} changed"


@settings(max_examples=40, deadline=None)
@given(layers=st.integers(1, 4), heads=st.integers(1, 4), block_size=st.sampled_from([1, 16, 32]),
       head_size=st.sampled_from([4, 8, 64]), num_blocks=st.integers(1, 24),
       dtype=st.sampled_from([torch.bfloat16, torch.float32, torch.float16]),
       rpl=st.integers(1, 2), data=st.data())
def test_round_trip_random_layouts(layers, heads, block_size, head_size, num_blocks, dtype, rpl,
                                   data):
    src = make_cache(num_blocks, layers, heads, block_size, head_size, dtype, 1, rpl)
    dst = make_cache(num_blocks, layers, heads, block_size, head_size, dtype, 2, rpl)
    n = data.draw(st.integers(0, num_blocks))
    src_ids = data.draw(st.permutations(range(num_blocks)))[:n]
    dst_ids = data.draw(st.permutations(range(num_blocks)))[:n]
    path = data.draw(st.sampled_from(PATHS))
    before = snapshot(dst)
    staging = torch.empty(src.staging_bytes(n), dtype=torch.uint8)
    kernels.gather(src.byte_views, src.validate(src_ids), staging, path=path)
    kernels.scatter(staging, dst.byte_views, dst.validate(dst_ids), path=path)
    expected = [b.clone() for b in before]
    for r in range(len(expected)):
        for s, d in zip(src_ids, dst_ids):
            expected[r][d] = src.byte_views[r][s]
    for got, want in zip(dst.byte_views, expected):
        assert torch.equal(got, want)


def test_kernel_paths_agree_byte_for_byte():
    cache = make_cache(num_blocks=64, seed=3)
    ids = random.Random(0).sample(range(64), 40)
    outs = []
    for path in PATHS:
        buf = torch.empty(cache.staging_bytes(len(ids)), dtype=torch.uint8)
        kernels.gather(cache.byte_views, ids, buf, path=path)
        outs.append(buf)
    assert all(torch.equal(outs[0], o) for o in outs[1:])


@pytest.mark.parametrize("ids,match", [
    ([0, 16], "out of range"),
    ([-1], "out of range"),
    ([3, 5, 3], "duplicates"),
])
def test_invalid_ids_refused_and_nothing_written(ids, match):
    src, dst = make_cache(seed=1), make_cache(seed=2)
    before = snapshot(dst)
    with pytest.raises(BlockIdError, match=match):
        src.export_blocks(ids)
    staging = torch.zeros(dst.staging_bytes(len(ids)), dtype=torch.uint8)
    with pytest.raises(BlockIdError, match=match):
        dst.import_blocks(staging, ids)
    assert all(torch.equal(a, b) for a, b in zip(before, dst.byte_views))


def test_wrong_block_count_for_tokens_refused():
    cache = make_cache(seed=1)  # block_size 32
    cache.export_blocks([1, 2], num_tokens=33)  # partial last block: 2 blocks
    cache.export_blocks([4], num_tokens=1)
    with pytest.raises(BlockIdError, match="33 tokens at block_size 32 need 2"):
        cache.export_blocks([1, 2, 3], num_tokens=33)
    with pytest.raises(BlockIdError, match="need 2"):
        cache.import_blocks(torch.zeros(cache.staging_bytes(1), dtype=torch.uint8), [1],
                            num_tokens=64)


def test_import_refuses_wrong_staging_size():
    cache = make_cache()
    with pytest.raises(ValueError, match="exactly"):
        cache.import_blocks(torch.zeros(10, dtype=torch.uint8), [1])


def test_cache_refuses_tensors_that_disagree_with_layout():
    cache = make_cache()
    bad = [t.float() for t in cache.regions]
    with pytest.raises(ValueError, match="dtype"):
        PagedKVCache(cache.layout, bad)
    with pytest.raises(ValueError, match="regions"):
        PagedKVCache(cache.layout, cache.regions[:1])


def test_staging_pool_reuses_buffers():
    pool = StagingPool(pin_memory=False)
    a = pool.acquire(5000)
    ptr = a.data_ptr()
    pool.release(a)
    b = pool.acquire(6000)  # same 8 KiB bucket
    assert b.data_ptr() == ptr and b.numel() == 6000
    pool.release(b)
    assert pool.cached_bytes == 8192


def test_zero_blocks_is_a_no_op():
    cache = make_cache()
    out = cache.export_blocks([])
    assert out.numel() == 0
    cache.import_blocks(out, [])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", ["one", "all", "reversed", "adjacent-run"])
def test_kernel_edge_cases_byte_exact(path, case):
    src, dst = make_cache(num_blocks=12, seed=4), make_cache(num_blocks=12, seed=5)
    ids = {"one": [7], "all": list(range(12)), "reversed": list(range(11, -1, -1)),
           "adjacent-run": [2, 3, 4, 5, 9, 10]}[case]
    staging = torch.empty(src.staging_bytes(len(ids)), dtype=torch.uint8)
    kernels.gather(src.byte_views, ids, staging, path=path)
    want = torch.stack([v[ids] for v in src.byte_views]).flatten()
    assert torch.equal(staging, want)
    kernels.scatter(staging, dst.byte_views, ids, path=path)
    for sv, dv in zip(src.byte_views, dst.byte_views):
        assert torch.equal(sv[ids], dv[ids])


@pytest.mark.skipif(not kernels.cpu_kernel_available(), reason="CPU kernel not built")
@settings(max_examples=60, deadline=None)
@given(block_bytes=st.one_of(st.integers(1, 64), st.integers(256, 3000)), extra_stride=st.integers(0, 40),
       offset=st.integers(0, 31), num_regions=st.integers(1, 3), num_blocks=st.integers(1, 12),
       streaming=st.booleans(), data=st.data())
def test_cpu_kernel_byte_exact_any_alignment(block_bytes, extra_stride, offset,
                                             num_regions, num_blocks, streaming, data):
    """Unaligned bases, odd block sizes, padded strides, with and without
    streaming stores: the kernel matches torch indexing byte for byte and
    writes nothing outside the selected blocks."""
    saved = kernels.STREAM_BYTES
    kernels.set_stream_threshold(1 if streaming else 0)
    try:
        _check_cpu_kernel(block_bytes, extra_stride, offset, num_regions, num_blocks, data)
    finally:
        kernels.set_stream_threshold(saved)


def _check_cpu_kernel(block_bytes, extra_stride, offset, num_regions, num_blocks, data):
    stride = block_bytes + extra_stride
    g = torch.Generator().manual_seed(block_bytes * 31 + offset)

    def regions(seed_shift):
        out = []
        for _ in range(num_regions):
            buf = torch.randint(0, 256, (offset + num_blocks * stride,), dtype=torch.uint8,
                                generator=g)
            out.append(buf[offset:].as_strided((num_blocks, block_bytes), (stride, 1)))
        return out

    src, dst = regions(0), regions(1)
    dst_bufs_before = [d.as_strided((num_blocks * stride,), (1,)).clone() for d in dst]
    n = data.draw(st.integers(0, num_blocks))
    src_ids = data.draw(st.permutations(range(num_blocks)))[:n]
    dst_ids = data.draw(st.permutations(range(num_blocks)))[:n]
    staging = torch.full((num_regions * n * block_bytes,), 0xAB, dtype=torch.uint8)
    kernels.gather(src, src_ids, staging, path="cpu_kernel")
    want = (torch.stack([r[src_ids] for r in src]).flatten() if n
            else torch.empty(0, dtype=torch.uint8))
    assert torch.equal(staging, want)
    kernels.scatter(staging, dst, dst_ids, path="cpu_kernel")
    for r, (d, before) in enumerate(zip(dst, dst_bufs_before)):
        expected = before.clone()
        for s, t in zip(src_ids, dst_ids):
            expected[t * stride:t * stride + block_bytes] = src[r][s]
        assert torch.equal(d.as_strided((num_blocks * stride,), (1,)), expected)


def test_copy_digest_and_read_threads_follow_the_cpus_this_process_may_run_on():
    """Threads for large copies, digests and cma reads are counted from the
    process's CPU affinity (an engine pinned to one core, a container's
    cpuset), not the machine's cores; the environment still overrides."""
    script = (
        "import os, json\n"
        "os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\n"
        "from kvbridge.cache import checksum, kernels\n"
        "from kvbridge.transport import cma\n"
        "print(json.dumps([kernels.copy_threads(), checksum.digest_threads(),"
        " cma.read_threads()]))\n")
    env = {k: v for k, v in os.environ.items()
           if k not in ("KVBRIDGE_KERNEL_THREADS", "KVBRIDGE_DIGEST_THREADS",
                        "KVBRIDGE_CMA_THREADS")}
    pinned = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, timeout=120, check=True)
    assert json.loads(pinned.stdout.splitlines()[-1]) == [1, 1, 1], pinned.stderr
    overridden = subprocess.run([sys.executable, "-c", script], capture_output=True,
                                text=True, timeout=120, check=True,
                                env={**env, "KVBRIDGE_KERNEL_THREADS": "3",
                                     "KVBRIDGE_DIGEST_THREADS": "2",
                                     "KVBRIDGE_CMA_THREADS": "2"})
    assert json.loads(overridden.stdout.splitlines()[-1]) == [3, 2, 2], overridden.stderr
    from kvbridge.cache import checksum
    cpus = len(os.sched_getaffinity(0))
    if "KVBRIDGE_KERNEL_THREADS" not in os.environ:
        assert kernels.copy_threads() == min(8, cpus)
    if "KVBRIDGE_DIGEST_THREADS" not in os.environ:
        assert checksum.digest_threads() == min(4, cpus)
