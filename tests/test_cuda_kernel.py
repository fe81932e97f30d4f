# SPDX-License-Identifier: Apache-2.0
"""The CUDA kernels: built in CI, byte-exact on a GPU.

The build checks run everywhere (nvcc is on CI machines); the byte-exactness
checks need a CUDA device and are skipped cleanly without one. They cover
gather/scatter against a staging buffer and the block-to-block copy between a
device cache and its pinned host mirror (host staging, vLLM's
``set_host_xfer_buffer_ops`` hook).
"""

import ctypes
import random
import shutil

import pytest
import torch

from kvbridge.cache import kernels

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_cuda_library_was_built():
    assert kernels.cuda_kernel_built(), "setup.py did not build libkvbridge_cuda.so with nvcc"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_cuda_library_matches_this_version():
    """The built library exports the C ABI kernels.py calls (the CUDA runtime is
    linked statically, so it loads without a GPU)."""
    lib = ctypes.CDLL(str(kernels._LIB_DIR / kernels.CUDA_LIB_NAME))
    assert lib.kvb_cuda_abi_version() == kernels.CUDA_ABI_VERSION
    for name in ("kvb_cuda_gather", "kvb_cuda_scatter", "kvb_cuda_copy_blocks"):
        assert hasattr(lib, name), name


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_standalone_gpu_check_compiles(tmp_path):
    """scripts/gpu-check.sh's program (byte-exactness and GB/s on a GPU, no
    torch needed) must build wherever the kernel does; without a GPU it exits
    2 with the CUDA error, never 0."""
    import subprocess

    from conftest import HELPERS

    root = HELPERS.parent.parent
    exe = tmp_path / "kvb_cuda_check"
    subprocess.run([shutil.which("nvcc"), "-O3", "-std=c++17", "-arch=sm_90",
                    str(root / "csrc/cuda/check/kvb_cuda_check.cu"),
                    str(root / "csrc/cuda/kvb_copy.cu"), "-o", str(exe)], check=True)
    if not torch.cuda.is_available():
        proc = subprocess.run([str(exe), "--quick"], capture_output=True, text=True)
        assert proc.returncode == 2, proc.stdout + proc.stderr


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("block_bytes,num_blocks,n", [(65536, 64, 40), (524288, 32, 32),
                                                      (48, 16, 5), (16, 4, 1)])
@pytest.mark.parametrize("pinned", [False, True])
def test_cuda_gather_scatter_byte_exact(block_bytes, num_blocks, n, pinned):
    g = torch.Generator().manual_seed(block_bytes + n)
    regions = [torch.randint(0, 256, (num_blocks, block_bytes), dtype=torch.uint8,
                             generator=g).cuda() for _ in range(3)]
    ids = random.Random(n).sample(range(num_blocks), n)
    if pinned:
        staging = torch.empty(3 * n * block_bytes, dtype=torch.uint8, pin_memory=True)
    else:
        staging = torch.empty(3 * n * block_bytes, dtype=torch.uint8, device="cuda")
    kernels.gather(regions, ids, staging)
    torch.cuda.synchronize()
    want = torch.stack([r[ids] for r in regions]).flatten().cpu()
    assert torch.equal(staging.cpu(), want)
    dst = [torch.zeros_like(r) for r in regions]
    dst_ids = list(reversed(random.Random(n + 1).sample(range(num_blocks), n)))
    kernels.scatter(staging, dst, dst_ids)
    torch.cuda.synchronize()
    for r, d in zip(regions, dst):
        assert torch.equal(d[dst_ids], r[ids])
        untouched = [b for b in range(num_blocks) if b not in dst_ids]
        assert not d[untouched].any()


@needs_gpu
@pytest.mark.gpu
@pytest.mark.parametrize("block_bytes,num_blocks,n", [(65536, 64, 40), (48, 16, 5), (16, 4, 1)])
def test_cuda_copy_blocks_device_to_pinned_host_and_back(block_bytes, num_blocks, n):
    g = torch.Generator().manual_seed(block_bytes + 7 * n)
    dev = [torch.randint(0, 256, (num_blocks, block_bytes), dtype=torch.uint8,
                         generator=g).cuda() for _ in range(4)]
    host = [torch.zeros(num_blocks, block_bytes, dtype=torch.uint8, pin_memory=True)
            for _ in range(4)]
    src_ids = random.Random(n).sample(range(num_blocks), n)
    dst_ids = random.Random(n + 1).sample(range(num_blocks), n)
    assert kernels.cuda_kernel_usable()
    kernels.copy_blocks(dev, host, src_ids, dst_ids)  # synchronous
    for d, h in zip(dev, host):
        assert torch.equal(h[dst_ids], d[src_ids].cpu())
        untouched = [b for b in range(num_blocks) if b not in dst_ids]
        assert not h[untouched].any()
    back = [torch.zeros_like(d) for d in dev]
    kernels.copy_blocks(host, back, dst_ids, src_ids)
    for d, b in zip(dev, back):
        assert torch.equal(b[src_ids], d[src_ids])


@needs_gpu
@pytest.mark.gpu
def test_host_mirror_of_a_kv_split_gpu_cache_is_byte_exact():
    """vLLM's GPU layout [2, num_blocks, block_size, heads, head]: the mirror
    copy matches torch indexing both ways, one kernel launch per direction."""
    from kvbridge.cache.mirror import HostMirror

    device = {f"layers.{i}": torch.randn(2, 32, 16, 4, 64, device="cuda",
                                         dtype=torch.bfloat16) for i in range(4)}
    mirror = HostMirror(device)
    assert all(t.is_pinned() for t in mirror.host_kv_caches.values())
    ids = [31, 0, 7, 8, 9, 20]
    mirror.to_host(ids)
    for name, t in device.items():
        assert torch.equal(mirror.host_kv_caches[name][:, ids], t[:, ids].cpu())
    for t in mirror.host_kv_caches.values():
        t[:, ids] = 1.0
    mirror.to_device(ids)
    for t in device.values():
        assert bool((t[:, ids] == 1.0).all())


# ----------------------------------------------------------- without a GPU
# The kernel's device code and launch plan compiled for the host, every grid
# position run in turn (helpers/cuda_grid_emu.cpp): the addressing, the
# vector/byte choice and the grid-stride coverage are checked everywhere.

@pytest.fixture(scope="module")
def grid_emu(tmp_path_factory):
    import os
    import subprocess

    from conftest import HELPERS

    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        if os.environ.get("KVBRIDGE_REQUIRE_KERNELS") == "1":
            pytest.fail("no C++ compiler, and KVBRIDGE_REQUIRE_KERNELS=1")
        pytest.skip("no C++ compiler")
    out = tmp_path_factory.mktemp("emu") / "cuda_grid_emu.so"
    subprocess.run([cxx, "-O2", "-std=c++17", "-shared", "-fPIC",
                    str(HELPERS / "cuda_grid_emu.cpp"), "-o", str(out)], check=True)
    lib = ctypes.CDLL(str(out))
    P, I, C = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.emu_gather.argtypes = [P, I, I, I, P, I, P, C]
    lib.emu_scatter.argtypes = [P, I, I, I, P, I, P, C]
    lib.emu_copy_blocks.argtypes = [P, I, P, P, I, P, I, I, I, C]
    return lib


class _Paged:
    """num_regions buffers of num_blocks blocks, ``stride`` bytes apart, at a
    base ``offset`` bytes into each allocation (0 keeps 16-byte alignment)."""

    def __init__(self, num_regions, num_blocks, block_bytes, stride, offset, seed):
        g = torch.Generator().manual_seed(seed)
        self.bufs = [torch.randint(0, 256, (offset + num_blocks * stride + 16,),
                                   dtype=torch.uint8, generator=g) for _ in range(num_regions)]
        self.offset, self.stride, self.block_bytes = offset, stride, block_bytes
        self.ptrs = (ctypes.c_void_p * num_regions)(*(b.data_ptr() + offset for b in self.bufs))

    def block(self, r, i):
        start = self.offset + i * self.stride
        return self.bufs[r][start:start + self.block_bytes]

    def snapshot(self):
        return [b.clone() for b in self.bufs]


def _ids(ids):
    return (ctypes.c_int64 * max(1, len(ids)))(*ids)


@pytest.mark.parametrize("num_regions,num_blocks,n,block_bytes,pad,offset", [
    (3, 16, 5, 65536, 0, 0),      # vector path, several x-blocks per block
    (2, 4, 2, 524288, 16, 0),     # gx capped at 64: the x loop strides
    (2, 40000, 40000, 16, 0, 0),  # 80,000 pairs: gy capped at 65535, the y loop strides
    (2, 12, 7, 48, 16, 8),        # unaligned base: byte path
    (1, 9, 9, 17, 3, 0),          # odd block size: byte path
])
def test_emulated_cuda_kernel_byte_exact(grid_emu, num_regions, num_blocks, n, block_bytes,
                                         pad, offset):
    rng = random.Random(n * 31 + block_bytes)
    stride = block_bytes + pad
    src = _Paged(num_regions, num_blocks, block_bytes, stride, offset, 1)
    src_ids = rng.sample(range(num_blocks), n)
    staging = torch.zeros(num_regions * n * block_bytes, dtype=torch.uint8)
    aligned = int(offset % 16 == 0)
    path = grid_emu.emu_gather(src.ptrs, num_regions, stride, block_bytes, _ids(src_ids), n,
                               staging.data_ptr(), aligned)
    expect_vec = aligned and block_bytes % 16 == 0 and stride % 16 == 0
    assert path == (1 if expect_vec else 2)
    want = torch.cat([src.block(r, i) for r in range(num_regions) for i in src_ids])
    assert torch.equal(staging, want)

    dst = _Paged(num_regions, num_blocks, block_bytes, stride, offset, 2)
    before = dst.snapshot()
    dst_ids = rng.sample(range(num_blocks), n)
    grid_emu.emu_scatter(dst.ptrs, num_regions, stride, block_bytes, _ids(dst_ids), n,
                         staging.data_ptr(), aligned)
    _check_blocks(src, src_ids, dst, dst_ids, before, num_regions, num_blocks)

    # Block to block (device cache <-> host mirror), strides differing per side.
    mirror = _Paged(num_regions, num_blocks, block_bytes, block_bytes + 2 * pad, offset, 3)
    before = mirror.snapshot()
    grid_emu.emu_copy_blocks(src.ptrs, stride, _ids(src_ids), mirror.ptrs, block_bytes + 2 * pad,
                             _ids(dst_ids), num_regions, block_bytes, n, aligned)
    _check_blocks(src, src_ids, mirror, dst_ids, before, num_regions, num_blocks)


def _check_blocks(src, src_ids, dst, dst_ids, before, num_regions, num_blocks):
    """dst holds src's blocks at dst_ids; every other byte is as it was."""
    for r in range(num_regions):
        expected = before[r].clone()
        for s, d in zip(src_ids, dst_ids):
            start = dst.offset + d * dst.stride
            expected[start:start + dst.block_bytes] = src.block(r, s)
        assert torch.equal(dst.bufs[r], expected), f"region {r}"


def test_emulated_cuda_kernel_refuses_bad_arguments(grid_emu):
    buf = torch.zeros(64, dtype=torch.uint8)
    ptrs = (ctypes.c_void_p * 1)(buf.data_ptr())
    # stride smaller than the block: blocks would overlap
    assert grid_emu.emu_gather(ptrs, 1, 8, 16, _ids([0]), 1, buf.data_ptr(), 1) == -1
    assert grid_emu.emu_gather(ptrs, 1, 16, 0, _ids([0]), 1, buf.data_ptr(), 1) == -1
    assert grid_emu.emu_gather(ptrs, 1, 16, 16, _ids([]), 0, buf.data_ptr(), 1) == 0


@needs_gpu
@pytest.mark.parametrize("memory_layout", ["LBHNC", "LBNHC"])
def test_cuda_tp_slices_gather_and_scatter_byte_exact(memory_layout):
    """A TP shard's heads (``kvbridge.cache.shard``) gathered from a device cache and
    scattered into another one's slices go through the CUDA kernel and equal
    the same copies on the CPU."""
    from kvbridge.cache.blocks import PagedKVCache
    from kvbridge.layout import KVLayout
    from kvbridge.cache.shard import plan_reads

    def cache(device, tp, rank, seed):
        shape = (32, 2 // tp, 16, 64) if memory_layout == "LBHNC" else (32, 16, 2 // tp, 64)
        gen = torch.Generator().manual_seed(seed)
        regions = [torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
                   .view(torch.bfloat16).to(device) for _ in range(2)]
        layout = KVLayout.from_tensors(regions, model="m", block_size=16, num_kv_heads=2,
                                       head_size=16, memory_layout=memory_layout,
                                       tp_size=tp, tp_rank=rank)
        return PagedKVCache(layout, regions)

    ids, dst_ids = [3, 9, 10, 27], [1, 2, 30, 31]
    results = {}
    for device in ("cuda", "cpu"):
        src = cache(device, 1, 0, seed=5)
        out = []
        for rank in range(2):
            dst = cache(device, 2, rank, seed=6 + rank)
            (read,) = plan_reads(dst.layout, 1)
            staged = src.export_blocks(ids, block_slice=read.remote_slice)
            dst.import_blocks(staged, dst_ids, block_slice=read.local_slice)
            out.append([r.cpu() for r in dst.regions])
        results[device] = out
    for gpu_rank, cpu_rank in zip(results["cuda"], results["cpu"]):
        for g, c in zip(gpu_rank, cpu_rank):
            assert torch.equal(g.view(torch.uint8), c.view(torch.uint8))
    # And the CPU result is the heads each rank holds (kvbridge.cache.shard).
    src = cache("cpu", 1, 0, seed=5)
    head_dim = 1 if memory_layout == "LBHNC" else 2
    for rank, regions in enumerate(results["cpu"]):
        for got, whole in zip(regions, src.regions):
            want = whole.narrow(head_dim, rank, 1)[ids]
            assert torch.equal(got[dst_ids].view(torch.uint8), want.contiguous().view(torch.uint8))
