// SPDX-License-Identifier: Apache-2.0
// Device code of kvb_copy.cu and its launch plan, in a header so the test
// suite can also compile it for the host and run every grid position in turn
// (tests/helpers/cuda_grid_emu.cpp): the addressing and coverage are then
// checked on machines without a GPU. It needs CUDA's builtins (blockIdx,
// threadIdx, blockDim, gridDim, uint4) and the KVB_DEVICE / KVB_GLOBAL
// qualifiers from the includer.
#pragma once
#include <cstdint>

namespace kvb {

// One side of a copy: paged blocks (regions[r] + ids[i] * stride; regions and
// ids are device arrays) or, when regions is null, the contiguous region-major
// staging buffer (staging + (r * n + i) * block_bytes).
struct Side {
  uint8_t* const* regions;
  int64_t stride;
  const int64_t* ids;
  uint8_t* staging;

  KVB_DEVICE uint8_t* at(int64_t r, int64_t i, int64_t n, int64_t block_bytes) const {
    return regions ? regions[r] + ids[i] * stride : staging + (r * n + i) * block_bytes;
  }
};

template <bool kVec>
KVB_GLOBAL void copy_blocks_kernel(Side src, Side dst, int64_t block_bytes, int64_t n,
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

// Grid for a copy of `pairs` (region, block) pairs of `block_bytes` each:
// grid.y walks pairs (capped at 65535; the kernel strides past it), grid.x
// and 256 threads stride over a block's 16-byte words (or bytes).
struct LaunchPlan {
  unsigned gx, gy;
  int threads;
  bool vec;
};

inline LaunchPlan plan_launch(int64_t pairs, int64_t block_bytes, bool aligned,
                              int64_t src_stride, int64_t dst_stride) {
  LaunchPlan p;
  p.gy = static_cast<unsigned>(pairs < 65535 ? pairs : 65535);
  // aligned: the caller checked every base pointer; strides and size decide the rest.
  p.vec = aligned && block_bytes % 16 == 0 && src_stride % 16 == 0 && dst_stride % 16 == 0;
  const int64_t units = p.vec ? block_bytes / 16 : block_bytes;
  p.threads = 256;
  int64_t gx = (units + p.threads - 1) / p.threads;
  p.gx = static_cast<unsigned>(gx > 64 ? 64 : gx);
  return p;
}

// Bad arguments (checked before any launch): -1.
inline bool bad_args(const Side& src, const Side& dst, int64_t block_bytes) {
  return block_bytes <= 0 || (src.regions && src.stride < block_bytes) ||
         (dst.regions && dst.stride < block_bytes);
}

}  // namespace kvb
