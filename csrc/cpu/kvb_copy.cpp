// SPDX-License-Identifier: Apache-2.0
// CPU gather/scatter of paged KV blocks to/from a contiguous staging buffer.
//
// Staging layout is region-major: staging[r][i] = region_r[ids[i]], each entry
// block_bytes long. kvb_copy_blocks copies block to block between two paged
// caches instead. Runs of slots contiguous on both sides (adjacent ids, blocks
// packed: stride == block_bytes) are merged into one memcpy. Large copies are
// split across threads by runs so each thread streams long contiguous spans.
//
// C ABI, raw pointers: called through ctypes so no torch headers are needed.
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>
#include <algorithm>
#include <atomic>
#if defined(__x86_64__) || defined(_M_X64)
#include <emmintrin.h>
#define KVB_HAVE_STREAM 1
#endif

namespace {

// Copies of at least this many bytes in total use non-temporal stores
// (kvb_set_stream_threshold; 0 disables). A gather of large blocks is many
// memcpy calls each below glibc's own non-temporal threshold, so they write
// through the cache: every destination line is read first (read-for-ownership),
// three memory passes instead of two, and one thread reached only ~0.6x of one
// big memcpy of the same bytes. Streaming stores skip that read. Below L2 size
// the destination is better left in cache for whoever reads it next (a socket
// send of the staging buffer).
std::atomic<int64_t> g_stream_threshold{int64_t{4} << 20};

// memcpy with streaming stores for the 16-byte-aligned middle of dst.
void copy_nt(uint8_t* dst, const uint8_t* src, size_t len) {
#ifdef KVB_HAVE_STREAM
  size_t head = (16 - (reinterpret_cast<uintptr_t>(dst) & 15)) & 15;
  if (len < head + 256) { std::memcpy(dst, src, len); return; }
  std::memcpy(dst, src, head);
  dst += head; src += head; len -= head;
  __m128i* d = reinterpret_cast<__m128i*>(dst);
  const __m128i* s = reinterpret_cast<const __m128i*>(src);
  size_t n64 = len / 64;
  for (size_t i = 0; i < n64; ++i, d += 4, s += 4) {
    __m128i a = _mm_loadu_si128(s), b = _mm_loadu_si128(s + 1);
    __m128i c = _mm_loadu_si128(s + 2), e = _mm_loadu_si128(s + 3);
    _mm_stream_si128(d, a); _mm_stream_si128(d + 1, b);
    _mm_stream_si128(d + 2, c); _mm_stream_si128(d + 3, e);
  }
  size_t done = n64 * 64;
  if (done < len) std::memcpy(dst + done, src + done, len - done);
#else
  std::memcpy(dst, src, len);
#endif
}

// One side of a copy: paged blocks (regions[r] + ids[i] * stride) or, when
// regions is null, the contiguous region-major staging buffer
// (staging + (r * n + i) * block_bytes).
struct Side {
  uint8_t* const* regions;
  int64_t stride;
  const int64_t* ids;
  uint8_t* staging;

  uint8_t* at(int64_t r, int64_t i, int64_t n, int64_t block_bytes) const {
    return regions ? regions[r] + ids[i] * stride : staging + (r * n + i) * block_bytes;
  }
  // Whether slot i continues slot i - 1 in memory (so both copy as one span).
  bool follows(int64_t i, int64_t block_bytes) const {
    return !regions || (stride == block_bytes && ids[i] == ids[i - 1] + 1);
  }
};

struct Run {
  int64_t region;
  int64_t first;  // first slot (index into the id lists)
  int64_t count;  // slots in the run
};

std::vector<Run> make_runs(int64_t num_regions, int64_t n, const Side& src, const Side& dst,
                           int64_t block_bytes) {
  std::vector<Run> runs;
  for (int64_t r = 0; r < num_regions; ++r) {
    int64_t i = 0;
    while (i < n) {
      int64_t j = i + 1;
      while (j < n && src.follows(j, block_bytes) && dst.follows(j, block_bytes)) ++j;
      runs.push_back({r, i, j - i});
      i = j;
    }
  }
  return runs;
}

void copy_runs(const std::vector<Run>& runs, size_t lo, size_t hi, const Side& src,
               const Side& dst, int64_t block_bytes, int64_t n, bool streaming) {
  for (size_t k = lo; k < hi; ++k) {
    const Run& run = runs[k];
    // A run is one contiguous span on both sides (see Side::follows).
    size_t len = static_cast<size_t>(run.count) * block_bytes;
    uint8_t* d = dst.at(run.region, run.first, n, block_bytes);
    const uint8_t* s = src.at(run.region, run.first, n, block_bytes);
    if (streaming) copy_nt(d, s, len); else std::memcpy(d, s, len);
  }
#ifdef KVB_HAVE_STREAM
  // Streaming stores are weakly ordered: make them visible before returning.
  if (streaming) _mm_sfence();
#endif
}

int run_copy(const Side& src, const Side& dst, int64_t num_regions, int64_t block_bytes,
             int64_t n, int num_threads) {
  if (n <= 0 || num_regions <= 0) return 0;
  if (block_bytes <= 0 || (src.regions && src.stride < block_bytes) ||
      (dst.regions && dst.stride < block_bytes))
    return -1;
  auto runs = make_runs(num_regions, n, src, dst, block_bytes);
  const int64_t total = num_regions * n * block_bytes;
  // Below ~4 MiB thread start-up costs more than it saves.
  int threads = num_threads > 0 ? num_threads : 1;
  if (total < (4 << 20)) threads = 1;
  threads = static_cast<int>(std::min<size_t>(threads, runs.size()));
  const int64_t nt = g_stream_threshold.load(std::memory_order_relaxed);
  const bool streaming = nt > 0 && total >= nt;
  if (threads <= 1) {
    copy_runs(runs, 0, runs.size(), src, dst, block_bytes, n, streaming);
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
      pool.emplace_back(copy_runs, std::cref(runs), cuts[t], cuts[t + 1], std::cref(src),
                        std::cref(dst), block_bytes, n, streaming);
  for (auto& th : pool) th.join();
  return 0;
}

}  // namespace

extern "C" {

int kvb_abi_version() { return 4; }

// Copies of at least `bytes` in total use streaming stores; 0 turns them off.
void kvb_set_stream_threshold(int64_t bytes) {
  g_stream_threshold.store(bytes < 0 ? 0 : bytes, std::memory_order_relaxed);
}

// Returns 0 on success, -1 on bad arguments. ids must be validated by the caller.
int kvb_gather(uint8_t* const* regions, int64_t num_regions, int64_t stride,
               int64_t block_bytes, const int64_t* ids, int64_t n, uint8_t* staging,
               int num_threads) {
  return run_copy(Side{regions, stride, ids, nullptr}, Side{nullptr, 0, nullptr, staging},
                  num_regions, block_bytes, n, num_threads);
}

int kvb_scatter(uint8_t* const* regions, int64_t num_regions, int64_t stride,
                int64_t block_bytes, const int64_t* ids, int64_t n, const uint8_t* staging,
                int num_threads) {
  return run_copy(Side{nullptr, 0, nullptr, const_cast<uint8_t*>(staging)},
                  Side{regions, stride, ids, nullptr}, num_regions, block_bytes, n, num_threads);
}

// Block to block between two paged caches of the same block size (e.g. an
// engine's cache and its host mirror): dst_regions[r][dst_ids[i]] =
// src_regions[r][src_ids[i]]. The regions must not overlap.
int kvb_copy_blocks(uint8_t* const* src_regions, int64_t src_stride, const int64_t* src_ids,
                    uint8_t* const* dst_regions, int64_t dst_stride, const int64_t* dst_ids,
                    int64_t num_regions, int64_t block_bytes, int64_t n, int num_threads) {
  return run_copy(Side{src_regions, src_stride, src_ids, nullptr},
                  Side{dst_regions, dst_stride, dst_ids, nullptr}, num_regions, block_bytes, n,
                  num_threads);
}

}  // extern "C"
