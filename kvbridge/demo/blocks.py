# SPDX-License-Identifier: Apache-2.0
"""Export blocks in one process and import them in another, over a real socket.

The producer process fills a paged KV cache shaped like the tiny model's (vLLM
CPU layout) with seeded random bytes, exports a scattered set of block ids and
streams the staging buffer to the consumer process over a TCP socket on
127.0.0.1. The consumer imports the bytes into *different* block ids of its own
cache and checks every byte against the producer's digest, and that no other
block changed. Used by ``kvbridge demo-blocks`` and the cross-process tests.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import socket
import struct
import time

import torch

from kvbridge.cache.blocks import PagedKVCache
from kvbridge.cache.synthetic import synthetic_cache
from kvbridge.layout import KVLayout
from kvbridge.protocol import recv_exact_into

_HDR = struct.Struct("!Q")


def tiny_layout_cache(num_blocks: int, seed: int | None, model: str = "tiny-llama",
                      block_size: int = 128, kv_heads: int = 2, head_size: int = 64,
                      layers: int = 2, dtype: torch.dtype = torch.bfloat16) -> PagedKVCache:
    """A paged cache shaped like vLLM's CPU cache of the tiny model."""
    return synthetic_cache(num_blocks, kv_heads=kv_heads, block_size=block_size,
                           head_size=head_size, layers=layers, dtype=dtype, model=model,
                           seed=seed)


def _block_digest(cache: PagedKVCache, ids: list[int]) -> str:
    h = hashlib.sha256()
    for v in cache.byte_views:
        for b in ids:
            h.update(v[b].numpy().tobytes())
    return h.hexdigest()


def producer(port_q, src_ids: list[int], num_blocks: int, seed: int) -> None:
    cache = tiny_layout_cache(num_blocks, seed)
    with socket.create_server(("127.0.0.1", 0)) as srv:
        port_q.put(srv.getsockname()[1])
        conn, _ = srv.accept()
        with conn:
            t0 = time.perf_counter()
            staging = cache.export_blocks(src_ids)
            t_export = time.perf_counter() - t0
            meta = json.dumps({"layout": cache.layout.to_dict(), "ids": src_ids,
                               "digest": _block_digest(cache, src_ids),
                               "export_s": t_export}).encode()
            conn.sendall(_HDR.pack(len(meta)) + meta + _HDR.pack(staging.numel()))
            conn.sendall(memoryview(staging.numpy()))
            conn.recv(1)  # wait for the consumer's ack before tearing down


def consumer(port: int, dst_ids: list[int], num_blocks: int) -> dict:
    from kvbridge.layout import check_compatible

    cache = tiny_layout_cache(num_blocks, seed=None)
    untouched_before = [i for i in range(num_blocks) if i not in set(dst_ids)]
    with socket.create_connection(("127.0.0.1", port)) as sock:
        hdr = bytearray(_HDR.size)
        recv_exact_into(sock, memoryview(hdr))
        meta_buf = bytearray(_HDR.unpack(hdr)[0])
        recv_exact_into(sock, memoryview(meta_buf))
        meta = json.loads(meta_buf)
        check_compatible(cache.layout, KVLayout.from_dict(meta["layout"]))
        recv_exact_into(sock, memoryview(hdr))
        nbytes = _HDR.unpack(hdr)[0]
        staging = cache.pool.acquire(nbytes)
        t0 = time.perf_counter()
        recv_exact_into(sock, memoryview(staging.numpy()))
        t_wire = time.perf_counter() - t0
        t0 = time.perf_counter()
        cache.import_blocks(staging, dst_ids)
        t_import = time.perf_counter() - t0
        cache.pool.release(staging)
        sock.sendall(b"k")
    others_zero = all(not any(v[i].any() for v in cache.byte_views) for i in untouched_before)
    return {"bytes": nbytes, "blocks": len(dst_ids), "export_s": meta["export_s"],
            "wire_s": t_wire, "import_s": t_import,
            "digest_ok": _block_digest(cache, dst_ids) == meta["digest"],
            "other_blocks_untouched": others_zero}


def run_pair(src_ids: list[int], dst_ids: list[int], num_blocks: int, seed: int = 1) -> dict:
    """Producer in a child process, consumer here; returns the consumer's report."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=producer, args=(q, src_ids, num_blocks, seed), daemon=True)
    proc.start()
    try:
        port = q.get(timeout=180)  # a spawned process imports torch: slow under load
        report = consumer(port, dst_ids, num_blocks)
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
            proc.join()
    report["producer_exitcode"] = proc.exitcode
    return report


def main(num_blocks: int = 64, model_dir: str | None = None) -> int:
    import random

    from kvbridge.demo import tiny_model

    path = tiny_model.ensure(model_dir or tiny_model.default_path())
    print(f"tiny model: {path}")
    total = num_blocks * 4
    rng = random.Random(0)
    src = rng.sample(range(total), num_blocks)
    dst = rng.sample(range(total), num_blocks)
    r = run_pair(src, dst, total)
    mb = r["bytes"] / 1e6
    print(f"moved {r['blocks']} blocks ({mb:.1f} MB) between two processes over 127.0.0.1")
    print(f"  export (gather) {r['export_s'] * 1e3:7.2f} ms  {mb / 1e3 / r['export_s']:.2f} GB/s")
    print(f"  socket          {r['wire_s'] * 1e3:7.2f} ms  {mb / 1e3 / r['wire_s']:.2f} GB/s")
    print(f"  import (scatter){r['import_s'] * 1e3:7.2f} ms  {mb / 1e3 / r['import_s']:.2f} GB/s")
    ok = r["digest_ok"] and r["other_blocks_untouched"]
    print(f"  every byte matches: {r['digest_ok']}; other blocks untouched: "
          f"{r['other_blocks_untouched']}")
    return 0 if ok else 1
