// SPDX-License-Identifier: Apache-2.0
// Cross-process block reads (process_vm_readv) with each block digested the
// moment it lands, and digests of blocks already in memory.
//
// Why in C: verifying a large read after it landed reads every byte a second
// time from memory - a third memory pass on top of the copy's read and write,
// ~35% of a cma pull's time on the 2-core test machine. Bytes digested right
// after they landed are still in the core's L2 cache, where XXH3 runs at ~100
// GB/s instead of ~33 from DRAM. Doing that per block from Python cost more
// in interpreter and GIL hand-offs than it saved; here one call reads and
// digests a whole share of a pull without the GIL (ctypes releases it).
//
// How much lands before it is digested matters: the test machine's cores
// have 1 MiB of L2 each, and a 64 MiB read with 2 threads ran at 17 GB/s when
// digesting after every 1 MiB, 20-21 GB/s after every 256 KiB (memcpy: 20-21,
// the read without digests 22). So a read lands at most `chunk_bytes` before
// it is digested: small segments are batched up to that, a larger segment is
// read in pieces and digested with XXH3's streaming state, which gives the
// same digest as hashing the segment in one call.
//
// The hash is XXH3-64 as the `xxhash` Python package exports it (its
// dispatched AVX2 entry points, passed in as a table of function pointers:
// kvbridge/cache/checksum.py): the same code the producer digested the blocks
// with, so no copy of xxHash lives here. A block's digest chains its regions
// in order: h = XXH3(region r, seed = h), starting from 0.
//
// C ABI, raw pointers, called through ctypes.
#include <sys/uio.h>
#include <cerrno>
#include <cstdint>
#include <vector>

namespace {

// The xxhash package's XXH3-64 entry points, in this order (checksum.py).
struct Xxh3Api {
  uint64_t (*oneshot)(const void*, size_t, uint64_t);  // XXH3_64bits_withSeed
  void* (*create_state)();                             // XXH3_createState
  int (*free_state)(void*);                            // XXH3_freeState
  int (*reset)(void*, uint64_t);                       // XXH3_64bits_reset_withSeed
  int (*update)(void*, const void*, size_t);           // XXH3_64bits_update
  uint64_t (*digest)(const void*);                     // XXH3_64bits_digest
};

// At most this many iovecs per process_vm_readv (the kernel's IOV_MAX).
constexpr int64_t kMaxIov = 1024;

// Block i's digest; its segment r starts at addrs[r * stride + i].
uint64_t chain_digest(const Xxh3Api& api, const uint64_t* addrs, int64_t stride, int64_t i,
                      int64_t num_regions, int64_t seg_bytes) {
  uint64_t h = 0;
  for (int64_t r = 0; r < num_regions; ++r)
    h = api.oneshot(reinterpret_cast<const void*>(addrs[r * stride + i]),
                    static_cast<size_t>(seg_bytes), h);
  return h;
}

// One process_vm_readv of n iovecs that must move `want` bytes.
int read_exact(int pid, const iovec* local, const iovec* remote, int64_t n, size_t want) {
  const ssize_t got = process_vm_readv(pid, local, n, remote, n, 0);
  if (got < 0) return -errno;
  return static_cast<size_t>(got) == want ? 0 : -EIO;
}

}  // namespace

extern "C" {

// Addresses come region-major, as kvbridge.cache.blocks.run_starts gives
// them: segment r of block i starts at addrs[r * stride + i].

// Read num_blocks blocks of num_regions segments of seg_bytes each from
// process `pid`, segment by segment from `remote` to `local`, digesting what
// landed after at most `chunk_bytes` (see above): digests[i] for block i.
// Segments of up to chunk_bytes go several to a syscall; a larger one is read
// in chunk_bytes pieces. Returns 0, -errno of a failed read, or -EIO for a
// short one.
int kvb_cma_read_blocks(int pid, const uint64_t* local, const uint64_t* remote, int64_t stride,
                        int64_t num_blocks, int64_t num_regions, int64_t seg_bytes,
                        int64_t chunk_bytes, const void* xxh3, uint64_t* digests) {
  if (num_blocks < 0 || num_regions <= 0 || seg_bytes <= 0 || chunk_bytes <= 0 ||
      xxh3 == nullptr || digests == nullptr)
    return -EINVAL;
  const Xxh3Api& api = *static_cast<const Xxh3Api*>(xxh3);
  const size_t seg = static_cast<size_t>(seg_bytes);
  if (seg_bytes > chunk_bytes) {
    // Large segments: each read in pieces, digested piece by piece.
    void* state = api.create_state();
    if (state == nullptr) return -ENOMEM;
    int rc = 0;
    for (int64_t i = 0; i < num_blocks && rc == 0; ++i) {
      uint64_t h = 0;
      for (int64_t r = 0; r < num_regions && rc == 0; ++r) {
        char* dst = reinterpret_cast<char*>(local[r * stride + i]);
        char* src = reinterpret_cast<char*>(remote[r * stride + i]);
        api.reset(state, h);
        for (size_t off = 0; off < seg && rc == 0; off += static_cast<size_t>(chunk_bytes)) {
          const size_t n = seg - off < static_cast<size_t>(chunk_bytes)
                               ? seg - off : static_cast<size_t>(chunk_bytes);
          const iovec l{dst + off, n}, m{src + off, n};
          rc = read_exact(pid, &l, &m, 1, n);
          if (rc == 0) api.update(state, dst + off, n);
        }
        h = api.digest(state);
      }
      digests[i] = h;
    }
    api.free_state(state);
    return rc;
  }
  // Small segments: whole blocks per syscall, up to chunk_bytes (at least one
  // block) and IOV_MAX segments; each batch digested right after it landed.
  int64_t per = chunk_bytes / (seg_bytes * num_regions);
  if (per < 1) per = 1;
  if (per * num_regions > kMaxIov) per = kMaxIov / num_regions;
  if (per < 1) return -EINVAL;  // a block of more than IOV_MAX segments
  std::vector<iovec> liov(per * num_regions), riov(per * num_regions);
  for (int64_t lo = 0; lo < num_blocks; lo += per) {
    const int64_t hi = lo + per < num_blocks ? lo + per : num_blocks;
    int64_t k = 0;
    for (int64_t i = lo; i < hi; ++i)
      for (int64_t r = 0; r < num_regions; ++r, ++k) {
        liov[k].iov_base = reinterpret_cast<void*>(local[r * stride + i]);
        riov[k].iov_base = reinterpret_cast<void*>(remote[r * stride + i]);
        liov[k].iov_len = riov[k].iov_len = seg;
      }
    const int rc = read_exact(pid, liov.data(), riov.data(), k, k * seg);
    if (rc) return rc;
    for (int64_t i = lo; i < hi; ++i)
      digests[i] = chain_digest(api, local, stride, i, num_regions, seg_bytes);
  }
  return 0;
}

// digests[i] = the chained digest of block i's segments.
int kvb_digest_blocks(const uint64_t* addrs, int64_t stride, int64_t num_blocks,
                      int64_t num_regions, int64_t seg_bytes, const void* xxh3,
                      uint64_t* digests) {
  if (num_blocks < 0 || num_regions <= 0 || seg_bytes <= 0 || xxh3 == nullptr) return -EINVAL;
  const Xxh3Api& api = *static_cast<const Xxh3Api*>(xxh3);
  for (int64_t i = 0; i < num_blocks; ++i)
    digests[i] = chain_digest(api, addrs, stride, i, num_regions, seg_bytes);
  return 0;
}

}  // extern "C"
