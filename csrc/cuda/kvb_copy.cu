// SPDX-License-Identifier: Apache-2.0
// CUDA gather/scatter of paged KV blocks to/from a contiguous staging buffer.
//
// One launch moves every block of every region (layer): grid.y walks the
// (region, block) pairs, grid.x and the threads stride over the block's bytes
// with 16-byte vector loads/stores (uint4) when every address involved is
// 16-byte aligned, and byte copies otherwise. The staging buffer may be device
// memory or host-pinned memory (mapped, UVA), so device<->host staging is a
// single kernel with no host round trip. Work goes on the caller's stream;
// nothing here synchronizes.
//
// Staging layout (same as the CPU kernel and the torch path): region-major,
// staging[r][i] = region_r[ids[i]], each entry block_bytes long.
//
// C ABI with raw pointers (tensor.data_ptr()), loaded through ctypes: the CPU
// build of torch refuses CUDA cpp_extension builds.
#include <cstdint>
#include <cuda_runtime.h>

namespace {

template <bool kGather, bool kVec>
__global__ void copy_blocks_kernel(uint8_t* const* __restrict__ regions, int64_t stride,
                                   int64_t block_bytes, const int64_t* __restrict__ ids,
                                   int64_t n, int64_t pairs,
                                   uint8_t* __restrict__ staging) {
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  // grid.y strides over (region, block) pairs: any count fits one launch.
  for (int64_t pair = blockIdx.y; pair < pairs; pair += gridDim.y) {
    const int64_t r = pair / n, i = pair % n;
    uint8_t* blk = regions[r] + ids[i] * stride;
    uint8_t* stg = staging + (r * n + i) * block_bytes;
    if (kVec) {
      const int64_t words = block_bytes / 16;
      uint4* dst = reinterpret_cast<uint4*>(kGather ? stg : blk);
      const uint4* src = reinterpret_cast<const uint4*>(kGather ? blk : stg);
      for (int64_t w = tid; w < words; w += step) dst[w] = src[w];
    } else {
      uint8_t* dst = kGather ? stg : blk;
      const uint8_t* src = kGather ? blk : stg;
      for (int64_t b = tid; b < block_bytes; b += step) dst[b] = src[b];
    }
  }
}

template <bool kGather>
int launch(uint8_t* const* d_regions, int64_t num_regions, int64_t stride,
           int64_t block_bytes, const int64_t* d_ids, int64_t n, uint8_t* staging,
           bool aligned, cudaStream_t stream) {
  if (n <= 0 || num_regions <= 0) return 0;
  if (stride < block_bytes || block_bytes <= 0) return -1;
  const int64_t pairs = num_regions * n;
  const unsigned gy = static_cast<unsigned>(pairs < 65535 ? pairs : 65535);
  const bool vec = aligned && block_bytes % 16 == 0 && stride % 16 == 0;
  const int64_t units = vec ? block_bytes / 16 : block_bytes;
  const int threads = 256;
  unsigned gx = static_cast<unsigned>((units + threads - 1) / threads);
  if (gx > 64) gx = 64;
  dim3 grid(gx, gy, 1);
  if (vec)
    copy_blocks_kernel<kGather, true><<<grid, threads, 0, stream>>>(
        d_regions, stride, block_bytes, d_ids, n, pairs, staging);
  else
    copy_blocks_kernel<kGather, false><<<grid, threads, 0, stream>>>(
        d_regions, stride, block_bytes, d_ids, n, pairs, staging);
  return cudaGetLastError() == cudaSuccess ? 0 : -3;
}

}  // namespace

extern "C" {

int kvb_cuda_abi_version() { return 1; }

// regions and ids are *device* arrays (the caller uploads them once per
// request, e.g. as torch tensors on the stream). Returns 0, or a negative code.
int kvb_cuda_gather(uint8_t* const* d_regions, int64_t num_regions, int64_t stride,
                    int64_t block_bytes, const int64_t* d_ids, int64_t n, uint8_t* staging,
                    int aligned, void* stream) {
  return launch<true>(d_regions, num_regions, stride, block_bytes, d_ids, n, staging,
                      aligned != 0, static_cast<cudaStream_t>(stream));
}

int kvb_cuda_scatter(uint8_t* const* d_regions, int64_t num_regions, int64_t stride,
                     int64_t block_bytes, const int64_t* d_ids, int64_t n,
                     const uint8_t* staging, int aligned, void* stream) {
  return launch<false>(d_regions, num_regions, stride, block_bytes, d_ids, n,
                       const_cast<uint8_t*>(staging), aligned != 0,
                       static_cast<cudaStream_t>(stream));
}

}  // extern "C"
