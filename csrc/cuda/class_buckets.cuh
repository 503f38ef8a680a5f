// Shared by class_thresholds.cu and topk_per_class.cu: a counting sort of the valid pixels into
// one bucket per class, then one block per class that runs a radix select on its bucket.
//
//   launch 1  count_classes_kernel    per block of the input, how many pixels of each class: a
//                                     [blocks, C] uint32 matrix written with plain stores.
//   launch 2  scatter_classes_kernel  every block derives its slice of every class bucket from the
//                                     matrix (class start + the counts of the earlier blocks) and
//                                     scatters its pixels' entries there; block 0 also writes the
//                                     class starts and sizes for launch 3.
//   launch 3  threshold_select_kernel one block per class: block_select (MSD radix select, 11-bit
//             / topk_select_kernel    digits, shared-memory histograms) on the class's bucket.
//
// No workspace needs zeroing (every word read is written first), nothing is read back on the host.
// The order of the entries inside a bucket depends on atomics, but every result is a function of
// the set of entries only (a selection by value, ties broken on distinct keys), so the results
// are deterministic. Pixel counts are uint32 inside: the ops check N < 2^32.
#pragma once

// The host side at the end (workspace layout, launch sequences) takes raw pointers, so that it
// compiles in both builds. UDAFAST_CUDA_EMULATION: this file compiled as plain C++ against
// emulation/cuda_emu.h, a CPU emulation of the CUDA block semantics (a test harness, outside the
// package build), where a launch runs the blocks on the CPU; only the at::Tensor helpers are left out.
#ifndef UDAFAST_CUDA_EMULATION
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>
#endif

#include <algorithm>
#include <cstdint>

namespace udafast_cuda {
namespace {

using u32 = uint32_t;
using u64 = unsigned long long;
using u128 = unsigned __int128;

constexpr unsigned kFullMask = 0xffffffffu;
constexpr u32 kNoDigit = 0xffffffffu;

// Launches 1 and 2.
constexpr int kBucketThreads = 1024;
constexpr int kWindow = 1024;  // classes handled per pass over a block's tile (shared counters)
static_assert(kWindow <= kBucketThreads, "a window's offsets are reduced one class per thread");
constexpr int64_t kMinTile = 8192;            // pixels per block at least
constexpr int64_t kMaxBlocks = 512;           // each launch-2 block reads its window's column of the matrix
constexpr int64_t kWindowCounters = 1 << 15;  // blocks x window width read per launch-2 block
constexpr int64_t kMaxCounters = 1 << 22;     // blocks x C in the matrix

// Launch 3.
constexpr int kSelectThreads = 1024;
constexpr int kRadixBits = 11;
constexpr int kBins = 1 << kRadixBits;
static_assert(kBins == 2 * kSelectThreads, "find_digit gives each thread two bins");
constexpr int kSortTile = 2048;  // entries sorted in shared memory at once (bitonic)
static_assert(kSortTile == 2 * kSelectThreads, "bitonic_sort_desc gives each thread one pair");

// ---------------------------------------------------------------------------------------------
// Keys

// Monotone unsigned image of a float: flip the sign bit of non-negative values, all bits of
// negative ones; -0.0 becomes +0.0 first (they are equal). Same as the CPU kernels' keys.
__device__ __forceinline__ u32 ordered_key(float x) {
  u32 u = __float_as_uint(x);
  if (x == 0.0f) u = 0;
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ uint64_t ordered_key(double x) {
  uint64_t u = static_cast<uint64_t>(__double_as_longlong(x));
  if (x == 0.0) u = 0;
  return (u & 0x8000000000000000ull) ? ~u : (u | 0x8000000000000000ull);
}

__device__ __forceinline__ float key_value(u32 key) {
  const u32 u = (key & 0x80000000u) ? (key & 0x7fffffffu) : ~key;
  return __uint_as_float(u);
}

__device__ __forceinline__ double key_value(uint64_t key) {
  const uint64_t u = (key & 0x8000000000000000ull) ? (key & 0x7fffffffffffffffull) : ~key;
  return __longlong_as_double(static_cast<long long>(u));
}

// What a bucket holds per pixel. Thresholds: the key of the value. Top-K: the key in the high
// bits and (2^32 - 1 - position) in the low 32, so that one unsigned comparison orders by score
// descending, then by the lower position first, and all entries of a bucket are distinct.
// kBits: the entry's significant bits (entries are below 2^kBits).
template <typename scalar_t, bool kPositions>
struct Entries;

template <>
struct Entries<float, false> {
  using E = u32;
  static constexpr int kBits = 32;
  __device__ static E make(float x, int64_t) { return ordered_key(x); }
};

template <>
struct Entries<double, false> {
  using E = uint64_t;
  static constexpr int kBits = 64;
  __device__ static E make(double x, int64_t) { return ordered_key(x); }
};

template <>
struct Entries<float, true> {
  using E = uint64_t;
  static constexpr int kBits = 64;
  __device__ static E make(float x, int64_t pos) {
    return (E(ordered_key(x)) << 32) | E(0xffffffffu - static_cast<u32>(pos));
  }
};

template <>
struct Entries<double, true> {
  using E = u128;
  static constexpr int kBits = 96;
  __device__ static E make(double x, int64_t pos) {
    return (E(ordered_key(x)) << 32) | E(0xffffffffu - static_cast<u32>(pos));
  }
};

// The position packed in a top-K entry.
template <typename E>
__device__ __forceinline__ int64_t entry_position(E e) {
  return static_cast<int64_t>(0xffffffffu - static_cast<u32>(e & E(0xffffffffu)));
}

template <typename E>
__device__ __forceinline__ u32 digit_of(E e, int shift, u32 mask) {
  return static_cast<u32>(e >> shift) & mask;
}

// The class of a pixel, or -1 for a pixel left out: ignore_index, a label outside [0, C), or a
// NaN value (both CPU kernels skip those).
template <typename scalar_t, typename label_t>
__device__ __forceinline__ int class_of(scalar_t x, label_t label, int64_t num_classes, int64_t ignore_index) {
  const int64_t c = static_cast<int64_t>(label);
  return (c != ignore_index && c >= 0 && c < num_classes && x == x) ? static_cast<int>(c) : -1;
}

// ---------------------------------------------------------------------------------------------
// Block and warp helpers (blockDim.x == NT, a multiple of 32, at most 1024)

__device__ __forceinline__ u32 lanes_below() { return (1u << (threadIdx.x & 31)) - 1u; }

// Exclusive prefix sum of v over the threads of the block, in thread order; `total` gets the sum
// of all. warp_sums: 32 words of shared memory. Every thread must call it (it has barriers).
template <int NT>
__device__ __forceinline__ u64 block_exclusive_scan(u64 v, u64* warp_sums, u64& total) {
  static_assert(NT % 32 == 0 && NT <= 1024, "block size");
  constexpr int kWarps = NT / 32;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  u64 x = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const u64 y = __shfl_up_sync(kFullMask, x, o);
    if (lane >= o) x += y;
  }
  __syncthreads();  // warp_sums may still be read from a previous call
  if (lane == 31) warp_sums[warp] = x;
  __syncthreads();
  if (warp == 0) {
    u64 s = lane < kWarps ? warp_sums[lane] : 0;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const u64 y = __shfl_up_sync(kFullMask, s, o);
      if (lane >= o) s += y;
    }
    warp_sums[lane] = s;  // inclusive prefix of the warp totals; each lane its own word
  }
  __syncthreads();
  total = warp_sums[kWarps - 1];
  return (warp > 0 ? warp_sums[warp - 1] : 0) + x - v;
}

// Slot for each lane with `pred` in a shared counter, one atomic per warp. All 32 lanes call it.
__device__ __forceinline__ u32 warp_alloc(u32* counter, bool pred) {
  const u32 ballot = __ballot_sync(kFullMask, pred);
  const int leader = ballot ? __ffs(ballot) - 1 : 0;
  u32 base = 0;
  if (ballot != 0 && static_cast<int>(threadIdx.x & 31) == leader) base = atomicAdd(counter, __popc(ballot));
  base = __shfl_sync(kFullMask, base, leader);
  return base + __popc(ballot & lanes_below());
}

// hist[d] += 1 for each lane whose d is not kNoDigit, one atomic per distinct d in the warp
// (pixels of a class and keys of a bucket are often alike). All 32 lanes call it.
__device__ __forceinline__ void warp_hist_add(u32* hist, u32 d) {
  const u32 peers = __match_any_sync(kFullMask, d);
  if (d != kNoDigit && static_cast<int>(threadIdx.x & 31) == __ffs(peers) - 1) atomicAdd(hist + d, __popc(peers));
}

// ---------------------------------------------------------------------------------------------
// Launches 1 and 2: the counting sort by class

struct BucketPlan {
  int64_t blocks;  // G
  int64_t tile;    // pixels per block: block b takes [b * tile, min(n, (b + 1) * tile))
  int64_t iters;   // ceil(tile / kBucketThreads): the same trip count in every block
};

inline BucketPlan plan_buckets(int64_t n, int64_t num_classes) {
  const int64_t width = std::min<int64_t>(num_classes, kWindow);
  int64_t blocks = (n + kMinTile - 1) / kMinTile;
  blocks = std::min({blocks, kMaxBlocks, kWindowCounters / width, kMaxCounters / num_classes});
  blocks = std::max<int64_t>(blocks, 1);
  const int64_t tile = (n + blocks - 1) / blocks;
  return {blocks, tile, (tile + kBucketThreads - 1) / kBucketThreads};
}

// Launch 1. counts[b * C + c] = pixels of class c in block b's tile. Classes are counted kWindow at
// a time in shared memory (one pass over the tile per window; one pass unless C > 1024).
template <typename scalar_t, typename label_t>
__global__ void __launch_bounds__(kBucketThreads)
    count_classes_kernel(const scalar_t* __restrict__ values, const label_t* __restrict__ labels, int64_t n,
                         int64_t tile, int64_t iters, int64_t num_classes, int64_t ignore_index,
                         u32* __restrict__ counts) {
  __shared__ u32 s_count[kWindow];
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * tile;
  const int64_t end = std::min(n, begin + tile);
  const int tid = threadIdx.x;
  for (int64_t w0 = 0; w0 < num_classes; w0 += kWindow) {
    const int width = static_cast<int>(std::min<int64_t>(kWindow, num_classes - w0));
    if (tid < width) s_count[tid] = 0;
    __syncthreads();
    for (int64_t it = 0; it < iters; ++it) {
      const int64_t i = begin + it * kBucketThreads + tid;
      int slot = -1;
      if (i < end) {
        const int c = class_of(values[i], labels[i], num_classes, ignore_index);
        if (c >= w0 && c < w0 + width) slot = static_cast<int>(c - w0);
      }
      warp_hist_add(s_count, slot < 0 ? kNoDigit : static_cast<u32>(slot));
    }
    __syncthreads();
    if (tid < width) counts[static_cast<int64_t>(blockIdx.x) * num_classes + w0 + tid] = s_count[tid];
    __syncthreads();  // s_count is cleared for the next window
  }
}

// Launch 2. Buckets are laid out in class order; inside class c, block b's pixels start after
// those of blocks 0..b-1. Block 0 writes class_start / class_count (and, for top-K, acc_start:
// the exclusive prefix of min(N_c, k), where launch 3 keeps a class's selected entries).
template <typename scalar_t, typename label_t, bool kPositions>
__global__ void __launch_bounds__(kBucketThreads)
    scatter_classes_kernel(const scalar_t* __restrict__ values, const label_t* __restrict__ labels, int64_t n,
                           int64_t tile, int64_t iters, int64_t blocks, int64_t num_classes, int64_t ignore_index,
                           u64 k, const u32* __restrict__ counts, int64_t* __restrict__ class_start,
                           int64_t* __restrict__ class_count, int64_t* __restrict__ acc_start,
                           typename Entries<scalar_t, kPositions>::E* __restrict__ buckets) {
  using Policy = Entries<scalar_t, kPositions>;
  __shared__ u64 s_pre[kBucketThreads];
  __shared__ u64 s_tot[kBucketThreads];
  __shared__ u64 s_base[kWindow];
  __shared__ u32 s_fill[kWindow];
  __shared__ u64 s_warp[32];
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * tile;
  const int64_t end = std::min(n, begin + tile);
  const int tid = threadIdx.x;
  u64 carry = 0;      // pixels of all classes before the window
  u64 acc_carry = 0;  // sum of min(N_c, k) over the classes before the window
  for (int64_t w0 = 0; w0 < num_classes; w0 += kWindow) {
    const int width = static_cast<int>(std::min<int64_t>(kWindow, num_classes - w0));
    // Column sums of the window's classes, rows split among `groups` thread groups:
    // thread tid = r * width + j sums rows r, r + groups, ... of class w0 + j.
    const int groups = static_cast<int>(std::min<int64_t>(kBucketThreads / width, blocks));
    if (tid < groups * width) {
      const int j = tid % width;
      const int r = tid / width;
      u64 pre = 0, tot = 0;
      for (int64_t b = r; b < blocks; b += groups) {
        const u64 v = counts[b * num_classes + w0 + j];
        tot += v;
        pre += b < static_cast<int64_t>(blockIdx.x) ? v : 0;
      }
      s_pre[tid] = pre;
      s_tot[tid] = tot;
    }
    __syncthreads();
    u64 pre = 0, tot = 0;  // class w0 + tid: pixels in blocks before this one, and in all blocks
    if (tid < width) {
      for (int r = 0; r < groups; ++r) {
        pre += s_pre[r * width + tid];
        tot += s_tot[r * width + tid];
      }
    }
    u64 window_total;
    const u64 start = carry + block_exclusive_scan<kBucketThreads>(tot, s_warp, window_total);
    u64 acc_excl = 0, acc_total = 0;
    if constexpr (kPositions) acc_excl = block_exclusive_scan<kBucketThreads>(tot < k ? tot : k, s_warp, acc_total);
    if (tid < width) {
      s_base[tid] = start + pre;
      s_fill[tid] = 0;
      if (blockIdx.x == 0) {
        class_start[w0 + tid] = static_cast<int64_t>(start);
        class_count[w0 + tid] = static_cast<int64_t>(tot);
        if constexpr (kPositions) acc_start[w0 + tid] = static_cast<int64_t>(acc_carry + acc_excl);
      }
    }
    carry += window_total;
    acc_carry += acc_total;
    __syncthreads();
    for (int64_t it = 0; it < iters; ++it) {
      const int64_t i = begin + it * kBucketThreads + tid;
      int slot = -1;
      scalar_t x = 0;
      if (i < end) {
        x = values[i];
        const int c = class_of(x, labels[i], num_classes, ignore_index);
        if (c >= w0 && c < w0 + width) slot = static_cast<int>(c - w0);
      }
      const u32 peers = __match_any_sync(kFullMask, slot);
      const int leader = __ffs(peers) - 1;
      u32 got = 0;
      if (slot >= 0 && static_cast<int>(tid & 31) == leader) got = atomicAdd(s_fill + slot, __popc(peers));
      got = __shfl_sync(kFullMask, got, leader);
      if (slot >= 0) buckets[s_base[slot] + got + __popc(peers & lanes_below())] = Policy::make(x, i);
    }
    __syncthreads();  // s_pre, s_base and s_fill are rewritten for the next window
  }
}

// ---------------------------------------------------------------------------------------------
// Launch 3: block-level radix select on one bucket (blockDim.x == kSelectThreads)

struct SelectShared {
  u32 hist[kBins];
  u64 warp[32];
  u64 above;  // candidates whose current digit is above the chosen one
  u64 eq;     // candidates whose current digit is the chosen one
  u32 digit;
  u32 survivors;  // slot counter of the in-place compaction
  u32 accepted;   // slot counter of the collected entries (top-K)
};

// Entries loaded per thread per round: 64 bytes in flight per thread.
template <typename E>
constexpr int select_items() {
  return static_cast<int>(64 / sizeof(E));
}

// Calls f(entry, valid) for data[0, cnt), kItems entries per thread per round, with the same trip
// count in every thread (f may use warp intrinsics). With sync_after_load (block-uniform), a
// barrier separates each round's loads from f, so f may overwrite data[0, end of the round):
// in-place compaction writes slot s < (entries kept so far) <= (entries loaded so far).
template <int kItems, typename E, typename F>
__device__ __forceinline__ void for_each_entry(const E* data, u64 cnt, bool sync_after_load, F&& f) {
  constexpr u64 kRound = static_cast<u64>(kSelectThreads) * kItems;
  for (u64 base = 0; base < cnt; base += kRound) {
    E v[kItems];
#pragma unroll
    for (int it = 0; it < kItems; ++it) {
      const u64 i = base + static_cast<u64>(it) * kSelectThreads + threadIdx.x;
      v[it] = i < cnt ? data[i] : E(0);
    }
    if (sync_after_load) __syncthreads();
#pragma unroll
    for (int it = 0; it < kItems; ++it) {
      const u64 i = base + static_cast<u64>(it) * kSelectThreads + threadIdx.x;
      f(v[it], i < cnt);
    }
  }
}

// The digit D holding the need-th largest candidate (1 <= need <= sum of hist): sets s.digit,
// s.above (candidates with a larger digit) and s.eq (hist[D]). Ends with a barrier, after which
// hist may be overwritten.
__device__ __forceinline__ void find_digit(SelectShared& s, u64 need) {
  const u32 hi = kBins - 1 - 2 * threadIdx.x;  // thread t holds bins 2047 - 2t and 2046 - 2t
  const u32 lo = hi - 1;
  const u64 h_hi = s.hist[hi];
  const u64 h_lo = s.hist[lo];
  u64 total;
  const u64 above = block_exclusive_scan<kSelectThreads>(h_hi + h_lo, s.warp, total);  // bins > hi
  if (above < need && need <= above + h_hi) {
    s.digit = hi;
    s.above = above;
    s.eq = h_hi;
  } else if (above + h_hi < need && need <= above + h_hi + h_lo) {
    s.digit = lo;
    s.above = above + h_hi;
    s.eq = h_lo;
  }
  __syncthreads();
}

// MSD radix select on data[0, cnt) (clobbered: compacted in place) for the need-th largest entry
// (1 <= need <= cnt). Digits of kRadixBits from bit kBits down; per digit, the candidates that
// share the chosen digit stay. Without kCollect it returns the need-th largest entry itself.
// With kCollect (entries all distinct) it writes the `need` largest entries, in no particular
// order, to acc[0, need) as it goes (entries above the chosen digit at each step) and returns
// once all are found.
template <typename E, int kBits, bool kCollect>
__device__ E block_select(E* data, u64 cnt, u64 need, E* acc, SelectShared& s) {
  constexpr int kItems = select_items<E>();
  const int tid = threadIdx.x;
  int shift = kBits > kRadixBits ? kBits - kRadixBits : 0;
  u32 mask = (1u << (kBits - shift)) - 1u;

  for (int j = tid; j < kBins; j += kSelectThreads) s.hist[j] = 0;
  if (tid == 0) s.accepted = 0;
  __syncthreads();
  for_each_entry<kItems>(data, cnt, false,
                         [&](E e, bool valid) { warp_hist_add(s.hist, valid ? digit_of(e, shift, mask) : kNoDigit); });
  __syncthreads();

  E prefix = 0;
  while (true) {
    find_digit(s, need);
    const u32 d_sel = s.digit;
    const u64 above = s.above;
    const u64 eq = s.eq;
    prefix |= E(d_sel) << shift;
    if constexpr (kCollect) {
      if (above + eq == need) {  // everything from the chosen digit up is in: take it, done
        for_each_entry<kItems>(data, cnt, false, [&](E e, bool valid) {
          const bool take = valid && digit_of(e, shift, mask) >= d_sel;
          const u32 slot = warp_alloc(&s.accepted, take);
          if (take) acc[slot] = e;
        });
        return prefix;
      }
    }
    // Without kCollect: the key is complete. (With kCollect the entries are distinct, so at the
    // last digit eq == 1 == need - above and the branch above has returned.)
    if (shift == 0) return prefix;
    need -= above;
    const int next_shift = shift > kRadixBits ? shift - kRadixBits : 0;
    const u32 next_mask = (1u << (shift - next_shift)) - 1u;
    const bool compact = eq != cnt;  // otherwise every candidate stays where it is
    // find_digit's final barrier: every thread has read hist, digit, above and eq.
    for (int j = tid; j < kBins; j += kSelectThreads) s.hist[j] = 0;
    if (tid == 0) s.survivors = 0;
    __syncthreads();
    for_each_entry<kItems>(data, cnt, compact, [&](E e, bool valid) {
      const u32 d = digit_of(e, shift, mask);
      const bool keep = valid && d == d_sel;
      warp_hist_add(s.hist, keep ? digit_of(e, next_shift, next_mask) : kNoDigit);
      if (compact) {
        const u32 slot = warp_alloc(&s.survivors, keep);
        if (keep) data[slot] = e;
      }
      if constexpr (kCollect) {
        const bool take = valid && d > d_sel;
        const u32 slot = warp_alloc(&s.accepted, take);
        if (take) acc[slot] = e;
      }
    });
    __syncthreads();
    cnt = eq;
    shift = next_shift;
    mask = next_mask;
  }
}

// Sorts s[0, kSortTile) descending (bitonic). Starts after the caller's barrier, ends with one.
template <typename E>
__device__ __forceinline__ void bitonic_sort_desc(E* s) {
  for (u32 size = 2; size <= kSortTile; size <<= 1) {
    for (u32 stride = size >> 1; stride > 0; stride >>= 1) {
      const u32 t = threadIdx.x;                   // one pair per thread (kSortTile / 2 threads)
      const u32 i = 2 * t - (t & (stride - 1));  // i has bit `stride` clear; its partner is i + stride
      const u32 j = i + stride;
      const E a = s[i];
      const E b = s[j];
      const bool desc = (i & size) == 0;  // the whole tile ends descending
      if ((a < b) == desc) {
        s[i] = b;
        s[j] = a;
      }
      __syncthreads();
    }
  }
}

// Writes the positions of cur[0, m) (distinct top-K entries) to row[0, m) in descending entry
// order. Tiles of kSortTile are sorted in shared memory, then merged pairwise in global memory,
// ping-ponging between cur and oth (m entries each, both clobbered); the last merge writes the
// positions. An entry's place in a merge is its place in its own run plus the number of entries
// of the other run above it (a binary search; entries are distinct).
template <typename E>
__device__ void sort_positions(E* cur, E* oth, u64 m, int64_t* row, E* tile) {
  const int tid = threadIdx.x;
  const u64 tiles = (m + kSortTile - 1) / kSortTile;
  for (u64 t = 0; t < tiles; ++t) {
    const u64 base = t * kSortTile;
    __syncthreads();  // the previous tile has been written out; cur holds the selection
    for (int j = tid; j < kSortTile; j += kSelectThreads) tile[j] = base + j < m ? cur[base + j] : E(0);
    __syncthreads();
    bitonic_sort_desc(tile);  // real entries are > 0, so the E(0) padding sorts last
    for (int j = tid; j < kSortTile; j += kSelectThreads) {
      const u64 g = base + j;
      if (g < m) {
        if (tiles == 1) {
          row[g] = entry_position(tile[j]);
        } else {
          cur[g] = tile[j];
        }
      }
    }
  }
  for (u64 w = kSortTile; w < m; w *= 2) {
    __syncthreads();  // cur is complete
    const bool last = 2 * w >= m;
    for (u64 i = tid; i < m; i += kSelectThreads) {
      const E e = cur[i];
      const u64 pair = i / (2 * w) * (2 * w);
      u64 lo, hi, own;
      if (i < pair + w) {  // first run; the other is [pair + w, pair + 2w) cut at m
        lo = std::min(pair + w, m);
        hi = std::min(pair + 2 * w, m);
        own = i;
      } else {  // second run; the other is [pair, pair + w)
        lo = pair;
        hi = pair + w;
        own = i - w;
      }
      u64 a = lo, b = hi;  // first index of the other run whose entry is below e
      while (a < b) {
        const u64 mid = (a + b) / 2;
        if (cur[mid] > e) {
          a = mid + 1;
        } else {
          b = mid;
        }
      }
      const u64 out = own + (a - lo);
      if (last) {
        row[out] = entry_position(e);
      } else {
        oth[out] = e;
      }
    }
    E* swap = cur;
    cur = oth;
    oth = swap;
  }
}

// ---------------------------------------------------------------------------------------------
// Launch 3 kernels

// Launch 3 of class_thresholds: block c selects its class's threshold. As the CPU kernel:
// n = floor(N_c * portion) in double; 1.0 where !(n >= 1); n clamped to N_c (portion > 1 when
// unvalidated); the n-th largest key otherwise, turned back into a value (-0.0 reads as +0.0).
template <typename scalar_t>
__global__ void __launch_bounds__(kSelectThreads)
    threshold_select_kernel(typename Entries<scalar_t, false>::E* __restrict__ buckets,
                            const int64_t* __restrict__ class_start, const int64_t* __restrict__ class_count,
                            double portion, scalar_t* __restrict__ out) {
  using Policy = Entries<scalar_t, false>;
  __shared__ SelectShared s;
  const int64_t c = blockIdx.x;
  const u64 total = static_cast<u64>(class_count[c]);
  const double floored = floor(static_cast<double>(total) * portion);
  if (!(floored >= 1)) {  // block-uniform
    if (threadIdx.x == 0) out[c] = scalar_t(1);
    return;
  }
  const u64 rank = floored >= static_cast<double>(total) ? total : static_cast<u64>(floored);
  const auto key = block_select<typename Policy::E, Policy::kBits, false>(buckets + class_start[c], total, rank,
                                                                          nullptr, s);
  if (threadIdx.x == 0) out[c] = key_value(key);
}

// Launch 3. Class c's bucket is buckets[class_start[c], + N_c); acc[acc_start[c], + min(N_c, k))
// is its spare: the collected top-k when N_c > k, the sort's second buffer otherwise.
template <typename scalar_t>
__global__ void __launch_bounds__(kSelectThreads)
    topk_select_kernel(typename Entries<scalar_t, true>::E* __restrict__ buckets,
                       typename Entries<scalar_t, true>::E* __restrict__ acc, const int64_t* __restrict__ class_start,
                       const int64_t* __restrict__ class_count, const int64_t* __restrict__ acc_start, int64_t k,
                       int64_t* __restrict__ index, int64_t* __restrict__ count) {
  using Policy = Entries<scalar_t, true>;
  using E = typename Policy::E;
  __shared__ SelectShared s;
  __shared__ E tile[kSortTile];
  const int64_t c = blockIdx.x;
  const u64 n = static_cast<u64>(class_count[c]);
  const u64 kk = static_cast<u64>(k);
  const u64 m = n < kk ? n : kk;
  E* const bucket = buckets + class_start[c];
  E* const spare = acc + acc_start[c];
  int64_t* const row = index + c * k;
  if (threadIdx.x == 0) count[c] = static_cast<int64_t>(m);
  E* cur = bucket;
  E* oth = spare;
  if (n > kk) {  // block-uniform
    block_select<E, Policy::kBits, true>(bucket, n, kk, spare, s);
    cur = spare;   // the k largest, unordered
    oth = bucket;  // no longer needed: at least k entries of room
  }
  sort_positions(cur, oth, m, row, tile);  // begins with a barrier (after block_select's writes)
  for (u64 i = m + threadIdx.x; i < kk; i += kSelectThreads) row[i] = -1;
}

// ---------------------------------------------------------------------------------------------
// Host side: the launch sequences, compiled in both builds (the ops' at::Tensor wrappers and the
// emulation test call these same functions)

// One kernel launch on `stream`; under UDAFAST_CUDA_EMULATION, the blocks run on the CPU.
template <typename... P, typename... A>
void launch(void (*kernel)(P...), unsigned grid, unsigned block, cudaStream_t stream, A... args) {
#ifdef UDAFAST_CUDA_EMULATION
  (void)stream;
  emu_launch(kernel, grid, block, args...);
#else
  kernel<<<grid, block, 0, stream>>>(args...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
}

// Workspace carving: one byte buffer, every part 16-byte aligned.
struct Carver {
  uint8_t* base = nullptr;
  size_t offset = 0;
  template <typename T>
  T* take(int64_t count) {
    offset = (offset + 15) & ~size_t(15);
    T* p = reinterpret_cast<T*>(reinterpret_cast<uintptr_t>(base) + offset);  // base is null on the sizing run
    offset += static_cast<size_t>(count) * sizeof(T);
    return p;
  }
};

// The three launches' workspace for n pixels and C classes (and, for top-K, k), carved from
// bytes(n, C, k) bytes at `base`. Nothing in it needs zeroing.
template <typename scalar_t, bool kPositions>
struct BucketWorkspace {
  using E = typename Entries<scalar_t, kPositions>::E;
  int64_t n, num_classes, k;
  BucketPlan plan;
  u32* counts;           // [blocks, C], launch 1
  int64_t* class_start;  // [C], launch 2
  int64_t* class_count;  // [C], launch 2
  int64_t* acc_start;    // [C], launch 2, top-K only (null otherwise)
  E* buckets;            // [n], launch 2; clobbered by launch 3
  E* acc;                // [min(n, C * k)], launch 3's spare, top-K only (null otherwise)
  size_t end;            // bytes carved

  BucketWorkspace(uint8_t* base, int64_t n, int64_t num_classes, int64_t k = 0)
      : n(n), num_classes(num_classes), k(k), plan(plan_buckets(n, num_classes)) {
    Carver cv{base};
    counts = cv.take<u32>(plan.blocks * num_classes);
    class_start = cv.take<int64_t>(num_classes);
    class_count = cv.take<int64_t>(num_classes);
    acc_start = kPositions ? cv.take<int64_t>(num_classes) : nullptr;
    buckets = cv.take<E>(n);
    // Room for every class's min(N_c, k) entries: sum_c min(N_c, k) <= min(N, C * k) (no overflow:
    // C < 2^31, and k < n < 2^32 where C * k is taken).
    acc = kPositions ? cv.take<E>(k >= n ? n : std::min<int64_t>(n, num_classes * k)) : nullptr;
    end = cv.offset;
  }

  static int64_t bytes(int64_t n, int64_t num_classes, int64_t k = 0) {
    return static_cast<int64_t>(BucketWorkspace(nullptr, n, num_classes, k).end) + 16;
  }
};

// Launches 1 and 2: the valid pixels' entries into ws.buckets, class starts and sizes.
template <typename scalar_t, typename label_t, bool kPositions>
void fill_buckets(const scalar_t* values, const label_t* labels, int64_t ignore_index,
                  const BucketWorkspace<scalar_t, kPositions>& ws, cudaStream_t stream) {
  const auto grid = static_cast<unsigned>(ws.plan.blocks);
  launch(count_classes_kernel<scalar_t, label_t>, grid, kBucketThreads, stream, values, labels, ws.n, ws.plan.tile,
         ws.plan.iters, ws.num_classes, ignore_index, ws.counts);
  launch(scatter_classes_kernel<scalar_t, label_t, kPositions>, grid, kBucketThreads, stream, values, labels, ws.n,
         ws.plan.tile, ws.plan.iters, ws.plan.blocks, ws.num_classes, ignore_index, static_cast<u64>(ws.k),
         ws.counts, ws.class_start, ws.class_count, ws.acc_start, ws.buckets);
}

// Launch 3 of class_thresholds (after fill_buckets; clobbers the buckets): out[C].
template <typename scalar_t>
void select_thresholds(const BucketWorkspace<scalar_t, false>& ws, double portion, scalar_t* out,
                       cudaStream_t stream) {
  launch(threshold_select_kernel<scalar_t>, static_cast<unsigned>(ws.num_classes), kSelectThreads, stream,
         ws.buckets, ws.class_start, ws.class_count, portion, out);
}

// Launch 3 of topk_per_class (after fill_buckets; clobbers the buckets): index[C, k], count[C].
template <typename scalar_t>
void select_topk(const BucketWorkspace<scalar_t, true>& ws, int64_t* index, int64_t* count, cudaStream_t stream) {
  launch(topk_select_kernel<scalar_t>, static_cast<unsigned>(ws.num_classes), kSelectThreads, stream, ws.buckets,
         ws.acc, ws.class_start, ws.class_count, ws.acc_start, ws.k, index, count);
}

#ifndef UDAFAST_CUDA_EMULATION
// Labels of the dtypes AT_DISPATCH_INTEGRAL_TYPES covers pass as they are; the rarer unsigned
// types are widened to int64 (as the CPU top-K does; an extra kernel only for those dtypes).
inline at::Tensor dispatchable_labels(const at::Tensor& labels) {
  switch (labels.scalar_type()) {
    case at::kByte:
    case at::kChar:
    case at::kShort:
    case at::kInt:
    case at::kLong:
      return labels.contiguous();
    default:
      return labels.to(at::kLong).contiguous();
  }
}
#endif  // UDAFAST_CUDA_EMULATION

}  // namespace
}  // namespace udafast_cuda
