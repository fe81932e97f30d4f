// SPDX-License-Identifier: Apache-2.0
// CPU gather/scatter of paged KV blocks to/from a contiguous staging buffer.
//
// Staging layout is region-major: staging[r][i] = region_r[ids[i]], each entry
// block_bytes long. Runs of adjacent block ids are merged into one memcpy when
// blocks are packed (stride == block_bytes). Large copies are split across
// threads by region-runs so each thread streams long contiguous spans.
//
// C ABI, raw pointers: called through ctypes so no torch headers are needed.
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>
#include <algorithm>

namespace {

struct Run {
  int64_t region;
  int64_t first_id;    // first block id of the run
  int64_t first_slot;  // its index in ids (position in staging)
  int64_t count;       // blocks in the run
};

std::vector<Run> make_runs(int64_t num_regions, const int64_t* ids, int64_t n,
                           bool packed) {
  std::vector<Run> runs;
  for (int64_t r = 0; r < num_regions; ++r) {
    int64_t i = 0;
    while (i < n) {
      int64_t j = i + 1;
      if (packed)
        while (j < n && ids[j] == ids[j - 1] + 1) ++j;
      runs.push_back({r, ids[i], i, j - i});
      i = j;
    }
  }
  return runs;
}

template <bool kGather>
void copy_runs(const std::vector<Run>& runs, size_t lo, size_t hi,
               uint8_t* const* regions, int64_t stride, int64_t block_bytes,
               int64_t n, uint8_t* staging) {
  for (size_t k = lo; k < hi; ++k) {
    const Run& run = runs[k];
    uint8_t* blk = regions[run.region] + run.first_id * stride;
    uint8_t* stg = staging + (run.region * n + run.first_slot) * block_bytes;
    // count > 1 only when blocks are packed, so the run is one contiguous span.
    size_t len = static_cast<size_t>(run.count) * block_bytes;
    if (kGather) std::memcpy(stg, blk, len); else std::memcpy(blk, stg, len);
  }
}

template <bool kGather>
int run_copy(uint8_t* const* regions, int64_t num_regions, int64_t stride,
             int64_t block_bytes, const int64_t* ids, int64_t n, uint8_t* staging,
             int num_threads) {
  if (n <= 0 || num_regions <= 0) return 0;
  if (stride < block_bytes || block_bytes <= 0) return -1;
  auto runs = make_runs(num_regions, ids, n, stride == block_bytes);
  const int64_t total = num_regions * n * block_bytes;
  // Below ~4 MiB thread start-up costs more than it saves.
  int threads = num_threads > 0 ? num_threads : 1;
  if (total < (4 << 20)) threads = 1;
  threads = static_cast<int>(std::min<size_t>(threads, runs.size()));
  if (threads <= 1) {
    copy_runs<kGather>(runs, 0, runs.size(), regions, stride, block_bytes, n, staging);
    return 0;
  }
  // Balance by bytes: split the run list at equal cumulative byte offsets.
  std::vector<size_t> cuts{0};
  int64_t acc = 0, per = (total + threads - 1) / threads;
  for (size_t k = 0; k < runs.size(); ++k) {
    acc += runs[k].count * block_bytes;
    if (acc >= per * static_cast<int64_t>(cuts.size()) && cuts.size() < static_cast<size_t>(threads))
      cuts.push_back(k + 1);
  }
  cuts.push_back(runs.size());
  std::vector<std::thread> pool;
  for (size_t t = 0; t + 1 < cuts.size(); ++t)
    if (cuts[t] < cuts[t + 1])
      pool.emplace_back(copy_runs<kGather>, std::cref(runs), cuts[t], cuts[t + 1], regions,
                        stride, block_bytes, n, staging);
  for (auto& th : pool) th.join();
  return 0;
}

}  // namespace

extern "C" {

int kvb_abi_version() { return 1; }

// Returns 0 on success, -1 on bad arguments. ids must be validated by the caller.
int kvb_gather(uint8_t* const* regions, int64_t num_regions, int64_t stride,
               int64_t block_bytes, const int64_t* ids, int64_t n, uint8_t* staging,
               int num_threads) {
  return run_copy<true>(regions, num_regions, stride, block_bytes, ids, n, staging, num_threads);
}

int kvb_scatter(uint8_t* const* regions, int64_t num_regions, int64_t stride,
                int64_t block_bytes, const int64_t* ids, int64_t n, const uint8_t* staging,
                int num_threads) {
  return run_copy<false>(regions, num_regions, stride, block_bytes, ids, n,
                         const_cast<uint8_t*>(staging), num_threads);
}

}  // extern "C"
