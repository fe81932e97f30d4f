# SPDX-License-Identifier: Apache-2.0
"""``kvbridge bench blocks``: gather/scatter GB/s against a plain memcpy.

For each block shape (the tiny model's and a Llama-8B-sized one) and block
count, it exports (gathers) and imports (scatters) randomly chosen,
non-contiguous block ids of a 2-layer paged cache, through every available copy
path (compiled CPU kernel, torch ops), and times a one-thread libc ``memcpy`` of
the same number of bytes in the same run. Ratios are to that memcpy. It also
times the block-to-block copy into a second cache (``copy_blocks``, what a
host mirror's staging runs) and, on a GPU, the CUDA kernel (``run_gpu``).
"""

from __future__ import annotations

import ctypes
import random

import torch

from kvbridge.bench.common import Progress, fmt_bytes, table, time_it, write_results
from kvbridge.cache import kernels
from kvbridge.cache.blocks import PagedKVCache
from kvbridge.cache.synthetic import synthetic_cache

#: name -> (kv_heads, block_size, head_size); vLLM CPU layout, bf16, 2 layers.
BLOCK_SHAPES = {
    "tiny": (2, 128, 64),      # the tiny model: 64 KiB per block per layer
    "llama8b": (8, 128, 128),  # Llama-3-8B per layer: 2 x 8 x 128 x 128 x bf16 = 512 KiB
}
NUM_LAYERS = 2


def make_cache(shape: str, num_blocks: int) -> PagedKVCache:
    heads, block_size, head_size = BLOCK_SHAPES[shape]
    def fill(_, raw: torch.Tensor) -> None:  # small int16 bit patterns
        raw.view(torch.int16).copy_(torch.randint(-128, 127, (raw.numel() // 2,),
                                                  dtype=torch.int16))

    return synthetic_cache(num_blocks, kv_heads=heads, block_size=block_size,
                           head_size=head_size, layers=NUM_LAYERS, model=f"bench-{shape}",
                           fill=fill)


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
        if kernels.cpu_kernel_available():
            # Block to block into a second cache (a host mirror's copy): the
            # path host staging takes, here host to host.
            mirror = [torch.empty_like(v) for v in cache.byte_views]
            t_c = time_it(lambda: kernels.copy_blocks(cache.byte_views, mirror, ids, ids),
                          min_time=min_time)
            c = nbytes / t_c / 1e9
            entry["copy_blocks"] = {"gbps": c, "vs_memcpy": c / memcpy_gbps,
                                    "verified": all(torch.equal(m[ids], v[ids]) for m, v in
                                                    zip(mirror, cache.byte_views))}
            row.append(f"{c:.2f} ({c / memcpy_gbps:.2f}x)")
        # Correctness in the benchmark too: a round trip must reproduce the blocks.
        out = cache.export_blocks(ids)
        ref = torch.stack([v[ids] for v in cache.byte_views]).flatten()
        entry["verified"] = bool(torch.equal(out, ref)) and entry.get(
            "copy_blocks", {}).get("verified", True)
        cache.pool.release(out)
        results.append(entry)
        rows.append(row + ["yes" if entry["verified"] else "NO"])
        prog.step(f"{shape} x {n} blocks")
    headers = ["block", "blocks", "bytes", "memcpy GB/s"]
    for path in paths:
        headers += [f"{path} gather GB/s", f"{path} scatter GB/s"]
    if kernels.cpu_kernel_available():
        headers.append("copy_blocks GB/s")
    headers.append("verified")
    text = table(headers, rows)
    print(text)
    print(f"\nlayers: {NUM_LAYERS}; block ids random, non-contiguous; memcpy = one-thread libc "
          f"memcpy of the same bytes; kernel threads: {kernels.copy_threads()} (cpu_kernel_1t: 1); "
          f"streaming stores from {fmt_bytes(kernels.STREAM_BYTES)}; copy_blocks = block to block "
          "into a second cache (host staging's copy), CPU kernel")
    gpu = run_gpu(counts, quick, progress) if torch.cuda.is_available() else None
    if gpu is not None:
        text += "\n\n" + gpu["text"]
    else:
        print("\nno CUDA device: the CUDA kernel rows are skipped")
    write_results("blocks" + ("-quick" if quick else ""),
                  {"paths": paths, "layers": NUM_LAYERS, "results": results,
                   "gpu_results": gpu["results"] if gpu else None}, text, json_path)
    return {"results": results, "gpu_results": gpu["results"] if gpu else None}


def run_gpu(counts: list[int], quick: bool, progress: bool) -> dict:
    """The CUDA kernel on a device cache: gather into device memory and into
    pinned host memory, against a plain device copy (``copy_``) and a plain
    device -> pinned copy of the same bytes in the same run."""
    def timed(fn):
        def call():
            fn()
            torch.cuda.synchronize()
        return time_it(call, min_time=0.05 if quick else 0.2)

    rng = random.Random(1)
    rows, results = [], []
    plan = [(s, n) for s in BLOCK_SHAPES for n in counts]
    prog = Progress(len(plan), progress)
    for shape, n in plan:
        cache = make_cache(shape, max(2 * n, 4))
        regions = [v.cuda() for v in cache.byte_views]
        ids = rng.sample(range(cache.num_blocks), n)
        nbytes = cache.staging_bytes(n)
        dev_stage = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        host_stage = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        dev_src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        t_copy = timed(lambda: dev_stage.copy_(dev_src))
        t_d2h = timed(lambda: host_stage.copy_(dev_src, non_blocking=True))
        t_g = timed(lambda: kernels.gather(regions, ids, dev_stage))
        t_s = timed(lambda: kernels.scatter(dev_stage, regions, ids))
        t_gh = timed(lambda: kernels.gather(regions, ids, host_stage))
        want = torch.stack([r[ids] for r in regions]).flatten()
        kernels.gather(regions, ids, dev_stage)
        torch.cuda.synchronize()
        verified = bool(torch.equal(dev_stage, want))
        gb = lambda t: nbytes / t / 1e9  # noqa: E731
        entry = {"shape": shape, "blocks": n, "bytes": nbytes, "device_copy_gbps": gb(t_copy),
                 "d2h_copy_gbps": gb(t_d2h), "gather_gbps": gb(t_g), "scatter_gbps": gb(t_s),
                 "gather_to_pinned_gbps": gb(t_gh), "verified": verified,
                 "gather_vs_device_copy": t_copy / t_g, "scatter_vs_device_copy": t_copy / t_s,
                 "gather_to_pinned_vs_d2h": t_d2h / t_gh}
        results.append(entry)
        rows.append([shape, n, fmt_bytes(nbytes), f"{gb(t_copy):.1f}",
                     f"{gb(t_g):.1f} ({t_copy / t_g:.2f}x)", f"{gb(t_s):.1f} ({t_copy / t_s:.2f}x)",
                     f"{gb(t_d2h):.1f}", f"{gb(t_gh):.1f} ({t_d2h / t_gh:.2f}x)",
                     "yes" if verified else "NO"])
        prog.step(f"cuda {shape} x {n} blocks")
    text = table(["block", "blocks", "bytes", "device copy GB/s", "cuda gather GB/s",
                  "cuda scatter GB/s", "d2h copy GB/s", "cuda gather->pinned GB/s", "verified"],
                 rows)
    text += (f"\n\n{torch.cuda.get_device_name()}: device copy = one copy_ of the same bytes; "
             "d2h copy = one copy_ into pinned host memory")
    print("\n" + text)
    return {"results": results, "text": text}
