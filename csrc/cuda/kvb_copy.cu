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

namespace {

// One side of a copy: paged blocks (regions[r] + ids[i] * stride; regions and
// ids are device arrays) or, when regions is null, the contiguous region-major
// staging buffer (staging + (r * n + i) * block_bytes).
struct Side {
  uint8_t* const* regions;
  int64_t stride;
  const int64_t* ids;
  uint8_t* staging;

  __device__ __forceinline__ uint8_t* at(int64_t r, int64_t i, int64_t n,
                                         int64_t block_bytes) const {
    return regions ? regions[r] + ids[i] * stride : staging + (r * n + i) * block_bytes;
  }
};

template <bool kVec>
__global__ void copy_blocks_kernel(Side src, Side dst, int64_t block_bytes, int64_t n,
                                   int64_t pairs) {
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  // grid.y strides over (region, block) pairs: any count fits one launch.
  for (int64_t pair = blockIdx.y; pair < pairs; pair += gridDim.y) {
    const int64_t r = pair / n, i = pair % n;
    uint8_t* d = dst.at(r, i, n, block_bytes);
    const uint8_t* s = src.at(r, i, n, block_bytes);
    if (kVec) {
      const int64_t words = block_bytes / 16;
      uint4* dv = reinterpret_cast<uint4*>(d);
      const uint4* sv = reinterpret_cast<const uint4*>(s);
      for (int64_t w = tid; w < words; w += step) dv[w] = sv[w];
    } else {
      for (int64_t b = tid; b < block_bytes; b += step) d[b] = s[b];
    }
  }
}

int launch(const Side& src, const Side& dst, int64_t num_regions, int64_t block_bytes,
           int64_t n, bool aligned, cudaStream_t stream) {
  if (n <= 0 || num_regions <= 0) return 0;
  if (block_bytes <= 0 || (src.regions && src.stride < block_bytes) ||
      (dst.regions && dst.stride < block_bytes))
    return -1;
  const int64_t pairs = num_regions * n;
  const unsigned gy = static_cast<unsigned>(pairs < 65535 ? pairs : 65535);
  // aligned: the caller checked every base pointer; strides and size decide the rest.
  const bool vec = aligned && block_bytes % 16 == 0 && src.stride % 16 == 0 &&
                   dst.stride % 16 == 0;
  const int64_t units = vec ? block_bytes / 16 : block_bytes;
  const int threads = 256;
  unsigned gx = static_cast<unsigned>((units + threads - 1) / threads);
  if (gx > 64) gx = 64;
  dim3 grid(gx, gy, 1);
  if (vec)
    copy_blocks_kernel<true><<<grid, threads, 0, stream>>>(src, dst, block_bytes, n, pairs);
  else
    copy_blocks_kernel<false><<<grid, threads, 0, stream>>>(src, dst, block_bytes, n, pairs);
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
