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

from kvbridge import kernels

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
    from kvbridge.blocks import HostMirror

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
