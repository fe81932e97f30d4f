// SPDX-License-Identifier: Apache-2.0
// Host emulation of csrc/cuda/kvb_copy.cu's kernel: the same device code and
// launch plan (kvb_copy_kernel.cuh), compiled for the CPU, with every grid
// position (blockIdx.y, blockIdx.x, threadIdx.x) run in turn. The kernel's
// threads never depend on each other, so this runs exactly the loads and
// stores a GPU would, and checks the addressing, the vector/byte choice and
// that the grid-stride loops cover every byte, on machines without a GPU.
// Same C ABI as the CUDA library, minus the stream. Built by the test suite.
#include <cstdint>
#include <cstring>

namespace {
struct Dim3 { unsigned x = 0, y = 0, z = 0; };
Dim3 blockIdx, threadIdx, blockDim, gridDim;
struct alignas(16) uint4 { unsigned x, y, z, w; };
}  // namespace

#define KVB_DEVICE inline
#define KVB_GLOBAL
#include "../../csrc/cuda/kvb_copy_kernel.cuh"

namespace {

int emulate(const kvb::Side& src, const kvb::Side& dst, int64_t num_regions,
            int64_t block_bytes, int64_t n, bool aligned) {
  if (n <= 0 || num_regions <= 0) return 0;
  if (kvb::bad_args(src, dst, block_bytes)) return -1;
  const int64_t pairs = num_regions * n;
  const kvb::LaunchPlan p = kvb::plan_launch(pairs, block_bytes, aligned, src.stride, dst.stride);
  gridDim = {p.gx, p.gy, 1};
  blockDim = {static_cast<unsigned>(p.threads), 1, 1};
  for (unsigned by = 0; by < p.gy; ++by)
    for (unsigned bx = 0; bx < p.gx; ++bx)
      for (unsigned tx = 0; tx < blockDim.x; ++tx) {
        blockIdx = {bx, by, 0};
        threadIdx = {tx, 0, 0};
        if (p.vec)
          kvb::copy_blocks_kernel<true>(src, dst, block_bytes, n, pairs);
        else
          kvb::copy_blocks_kernel<false>(src, dst, block_bytes, n, pairs);
      }
  return p.vec ? 1 : 2;  // tells the test which path ran (the CUDA ABI returns 0)
}

}  // namespace

extern "C" {

int emu_gather(uint8_t* const* regions, int64_t num_regions, int64_t stride,
               int64_t block_bytes, const int64_t* ids, int64_t n, uint8_t* staging,
               int aligned) {
  return emulate(kvb::Side{regions, stride, ids, nullptr},
                 kvb::Side{nullptr, 0, nullptr, staging}, num_regions, block_bytes, n,
                 aligned != 0);
}

int emu_scatter(uint8_t* const* regions, int64_t num_regions, int64_t stride,
                int64_t block_bytes, const int64_t* ids, int64_t n, const uint8_t* staging,
                int aligned) {
  return emulate(kvb::Side{nullptr, 0, nullptr, const_cast<uint8_t*>(staging)},
                 kvb::Side{regions, stride, ids, nullptr}, num_regions, block_bytes, n,
                 aligned != 0);
}

int emu_copy_blocks(uint8_t* const* src_regions, int64_t src_stride, const int64_t* src_ids,
                    uint8_t* const* dst_regions, int64_t dst_stride, const int64_t* dst_ids,
                    int64_t num_regions, int64_t block_bytes, int64_t n, int aligned) {
  return emulate(kvb::Side{src_regions, src_stride, src_ids, nullptr},
                 kvb::Side{dst_regions, dst_stride, dst_ids, nullptr}, num_regions,
                 block_bytes, n, aligned != 0);
}

}  // extern "C"
