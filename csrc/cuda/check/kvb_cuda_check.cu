// SPDX-License-Identifier: Apache-2.0
// Standalone GPU check of kvb_copy.cu, for a machine with a GPU but perhaps no
// CUDA build of torch: needs only nvcc and the driver.
//
//   nvcc -O3 -std=c++17 -arch=sm_XX csrc/cuda/check/kvb_cuda_check.cu \
//        csrc/cuda/kvb_copy.cu -o kvb_cuda_check && ./kvb_cuda_check [--quick]
//
// (scripts/gpu-check.sh does this.) Part 1 checks gather, scatter and
// block-to-block copies byte for byte against a host reference, with device
// and pinned-host staging, unaligned bases, odd sizes, padded strides and the
// grid caps. Part 2 times the kernel against cudaMemcpyAsync of the same bytes
// (device -> device, device -> pinned host) for 1-1024 blocks of the tiny
// model's and a Llama-8B-sized block; the target is >= 0.8x at >= 16 blocks.
// Exit status: 0 when every check passed, 1 otherwise.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <numeric>
#include <random>
#include <string>
#include <vector>

extern "C" {
int kvb_cuda_abi_version();
int kvb_cuda_gather(uint8_t* const*, int64_t, int64_t, int64_t, const int64_t*, int64_t,
                    uint8_t*, int, void*);
int kvb_cuda_scatter(uint8_t* const*, int64_t, int64_t, int64_t, const int64_t*, int64_t,
                     const uint8_t*, int, void*);
int kvb_cuda_copy_blocks(uint8_t* const*, int64_t, const int64_t*, uint8_t* const*, int64_t,
                         const int64_t*, int64_t, int64_t, int64_t, int, void*);
}

#define CK(x)                                                                        \
  do {                                                                               \
    cudaError_t e_ = (x);                                                            \
    if (e_ != cudaSuccess) {                                                         \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x,                 \
                   cudaGetErrorString(e_));                                          \
      std::exit(2);                                                                  \
    }                                                                                \
  } while (0)

namespace {

std::mt19937_64 rng(12345);

// num_regions allocations of offset + num_blocks * stride bytes, device or pinned host.
struct Paged {
  std::vector<uint8_t*> base;  // allocation starts
  std::vector<uint8_t*> ptr;   // base + offset: what the kernel gets
  int64_t num_blocks, stride, block_bytes, offset;
  bool device;
  Paged(int64_t regions, int64_t nb, int64_t bb, int64_t st, int64_t off, bool dev)
      : num_blocks(nb), stride(st), block_bytes(bb), offset(off), device(dev) {
    for (int64_t r = 0; r < regions; ++r) {
      uint8_t* p = nullptr;
      if (dev) CK(cudaMalloc(&p, bytes()));
      else CK(cudaHostAlloc(reinterpret_cast<void**>(&p), bytes(), cudaHostAllocDefault));
      base.push_back(p);
      ptr.push_back(p + off);
    }
  }
  ~Paged() {
    for (auto p : base) {
      if (device) cudaFree(p); else cudaFreeHost(p);
    }
  }
  size_t bytes() const { return static_cast<size_t>(offset + num_blocks * stride); }
  void fill_random() {
    std::vector<uint8_t> h(bytes());
    for (auto p : base) {
      for (auto& b : h) b = static_cast<uint8_t>(rng());
      CK(cudaMemcpy(p, h.data(), h.size(), cudaMemcpyDefault));
    }
  }
  std::vector<std::vector<uint8_t>> snapshot() const {
    std::vector<std::vector<uint8_t>> out;
    for (auto p : base) {
      std::vector<uint8_t> h(bytes());
      CK(cudaMemcpy(h.data(), p, h.size(), cudaMemcpyDefault));
      out.push_back(std::move(h));
    }
    return out;
  }
};

template <class T>
T* to_device(const std::vector<T>& v) {
  T* d = nullptr;
  CK(cudaMalloc(&d, std::max<size_t>(1, v.size()) * sizeof(T)));
  if (!v.empty()) CK(cudaMemcpy(d, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}

std::vector<int64_t> sample(int64_t num_blocks, int64_t n) {
  std::vector<int64_t> all(num_blocks);
  std::iota(all.begin(), all.end(), 0);
  std::shuffle(all.begin(), all.end(), rng);
  all.resize(n);
  return all;
}

int failures = 0;

void expect(bool ok, const std::string& what) {
  std::printf("  %-70s %s\n", what.c_str(), ok ? "ok" : "FAILED");
  if (!ok) ++failures;
}

void check_case(int64_t regions, int64_t num_blocks, int64_t n, int64_t bb, int64_t pad,
                int64_t off, bool pinned_staging) {
  char name[160];
  std::snprintf(name, sizeof name, "%lld regions, %lld/%lld blocks of %lld B, stride +%lld, "
                "offset %lld, %s staging", (long long)regions, (long long)n,
                (long long)num_blocks, (long long)bb, (long long)pad, (long long)off,
                pinned_staging ? "pinned" : "device");
  const int64_t stride = bb + pad;
  const int aligned = off % 16 == 0;
  Paged src(regions, num_blocks, bb, stride, off, true);
  src.fill_random();
  auto src_host = src.snapshot();
  auto src_ids = sample(num_blocks, n), dst_ids = sample(num_blocks, n);
  uint8_t** d_src = to_device(src.ptr);
  int64_t* d_src_ids = to_device(src_ids);
  int64_t* d_dst_ids = to_device(dst_ids);
  const size_t total = static_cast<size_t>(regions * n * bb);
  uint8_t* staging = nullptr;
  if (pinned_staging) CK(cudaHostAlloc(reinterpret_cast<void**>(&staging), total + 16, 0));
  else CK(cudaMalloc(&staging, total + 16));
  cudaStream_t s;
  CK(cudaStreamCreate(&s));

  // gather
  int rc = kvb_cuda_gather(d_src, regions, stride, bb, d_src_ids, n, staging, aligned, s);
  CK(cudaStreamSynchronize(s));
  std::vector<uint8_t> got(total), want(total);
  CK(cudaMemcpy(got.data(), staging, total, cudaMemcpyDefault));
  for (int64_t r = 0; r < regions; ++r)
    for (int64_t i = 0; i < n; ++i)
      std::memcpy(&want[(r * n + i) * bb], &src_host[r][off + src_ids[i] * stride], bb);
  expect(rc == 0 && got == want, std::string("gather   ") + name);

  // scatter into other ids of a second cache; every other byte unchanged
  Paged dst(regions, num_blocks, bb, stride, off, true);
  dst.fill_random();
  auto before = dst.snapshot();
  rc = kvb_cuda_scatter(to_device(dst.ptr), regions, stride, bb, d_dst_ids, n, staging,
                        aligned, s);
  CK(cudaStreamSynchronize(s));
  auto after = dst.snapshot();
  for (int64_t r = 0; r < regions; ++r)
    for (int64_t i = 0; i < n; ++i)
      std::memcpy(&before[r][off + dst_ids[i] * stride], &want[(r * n + i) * bb], bb);
  expect(rc == 0 && after == before, std::string("scatter  ") + name);

  // block to block: device cache -> pinned host mirror (other stride) -> device
  Paged mirror(regions, num_blocks, bb, bb + 2 * pad, off, false);
  mirror.fill_random();
  auto mbefore = mirror.snapshot();
  rc = kvb_cuda_copy_blocks(d_src, stride, d_src_ids, to_device(mirror.ptr), bb + 2 * pad,
                            d_dst_ids, regions, bb, n, aligned, s);
  CK(cudaStreamSynchronize(s));
  auto mafter = mirror.snapshot();
  for (int64_t r = 0; r < regions; ++r)
    for (int64_t i = 0; i < n; ++i)
      std::memcpy(&mbefore[r][off + dst_ids[i] * (bb + 2 * pad)],
                  &src_host[r][off + src_ids[i] * stride], bb);
  expect(rc == 0 && mafter == mbefore, std::string("d2h copy ") + name);
  CK(cudaStreamDestroy(s));
  if (pinned_staging) cudaFreeHost(staging); else cudaFree(staging);
}

float time_ms(cudaStream_t s, int reps, const std::function<void()>& fn) {
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  fn();  // warm-up
  std::vector<float> ts;
  for (int i = 0; i < reps; ++i) {
    CK(cudaEventRecord(a, s));
    fn();
    CK(cudaEventRecord(b, s));
    CK(cudaEventSynchronize(b));
    float ms = 0;
    CK(cudaEventElapsedTime(&ms, a, b));
    ts.push_back(ms);
  }
  std::sort(ts.begin(), ts.end());
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  return ts[ts.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  const bool quick = argc > 1 && std::string(argv[1]) == "--quick";
  int dev = 0;
  cudaDeviceProp prop;
  CK(cudaGetDevice(&dev));
  CK(cudaGetDeviceProperties(&prop, dev));
  std::printf("# kvbridge CUDA kernel check\n\n%s (sm_%d%d), C ABI %d\n\n## byte-exactness\n\n",
              prop.name, prop.major, prop.minor, kvb_cuda_abi_version());
  for (bool pinned : {false, true}) {
    check_case(3, 64, 40, 65536, 0, 0, pinned);    // vector path
    check_case(2, 8, 3, 524288, 16, 0, pinned);    // grid.x capped at 64
    check_case(2, 12, 7, 48, 16, 8, pinned);       // unaligned: byte path
    check_case(1, 9, 9, 17, 3, 0, pinned);         // odd size
    check_case(1, 4, 1, 16, 0, 0, pinned);         // one block
  }
  check_case(2, 40000, 40000, 16, 0, 0, false);     // 80,000 pairs: grid.y capped

  std::printf("\n## GB/s against cudaMemcpyAsync of the same bytes (2 layers)\n\n");
  std::printf("| block | blocks | bytes | d2d copy | gather->device | scatter<-device | "
              "d2h copy | gather->pinned |\n|---|---|---|---|---|---|---|---|\n");
  const int reps = quick ? 5 : 20;
  bool target_met = true;
  const std::pair<const char*, int64_t> shapes[] = {{"tiny", 65536}, {"llama8b", 524288}};
  for (const auto& shape_bytes : shapes) {
    const char* shape = shape_bytes.first;
    const int64_t bb = shape_bytes.second;
    for (int64_t n : {1, 16, 128, 1024}) {
      if (quick && n > 128) continue;
      const int64_t regions = 2, num_blocks = 2 * n;
      Paged cache(regions, num_blocks, bb, bb, 0, true);
      auto ids = sample(num_blocks, n);
      uint8_t** d_regions = to_device(cache.ptr);
      int64_t* d_ids = to_device(ids);
      const size_t total = static_cast<size_t>(regions * n * bb);
      uint8_t *dstage, *dsrc, *hstage;
      CK(cudaMalloc(&dstage, total));
      CK(cudaMalloc(&dsrc, total));
      CK(cudaHostAlloc(reinterpret_cast<void**>(&hstage), total, 0));
      cudaStream_t s;
      CK(cudaStreamCreate(&s));
      float t_copy = time_ms(s, reps, [&] { cudaMemcpyAsync(dstage, dsrc, total, cudaMemcpyDeviceToDevice, s); });
      float t_g = time_ms(s, reps, [&] { kvb_cuda_gather(d_regions, regions, bb, bb, d_ids, n, dstage, 1, s); });
      float t_s = time_ms(s, reps, [&] { kvb_cuda_scatter(d_regions, regions, bb, bb, d_ids, n, dstage, 1, s); });
      float t_d2h = time_ms(s, reps, [&] { cudaMemcpyAsync(hstage, dsrc, total, cudaMemcpyDeviceToHost, s); });
      float t_gh = time_ms(s, reps, [&] { kvb_cuda_gather(d_regions, regions, bb, bb, d_ids, n, hstage, 1, s); });
      auto gbps = [&](float ms) { return total / (ms * 1e-3) / 1e9; };
      std::printf("| %s | %lld | %.1f MiB | %.1f | %.1f (%.2fx) | %.1f (%.2fx) | %.1f | %.1f (%.2fx) |\n",
                  shape, (long long)n, total / 1048576.0, gbps(t_copy), gbps(t_g), t_copy / t_g,
                  gbps(t_s), t_copy / t_s, gbps(t_d2h), gbps(t_gh), t_d2h / t_gh);
      if (n >= 16 && (t_copy / t_g < 0.8 || t_copy / t_s < 0.8)) target_met = false;
      cudaStreamDestroy(s);
      cudaFree(dstage);
      cudaFree(dsrc);
      cudaFreeHost(hstage);
    }
  }
  std::printf("\ntarget (gather and scatter >= 0.8x a device copy at >= 16 blocks): %s\n",
              target_met ? "met" : "NOT met");
  std::printf("byte-exactness: %s\n", failures ? "FAILED" : "all ok");
  return failures ? 1 : 0;
}
