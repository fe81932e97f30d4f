# SPDX-License-Identifier: Apache-2.0
"""The CUDA gather/scatter kernel: built in CI, byte-exact on a GPU.

The build check runs everywhere (nvcc is on CI machines); the byte-exactness
checks need a CUDA device and are skipped cleanly without one.
"""

import random
import shutil

import pytest
import torch

from kvbridge import kernels

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_cuda_library_was_built():
    assert kernels.cuda_kernel_built(), "setup.py did not build libkvbridge_cuda.so with nvcc"


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
