# SPDX-License-Identifier: Apache-2.0
"""End-to-end KV checksums: one 64-bit digest per block.

The producer digests each block when it publishes a request (the bytes vLLM
just computed); the consumer digests the blocks it landed and compares before
it reports the pull done. A mismatch - a flipped bit on the wire or in a NIC,
a block reused under a read, a wrong region mapping - becomes a load error that
vLLM's ``kv_load_failure_policy`` handles (fail or recompute), never garbage.

A block's digest is XXH3-64 over its bytes in region order (layer by layer, K
then V): the digest of region ``r`` is seeded with the digest of region
``r - 1``. XXH3 was picked by measurement (64 MiB in 1 MiB pieces, one core of
this 2-core machine, GB/s): xxh3_64 17.3, crc32c (``crc32c`` package) 16.3,
zlib.crc32 2.5 - and 64 bits make an accidental match of corrupted bytes
practically impossible, where 32 bits leave one in four billion.

Host memory only: a KV cache in GPU memory is digested in its host mirror
(``HostMirror``), which is where the transports read and write.
"""

from __future__ import annotations

import ctypes
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import xxhash

from kvbridge.cache import kernels

if TYPE_CHECKING:
    from kvbridge.cache.blocks import PagedKVCache
    from kvbridge.cache.shard import BlockSlice

_digest = xxhash.xxh3_64_intdigest
#: From this many (block, region) pieces up, a whole-block digest runs in C
#: (``csrc/cpu/kvb_cma.cpp``) in one call without the GIL; below it the
#: Python loop costs less than the call.
NATIVE_MIN_PIECES = 16
#: Digests of at least this many bytes in all are split across
#: ``digest_threads()`` threads (``KVBRIDGE_DIGEST_THREADS``, else the CPUs
#: this process may run on, at most 4). 64 MiB of Llama-sized blocks here:
#: 2.1 ms on one thread, 1.2 on two when part of it is in L3 (a producer
#: digesting what it just computed); 1.8-2.0 either way right after a 64 MiB
#: NIXL read, where the pass is bound by memory bandwidth.
PARALLEL_MIN_BYTES = 8 << 20
PARALLEL_THREADS = kernels.threads_from_env("KVBRIDGE_DIGEST_THREADS")


def digest_threads() -> int:
    return kernels.thread_count(PARALLEL_THREADS, 4)


#: The entry points C code digests with, in ``Xxh3Api``'s order
#: (``csrc/cpu/kvb_cma.cpp``): one-shot, then the streaming state's.
_XXH3_API = ("XXH3_64bits_withSeed", "XXH3_createState", "XXH3_freeState",
             "XXH3_64bits_reset_withSeed", "XXH3_64bits_update", "XXH3_64bits_digest")


def _xxh3_symbol(lib: ctypes.CDLL, name: str):
    # The package builds xxHash with runtime dispatch: ``_dispatch`` picks
    # AVX2/AVX-512 where the CPU has them (~3x the plain SSE2 entry point on
    # data in cache), which is what ``_digest`` itself calls.
    try:
        return getattr(lib, name + "_dispatch")
    except AttributeError:
        return getattr(lib, name)


def _native_api() -> ctypes.Array | None:
    """The XXH3 entry points of the ``xxhash`` package's own library - what
    ``_digest`` calls - as a C table for ``csrc/cpu`` to digest with; None if
    one is not exported there or they do not give ``_digest``'s results."""
    try:
        lib = ctypes.CDLL(xxhash._xxhash.__file__)
        oneshot, create, free, reset, update, digest = (_xxh3_symbol(lib, n) for n in _XXH3_API)
    except (OSError, AttributeError):
        return None
    oneshot.restype = digest.restype = ctypes.c_uint64
    oneshot.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint64]
    create.restype = ctypes.c_void_p
    free.argtypes = digest.argtypes = [ctypes.c_void_p]
    reset.argtypes = [ctypes.c_void_p, ctypes.c_uint64]
    update.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t]
    probe = bytes(range(256)) * 300  # past every size class of XXH3
    state = create()
    if not state:
        return None
    try:
        for n in (0, 17, 200, len(probe)):
            want = _digest(probe[:n], 12345)
            reset(state, 12345)
            for lo in range(0, n, 4099):  # streamed in pieces: the same digest
                update(state, probe[lo:min(n, lo + 4099)], min(n, lo + 4099) - lo)
            if oneshot(probe[:n], n, 12345) != want or digest(state) != want:
                return None
    finally:
        free(state)
    fns = (oneshot, create, free, reset, update, digest)
    return (ctypes.c_void_p * len(fns))(*(ctypes.cast(f, ctypes.c_void_p).value for f in fns))


#: (C library, XXH3 table) when digests can run in C, else None
NATIVE = (kernels.cpu_lib(), _native_api()) if kernels.cpu_lib() is not None else None
if NATIVE is not None and NATIVE[1] is None:
    NATIVE = None


def native_block_digests(cache: PagedKVCache, block_ids: Sequence[int],
                         threads: int | None = None) -> list[int] | None:
    """``block_digests`` of whole blocks in C, without the GIL; split across
    ``threads`` (default ``digest_threads()`` from ``PARALLEL_MIN_BYTES``
    up) threads (None: not available)."""
    if NATIVE is None or not len(block_ids):
        return None
    lib, api = NATIVE
    n = len(block_ids)
    seg, regions = cache.layout.block_bytes, cache.layout.num_regions
    addrs = cache.run_starts(block_ids, None)  # region-major: region r of block i at r*n + i
    out = np.empty(n, dtype=np.uint64)

    def share(lo: int, count: int) -> None:
        rc = lib.kvb_digest_blocks(addrs[lo:].ctypes.data, n, count, regions, seg,
                                   api, out[lo:].ctypes.data)
        if rc != 0:
            raise ValueError(f"kvb_digest_blocks failed ({rc})")

    if threads is None:
        threads = digest_threads() if n * seg * regions >= PARALLEL_MIN_BYTES else 1
    run_shares(share, n, threads)
    return out.tolist()


#: Size of the one pool large digests and cma reads are split over; its
#: threads start only as shares need them, so this only caps them.
POOL_MAX_THREADS = 32
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _shared_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(POOL_MAX_THREADS, thread_name_prefix="kvb-digest")
        return _pool


def run_shares(share, n: int, threads: int) -> None:
    """``share(lo, count)`` over ``[0, n)`` cut into ``threads`` shares, run on
    the shared pool (one share: on this thread). For C calls that release the
    GIL: digests here, the cma backend's read-and-digest."""
    per = -(-n // max(1, threads)) if n else 1
    if threads <= 1 or n <= per:
        share(0, n)
        return
    list(_shared_pool().map(lambda lo: share(lo, min(per, n - lo)), range(0, n, per)))


def submit(fn, *args) -> Future:
    """``fn(*args)`` on the shared pool, for work that overlaps the caller's
    (the nixl backend digests each landed piece while the next one moves)."""
    return _shared_pool().submit(fn, *args)


def supported(cache: PagedKVCache) -> bool:
    """Whether ``cache``'s blocks can be digested here (host memory)."""
    return cache.device.type == "cpu"


def block_digests(cache: PagedKVCache, block_ids: Sequence[int],
                  block_slice: BlockSlice | None = None) -> list[int]:
    """One digest per block of ``block_ids``, in that order; with
    ``block_slice``, of those bytes of each block only (its runs in order, as
    if contiguous: a producer's slice and the consumer blocks it fills agree)."""
    if block_slice is not None:
        return _slice_digests(cache, block_ids, block_slice)
    if len(block_ids) * cache.layout.num_regions >= NATIVE_MIN_PIECES:
        out = native_block_digests(cache, block_ids)
        if out is not None:
            return out
    return python_block_digests(cache, block_ids)


def python_block_digests(cache: PagedKVCache, block_ids: Sequence[int]) -> list[int]:
    """``block_digests`` of whole blocks, region by region from Python."""
    views = cache.region_arrays()
    out = []
    for b in block_ids:
        h = 0
        for v in views:
            h = _digest(v[b], h)
        out.append(h)
    return out


def _slice_digests(cache: PagedKVCache, block_ids: Sequence[int],
                   sl: BlockSlice) -> list[int]:
    views, span = cache._slice_views(sl)
    arrays = [v.numpy() for v in views]
    out = []
    for b in block_ids:
        h, first = 0, b * span
        for a in arrays:
            rows = a[first:first + sl.rows]
            h = _digest(rows if sl.rows == 1 else np.ascontiguousarray(rows), h)
        out.append(h)
    return out


def staging_digests(staging, num_blocks: int, num_regions: int) -> list[int]:
    """The digests ``block_digests`` gives, of blocks (or slices) gathered
    region-major into ``staging`` (a uint8 tensor or array)."""
    a = np.asarray(staging).reshape(num_regions, num_blocks, -1) if num_blocks else None
    out = []
    for i in range(num_blocks):
        h = 0
        for r in range(num_regions):
            h = _digest(a[r, i], h)
        out.append(h)
    return out


class LandingDigests:
    """Digests of blocks computed while their bytes land, buffer by buffer in
    ``cache.block_buffers(block_ids)`` order (region-major), so each block is
    hashed while it is still in the CPU cache rather than re-read from memory
    after the whole pull: on this 2-core machine a 64 MiB pull over tcp then
    pays ~3 ms for its digests instead of ~8.

    Call ``progress(i, offset)`` whenever buffer ``i`` has ``offset`` bytes (all
    earlier buffers complete); blocks wholly landed are hashed then.
    """

    def __init__(self, cache: PagedKVCache, block_ids: Sequence[int]):
        self._views = cache.region_arrays()
        self._bb = cache.layout.block_bytes
        self._runs = cache.block_runs(block_ids)
        self._h = dict.fromkeys(block_ids, 0)
        self._buf = 0      # first buffer not wholly hashed
        self._done = 0     # blocks of it hashed

    def progress(self, buf: int, offset: int) -> None:
        while self._buf < len(self._runs) and (self._buf < buf or (
                self._buf == buf and (self._done + 1) * self._bb <= offset)):
            region, start, count = self._runs[self._buf]
            upto = count if self._buf < buf else min(count, offset // self._bb)
            v, h = self._views[region], self._h
            for b in range(start + self._done, start + upto):
                h[b] = _digest(v[b], h[b])
            self._done = upto
            if upto == count:
                self._buf, self._done = self._buf + 1, 0

    def digests(self, block_ids: Sequence[int]) -> list[int]:
        self.progress(len(self._runs), 0)
        return [self._h[b] for b in block_ids]


def flip_byte(cache: PagedKVCache, block_id: int, offset: int = 0) -> None:
    """Fault injection: corrupt byte ``offset`` of ``block_id`` (first region)."""
    cache.region_arrays()[0][block_id, offset] ^= 0xFF
