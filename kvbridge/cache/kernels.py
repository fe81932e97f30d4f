# SPDX-License-Identifier: Apache-2.0
"""Block gather/scatter: the compiled csrc kernel when built, torch ops otherwise.

The CPU kernel (``csrc/cpu/kvb_copy.cpp``) is a plain shared library built by
``setup.py`` and called through ctypes with raw pointers, so it needs no torch
headers and works with any torch build. ``KVBRIDGE_KERNEL=torch`` forces the
torch path (used by tests and benchmarks to compare the two).

Both paths take uint8 ``[num_blocks, block_bytes]`` views (one per region, all
with the same block stride) and a staging buffer laid out region-major.
"""

from __future__ import annotations

import array
import ctypes
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import torch

_LIB_DIR = Path(__file__).resolve().parents[1] / "_lib"
CPU_LIB_NAME = "libkvbridge_cpu.so"
CUDA_LIB_NAME = "libkvbridge_cuda.so"


def threads_from_env(name: str) -> int | None:
    """A thread count set in environment variable ``name``; None if unset."""
    value = os.environ.get(name)
    return max(1, int(value)) if value else None


def usable_cpus() -> int:
    """CPUs the calling thread may run on - its affinity (an engine pinned to a
    core, a container's cpuset), not the machine's count: threads beyond it
    only take turns on the same cores, next to the engine's own work."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def thread_count(override: int | None, cap: int) -> int:
    """Threads for one large operation: ``override`` (an environment
    variable's) if set, else the CPUs this process may run on, at most
    ``cap``. Read at use time: vLLM pins a worker after kvbridge is imported."""
    return override or min(cap, usable_cpus())


#: ``KVBRIDGE_KERNEL_THREADS``: threads the CPU kernel may use for one large
#: copy [unset: the CPUs this process may run on, at most 8]. Copies under
#: 4 MiB always run on the calling thread.
NUM_THREADS = threads_from_env("KVBRIDGE_KERNEL_THREADS")


def copy_threads() -> int:
    return thread_count(NUM_THREADS, 8)


#: CPU copies of at least this many bytes in total use streaming (non-temporal)
#: stores, which skip reading the destination into cache first; 0 turns them
#: off [4 MiB]. See csrc/cpu/kvb_copy.cpp.
STREAM_BYTES = int(os.environ.get("KVBRIDGE_KERNEL_NT_BYTES", 4 << 20))
#: The C ABIs of csrc/cpu/kvb_copy.cpp and csrc/cuda/kvb_copy.cu this module
#: calls; an older build is not used.
CPU_ABI_VERSION = 4
CUDA_ABI_VERSION = 2


def _load(name: str) -> ctypes.CDLL | None:
    path = _LIB_DIR / name
    if not path.exists():
        return None
    try:
        return ctypes.CDLL(str(path))
    except OSError:
        return None


def _load_checked(name: str, version_fn: str, want: int) -> ctypes.CDLL | None:
    """The library if it is built and has C ABI ``want``; a stale build (an
    older ABI, called with the wrong arguments, would corrupt memory) is
    ignored with a warning and torch copies are used instead."""
    lib = _load(name)
    if lib is None:
        return None
    version = getattr(lib, version_fn)() if hasattr(lib, version_fn) else 0
    if version != want:
        logging.getLogger("kvbridge").warning(
            "kvbridge: %s has C ABI %d, this version needs %d (a stale build: reinstall "
            "kvbridge); using torch copies instead", name, version, want)
        return None
    return lib


def _load_cpu() -> ctypes.CDLL | None:
    lib = _load_checked(CPU_LIB_NAME, "kvb_abi_version", CPU_ABI_VERSION)
    if lib is None:
        return None
    for fn in (lib.kvb_gather, lib.kvb_scatter):
        fn.restype = ctypes.c_int
        fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                       ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int]
    lib.kvb_copy_blocks.restype = ctypes.c_int
    lib.kvb_copy_blocks.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                                    ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                                    ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
    # csrc/cpu/kvb_cma.cpp
    lib.kvb_cma_read_blocks.restype = ctypes.c_int
    lib.kvb_cma_read_blocks.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                                        ctypes.c_void_p]
    lib.kvb_digest_blocks.restype = ctypes.c_int
    lib.kvb_digest_blocks.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                      ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                                      ctypes.c_void_p]
    lib.kvb_set_stream_threshold.restype = None
    lib.kvb_set_stream_threshold.argtypes = [ctypes.c_int64]
    lib.kvb_set_stream_threshold(STREAM_BYTES)
    return lib


_cpu_lib = _load_cpu()


def cpu_lib() -> ctypes.CDLL | None:
    """The CPU library (``csrc/cpu``), or None where it is not built."""
    return _cpu_lib


def set_stream_threshold(nbytes: int) -> None:
    """Set ``STREAM_BYTES`` for this process (tests use it to force either store kind)."""
    global STREAM_BYTES
    STREAM_BYTES = int(nbytes)
    if _cpu_lib is not None:
        _cpu_lib.kvb_set_stream_threshold(STREAM_BYTES)


_cuda_lib = None


def _load_cuda():
    """The CUDA library, loaded on first use (loading needs the CUDA runtime)."""
    global _cuda_lib
    if _cuda_lib is None and cuda_kernel_built() and torch.cuda.is_available():
        lib = _load_checked(CUDA_LIB_NAME, "kvb_cuda_abi_version", CUDA_ABI_VERSION)
        if lib is not None:
            for fn in (lib.kvb_cuda_gather, lib.kvb_cuda_scatter):
                fn.restype = ctypes.c_int
                fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                               ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_int,
                               ctypes.c_void_p]
            lib.kvb_cuda_copy_blocks.restype = ctypes.c_int
            lib.kvb_cuda_copy_blocks.argtypes = [
                ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                ctypes.c_int64, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                ctypes.c_int, ctypes.c_void_p]
        _cuda_lib = lib or False
    return _cuda_lib or None


def _upload_int64(values: list[int], device: torch.device) -> torch.Tensor:
    """Small int64 arrays (pointers, block ids) onto ``device`` on the current
    stream, through pinned memory so the upload does not block the host."""
    return torch.tensor(values, dtype=torch.int64).pin_memory().to(device, non_blocking=True)


def cuda_copy(regions: Sequence[torch.Tensor], ids: Sequence[int], staging: torch.Tensor,
              gather: bool, stream=None) -> None:
    """One CUDA launch for every region and block; staging is device or pinned
    host memory. Asynchronous on ``stream`` (default: the current stream)."""
    lib = _load_cuda()
    if lib is None:
        raise RuntimeError("the CUDA kernel is not built or no CUDA device is present")
    dev = regions[0].device
    stride = regions[0].stride(0)
    if any(r.stride(0) != stride for r in regions):
        raise ValueError("all regions need the same block stride")
    # The calling thread's current device may be another GPU (transport threads
    # start on device 0): launch with the caches' device current.
    with torch.cuda.device(dev):
        stream = stream or torch.cuda.current_stream(dev)
        with torch.cuda.stream(stream):
            table = _upload_int64([*(r.data_ptr() for r in regions), *ids], dev)
        aligned = all(p % 16 == 0 for p in [staging.data_ptr(),
                                            *(r.data_ptr() for r in regions)])
        fn = lib.kvb_cuda_gather if gather else lib.kvb_cuda_scatter
        rc = fn(table.data_ptr(), len(regions), stride, regions[0].shape[1],
                table.data_ptr() + 8 * len(regions), len(ids), staging.data_ptr(),
                int(aligned), ctypes.c_void_p(stream.cuda_stream))
    if rc != 0:
        raise RuntimeError(f"kvbridge CUDA copy failed with {rc}")
    # Keep the uploaded table alive until the kernel has run.
    table.record_stream(stream)


def cuda_kernel_usable() -> bool:
    """The CUDA kernel is built, matches this version, and a CUDA device exists."""
    return _load_cuda() is not None


def cpu_kernel_available() -> bool:
    return _cpu_lib is not None


def cuda_kernel_built() -> bool:
    return (_LIB_DIR / CUDA_LIB_NAME).exists()


def active_path() -> str:
    """``"cpu_kernel"`` or ``"torch"``: what ``gather``/``scatter`` use for host
    memory (device memory uses the CUDA kernel when built, see ``cuda_copy``)."""
    if os.environ.get("KVBRIDGE_KERNEL", "") == "torch" or _cpu_lib is None:
        return "torch"
    return "cpu_kernel"


def _wide(t: torch.Tensor) -> torch.Tensor:
    """View bytes as int64 where alignment allows: torch's indexing ops copy
    element by element, and 8-byte elements are ~10x faster than bytes."""
    if (t.shape[-1] % 8 == 0 and t.data_ptr() % 8 == 0
            and all(s % 8 == 0 for s in t.stride()[:-1])):
        return t.view(torch.int64)
    return t


_PTR_CACHE: dict[tuple[int, ...], ctypes.Array] = {}


def _native_args(regions: Sequence[torch.Tensor], ids: Sequence[int]):
    """(region pointer array, block stride, id array) for the C ABI, or None
    when regions differ in stride. Pointer arrays are cached per region set:
    rebuilding them costs more than copying a small block."""
    stride = regions[0].stride(0)
    key = tuple(r.data_ptr() for r in regions)
    ptrs = _PTR_CACHE.get(key)
    if ptrs is None:
        if any(r.stride(0) != stride for r in regions):
            return None
        if len(_PTR_CACHE) > 64:
            _PTR_CACHE.clear()
        ptrs = _PTR_CACHE[key] = (ctypes.c_void_p * len(regions))(*key)
    id_arr = array.array("q", ids)
    return ptrs, stride, id_arr


def _compiled_copy(regions: Sequence[torch.Tensor], ids: Sequence[int], staging: torch.Tensor,
                   is_gather: bool, path: str) -> bool:
    """Run the compiled kernel for this copy if it applies; False otherwise."""
    if regions[0].device.type == "cuda" and path != "torch" and _load_cuda() is not None:
        cuda_copy(regions, ids, staging, gather=is_gather)
        return True
    if path != "cpu_kernel" or regions[0].device.type != "cpu" or staging.device.type != "cpu":
        return False
    args = _native_args(regions, ids)
    if args is None:
        return False
    ptrs, stride, id_arr = args
    fn = _cpu_lib.kvb_gather if is_gather else _cpu_lib.kvb_scatter
    rc = fn(ptrs, len(regions), stride, regions[0].shape[1], id_arr.buffer_info()[0], len(ids),
            staging.data_ptr(), copy_threads())
    if rc != 0:
        raise RuntimeError(f"kvbridge CPU kernel ({'gather' if is_gather else 'scatter'}) "
                           f"failed with {rc}")
    return True


def gather(regions: Sequence[torch.Tensor], ids: Sequence[int], staging: torch.Tensor,
           path: str | None = None) -> None:
    """``staging[r, i] = regions[r][ids[i]]``; ids already validated."""
    if _compiled_copy(regions, ids, staging, True, path or active_path()):
        return
    n, block_bytes = len(ids), regions[0].shape[1]
    out = _wide(staging.view(len(regions), n, block_bytes))
    idx = torch.as_tensor(ids, dtype=torch.long, device=regions[0].device)
    for r, region in enumerate(regions):
        region = _wide(region)
        if out.device == region.device:
            torch.index_select(region, 0, idx, out=out[r])
        else:
            out[r].copy_(region.index_select(0, idx), non_blocking=True)


def scatter(staging: torch.Tensor, regions: Sequence[torch.Tensor], ids: Sequence[int],
            path: str | None = None) -> None:
    """``regions[r][ids[i]] = staging[r, i]``; ids already validated."""
    if _compiled_copy(regions, ids, staging, False, path or active_path()):
        return
    n, block_bytes = len(ids), regions[0].shape[1]
    src = _wide(staging.view(len(regions), n, block_bytes))
    for r, region in enumerate(regions):
        region = _wide(region)
        # A copy_ per block measured ~2x faster than index_copy_ on the CPU.
        for i, b in enumerate(ids):
            region[b].copy_(src[r, i], non_blocking=True)


def _host_ok_for_cuda(t: torch.Tensor) -> bool:
    """The CUDA kernel can address this tensor: device memory or pinned host memory."""
    return t.device.type == "cuda" or (t.device.type == "cpu" and t.is_pinned())


def copy_blocks(src: Sequence[torch.Tensor], dst: Sequence[torch.Tensor], src_ids: Sequence[int],
                dst_ids: Sequence[int], *, path: str | None = None, stream=None) -> None:
    """``dst[r][dst_ids[i]] = src[r][src_ids[i]]`` for every region ``r``: block
    to block between two paged caches with the same block size (an engine's
    device cache and its host mirror, or two host caches).

    Regions are uint8 ``[num_blocks, block_bytes]`` views, one stride per side;
    ids are validated by the caller. With GPU memory on either side this is one
    CUDA launch for all regions and blocks, then a wait for ``stream`` (default:
    the current stream) - the host side must be pinned, else torch copies are
    used. Host memory on both sides uses the CPU kernel (or torch, see
    ``active_path``).
    """
    if len(src) != len(dst):
        raise ValueError(f"{len(src)} source regions for {len(dst)} destination regions")
    if len(src_ids) != len(dst_ids):
        raise ValueError(f"{len(src_ids)} source ids for {len(dst_ids)} destination ids")
    if not src or not src_ids:
        return
    block_bytes = src[0].shape[1]
    if any(t.shape[1] != block_bytes for t in (*src, *dst)):
        raise ValueError("all regions need the same block size")
    path = path or active_path()
    on_gpu = [t for t in (src[0], dst[0]) if t.device.type == "cuda"]
    if on_gpu:
        lib = _load_cuda() if path != "torch" else None
        if lib is not None and all(_host_ok_for_cuda(t) for t in (*src, *dst)):
            _cuda_copy_blocks(lib, src, dst, src_ids, dst_ids, on_gpu[0].device, stream)
            return
    elif path == "cpu_kernel":
        s_args, d_args = _native_args(src, src_ids), _native_args(dst, dst_ids)
        if s_args is not None and d_args is not None:
            rc = _cpu_lib.kvb_copy_blocks(s_args[0], s_args[1], s_args[2].buffer_info()[0],
                                          d_args[0], d_args[1], d_args[2].buffer_info()[0],
                                          len(src), block_bytes, len(src_ids),
                                          copy_threads())
            if rc != 0:
                raise RuntimeError(f"kvbridge CPU kernel (copy_blocks) failed with {rc}")
            return
    # torch: per region, gather on the source device, then place on the destination's.
    for s, d in zip(src, dst, strict=True):
        s_idx = torch.as_tensor(list(src_ids), dtype=torch.long, device=s.device)
        d_idx = torch.as_tensor(list(dst_ids), dtype=torch.long, device=d.device)
        d.index_copy_(0, d_idx, s.index_select(0, s_idx).to(d.device))
    if on_gpu:
        torch.cuda.current_stream(on_gpu[0].device).synchronize()


def _cuda_copy_blocks(lib, src, dst, src_ids, dst_ids, device, stream) -> None:
    s_stride, d_stride = src[0].stride(0), dst[0].stride(0)
    if any(t.stride(0) != s_stride for t in src) or any(t.stride(0) != d_stride for t in dst):
        raise ValueError("all regions of a side need the same block stride")
    with torch.cuda.device(device):  # see cuda_copy
        stream = stream or torch.cuda.current_stream(device)
        with torch.cuda.stream(stream):
            table = _upload_int64([*(t.data_ptr() for t in src), *(t.data_ptr() for t in dst),
                                   *src_ids, *dst_ids], device)
        n_r, n, base = len(src), len(src_ids), table.data_ptr()
        aligned = all(t.data_ptr() % 16 == 0 for t in (*src, *dst))
        rc = lib.kvb_cuda_copy_blocks(base, s_stride, base + 8 * 2 * n_r,
                                      base + 8 * n_r, d_stride, base + 8 * (2 * n_r + n),
                                      n_r, src[0].shape[1], n, int(aligned),
                                      ctypes.c_void_p(stream.cuda_stream))
        if rc != 0:
            raise RuntimeError(f"kvbridge CUDA copy_blocks failed with {rc}")
        # Synchronous contract: the host side is read or written by the time we return.
        stream.synchronize()
