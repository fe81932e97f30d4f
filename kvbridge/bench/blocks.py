# SPDX-License-Identifier: Apache-2.0
"""``kvbridge bench blocks``: gather/scatter GB/s against a plain memcpy.

For each block shape (the tiny model's and a Llama-8B-sized one) and block
count, it exports (gathers) and imports (scatters) randomly chosen,
non-contiguous block ids of a 2-layer paged cache, through every available copy
path (compiled CPU kernel, torch ops), and times a one-thread libc ``memcpy`` of
the same number of bytes in the same run. Ratios are to that memcpy.
"""

from __future__ import annotations

import ctypes
import random

import torch

from kvbridge import kernels
from kvbridge.bench.common import Progress, fmt_bytes, table, time_it, write_results
from kvbridge.blocks import PagedKVCache
from kvbridge.layout import KVLayout

#: name -> (kv_heads, block_size, head_size); vLLM CPU layout, bf16, 2 layers.
BLOCK_SHAPES = {
    "tiny": (2, 128, 64),      # the tiny model: 64 KiB per block per layer
    "llama8b": (8, 128, 128),  # Llama-3-8B per layer: 2 x 8 x 128 x 128 x bf16 = 512 KiB
}
NUM_LAYERS = 2


def make_cache(shape: str, num_blocks: int) -> PagedKVCache:
    heads, block_size, head_size = BLOCK_SHAPES[shape]
    regions = [torch.randint(-128, 127, (num_blocks, heads, block_size, 2 * head_size),
                             dtype=torch.int16).view(torch.bfloat16)
               for _ in range(NUM_LAYERS)]
    layout = KVLayout.from_tensors(regions, model=f"bench-{shape}", block_size=block_size,
                                   num_kv_heads=heads, head_size=head_size,
                                   memory_layout="LBHNC")
    return PagedKVCache(layout, regions)


def run(quick: bool = False, json_path: str | None = None, progress: bool = True) -> dict:
    counts = [1, 16, 128] if quick else [1, 16, 128, 1024]
    # "cpu_kernel_1t": the CPU kernel held to one thread, against the one-thread memcpy.
    paths = (["cpu_kernel", "cpu_kernel_1t", "torch"] if kernels.cpu_kernel_available()
             else ["torch"])
    plan = [(s, n) for s in BLOCK_SHAPES for n in counts
            if not (quick and s == "llama8b" and n > 128)]
    prog = Progress(len(plan), progress)
    rng = random.Random(0)
    results, rows = [], []
    for shape, n in plan:
        cache = make_cache(shape, max(2 * n, 4))
        ids = rng.sample(range(cache.num_blocks), n)
        nbytes = cache.staging_bytes(n)
        staging = torch.empty(nbytes, dtype=torch.uint8)
        src = torch.empty(nbytes, dtype=torch.uint8).fill_(1)
        min_time = 0.05 if quick else 0.2
        t_memcpy = time_it(lambda: ctypes.memmove(staging.data_ptr(), src.data_ptr(), nbytes),
                           min_time=min_time)
        memcpy_gbps = nbytes / t_memcpy / 1e9
        entry = {"shape": shape, "blocks": n, "bytes": nbytes, "memcpy_gbps": memcpy_gbps}
        row = [shape, n, fmt_bytes(nbytes), f"{memcpy_gbps:.2f}"]
        for path in paths:
            kpath, threads = path.removesuffix("_1t"), kernels.NUM_THREADS
            if path.endswith("_1t"):
                kernels.NUM_THREADS = 1
            try:
                t_g = time_it(lambda: kernels.gather(cache.byte_views, ids, staging, path=kpath),
                              min_time=min_time)
                t_s = time_it(lambda: kernels.scatter(staging, cache.byte_views, ids,
                                                      path=kpath), min_time=min_time)
            finally:
                kernels.NUM_THREADS = threads
            g, s = nbytes / t_g / 1e9, nbytes / t_s / 1e9
            entry[path] = {"gather_gbps": g, "scatter_gbps": s,
                           "gather_vs_memcpy": g / memcpy_gbps, "scatter_vs_memcpy": s / memcpy_gbps}
            row += [f"{g:.2f} ({g / memcpy_gbps:.2f}x)", f"{s:.2f} ({s / memcpy_gbps:.2f}x)"]
        # Correctness in the benchmark too: a round trip must reproduce the blocks.
        out = cache.export_blocks(ids)
        ref = torch.stack([v[ids] for v in cache.byte_views]).flatten()
        entry["verified"] = bool(torch.equal(out, ref))
        cache.pool.release(out)
        results.append(entry)
        rows.append(row + ["yes" if entry["verified"] else "NO"])
        prog.step(f"{shape} x {n} blocks")
    headers = ["block", "blocks", "bytes", "memcpy GB/s"]
    for path in paths:
        headers += [f"{path} gather GB/s", f"{path} scatter GB/s"]
    headers.append("verified")
    text = table(headers, rows)
    print(text)
    print(f"\nlayers: {NUM_LAYERS}; block ids random, non-contiguous; memcpy = one-thread libc "
          f"memcpy of the same bytes; kernel threads: {kernels.NUM_THREADS} (cpu_kernel_1t: 1); "
          f"streaming stores from {fmt_bytes(kernels.STREAM_BYTES)}")
    write_results("blocks" + ("-quick" if quick else ""),
                  {"paths": paths, "layers": NUM_LAYERS, "results": results}, text, json_path)
    return {"results": results}
