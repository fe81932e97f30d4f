// SPDX-License-Identifier: Apache-2.0
// CUDA gather/scatter of paged KV blocks to/from a contiguous staging buffer,
// and block-to-block copies between two paged caches.
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
// kvb_cuda_copy_blocks copies block to block between two paged caches instead
// (a device cache and its host-pinned mirror: vLLM's host transfer buffer).
//
// C ABI with raw pointers (tensor.data_ptr()), loaded through ctypes: the CPU
// build of torch refuses CUDA cpp_extension builds.
#include <cstdint>
#include <cuda_runtime.h>

#define KVB_DEVICE __device__ __forceinline__
#define KVB_GLOBAL __global__
#include "kvb_copy_kernel.cuh"

namespace {

using kvb::Side;

int launch(const Side& src, const Side& dst, int64_t num_regions, int64_t block_bytes,
           int64_t n, bool aligned, cudaStream_t stream) {
  if (n <= 0 || num_regions <= 0) return 0;
  if (kvb::bad_args(src, dst, block_bytes)) return -1;
  const int64_t pairs = num_regions * n;
  const kvb::LaunchPlan p = kvb::plan_launch(pairs, block_bytes, aligned, src.stride, dst.stride);
  dim3 grid(p.gx, p.gy, 1);
  if (p.vec)
    kvb::copy_blocks_kernel<true><<<grid, p.threads, 0, stream>>>(src, dst, block_bytes, n,
                                                                  pairs);
  else
    kvb::copy_blocks_kernel<false><<<grid, p.threads, 0, stream>>>(src, dst, block_bytes, n,
                                                                   pairs);
  return cudaGetLastError() == cudaSuccess ? 0 : -3;
}

}  // namespace

extern "C" {

int kvb_cuda_abi_version() { return 2; }

// regions and ids are *device* arrays (the caller uploads them on the stream,
// e.g. as torch tensors). Returns 0, or a negative code.
int kvb_cuda_gather(uint8_t* const* d_regions, int64_t num_regions, int64_t stride,
                    int64_t block_bytes, const int64_t* d_ids, int64_t n, uint8_t* staging,
                    int aligned, void* stream) {
  return launch(Side{d_regions, stride, d_ids, nullptr}, Side{nullptr, 0, nullptr, staging},
                num_regions, block_bytes, n, aligned != 0, static_cast<cudaStream_t>(stream));
}

int kvb_cuda_scatter(uint8_t* const* d_regions, int64_t num_regions, int64_t stride,
                     int64_t block_bytes, const int64_t* d_ids, int64_t n,
                     const uint8_t* staging, int aligned, void* stream) {
  return launch(Side{nullptr, 0, nullptr, const_cast<uint8_t*>(staging)},
                Side{d_regions, stride, d_ids, nullptr}, num_regions, block_bytes, n,
                aligned != 0, static_cast<cudaStream_t>(stream));
}

// Block to block between two paged caches, e.g. device cache -> its pinned host
// mirror (d2h) and back (h2d): dst[r][dst_ids[i]] = src[r][src_ids[i]].
int kvb_cuda_copy_blocks(uint8_t* const* d_src_regions, int64_t src_stride,
                         const int64_t* d_src_ids, uint8_t* const* d_dst_regions,
                         int64_t dst_stride, const int64_t* d_dst_ids, int64_t num_regions,
                         int64_t block_bytes, int64_t n, int aligned, void* stream) {
  return launch(Side{d_src_regions, src_stride, d_src_ids, nullptr},
                Side{d_dst_regions, dst_stride, d_dst_ids, nullptr}, num_regions, block_bytes,
                n, aligned != 0, static_cast<cudaStream_t>(stream));
}

}  // extern "C"
