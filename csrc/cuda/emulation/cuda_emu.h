// A CPU emulation of the CUDA execution model, enough to run udafast's bucket/select kernels as
// plain C++: one std::thread per CUDA thread, one block at a time (so `__shared__` = `static`),
// __syncthreads = std::barrier over the block, warp intrinsics through a per-warp exchange area
// and a per-warp barrier. Threads really run concurrently, so missing barriers can show up as
// wrong results (not reliably: the OS schedules them, not a warp scheduler). The kernels' host
// launch sequences (class_buckets.cuh) launch through emu_launch here, <<<>>> in the CUDA build.
#pragma once
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct EmuDim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local EmuDim3 threadIdx, blockIdx;
inline EmuDim3 blockDim, gridDim;

struct EmuWarp {
  std::barrier<> bar{32};
  uint64_t slot[32];
};
struct EmuBlock {
  explicit EmuBlock(unsigned threads) : bar(threads), warps(threads / 32) {}
  std::barrier<> bar;
  std::vector<EmuWarp> warps;
};
inline EmuBlock* emu_block = nullptr;

inline void __syncthreads() { emu_block->bar.arrive_and_wait(); }

inline EmuWarp& emu_warp() { return emu_block->warps[threadIdx.x / 32]; }
inline unsigned emu_lane() { return threadIdx.x & 31; }

template <typename T>
inline uint64_t emu_bits(T v) {
  static_assert(sizeof(T) <= 8);
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(T));
  return u;
}
template <typename T>
inline T emu_from(uint64_t u) {
  T v;
  std::memcpy(&v, &u, sizeof(T));
  return v;
}

template <typename T>
inline T __shfl_up_sync(unsigned, T x, int o) {
  EmuWarp& w = emu_warp();
  const unsigned lane = emu_lane();
  w.slot[lane] = emu_bits(x);
  w.bar.arrive_and_wait();
  const T r = lane >= unsigned(o) ? emu_from<T>(w.slot[lane - o]) : x;
  w.bar.arrive_and_wait();
  return r;
}

template <typename T>
inline T __shfl_sync(unsigned, T x, int src) {
  EmuWarp& w = emu_warp();
  w.slot[emu_lane()] = emu_bits(x);
  w.bar.arrive_and_wait();
  const T r = emu_from<T>(w.slot[src & 31]);
  w.bar.arrive_and_wait();
  return r;
}

inline unsigned __ballot_sync(unsigned, bool p) {
  EmuWarp& w = emu_warp();
  w.slot[emu_lane()] = p ? 1 : 0;
  w.bar.arrive_and_wait();
  unsigned r = 0;
  for (int l = 0; l < 32; ++l) r |= unsigned(w.slot[l] != 0) << l;
  w.bar.arrive_and_wait();
  return r;
}

template <typename T>
inline unsigned __match_any_sync(unsigned, T v) {
  EmuWarp& w = emu_warp();
  const uint64_t mine = emu_bits(v);
  w.slot[emu_lane()] = mine;
  w.bar.arrive_and_wait();
  unsigned r = 0;
  for (int l = 0; l < 32; ++l) r |= unsigned(w.slot[l] == mine) << l;
  w.bar.arrive_and_wait();
  return r;
}

inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(unsigned x) { return __builtin_ffs(int(x)); }
inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST);
}
inline uint32_t __float_as_uint(float x) { return emu_bits(x); }
inline float __uint_as_float(uint32_t u) { return emu_from<float>(u); }
inline long long __double_as_longlong(double x) { return (long long)emu_bits(x); }
inline double __longlong_as_double(long long u) { return emu_from<double>((uint64_t)u); }

// Streams mean nothing here: launches run in call order, each to completion.
struct CUstream_st;
using cudaStream_t = CUstream_st*;

// Test hook: while an EmuOnlyBlocks lives, launches of its kernel run only the listed blocks (the
// wide cases select a few classes of 1100); the other blocks' outputs stay unwritten.
inline const void* emu_only_kernel = nullptr;
inline std::vector<unsigned> emu_only_blocks;
struct EmuOnlyBlocks {
  template <typename... P>
  EmuOnlyBlocks(void (*kernel)(P...), std::vector<unsigned> blocks) {
    emu_only_kernel = reinterpret_cast<const void*>(kernel);
    emu_only_blocks = std::move(blocks);
  }
  ~EmuOnlyBlocks() {
    emu_only_kernel = nullptr;
    emu_only_blocks.clear();
  }
  EmuOnlyBlocks(const EmuOnlyBlocks&) = delete;
  EmuOnlyBlocks& operator=(const EmuOnlyBlocks&) = delete;
};

// Runs the blocks of [0, grid) (or those of an EmuOnlyBlocks) one after the other.
template <typename... P, typename... A>
void emu_launch(void (*kernel)(P...), unsigned grid, unsigned block, A... args) {
  gridDim = {grid, 1, 1};
  blockDim = {block, 1, 1};
  std::vector<unsigned> blocks;
  if (reinterpret_cast<const void*>(kernel) == emu_only_kernel) {
    blocks = emu_only_blocks;
  } else {
    for (unsigned b = 0; b < grid; ++b) blocks.push_back(b);
  }
  for (unsigned b : blocks) {
    EmuBlock blk(block);
    emu_block = &blk;
    std::vector<std::thread> threads;
    threads.reserve(block);
    for (unsigned t = 0; t < block; ++t) {
      threads.emplace_back([&, t] {
        threadIdx = {t, 0, 0};
        blockIdx = {b, 0, 0};
        kernel(args...);
      });
    }
    for (auto& th : threads) th.join();
    emu_block = nullptr;
  }
}
